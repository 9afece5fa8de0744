import pytest
import trio
import trio.testing

from bridge import split_ring as sr
from tests.guest_driver_fakes import DMA_MODES, FakeGrantError, FakeGrants, FakeRam, RingDevice, assert_dma_state
from xen.sim.guest_dma import GrantDma, IdentityDma
from xen.sim.guest_memory import GuestAllocator, grant_ref_of, is_grant_address
from xen.sim.guest_virtqueue import Completion, DeviceMisbehaved, GuestVirtqueue, QueueDetached


class Setup:
    """A queue in FakeRam and the device side of its ring. With
    ``dma_mode="grant"`` the queue uses GrantDma over a FakeGrants table and
    the device translates what it is given; call ``await s.ready()`` (it
    maps the rings) before using it."""

    def __init__(self, size=8, *, event_idx=False, indirect=False, separate=False, prefill=None,
                 dma_mode="identity"):
        self.ram = FakeRam()
        if prefill is not None:
            self.ram.buf[:] = bytes([prefill]) * len(self.ram.buf)
        self.alloc = GuestAllocator(self.ram.base, self.ram.size)
        self.notified = []
        self.dma_mode = dma_mode
        self.grants = FakeGrants()
        self.dma = GrantDma(self.grants) if dma_mode == "grant" else None
        self.event_idx = event_idx

        async def notify(vcpu):
            self.notified.append(vcpu)

        self.vq = GuestVirtqueue.create(self.ram, self.alloc, 3, size, notify, event_idx=event_idx,
                                        indirect=indirect, separate_rings=separate, dma=self.dma)
        self.dma_addrs = []
        self.dev = None
        if self.dma is None:
            self._attach()

    def _attach(self):
        vq = self.vq
        self.dev = RingDevice(self.ram, vq.size, vq.desc_dma, vq.avail_dma, vq.used_dma, event_idx=self.event_idx,
                              translate=self.grants.translate, dma_addrs=self.dma_addrs)

    async def ready(self):
        await self.vq.map_rings()
        if self.dev is None:
            self._attach()
        return self

    def buf(self, length=64):
        return (self.alloc.allocate(length), length)

    def desc(self, index):
        return self.dev.read_desc(index)

    def gdesc(self, index):
        """A descriptor with its address as guest-physical (translated in grant mode)."""
        addr, length, flags, nxt = self.dev.read_desc(index)
        return self.grants.translate(addr, length, bool(flags & sr.VIRTQ_DESC_F_WRITE)), length, flags, nxt

    def check(self, ring_blocks=1):
        mode = self.dma_mode
        assert_dma_state(mode, self.dma, self.grants, self.dma_addrs, ring_blocks=ring_blocks)


async def setup(dma_mode="identity", **kw):
    return await Setup(dma_mode=dma_mode, **kw).ready()


def test_linux_layout_is_one_zeroed_block_with_page_aligned_used_ring():
    s = Setup(size=256, prefill=0xAA)
    vq = s.vq
    assert vq.desc_gpa % 4096 == 0
    assert vq.avail_gpa == vq.desc_gpa + 16 * 256
    assert vq.used_gpa % 4096 == 0
    assert vq.used_gpa == vq.desc_gpa + ((16 * 256 + 6 + 2 * 256 + 4095) & ~4095)
    for gpa, length in ((vq.desc_gpa, sr.desc_table_size(256)), (vq.avail_gpa, sr.avail_ring_size(256)),
                        (vq.used_gpa, sr.used_ring_size(256))):
        assert s.ram.read(gpa, length) == bytes(length)


def test_separate_rings_have_spec_alignment_and_are_zeroed():
    s = Setup(size=16, separate=True, prefill=0x55)
    vq = s.vq
    assert vq.desc_gpa % 16 == 0 and vq.avail_gpa % 2 == 0 and vq.used_gpa % 4 == 0
    assert s.ram.read(vq.used_gpa, sr.used_ring_size(16)) == bytes(sr.used_ring_size(16))
    assert s.alloc.allocation_count == 3


