"""In-test fakes for the simulated guest's driver stack (not a test module).

* :class:`FakeRam` - guest RAM in a bytearray, with the GuestRam API and an
  optional write hook (to check store order or inject races);
* :class:`FakeGuest` / :class:`FakeVcpu` - vCPUs whose MMIO loads and stores
  go straight to register-level fake devices, and edge-triggered interrupts
  (a handler runs once per rising edge; an edge during the handler is
  latched and runs it again);
* :class:`RingDevice` - the device side of a split ring in that RAM: walks
  avail chains (direct and indirect), writes used entries, decides on used
  buffer notifications (flags / EVENT_IDX) like a device must;
* :class:`FakeMmioDevice` - a virtio-mmio v2 register file that logs every
  access, with knobs for the failure cases (refused features, slow reset,
  no device, moving config generation);
* :class:`FakeBlkBackend` - a RAM disk that serves virtio-blk requests;
* :class:`FakeGrants` - a guest grant table with SimGuest's
  ``grant_dma_map``/``grant_dma_unmap``, so the drivers' real ``GrantDma``
  runs against it, and the translation a device needs from grant addresses
  back to guest RAM (RingDevice and FakeMmioDevice use it for every address
  they are given, and record those addresses in ``dma_addrs``).
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable

import attrs
import trio

from bridge import split_ring as sr
from bridge import virtio_mmio as regs
from xen.sim import virtio_mmio_driver as mmio
from xen.sim.guest_memory import grant_address, grant_page_count, grant_ref_of, is_grant_address

RAM_BASE = 0x4000_0000
RAM_SIZE = 16 << 20
MMIO_BASE = 0x0A00_0000
MMIO_WINDOW = 0x200
IRQ = 40


class FakeAccessFault(Exception):
    """An access to guest memory or MMIO outside anything mapped."""


class FakeRam:
    def __init__(self, base: int = RAM_BASE, size: int = RAM_SIZE) -> None:
        self.base = base
        self.size = size
        self.buf = bytearray(size)
        self.write_hook: Callable[[int, bytes], None] | None = None

    def _offset(self, gpa: int, length: int) -> int:
        off = gpa - self.base
        if off < 0 or length < 0 or off + length > self.size:
            raise FakeAccessFault(f"guest RAM access {gpa:#x}+{length:#x} out of range")
        return off

    def read(self, gpa: int, length: int) -> bytes:
        off = self._offset(gpa, length)
        return bytes(self.buf[off:off + length])

    def write(self, gpa: int, data: bytes) -> None:
        off = self._offset(gpa, len(data))
        self.buf[off:off + len(data)] = data
        if self.write_hook is not None:
            self.write_hook(gpa, bytes(data))

    def view(self, gpa: int, length: int) -> memoryview:
        off = self._offset(gpa, length)
        return memoryview(self.buf)[off:off + length]

    def read16(self, gpa: int) -> int:
        return sr.U16.unpack(self.read(gpa, 2))[0]

    def write16(self, gpa: int, value: int) -> None:
        self.write(gpa, sr.U16.pack(value & 0xFFFF))


class FakeGrantError(Exception):
    """The device used a grant address the guest's grant table does not back."""


