"""The shadow-ring arena: one anonymous memfd shared with a vhost-user daemon.

Under Xen, guest RAM is not a file the daemon could map (see
docs/xen-ioreq.md, "Guest memory on Xen"). The bridge instead gives the
daemon a single memfd, the *arena*, as its whole memory table. The arena
holds the shadow split rings (carved out once with :meth:`Arena.reserve`)
and the bounce buffers of the requests in flight (:meth:`Arena.alloc` /
:meth:`Arena.free`). The daemon therefore only ever sees the rings and the
buffers of requests it is serving.

The allocator is a first-fit free list kept sorted by offset; a freed range
merges with its free neighbours. Every range is a multiple of ``align``
bytes and starts on an ``align`` boundary, so no fragment smaller than one
granule ever exists. Reservations (the rings) are permanent until
:meth:`Arena.unreserve`; they split the arena into *gaps*, and the largest
gap is the largest buffer that can ever be allocated once every buffer is
freed. :meth:`Arena.fits_ever` answers that question up front, so a caller
can refuse a request that would otherwise wait forever.

Allocation and free cost O(number of free fragments). Nothing is
allocated per call besides Python ints.
"""

from __future__ import annotations

import mmap
import os
import sys

from bridge.free_ranges import FreeRanges, align_up

ARENA_NAME = "xen-vhost-bridge-arena"


class ArenaFull(MemoryError):
    """A reservation that does not fit in the arena (a configuration error:
    the arena is too small for the shadow rings)."""


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


class Arena:
    """A memfd of ``size`` bytes mapped shared, and an allocator of byte
    ranges inside it (offsets from the start of the memfd).

    ``fd`` goes to the daemon in SET_MEM_TABLE; ``buf`` is the bridge's
    writable view of the same pages. Offsets are what the allocator hands
    out; turning them into the addresses the daemon sees is the caller's
    business (region base + offset).
    """

    def __init__(self, size: int, *, align: int = 64) -> None:
        if sys.byteorder != "little":
            # Virtio rings are little-endian and :attr:`u16` stores in the
            # host's byte order.
            raise RuntimeError("shadow memory needs a little-endian host")
        if not _is_power_of_two(align) or align < 2:
            # At least 2: the arena is also a sequence of 16-bit words.
            raise ValueError(f"arena alignment must be a power of two of at least 2, not {align}")
        if size <= 0 or size % align:
            raise ValueError(f"arena size must be a positive multiple of {align}, not {size}")
        self.size = size
        self.align = align
        self.fd = os.memfd_create(ARENA_NAME, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self._mmap = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        self.buf = memoryview(self._mmap)
        """The whole arena, writable (``struct.pack_into`` and slicing work on it)."""
        self.u16 = self.buf.cast("H")
        """The arena as 16-bit words: ``u16[offset >> 1] = value`` is one
        aligned 16-bit store, and reading an item one 16-bit load. Ring
        indices a daemon may be reading at that moment must be written this
        way: ``struct.pack_into`` first zeroes its target with ``memset`` and
        only then stores the value, so a daemon that polls the ring (DPDK's
        vhost PMD does) can read the 0 in between."""
        self.closed = False
        self._free = FreeRanges(0, size)
        self._allocated: dict[int, int] = {}  # offset -> rounded size, buffers
        self._reserved: dict[int, int] = {}  # offset -> rounded size, rings
        self._max_alloc = size

    # -- lifetime -----------------------------------------------------------

    def close(self) -> None:
        """Unmap and close the memfd (the daemon keeps its own mapping)."""
        if self.closed:
            return
        self.closed = True
        self.u16.release()
        self.buf.release()
        self._mmap.close()
        os.close(self.fd)

    def __enter__(self) -> Arena:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- queries ------------------------------------------------------------

    @property
    def free_bytes(self) -> int:
        return self._free.total

    @property
    def largest_free(self) -> int:
        """The largest buffer :meth:`alloc` could return right now."""
        return self._free.largest()

    @property
    def max_alloc(self) -> int:
        """The largest buffer that can ever be allocated: the largest gap
        between reservations, which is free again once every buffer is."""
        return self._max_alloc

    @property
    def allocation_count(self) -> int:
        """Buffers currently allocated (reservations not counted)."""
        return len(self._allocated)

    @property
    def reserved_bytes(self) -> int:
        return sum(self._reserved.values())

    def fits_ever(self, size: int) -> bool:
        """Whether a buffer of ``size`` bytes could be allocated once every
        buffer now allocated is freed (reservations stay)."""
        return size >= 0 and self._rounded(size) <= self._max_alloc

    def _rounded(self, size: int) -> int:
        """Granules taken by ``size`` bytes; a zero-byte buffer still takes
        one granule, so every allocation has its own offset."""
        return align_up(max(size, 1), self.align)

    # -- buffers ------------------------------------------------------------

    def alloc(self, size: int) -> int | None:
        """A buffer of at least ``size`` bytes, ``align``-aligned: its offset,
        or None if no free range is large enough now."""
        if size < 0:
            raise ValueError(f"negative allocation size {size}")
        rounded = self._rounded(size)
        offset = self._free.take_first_fit(rounded, self.align)
        if offset is not None:
            self._allocated[offset] = rounded
        return offset

    def free(self, offset: int) -> None:
        """Give back a buffer returned by :meth:`alloc`."""
        size = self._allocated.pop(offset, None)
        if size is None:
            raise ValueError(f"arena offset {offset:#x} is not an allocated buffer")
        self._free.give(offset, size)

    # -- reservations -------------------------------------------------------

    def reserve(self, size: int, align: int | None = None) -> int:
        """Carve out a permanent range (a shadow ring) at the lowest offset
        that fits, aligned to ``max(align, self.align)``. Raises
        :class:`ArenaFull` if it does not fit now. Call it before buffers are
        allocated, so the rings sit at the start of the arena."""
        if align is not None and not _is_power_of_two(align):
            raise ValueError(f"reservation alignment must be a power of two, not {align}")
        want = self.align if align is None else max(align, self.align)
        if size <= 0:
            raise ValueError(f"reservation size must be positive, not {size}")
        rounded = self._rounded(size)
        offset = self._free.take_first_fit(rounded, want)
        if offset is None:
            raise ArenaFull(f"no room for a {size}-byte reservation in the {self.size}-byte arena "
                            f"({self._free.total} bytes free, largest free range {self.largest_free})")
        self._reserved[offset] = rounded
        self._recompute_max_alloc()
        return offset

    def unreserve(self, offset: int) -> None:
        """Give back a range returned by :meth:`reserve`."""
        size = self._reserved.pop(offset, None)
        if size is None:
            raise ValueError(f"arena offset {offset:#x} is not a reservation")
        self._free.give(offset, size)
        self._recompute_max_alloc()

    def _recompute_max_alloc(self) -> None:
        best = 0
        cursor = 0
        for offset in sorted(self._reserved):
            best = max(best, offset - cursor)
            cursor = offset + self._reserved[offset]
        self._max_alloc = max(best, self.size - cursor)

    def __repr__(self) -> str:
        return (f"<Arena fd={self.fd if not self.closed else 'closed'} size={self.size} free={self._free.total} "
                f"buffers={len(self._allocated)} reservations={len(self._reserved)}>")
