"""Shadow virtqueues: the guest's split ring mirrored into a memfd arena.

The fakes here are deliberately small and independent of the code under
test: :class:`GuestRam` is a bytearray at a guest-physical base (with
optional holes), :class:`Driver` writes the guest's side of a split ring
straight into it, and :class:`Daemon` serves the shadow ring straight from
the arena's memory, the way libvhost-user would.
"""

from __future__ import annotations

import random
import re

import attrs
import pytest
import trio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from bridge import split_ring as sr
from bridge.arena import Arena
from bridge.memory import OutsideGuestRam
from bridge.shadow_ring import DaemonRingError, GuestRing, RingError, ShadowVirtqueue
from xen.sim.guest_memory import GuestAllocator
from xen.sim.guest_virtqueue import GuestVirtqueue

RAM_BASE = 0x4000_0000
RAM_SIZE = 1 << 20
ARENA_GPA = 0x80_0000_0000
HOLE = RAM_BASE + 0x80000  # a 4 KiB hole in guest RAM, where the tests want one
R = 0
W = sr.VIRTQ_DESC_F_WRITE
NEXT = sr.VIRTQ_DESC_F_NEXT
INDIRECT = sr.VIRTQ_DESC_F_INDIRECT


def align_up(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)


# -- fakes --------------------------------------------------------------------


class GuestRam:
    """Guest RAM: a bytearray at ``base``. Ranges outside it or touching a
    hole raise OutsideGuestRam. With ``log`` set to a list, every read and
    write is recorded as (kind, gpa, bytes)."""

    def __init__(self, base: int = RAM_BASE, size: int = RAM_SIZE, holes=()) -> None:
        self.base = base
        self.size = size
        self.buf = bytearray(size)
        self.holes: list[tuple[int, int]] = list(holes)
        self.log: list[tuple[str, int, bytes]] | None = None
        self.write_hook = None

    def _offset(self, gpa: int, length: int) -> int:
        if length < 0 or gpa < self.base or gpa + length > self.base + self.size:
            raise OutsideGuestRam(f"{gpa:#x}+{length:#x} outside guest RAM")
        for hole, hole_len in self.holes:
            if length and gpa < hole + hole_len and hole < gpa + length:
                raise OutsideGuestRam(f"{gpa:#x}+{length:#x} touches the hole at {hole:#x}")
        return gpa - self.base

    def check_range(self, gpa: int, length: int) -> None:
        self._offset(gpa, length)

    def read(self, gpa: int, length: int) -> bytes:
        off = self._offset(gpa, length)
        data = bytes(self.buf[off:off + length])
        if self.log is not None:
            self.log.append(("R", gpa, data))
        return data

    def write(self, gpa: int, data) -> None:
        data = bytes(data)
        off = self._offset(gpa, len(data))
        self.buf[off:off + len(data)] = data
        if self.log is not None:
            self.log.append(("W", gpa, data))
        if self.write_hook is not None:
            self.write_hook(gpa, data)

    def peek(self, gpa: int, length: int) -> bytes:
        """Read without logging (the test looking)."""
        off = gpa - self.base
        return bytes(self.buf[off:off + length])

    def poke(self, gpa: int, data: bytes) -> None:
        off = gpa - self.base
        self.buf[off:off + len(data)] = data

    def peek16(self, gpa: int) -> int:
        return sr.U16.unpack(self.peek(gpa, 2))[0]

    def poke16(self, gpa: int, value: int) -> None:
        self.poke(gpa, sr.U16.pack(value & 0xFFFF))


class SparseRam:
    """Guest RAM of several GiB that stores only the pages written."""

    def __init__(self, base: int, size: int) -> None:
        self.base = base
        self.size = size
        self.pages: dict[int, bytearray] = {}

    def check_range(self, gpa: int, length: int) -> None:
        if gpa < self.base or gpa + length > self.base + self.size:
            raise OutsideGuestRam(f"{gpa:#x}+{length:#x}")

    def read(self, gpa: int, length: int) -> bytes:
        self.check_range(gpa, length)
        return bytes(self.pages.get(gpa >> 12, bytearray(4096))[gpa & 4095:(gpa & 4095) + length])

    def write(self, gpa: int, data) -> None:
        self.check_range(gpa, len(data))
        assert (gpa & 4095) + len(data) <= 4096, "SparseRam writes stay inside one page"
        page = self.pages.setdefault(gpa >> 12, bytearray(4096))
        page[gpa & 4095:(gpa & 4095) + len(data)] = bytes(data)

    poke = write

    def poke16(self, gpa: int, value: int) -> None:
        self.write(gpa, sr.U16.pack(value & 0xFFFF))


class Driver:
    """The guest's side of a split ring, written straight into guest RAM."""

    def __init__(self, ram, num: int, *, base: int = RAM_BASE) -> None:
        self.ram = ram
        self.num = num
        self.desc = base + 0x1000
        self.avail = self.desc + sr.desc_table_size(num)
        self.used = align_up(self.avail + sr.avail_ring_size(num), 4096)
        self.data_next = align_up(self.used + sr.used_ring_size(num), 4096)
        self.free = list(range(num))
        self.chains: dict[int, list[int]] = {}
        self.avail_idx = 0
        self.last_used = 0

    @property
    def ring(self) -> GuestRing:
        return GuestRing(self.num, self.desc, self.avail, self.used)

    def buffer(self, content, fill: int = 0xEE) -> tuple[int, int]:
        data = bytes([fill]) * content if isinstance(content, int) else bytes(content)
        gpa = self.data_next
        self.data_next = align_up(gpa + max(len(data), 1), 16)
        self.ram.poke(gpa, data)
        return gpa, len(data)

    def write_desc(self, index: int, addr: int, length: int, flags: int, nxt: int = 0, table: int | None = None):
        self.ram.poke((self.desc if table is None else table) + sr.DESC_SIZE * index,
                      sr.DESC.pack(addr, length, flags, nxt))

    def add(self, out=(), into=(), *, indirect: bool = False, publish: bool = True) -> int:
        bufs = [(g, n, R) for g, n in out] + [(g, n, W) for g, n in into]
        if indirect:
            table, _ = self.buffer(sr.DESC_SIZE * len(bufs), fill=0)
            for i, (g, n, f) in enumerate(bufs):
                last = i + 1 == len(bufs)
                self.write_desc(i, g, n, f | (0 if last else NEXT), 0 if last else i + 1, table=table)
            head = self.free.pop(0)
            self.write_desc(head, table, sr.DESC_SIZE * len(bufs), INDIRECT)
            self.chains[head] = [head]
        else:
            descs = [self.free.pop(0) for _ in bufs]
            for i, (g, n, f) in enumerate(bufs):
                last = i + 1 == len(bufs)
                self.write_desc(descs[i], g, n, f | (0 if last else NEXT), 0 if last else descs[i + 1])
            head = descs[0]
            self.chains[head] = descs
        if publish:
            self.publish(head)
        return head

    def publish(self, *heads: int) -> None:
        for head in heads:
            self.ram.poke16(self.avail + sr.avail_ring_entry(self.avail_idx % self.num), head)
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.ram.poke16(self.avail + sr.AVAIL_IDX, self.avail_idx)

    def used_elems(self) -> list[tuple[int, int]]:
        """New used elements; their descriptors go back to the free list."""
        out = []
        end = self.ram.peek16(self.used + sr.USED_IDX)
        while self.last_used != end:
            elem = sr.USED_ELEM.unpack(self.ram.peek(self.used + sr.used_ring_entry(self.last_used % self.num), 8))
            out.append(elem)
            self.free.extend(self.chains.pop(elem[0], []))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    def set_no_interrupt(self, on: bool) -> None:
        self.ram.poke16(self.avail + sr.AVAIL_FLAGS, sr.VIRTQ_AVAIL_F_NO_INTERRUPT if on else 0)

    def set_used_event(self, value: int) -> None:
        self.ram.poke16(self.avail + sr.used_event_offset(self.num), value)

    def avail_event(self) -> int:
        return self.ram.peek16(self.used + sr.avail_event_offset(self.num))

    def used_idx(self) -> int:
        return self.ram.peek16(self.used + sr.USED_IDX)


@attrs.define
class ShadowChain:
    head: int
    bufs: list[tuple[int, int, bool]]  # (arena offset, length, device-writable)

    @property
    def writable(self) -> int:
        return sum(n for _, n, w in self.bufs if w)


