"""Guest-physical memory allocation for the simulated guest's drivers.

The simulated guest has no kernel to hand out DMA memory, so its drivers
carve virtqueues, request headers and data buffers out of guest RAM with
:class:`GuestAllocator`: a first-fit free list kept sorted by address, with
neighbouring free ranges coalesced on free. It only does arithmetic on
guest-physical addresses; zeroing or filling the memory is the caller's job
(through ``GuestRam``).

Every allocation is rounded up to :data:`GRANULE` bytes and aligned to at
least :data:`GRANULE`, which keeps free fragments usable and makes every
returned address suitable for a descriptor table (16-byte alignment).
"""

from __future__ import annotations

import bisect

from bridge.free_ranges import FreeRanges, align_up

GRANULE = 16
"""Allocation unit and minimum alignment, in bytes."""

DEFAULT_RESERVE_LOW = 0x100000
"""By default the first MiB of guest RAM is kept out of the allocator: it is
where a real guest's kernel image would sit, and it means a buffer address
computed as 'offset 0 of RAM' by mistake never points at live driver data."""


class GuestMemoryExhausted(MemoryError):
    """No free range of guest RAM is large enough for the request."""


class GuestAllocator:
    """First-fit allocator of guest-physical ranges inside one RAM bank.

    ``reserve_low`` bytes at the start of the bank are never handed out.
    Allocation and free are O(number of free fragments), which stays small
    because freed ranges merge with their free neighbours.
    """

    def __init__(self, ram_base: int, ram_size: int, reserve_low: int = DEFAULT_RESERVE_LOW) -> None:
        if ram_base < 0 or ram_size <= 0:
            raise ValueError(f"bad guest RAM bank: base {ram_base:#x}, size {ram_size:#x}")
        if not 0 <= reserve_low < ram_size:
            raise ValueError(f"reserve_low {reserve_low:#x} does not leave any of the {ram_size:#x}-byte bank")
        self.ram_base = ram_base
        self.ram_size = ram_size
        start = align_up(ram_base + reserve_low, GRANULE)
        end = (ram_base + ram_size) & ~(GRANULE - 1)
        if end <= start:
            raise ValueError("guest RAM bank too small to allocate from")
        self._free = FreeRanges(start, end)
        self._allocated: dict[int, int] = {}
        self._allocated_bytes = 0
        self._capacity = end - start

    # -- queries ------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Bytes the allocator manages (the bank minus the low reservation)."""
        return self._capacity

    @property
    def allocated_bytes(self) -> int:
        return self._allocated_bytes

    @property
    def free_bytes(self) -> int:
        return self._free.total

    @property
    def largest_free(self) -> int:
        return self._free.largest()

    @property
    def allocation_count(self) -> int:
        return len(self._allocated)

    @property
    def free_fragments(self) -> int:
        return len(self._free)

    def size_of(self, gpa: int) -> int:
        """The (rounded) size of the live allocation starting at ``gpa``."""
        try:
            return self._allocated[gpa]
        except KeyError:
            raise ValueError(f"{gpa:#x} is not the start of a live allocation") from None

    def owns(self, gpa: int) -> bool:
        return gpa in self._allocated

    # -- allocation ---------------------------------------------------------

    def allocate(self, size: int, align: int = GRANULE) -> int:
        """Return the guest-physical address of ``size`` free bytes aligned
        to ``align`` (a power of two); raise :class:`GuestMemoryExhausted`."""
        if size <= 0:
            raise ValueError(f"allocation size must be positive, not {size}")
        if align <= 0 or align & (align - 1):
            raise ValueError(f"alignment must be a power of two, not {align}")
        align = max(align, GRANULE)
        size = align_up(size, GRANULE)
        gpa = self._free.take_first_fit(size, align)
        if gpa is None:
            raise GuestMemoryExhausted(
                f"guest RAM exhausted: no {size:#x}-byte range aligned to {align:#x} "
                f"({self.free_bytes:#x} bytes free in {len(self._free)} fragments, largest {self.largest_free:#x}, "
                f"{len(self._allocated)} live allocations)"
            )
        self._allocated[gpa] = size
        self._allocated_bytes += size
        return gpa

    def reserve(self, gpa: int, size: int) -> None:
        """Take the exact range [gpa, gpa + size) out of the free list (for
        memory something else in the guest owns); release it with free(gpa).
        ``gpa`` and ``size`` must be multiples of GRANULE."""
        if size <= 0 or gpa % GRANULE or size % GRANULE:
            raise ValueError(f"reserve needs a positive, {GRANULE}-byte aligned range, not {gpa:#x}+{size:#x}")
        if not self._free.take_exact(gpa, size):
            raise ValueError(f"range {gpa:#x}+{size:#x} is not free")
        self._allocated[gpa] = size
        self._allocated_bytes += size

    def free(self, gpa: int) -> None:
        """Give back the allocation that starts at ``gpa``."""
        try:
            size = self._allocated.pop(gpa)
        except KeyError:
            raise ValueError(f"free of {gpa:#x}: not a live allocation (double free or foreign address)") from None
        self._allocated_bytes -= size
        self._free.give(gpa, size)

    def check_consistency(self) -> None:
        """Assert the free list invariants (sorted, disjoint, coalesced, no
        overlap with live allocations); for tests."""
        self._free.check()
        starts, ends = self._free.starts, self._free.ends
        if self._free.total + self._allocated_bytes != self._capacity:
            raise AssertionError("free and allocated bytes do not add up to the capacity")
        for gpa, size in self._allocated.items():
            i = bisect.bisect_right(starts, gpa) - 1
            if i >= 0 and gpa < ends[i]:
                raise AssertionError(f"allocation {gpa:#x} lies in a free range")
            if i + 1 < len(starts) and starts[i + 1] < gpa + size:
                raise AssertionError(f"allocation {gpa:#x}+{size:#x} overlaps a free range")


