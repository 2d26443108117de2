"""Agent mode: the agent moves KV bytes between the arena and workers' exported caches.

    base.py      what an export and a job are, the mover interface, one copy thread
                 per device
    cpu.py       the CPU mover: Linux cross-memory attach (process_vm_readv/writev)
    gpu.py       the GPU mover: CUDA/HIP IPC handles, the arena registered once, the
                 one-launch kernel on one stream per device, interprocess events
    exports.py   exports per client, dropped when the client goes
    service.py   the loop's side: export and job requests, completions, statistics

A device's mover plugs in through ``register_mover``; the CPU mover is built in, the
GPU mover is imported when a GPU worker first exports.
"""