class Daemon:
    """A vhost-user back-end serving the shadow ring straight from the arena."""

    def __init__(self, svq: ShadowVirtqueue, arena: Arena, *, event_idx: bool = False) -> None:
        self.svq = svq
        self.arena = arena
        self.buf = arena.buf
        self.num = svq.num
        self.event_idx = event_idx
        self.desc = svq.shadow_desc_offset
        self.avail = svq.shadow_avail_offset
        self.used = svq.shadow_used_offset
        self.rings = [(self.desc, sr.desc_table_size(self.num)), (self.avail, sr.avail_ring_size(self.num)),
                      (self.used, sr.used_ring_size(self.num))]
        self.last_avail = 0
        self.used_idx = 0
        self.auto_avail_event = True

    def r16(self, off: int) -> int:
        return sr.U16.unpack_from(self.buf, off)[0]

    def w16(self, off: int, value: int) -> None:
        sr.U16.pack_into(self.buf, off, value & 0xFFFF)

    def avail_idx(self) -> int:
        return self.r16(self.avail + sr.AVAIL_IDX)

    def pop(self) -> list[ShadowChain]:
        chains = []
        end = self.avail_idx()
        assert (end - self.last_avail) & 0xFFFF <= self.num, "shadow avail idx ran ahead"
        while self.last_avail != end:
            head = self.r16(self.avail + sr.avail_ring_entry(self.last_avail % self.num))
            chains.append(self.walk(head))
            self.last_avail = (self.last_avail + 1) & 0xFFFF
        if self.event_idx and self.auto_avail_event:
            self.set_avail_event(self.last_avail)
        return chains

    def walk(self, head: int) -> ShadowChain:
        bufs = []
        index = head
        for _ in range(self.num):
            assert index < self.num
            addr, length, flags, nxt = sr.DESC.unpack_from(self.buf, self.desc + sr.DESC_SIZE * index)
            assert flags & ~(NEXT | W) == 0, f"unexpected shadow flags {flags:#x}"
            off = addr - ARENA_GPA
            assert 0 <= off and off + length <= self.arena.size, "shadow descriptor outside the arena"
            for ring, size in self.rings:
                assert not length or off + length <= ring or ring + size <= off, "buffer overlaps a shadow ring"
            bufs.append((off, length, bool(flags & W)))
            if not flags & NEXT:
                return ShadowChain(head, bufs)
            index = nxt
        raise AssertionError("shadow chain loops or is longer than the queue")

    def read(self, chain: ShadowChain) -> bytes:
        return b"".join(bytes(self.buf[o:o + n]) for o, n, w in chain.bufs if not w)

    def fill(self, chain: ShadowChain, data: bytes) -> None:
        pos = 0
        for o, n, w in chain.bufs:
            if w and pos < len(data):
                piece = data[pos:pos + n]
                self.buf[o:o + len(piece)] = piece
                pos += len(piece)
        assert pos == len(data), "more data than device-writable space"

    def complete(self, head: int, length: int) -> tuple[int, int]:
        old = self.used_idx
        sr.USED_ELEM.pack_into(self.buf, self.used + sr.used_ring_entry(old % self.num), head, length)
        self.used_idx = (old + 1) & 0xFFFF
        self.w16(self.used + sr.USED_IDX, self.used_idx)
        return old, self.used_idx

    def needs_call(self, old: int, new: int) -> bool:
        if self.event_idx:
            return sr.vring_need_event(self.r16(self.avail + sr.used_event_offset(self.num)), new, old)
        return not self.r16(self.avail + sr.AVAIL_FLAGS) & sr.VIRTQ_AVAIL_F_NO_INTERRUPT

    def set_used_flags(self, flags: int) -> None:
        self.w16(self.used + sr.USED_FLAGS, flags)

    def set_avail_event(self, value: int) -> None:
        self.w16(self.used + sr.avail_event_offset(self.num), value)


def ring_bytes(num: int, align: int = 64) -> int:
    return sum(align_up(n, align) for n in (sr.desc_table_size(num), sr.avail_ring_size(num), sr.used_ring_size(num)))


class Rig:
    def __init__(self, num: int = 8, *, event_idx: bool = False, indirect: bool = False, arena_data: int = 1 << 16,
                 max_chain: int | None = None, ram=None, barrier=None) -> None:
        self.ram = ram if ram is not None else GuestRam()
        self.drv = Driver(self.ram, num)
        self.arena = Arena(ring_bytes(num) + arena_data)
        self.svq = ShadowVirtqueue(guest=self.ram, ring=self.drv.ring, arena=self.arena, arena_gpa=ARENA_GPA,
                                   event_idx=event_idx, indirect=indirect, max_chain=max_chain, barrier=barrier)
        self.daemon = Daemon(self.svq, self.arena, event_idx=event_idx)
        self.initial_free = self.arena.free_bytes

    def echo_round(self) -> list[ShadowChain]:
        """The daemon serves everything published: writable space gets the
        readable bytes reversed (as much as fits); completions in order."""
        chains = self.daemon.pop()
        for chain in chains:
            data = self.daemon.read(chain)[::-1][:chain.writable]
            self.daemon.fill(chain, data)
            self.daemon.complete(chain.head, len(data))
        return chains

    def close(self) -> None:
        self.arena.close()


@pytest.fixture
def make():
    rigs: list[Rig] = []

    def make(**kwargs) -> Rig:
        rig = Rig(**kwargs)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.close()


def snapshot(rig: Rig) -> tuple:
    return (bytes(rig.ram.buf), rig.svq.in_flight, rig.svq.used_idx, rig.svq.last_avail_idx, rig.arena.free_bytes,
            rig.svq.free_descriptors, rig.svq.shadow_last_used_idx)


# -- layout -------------------------------------------------------------------


def test_shadow_rings_are_reserved_aligned_and_zeroed(make):
    rig = make(num=16)
    svq, arena = rig.svq, rig.arena
    assert svq.shadow_desc_offset % 16 == 0
    assert svq.shadow_avail_offset % 2 == 0
    assert svq.shadow_used_offset % 4 == 0
    assert arena.reserved_bytes == ring_bytes(16)
    assert arena.max_alloc == 1 << 16
    assert bytes(arena.buf[:ring_bytes(16)]) == bytes(ring_bytes(16))
    assert (svq.in_flight, svq.waiting, svq.last_avail_idx, svq.used_idx, svq.free_descriptors) == (0, 0, 0, 0, 16)


def test_construction_does_not_touch_guest_ram(make):
    ram = GuestRam()
    ram.log = []
    make(ram=ram)
    assert ram.log == []


@pytest.mark.parametrize("ring, message", [
    (GuestRing(6, RAM_BASE, RAM_BASE + 0x1000, RAM_BASE + 0x2000), "queue size 6"),
    (GuestRing(8, RAM_BASE + 8, RAM_BASE + 0x1000, RAM_BASE + 0x2000), "descriptor table at 0x40000008 is not 16"),
    (GuestRing(8, RAM_BASE, RAM_BASE + 0x1001, RAM_BASE + 0x2000), "available ring at 0x40001001 is not 2"),
    (GuestRing(8, RAM_BASE, RAM_BASE + 0x1000, RAM_BASE + 0x2002), "used ring at 0x40002002 is not 4"),
    (GuestRing(8, RAM_BASE + RAM_SIZE - 64, RAM_BASE, RAM_BASE + 0x2000), "descriptor table is outside guest RAM"),
    (GuestRing(8, RAM_BASE, RAM_BASE + 0x1000, RAM_BASE + RAM_SIZE - 8), "used ring is outside guest RAM"),
])
def test_bad_guest_ring_is_a_ring_error(ring, message):
    with Arena(4096) as arena:
        with pytest.raises(RingError, match=message):
            ShadowVirtqueue(guest=GuestRam(), ring=ring, arena=arena, arena_gpa=ARENA_GPA, event_idx=False,
                            indirect=False)
        assert arena.reserved_bytes == 0


def test_max_chain_is_checked():
    ram = GuestRam()
    drv = Driver(ram, 8)
    with Arena(4096) as arena:
        for bad in (0, 9):
            with pytest.raises(ValueError):
                ShadowVirtqueue(guest=ram, ring=drv.ring, arena=arena, arena_gpa=ARENA_GPA, event_idx=False,
                                indirect=False, max_chain=bad)


def test_close_gives_the_rings_back(make):
    rig = make(num=8)
    rig.drv.add([rig.drv.buffer(b"x" * 100)])
    rig.svq.guest_kicked()
    rig.svq.close()
    rig.svq.close()
    assert rig.arena.free_bytes == rig.arena.size and rig.arena.reserved_bytes == 0
    with pytest.raises(RuntimeError):
        rig.svq.guest_kicked()


# -- round trips --------------------------------------------------------------


