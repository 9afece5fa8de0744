"""The simulated guest's virtio-mmio transport and virtio-blk drivers against
a register-level fake device (tests/guest_driver_fakes.py)."""

import struct

import pytest
import trio
import trio.testing

from tests.guest_driver_fakes import (
    DMA_MODES,
    IRQ,
    MMIO_BASE,
    FakeBlkBackend,
    FakeGuest,
    FakeMmioDevice,
    FakeRam,
    assert_dma_state,
    blk_config,
)
from xen.sim import virtio_blk as vb
from bridge import virtio_mmio as regs
from xen.sim import virtio_mmio_driver as mmio
from xen.sim.guest_dma import GrantDma
from xen.sim.guest_memory import GuestAllocator, is_grant_address
from xen.sim.guest_virtqueue import DeviceMisbehaved, QueueDetached

MAGIC = regs.MAGIC
VENDOR = 0x554D4551
V1 = 1 << 32
EVENT_IDX = 1 << 29
INDIRECT = 1 << 28


def bits(*numbers):
    value = 0
    for n in numbers:
        value |= 1 << n
    return value


BLK_ALL = V1 | EVENT_IDX | INDIRECT | bits(vb.VIRTIO_BLK_F_SIZE_MAX, vb.VIRTIO_BLK_F_SEG_MAX,
                                           vb.VIRTIO_BLK_F_BLK_SIZE, vb.VIRTIO_BLK_F_FLUSH)


class Rig:
    def __init__(self, nursery=None, *, features=BLK_ALL, capacity=2048, size_max=65536, seg_max=126,
                 blk_size=512, num_queues=1, nvcpus=2, ram=None, backend=True, dma_mode="identity", **device_kw):
        self.guest = FakeGuest(ram, nvcpus=nvcpus)
        self.guest.nursery = nursery
        self.backend = FakeBlkBackend(capacity) if backend else None
        self.dev = FakeMmioDevice(
            self.guest, features=features, handler=self.backend,
            config=blk_config(capacity, size_max=size_max, seg_max=seg_max, blk_size=blk_size,
                              num_queues=num_queues),
            **device_kw,
        )
        self.alloc = GuestAllocator(self.guest.ram.base, self.guest.ram.size)
        self.dma_mode = dma_mode
        self.dma = GrantDma(self.guest) if dma_mode == "grant" else None
        self.t = mmio.VirtioMmioDriver(None, self.guest.ram, self.alloc, MMIO_BASE, IRQ, self.guest,
                                       reset_poll_interval=0.0005, dma=self.dma)

    async def open(self, **kw):
        self.blk = await vb.VirtioBlkDriver.open(self.t, **kw)
        return self.blk

    def check_dma(self):
        """Every address the device saw is right for the mode, and only the
        rings of the live queues are still mapped (one block per queue)."""
        assert_dma_state(self.dma_mode, self.dma, self.guest.grants, self.dev.dma_addrs,
                         ring_blocks=len(self.t.queues))


def probe_log(device_features, negotiated):
    return [
        ("R", "MagicValue", MAGIC),
        ("R", "Version", 2),
        ("R", "DeviceID", 2),
        ("R", "VendorID", VENDOR),
        ("W", "Status", 0),
        ("R", "Status", 0),
        ("R", "Status", 0),
        ("W", "Status", 1),
        ("R", "Status", 1),
        ("W", "Status", 3),
        ("W", "DeviceFeaturesSel", 1),
        ("R", "DeviceFeatures", device_features >> 32),
        ("W", "DeviceFeaturesSel", 0),
        ("R", "DeviceFeatures", device_features & 0xFFFFFFFF),
        ("W", "DriverFeaturesSel", 1),
        ("W", "DriverFeatures", negotiated >> 32),
        ("W", "DriverFeaturesSel", 0),
        ("W", "DriverFeatures", negotiated & 0xFFFFFFFF),
        ("R", "Status", 3),
        ("W", "Status", 11),
        ("R", "Status", 11),
    ]


# -- transport: probe and negotiation ------------------------------------------