@pytest.mark.parametrize("dma_mode", DMA_MODES)
async def test_chain_layout_readable_then_writable(dma_mode):
    s = await setup(dma_mode)
    a, b, c, d = s.buf(16), s.buf(100), s.buf(512), s.buf(1)
    completion = await s.vq.submit([a, b], [c, d])
    assert completion.head == 0
    assert s.gdesc(0) == (a[0], 16, sr.VIRTQ_DESC_F_NEXT, 1)
    assert s.gdesc(1) == (b[0], 100, sr.VIRTQ_DESC_F_NEXT, 2)
    assert s.gdesc(2) == (c[0], 512, sr.VIRTQ_DESC_F_NEXT | sr.VIRTQ_DESC_F_WRITE, 3)
    assert s.gdesc(3) == (d[0], 1, sr.VIRTQ_DESC_F_WRITE, 0)
    assert all(is_grant_address(s.desc(i)[0]) == (dma_mode == "grant") for i in range(4))
    assert s.ram.read16(s.vq.avail_gpa + sr.avail_ring_entry(0)) == 0
    assert s.ram.read16(s.vq.avail_gpa + sr.AVAIL_IDX) == 1
    assert s.ram.read16(s.vq.avail_gpa + sr.AVAIL_FLAGS) == 0
    assert s.notified == [None]
    assert s.vq.num_free == 4 and s.vq.in_flight == 1

    second = await s.vq.submit([s.buf()], [])
    assert second.head == 4
    assert s.ram.read16(s.vq.avail_gpa + sr.avail_ring_entry(1)) == 4
    chains = s.dev.pop_avail()
    assert [c.head for c in chains] == [0, 4]
    assert chains[0].readable == [a, b] and chains[0].writable == [c, d]
    for chain in chains:
        s.dev.push_used(chain.head, 0)
    assert await s.vq.handle_used() == 2
    assert completion.done and second.done
    s.check()


async def test_avail_idx_is_written_after_descriptors_and_ring_entry():
    s = Setup()
    writes = []
    s.ram.write_hook = lambda gpa, data: writes.append(gpa)
    await s.vq.submit([s.buf()], [s.buf()])
    vq = s.vq
    kinds = []
    for gpa in writes:
        if vq.desc_gpa <= gpa < vq.avail_gpa:
            kinds.append("desc")
        elif gpa == vq.avail_gpa + sr.avail_ring_entry(0):
            kinds.append("ring")
        elif gpa == vq.avail_gpa + sr.AVAIL_IDX:
            kinds.append("idx")
    assert kinds == ["desc", "desc", "ring", "idx"]


@pytest.mark.parametrize("dma_mode", DMA_MODES)
async def test_used_buffers_are_collected_out_of_order(dma_mode):
    s = await setup(dma_mode)
    completions = [await s.vq.submit([s.buf(16)], [s.buf(64)]) for _ in range(3)]
    assert [c.head for c in completions] == [0, 2, 4]
    s.dev.pop_avail()
    s.dev.push_used(4, 30)
    assert await s.vq.handle_used() == 1
    assert completions[2].done and not completions[0].done
    assert await completions[2] == 30
    s.dev.push_used(0, 10)
    s.dev.push_used(2, 64)
    assert await s.vq.handle_used() == 2
    assert await completions[0] == 10
    assert await completions[1].wait() == 64
    assert s.vq.num_free == 8 and s.vq.in_flight == 0
    assert await s.vq.handle_used() == 0
    # Without EVENT_IDX the driver leaves used_event alone.
    assert s.dev.used_event() == 0
    s.check()


async def test_freed_chain_is_reused_head_first():
    s = Setup(size=4)
    first = await s.vq.submit([s.buf()], [s.buf()])
    s.dev.pop_avail()
    s.dev.push_used(first.head, 0)
    s.vq.collect_used()
    again = await s.vq.submit([s.buf()], [s.buf()])
    assert again.head == first.head
    assert sorted([again.head, s.desc(again.head)[3]]) == [0, 1]


@pytest.mark.parametrize("dma_mode", DMA_MODES)
async def test_full_ring_waits_for_free_descriptors(dma_mode):
    s = await setup(dma_mode, size=4)
    done = [await s.vq.submit([s.buf()], []) for _ in range(4)]
    assert s.vq.num_free == 0
    got = []

    async def fifth():
        got.append(await s.vq.submit([s.buf()], []))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fifth)
        await trio.testing.wait_all_tasks_blocked()
        assert not got
        s.dev.pop_avail()
        s.dev.push_used(done[1].head, 0)
        await s.vq.handle_used()
    assert got[0].head == done[1].head
    assert s.ram.read16(s.vq.avail_gpa + sr.AVAIL_IDX) == 5
    for chain in s.dev.pop_avail():
        s.dev.push_used(chain.head, 0)
    for c in (done[0], done[2], done[3]):
        s.dev.push_used(c.head, 0)
    await s.vq.handle_used()
    assert all(c.done for c in done + got) and s.vq.in_flight == 0
    s.check()


