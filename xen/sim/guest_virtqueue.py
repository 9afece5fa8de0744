"""The driver side of a split virtqueue (virtio 1.2 section 2.7) in guest RAM.

This is what the simulated guest's drivers use to hand buffers to a device,
modelled on Linux's drivers/virtio/virtio_ring.c (split ring):

* descriptors come from a free list; a request is a chain of device-readable
  buffers followed by device-writable ones (VIRTQ_DESC_F_WRITE), linked with
  VIRTQ_DESC_F_NEXT, or a single VIRTQ_DESC_F_INDIRECT descriptor pointing at
  a table in guest RAM when VIRTIO_F_INDIRECT_DESC was negotiated;
* the head goes into ``avail->ring[avail_idx % size]`` and only then is
  ``avail->idx`` advanced (the device may look at the ring at any time);
* the device is notified unless it suppressed notifications, through
  VIRTQ_USED_F_NO_NOTIFY or, with VIRTIO_F_EVENT_IDX, ``avail_event``;
* the interrupt path calls :meth:`GuestVirtqueue.collect_used`, which walks
  ``used->ring`` up to ``used->idx``, completes each request with the length
  the device wrote, frees its descriptors, publishes ``used_event`` (with
  EVENT_IDX) and re-checks ``used->idx`` so a completion that raced with the
  update is not left waiting for an interrupt that will never come.

Where Linux would return -ENOSPC, :meth:`GuestVirtqueue.add` waits (FIFO)
until enough descriptors are free. Everything the device writes is checked:
a used id that is out of range or not the head of an in-flight chain, a
used index that runs ahead of what was made available, or a used length
larger than the chain's device-writable space marks the queue broken and
raises :class:`DeviceMisbehaved` in the interrupt path and in every waiter,
instead of corrupting the free list.

All ring accesses go through ``GuestRam.read``/``write``; the queue keeps no
memoryview of guest RAM, so the RAM can be unmapped at any time.

DMA addresses (xen/sim/guest_dma.py): the device sees DMA addresses, the
driver keeps using guest-physical ones for its own accesses. With the
default identity layer they are the same and nothing else happens. With a
layer that ``needs_calls`` (Xen grants):

* the rings are mapped once, coherent, by :meth:`GuestVirtqueue.map_rings`
  (``desc_dma``/``avail_dma``/``used_dma`` are what the transport programs)
  and unmapped when the queue is deleted (:meth:`GuestVirtqueue.delete`);
* :meth:`GuestVirtqueue.add` maps every buffer (``device_writes`` for the
  device-writable ones) and the indirect table, and descriptors carry the
  DMA addresses;
* when the device returns a chain, :meth:`GuestVirtqueue.collect_used`
  recycles its descriptors at once but leaves the chain on a list of
  returned chains; :meth:`GuestVirtqueue.unmap_returned` (which
  :meth:`GuestVirtqueue.handle_used` runs after collecting) unmaps its
  buffers, frees its indirect table and only then completes the request, as
  Linux's detach_buf_split unmaps before virtqueue_get_buf hands the buffer
  back. The driver reads device-written data from its own RAM afterwards;
* at reset, :meth:`GuestVirtqueue.delete` unmaps what is still in flight,
  then the rings, and fails the requests after their buffers are unmapped.
  Chains of a queue the device broke stay mapped (the device may still
  write them) until that reset.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable, Generator, Sequence
from typing import Any, Protocol

import trio

from bridge import split_ring as sr
from xen.sim.guest_dma import IDENTITY_DMA, GuestDma
from xen.sim.guest_memory import GuestAllocator, GuestMemoryExhausted

logger = logging.getLogger(__name__)

VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29

VRING_ALIGN = 4096
"""Linux's VIRTIO_MMIO_VRING_ALIGN: where the used ring starts in the single
block Linux allocates for a split ring."""

MAX_CHAIN_BYTES = 1 << 32
"""Drivers MUST NOT add a descriptor chain longer than 2^32 bytes (2.7.5.1)."""


class VirtioDriverError(Exception):
    """Base class of the simulated guest's virtio driver errors."""


class DeviceMisbehaved(VirtioDriverError):
    """The device broke the virtio protocol (bad used id, length or index);
    the virtqueue is unusable until the device is reset."""