async def test_probe_touches_registers_in_linux_order():
    offered = BLK_ALL | bits(34, vb.VIRTIO_BLK_F_DISCARD)  # RING_PACKED and DISCARD are not wanted
    rig = Rig(features=offered)
    await rig.t.probe(vb.DEFAULT_FEATURES)
    assert rig.t.device_features == offered
    assert rig.t.features == BLK_ALL
    assert rig.dev.driver_features == BLK_ALL
    assert rig.dev.log == probe_log(offered, BLK_ALL)
    assert (rig.t.version, rig.t.device_id, rig.t.vendor_id) == (2, 2, VENDOR)
    assert rig.dev.status == 11


async def test_version_1_is_always_accepted():
    rig = Rig(features=V1 | bits(vb.VIRTIO_BLK_F_FLUSH))
    await rig.t.probe(0)
    assert rig.t.features == V1


async def test_device_id_zero_stops_silently_after_three_reads():
    rig = Rig(device_id=0)
    with pytest.raises(mmio.NoDevice):
        await rig.t.probe(vb.DEFAULT_FEATURES)
    assert rig.dev.log == [("R", "MagicValue", MAGIC), ("R", "Version", 2), ("R", "DeviceID", 0)]


@pytest.mark.parametrize("kw, error", [({"magic": 0x12345678}, mmio.NotVirtioMmio),
                                       ({"version": 1}, mmio.UnsupportedVersion),
                                       ({"version": 3}, mmio.UnsupportedVersion),
                                       ({"device_id": 1}, mmio.WrongDevice)])
async def test_unusable_devices_are_not_written(kw, error):
    rig = Rig(**kw)
    with pytest.raises(error):
        await rig.open()
    assert rig.dev.accesses("W") == []


async def test_features_ok_refused_sets_failed():
    rig = Rig(refuse_features=True)
    with pytest.raises(mmio.FeaturesRefused, match="refused"):
        await rig.t.probe(vb.DEFAULT_FEATURES)
    # virtio_features_ok reads Status back; the error path's virtio_add_status reads it again.
    assert rig.dev.log[-5:] == [("R", "Status", 3), ("W", "Status", 11), ("R", "Status", 3),
                                ("R", "Status", 3), ("W", "Status", 0x83)]
    assert rig.dev.status & regs.DeviceStatus.FAILED


async def test_missing_version_1_is_refused_before_writing_features():
    rig = Rig(features=BLK_ALL & ~V1)
    with pytest.raises(mmio.MissingVersion1):
        await rig.t.probe(vb.DEFAULT_FEATURES)
    assert not any(name == "DriverFeatures" for _, name, _ in rig.dev.log)
    assert rig.dev.log[-1] == ("W", "Status", 0x83)


async def test_reset_polls_status_until_zero():
    rig = Rig(reset_delay_reads=3)
    await rig.t.probe(vb.DEFAULT_FEATURES)
    log = rig.dev.log
    first = log.index(("W", "Status", 0))
    assert [entry[0:2] for entry in log[first + 1:first + 5]] == [("R", "Status")] * 4
    assert [entry[2] for entry in log[first + 1:first + 5]][-1] == 0
    assert all(entry[2] for entry in log[first + 1:first + 4])


async def test_reset_that_never_completes_times_out():
    rig = Rig(reset_delay_reads=10**9)
    rig.t.reset_timeout = 0.02
    with pytest.raises(mmio.DeviceTimeout):
        await rig.t.probe(vb.DEFAULT_FEATURES)


# -- transport: config space ---------------------------------------------------