def test_round_trip_readable_in_writable_back_up_to_used_len(make):
    rig = make(num=8)
    drv, daemon, svq = rig.drv, rig.daemon, rig.svq
    hdr = drv.buffer(b"request header!!")
    body = drv.buffer(bytes(range(100)))
    data_in = drv.buffer(64)
    status = drv.buffer(32)
    drv.free.remove(3)  # make the head something other than 0
    drv.free.insert(0, 3)
    head = drv.add([hdr, body], [data_in, status])
    assert head == 3

    assert svq.guest_kicked() is True
    assert svq.in_flight == 1 and svq.last_avail_idx == 1 and svq.waiting == 0
    [chain] = daemon.pop()
    assert [(n, w) for _, n, w in chain.bufs] == [(16, False), (100, False), (64, True), (32, True)]
    assert daemon.read(chain) == b"request header!!" + bytes(range(100))
    # One arena buffer, the descriptors back to back in it.
    offsets = [o for o, _, _ in chain.bufs]
    assert offsets == [offsets[0], offsets[0] + 16, offsets[0] + 116, offsets[0] + 180]

    daemon.fill(chain, b"A" * 96)  # the daemon writes everything...
    daemon.complete(chain.head, 70)  # ...but reports 70 bytes
    assert svq.daemon_called() is True
    assert drv.used_elems() == [(3, 70)]
    assert rig.ram.peek(*data_in) == b"A" * 64
    assert rig.ram.peek(*status) == b"A" * 6 + b"\xee" * 26
    assert svq.in_flight == 0 and svq.used_idx == 1
    assert rig.arena.free_bytes == rig.initial_free and rig.arena.allocation_count == 0
    assert svq.free_descriptors == 8


def test_used_len_zero_copies_nothing(make):
    rig = make()
    into = rig.drv.buffer(16)
    head = rig.drv.add([rig.drv.buffer(b"hi")], [into])
    rig.svq.guest_kicked()
    [chain] = rig.daemon.pop()
    rig.daemon.fill(chain, b"Z" * 16)
    rig.daemon.complete(chain.head, 0)
    rig.ram.log = []
    assert rig.svq.daemon_called()
    assert rig.drv.used_elems() == [(head, 0)]
    assert rig.ram.peek(*into) == b"\xee" * 16
    assert [(k, gpa) for k, gpa, _ in rig.ram.log if k == "W" and gpa == into[0]] == []