class FakeGrants:
    """The guest's grant table, as the simulator keeps it (refs from 8, the
    lowest free run of consecutive refs per request), with SimGuest's DMA
    grant calls, and the device-side translation of grant addresses.

    ``translate(addr, length, write)`` is what a device does with an address
    it was given: a grant address must name active grants (to this backend,
    writable if the device writes) covering the whole buffer; any other
    address passes through as guest-physical."""

    FIRST_REF = 8

    def __init__(self, backend_domid: int = 0) -> None:
        self.backend_domid = backend_domid
        self.entries: dict[int, tuple[int, bool, int]] = {}  # ref -> (gfn, readonly, domid)
        self.map_calls = 0
        self.unmap_calls = 0

    @property
    def active(self) -> int:
        return len(self.entries)

    def grant_seq(self, gfn: int, count: int, readonly: bool = False, domid: int = 0) -> int:
        ref = self.FIRST_REF
        while any(r in self.entries for r in range(ref, ref + count)):
            ref += 1
        for i in range(count):
            self.entries[ref + i] = (gfn + i, readonly, domid)
        return ref

    def end(self, ref: int) -> None:
        if self.entries.pop(ref, None) is None:
            raise FakeGrantError(f"end_access of grant ref {ref}, which is not in use")

    async def grant_dma_map(self, gpa: int, length: int, *, readonly: bool = False, backend_domid: int = 0) -> int:
        await trio.lowlevel.checkpoint()
        first, last = gpa >> 12, (gpa + length - 1) >> 12
        ref = self.grant_seq(first, last - first + 1, readonly, backend_domid)
        self.map_calls += 1
        return grant_address(ref, gpa & 0xFFF)

    async def grant_dma_unmap(self, addr: int, length: int) -> None:
        await trio.lowlevel.checkpoint()
        ref, offset = grant_ref_of(addr)
        self.unmap_calls += 1
        for i in range(grant_page_count(offset, length)):
            self.end(ref + i)

    def translate(self, addr: int, length: int, write: bool = False) -> int:
        if not is_grant_address(addr):
            return addr
        ref, offset = grant_ref_of(addr)
        gfn0 = None
        for i in range(grant_page_count(offset, max(length, 1))):
            entry = self.entries.get(ref + i)
            if entry is None:
                raise FakeGrantError(f"grant address {addr:#x}+{length:#x}: ref {ref + i} is not granted")
            gfn, readonly, domid = entry
            if domid != self.backend_domid:
                raise FakeGrantError(f"grant ref {ref + i} is granted to domain {domid}, not {self.backend_domid}")
            if write and readonly:
                raise FakeGrantError(f"grant ref {ref + i} is read-only and the device writes it")
            if gfn0 is None:
                gfn0 = gfn
            elif gfn != gfn0 + i:
                raise FakeGrantError(f"grant refs from {ref} do not name consecutive frames")
        assert gfn0 is not None
        return (gfn0 << 12) + offset


def identity(addr: int, length: int, write: bool = False) -> int:
    return addr


Translate = Callable[[int, int, bool], int]


class FakeVcpu:
    def __init__(self, index: int, guest: FakeGuest) -> None:
        self.index = index
        self._guest = guest

    async def read(self, addr: int, size: int) -> int:
        await trio.lowlevel.checkpoint()
        device, offset = self._guest.route(addr)
        return device.mmio_read(offset, size, self.index)

    async def write(self, addr: int, size: int, value: int) -> None:
        await trio.lowlevel.checkpoint()
        device, offset = self._guest.route(addr)
        device.mmio_write(offset, size, value, self.index)


class FakeGuest:
    """Run it with ``guest.nursery = nursery`` before interrupts can fire."""

    def __init__(self, ram: FakeRam | None = None, nvcpus: int = 2) -> None:
        self.ram = ram or FakeRam()
        self.vcpus = [FakeVcpu(i, self) for i in range(nvcpus)]
        self.devices: list[FakeMmioDevice] = []
        self.nursery: trio.Nursery | None = None
        self.grants = FakeGrants()
        self._handlers: dict[int, Callable[[], Awaitable[None]]] = {}
        self._running: set[int] = set()
        self._latched: set[int] = set()
        self.handler_runs: dict[int, int] = {}

    def route(self, addr: int) -> tuple[FakeMmioDevice, int]:
        for device in self.devices:
            if device.base <= addr < device.base + MMIO_WINDOW:
                return device, addr - device.base
        raise FakeAccessFault(f"no device at {addr:#x}")

    def on_irq(self, irq: int, handler: Callable[[], Awaitable[None]]) -> None:
        self._handlers[irq] = handler

    async def grant_dma_map(self, gpa: int, length: int, *, readonly: bool = False, backend_domid: int = 0) -> int:
        return await self.grants.grant_dma_map(gpa, length, readonly=readonly, backend_domid=backend_domid)

    async def grant_dma_unmap(self, addr: int, length: int) -> None:
        await self.grants.grant_dma_unmap(addr, length)

    def edge(self, irq: int) -> None:
        """A rising edge on ``irq``."""
        if irq not in self._handlers:
            return
        if irq in self._running:
            self._latched.add(irq)
            return
        assert self.nursery is not None, "FakeGuest.nursery is not set"
        self._running.add(irq)
        self.nursery.start_soon(self._run_handler, irq)

    async def _run_handler(self, irq: int) -> None:
        try:
            while True:
                self.handler_runs[irq] = self.handler_runs.get(irq, 0) + 1
                await self._handlers[irq]()
                if irq not in self._latched:
                    return
                self._latched.discard(irq)
        finally:
            self._running.discard(irq)