class QueueDetached(VirtioDriverError):
    """The virtqueue was torn down (device reset) while the request was
    waiting or in flight."""


class GuestRamLike(Protocol):
    base: int
    size: int

    def read(self, gpa: int, length: int) -> bytes: ...

    def write(self, gpa: int, data: bytes) -> None: ...


NotifyFn = Callable[[Any], Awaitable[None]]
"""``await notify(vcpu)`` sends the available-buffer notification (for
virtio-mmio: QueueNotify = queue index) from ``vcpu`` (None: the default)."""

Buffer = tuple[int, int]
"""(guest-physical address, length in bytes)."""


class Completion:
    """What :meth:`GuestVirtqueue.add` returns: ``await completion`` (or
    ``await completion.wait()``) gives the used length the device reported,
    or raises :class:`DeviceMisbehaved` / :class:`QueueDetached`.

    ``add_done_callback(fn)`` runs ``fn(completion)`` once it finishes, also
    when nobody is waiting any more (e.g. the waiter was cancelled): that is
    where the owner of the buffers gives them back."""

    __slots__ = ("head", "token", "used_len", "error", "_event", "_callbacks")

    def __init__(self, head: int, token: object = None) -> None:
        self.head = head
        self.token = token
        self.used_len: int | None = None
        self.error: VirtioDriverError | None = None
        self._event = trio.Event()
        self._callbacks: list[Callable[[Completion], None]] = []

    @property
    def done(self) -> bool:
        return self._event.is_set()

    @property
    def returned_by_device(self) -> bool:
        """True when the device put the chain in the used ring, i.e. it is
        finished with the buffers (False after a failure)."""
        return self.used_len is not None

    def add_done_callback(self, fn: Callable[[Completion], None]) -> None:
        if self.done:
            fn(self)
        else:
            self._callbacks.append(fn)

    async def wait(self) -> int:
        await self._event.wait()
        if self.error is not None:
            raise self.error
        assert self.used_len is not None
        return self.used_len

    def __await__(self) -> Generator[Any, None, int]:
        return self.wait().__await__()

    def _finish(self, used_len: int | None = None, error: VirtioDriverError | None = None) -> None:
        if self.done:
            return
        self.used_len = used_len
        self.error = error
        self._event.set()
        callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            try:
                fn(self)
            except Exception:
                logger.exception("completion callback for descriptor %d failed", self.head)

    def __repr__(self) -> str:
        state = "pending" if not self.done else (f"used {self.used_len}" if self.error is None else repr(self.error))
        return f"<Completion head={self.head} {state}>"


DmaMapping = tuple[int, int]
"""(DMA address, length) of one DMA mapping of a chain."""


class _Chain:
    __slots__ = ("descs", "indirect_gpa", "writable", "completion", "mappings")

    def __init__(self, descs: list[int], indirect_gpa: int | None, writable: int, completion: Completion,
                 mappings: list[DmaMapping] | None = None) -> None:
        self.descs = descs
        self.indirect_gpa = indirect_gpa
        self.writable = writable
        self.completion = completion
        self.mappings = mappings
        """What to unmap once the device is done (None: identity DMA)."""


class _Retired:
    """Mappings to undo, then ``finish()`` (with a DMA layer that needs calls)."""

    __slots__ = ("mappings", "coherent", "finish")

    def __init__(self, mappings: list[DmaMapping], finish: Callable[[], None] | None, coherent: bool = False) -> None:
        self.mappings = mappings
        self.coherent = coherent
        self.finish = finish


class _DescWaiter:
    __slots__ = ("needed", "event", "descs", "error")

    def __init__(self, needed: int) -> None:
        self.needed = needed
        self.event = trio.Event()
        self.descs: list[int] | None = None
        self.error: VirtioDriverError | None = None


