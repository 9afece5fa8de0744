"""Guest RAM reached page by page through the hypervisor, with a bounded cache.

On real Xen guest RAM is not a file: the bridge maps the guest frames it
touches with foreign mappings (``Hypervisor.map_guest_pages``). Mapping all
of a guest's RAM up front would cost dom0 one page of its own memory per
guest page (XSA-300) and break when the guest balloons, so this maps on
demand, in aligned chunks of a few pages, and keeps at most ``max_bytes`` of
them mapped; the least recently used chunk is unmapped first.

It offers what the shadow rings need of guest memory (``read``, ``write``,
``check_range``), with the same contract as :class:`bridge.memory.GuestRamMap`:
a range that is not entirely guest RAM raises
:class:`bridge.memory.OutsideGuestRam` and nothing is touched. The RAM
layout is checked before any mapping is asked for, so the bridge never asks
the hypervisor for a frame outside the guest's banks; a frame inside them
that still cannot be mapped (ballooned out) is reported the same way.

Accesses are short-lived: nothing here hands out a view that outlives the
call, so a chunk can be unmapped whenever it is evicted.

Grant addresses (bit 63 set, as a guest with ``grant_usage=1`` puts in its
descriptors: the reference is the address without bit 63, shifted right by
12; a buffer over several pages uses consecutive references) are mapped
through ``Hypervisor.map_grant_refs`` and never cached: the guest ends its
grants when a request completes, and Linux's xen-grant-dma then finds them
still in use and disables them for good if the backend kept them mapped.
Ring memory, granted for as long as the queue lives, is mapped once with
:meth:`MappedGuestMemory.pin` and released with :meth:`unpin` when the queue
stops. Whether a grant is valid only Xen knows: ``check_range`` checks the
arithmetic, and a reference the guest did not grant fails at the mapping.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Sequence

from bridge.memory import OutsideGuestRam
from xen.hypervisor import XEN_PAGE_SHIFT, GuestMapping, GuestMemoryFault, Hypervisor, HypervisorError

DEFAULT_CHUNK_PAGES = 16
"""Pages per mapping: 64 KiB, a few virtio buffers' worth, few enough that
the pages mapped for one request are mostly the ones it uses."""

DEFAULT_MAX_BYTES = 64 << 20

GRANT_ADDRESS = 1 << 63
"""xen-grant-dma's XEN_GRANT_DMA_ADDR_OFF."""
_GRANT_REF_LIMIT = 1 << 32  # grant_ref_t is 32 bits
_PAGE_MASK = (1 << XEN_PAGE_SHIFT) - 1


def is_grant_address(addr: int) -> bool:
    return addr >= GRANT_ADDRESS


def grant_refs(addr: int, length: int) -> tuple[int, int, int]:
    """(first reference, offset in its page, number of references) of a
    grant-addressed buffer; OutsideGuestRam when it cannot be one."""
    page = (addr - GRANT_ADDRESS) >> XEN_PAGE_SHIFT
    offset = addr & _PAGE_MASK
    count = ((offset + length - 1) >> XEN_PAGE_SHIFT) + 1 if length > 0 else 0
    if length < 0 or page + count > _GRANT_REF_LIMIT:
        raise OutsideGuestRam(f"grant address {addr:#x}+{length:#x} runs past the last grant reference")
    return page, offset, count


class _Chunk:
    __slots__ = ("mapping", "view", "start", "end")

    def __init__(self, mapping: GuestMapping, view, start: int, end: int) -> None:
        self.mapping = mapping
        self.view = view
        self.start = start  # offset in the chunk where mapped guest RAM starts
        self.end = end  # ... and ends (exclusive): a chunk is clipped to its bank