async def test_waiters_are_served_in_order():
    s = Setup(size=4)
    done = [await s.vq.submit([s.buf()], []) for _ in range(4)]
    order = []

    async def want(name, nbufs):
        await s.vq.submit([s.buf() for _ in range(nbufs)], [])
        order.append(name)

    def complete(c):
        s.dev.push_used(c.head, 0)
        s.vq.collect_used()

    s.dev.pop_avail()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(want, "big", 3)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(want, "small", 1)
        await trio.testing.wait_all_tasks_blocked()
        complete(done[0])
        await trio.testing.wait_all_tasks_blocked()
        assert order == []  # "small" may not overtake "big"
        complete(done[1])
        complete(done[2])
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["big"]
        complete(done[3])
    assert order == ["big", "small"]


async def test_cancelled_waiter_leaks_nothing():
    s = Setup(size=2)
    done = [await s.vq.submit([s.buf()], []) for _ in range(2)]
    with trio.move_on_after(0.01):
        await s.vq.submit([s.buf()], [])
    assert s.vq.num_free == 0
    s.dev.pop_avail()
    for c in done:
        s.dev.push_used(c.head, 0)
    s.vq.collect_used()
    assert s.vq.num_free == 2
    assert s.ram.read16(s.vq.avail_gpa + sr.AVAIL_IDX) == 2


async def test_completion_callback_runs_after_the_waiter_gave_up():
    s = Setup()
    completion = await s.vq.submit([s.buf()], [s.buf(8)])
    with trio.move_on_after(0.01):
        await completion
    seen = []
    completion.add_done_callback(lambda c: seen.append(c.used_len))
    s.dev.pop_avail()
    s.dev.push_used(completion.head, 8)
    s.vq.collect_used()
    assert seen == [8]
    late = []
    completion.add_done_callback(lambda c: late.append(c))
    assert late == [completion]


async def test_event_idx_avail_event_suppresses_notifications():
    s = Setup(event_idx=True)
    await s.vq.submit([s.buf()], [])            # idx 0 -> 1, avail_event 0: notify
    assert len(s.notified) == 1
    await s.vq.submit([s.buf()], [])            # idx 1 -> 2, avail_event still 0: no
    assert len(s.notified) == 1
    s.dev.set_avail_event(2)
    await s.vq.submit([s.buf()], [])            # idx 2 -> 3 crosses 2: notify
    assert len(s.notified) == 2
    # A batch: three adds, one kick covering [3, 6).
    for _ in range(3):
        await s.vq.add([s.buf()], [])
    assert len(s.notified) == 2
    s.dev.set_avail_event(4)
    assert await s.vq.kick() is True
    assert len(s.notified) == 3
    s.dev.set_avail_event(10)
    await s.vq.add([s.buf()], [])
    assert await s.vq.kick() is False
    # With EVENT_IDX the driver ignores VIRTQ_USED_F_NO_NOTIFY.
    s.dev.set_used_flags(sr.VIRTQ_USED_F_NO_NOTIFY)
    s.dev.set_avail_event(7)
    await s.vq.submit([s.buf()], [])
    assert len(s.notified) == 4


async def test_event_idx_used_event_follows_collected_entries():
    s = Setup(event_idx=True)
    cs = [await s.vq.submit([s.buf()], []) for _ in range(3)]
    s.dev.pop_avail()
    s.dev.push_used(cs[0].head, 0)
    s.vq.collect_used()
    assert s.dev.used_event() == 1
    s.dev.push_used(cs[2].head, 0)
    s.dev.push_used(cs[1].head, 0)
    s.vq.collect_used()
    assert s.dev.used_event() == 3
    # The device interrupts only when used idx passes used_event.
    c = await s.vq.submit([s.buf()], [])
    s.dev.pop_avail()
    old, new = s.dev.push_used(c.head, 0)
    assert s.dev.needs_interrupt(old, new)