@attrs.define
class DevChain:
    """A descriptor chain as the device sees it (indirect tables expanded)."""

    head: int
    bufs: list[tuple[int, int, bool]]  # (gpa, len, device-writable)
    indirect: bool = False
    dev_bufs: list[tuple[int, int, bool]] = attrs.Factory(list)
    """The same buffers with the addresses the descriptors held (DMA addresses)."""
    table_addr: int | None = None
    """The indirect table's address as the descriptor held it."""

    @property
    def readable(self) -> list[tuple[int, int]]:
        return [(gpa, n) for gpa, n, w in self.bufs if not w]

    @property
    def writable(self) -> list[tuple[int, int]]:
        return [(gpa, n) for gpa, n, w in self.bufs if w]

    def read_out(self, ram: FakeRam) -> bytes:
        return b"".join(ram.read(gpa, n) for gpa, n in self.readable)

    def write_in(self, ram: FakeRam, data: bytes) -> int:
        pos = 0
        for gpa, n in self.writable:
            if pos >= len(data):
                break
            piece = data[pos:pos + n]
            ram.write(gpa, piece)
            pos += len(piece)
        assert pos == len(data), "more data than device-writable space"
        return pos


class RingDevice:
    """The device side of one split virtqueue. ``desc``, ``avail`` and
    ``used`` are the addresses the device was given; ``translate`` turns
    those and every descriptor address into guest-physical ones (default:
    they are guest-physical already). Every address given to the device is
    appended to ``dma_addrs``."""

    def __init__(self, ram: FakeRam, num: int, desc: int, avail: int, used: int, event_idx: bool = False,
                 *, translate: Translate = identity, dma_addrs: list[int] | None = None) -> None:
        self.ram = ram
        self.num = num
        self.translate = translate
        self.dma_addrs = dma_addrs if dma_addrs is not None else []
        self.dma_addrs += [desc, avail, used]
        self.ring_addrs = (desc, avail, used)
        self.desc = translate(desc, sr.desc_table_size(num), False)
        self.avail = translate(avail, sr.avail_ring_size(num), False)
        self.used = translate(used, sr.used_ring_size(num), True)
        self.event_idx = event_idx
        self.last_avail = 0
        self.used_idx = 0
        self.auto_avail_event = True
        """With EVENT_IDX, publish avail_event = next avail index to be seen after
        each pop, as vhost and libvhost-user do (ask to be kicked for the next)."""

    def avail_idx(self) -> int:
        return self.ram.read16(self.avail + sr.AVAIL_IDX)

    def read_desc(self, index: int, table: int | None = None) -> tuple[int, int, int, int]:
        base = self.desc if table is None else table
        return sr.DESC.unpack(self.ram.read(base + sr.DESC_SIZE * index, sr.DESC_SIZE))

    def walk(self, head: int) -> DevChain:
        bufs: list[tuple[int, int, bool]] = []
        dev_bufs: list[tuple[int, int, bool]] = []
        index, table, table_len, indirect = head, None, self.num, False
        table_addr = None
        seen_writable = False
        for _ in range(self.num + 1 + 4096):
            addr, length, flags, nxt = self.read_desc(index, table)
            if flags & sr.VIRTQ_DESC_F_INDIRECT:
                assert table is None, "INDIRECT inside an indirect table"
                assert not flags & sr.VIRTQ_DESC_F_NEXT, "INDIRECT together with NEXT"
                assert length and length % sr.DESC_SIZE == 0, f"bad indirect table length {length}"
                self.dma_addrs.append(addr)
                table_addr = addr
                table = self.translate(addr, length, False)
                table_len, index, indirect = length // sr.DESC_SIZE, 0, True
                continue
            writable = bool(flags & sr.VIRTQ_DESC_F_WRITE)
            assert writable or not seen_writable, "device-readable descriptor after a device-writable one"
            seen_writable |= writable
            self.dma_addrs.append(addr)
            dev_bufs.append((addr, length, writable))
            bufs.append((self.translate(addr, length, writable), length, writable))
            if not flags & sr.VIRTQ_DESC_F_NEXT:
                return DevChain(head, bufs, indirect, dev_bufs, table_addr)
            assert nxt < table_len, f"next {nxt} out of range"
            index = nxt
        raise AssertionError("descriptor chain loops")

    def check_mapped(self, chain: DevChain) -> None:
        """The buffers of ``chain`` still translate to the same guest memory
        (with grants: the driver has not ended them before the device is
        done); raises FakeGrantError otherwise."""
        for (addr, length, writable), (gpa, _, _) in zip(chain.dev_bufs, chain.bufs):
            if self.translate(addr, length, writable) != gpa:
                raise FakeGrantError(f"buffer {addr:#x} of chain {chain.head} moved while the device owned it")
        ring_lengths = (sr.desc_table_size(self.num), sr.avail_ring_size(self.num), sr.used_ring_size(self.num))
        for addr, length, gpa in zip(self.ring_addrs, ring_lengths, (self.desc, self.avail, self.used)):
            if self.translate(addr, length, False) != gpa:
                raise FakeGrantError(f"ring at {addr:#x} moved while the queue is live")

    def pop_avail(self) -> list[DevChain]:
        chains = []
        end = self.avail_idx()
        while self.last_avail != end:
            head = self.ram.read16(self.avail + sr.avail_ring_entry(self.last_avail % self.num))
            chains.append(self.walk(head))
            self.last_avail = (self.last_avail + 1) & 0xFFFF
        if self.event_idx and self.auto_avail_event:
            self.set_avail_event(self.last_avail)
        return chains

    def push_used(self, head: int, length: int) -> tuple[int, int]:
        """Write one used element then advance used->idx; returns (old, new) idx."""
        old = self.used_idx
        self.ram.write(self.used + sr.used_ring_entry(old % self.num), sr.USED_ELEM.pack(head, length))
        self.used_idx = (old + 1) & 0xFFFF
        self.ram.write16(self.used + sr.USED_IDX, self.used_idx)
        return old, self.used_idx

    def needs_interrupt(self, old: int, new: int) -> bool:
        if self.event_idx:
            used_event = self.ram.read16(self.avail + sr.used_event_offset(self.num))
            return sr.vring_need_event(used_event, new, old)
        return not self.ram.read16(self.avail + sr.AVAIL_FLAGS) & sr.VIRTQ_AVAIL_F_NO_INTERRUPT

    def set_avail_event(self, value: int) -> None:
        self.ram.write16(self.used + sr.avail_event_offset(self.num), value)

    def set_used_flags(self, flags: int) -> None:
        self.ram.write16(self.used + sr.USED_FLAGS, flags)

    def used_event(self) -> int:
        return self.ram.read16(self.avail + sr.used_event_offset(self.num))