async def test_config_reads_use_the_field_width_and_linux_generation_loop():
    rig = Rig(capacity=0x1_2345_6789)
    await rig.t.probe(vb.DEFAULT_FEATURES)
    rig.dev.clear_log()
    assert await rig.t.read_config(vb.CFG_SEG_MAX, 4) == 126
    assert await rig.t.read_config(vb.CFG_NUM_QUEUES, 2) == 1
    assert await rig.t.read_config(vb.CFG_WRITEBACK, 1) == 0
    assert rig.dev.log == [("R", "Config+0xc/4", 126), ("R", "Config+0x22/2", 1), ("R", "Config+0x20/1", 0)]
    rig.dev.clear_log()
    assert await rig.t.read_config(vb.CFG_CAPACITY, 8) == 0x1_2345_6789
    assert rig.dev.log == [("R", "ConfigGeneration", 0), ("R", "Config+0x0/4", 0x2345_6789),
                           ("R", "Config+0x4/4", 1), ("R", "ConfigGeneration", 0)]
    rig.dev.clear_log()
    assert await rig.t.read_config_bytes(vb.CFG_SIZE_MAX, 3) == (65536).to_bytes(4, "little")[:3]
    assert [name for _, name, _ in rig.dev.log] == ["ConfigGeneration", "Config+0x8/1", "Config+0x9/1",
                                                    "Config+0xa/1", "ConfigGeneration"]
    rig.dev.clear_log()
    assert await rig.t.read_config(vb.CFG_SEG_MAX, 4, generation_loop=True) == 126
    assert len(rig.dev.log) == 3
    with pytest.raises(ValueError):
        await rig.t.read_config(1, 4)
    with pytest.raises(ValueError):
        await rig.t.read_config(0, 3)


async def test_64_bit_config_read_retries_when_generation_moves():
    rig = Rig(capacity=0x0000_0001_FFFF_FFFF)
    await rig.t.probe(vb.DEFAULT_FEATURES)
    rig.dev.clear_log()
    calls = []

    def hook(off, size):
        # The device grows the disk between the low and the high half.
        if off == 4 and not calls:
            calls.append(1)
            rig.dev.set_config(0, struct.pack("<Q", 0x0000_0002_0000_0000))

    rig.dev.config_read_hook = hook
    assert await rig.t.read_config(vb.CFG_CAPACITY, 8) == 0x2_0000_0000  # never the torn 0x2_FFFF_FFFF
    assert rig.dev.log == [
        ("R", "ConfigGeneration", 0), ("R", "Config+0x0/4", 0xFFFF_FFFF), ("R", "Config+0x4/4", 2),
        ("R", "ConfigGeneration", 1), ("R", "Config+0x0/4", 0), ("R", "Config+0x4/4", 2),
        ("R", "ConfigGeneration", 1),
    ]


async def test_config_writes_use_the_field_width():
    rig = Rig()
    await rig.t.probe(vb.DEFAULT_FEATURES)
    rig.dev.clear_log()
    await rig.t.write_config(vb.CFG_WRITEBACK, 1, 1)
    await rig.t.write_config(40, 8, 0x1122334455667788)
    assert rig.dev.log == [("W", "Config+0x20/1", 1), ("W", "Config+0x28/4", 0x55667788),
                           ("W", "Config+0x2c/4", 0x11223344)]


# -- transport: queues -------------------------------------------------------


async def test_setup_queue_register_order_and_addresses_above_4g():
    ram = FakeRam(base=0x1_0000_0000)
    rig = Rig(ram=ram, queue_num_max=(100, 64))
    await rig.t.probe(vb.DEFAULT_FEATURES)
    rig.dev.clear_log()
    vq = await rig.t.setup_queue(0)
    assert vq.size == 64  # largest power of two <= QueueNumMax 100
    assert rig.dev.log == [
        ("W", "QueueSel", 0), ("R", "QueueReady", 0), ("R", "QueueNumMax", 100), ("W", "QueueNum", 64),
        ("W", "QueueDescLow", vq.desc_gpa & 0xFFFFFFFF), ("W", "QueueDescHigh", 1),
        ("W", "QueueDriverLow", vq.avail_gpa & 0xFFFFFFFF), ("W", "QueueDriverHigh", 1),
        ("W", "QueueDeviceLow", vq.used_gpa & 0xFFFFFFFF), ("W", "QueueDeviceHigh", 1),
        ("W", "QueueReady", 1),
    ]
    assert vq.desc_gpa >> 32 == 1
    q1 = await rig.t.setup_queue(1, 16)
    assert q1.size == 16
    regs = rig.dev.queues[1]
    assert (regs.num, regs.desc, regs.driver, regs.device, regs.ready) == (16, q1.desc_gpa, q1.avail_gpa,
                                                                          q1.used_gpa, 1)
    with pytest.raises(mmio.QueueUnavailable, match="no queue 2"):
        await rig.t.setup_queue(2)