async def test_no_notify_flag_suppresses_notifications_without_event_idx():
    s = Setup()
    s.dev.set_used_flags(sr.VIRTQ_USED_F_NO_NOTIFY)
    await s.vq.submit([s.buf()], [])
    assert s.notified == []
    s.dev.set_used_flags(0)
    vcpu = object()
    await s.vq.submit([s.buf()], [], vcpu=vcpu)
    assert s.notified == [vcpu]


async def test_collect_rechecks_used_idx_after_publishing_used_event():
    s = Setup(event_idx=True)
    a = await s.vq.submit([s.buf()], [])
    b = await s.vq.submit([s.buf()], [])
    s.dev.pop_avail()
    s.dev.push_used(a.head, 0)
    used_event_gpa = s.vq.avail_gpa + sr.used_event_offset(s.vq.size)
    raced = []

    def hook(gpa, data):
        # The device completes b right as the driver publishes used_event,
        # too early to see the new value: it sends no interrupt for b.
        if gpa == used_event_gpa and not raced:
            raced.append(True)
            s.dev.push_used(b.head, 0)

    s.ram.write_hook = hook
    assert s.vq.collect_used() == 2
    assert a.done and b.done


@pytest.mark.parametrize("dma_mode", DMA_MODES)
async def test_indirect_descriptors_for_multi_buffer_chains(dma_mode):
    s = await setup(dma_mode, indirect=True)
    base_allocs = s.alloc.allocation_count
    bufs = [s.buf(16), s.buf(4096), s.buf(1)]
    allocs_before = s.alloc.allocation_count
    completion = await s.vq.submit(bufs[:2], bufs[2:])
    assert s.alloc.allocation_count == allocs_before + 1  # the table
    table, length, flags, nxt = s.gdesc(completion.head)
    assert flags == sr.VIRTQ_DESC_F_INDIRECT and length == 48 and nxt == 0 and table % 16 == 0
    assert is_grant_address(s.desc(completion.head)[0]) == (dma_mode == "grant")
    entries = [sr.DESC.unpack(s.ram.read(table + 16 * i, 16)) for i in range(3)]
    entries = [(s.grants.translate(a, n, bool(f & sr.VIRTQ_DESC_F_WRITE)), n, f, x) for a, n, f, x in entries]
    assert entries == [
        (bufs[0][0], 16, sr.VIRTQ_DESC_F_NEXT, 1),
        (bufs[1][0], 4096, sr.VIRTQ_DESC_F_NEXT, 2),
        (bufs[2][0], 1, sr.VIRTQ_DESC_F_WRITE, 0),
    ]
    assert s.vq.num_free == 7
    chain = s.dev.pop_avail()[0]
    assert chain.indirect and chain.readable == bufs[:2] and chain.writable == bufs[2:]
    s.dev.push_used(completion.head, 1)
    await s.vq.handle_used()
    assert await completion == 1
    assert s.alloc.allocation_count == allocs_before
    s.check()
    # A single buffer never goes indirect.
    single = await s.vq.submit([s.buf()], [])
    assert s.desc(single.head)[2] == 0
    assert base_allocs <= s.alloc.allocation_count


@pytest.mark.parametrize("case", ["bad_id", "not_head", "twice", "too_long", "idx_ahead"])
async def test_misbehaving_device_raises_device_misbehaved(case):
    s = Setup(size=8)
    c1 = await s.vq.submit([s.buf()], [s.buf(8)])  # descriptors 0, 1
    c2 = await s.vq.submit([s.buf()], [s.buf(8)])  # descriptors 2, 3
    s.dev.pop_avail()
    if case == "bad_id":
        s.dev.push_used(99, 0)
    elif case == "not_head":
        s.dev.push_used(1, 0)
    elif case == "twice":
        s.dev.push_used(c1.head, 0)
        s.dev.push_used(c1.head, 0)
    elif case == "too_long":
        s.dev.push_used(c1.head, 9)
    elif case == "idx_ahead":
        s.ram.write16(s.vq.used_gpa + sr.USED_IDX, 5)
    with pytest.raises(DeviceMisbehaved, match="virtqueue 3"):
        s.vq.collect_used()
    assert s.vq.broken
    pending = [c for c in (c1, c2) if c.used_len is None]
    assert pending
    for c in pending:
        with pytest.raises(DeviceMisbehaved):
            await c
    with pytest.raises(DeviceMisbehaved):
        await s.vq.submit([s.buf()], [])
    assert s.vq.collect_used() == 0