class MappedGuestMemory:
    """On-demand, cached mappings of one guest's RAM."""

    def __init__(
        self,
        hypervisor: Hypervisor,
        *,
        banks: Sequence[tuple[int, int]] | None = None,
        chunk_pages: int = DEFAULT_CHUNK_PAGES,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        if chunk_pages <= 0 or chunk_pages & (chunk_pages - 1):
            raise ValueError(f"chunk_pages must be a power of two, not {chunk_pages}")
        self.hv = hypervisor
        layout = sorted(banks if banks is not None else hypervisor.guest_ram_layout())
        if not layout:
            raise HypervisorError("the hypervisor reported no guest RAM banks")
        page_mask = (1 << XEN_PAGE_SHIFT) - 1
        for gpa, size in layout:
            if gpa & page_mask or size & page_mask or size <= 0:
                raise HypervisorError(f"guest RAM bank {gpa:#x}+{size:#x} is not whole pages")
        self.banks = layout
        self._starts = [gpa for gpa, _ in layout]
        self.chunk_shift = XEN_PAGE_SHIFT + chunk_pages.bit_length() - 1
        self.chunk_size = 1 << self.chunk_shift
        self.max_chunks = max(1, max_bytes >> self.chunk_shift)
        self._chunks: OrderedDict[int, _Chunk] = OrderedDict()
        self.maps = 0
        """Mappings made so far (each is one hypervisor call)."""
        self.evictions = 0
        self.grant_maps = 0
        self._pins: dict[int, tuple[GuestMapping, int, int]] = {}  # handle -> (mapping, first ref, count)
        self._next_pin = 0

    @property
    def mapped_bytes(self) -> int:
        return sum(c.end - c.start for c in self._chunks.values())

    # --- the contract shared with GuestRamMap

    def check_range(self, gpa: int, length: int) -> None:
        """Raise OutsideGuestRam unless [gpa, gpa + length) lies in one bank
        (or, for a grant address, could be granted pages)."""
        if gpa >= GRANT_ADDRESS:
            grant_refs(gpa, length)
            return
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0 and length >= 0:
            start, size = self.banks[i]
            if gpa + length <= start + size:
                return
        raise OutsideGuestRam(f"guest-physical {gpa:#x}+{length:#x} is outside guest RAM")

    def read(self, gpa: int, length: int) -> bytes | bytearray:
        """The bytes at [gpa, gpa + length): bytes within one chunk, a
        bytearray (not copied once more) when they span several."""
        if gpa >= GRANT_ADDRESS:
            return self._granted(gpa, length, None)
        shift = self.chunk_shift
        off = gpa & (self.chunk_size - 1)
        if off + length <= self.chunk_size and length > 0 and gpa >= 0:
            chunk = self._chunk(gpa >> shift, gpa, length)
            if chunk.start <= off and off + length <= chunk.end:
                return bytes(chunk.view[off : off + length])
        return self._span(gpa, length, None)

    def write(self, gpa: int, data) -> None:
        length = len(data)
        if gpa >= GRANT_ADDRESS:
            self._granted(gpa, length, data)
            return
        shift = self.chunk_shift
        off = gpa & (self.chunk_size - 1)
        if off + length <= self.chunk_size and length > 0 and gpa >= 0:
            chunk = self._chunk(gpa >> shift, gpa, length)
            if chunk.start <= off and off + length <= chunk.end:
                chunk.view[off : off + length] = data
                return
        self._span(gpa, length, data)

    def close(self) -> None:
        while self._chunks:
            _, chunk = self._chunks.popitem(last=False)
            self._unmap(chunk)
        for mapping, _, _ in self._pins.values():
            mapping.close()
        self._pins.clear()

    # --- grants

    def pin(self, addr: int, length: int) -> int | None:
        """Keep the grants behind [addr, addr + length) mapped until
        :meth:`unpin` (ring memory). Returns a handle, or None for an
        ordinary guest-physical range, which the chunk cache serves."""
        if addr < GRANT_ADDRESS:
            self.check_range(addr, length)
            return None
        first, offset, count = grant_refs(addr, length)
        mapping = self._map_grants(addr, length, first, count)
        self._next_pin += 1
        self._pins[self._next_pin] = (mapping, first, count)
        return self._next_pin

    def unpin(self, handle: int | None) -> None:
        pinned = self._pins.pop(handle, None) if handle is not None else None
        if pinned is not None:
            pinned[0].close()

    def _map_grants(self, addr: int, length: int, first: int, count: int) -> GuestMapping:
        try:
            mapping = self.hv.map_grant_refs(list(range(first, first + count)))
        except GuestMemoryFault as exc:
            raise OutsideGuestRam(f"grant address {addr:#x}+{length:#x} cannot be mapped: {exc}") from None
        self.grant_maps += 1
        return mapping

    def _granted(self, addr: int, length: int, data) -> bytearray | None:
        """A read (``data`` None) or write through the guest's grants: a
        pinned mapping if one holds them all, else mapped for this access
        only."""
        first, offset, count = grant_refs(addr, length)
        if count == 0:
            return bytearray() if data is None else None
        for mapping, pin_first, pin_count in self._pins.values():
            if pin_first <= first and first + count <= pin_first + pin_count:
                start = ((first - pin_first) << XEN_PAGE_SHIFT) + offset
                return self._copy(mapping.view, start, length, data)
        mapping = self._map_grants(addr, length, first, count)
        try:
            return self._copy(mapping.view, offset, length, data)
        finally:
            mapping.close()

    @staticmethod
    def _copy(view, start: int, length: int, data) -> bytearray | None:
        if data is None:
            return bytearray(view[start : start + length])
        view[start : start + length] = data
        return None

    # --- mapping

    def _span(self, gpa: int, length: int, data) -> bytearray | None:
        """A read (``data`` None) or write of a range over several chunks.
        The whole range is checked, and mapped when it fits in the cache,
        before any byte moves: a frame that fails to map leaves the guest's
        memory untouched."""
        self.check_range(gpa, length)
        size, shift = self.chunk_size, self.chunk_shift
        pieces = []  # (gpa, offset in chunk, length)
        at, end = gpa, gpa + length
        while at < end:
            off = at & (size - 1)
            n = min(end - at, size - off)
            pieces.append((at, off, n))
            at += n
        if len(pieces) <= self.max_chunks:
            for at, _, n in pieces:
                self._chunk(at >> shift, at, n)
        out = bytearray(length) if data is None else None
        src = memoryview(data).cast("B") if data is not None else None
        done = 0
        for at, off, n in pieces:
            chunk = self._chunk(at >> shift, at, n)
            if out is not None:
                out[done : done + n] = chunk.view[off : off + n]
            else:
                chunk.view[off : off + n] = src[done : done + n]
            done += n
        return out

    def _chunk(self, key: int, gpa: int, length: int) -> _Chunk:
        chunks = self._chunks
        chunk = chunks.get(key)
        if chunk is not None:
            chunks.move_to_end(key)
            return chunk
        self.check_range(gpa, length)
        chunk_gpa = key << self.chunk_shift
        i = bisect.bisect_right(self._starts, gpa) - 1
        bank_start, bank_size = self.banks[i]
        first = max(chunk_gpa, bank_start)
        last = min(chunk_gpa + self.chunk_size, bank_start + bank_size)
        try:
            mapping = self.hv.map_guest_pages(first >> XEN_PAGE_SHIFT, (last - first) >> XEN_PAGE_SHIFT)
        except GuestMemoryFault as exc:
            raise OutsideGuestRam(f"guest-physical {gpa:#x}+{length:#x} cannot be mapped: {exc}") from None
        self.maps += 1
        view = mapping.view
        if first != chunk_gpa:
            # Views are indexed by offset in the chunk: a chunk that starts
            # before its bank is mapped from the bank start, so shift it.
            view = _Shifted(view, first - chunk_gpa)
        chunk = _Chunk(mapping, view, first - chunk_gpa, last - chunk_gpa)
        chunks[key] = chunk
        while len(chunks) > self.max_chunks:
            _, old = chunks.popitem(last=False)
            self.evictions += 1
            self._unmap(old)
        return chunk

    @staticmethod
    def _unmap(chunk: _Chunk) -> None:
        chunk.view = None
        chunk.mapping.close()

    def __enter__(self) -> "MappedGuestMemory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Shifted:
    """A view indexed from ``shift`` bytes before its first byte (only the
    slices at or after ``shift`` are ever used: the chunk's bounds say so)."""

    __slots__ = ("_view", "_shift")

    def __init__(self, view: memoryview, shift: int) -> None:
        self._view = view
        self._shift = shift

    def __getitem__(self, s: slice):
        return self._view[s.start - self._shift : s.stop - self._shift]

    def __setitem__(self, s: slice, data) -> None:
        self._view[s.start - self._shift : s.stop - self._shift] = data