async def test_setup_queue_refuses_a_live_queue():
    rig = Rig()
    rig.dev.queue_ready_preset.add(0)
    await rig.t.probe(vb.DEFAULT_FEATURES)
    allocations = rig.alloc.allocation_count
    with pytest.raises(mmio.QueueUnavailable, match="already live"):
        await rig.t.setup_queue(0)
    assert rig.alloc.allocation_count == allocations


@pytest.mark.parametrize("dma_mode", DMA_MODES)
async def test_reset_tears_down_queues_and_device_can_be_probed_again(nursery, dma_mode):
    rig = Rig(nursery, hold=True, dma_mode=dma_mode)
    blk = await rig.open()
    assert rig.alloc.allocation_count == 1
    results = []

    async def reader():
        try:
            await blk.read(0, 512)
        except QueueDetached as exc:
            results.append(exc)

    async with trio.open_nursery() as inner:
        inner.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert rig.dev.pending[0]
        rig.dev.clear_log()
        await rig.t.reset()
    assert len(results) == 1
    assert rig.dev.log == [("W", "Status", 0), ("R", "Status", 0), ("W", "QueueSel", 0), ("W", "QueueReady", 0),
                           ("R", "QueueReady", 0)]
    assert rig.t.queues == {} and rig.alloc.allocation_count == 0
    rig.check_dma()  # not even the rings are mapped after a reset
    assert await rig.t.status() == 0
    rig.dev.hold = False
    blk = await rig.open()
    await blk.write(8, b"\x5a" * 512)
    assert await blk.read(8, 512) == b"\x5a" * 512
    rig.check_dma()
    await blk.close()
    rig.check_dma()


# -- transport: interrupts ---------------------------------------------------


async def test_interrupt_handler_reads_status_acks_then_collects(nursery):
    rig = Rig(nursery, hold=True)
    blk = await rig.open()
    async with trio.open_nursery() as inner:
        inner.start_soon(blk.read, 0, 512)
        await trio.testing.wait_all_tasks_blocked()
        rig.dev.clear_log()
        rig.dev.serve(0)
    assert rig.dev.log[:2] == [("R", "InterruptStatus", 1), ("W", "InterruptACK", 1)]
    assert rig.t.interrupts_handled == 1


async def test_two_completions_close_together_are_both_noticed(nursery):
    # Without EVENT_IDX, so the device signals every used buffer and only the
    # edge-triggered line decides what the guest sees.
    rig = Rig(nursery, hold=True, features=BLK_ALL & ~EVENT_IDX)
    blk = await rig.open()
    dev = rig.dev
    original_read = dev.mmio_read
    original_write = dev.mmio_write
    late = []

    def read_hook(offset, size, vcpu):
        value = original_read(offset, size, vcpu)
        if offset == regs.INTERRUPT_STATUS and late == ["between"]:
            # Second completion between InterruptStatus and InterruptACK:
            # the line is still high, so there is no new edge.
            late.append("done")
            dev.serve(0, [dev.pending[0].pop()])
        return value

    def write_hook(offset, size, value, vcpu):
        original_write(offset, size, value, vcpu)
        if offset == regs.INTERRUPT_ACK and late == ["after"]:
            # Second completion right after the ACK lowered the line: a fresh
            # edge, latched while the handler is still running.
            late.append("done")
            dev.serve(0, [dev.pending[0].pop()])

    dev.mmio_read = read_hook
    dev.mmio_write = write_hook
    for when, edges, runs in (("between", 1, 1), ("after", 2, 2)):
        late[:] = [when]
        results = []
        edges_before, runs_before = dev.edges, rig.guest.handler_runs.get(IRQ, 0)

        async def reader(sector):
            results.append(await blk.read(sector, 512))

        async with trio.open_nursery() as inner:
            inner.start_soon(reader, 1)
            inner.start_soon(reader, 2)
            await trio.testing.wait_all_tasks_blocked()
            assert len(dev.pending[0]) == 2
            dev.serve(0, [dev.pending[0].pop(0)])
        assert late == [when, "done"] and len(results) == 2
        assert dev.edges - edges_before == edges
        assert rig.guest.handler_runs[IRQ] - runs_before == runs
        assert blk.queues[0].in_flight == 0