async def test_invalid_chains_are_rejected():
    s = Setup(size=4)
    with pytest.raises(ValueError, match="longer than the queue size"):
        await s.vq.submit([s.buf() for _ in range(5)], [])
    with pytest.raises(ValueError, match="at least one"):
        await s.vq.submit([], [])
    with pytest.raises(ValueError, match="length"):
        await s.vq.submit([(s.ram.base + 0x200000, 0)], [])
    with pytest.raises(ValueError, match="outside guest RAM"):
        await s.vq.submit([(s.ram.base + s.ram.size - 8, 16)], [])
    assert s.vq.num_free == 4 and s.ram.read16(s.vq.avail_gpa + sr.AVAIL_IDX) == 0


@pytest.mark.parametrize("dma_mode", DMA_MODES)
async def test_detach_fails_everything_and_frees_the_rings(dma_mode):
    s = await setup(dma_mode, size=2, indirect=True)
    before = s.alloc.allocation_count
    c = await s.vq.submit([s.buf()], [s.buf()])  # indirect: one descriptor
    await s.vq.submit([s.buf()], [])
    results = []

    async def waiter():
        try:
            await s.vq.submit([s.buf()], [])
        except QueueDetached as exc:
            results.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        if dma_mode == "identity":
            s.vq.detach()
        else:
            await s.vq.delete()
    assert len(results) == 1
    with pytest.raises(QueueDetached):
        await c
    with pytest.raises(QueueDetached):
        await s.vq.submit([s.buf()], [])
    # Ring block and the indirect table are gone; only the test's buffers remain.
    assert s.alloc.allocation_count == before - 1 + 5
    s.check(ring_blocks=0)  # nothing stays mapped, not even the rings