class GuestVirtqueue:
    """One split virtqueue, driver side. Build it with :meth:`create`; with
    a DMA layer that needs calls, ``await map_rings()`` before giving the
    device ``desc_dma``/``avail_dma``/``used_dma``."""

    def __init__(
        self,
        ram: GuestRamLike,
        index: int,
        size: int,
        desc_gpa: int,
        avail_gpa: int,
        used_gpa: int,
        notify: NotifyFn,
        *,
        allocator: GuestAllocator | None = None,
        event_idx: bool = False,
        indirect: bool = False,
        ring_allocations: Sequence[int] = (),
        dma: GuestDma | None = None,
        ring_blocks: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        if not sr.is_valid_queue_size(size):
            raise ValueError(f"split virtqueue size must be a power of two <= {sr.MAX_QUEUE_SIZE}, not {size}")
        if indirect and allocator is None:
            raise ValueError("indirect descriptors need an allocator for the tables")
        for name, gpa, align in (("desc", desc_gpa, sr.DESC_ALIGN), ("avail", avail_gpa, sr.AVAIL_ALIGN),
                                 ("used", used_gpa, sr.USED_ALIGN)):
            if gpa % align:
                raise ValueError(f"{name} ring at {gpa:#x} is not {align}-byte aligned")
        self._ram = ram
        self._allocator = allocator
        self.index = index
        self.size = size
        self.desc_gpa = desc_gpa
        self.avail_gpa = avail_gpa
        self.used_gpa = used_gpa
        self._notify = notify
        self.event_idx = event_idx
        self.indirect = indirect
        self._ring_allocations = list(ring_allocations)
        self.dma: GuestDma = dma if dma is not None else IDENTITY_DMA
        # None on the identity path: no call, no await per request.
        self._dma: GuestDma | None = self.dma if self.dma.needs_calls else None
        if ring_blocks is None:
            ring_blocks = [(desc_gpa, sr.desc_table_size(size)), (avail_gpa, sr.avail_ring_size(size)),
                           (used_gpa, sr.used_ring_size(size))]
        self._ring_blocks = [(gpa, length) for gpa, length in ring_blocks]
        """(gpa, length) of each piece of ring memory, mapped as one coherent mapping each."""
        self._ring_mappings: list[tuple[int, int, int]] = []  # (dma, length, gpa)
        self.desc_dma: int | None = desc_gpa if self._dma is None else None
        """The DMA addresses the device is given (None until :meth:`map_rings`)."""
        self.avail_dma: int | None = avail_gpa if self._dma is None else None
        self.used_dma: int | None = used_gpa if self._dma is None else None
        self._retired: deque[_Retired] = deque()
        self._draining: trio.Event | None = None
        self._abandoned: list[_Chain] = []
        self._adds_mapping = 0
        self._adds_mapping_done = trio.lowlevel.ParkingLot()
        self.unmap_errors = 0
        """Unmaps that failed (logged; the grant may stay active)."""
        self._mask = size - 1
        # Free descriptors as a stack: the next chain takes from the end, a
        # freed chain goes back head-last so it is reused head first (like
        # Linux's free_head list).
        self._free: list[int] = list(range(size - 1, -1, -1))
        self._in_flight: dict[int, _Chain] = {}
        self.peak_in_flight = 0
        """The most chains that were ever in flight at once."""
        self._waiters: deque[_DescWaiter] = deque()
        self._avail_idx = 0  # avail_idx_shadow
        self._num_added = 0
        self._last_used = 0
        self.broken = False
        self.detached = False
        self.notifications_sent = 0
        self.used_collected = 0

    @classmethod
    def create(
        cls,
        ram: GuestRamLike,
        allocator: GuestAllocator,
        index: int,
        size: int,
        notify: NotifyFn,
        *,
        event_idx: bool = False,
        indirect: bool = False,
        vring_align: int = VRING_ALIGN,
        separate_rings: bool = False,
        dma: GuestDma | None = None,
    ) -> GuestVirtqueue:
        """Allocate and zero the three parts in guest RAM and return the queue.

        By default the layout is Linux's: one block aligned to ``vring_align``
        holding the descriptor table, the avail ring right after it, and the
        used ring at the next ``vring_align`` boundary. ``separate_rings``
        allocates the three parts independently, with the spec's minimum
        alignments (16, 2, 4), which exercises devices that assume nothing.

        ``dma`` (default: identity) gives the device its addresses; a layer
        that needs calls maps each ring block at :meth:`map_rings`.
        """
        if not sr.is_valid_queue_size(size):
            raise ValueError(f"split virtqueue size must be a power of two <= {sr.MAX_QUEUE_SIZE}, not {size}")
        desc_len = sr.desc_table_size(size)
        avail_len = sr.avail_ring_size(size)
        used_len = sr.used_ring_size(size)
        allocations: list[int] = []
        try:
            if separate_rings:
                desc_gpa = allocator.allocate(desc_len, sr.DESC_ALIGN)
                allocations.append(desc_gpa)
                avail_gpa = allocator.allocate(avail_len, sr.AVAIL_ALIGN)
                allocations.append(avail_gpa)
                used_gpa = allocator.allocate(used_len, sr.USED_ALIGN)
                allocations.append(used_gpa)
                blocks = [(desc_gpa, desc_len), (avail_gpa, avail_len), (used_gpa, used_len)]
                for gpa, length in blocks:
                    ram.write(gpa, bytes(length))
            else:
                if vring_align < sr.DESC_ALIGN or vring_align & (vring_align - 1):
                    raise ValueError(f"vring_align must be a power of two >= {sr.DESC_ALIGN}")
                used_off = (desc_len + avail_len + vring_align - 1) & ~(vring_align - 1)
                total = used_off + used_len
                desc_gpa = allocator.allocate(total, vring_align)
                allocations.append(desc_gpa)
                ram.write(desc_gpa, bytes(total))
                avail_gpa = desc_gpa + desc_len
                used_gpa = desc_gpa + used_off
                # One block, one coherent mapping (vring_alloc_queue).
                blocks = [(desc_gpa, total)]
        except BaseException:
            for gpa in allocations:
                allocator.free(gpa)
            raise
        return cls(ram, index, size, desc_gpa, avail_gpa, used_gpa, notify, allocator=allocator,
                   event_idx=event_idx, indirect=indirect, ring_allocations=allocations, dma=dma,
                   ring_blocks=blocks)

    async def map_rings(self) -> None:
        """Map the ring memory for the device (dma_alloc_coherent's mapping):
        sets ``desc_dma``, ``avail_dma`` and ``used_dma``. Nothing to do for
        the identity layer or when already mapped. The mappings live until
        :meth:`delete`."""
        if self._dma is None or self.desc_dma is not None:
            return
        self._check_usable()
        with trio.CancelScope(shield=True):
            for gpa, length in self._ring_blocks[len(self._ring_mappings):]:
                addr = await self._dma.map_coherent(gpa, length)
                self._ring_mappings.append((addr, length, gpa))

        def dma_of(gpa: int) -> int:
            for addr, length, block in self._ring_mappings:
                if block <= gpa < block + length:
                    return addr + gpa - block
            raise ValueError(f"virtqueue {self.index}: ring part at {gpa:#x} is in no ring block")

        self.desc_dma = dma_of(self.desc_gpa)
        self.avail_dma = dma_of(self.avail_gpa)
        self.used_dma = dma_of(self.used_gpa)

    # -- state --------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Free descriptors in the table."""
        return len(self._free)

    @property
    def in_flight(self) -> int:
        """Chains made available and not yet returned in the used ring."""
        return len(self._in_flight)

    @property
    def avail_idx(self) -> int:
        return self._avail_idx

    @property
    def last_used_idx(self) -> int:
        return self._last_used

    def _check_usable(self) -> None:
        if self.detached:
            raise QueueDetached(f"virtqueue {self.index} was torn down (device reset)")
        if self.broken:
            raise DeviceMisbehaved(f"virtqueue {self.index} is broken (the device misbehaved); reset the device")

    # -- supplying buffers (2.7.13) -----------------------------------------

    async def submit(
        self,
        out_bufs: Sequence[Buffer],
        in_bufs: Sequence[Buffer],
        *,
        token: object = None,
        vcpu: Any = None,
    ) -> Completion:
        """Make one chain available and notify the device (from ``vcpu``)
        if it has not suppressed notifications. Waits while the descriptor
        table is too full. Returns the awaitable :class:`Completion`."""
        completion = await self.add(out_bufs, in_bufs, token=token)
        await self.kick(vcpu)
        return completion

    async def add(
        self,
        out_bufs: Sequence[Buffer],
        in_bufs: Sequence[Buffer],
        *,
        token: object = None,
    ) -> Completion:
        """Make one chain available without notifying (Linux's virtqueue_add;
        follow with :meth:`kick`, possibly after adding more)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check_usable()
        bufs = self._validate(out_bufs, in_bufs)
        total = len(bufs)
        table: int | None = None
        if self.indirect and total > 1:
            assert self._allocator is not None
            try:
                table = self._allocator.allocate(sr.DESC_SIZE * total, sr.DESC_ALIGN)
            except GuestMemoryExhausted:
                logger.debug("virtqueue %d: no memory for an indirect table, using a direct chain", self.index)
        published = False
        try:
            descs = await self._take(1 if table is not None else total)
            try:
                if self._dma is None:
                    completion = self._publish(bufs, descs, table, token)
                else:
                    completion = await self._map_and_publish(bufs, descs, table, token)
            except BaseException:
                self._release(descs)
                raise
            published = True
        finally:
            if not published and table is not None:
                assert self._allocator is not None
                self._allocator.free(table)
        if self._num_added == 0xFFFF:
            # As Linux: never let the unnotified count wrap the 16-bit index.
            await self.kick()
        return completion

    def _validate(self, out_bufs: Sequence[Buffer], in_bufs: Sequence[Buffer]) -> list[tuple[int, int, int]]:
        total = len(out_bufs) + len(in_bufs)
        if total == 0:
            raise ValueError("a descriptor chain needs at least one buffer")
        if total > self.size:
            raise ValueError(f"a chain of {total} buffers is longer than the queue size {self.size}")
        ram_lo, ram_hi = self._ram.base, self._ram.base + self._ram.size
        chain_bytes = 0
        bufs: list[tuple[int, int, int]] = []
        for flags, group in ((0, out_bufs), (sr.VIRTQ_DESC_F_WRITE, in_bufs)):
            for gpa, length in group:
                if not 0 < length <= 0xFFFFFFFF:
                    raise ValueError(f"buffer length {length} out of range (1 .. 2^32-1)")
                if gpa < ram_lo or gpa + length > ram_hi:
                    raise ValueError(f"buffer {gpa:#x}+{length:#x} is outside guest RAM")
                chain_bytes += length
                bufs.append((gpa, length, flags))
        if chain_bytes > MAX_CHAIN_BYTES:
            raise ValueError(f"descriptor chain of {chain_bytes} bytes exceeds 2^32")
        return bufs

    async def _map_and_publish(self, bufs: list[tuple[int, int, int]], descs: list[int], table: int | None,
                               token: object) -> Completion:
        """Map every buffer (and the indirect table) for the device, then
        publish the chain with the DMA addresses (vring_map_one_sg and
        vring_map_single in virtqueue_add_split)."""
        dma = self._dma
        assert dma is not None
        mappings: list[DmaMapping] = []
        self._adds_mapping += 1
        try:
            try:
                # Shielded: a mapping made but not recorded here would leak.
                with trio.CancelScope(shield=True):
                    dev_bufs: list[tuple[int, int, int]] = []
                    for gpa, length, flags in bufs:
                        addr = await dma.map(gpa, length, device_writes=bool(flags & sr.VIRTQ_DESC_F_WRITE))
                        mappings.append((addr, length))
                        dev_bufs.append((addr, length, flags))
                    table_dma = None
                    if table is not None:
                        table_len = sr.DESC_SIZE * len(bufs)
                        table_dma = await dma.map(table, table_len, device_writes=False)
                        mappings.append((table_dma, table_len))
                # The queue may have been deleted (reset) while we mapped.
                self._check_usable()
                return self._publish(dev_bufs, descs, table, token, table_dma, mappings)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self._unmap_all(mappings)
                raise
        finally:
            self._adds_mapping -= 1
            if not self._adds_mapping:
                self._adds_mapping_done.unpark_all()

    def _publish(self, bufs: list[tuple[int, int, int]], descs: list[int], table: int | None,
                 token: object, table_dma: int | None = None, mappings: list[DmaMapping] | None = None) -> Completion:
        """Write the chain and expose it. ``bufs`` hold the addresses the
        device is given (DMA addresses); ``table`` is the guest-physical
        address of the indirect table, ``table_dma`` the device's (default:
        the same)."""
        ram = self._ram
        head = descs[0]
        total = len(bufs)
        if table is not None:
            blob = bytearray(sr.DESC_SIZE * total)
            for i, (addr, length, flags) in enumerate(bufs):
                if i + 1 < total:
                    sr.DESC.pack_into(blob, sr.DESC_SIZE * i, addr, length, flags | sr.VIRTQ_DESC_F_NEXT, i + 1)
                else:
                    sr.DESC.pack_into(blob, sr.DESC_SIZE * i, addr, length, flags, 0)
            ram.write(table, bytes(blob))
            ram.write(self.desc_gpa + sr.DESC_SIZE * head,
                      sr.DESC.pack(table if table_dma is None else table_dma, sr.DESC_SIZE * total,
                                   sr.VIRTQ_DESC_F_INDIRECT, 0))
        else:
            for i, (addr, length, flags) in enumerate(bufs):
                if i + 1 < total:
                    entry = sr.DESC.pack(addr, length, flags | sr.VIRTQ_DESC_F_NEXT, descs[i + 1])
                else:
                    entry = sr.DESC.pack(addr, length, flags, 0)
                ram.write(self.desc_gpa + sr.DESC_SIZE * descs[i], entry)
        writable = sum(length for _, length, flags in bufs if flags & sr.VIRTQ_DESC_F_WRITE)
        completion = Completion(head, token)
        self._in_flight[head] = _Chain(descs, table, writable, completion, mappings)
        self.peak_in_flight = max(self.peak_in_flight, len(self._in_flight))
        # The ring entry first, then the index that exposes it.
        slot = self._avail_idx & self._mask
        ram.write(self.avail_gpa + sr.avail_ring_entry(slot), sr.U16.pack(head))
        self._avail_idx = (self._avail_idx + 1) & 0xFFFF
        ram.write(self.avail_gpa + sr.AVAIL_IDX, sr.U16.pack(self._avail_idx))
        self._num_added += 1
        return completion

    def kick_prepare(self) -> bool:
        """Whether the chains added since the last kick need a notification
        (Linux's virtqueue_kick_prepare_split)."""
        new = self._avail_idx
        old = (new - self._num_added) & 0xFFFF
        self._num_added = 0
        if self.event_idx:
            avail_event = self._read16(self.used_gpa + sr.avail_event_offset(self.size))
            return sr.vring_need_event(avail_event, new, old)
        flags = self._read16(self.used_gpa + sr.USED_FLAGS)
        return not flags & sr.VIRTQ_USED_F_NO_NOTIFY

    async def kick(self, vcpu: Any = None) -> bool:
        """Notify the device if needed; returns whether a notification was sent."""
        if self.detached:
            await trio.lowlevel.checkpoint()
            return False
        if not self.kick_prepare():
            await trio.lowlevel.checkpoint()
            return False
        self.notifications_sent += 1
        # The chains are already exposed: a notification lost to cancellation
        # would leave them unserved, so the MMIO store is not cancellable.
        with trio.CancelScope(shield=True):
            await self._notify(vcpu)
        return True

    # -- descriptor free list -----------------------------------------------

    async def _take(self, needed: int) -> list[int]:
        if not self._waiters and len(self._free) >= needed:
            return [self._free.pop() for _ in range(needed)]
        waiter = _DescWaiter(needed)
        self._waiters.append(waiter)
        granted = False
        try:
            await waiter.event.wait()
            granted = True
        finally:
            if not granted:
                if waiter.descs is not None:
                    # Granted while the cancellation was being delivered.
                    self._release(waiter.descs)
                else:
                    if waiter in self._waiters:
                        self._waiters.remove(waiter)
                    self._grant()
        if waiter.error is not None:
            raise waiter.error
        assert waiter.descs is not None
        return waiter.descs

    def _release(self, descs: list[int]) -> None:
        self._free.extend(reversed(descs))
        self._grant()

    def _grant(self) -> None:
        if self.broken or self.detached:
            return
        while self._waiters and len(self._free) >= self._waiters[0].needed:
            waiter = self._waiters.popleft()
            waiter.descs = [self._free.pop() for _ in range(waiter.needed)]
            waiter.event.set()

    # -- used buffers (2.7.14) ----------------------------------------------

    def collect_used(self) -> int:
        """Complete every chain the device has put in the used ring; called
        from the interrupt handler. Returns how many were completed. Raises
        :class:`DeviceMisbehaved` (after failing every waiter) if the used
        ring is inconsistent.

        With a DMA layer that needs calls, the chains are taken off the used
        ring and their descriptors recycled, but they are completed only by
        :meth:`unmap_returned`, once unmapped: use :meth:`handle_used`."""
        if self.detached or self.broken:
            return 0
        ram = self._ram
        used_idx_gpa = self.used_gpa + sr.USED_IDX
        used_event_gpa = self.avail_gpa + sr.used_event_offset(self.size)
        count = 0
        while True:
            used_idx = self._read16(used_idx_gpa)
            pending = (used_idx - self._last_used) & 0xFFFF
            if pending > len(self._in_flight):
                raise self._break(f"used idx {used_idx} is {pending} entries past last seen {self._last_used}, "
                                  f"but only {len(self._in_flight)} chains are in flight")
            while self._last_used != used_idx:
                slot = self._last_used & self._mask
                head, used_len = sr.USED_ELEM.unpack(ram.read(self.used_gpa + sr.used_ring_entry(slot), 8))
                if head >= self.size:
                    raise self._break(f"used ring slot {slot}: id {head} out of range (queue size {self.size})")
                chain = self._in_flight.get(head)
                if chain is None:
                    raise self._break(f"used ring slot {slot}: id {head} is not the head of an in-flight chain")
                if used_len > chain.writable:
                    raise self._break(f"used ring slot {slot}: id {head} used len {used_len} exceeds the "
                                      f"{chain.writable} device-writable bytes of the chain")
                del self._in_flight[head]
                self._last_used = (self._last_used + 1) & 0xFFFF
                if self.event_idx:
                    ram.write(used_event_gpa, sr.U16.pack(self._last_used))
                count += 1
                self.used_collected += 1
                if chain.mappings is None:
                    self._free_chain(chain)
                    chain.completion._finish(used_len=used_len)
                else:
                    self._release(chain.descs)
                    self._retired.append(_Retired(chain.mappings, self._finisher(chain, used_len=used_len)))
            # Re-check after publishing used_event: an entry added meanwhile
            # may not raise another interrupt.
            if self._read16(used_idx_gpa) == self._last_used:
                return count

    def _free_chain(self, chain: _Chain) -> None:
        if chain.indirect_gpa is not None:
            assert self._allocator is not None
            self._allocator.free(chain.indirect_gpa)
            chain.indirect_gpa = None
        self._release(chain.descs)

    async def handle_used(self) -> int:
        """:meth:`collect_used`, then :meth:`unmap_returned` (also when the
        device misbehaved): what an interrupt handler calls. Returns how
        many chains came back."""
        if self._dma is None:
            return self.collect_used()
        try:
            return self.collect_used()
        finally:
            await self.unmap_returned()

    async def unmap_returned(self) -> None:
        """Unmap the chains the device returned (and, after a reset, those
        it no longer owns, then the rings), completing each request once
        its buffers are unmapped. Returns when nothing is left to unmap,
        also if another task was already at it. The unmapping itself is not
        cancellable (a half-unmapped chain would leak grants)."""
        while self._draining is not None:
            await self._draining.wait()
        if not self._retired:
            return
        done = self._draining = trio.Event()
        try:
            with trio.CancelScope(shield=True):
                while self._retired:
                    item = self._retired.popleft()
                    await self._unmap_all(item.mappings, coherent=item.coherent)
                    if item.finish is not None:
                        item.finish()
        finally:
            self._draining = None
            done.set()

    async def _unmap_all(self, mappings: Sequence[DmaMapping], *, coherent: bool = False) -> None:
        dma = self._dma
        assert dma is not None or not mappings
        for addr, length in mappings:
            try:
                if coherent:
                    await dma.unmap_coherent(addr, length)
                else:
                    await dma.unmap(addr, length)
            except Exception:
                # xen-grant-dma marks itself broken when a grant stays in
                # use; here the request still completes and the leak shows
                # in the grant table.
                self.unmap_errors += 1
                logger.exception("virtqueue %d: unmapping %#x+%#x failed", self.index, addr, length)

    def _finisher(self, chain: _Chain, *, used_len: int | None = None,
                  error: VirtioDriverError | None = None) -> Callable[[], None]:
        def finish() -> None:
            if chain.indirect_gpa is not None and self._allocator is not None:
                self._allocator.free(chain.indirect_gpa)
                chain.indirect_gpa = None
            chain.completion._finish(used_len=used_len, error=error)

        return finish

    def _break(self, reason: str) -> DeviceMisbehaved:
        message = f"virtqueue {self.index}: device misbehaved: {reason}"
        logger.error("%s", message)
        self.broken = True
        # The device may still own the in-flight buffers: complete them with
        # the error but do not recycle their descriptors or tables, nor
        # unmap them before the device is reset.
        chains, self._in_flight = list(self._in_flight.values()), {}
        for chain in chains:
            if chain.mappings:
                self._abandoned.append(chain)
            chain.completion._finish(error=DeviceMisbehaved(message))
        self._fail_waiters(lambda: DeviceMisbehaved(message))
        return DeviceMisbehaved(message)

    def _fail_waiters(self, make_error: Callable[[], VirtioDriverError]) -> None:
        waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:
            waiter.error = make_error()
            waiter.event.set()

    def detach(self, reason: str = "device reset") -> None:
        """Tear the queue down after the device was reset (it no longer
        touches the rings): fail in-flight requests and waiters with
        :class:`QueueDetached` and give the ring memory back.

        With a DMA layer that needs calls, the in-flight chains and the
        rings are unmapped (and the requests failed, and the memory freed)
        by the next :meth:`unmap_returned`: use :meth:`delete`."""
        if self.detached:
            return
        self.detached = True
        message = f"virtqueue {self.index}: {reason}"
        chains, self._in_flight = list(self._in_flight.values()), {}
        for chain in chains:
            if chain.mappings is not None:
                self._retired.append(_Retired(chain.mappings, self._finisher(chain, error=QueueDetached(message))))
                continue
            if chain.indirect_gpa is not None and self._allocator is not None:
                self._allocator.free(chain.indirect_gpa)
                chain.indirect_gpa = None
            chain.completion._finish(error=QueueDetached(message))
        self._fail_waiters(lambda: QueueDetached(message))
        # Chains of a broken queue: the device is reset now, end their
        # mappings (their memory stays with whoever owns it).
        abandoned, self._abandoned = self._abandoned, []
        for chain in abandoned:
            self._retired.append(_Retired(chain.mappings or [], None))
        if self._ring_mappings:
            ring_mappings = [(addr, length) for addr, length, _gpa in self._ring_mappings]
            self._ring_mappings = []
            self._retired.append(_Retired(ring_mappings, self._free_rings, coherent=True))
        else:
            self._free_rings()

    def _free_rings(self) -> None:
        if self._allocator is not None:
            for gpa in self._ring_allocations:
                self._allocator.free(gpa)
        self._ring_allocations = []

    async def delete(self, reason: str = "device reset") -> None:
        """vring_del_virtqueue after the device was reset: :meth:`detach`,
        then unmap everything the device was given (buffers in flight, then
        the rings) before failing the requests and freeing the memory.
        When it returns, the queue holds no DMA mapping."""
        self.detach(reason)
        if self._dma is None:
            return
        # Not cancellable either: the rings' grants would stay behind.
        with trio.CancelScope(shield=True):
            # An add() that was mapping when the reset came unmaps its own.
            while self._adds_mapping:
                await self._adds_mapping_done.park()
            await self.unmap_returned()

    # -- helpers ------------------------------------------------------------

    def _read16(self, gpa: int) -> int:
        return sr.U16.unpack(self._ram.read(gpa, 2))[0]

    def __repr__(self) -> str:
        unmapping = f" to_unmap={len(self._retired)}" if self._retired else ""
        return (f"<GuestVirtqueue {self.index} size={self.size} avail={self._avail_idx} "
                f"used={self._last_used} in_flight={len(self._in_flight)} free={len(self._free)}{unmapping}>")