@attrs.define
class FakeQueueRegs:
    num: int = 0
    ready: int = 0
    desc: int = 0
    driver: int = 0
    device: int = 0
    ring: RingDevice | None = None


ChainHandler = Callable[["FakeMmioDevice", int, DevChain], "int | None"]


class FakeMmioDevice:
    """A virtio-mmio v2 register file. ``log`` records every access as
    (``"R"``/``"W"``, register name or ``Config+off/size``, value)."""

    def __init__(
        self,
        guest: FakeGuest,
        base: int = MMIO_BASE,
        irq: int = IRQ,
        *,
        device_id: int = 2,
        vendor_id: int = 0x554D4551,
        version: int = 2,
        magic: int = regs.MAGIC,
        features: int = 1 << mmio.VIRTIO_F_VERSION_1,
        config: bytes = b"",
        queue_num_max: tuple[int, ...] = (256,),
        refuse_features: bool = False,
        reset_delay_reads: int = 0,
        handler: ChainHandler | None = None,
        hold: bool = False,
    ) -> None:
        self.guest = guest
        self.ram = guest.ram
        self.base = base
        self.irq = irq
        self.device_id = device_id
        self.vendor_id = vendor_id
        self.version = version
        self.magic = magic
        self.device_features = features
        self.config = bytearray(config)
        self.generation = 0
        self.config_read_hook: Callable[[int, int], None] | None = None
        self.queue_num_max = queue_num_max
        self.refuse_features = refuse_features
        self.reset_delay_reads = reset_delay_reads
        self.handler = handler
        self.hold = hold
        self.log: list[tuple[str, str, int]] = []
        self.dma_addrs: list[int] = []
        """Every address the device was given: queue registers, descriptors, indirect tables."""
        self.notifies: list[tuple[int, int]] = []  # (queue, vCPU index)
        self.pending: dict[int, list[DevChain]] = {}
        self.edges = 0
        self.line = False
        self.isr = 0
        self.status = 0
        self.driver_features = 0
        self.queue_ready_preset: set[int] = set()
        self._reset_reads_left = 0
        self._dev_sel = 0
        self._drv_sel = 0
        self._queue_sel = 0
        self.queues: dict[int, FakeQueueRegs] = {}
        guest.devices.append(self)

    # -- helpers for tests --------------------------------------------------

    def accesses(self, kinds: str = "RW") -> list[tuple[str, str, int]]:
        return [entry for entry in self.log if entry[0] in kinds]

    def clear_log(self) -> None:
        self.log.clear()

    def ring(self, index: int) -> RingDevice:
        regs = self.queues[index]
        assert regs.ring is not None, f"queue {index} is not ready"
        return regs.ring

    def set_config(self, offset: int, data: bytes, *, bump_generation: bool = True, interrupt: bool = False) -> None:
        self.config[offset:offset + len(data)] = data
        if bump_generation:
            self.generation += 1
        if interrupt:
            self.raise_interrupt(regs.INT_CONFIG)

    def raise_interrupt(self, bits: int) -> None:
        self.isr |= bits
        if not self.line:
            self.line = True
            self.edges += 1
            self.guest.edge(self.irq)

    def complete(self, queue: int, head: int, length: int, *, interrupt: bool = True) -> bool:
        """Return one chain; raise the interrupt if the driver asked for it.
        Returns whether an interrupt was raised."""
        ring = self.ring(queue)
        old, new = ring.push_used(head, length)
        if interrupt and ring.needs_interrupt(old, new):
            self.raise_interrupt(regs.INT_VRING)
            return True
        return False

    def complete_many(self, queue: int, entries: list[tuple[int, int]]) -> bool:
        """Return several chains, then decide on one interrupt for the batch."""
        ring = self.ring(queue)
        start = ring.used_idx
        for head, length in entries:
            ring.push_used(head, length)
        if ring.needs_interrupt(start, ring.used_idx):
            self.raise_interrupt(regs.INT_VRING)
            return True
        return False

    def serve(self, queue: int, chains: list[DevChain] | None = None) -> None:
        """Run the handler on ``chains`` (default: the held ones) and complete them."""
        if chains is None:
            chains, self.pending[queue] = self.pending.get(queue, []), []
        assert self.handler is not None
        for chain in chains:
            self.ring(queue).check_mapped(chain)
            length = self.handler(self, queue, chain)
            if length is not None:
                self.complete(queue, chain.head, length)

    # -- register file ------------------------------------------------------

    def _name(self, offset: int, size: int) -> str:
        if offset >= regs.CONFIG_OFFSET:
            return f"Config+{offset - regs.CONFIG_OFFSET:#x}/{size}"
        return regs.REGISTER_NAMES.get(offset, f"reg{offset:#x}")

    def _do_reset(self) -> None:
        self.status = 0
        self.isr = 0
        self.line = False
        self.driver_features = 0
        self._dev_sel = self._drv_sel = self._queue_sel = 0
        self.queues = {}
        self.pending = {}

    def _q(self) -> FakeQueueRegs:
        return self.queues.setdefault(self._queue_sel, FakeQueueRegs())

    def mmio_read(self, offset: int, size: int, vcpu: int) -> int:
        value = self._read(offset, size)
        self.log.append(("R", self._name(offset, size), value))
        return value

    def _read(self, offset: int, size: int) -> int:
        if offset >= regs.CONFIG_OFFSET:
            off = offset - regs.CONFIG_OFFSET
            if self.config_read_hook is not None:
                self.config_read_hook(off, size)
            data = bytes(self.config[off:off + size]).ljust(size, b"\0")
            return int.from_bytes(data, "little")
        assert size == 4, f"{size}-byte access to register {offset:#x}"
        if offset == regs.MAGIC_VALUE:
            return self.magic
        if offset == regs.VERSION_REG:
            return self.version
        if offset == regs.DEVICE_ID:
            return self.device_id
        if offset == regs.VENDOR_ID:
            return self.vendor_id
        if offset == regs.DEVICE_FEATURES:
            return self.device_features >> (32 * self._dev_sel) & 0xFFFFFFFF if self._dev_sel < 2 else 0
        if offset == regs.QUEUE_NUM_MAX:
            sel = self._queue_sel
            return self.queue_num_max[sel] if sel < len(self.queue_num_max) else 0
        if offset == regs.QUEUE_READY:
            return 1 if self._queue_sel in self.queue_ready_preset else self._q().ready
        if offset == regs.INTERRUPT_STATUS:
            return self.isr
        if offset == regs.STATUS:
            if self._reset_reads_left:
                self._reset_reads_left -= 1
                value = self.status or 0x0F
                if not self._reset_reads_left:
                    self._do_reset()
                return value
            return self.status
        if offset == regs.CONFIG_GENERATION:
            return self.generation
        return 0

    def mmio_write(self, offset: int, size: int, value: int, vcpu: int) -> None:
        self.log.append(("W", self._name(offset, size), value))
        if offset >= regs.CONFIG_OFFSET:
            off = offset - regs.CONFIG_OFFSET
            self.config[off:off + size] = value.to_bytes(size, "little")
            return
        assert size == 4, f"{size}-byte access to register {offset:#x}"
        if offset == regs.DEVICE_FEATURES_SEL:
            self._dev_sel = value
        elif offset == regs.DRIVER_FEATURES_SEL:
            self._drv_sel = value
        elif offset == regs.DRIVER_FEATURES:
            if self._drv_sel < 2:
                shift = 32 * self._drv_sel
                self.driver_features = self.driver_features & ~(0xFFFFFFFF << shift) | value << shift
        elif offset == regs.QUEUE_SEL:
            self._queue_sel = value
        elif offset == regs.QUEUE_NUM:
            self._q().num = value
        elif offset in (regs.QUEUE_DESC_LOW, regs.QUEUE_DRIVER_LOW, regs.QUEUE_DEVICE_LOW):
            name = {regs.QUEUE_DESC_LOW: "desc", regs.QUEUE_DRIVER_LOW: "driver", regs.QUEUE_DEVICE_LOW: "device"}
            q = self._q()
            attr = name[offset]
            setattr(q, attr, getattr(q, attr) & ~0xFFFFFFFF | value)
        elif offset in (regs.QUEUE_DESC_HIGH, regs.QUEUE_DRIVER_HIGH, regs.QUEUE_DEVICE_HIGH):
            name = {regs.QUEUE_DESC_HIGH: "desc", regs.QUEUE_DRIVER_HIGH: "driver",
                    regs.QUEUE_DEVICE_HIGH: "device"}
            q = self._q()
            attr = name[offset]
            setattr(q, attr, getattr(q, attr) & 0xFFFFFFFF | value << 32)
        elif offset == regs.QUEUE_READY:
            q = self._q()
            q.ready = value & 1
            if q.ready:
                assert sr.is_valid_queue_size(q.num), f"bad QueueNum {q.num}"
                q.ring = RingDevice(self.ram, q.num, q.desc, q.driver, q.device,
                                    event_idx=bool(self.driver_features >> 29 & 1),
                                    translate=self.guest.grants.translate, dma_addrs=self.dma_addrs)
            else:
                q.ring = None
        elif offset == regs.QUEUE_NOTIFY:
            self.notifies.append((value, vcpu))
            q = self.queues.get(value)
            if q is None or q.ring is None:
                return
            chains = q.ring.pop_avail()
            if self.hold or self.handler is None:
                self.pending.setdefault(value, []).extend(chains)
            else:
                self.serve(value, chains)
        elif offset == regs.INTERRUPT_ACK:
            self.isr &= ~value
            if not self.isr:
                self.line = False
        elif offset == regs.STATUS:
            if value == 0:
                self._reset_reads_left = self.reset_delay_reads
                if not self._reset_reads_left:
                    self._do_reset()
                return
            newly = value & ~self.status
            if newly & regs.DeviceStatus.FEATURES_OK:
                if self.refuse_features or self.driver_features & ~self.device_features:
                    value &= ~regs.DeviceStatus.FEATURES_OK
            self.status = value


