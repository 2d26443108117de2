"""I/O threads for one tier. Two queues: reads (promotions, probes, deletes) go before
writes, so a backlog of demotions never delays a lookup that is waiting. Queue bounds
are the manager's business; the pool only runs jobs and reports them done."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("kvnode.tiers")


@dataclass(slots=True, eq=False)
class Job:
    kind: str  # "read", "probe", "write", "delete"
    tier: str
    key: bytes
    run: Callable[[], Any]
    result: Any = None
    error: BaseException | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class IOPool:
    def __init__(self, name: str, threads: int, on_done: Callable[[Job], None]) -> None:
        self.name = name
        self._on_done = on_done
        self._high: deque[Job] = deque()
        self._low: deque[Job] = deque()
        self._cv = threading.Condition()
        self._stop = False
        self._threads = [
            threading.Thread(target=self._work, name=f"kvnode-{name}-io-{i}", daemon=True)
            for i in range(max(1, threads))
        ]
        for t in self._threads:
            t.start()

    def submit(self, job: Job, high: bool) -> bool:
        with self._cv:
            if self._stop:
                return False
            (self._high if high else self._low).append(job)
            self._cv.notify()
        return True

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._high and not self._low and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                job = self._high.popleft() if self._high else self._low.popleft()
            try:
                job.result = job.run()
            except BaseException as exc:  # reported to the loop thread, never lost
                job.error = exc
            self._on_done(job)

    def close(self, timeout_s: float) -> int:
        """Stop: queued jobs are discarded, running ones finish. Returns threads alive."""
        with self._cv:
            self._stop = True
            self._high.clear()
            self._low.clear()
            self._cv.notify_all()
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return sum(t.is_alive() for t in self._threads)