async def test_config_change_interrupt(nursery):
    rig = Rig(nursery, capacity=100)
    blk = await rig.open()
    assert blk.capacity == 100
    seen = rig.t.config_changes
    rig.dev.set_config(0, struct.pack("<Q", 300), interrupt=True)
    assert await rig.t.wait_config_change(seen) == seen + 1
    await trio.testing.wait_all_tasks_blocked()
    assert blk.capacity == 300 and blk.capacity_bytes == 300 * 512


async def test_needs_reset():
    rig = Rig()
    await rig.t.probe(vb.DEFAULT_FEATURES)
    assert not await rig.t.needs_reset()
    rig.dev.status |= regs.DeviceStatus.DEVICE_NEEDS_RESET
    assert await rig.t.needs_reset()


@pytest.mark.parametrize("dma_mode", DMA_MODES)
async def test_misbehaving_device_fails_the_request(nursery, dma_mode):
    rig = Rig(nursery, hold=True, dma_mode=dma_mode)
    blk = await rig.open()
    errors = []

    async def reader():
        try:
            await blk.read(0, 512)
        except DeviceMisbehaved as exc:
            errors.append(exc)

    async with trio.open_nursery() as inner:
        inner.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        rig.dev.complete(0, 200, 1)  # id out of range
    assert len(errors) == 1 and len(rig.t.irq_errors) == 1
    with pytest.raises(DeviceMisbehaved):
        await blk.read(0, 512)
    if dma_mode == "grant":
        # The device may still write the request it never returned: header, data, status, table.
        assert len(rig.dma.live) == 1 + 4
    await rig.t.reset()
    rig.check_dma()  # after the reset it cannot: nothing stays mapped


# -- virtio-blk ----------------------------------------------------------------


async def test_open_negotiates_reads_config_and_sets_driver_ok(nursery):
    rig = Rig(nursery, capacity=4096, size_max=8192, seg_max=16, blk_size=4096)
    blk = await rig.open()
    assert rig.t.features == BLK_ALL
    assert (blk.capacity, blk.capacity_bytes, blk.block_size) == (4096, 4096 * 512, 4096)
    assert (blk.size_max, blk.seg_max, blk.max_segments, blk.max_segment_size) == (8192, 16, 16, 8192)
    assert blk.max_request_bytes == 16 * 8192  # seg_max * size_max < DEFAULT_MAX_SECTORS
    assert not blk.read_only and blk.has_flush
    assert rig.dev.status == 15
    after_probe = [name for _, name, _ in rig.dev.log[len(probe_log(BLK_ALL, BLK_ALL)):]]
    assert after_probe == [
        "Config+0xc/4",  # seg_max
        "QueueSel", "QueueReady", "QueueNumMax", "QueueNum", "QueueDescLow", "QueueDescHigh",
        "QueueDriverLow", "QueueDriverHigh", "QueueDeviceLow", "QueueDeviceHigh", "QueueReady",
        "Config+0x8/4",  # size_max
        "Config+0x14/4",  # blk_size
        "ConfigGeneration", "Config+0x0/4", "Config+0x4/4", "ConfigGeneration",  # capacity
        "Status", "Status",  # DRIVER_OK
    ]
    assert rig.dev.log[-1] == ("W", "Status", 15)


@pytest.mark.parametrize("dma_mode", DMA_MODES)
async def test_request_headers_and_chain_shapes(nursery, dma_mode):
    rig = Rig(nursery, features=BLK_ALL & ~INDIRECT, dma_mode=dma_mode)
    blk = await rig.open()
    await blk.write(7, bytes(range(256)) * 4)
    await blk.read(7, 1024)
    await blk.flush()
    await blk.get_id()
    records = rig.backend.requests
    assert [(r.type, r.reserved, r.sector, r.header_len) for r in records] == [
        (vb.VIRTIO_BLK_T_OUT, 0, 7, 16), (vb.VIRTIO_BLK_T_IN, 0, 7, 16),
        (vb.VIRTIO_BLK_T_FLUSH, 0, 0, 16), (vb.VIRTIO_BLK_T_GET_ID, 0, 0, 16),
    ]
    assert [(r.out_segments, r.in_segments) for r in records] == [
        ([1024], [1]), ([], [1024, 1]), ([], [1]), ([], [20, 1]),
    ]
    assert not any(r.indirect for r in records)
    assert rig.backend.flushes == 1
    rig.check_dma()
    assert vb.OUTHDR.pack(vb.VIRTIO_BLK_T_IN, 0, 7) == struct.pack("<IIQ", 0, 0, 7)