# -- virtio-blk ---------------------------------------------------------------

OUTHDR = struct.Struct("<IIQ")


def blk_config(capacity: int, *, size_max: int = 0, seg_max: int = 0, blk_size: int = 512,
               num_queues: int = 1) -> bytes:
    cfg = bytearray(64)
    struct.pack_into("<QII", cfg, 0, capacity, size_max, seg_max)
    struct.pack_into("<I", cfg, 20, blk_size)
    struct.pack_into("<H", cfg, 34, num_queues)
    return bytes(cfg)


@attrs.define
class BlkRequestRecord:
    queue: int
    type: int
    reserved: int
    sector: int
    header_len: int
    out_segments: list[int]
    in_segments: list[int]
    indirect: bool
    status: int


class FakeBlkBackend:
    """Serves virtio-blk requests from a RAM disk."""

    def __init__(self, capacity: int, *, serial: bytes = b"fake-blk-0001", read_only: bool = False) -> None:
        self.capacity = capacity
        # Huge capacities are only for config tests: back at most 32 MiB.
        self.disk = bytearray(min(capacity, 65536) * 512)
        self.serial = serial
        self.read_only = read_only
        self.requests: list[BlkRequestRecord] = []
        self.force_status: int | None = None
        self.flushes = 0

    def __call__(self, dev: FakeMmioDevice, queue: int, chain: DevChain) -> int:
        ram = dev.ram
        readable, writable = chain.readable, chain.writable
        out = chain.read_out(ram)
        req_type, reserved, sector = OUTHDR.unpack(out[:16])
        out_data = out[16:]
        in_total = sum(n for _, n in writable)
        assert in_total >= 1, "no status byte"
        in_len = in_total - 1
        data = b""
        status = 0
        if req_type == 0:  # IN
            if in_len % 512 or sector * 512 + in_len > len(self.disk):
                status = 1
            else:
                data = bytes(self.disk[sector * 512:sector * 512 + in_len])
        elif req_type == 1:  # OUT
            if self.read_only or len(out_data) % 512 or sector * 512 + len(out_data) > len(self.disk):
                status = 1
            else:
                self.disk[sector * 512:sector * 512 + len(out_data)] = out_data
        elif req_type == 4:
            self.flushes += 1
        elif req_type == 8:
            data = self.serial[:20].ljust(20, b"\0")[:in_len]
        else:
            status = 2
        if self.force_status is not None:
            status = self.force_status
            data = b""
        if data:
            chain.write_in(ram, data)
        # The status byte is the last byte of the device-writable space.
        last_gpa, last_len = writable[-1]
        ram.write(last_gpa + last_len - 1, bytes([status]))
        self.requests.append(BlkRequestRecord(
            queue, req_type, reserved, sector, readable[0][1],
            [n for _, n in readable[1:]], [n for _, n in writable], chain.indirect, status,
        ))
        return len(data) + 1 if status == 0 else 1


# -- DMA checks ----------------------------------------------------------------

DMA_MODES = ["identity", "grant"]
"""For ``pytest.mark.parametrize("dma_mode", DMA_MODES)``."""


def assert_dma_state(dma_mode: str, dma, grants: FakeGrants, dma_addrs: list[int], *, ring_blocks: int) -> None:
    """What a device may see, and what may stay mapped, in either mode.

    identity: no address the device saw is a grant address, nothing granted.
    grant: every address the device saw is a grant address (bit 63), the
    only live DMA mappings are ``ring_blocks`` coherent ones (the rings of
    the live queues), and the grant table holds exactly their references."""
    assert dma_addrs, "the device saw no address at all"
    if dma_mode == "identity":
        assert not any(is_grant_address(a) for a in dma_addrs)
        assert grants.active == 0 and grants.map_calls == 0
        return
    plain = [hex(a) for a in dma_addrs if not is_grant_address(a)]
    assert not plain, f"the device saw guest-physical addresses {plain}"
    streaming = {hex(a): entry for a, entry in dma.live.items() if not entry[2]}
    assert not streaming, f"buffers still mapped: {streaming}"
    assert len(dma.live) == ring_blocks
    assert grants.active == dma.live_refs(coherent=True)
