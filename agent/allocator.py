"""Page allocator for the arena.

The arena is split into fixed pages. An allocation is a list of extents (runs of
contiguous pages). Best fit on a single run first, so entries are contiguous in
practice; when no single run is large enough the allocation takes several runs, so
churn can fragment free space but never into failure: an allocation succeeds whenever
the free page count suffices. O(log n) per extent.
"""

from __future__ import annotations

from sortedcontainers import SortedList

from kvnode.errors import KVNodeError

Extent = tuple[int, int]  # (first page, page count)


class AllocatorInvariantError(KVNodeError):
    """Raised by check(): the allocator's books do not balance (a bug)."""


class PageAllocator:
    __slots__ = ("pages_total", "pages_free", "_by_start", "_by_end", "_by_size")

    def __init__(self, pages_total: int) -> None:
        if pages_total <= 0:
            raise ValueError("pages_total must be > 0")
        self.pages_total = pages_total
        self.pages_free = 0
        self._by_start: dict[int, int] = {}  # start -> count
        self._by_end: dict[int, int] = {}  # end (exclusive) -> start
        self._by_size: SortedList = SortedList()  # (count, start)
        self._insert(0, pages_total)

    # -- free-run books --------------------------------------------------
    def _insert(self, start: int, count: int) -> None:
        self._by_start[start] = count
        self._by_end[start + count] = start
        self._by_size.add((count, start))
        self.pages_free += count

    def _remove(self, start: int) -> int:
        count = self._by_start.pop(start)
        del self._by_end[start + count]
        self._by_size.remove((count, start))
        self.pages_free -= count
        return count

    # -- public ------------------------------------------------------------
    def alloc(self, pages: int) -> list[Extent] | None:
        """Allocate ``pages`` pages; None when fewer are free."""
        if pages <= 0:
            raise ValueError("pages must be > 0")
        if pages > self.pages_free:
            return None
        i = self._by_size.bisect_left((pages, -1))
        if i < len(self._by_size):
            count, start = self._by_size[i]
            self._remove(start)
            if count > pages:
                self._insert(start + pages, count - pages)
            return [(start, pages)]
        # No single run fits: take the largest runs until satisfied.
        out: list[Extent] = []
        need = pages
        while need:
            count, start = self._by_size[-1]
            self._remove(start)
            take = min(count, need)
            out.append((start, take))
            if count > take:
                self._insert(start + take, count - take)
            need -= take
        out.sort()
        return out

    def alloc_run(self, pages: int, n: int) -> list[Extent] | None:
        """``n`` allocations of ``pages`` pages each, carved side by side from one free
        run (best fit for all of them): one update of the books instead of ``n``. None
        when no single run holds them all (allocate one by one then)."""
        if pages <= 0 or n <= 0:
            raise ValueError("pages and n must be > 0")
        total = pages * n
        if total > self.pages_free:
            return None
        i = self._by_size.bisect_left((total, -1))
        if i >= len(self._by_size):
            return None
        count, start = self._by_size[i]
        self._remove(start)
        if count > total:
            self._insert(start + total, count - total)
        return [(start + j * pages, pages) for j in range(n)]

    def free(self, extents: list[Extent]) -> None:
        for start, count in extents:
            if count <= 0 or start < 0 or start + count > self.pages_total:
                raise AllocatorInvariantError(f"bad extent {(start, count)}")
            if start in self._by_start:
                raise AllocatorInvariantError(f"double free of page {start}")
            # coalesce with the run ending at `start` and the run starting at its end
            prev_start = self._by_end.get(start)
            if prev_start is not None:
                start, count = prev_start, count + self._remove(prev_start)
            nxt = start + count
            if nxt in self._by_start:
                count += self._remove(nxt)
            self._insert(start, count)

    def largest_free_run(self) -> int:
        return self._by_size[-1][0] if self._by_size else 0

    def check(self, used: list[Extent] | None = None) -> None:
        """Verify the books; with ``used``, also that used + free tile the arena exactly."""
        if sum(c for c, _ in self._by_size) != self.pages_free:
            raise AllocatorInvariantError("free count mismatch")
        runs = sorted(self._by_start.items())
        for (s1, c1), (s2, _) in zip(runs, runs[1:]):
            if s1 + c1 > s2:
                raise AllocatorInvariantError(f"free runs overlap at {s2}")
            if s1 + c1 == s2:
                raise AllocatorInvariantError(f"free runs not coalesced at {s2}")
        if used is not None:
            spans = sorted(list(runs) + list(used))
            pos = 0
            for s, c in spans:
                if s != pos:
                    raise AllocatorInvariantError(f"gap or overlap at page {pos} (next {s})")
                pos = s + c
            if pos != self.pages_total:
                raise AllocatorInvariantError("pages lost at the end of the arena")