@pytest.mark.parametrize("dma_mode", DMA_MODES)
async def test_write_then_read_back(nursery, dma_mode):
    rig = Rig(nursery, dma_mode=dma_mode)
    blk = await rig.open()
    data = bytes((i * 7) & 0xFF for i in range(8192))
    await blk.write(100, data)
    assert rig.backend.disk[100 * 512:100 * 512 + 8192] == data
    assert await blk.read(100, 8192) == data
    assert await blk.read(99, 512) == bytes(512)
    assert rig.backend.requests[0].indirect
    rig.check_dma()


async def test_segments_honour_size_max_and_seg_max(nursery):
    rig = Rig(nursery, size_max=1024, seg_max=4)
    blk = await rig.open()
    assert blk.max_request_bytes == 4096
    await blk.write(0, b"\x01" * 8192)
    assert sorted((r.sector, r.out_segments) for r in rig.backend.requests) == [(0, [1024] * 4), (8, [1024] * 4)]
    rig.backend.requests.clear()
    await blk.read(0, 2560)
    assert [r.in_segments for r in rig.backend.requests] == [[1024, 1024, 512, 1]]
    assert await blk.read(0, 8192) == b"\x01" * 8192


async def test_size_max_not_a_sector_multiple(nursery):
    rig = Rig(nursery, size_max=1000, seg_max=3)
    blk = await rig.open()
    assert blk.max_request_bytes == 2560
    await blk.write(0, b"\x02" * 2560)
    assert rig.backend.requests[0].out_segments == [1000, 1000, 560]
    assert await blk.read(0, 2560) == b"\x02" * 2560


async def test_size_max_zero_means_the_default_segment_size(nursery):
    # What qemu-storage-daemon's vhost-user-blk export reports.
    rig = Rig(nursery, size_max=0, seg_max=126)
    blk = await rig.open()
    assert blk.size_max == 0 and blk.max_segment_size == vb.DEFAULT_SEGMENT_SIZE
    await blk.write(0, b"\x05" * 196608)
    assert rig.backend.requests[0].out_segments == [65536] * 3


async def test_without_seg_max_one_segment_per_request(nursery):
    rig = Rig(nursery, features=BLK_ALL & ~bits(vb.VIRTIO_BLK_F_SEG_MAX), size_max=4096)
    blk = await rig.open()
    await blk.write(0, b"\x03" * 12288)
    assert sorted((r.sector, r.out_segments) for r in rig.backend.requests) == [
        (0, [4096]), (8, [4096]), (16, [4096])]


async def test_segments_fit_the_queue_and_the_override(nursery):
    rig = Rig(nursery, seg_max=64, queue_num_max=(8,))
    blk = await rig.open(max_segment_size=512)
    assert blk.max_segments == 6 and blk.max_request_bytes == 3072
    await blk.write(0, b"\x04" * 3072)
    assert rig.backend.requests[0].out_segments == [512] * 6


async def test_read_only_device(nursery):
    rig = Rig(nursery, features=BLK_ALL | bits(vb.VIRTIO_BLK_F_RO))
    blk = await rig.open()
    assert blk.read_only
    with pytest.raises(vb.BlkReadOnly):
        await blk.write(0, bytes(512))
    assert rig.backend.requests == []
    await blk.read(0, 512)


