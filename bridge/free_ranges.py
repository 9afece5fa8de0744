"""A free list of address ranges: first fit, exact carving, coalescing.

Shared by the shadow arena (offsets in a memfd) and the simulated guest's
RAM allocator (guest-physical addresses): both hand out aligned ranges of
one space and take them back. The ranges are kept sorted, disjoint and
never adjacent (a freed range merges with its free neighbours), so the
list stays as short as the fragmentation really is.
"""

from __future__ import annotations

import bisect


def align_up(value: int, align: int) -> int:
    """``value`` rounded up to a multiple of ``align`` (a power of two)."""
    return (value + align - 1) & ~(align - 1)


class FreeRanges:
    def __init__(self, start: int, end: int) -> None:
        if not start < end:
            raise ValueError(f"empty range {start:#x}-{end:#x}")
        self.starts: list[int] = [start]
        self.ends: list[int] = [end]
        self.total = end - start

    def __len__(self) -> int:
        """The number of free fragments."""
        return len(self.starts)

    def largest(self) -> int:
        return max((e - s for s, e in zip(self.starts, self.ends)), default=0)

    def take_first_fit(self, size: int, align: int) -> int | None:
        """The lowest ``align``-aligned start of ``size`` free bytes, taken
        out of the list; None if no range holds them."""
        for i in range(len(self.starts)):
            start = align_up(self.starts[i], align)
            if start + size <= self.ends[i]:
                self._carve(i, start, start + size)
                return start
        return None

    def take_exact(self, start: int, size: int) -> bool:
        """Take exactly [start, start + size) if all of it is free."""
        i = bisect.bisect_right(self.starts, start) - 1
        if i < 0 or start + size > self.ends[i]:
            return False
        self._carve(i, start, start + size)
        return True

    def give(self, start: int, size: int) -> None:
        """Return [start, start + size) (it must have been taken)."""
        starts, ends = self.starts, self.ends
        end = start + size
        i = bisect.bisect_left(starts, start)
        merge_left = i > 0 and ends[i - 1] == start
        merge_right = i < len(starts) and starts[i] == end
        if merge_left and merge_right:
            ends[i - 1] = ends[i]
            del starts[i]
            del ends[i]
        elif merge_left:
            ends[i - 1] = end
        elif merge_right:
            starts[i] = start
        else:
            starts.insert(i, start)
            ends.insert(i, end)
        self.total += size

    def _carve(self, i: int, lo: int, hi: int) -> None:
        """Remove [lo, hi) from free range i, keeping what is left either side."""
        starts, ends = self.starts, self.ends
        start, end = starts[i], ends[i]
        if lo == start and hi == end:
            del starts[i]
            del ends[i]
        elif lo == start:
            starts[i] = hi
        elif hi == end:
            ends[i] = lo
        else:
            ends[i] = lo
            starts.insert(i + 1, hi)
            ends.insert(i + 1, end)
        self.total -= hi - lo

    def check(self) -> None:
        """Assert the invariants (sorted, disjoint, coalesced, total); for tests."""
        for i, (s, e) in enumerate(zip(self.starts, self.ends)):
            if not s < e:
                raise AssertionError(f"empty free range {s:#x}-{e:#x}")
            if i and not self.ends[i - 1] < s:
                raise AssertionError(f"free ranges overlap or touch at {s:#x}")
        if self.total != sum(e - s for s, e in zip(self.starts, self.ends)):
            raise AssertionError("the free byte count is off")