async def test_indices_wrap_at_65536():
    s = Setup(size=4, event_idx=True)
    b = s.buf()
    s.dev.auto_avail_event = False
    s.dev.set_avail_event(0xFFFF)
    for _ in range(65536 // 4 + 3):
        cs = [await s.vq.add([b], []) for _ in range(4)]
        await s.vq.kick()
        chains = s.dev.pop_avail()
        assert [ch.head for ch in chains] == [c.head for c in cs]
        for c in reversed(cs):
            s.dev.push_used(c.head, 0)
        assert s.vq.collect_used() == 4
        assert all(c.done for c in cs)
    assert s.vq.avail_idx == (4 * (65536 // 4 + 3)) & 0xFFFF == 12
    assert s.vq.last_used_idx == 12
    assert s.dev.used_event() == 12
    # avail_event 0xFFFF was crossed exactly once.
    assert len(s.notified) == 1


def test_completion_repr_and_state():
    c = Completion(5, token="t")
    assert not c.done and "pending" in repr(c)
    c._finish(used_len=3)
    assert c.done and c.returned_by_device and "used 3" in repr(c)


# -- DMA mapping (xen/sim/guest_dma.py) ----------------------------------------


async def test_identity_dma_gives_the_device_guest_physical_addresses():
    s = Setup(size=16)
    assert isinstance(s.vq.dma, IdentityDma) and not s.vq.dma.needs_calls
    assert (s.vq.desc_dma, s.vq.avail_dma, s.vq.used_dma) == (s.vq.desc_gpa, s.vq.avail_gpa, s.vq.used_gpa)
    await s.vq.map_rings()  # nothing to do
    assert s.grants.map_calls == 0


async def test_grant_mode_maps_the_linux_ring_block_once():
    s = Setup(size=256, dma_mode="grant")
    vq = s.vq
    assert vq.desc_dma is None and s.grants.active == 0  # not mapped until map_rings
    await s.ready()
    assert len(s.dma.live) == 1
    (addr, (gpa, length, coherent)), = s.dma.live.items()
    assert coherent and gpa == vq.desc_gpa and length == vq.used_gpa + sr.used_ring_size(256) - vq.desc_gpa
    ref, offset = grant_ref_of(vq.desc_dma)
    assert offset == 0 and s.grants.active == 3  # desc 4 KiB + avail, then the used ring page(s)
    assert vq.avail_dma == vq.desc_dma + (vq.avail_gpa - vq.desc_gpa)
    assert vq.used_dma == vq.desc_dma + (vq.used_gpa - vq.desc_gpa)
    assert s.grants.translate(vq.used_dma, sr.used_ring_size(256), True) == vq.used_gpa
    await s.vq.map_rings()  # idempotent
    assert s.grants.map_calls == 1
    await vq.delete()
    assert s.grants.active == 0 and not s.dma.live
    assert s.alloc.allocation_count == 0


async def test_grant_mode_maps_separate_rings_one_by_one():
    s = await setup("grant", size=16, separate=True)
    assert len(s.dma.live) == 3 and all(entry[2] for entry in s.dma.live.values())
    for addr, gpa in ((s.vq.desc_dma, s.vq.desc_gpa), (s.vq.avail_dma, s.vq.avail_gpa),
                      (s.vq.used_dma, s.vq.used_gpa)):
        assert is_grant_address(addr) and s.grants.translate(addr, 2) == gpa
    await s.vq.delete()
    assert s.grants.active == 0 and s.alloc.allocation_count == 0


async def test_a_multi_page_buffer_gets_consecutive_refs_and_ref_plus_offset():
    s = await setup("grant")
    gpa = s.alloc.allocate(3 * 4096 + 0x200, 4096) + 0x100  # 0x100 into its first page, spans 4 pages
    completion = await s.vq.submit([(gpa, 3 * 4096)], [])
    addr = s.desc(completion.head)[0]
    ref, offset = grant_ref_of(addr)
    assert offset == 0x100
    assert [s.grants.entries[ref + i][0] for i in range(4)] == [(gpa >> 12) + i for i in range(4)]
    assert s.grants.translate(addr, 3 * 4096) == gpa
    s.dev.pop_avail()
    s.dev.push_used(completion.head, 0)
    await s.vq.handle_used()
    assert all(ref + i not in s.grants.entries for i in range(4))
    s.check()


async def test_buffers_are_unmapped_before_the_request_completes():
    s = await setup("grant", indirect=True)
    ring_refs = s.grants.active
    seen = []
    completion = await s.vq.submit([s.buf(16)], [s.buf(512), s.buf(1)])
    assert s.grants.active == ring_refs + 4  # three buffers and the indirect table
    completion.add_done_callback(lambda c: seen.append((s.grants.active, s.alloc.allocation_count)))
    chain = s.dev.pop_avail()[0]
    assert chain.indirect and is_grant_address(chain.table_addr)
    s.ram.write(chain.writable[0][0], b"\x77" * 512)  # the device writes through its translation
    s.dev.push_used(chain.head, 513)
    # collect_used alone takes the chain off the ring but does not complete it...
    assert s.vq.collect_used() == 1
    assert not completion.done and s.vq.num_free == 8 and "to_unmap=1" in repr(s.vq)
    # ...until it is unmapped.
    await s.vq.unmap_returned()
    assert await completion == 513
    assert seen == [(ring_refs, 1 + 3)]  # grants ended and the table freed before the callback
    assert s.ram.read(chain.writable[0][0], 512) == b"\x77" * 512  # the guest reads its RAM by gpa
    with pytest.raises(FakeGrantError):
        s.dev.check_mapped(chain)  # a device touching the buffers now would fault
    s.check()


async def test_reset_while_a_request_is_being_mapped():
    s = await setup("grant")
    gate = trio.Event()
    real_map = s.grants.grant_dma_map

    async def slow_map(gpa, length, **kw):
        await gate.wait()
        return await real_map(gpa, length, **kw)

    s.grants.grant_dma_map = slow_map
    errors = []
    deleted = []

    async def request():
        try:
            await s.vq.submit([s.buf()], [s.buf()])
        except QueueDetached as exc:
            errors.append(exc)

    async def delete():
        await s.vq.delete()
        deleted.append(s.grants.active)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(request)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(delete)
        await trio.testing.wait_all_tasks_blocked()
        assert s.vq.detached and not deleted  # delete waits for the add that is mapping
        gate.set()
    assert len(errors) == 1
    assert deleted == [0]  # when delete returned, nothing was granted any more
    assert s.grants.active == 0 and not s.dma.live
    assert s.ram.read16(s.vq.avail_gpa + sr.AVAIL_IDX) == 0  # never published


async def test_cancelled_submit_keeps_no_orphan_grant():
    s = await setup("grant")
    gate = trio.Event()
    real_map = s.grants.grant_dma_map

    async def slow_map(gpa, length, **kw):
        await gate.wait()
        return await real_map(gpa, length, **kw)

    s.grants.grant_dma_map = slow_map
    result = []
    async with trio.open_nursery() as nursery:
        async def request():
            with trio.CancelScope() as scope:
                result.append(scope)
                result.append(await s.vq.submit([s.buf()], [s.buf()]))

        nursery.start_soon(request)
        await trio.testing.wait_all_tasks_blocked()
        result[0].cancel()  # while the grant requests are in flight: they are shielded
        await trio.testing.wait_all_tasks_blocked()
        gate.set()
    # Whether or not submit returned, every grant is accounted for: the
    # chain was published and is owned by the device until it comes back.
    assert s.vq.in_flight == 1
    for chain in s.dev.pop_avail():
        s.dev.push_used(chain.head, 0)
    await s.vq.handle_used()
    s.check()


async def test_a_failed_map_unmaps_what_it_mapped():
    s = await setup("grant", indirect=True)
    real_map = s.grants.grant_dma_map
    calls = []

    async def failing_map(gpa, length, **kw):
        calls.append(gpa)
        if len(calls) == 3:
            raise RuntimeError("grant table full")
        return await real_map(gpa, length, **kw)

    s.grants.grant_dma_map = failing_map
    allocations = s.alloc.allocation_count
    bufs = [s.buf(), s.buf(), s.buf()]
    with pytest.raises(RuntimeError, match="grant table full"):
        await s.vq.submit(bufs[:1], bufs[1:])
    assert s.vq.num_free == 8 and s.vq.in_flight == 0
    assert s.alloc.allocation_count == allocations + 3  # the indirect table went back
    assert s.ram.read16(s.vq.avail_gpa + sr.AVAIL_IDX) == 0
    s.check()


async def test_a_failed_unmap_is_counted_and_the_request_still_completes():
    s = await setup("grant")
    completion = await s.vq.submit([s.buf()], [])

    async def failing_unmap(addr, length):
        raise RuntimeError("simulator gone")

    s.grants.grant_dma_unmap = failing_unmap
    s.dev.pop_avail()
    s.dev.push_used(completion.head, 0)
    await s.vq.handle_used()
    assert await completion == 0
    assert s.vq.unmap_errors == 1


async def test_a_broken_queue_keeps_its_grants_until_the_queue_is_deleted():
    s = await setup("grant")
    c1 = await s.vq.submit([s.buf()], [s.buf(8)])
    c2 = await s.vq.submit([s.buf()], [s.buf(8)])
    s.dev.pop_avail()
    s.dev.push_used(c1.head, 8)
    s.dev.push_used(99, 0)  # bad id: the queue breaks after c1 came back
    with pytest.raises(DeviceMisbehaved):
        await s.vq.handle_used()
    assert await c1 == 8  # returned before the bad entry: unmapped and completed
    with pytest.raises(DeviceMisbehaved):
        await c2
    ring_refs = s.dma.live_refs(coherent=True)
    assert s.grants.active == ring_refs + 2  # c2's buffers: the device may still write them
    await s.vq.delete()
    assert s.grants.active == 0 and not s.dma.live


async def test_readonly_grants_for_device_readable_buffers_on_request():
    s = Setup(dma_mode="grant")
    s.dma = GrantDma(s.grants, readonly_grants=True)
    s.vq = GuestVirtqueue.create(s.ram, s.alloc, 0, 8, lambda vcpu: trio.lowlevel.checkpoint(), dma=s.dma)
    await s.ready()
    completion = await s.vq.add([s.buf(16)], [s.buf(1)])
    out_addr, in_addr = s.desc(completion.head)[0], s.desc(s.desc(completion.head)[3])[0]
    assert s.grants.entries[grant_ref_of(out_addr)[0]][1] is True  # Linux: DMA_TO_DEVICE is read-only
    assert s.grants.entries[grant_ref_of(in_addr)[0]][1] is False
    with pytest.raises(FakeGrantError, match="read-only"):
        s.grants.translate(out_addr, 16, True)
    # By default (the bridge maps every grant read-write) all are writable.
    default = await setup("grant")
    c = await default.vq.add([default.buf(16)], [default.buf(1)])
    assert default.grants.entries[grant_ref_of(default.desc(c.head)[0])[0]][1] is False
