"""The connector's connection to the agent: bounded calls, background reconnects.

vLLM must never wait on an absent agent. While the link is down every call fails at
once with ``AgentUnavailable`` (no socket round trip, so no timeout is paid per
request); one background thread retries the connection with exponential backoff, so
retries are rate-limited instead of happening per request.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from kvnode.errors import AgentUnavailable, ClientUnknown, KVNodeError

log = logging.getLogger("kvnode.connector")

T = TypeVar("T")
ClientFactory = Callable[[], Any]


def default_client_factory(
    runtime_dir: str | None,
    name: str,
    timeout_s: float,
    on_map: Callable[[Any], None] | None = None,
    on_unmap: Callable[[Any], None] | None = None,
) -> ClientFactory:
    """Clients that call ``on_map(buffer)`` / ``on_unmap(buffer)`` on every (re)mapping
    of the arena, agent restarts included: the client owns the mapping, and whatever
    must follow it (page population, pinned-memory registration) lives in the hooks."""

    def make() -> Any:
        from kvnode.ipc.client import AgentClient

        return AgentClient(
            runtime_dir=runtime_dir,
            name=name,
            timeout_s=timeout_s,
            on_map=on_map,
            on_unmap=on_unmap,
        )

    return make


class AgentLink:
    """One ``AgentClient`` at a time, replaced in the background when it fails.

    Calls are serialised by one lock. The link knows nothing of the arena mapping:
    the client owns it and runs the factory's ``on_map``/``on_unmap`` hooks itself,
    also when it remaps on its own after an agent restart.
    """

    def __init__(
        self,
        factory: ClientFactory,
        retry_interval_s: float = 1.0,
        retry_max_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        background: bool = True,
    ) -> None:
        self._factory = factory
        self._retry_interval_s = retry_interval_s
        self._retry_max_s = retry_max_s
        self._clock = clock
        self._lock = threading.RLock()
        self._connecting = threading.Lock()  # one attempt at a time (never two clients)
        self._client: Any = None
        self._next_retry_s = 0.0
        self._backoff_s = retry_interval_s
        self._wake = threading.Event()
        self._closed = False
        self._pid = os.getpid()
        self.connects = 0
        self.failures = 0
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._run, name="kvnode-link", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ state
    @property
    def up(self) -> bool:
        return self._client is not None

    def try_connect(self) -> bool:
        """One connection attempt if the link is down and a retry is due. An attempt
        under way in another thread is not doubled (False until it has connected)."""
        if self._client is not None or self._closed:
            return self._client is not None
        if not self._connecting.acquire(blocking=False):
            return False
        try:
            return self._attempt()
        finally:
            self._connecting.release()

    def _attempt(self) -> bool:
        if self._client is not None or self._closed:
            return self._client is not None
        now = self._clock()
        if now < self._next_retry_s:
            return False
        try:
            client = self._factory()
            client.connect()
        except (KVNodeError, OSError) as exc:
            self._next_retry_s = now + self._backoff_s
            self._backoff_s = min(self._backoff_s * 2, self._retry_max_s)
            log.debug("kvnode agent not reachable (%s); next try in %.1fs", exc, self._backoff_s)
            return False
        with self._lock:
            if self._closed:  # closed while it connected: never kept past close()
                self._close_client(client)
                return False
            self._client = client
            self._backoff_s = self._retry_interval_s
            self.connects += 1
        log.info("kvnode: connected to the agent")
        return True

    def mark_down(self, reason: str) -> None:
        with self._lock:
            client, self._client = self._client, None
            if client is None:
                return
            self.failures += 1
            self._next_retry_s = self._clock() + self._retry_interval_s
            log.warning("kvnode: agent link down (%s); serving without the cache", reason)
            self._close_client(client)
        self._wake.set()

    def _close_client(self, client: Any) -> None:
        try:
            client.close()
        except Exception:
            pass  # the agent may be gone: nothing to tell it

    # ------------------------------------------------------------------ calls
    def call(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(client)`` under the lock. Raises ``AgentUnavailable`` at once when
        the link is down, and takes the link down when the agent stops answering."""
        with self._lock:
            client = self._client
            if client is None:
                raise AgentUnavailable("kvnode agent link is down")
            try:
                return fn(client)
            except AgentUnavailable as exc:
                self.mark_down(str(exc))
                raise
            except ClientUnknown:
                # The agent restarted: what this call referred to (a pin, a slot) was
                # the earlier generation's and is gone. The client has registered and
                # remapped already; the link stays up.
                raise

    # ------------------------------------------------------------------ thread
    def _run(self) -> None:
        while not self._closed:
            if os.getpid() != self._pid:
                return  # forked child: the parent's thread owns the link
            if self._client is None:
                self.try_connect()
                wait_s = max(0.01, self._next_retry_s - self._clock())
            else:
                wait_s = 1.0
            self._wake.wait(min(wait_s, 1.0))
            self._wake.clear()

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        with self._lock:
            client, self._client = self._client, None
            if client is not None:
                self._close_client(client)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)