async def test_error_statuses_raise_blk_io_error(nursery):
    rig = Rig(nursery)
    blk = await rig.open()
    baseline = rig.alloc.allocation_count
    rig.backend.force_status = vb.VIRTIO_BLK_S_IOERR
    with pytest.raises(vb.BlkIoError, match="IOERR") as info:
        await blk.read(3, 512)
    assert (info.value.status, info.value.req_type, info.value.sector) == (1, 0, 3)
    rig.backend.force_status = None
    with pytest.raises(vb.BlkIoError) as info:
        await blk.request(99, 0)
    assert info.value.status == vb.VIRTIO_BLK_S_UNSUPP
    # The device is told nothing about the range check; the raw path can provoke it.
    with pytest.raises(vb.BlkIoError) as info:
        await blk.request(vb.VIRTIO_BLK_T_IN, blk.capacity, in_len=512)
    assert info.value.status == vb.VIRTIO_BLK_S_IOERR
    assert rig.alloc.allocation_count == baseline


async def test_status_byte_never_written(nursery):
    rig = Rig(nursery, backend=False)
    rig.dev.handler = lambda dev, queue, chain: 0
    blk = await rig.open()
    with pytest.raises(vb.BlkIoError, match="not written"):
        await blk.flush()


async def test_get_id_is_trimmed(nursery):
    rig = Rig(nursery)
    blk = await rig.open()
    rig.backend.serial = b"serial-1"
    assert await blk.get_id() == b"serial-1"
    rig.backend.serial = b"0123456789abcdefghij"
    assert await blk.get_id() == b"0123456789abcdefghij"


async def test_flush_without_the_feature_sends_nothing(nursery):
    rig = Rig(nursery, features=BLK_ALL & ~bits(vb.VIRTIO_BLK_F_FLUSH))
    blk = await rig.open()
    await blk.flush()
    assert rig.backend.requests == []


async def test_range_checks(nursery):
    rig = Rig(nursery, capacity=16)
    blk = await rig.open()
    with pytest.raises(ValueError, match="beyond the capacity"):
        await blk.read(15, 1024)
    with pytest.raises(ValueError, match="multiple of 512"):
        await blk.read(0, 100)
    with pytest.raises(ValueError):
        await blk.write(-1, bytes(512))
    await blk.read(15, 512)


@pytest.mark.parametrize("dma_mode", DMA_MODES)
@pytest.mark.parametrize("features, max_chains", [(BLK_ALL & ~INDIRECT, 2), (BLK_ALL, 8)])
async def test_many_requests_in_flight(nursery, features, max_chains, dma_mode):
    rig = Rig(nursery, features=features, hold=True, queue_num_max=(8,), dma_mode=dma_mode)
    blk = await rig.open()
    baseline = rig.alloc.allocation_count
    for sector in range(40):
        rig.backend.disk[sector * 512:(sector + 1) * 512] = bytes([sector]) * 512
    results = {}
    peak = 0

    async def reader(sector):
        results[sector] = await blk.read(sector, 512)

    async with trio.open_nursery() as inner:
        for sector in range(40):
            inner.start_soon(reader, sector)
        while len(results) < 40:
            await trio.testing.wait_all_tasks_blocked()
            peak = max(peak, blk.queues[0].in_flight)
            rig.dev.serve(0, list(reversed(rig.dev.pending.get(0, []))))
            rig.dev.pending[0] = []
    assert peak == max_chains
    assert results == {s: bytes([s]) * 512 for s in range(40)}
    assert rig.alloc.allocation_count == baseline
    assert blk.queues[0].num_free == 8
    rig.check_dma()


@pytest.mark.parametrize("dma_mode", DMA_MODES)
async def test_cancelled_request_keeps_buffers_until_the_device_returns_them(nursery, dma_mode):
    rig = Rig(nursery, hold=True, dma_mode=dma_mode)
    blk = await rig.open()
    baseline = rig.alloc.allocation_count
    with trio.move_on_after(0.01):
        await blk.read(0, 4096)
    assert rig.alloc.allocation_count == baseline + 3  # header/status, data, indirect table
    if dma_mode == "grant":
        assert len(rig.dma.live) == 1 + 4  # and still granted: header, data, status, table
    rig.dev.serve(0)  # checks the grants are still there as the device uses them
    await trio.testing.wait_all_tasks_blocked()
    assert rig.alloc.allocation_count == baseline
    rig.check_dma()