# -- grant DMA addresses --------------------------------------------------------
#
# With grant_usage on, Linux's xen-grant-dma hands a virtio driver DMA
# addresses that name grant references instead of guest-physical memory:
# bit 63 set, the reference in the page-number bits, the offset in the page
# below. A buffer of several pages is granted with consecutive references,
# so the address arithmetic of a linear buffer still works.

GRANT_DMA_ADDR_OFF = 1 << 63
"""Bit 63: the address is a grant address (xen-grant-dma's XEN_GRANT_DMA_ADDR_OFF)."""

XEN_PAGE_SHIFT = 12
XEN_PAGE_MASK = (1 << XEN_PAGE_SHIFT) - 1
GRANT_REF_MAX = 0xFFFFFFFF


def grant_address(ref: int, offset: int = 0) -> int:
    """The DMA address of byte ``offset`` of the page granted as ``ref``
    (an offset past the page lands in the pages of the next references)."""
    if not 0 <= ref <= GRANT_REF_MAX:
        raise ValueError(f"{ref} is not a grant reference")
    if offset < 0:
        raise ValueError(f"negative offset {offset}")
    return GRANT_DMA_ADDR_OFF | ((ref << XEN_PAGE_SHIFT) + offset)


def is_grant_address(addr: int) -> bool:
    return bool(addr & GRANT_DMA_ADDR_OFF)


def grant_ref_of(addr: int) -> tuple[int, int]:
    """(grant reference, offset in its page) of a grant address."""
    if not is_grant_address(addr):
        raise ValueError(f"{addr:#x} is not a grant address (bit 63 clear)")
    addr &= ~GRANT_DMA_ADDR_OFF
    return addr >> XEN_PAGE_SHIFT, addr & XEN_PAGE_MASK


def grant_page_count(offset: int, length: int) -> int:
    """How many consecutive references a buffer of ``length`` bytes that
    starts ``offset`` bytes into its first page spans."""
    if length <= 0:
        raise ValueError(f"length must be positive, not {length}")
    return ((offset + length - 1) >> XEN_PAGE_SHIFT) + 1