def test_long_chain_with_mixed_order_keeps_order_and_flags(make):
    rig = make(num=32)
    drv = rig.drv
    pattern = [R, R, W, R, W, W, R, W] * 4  # 32 descriptors, the whole queue
    bufs = [drv.buffer(bytes([i]) * (i + 1)) if f == R else drv.buffer(i + 1) for i, f in enumerate(pattern)]
    descs = list(range(32))
    random.Random(1).shuffle(descs)
    for i, ((gpa, n), f) in enumerate(zip(bufs, pattern)):
        last = i == 31
        drv.write_desc(descs[i], gpa, n, f | (0 if last else NEXT), 0 if last else descs[i + 1])
    drv.publish(descs[0])
    assert rig.svq.guest_kicked()
    [chain] = rig.daemon.pop()
    assert [(n, w) for _, n, w in chain.bufs] == [(i + 1, f == W) for i, f in enumerate(pattern)]
    assert rig.daemon.read(chain) == b"".join(bytes([i]) * (i + 1) for i, f in enumerate(pattern) if f == R)
    writable = chain.writable
    rig.daemon.fill(chain, bytes(range(256)) * (writable // 256) + bytes(range(writable % 256)))
    used = writable - 10  # stops in the middle of the last writable descriptor
    rig.daemon.complete(chain.head, used)
    assert rig.svq.daemon_called()
    assert rig.drv.used_elems() == [(descs[0], used)]
    expected = (bytes(range(256)) * 2)[:used]
    got = b""
    for (gpa, n), f in zip(bufs, pattern):
        if f == W:
            got += rig.ram.peek(gpa, n)
    assert got[:used] == expected
    assert got[used:] == b"\xee" * 10
    assert rig.svq.free_descriptors == 32


def test_zero_length_descriptors_are_carried_through(make):
    rig = make()
    empty = (rig.drv.buffer(b"")[0], 0)
    head = rig.drv.add([empty, rig.drv.buffer(b"abc")], [empty, rig.drv.buffer(4)])
    assert rig.svq.guest_kicked()
    [chain] = rig.daemon.pop()
    assert [(n, w) for _, n, w in chain.bufs] == [(0, False), (3, False), (0, True), (4, True)]
    rig.daemon.fill(chain, b"wxyz")
    rig.daemon.complete(chain.head, 4)
    rig.svq.daemon_called()
    assert rig.drv.used_elems() == [(head, 4)]


@pytest.mark.parametrize("direct_first", [0, 2])
def test_indirect_tables(make, direct_first):
    rig = make(num=8, indirect=True)
    drv = rig.drv
    outs = [drv.buffer(bytes([65 + i]) * 10) for i in range(3)]
    ins = [drv.buffer(20) for _ in range(2)]
    table, _ = drv.buffer(16 * 5 - 16 * direct_first, fill=0)
    chain = [(g, n, R) for g, n in outs] + [(g, n, W) for g, n in ins]
    direct, in_table = chain[:direct_first], chain[direct_first:]
    for i, (g, n, f) in enumerate(in_table):
        last = i + 1 == len(in_table)
        drv.write_desc(i, g, n, f | (0 if last else NEXT), 0 if last else i + 1, table=table)
    for i, (g, n, f) in enumerate(direct):
        drv.write_desc(4 + i, g, n, f | NEXT, 5 + i)
    # The descriptor naming the table has WRITE set: the device MUST ignore it.
    drv.write_desc(4 + direct_first, table, 16 * len(in_table), INDIRECT | W)
    drv.publish(4)
    assert rig.svq.guest_kicked()
    [shadow] = rig.daemon.pop()
    assert [(n, w) for _, n, w in shadow.bufs] == [(10, False)] * 3 + [(20, True)] * 2
    assert rig.daemon.read(shadow) == b"A" * 10 + b"B" * 10 + b"C" * 10
    rig.daemon.fill(shadow, b"r" * 25)
    rig.daemon.complete(shadow.head, 25)
    assert rig.svq.daemon_called()
    assert drv.used_elems() == [(4, 25)]
    assert rig.ram.peek(*ins[0]) == b"r" * 20 and rig.ram.peek(*ins[1]) == b"r" * 5 + b"\xee" * 15


def test_wrap_around_past_65535(make):
    rig = make(num=8, event_idx=True)
    drv, daemon, svq = rig.drv, rig.daemon, rig.svq
    outs = [drv.buffer(bytes([i]) * 8) for i in range(4)]
    ins = [drv.buffer(8) for _ in range(4)]
    total = 0
    while total < 66_000:
        heads = [drv.add([outs[i]], [ins[i]], publish=False) for i in range(4)]
        drv.publish(*heads)
        # The guest kicks only when avail_event says so (drivers honour it).
        assert svq.guest_kicked() is True
        assert drv.avail_event() == drv.avail_idx
        chains = daemon.pop()
        assert len(chains) == 4
        for chain in reversed(chains):
            daemon.fill(chain, daemon.read(chain))
            daemon.complete(chain.head, 8)
        drv.set_used_event((drv.last_used + 3) & 0xFFFF)  # interrupt on the 4th
        assert svq.daemon_called() is True
        assert [h for h, _ in drv.used_elems()] == heads[::-1]
        for i in range(4):
            assert rig.ram.peek(*ins[i]) == bytes([i]) * 8
        total += 4
    assert svq.last_avail_idx == total & 0xFFFF
    assert svq.used_idx == total & 0xFFFF
    assert svq.shadow_avail_idx == total & 0xFFFF
    assert rig.arena.free_bytes == rig.initial_free


def test_out_of_order_completion(make):
    rig = make(num=16)
    drv, daemon, svq = rig.drv, rig.daemon, rig.svq
    ins = {}
    for i in range(8):
        into = drv.buffer(4)
        head = drv.add([drv.buffer(bytes([i]) * 4)], [into])
        ins[head] = (into, i)
    svq.guest_kicked()
    chains = daemon.pop()
    shadow_to_guest = {}
    for chain in chains:
        shadow_to_guest[chain.head] = daemon.read(chain)[0]
    order = [5, 2, 7, 0]
    for k in order:
        daemon.fill(chains[k], b"done")
        daemon.complete(chains[k].head, 4)
    assert svq.daemon_called()
    first = drv.used_elems()
    assert [ins[h][1] for h, _ in first] == order
    for k in (6, 1, 4, 3):
        daemon.fill(chains[k], b"late")
        daemon.complete(chains[k].head, 4)
    assert svq.daemon_called()
    second = drv.used_elems()
    assert [ins[h][1] for h, _ in second] == [6, 1, 4, 3]
    for head, (into, i) in ins.items():
        assert rig.ram.peek(*into) == (b"done" if i in order else b"late")
    assert svq.in_flight == 0 and svq.free_descriptors == 16


async def test_simulated_guest_driver_through_the_shadow_ring():
    """The simulator's own virtio driver (Linux-like) on one side, the test
    daemon on the other, with EVENT_IDX and indirect descriptors."""
    for event_idx, indirect in ((False, False), (True, True), (True, False)):
        ram = GuestRam()
        alloc = GuestAllocator(ram.base, ram.size, reserve_low=0x10000)
        kicks = []

        async def notify(vcpu, kicks=kicks):
            if svq.guest_kicked():
                kicks.append(vcpu)

        vq = GuestVirtqueue.create(ram, alloc, 0, 32, notify, event_idx=event_idx, indirect=indirect)
        with Arena(ring_bytes(32) + 8192) as arena, trio.fail_after(10):
            svq = ShadowVirtqueue(guest=ram, ring=GuestRing(32, vq.desc_gpa, vq.avail_gpa, vq.used_gpa), arena=arena,
                                  arena_gpa=ARENA_GPA, event_idx=event_idx, indirect=indirect)
            daemon = Daemon(svq, arena, event_idx=event_idx)
            for round_ in range(6):
                requests = []
                for i in range(10):
                    out = alloc.allocate(64)
                    ram.write(out, bytes([round_, i]) * 32)
                    into = [alloc.allocate(48), alloc.allocate(16)]
                    completion = await vq.submit([(out, 64)], [(into[0], 48), (into[1], 16)])
                    requests.append((i, completion, out, into))
                # 10 chains of 128 bytes fit the arena; the daemon answers out of order.
                chains = daemon.pop()
                assert len(chains) == 10
                for chain in chains[::-1]:
                    data = daemon.read(chain)[::-1]
                    daemon.fill(chain, data)
                    daemon.complete(chain.head, 60)
                if svq.daemon_called():
                    vq.collect_used()
                for i, completion, out, into in requests:
                    assert await completion == 60
                    got = ram.read(into[0], 48) + ram.read(into[1], 12)
                    assert got == (bytes([round_, i]) * 32)[::-1][:60]
                    alloc.free(out)
                    alloc.free(into[0])
                    alloc.free(into[1])
            assert kicks, "the daemon was never kicked"
            assert arena.allocation_count == 0 and svq.in_flight == 0


# -- arena exhaustion -----------------------------------------------------------


def serve_until_done(rig: Rig, expected: int, *, pending: list[ShadowChain] | None = None,
                     max_rounds: int = 1000) -> list[tuple[int, int]]:
    """The daemon serves everything (``pending``: chains it already took),
    one completion per round, oldest first."""
    done = []
    pending = list(pending or [])
    for _ in range(max_rounds):
        pending += rig.daemon.pop()
        if not pending:
            break
        chain = pending.pop(0)
        data = rig.daemon.read(chain)[::-1][:chain.writable]
        rig.daemon.fill(chain, data)
        rig.daemon.complete(chain.head, len(data))
        rig.svq.daemon_called()
        done += rig.drv.used_elems()
    else:
        raise AssertionError("no progress: deadlock")
    assert len(done) == expected
    return done


def test_arena_full_waits_and_resumes_in_order(make):
    rig = make(num=32, arena_data=4096)
    drv, svq = rig.drv, rig.svq
    heads = [drv.add([drv.buffer(bytes([i]) * 512)], [drv.buffer(512)]) for i in range(10)]
    assert svq.guest_kicked() is True
    assert svq.in_flight == 4 and svq.waiting == 6 and svq.last_avail_idx == 4
    assert rig.arena.free_bytes == 0
    assert svq.guest_kicked() is False  # still full: nothing new for the daemon
    chains = rig.daemon.pop()
    rig.daemon.complete(chains[1].head, 0)
    assert svq.daemon_called()
    assert svq.in_flight == 4 and svq.waiting == 5
    assert svq.kick_prepare() is True
    assert svq.kick_prepare() is False
    assert drv.used_elems() == [(heads[1], 0)]
    done = serve_until_done(rig, 9, pending=[chains[0], chains[2], chains[3]])
    assert [h for h, _ in done] == [heads[0]] + heads[2:]
    assert svq.waiting == 0 and rig.arena.free_bytes == rig.initial_free


def test_request_larger_than_half_the_arena_does_not_deadlock(make):
    rig = make(num=16, arena_data=4096)
    drv = rig.drv
    small = [drv.add([drv.buffer(b"s" * 1000)]) for _ in range(2)]
    big = drv.add([drv.buffer(b"B" * 1500)], [drv.buffer(1500)])  # 3000 bytes > half the arena
    after = [drv.add([drv.buffer(b"t" * 600)]) for _ in range(3)]
    rig.svq.guest_kicked()
    assert rig.svq.in_flight == 2 and rig.svq.waiting == 4
    done = serve_until_done(rig, 6)
    assert [h for h, _ in done] == small + [big] + after
    assert rig.arena.free_bytes == rig.initial_free


def test_exactly_the_arena_fits_one_byte_more_is_a_ring_error(make):
    rig = make(num=8, arena_data=4096)
    drv = rig.drv
    fits = drv.add([drv.buffer(b"f" * 2048)], [drv.buffer(2048)])
    assert rig.svq.guest_kicked()
    rig.daemon.complete(rig.daemon.pop()[0].head, 2048)
    rig.svq.daemon_called()
    assert rig.drv.used_elems() == [(fits, 2048)]
    drv.add([drv.buffer(b"f" * 2048)], [drv.buffer(2049)])
    before = snapshot(rig)
    with pytest.raises(RingError, match="needs 4097 bytes, more than the arena can ever hold"):
        rig.svq.guest_kicked()
    assert snapshot(rig) == before


def test_shadow_descriptors_run_out_before_the_arena(make):
    rig = make(num=4, indirect=True)
    drv = rig.drv
    heads = [drv.add([drv.buffer(b"x")], [drv.buffer(1), drv.buffer(1)], indirect=True) for _ in range(4)]
    assert rig.svq.guest_kicked()
    assert rig.svq.in_flight == 1 and rig.svq.waiting == 3 and rig.svq.free_descriptors == 1
    done = serve_until_done(rig, 4)
    assert [h for h, _ in done] == heads


# -- notifications ----------------------------------------------------------------


def test_guest_no_interrupt_flag(make):
    rig = make()
    drv = rig.drv
    drv.set_no_interrupt(True)
    drv.add([drv.buffer(b"a")])
    rig.svq.guest_kicked()
    rig.daemon.complete(rig.daemon.pop()[0].head, 0)
    assert rig.svq.daemon_called() is False
    assert drv.used_elems() != []  # the used ring was still updated
    drv.set_no_interrupt(False)
    drv.add([drv.buffer(b"a")])
    rig.svq.guest_kicked()
    rig.daemon.complete(rig.daemon.pop()[0].head, 0)
    assert rig.svq.daemon_called() is True
    assert rig.svq.daemon_called() is False  # nothing new: no interrupt


def test_guest_used_event(make):
    rig = make(num=8, event_idx=True)
    drv, daemon, svq = rig.drv, rig.daemon, rig.svq
    drv.set_no_interrupt(True)  # MUST be ignored with EVENT_IDX
    for _ in range(6):
        drv.add([drv.buffer(b"a")])
    svq.guest_kicked()
    chains = daemon.pop()
    drv.set_used_event(2)  # interrupt when used entry 2 is written (idx 2 -> 3)
    results = []
    for chain in chains[:2]:
        daemon.complete(chain.head, 0)
        results.append(svq.daemon_called())
    daemon.complete(chains[2].head, 0)
    daemon.complete(chains[3].head, 0)
    results.append(svq.daemon_called())  # used 2 -> 4 crosses used_event 2
    daemon.complete(chains[4].head, 0)
    results.append(svq.daemon_called())
    assert results == [False, False, True, False]


def test_guest_avail_event_is_kept_at_last_avail(make):
    rig = make(num=8, event_idx=True)
    drv = rig.drv
    for _ in range(3):
        drv.add([drv.buffer(b"a")])
    rig.svq.guest_kicked()
    assert drv.avail_event() == 3
    assert rig.ram.peek16(drv.used + sr.USED_FLAGS) == 0  # never NO_NOTIFY


def test_guest_avail_event_is_the_blocked_entry_when_waiting(make):
    rig = make(num=8, event_idx=True, arena_data=1024)
    drv = rig.drv
    for _ in range(4):
        drv.add([drv.buffer(b"a" * 512)])
    rig.svq.guest_kicked()
    assert rig.svq.waiting == 2
    assert drv.avail_event() == 2


def test_guest_entry_published_while_avail_event_is_written_is_not_lost(make):
    """The guest adds a chain after the device read avail->idx but before it
    saw the new avail_event: it does not kick, so the device must look again."""
    rig = make(num=8, event_idx=True)
    drv = rig.drv
    drv.add([drv.buffer(b"first")])
    late = drv.buffer(b"late")
    raced = []

    def hook(gpa, data):
        if gpa == drv.used + sr.avail_event_offset(8) and not raced:
            raced.append(drv.add([late]))

    rig.ram.write_hook = hook
    assert rig.svq.guest_kicked()
    assert raced and rig.svq.last_avail_idx == 2 and drv.avail_event() == 2
    assert len(rig.daemon.pop()) == 2


def test_daemon_no_notify_flag(make):
    rig = make()
    drv = rig.drv
    rig.daemon.set_used_flags(sr.VIRTQ_USED_F_NO_NOTIFY)
    drv.add([drv.buffer(b"a")])
    assert rig.svq.guest_kicked() is False
    assert rig.svq.in_flight == 1  # published all the same
    rig.daemon.set_used_flags(0)
    drv.add([drv.buffer(b"a")])
    assert rig.svq.guest_kicked() is True
    assert rig.svq.guest_kicked() is False  # nothing new


def test_daemon_avail_event(make):
    rig = make(num=8, event_idx=True)
    drv, daemon, svq = rig.drv, rig.daemon, rig.svq
    daemon.auto_avail_event = False
    daemon.set_used_flags(sr.VIRTQ_USED_F_NO_NOTIFY)  # MUST be ignored with EVENT_IDX
    daemon.set_avail_event(2)
    results = []
    for _ in range(4):
        drv.add([drv.buffer(b"a")])
        results.append(svq.guest_kicked())
    assert results == [False, False, True, False]
    daemon.set_avail_event(5)
    for _ in range(2):
        drv.add([drv.buffer(b"a")], publish=False)
    drv.publish(4, 5)
    assert svq.guest_kicked() is True  # 4 -> 6 crosses 5


def test_shadow_used_event_follows_the_daemon(make):
    rig = make(num=8, event_idx=True)
    drv, daemon, svq = rig.drv, rig.daemon, rig.svq
    avail_flags = daemon.avail + sr.AVAIL_FLAGS
    for _ in range(3):
        drv.add([drv.buffer(b"a")])
    svq.guest_kicked()
    chains = daemon.pop()
    old, new = daemon.complete(chains[0].head, 0)
    assert daemon.needs_call(old, new)  # used_event starts at 0
    svq.daemon_called()
    assert daemon.r16(daemon.avail + sr.used_event_offset(8)) == 1
    old, new = daemon.complete(chains[1].head, 0)
    assert daemon.needs_call(old, new)
    svq.daemon_called()
    assert daemon.r16(daemon.avail + sr.used_event_offset(8)) == 2
    assert daemon.r16(avail_flags) == 0


class Barrier:
    """The ``barrier`` hook: runs ``action`` (set by the test once the rig
    exists) every time, a window between two ordered accesses."""

    def __init__(self) -> None:
        self.action = None

    def __call__(self) -> None:
        if self.action is not None:
            self.action()


def test_shadow_completion_racing_used_event_is_not_lost(make):
    """The daemon completes a chain after the bridge read used->idx but
    before it saw used_event: the daemon does not call, so the bridge must
    look again."""
    barrier = Barrier()
    rig = make(num=8, event_idx=True, barrier=barrier)
    for _ in range(2):
        rig.drv.add([rig.drv.buffer(b"a")])
    rig.svq.guest_kicked()
    first, second = rig.daemon.pop()
    raced = []

    def complete_second():
        # Right after used_event was moved past the first completion.
        if rig.svq.shadow_last_used_idx == 1 and not raced:
            raced.append(rig.daemon.complete(second.head, 0))

    barrier.action = complete_second
    rig.daemon.complete(first.head, 0)
    rig.svq.daemon_called()
    assert raced == [(1, 2)]
    assert rig.daemon.needs_call(1, 2) is False  # the daemon would not have called
    assert len(rig.drv.used_elems()) == 2 and rig.svq.in_flight == 0


def test_kick_prepare_after_daemon_called_published_waiting_chains(make):
    rig = make(num=8, arena_data=128)
    drv = rig.drv
    drv.add([drv.buffer(b"a" * 128)])
    drv.add([drv.buffer(b"b" * 128)])
    assert rig.svq.guest_kicked() is True
    assert rig.svq.waiting == 1
    rig.daemon.complete(rig.daemon.pop()[0].head, 0)
    rig.svq.daemon_called()
    assert rig.svq.waiting == 0
    assert rig.svq.kick_prepare() is True
    assert rig.daemon.read(rig.daemon.pop()[0]) == b"b" * 128


def test_publication_order_entries_before_idx(make):
    """Shadow: descriptors and ring entries are in place at the barrier
    before the avail->idx store. Guest: used elements before used->idx."""
    barrier = Barrier()
    rig = make(num=8, barrier=barrier)
    daemon = rig.daemon
    seen = []
    barrier.action = lambda: seen.append(
        (daemon.avail_idx(), [daemon.r16(daemon.avail + sr.avail_ring_entry(i)) for i in range(2)],
         bytes(rig.arena.buf[daemon.desc:daemon.desc + 32])))
    rig.drv.add([rig.drv.buffer(b"a")])
    rig.drv.add([rig.drv.buffer(b"b")])
    rig.svq.guest_kicked()
    chains = daemon.pop()
    assert [daemon.read(c) for c in chains] == [b"a", b"b"]
    # A barrier ran with both entries and descriptors written and the idx still 0.
    assert (0, [0, 1], bytes(rig.arena.buf[daemon.desc:daemon.desc + 32])) in seen

    barrier.action = None
    writes = []
    rig.ram.write_hook = lambda gpa, data: writes.append(gpa)
    for chain in chains:
        daemon.complete(chain.head, 0)
    rig.svq.daemon_called()
    used = rig.drv.used
    assert writes == [used + sr.used_ring_entry(0), used + sr.used_ring_entry(1), used + sr.USED_IDX]


# -- the guest breaks the ring ------------------------------------------------------


def hostile(rig: Rig, build) -> None:
    """Publish a good chain (descriptor 7), then the hostile one that
    ``build(drv)`` writes into the table (it returns the head to publish)."""
    drv = rig.drv
    drv.write_desc(7, drv.buffer(b"good")[0], 4, R)
    drv.publish(7)
    drv.publish(build(drv))


def d(drv, i, addr, length, flags, nxt=0, table=None):
    drv.write_desc(i, addr, length, flags, nxt, table)


def _readable_outside_ram(drv):
    d(drv, 0, RAM_BASE + RAM_SIZE - 8, 16, R)
    return 0


def _writable_outside_ram(drv):
    d(drv, 0, drv.buffer(8)[0], 8, R | NEXT, 1)
    d(drv, 1, RAM_BASE - 4096, 4096, W)  # never written before completion, checked all the same
    return 0


def _writable_across_a_hole(drv):
    d(drv, 0, HOLE - 8, 16, W)
    return 0


def _loop(drv):
    d(drv, 0, drv.buffer(1)[0], 1, NEXT, 1)
    d(drv, 1, drv.buffer(1)[0], 1, NEXT, 2)
    d(drv, 2, drv.buffer(1)[0], 1, NEXT, 0)
    return 0


def _self_loop(drv):
    d(drv, 3, drv.buffer(1)[0], 1, NEXT, 3)
    return 3


def _next_out_of_range(drv):
    d(drv, 0, drv.buffer(1)[0], 1, NEXT, 8)
    return 0


def _head_out_of_range(drv):
    return 9


def _length_overflows(drv):
    d(drv, 0, 0xFFFF_FFFF_FFFF_FFF0, 0x20, R)
    return 0


def _indirect_not_negotiated(drv):
    d(drv, 0, drv.buffer(16)[0], 16, INDIRECT)
    return 0


def _nested(drv):
    inner, _ = drv.buffer(16, fill=0)
    outer, _ = drv.buffer(32, fill=0)
    d(drv, 0, drv.buffer(4)[0], 4, R | NEXT, 1, table=outer)
    d(drv, 1, inner, 16, INDIRECT, table=outer)
    d(drv, 0, outer, 32, INDIRECT)
    return 0


def _indirect_loop(drv):
    table, _ = drv.buffer(48, fill=0)
    d(drv, 0, drv.buffer(4)[0], 4, NEXT, 1, table=table)
    d(drv, 1, drv.buffer(4)[0], 4, NEXT, 2, table=table)
    d(drv, 2, drv.buffer(4)[0], 4, NEXT, 1, table=table)
    d(drv, 0, table, 48, INDIRECT)
    return 0


def _too_long(drv):
    # 2 direct descriptors + an indirect table of 7: 9 buffers in an 8-entry queue.
    table, _ = drv.buffer(16 * 7, fill=0)
    for i in range(7):
        d(drv, i, drv.buffer(1)[0], 1, NEXT if i < 6 else 0, i + 1 if i < 6 else 0, table=table)
    d(drv, 0, drv.buffer(1)[0], 1, NEXT, 1)
    d(drv, 1, drv.buffer(1)[0], 1, NEXT, 2)
    d(drv, 2, table, 16 * 7, INDIRECT)
    return 0


def _indirect_next_out_of_range(drv):
    table, _ = drv.buffer(32, fill=0)
    d(drv, 0, drv.buffer(1)[0], 1, NEXT, 2, table=table)
    d(drv, 0, table, 32, INDIRECT)
    return 0


def _indirect_table_outside_ram(drv):
    d(drv, 0, RAM_BASE + RAM_SIZE - 16, 32, INDIRECT)
    return 0


def _indirect_and_next(drv):
    table, _ = drv.buffer(16, fill=0)
    d(drv, 0, drv.buffer(1)[0], 1, R, table=table)
    d(drv, 0, table, 16, INDIRECT | NEXT, 1)
    return 0


def _indirect_bad_length(length):
    def build(drv):
        table, _ = drv.buffer(32, fill=0)
        d(drv, 0, table, length, INDIRECT)
        return 0
    return build


def _indirect_buffer_outside_ram(drv):
    table, _ = drv.buffer(32, fill=0)
    d(drv, 0, drv.buffer(1)[0], 1, NEXT, 1, table=table)
    d(drv, 1, RAM_BASE + RAM_SIZE, 1, W, table=table)
    d(drv, 0, table, 32, INDIRECT)
    return 0


RING_ERRORS = {
    # name: (builder, VIRTIO_F_INDIRECT_DESC negotiated, message)
    "readable outside RAM": (_readable_outside_ram, False,
                             r"descriptor 0 points outside guest RAM \(0x400ffff8 \+ 0x10\)"),
    "writable outside RAM": (_writable_outside_ram, False,
                             r"descriptor 1 points outside guest RAM \(0x3ffff000 \+ 0x1000\)"),
    "writable across a hole": (_writable_across_a_hole, False, r"descriptor 0 points outside guest RAM"),
    "loop": (_loop, False, r"descriptor chain loops at 0"),
    "self loop": (_self_loop, False, r"descriptor chain loops at 3"),
    "next out of range": (_next_out_of_range, False, r"descriptor 0: next 8 is outside the 8-entry table"),
    "head out of range": (_head_out_of_range, False, r"names descriptor 9, outside the 8-entry table"),
    "length overflows 2^64": (_length_overflows, False,
                              r"descriptor 0 length overflows \(0xfffffffffffffff0 \+ 0x20\)"),
    "indirect not negotiated": (_indirect_not_negotiated, False, r"VIRTIO_F_INDIRECT_DESC was not negotiated"),
    "nested indirect": (_nested, True, r"indirect table inside an indirect descriptor"),
    "loop in an indirect table": (_indirect_loop, True,
                                  r"indirect descriptor \(table at 0x[0-9a-f]+\) chain loops at 1"),
    "too long": (_too_long, True, r"chain longer than the queue \(9 descriptors"),
    "indirect next out of range": (_indirect_next_out_of_range, True, r"next 2 is outside the 2-entry table"),
    "indirect table outside RAM": (_indirect_table_outside_ram, True,
                                   r"descriptor 0: indirect table points outside guest RAM"),
    "indirect and next": (_indirect_and_next, True, r"both VIRTQ_DESC_F_INDIRECT and VIRTQ_DESC_F_NEXT"),
    "indirect length 0": (_indirect_bad_length(0), True,
                          r"indirect table length 0 is not a non-zero multiple of 16"),
    "indirect length 24": (_indirect_bad_length(24), True, r"indirect table length 24 is not a non-zero multiple"),
    "indirect buffer outside RAM": (_indirect_buffer_outside_ram, True,
                                    r"indirect descriptor \(table at 0x[0-9a-f]+\) 1 points outside guest RAM"),
}


@pytest.mark.parametrize("name", list(RING_ERRORS))
def test_ring_errors(make, name):
    build, indirect, message = RING_ERRORS[name]
    ram = GuestRam(holes=[(HOLE, 4096)])
    rig = make(num=8, indirect=indirect, ram=ram)
    hostile(rig, build)
    free_before = rig.arena.free_bytes
    with pytest.raises(RingError, match=message):
        rig.svq.guest_kicked()
    # The good chain before it is in flight; nothing of the bad one was allocated.
    assert rig.svq.in_flight == 1 and rig.svq.last_avail_idx == 1
    assert rig.arena.free_bytes == free_before - 64 and rig.arena.allocation_count == 1
    [good] = rig.daemon.pop()
    assert rig.daemon.read(good) == b"good"
    rig.daemon.complete(good.head, 0)
    rig.svq.daemon_called()
    assert rig.drv.used_elems() == [(7, 0)]
    rig.svq.reset()
    assert rig.arena.free_bytes == rig.initial_free


@pytest.mark.parametrize("idx, message", [(9, r"avail idx jumped by 9 with a 8-entry queue"),
                                          (0xFFFF, r"avail idx jumped by 65535")])  # "backwards" is a jump too
def test_avail_idx_jump(make, idx, message):
    rig = make(num=8)
    rig.ram.poke16(rig.drv.avail + sr.AVAIL_IDX, idx)
    with pytest.raises(RingError, match=message):
        rig.svq.guest_kicked()
    assert rig.svq.in_flight == 0 and rig.arena.free_bytes == rig.initial_free


def test_broken_queue_publishes_nothing_more_but_completes_what_is_in_flight(make):
    rig = make(num=8)
    drv, svq = rig.drv, rig.svq
    good = drv.add([drv.buffer(b"ok")], [drv.buffer(2)])
    drv.publish(9)
    with pytest.raises(RingError) as info:
        svq.guest_kicked()
    assert svq.broken == str(info.value)
    drv.add([drv.buffer(b"later")])
    assert svq.guest_kicked() is False  # no second error for the same broken ring
    assert svq.in_flight == 1
    rig.echo_round()
    assert svq.daemon_called() is True
    assert drv.used_elems() == [(good, 2)]
    svq.reset()
    assert svq.broken is None


def test_max_chain_limit(make):
    rig = make(num=16, max_chain=4)
    drv = rig.drv
    drv.add([drv.buffer(b"a")] * 4)
    drv.add([drv.buffer(b"a")] * 5)
    with pytest.raises(RingError, match=r"chain longer than the limit of 4 \(5 descriptors"):
        rig.svq.guest_kicked()
    assert rig.svq.in_flight == 1


def test_chain_of_more_than_4_gib_overflows():
    base = 0x1_0000_0000
    ram = SparseRam(base, 3 << 32)
    drv = Driver(ram, 8, base=base)
    with Arena(4096) as arena:
        svq = ShadowVirtqueue(guest=ram, ring=drv.ring, arena=arena, arena_gpa=ARENA_GPA, event_idx=False,
                              indirect=False)
        drv.write_desc(0, base + 0x10000, 0xFFFF_F000, W | NEXT, 1)
        drv.write_desc(1, base + 0x1_0001_0000, 0x2000, W)
        drv.publish(0)
        with pytest.raises(RingError, match=r"chain length overflows: more than 2\^32 bytes"):
            svq.guest_kicked()
        assert arena.allocation_count == 0


def test_writable_buffer_leaving_guest_ram_before_completion(make):
    """A buffer ballooned out while in flight: the rest of the batch is still
    returned to the guest, then RingError."""
    rig = make(num=8)
    drv = rig.drv
    gone = drv.buffer(16)
    stays = drv.buffer(16)
    first = drv.add([], [gone])
    second = drv.add([], [stays])
    rig.svq.guest_kicked()
    chains = rig.daemon.pop()
    for chain in chains:
        rig.daemon.fill(chain, b"q" * 16)
        rig.daemon.complete(chain.head, 16)
    rig.ram.holes.append((gone[0], 16))
    with pytest.raises(RingError, match=f"chain at descriptor {first} is no longer in guest RAM"):
        rig.svq.daemon_called()
    assert drv.used_elems() == [(second, 16)]
    assert rig.ram.peek(*stays) == b"q" * 16
    assert rig.svq.in_flight == 0 and rig.arena.free_bytes == rig.initial_free


# -- the daemon breaks the shadow ring -----------------------------------------------


def _daemon_bad_id(rig, chains):
    rig.daemon.complete(8, 0)


def _daemon_free_descriptor(rig, chains):
    rig.daemon.complete(7, 0)


def _daemon_not_a_head(rig, chains):
    rig.daemon.complete(chains[0].head + 1, 0)  # the second descriptor of a chain


def _daemon_twice_in_a_batch(rig, chains):
    rig.daemon.complete(chains[1].head, 0)
    rig.daemon.complete(chains[1].head, 0)


def _daemon_twice_across_batches(rig, chains):
    rig.daemon.complete(chains[1].head, 4)
    rig.svq.daemon_called()
    rig.drv.used_elems()
    rig.daemon.complete(chains[1].head, 4)


def _daemon_overlong(rig, chains):
    rig.daemon.complete(chains[0].head, 4)
    rig.daemon.complete(chains[1].head, 5)


def _daemon_idx_jump(rig, chains):
    rig.daemon.complete(chains[0].head, 0)
    rig.daemon.w16(rig.daemon.used + sr.USED_IDX, rig.daemon.used_idx + 2)


DAEMON_ERRORS = {
    "id out of range": (_daemon_bad_id, r"id 8 is not the head of a chain in flight"),
    "free descriptor": (_daemon_free_descriptor, r"id 7 is not the head of a chain in flight"),
    "not a head": (_daemon_not_a_head, r"id 1 is not the head of a chain in flight"),
    "twice in a batch": (_daemon_twice_in_a_batch, r"id 2 completed twice"),
    "twice across batches": (_daemon_twice_across_batches, r"id 2 is not the head of a chain in flight"),
    "used len too long": (_daemon_overlong, r"id 2 used len 5 exceeds the 4 device-writable bytes"),
    "used idx jump": (_daemon_idx_jump, r"shadow used idx moved by 3 \(to 3\) with only 2 chains in flight"),
}


@pytest.mark.parametrize("name", sorted(DAEMON_ERRORS))
def test_daemon_ring_errors_touch_nothing(make, name):
    misbehave, message = DAEMON_ERRORS[name]
    rig = make(num=8)
    drv = rig.drv
    drv.add([drv.buffer(b"r")], [drv.buffer(4)])
    drv.add([drv.buffer(b"r")], [drv.buffer(4)])
    rig.svq.guest_kicked()
    chains = rig.daemon.pop()
    for chain in chains:
        rig.daemon.fill(chain, b"zzzz")
    misbehave(rig, chains)
    before = snapshot(rig)
    with pytest.raises(DaemonRingError, match=message):
        rig.svq.daemon_called()
    assert snapshot(rig) == before
    with pytest.raises(DaemonRingError, match=message):  # still there, still untouched
        rig.svq.daemon_called()
    assert snapshot(rig) == before
    # The guest-side state is intact: reset frees everything.
    rig.svq.reset()
    assert rig.arena.free_bytes == rig.initial_free


# -- reset, stop, restart ------------------------------------------------------------------


def test_reset_frees_everything(make):
    rig = make(num=16, arena_data=1024, event_idx=True)
    drv, svq = rig.drv, rig.svq
    for _ in range(5):
        drv.add([drv.buffer(b"x" * 300)], [drv.buffer(10)])
    svq.guest_kicked()
    assert svq.in_flight == 3 and svq.waiting == 2  # 310 bytes take 320 of the 1024
    rig.daemon.complete(rig.daemon.pop()[0].head, 3)
    svq.reset()
    assert rig.arena.free_bytes == rig.initial_free and rig.arena.allocation_count == 0
    assert (svq.in_flight, svq.waiting, svq.last_avail_idx, svq.used_idx, svq.free_descriptors) == (0, 0, 0, 0, 16)
    assert (svq.shadow_avail_idx, svq.shadow_last_used_idx) == (0, 0)
    assert bytes(rig.arena.buf[:ring_bytes(16)]) == bytes(ring_bytes(16))
    # The guest resets its ring too; everything works from scratch.
    rig.ram.poke(drv.desc, bytes(drv.data_next - drv.desc))
    fresh = Driver(rig.ram, 16)
    fresh.data_next = drv.data_next
    rig.drv = fresh
    rig.daemon = Daemon(svq, rig.arena, event_idx=True)
    head = fresh.add([fresh.buffer(b"again")], [fresh.buffer(5)])
    assert svq.guest_kicked()
    rig.echo_round()
    assert svq.daemon_called()
    assert fresh.used_elems() == [(head, 5)]
    assert rig.ram.peek(fresh.data_next - 16, 5) == b"niaga"


def test_stop_final_call_abandoned_and_restart(make):
    rig = make(num=16, arena_data=2048)
    drv, svq = rig.drv, rig.svq
    heads = [drv.add([drv.buffer(bytes([65 + i]) * 500)], [drv.buffer(8)]) for i in range(6)]
    svq.guest_kicked()
    assert svq.in_flight == 4 and svq.waiting == 2
    chains = rig.daemon.pop()
    # The daemon finished chains 2 and 0, then was stopped (GET_VRING_BASE).
    for k in (2, 0):
        rig.daemon.fill(chains[k], b"finished")
        rig.daemon.complete(chains[k].head, 8)
    assert svq.stop() == 4  # consumed up to 4: the two waiting ones stay in the guest ring
    late = drv.add([drv.buffer(b"G" * 10)], [drv.buffer(8)])  # the guest keeps going
    assert svq.guest_kicked() is False
    assert svq.daemon_called() is True  # the final call
    assert [h for h, _ in drv.used_elems()] == [heads[2], heads[0]]
    assert svq.in_flight == 2
    assert svq.abandoned() == [heads[1], heads[3]]
    assert svq.waiting == 2  # the chain added while stopped was not even looked at
    # A new daemon: the shadow ring starts from 0 with the abandoned chains.
    svq.restart()
    assert svq.kick_prepare() is True
    rig.daemon = Daemon(svq, rig.arena)
    again = rig.daemon.pop()
    assert [rig.daemon.read(c) for c in again] == [b"B" * 500, b"D" * 500]
    assert svq.guest_kicked() is True  # picks up the ones left in the guest ring
    done = serve_until_done(rig, 5, pending=again)
    assert [h for h, _ in done] == [heads[1], heads[3], heads[4], heads[5], late]
    assert rig.ram.peek(drv.data_next - 16, 8) == b"G" * 8
    assert rig.arena.free_bytes == rig.initial_free


def test_restart_without_stop_is_refused(make):
    rig = make()
    with pytest.raises(RuntimeError):
        rig.svq.restart()


# -- hostile guest, property based -------------------------------------------------


TABLES = [RAM_BASE + 0x8000 + 0x200 * i for i in range(3)]
DATA_LO = RAM_BASE + 0x9000


def hostile_value(field: str, num_entries: int):
    if field == "addr":
        return st.one_of(st.integers(DATA_LO, RAM_BASE + RAM_SIZE + 64),
                         st.sampled_from(TABLES + [0, RAM_BASE - 8, RAM_BASE + RAM_SIZE - 4, 2**64 - 8,
                                                   RAM_BASE + 0x1000, RAM_BASE + 0x2000, HOLE - 8]))
    if field == "len":
        return st.one_of(st.integers(0, 700), st.sampled_from([0, 16, 17, 48, 128, 0xFFFF_FFFF, 0x8000_0000]))
    if field == "flags":
        return st.one_of(st.sampled_from([0, NEXT, W, NEXT | W, INDIRECT, INDIRECT | NEXT, INDIRECT | W]),
                         st.integers(0, 0xFFFF))
    return st.integers(0, num_entries + 1)


@st.composite
def corruption(draw, num: int):
    """(table: None for the guest's descriptor table, else an indirect table
    index; entry; field; value)"""
    table = draw(st.sampled_from([None, None, 0, 1, 2]))
    entries = num if table is None else 8
    field = draw(st.sampled_from(["addr", "len", "flags", "next"]))
    return table, draw(st.integers(0, entries - 1)), field, draw(hostile_value(field, entries))


@st.composite
def hostile_scenario(draw):
    """An honest driver's ring (direct chains, and indirect tables when
    negotiated), then a few hostile edits to descriptors, avail entries and
    avail->idx."""
    num = draw(st.sampled_from([1, 2, 4, 8]))
    indirect = draw(st.booleans())
    desc = [(0, 0, 0, 0)] * num
    tables = [[(0, 0, 0, 0)] * 8 for _ in TABLES]
    order = draw(st.permutations(range(num)))
    heads = []
    cursor = DATA_LO
    pos = 0
    while pos < num:
        nbufs = draw(st.integers(1, 3))
        bufs = []
        for _ in range(nbufs):
            length = draw(st.integers(0, 160))
            bufs.append((cursor, length, draw(st.sampled_from([R, W]))))
            cursor += align_up(max(length, 1), 16)
        if indirect and len(heads) < len(TABLES) and draw(st.booleans()):
            t = len(heads)
            for i, (a, n, f) in enumerate(bufs):
                more = i + 1 < nbufs
                tables[t][i] = (a, n, f | (NEXT if more else 0), i + 1 if more else 0)
            desc[order[pos]] = (TABLES[t], sr.DESC_SIZE * nbufs, INDIRECT, 0)
            heads.append(order[pos])
            pos += 1
            continue
        idxs = order[pos:pos + nbufs]
        for i, ((a, n, f), idx) in enumerate(zip(bufs, idxs)):
            more = i + 1 < len(idxs)
            desc[idx] = (a, n, f | (NEXT if more else 0), idxs[i + 1] if more else 0)
        heads.append(idxs[0])
        pos += len(idxs)
    rare = st.integers(0, 40).map(lambda x: x == 7)  # not 0: hypothesis favours the bounds
    return {
        "num": num,
        "indirect": indirect,
        "event_idx": draw(st.booleans()),
        "desc": desc,
        "tables": tables,
        "heads": heads,
        "corruptions": draw(st.lists(corruption(num), max_size=3)),
        # (chains to add, add more than num outstanding, publish a bad head)
        "rounds": draw(st.lists(st.tuples(st.integers(1, num), rare, rare), min_size=1, max_size=6)),
        "arena_data": draw(st.sampled_from([384, 1024, 4096])),
        "seed": draw(st.integers(0, 2**32)),
    }


def check_accesses(log, num: int, ring: GuestRing, event_idx: bool) -> None:
    """Every access is justified by a ring field or by a descriptor read
    before it: data reads inside device-readable descriptors, data writes
    inside device-writable ones, table reads inside indirect tables."""
    desc_lo, desc_hi = ring.desc, ring.desc + sr.desc_table_size(num)
    avail_fields = {ring.avail + sr.AVAIL_FLAGS, ring.avail + sr.AVAIL_IDX, ring.avail + sr.used_event_offset(num)}
    avail_fields |= {ring.avail + sr.avail_ring_entry(i) for i in range(num)}
    used_elems = {ring.used + sr.used_ring_entry(i) for i in range(num)}
    used_fields = {ring.used + sr.USED_IDX} | ({ring.used + sr.avail_event_offset(num)} if event_idx else set())
    tables: list[tuple[int, int]] = []  # indirect tables named by descriptors read
    readable: list[tuple[int, int]] = []
    writable: list[tuple[int, int]] = []

    def inside(gpa, n, ranges):
        return any(lo <= gpa and gpa + n <= lo + length for lo, length in ranges)

    for kind, gpa, data in log:
        n = len(data)
        if kind == "R":
            is_entry = n == sr.DESC_SIZE and (
                (desc_lo <= gpa < desc_hi and (gpa - desc_lo) % 16 == 0)
                or any(lo <= gpa and gpa + 16 <= lo + length and (gpa - lo) % 16 == 0 for lo, length in tables))
            if is_entry:
                addr, length, flags, _ = sr.DESC.unpack(data)
                if flags & INDIRECT:
                    tables.append((addr, length))
                elif flags & W:
                    writable.append((addr, length))
                else:
                    readable.append((addr, length))
                continue
            if n == 2 and gpa in avail_fields:
                continue
            assert inside(gpa, n, readable), f"read {gpa:#x}+{n:#x} outside every device-readable descriptor"
        else:
            if (n == 8 and gpa in used_elems) or (n == 2 and gpa in used_fields):
                continue
            assert inside(gpa, n, writable), f"write {gpa:#x}+{n:#x} outside every device-writable descriptor"


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_scenario())
def test_hostile_guest_only_ring_errors_no_stray_access_no_leak(sc):
    num = sc["num"]
    rng = random.Random(sc["seed"])
    ram = GuestRam(holes=[(HOLE, 0x1000)])
    for page in range(9, RAM_SIZE // 4096):
        ram.poke(RAM_BASE + 4096 * page, bytes([page & 0xFF]) * 4096)
    drv = Driver(ram, num)
    desc = list(sc["desc"])
    tables = [list(t) for t in sc["tables"]]
    fields = ("addr", "len", "flags", "next")
    for table, entry, field, value in sc["corruptions"]:
        target = desc if table is None else tables[table]
        values = list(target[entry])
        values[fields.index(field)] = value
        target[entry] = tuple(values)
    for i, (addr, length, flags, nxt) in enumerate(desc):
        drv.write_desc(i, addr, length, flags, nxt)
    for t, entries in enumerate(tables):
        for i, (addr, length, flags, nxt) in enumerate(entries):
            drv.write_desc(i, addr, length, flags, nxt, table=TABLES[t])

    with Arena(ring_bytes(num) + sc["arena_data"]) as arena:
        svq = ShadowVirtqueue(guest=ram, ring=drv.ring, arena=arena, arena_gpa=ARENA_GPA,
                              event_idx=sc["event_idx"], indirect=sc["indirect"])
        daemon = Daemon(svq, arena, event_idx=sc["event_idx"])
        initial_free = arena.free_bytes
        ram.log = []
        outstanding: list[ShadowChain] = []  # taken by the daemon, not completed
        guest_outstanding: list[int] = []  # heads the guest made available, not yet used
        avail_idx = 0
        broken = False
        served = 0
        waited = False

        def daemon_round(everything: bool) -> int:
            chains = daemon.pop()
            outstanding.extend(chains)
            # What the daemon holds is exactly what is in flight.
            assert arena.allocation_count == svq.in_flight == len(outstanding)
            assert svq.free_descriptors + sum(len(c.bufs) for c in outstanding) == num
            spans = sorted((c.bufs[0][0], c.bufs[0][0] + sum(n for _, n, _ in c.bufs)) for c in outstanding)
            for (_, end), (start, _) in zip(spans, spans[1:]):
                assert end <= start, "two chains in flight share arena bytes"
            rng.shuffle(outstanding)
            count = len(outstanding) if everything else rng.randint(0, len(outstanding))
            for chain in outstanding[:count]:
                used = rng.randint(0, chain.writable)
                daemon.fill(chain, bytes(rng.getrandbits(8) for _ in range(used)))
                daemon.complete(chain.head, used)
            del outstanding[:count]
            return len(chains)

        for count, overrun, bad_head in sc["rounds"]:
            for head, _ in drv.used_elems():
                if head in guest_outstanding:
                    guest_outstanding.remove(head)
            if overrun:
                avail_idx = (avail_idx + num + 1 + count) & 0xFFFF
            else:
                for _ in range(min(count, num - len(guest_outstanding))):
                    free_heads = [h for h in sc["heads"] if h not in guest_outstanding]
                    if not free_heads and not bad_head:
                        break
                    head = num + rng.randint(0, 1) if bad_head else rng.choice(free_heads)
                    ram.poke16(drv.avail + sr.avail_ring_entry(avail_idx % num), head)
                    avail_idx = (avail_idx + 1) & 0xFFFF
                    guest_outstanding.append(head)
            ram.poke16(drv.avail + sr.AVAIL_IDX, avail_idx)
            try:
                svq.guest_kicked()
            except RingError:
                broken = True
                break
            waited = waited or svq.waiting > 0
            served += daemon_round(everything=False)
            try:
                svq.daemon_called()
            except RingError:
                broken = True
                break
            assert arena.allocation_count == svq.in_flight

        # Drain: the daemon completes everything it is given.
        for _ in range(4 * num + 4):
            served += daemon_round(everything=True)
            try:
                svq.daemon_called()
            except RingError:
                broken = True
            if svq.in_flight == 0 and not daemon.pop():
                break
        event(f"guest ring broken: {broken}")
        event(f"chains served: {min(served, 5)}{'+' if served >= 5 else ''}")
        event(f"a chain waited for resources: {waited}")
        if svq.broken:
            event("error: " + re.sub(r"0x[0-9a-f]+|\d+", "N", svq.broken.split(" (")[0]))
        assert svq.in_flight == 0
        assert arena.free_bytes == initial_free and arena.allocation_count == 0
        if not broken:
            assert svq.waiting == 0
        check_accesses(ram.log, num, drv.ring, sc["event_idx"])
        svq.reset()
        assert arena.free_bytes == initial_free and svq.free_descriptors == num