@pytest.mark.parametrize("dma_mode", DMA_MODES)
async def test_multiqueue_maps_vcpus_to_queues(nursery, dma_mode):
    rig = Rig(nursery, features=BLK_ALL | bits(vb.VIRTIO_BLK_F_MQ), num_queues=4, queue_num_max=(64,) * 4,
              nvcpus=2, dma_mode=dma_mode)
    blk = await rig.open(queue_size=32)
    assert blk.device_num_queues == 4 and len(blk.queues) == 2
    assert [vq.size for vq in blk.queues] == [32, 32]
    v0, v1 = rig.guest.vcpus
    await blk.write(0, b"\x09" * 512, vcpu=v1)
    assert await blk.read(0, 512, vcpu=v0) == b"\x09" * 512
    assert [r.queue for r in rig.backend.requests] == [1, 0]
    assert rig.dev.notifies == [(1, 1), (0, 0)]
    rig.check_dma()


async def test_mq_with_zero_queues_fails_the_device():
    rig = Rig(features=BLK_ALL | bits(vb.VIRTIO_BLK_F_MQ), num_queues=0)
    with pytest.raises(vb.VirtioBlkError, match="num_queues is 0"):
        await rig.open()
    assert rig.dev.status & regs.DeviceStatus.FAILED


async def test_event_idx_interrupts_only_when_asked(nursery):
    rig = Rig(nursery)
    blk = await rig.open()
    for sector in range(5):
        await blk.read(sector, 512)
    ring = rig.dev.ring(0)
    assert ring.used_event() == 5 == blk.queues[0].last_used_idx
    assert rig.t.interrupts_handled == 5


# -- grant mode (xen-grant-dma-ops) --------------------------------------------


async def test_grant_mode_programs_the_queue_registers_with_grant_addresses():
    rig = Rig(dma_mode="grant", queue_num_max=(64,))
    await rig.t.probe(vb.DEFAULT_FEATURES)
    rig.dev.clear_log()
    vq = await rig.t.setup_queue(0)
    assert [name for _, name, _ in rig.dev.log] == [
        "QueueSel", "QueueReady", "QueueNumMax", "QueueNum", "QueueDescLow", "QueueDescHigh",
        "QueueDriverLow", "QueueDriverHigh", "QueueDeviceLow", "QueueDeviceHigh", "QueueReady",
    ]
    regs_ = rig.dev.queues[0]
    assert (regs_.desc, regs_.driver, regs_.device) == (vq.desc_dma, vq.avail_dma, vq.used_dma)
    assert all(is_grant_address(a) for a in (regs_.desc, regs_.driver, regs_.device))
    high = [value for _, name, value in rig.dev.log if name.endswith("High")]
    assert all(value & 0x8000_0000 for value in high)  # bit 63 is in the high word
    # The device finds the rings through the grants.
    ring = rig.dev.ring(0)
    assert (ring.desc, ring.avail, ring.used) == (vq.desc_gpa, vq.avail_gpa, vq.used_gpa)
    assert rig.guest.grants.active == rig.dma.live_refs(coherent=True) > 0


async def test_grant_mode_failed_queue_setup_unmaps_the_rings():
    rig = Rig(dma_mode="grant")
    await rig.t.probe(vb.DEFAULT_FEATURES)
    original = rig.dev.mmio_write

    def refuse(offset, size, value, vcpu):
        if offset == regs.QUEUE_DEVICE_HIGH:
            raise RuntimeError("bus error")
        original(offset, size, value, vcpu)

    rig.dev.mmio_write = refuse
    with pytest.raises(RuntimeError, match="bus error"):
        await rig.t.setup_queue(0)
    assert rig.guest.grants.active == 0 and not rig.dma.live and rig.alloc.allocation_count == 0


async def test_grant_mode_serial_and_flush(nursery):
    rig = Rig(nursery, dma_mode="grant")
    blk = await rig.open()
    assert await blk.get_id() == b"fake-blk-0001"
    await blk.flush()
    assert rig.backend.flushes == 1
    rig.check_dma()
    # One grant call per buffer and per table, each ended again.
    grants = rig.guest.grants
    assert grants.map_calls - 1 == grants.unmap_calls
