"""kvnode: a node-level KV-cache agent for vLLM.

Subpackages: ``kvnode.agent`` (the daemon), ``kvnode.ipc`` (protocol, shared memory,
client), ``kvnode.connector`` (the vLLM connector), ``kvnode.kernels`` (KV block copies).
"""

__version__ = "0.1.0"
