"""The virtio-mmio v2 register model against virtio 1.2 section 4.2 and Linux's
drivers/virtio/virtio_mmio.c (see /work/shared/docs/virtio-mmio.md)."""

from __future__ import annotations

import copy
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge import virtio_mmio as vm
from bridge.split_ring import (
    avail_ring_size,
    desc_table_size,
    is_valid_queue_size,
)
from bridge.virtio_mmio import (
    CONFIG_OFFSET,
    ConfigWrite,
    DeviceStatus,
    DriverOk,
    GuestAccessError,
    InterruptAck,
    Kick,
    QueueEnable,
    QueueReset,
    QueueState,
    Reset,
    VirtioMmioModel,
)

ACK = int(DeviceStatus.ACKNOWLEDGE)
DRIVER = int(DeviceStatus.DRIVER)
FEATURES_OK = int(DeviceStatus.FEATURES_OK)
DRIVER_OK = int(DeviceStatus.DRIVER_OK)
NEEDS_RESET = int(DeviceStatus.DEVICE_NEEDS_RESET)
FAILED = int(DeviceStatus.FAILED)

F_VERSION_1 = 1 << 32
F_RING_RESET = 1 << 40
F_NOTIFICATION_DATA = 1 << 38
F_RING_PACKED = 1 << 34
F_EVENT_IDX = 1 << 29
F_INDIRECT = 1 << 28
F_BLK_SEG_MAX = 1 << 2
F_BLK_FLUSH = 1 << 9

DEVICE_FEATURES = (
    F_VERSION_1 | F_EVENT_IDX | F_INDIRECT | F_BLK_SEG_MAX | F_BLK_FLUSH | F_RING_RESET
)
# What a Linux driver that does not know RING_RESET would accept.
LINUX_FEATURES = F_VERSION_1 | F_EVENT_IDX | F_INDIRECT | F_BLK_SEG_MAX | F_BLK_FLUSH

# A virtio-blk-like config: capacity (le64), size_max (le32), seg_max (le32),
# geometry (le16 cylinders, u8 heads, u8 sectors), blk_size (le32), pad.
CAPACITY = 0x0000_0012_3456_789A
CONFIG = struct.pack("<QIIHBBI", CAPACITY, 0x1000, 126, 0x1234, 0x56, 0x78, 512) + bytes(8)

QUEUE_SIZES = (256, 128)
PAGE = 4096
RAM = 0x4000_0000  # GUEST_RAM0_BASE on Xen/Arm
# The Low halves of the descriptor table, available ring and used ring addresses.
ADDR_LOWS = (vm.QUEUE_DESC_LOW, vm.QUEUE_DRIVER_LOW, vm.QUEUE_DEVICE_LOW)


def make(
    *,
    features: int = DEVICE_FEATURES,
    queues: tuple[int, ...] = QUEUE_SIZES,
    config: bytes = CONFIG,
    writable: bool = True,
) -> VirtioMmioModel:
    return VirtioMmioModel(
        device_id=2,
        vendor_id=0x554D4551,
        device_features=features,
        queue_num_max=queues,
        config=config,
        config_writable=writable,
    )


def snapshot(m: VirtioMmioModel) -> dict:
    return copy.deepcopy(vars(m))


def rd(m: VirtioMmioModel, off: int) -> int:
    return m.read(off, 4)


def wr(m: VirtioMmioModel, off: int, value: int) -> tuple:
    return m.write(off, 4, value)


def assert_rejected(m: VirtioMmioModel, op, *args) -> None:
    before = snapshot(m)
    with pytest.raises(GuestAccessError):
        op(*args)
    assert snapshot(m) == before


def ring_layout(index: int, num: int) -> tuple[int, int, int]:
    """Where Linux's vring_create_virtqueue puts a split ring (VRING_ALIGN = PAGE)."""
    desc = RAM + index * 0x10_0000
    avail = desc + desc_table_size(num)
    used = (avail + avail_ring_size(num) + PAGE - 1) // PAGE * PAGE
    return desc, avail, used


def add_status(m: VirtioMmioModel, bit: int) -> tuple:
    """Linux virtio_add_status: read-modify-write."""
    return wr(m, vm.STATUS, rd(m, vm.STATUS) | bit)


def negotiate(m: VirtioMmioModel, features: int) -> None:
    wr(m, vm.STATUS, 0)
    add_status(m, ACK)
    add_status(m, DRIVER)
    wr(m, vm.DRIVER_FEATURES_SEL, 1)
    wr(m, vm.DRIVER_FEATURES, features >> 32)
    wr(m, vm.DRIVER_FEATURES_SEL, 0)
    wr(m, vm.DRIVER_FEATURES, features & 0xFFFF_FFFF)
    assert add_status(m, FEATURES_OK) == ()
    assert rd(m, vm.STATUS) & FEATURES_OK


def program_queue(m: VirtioMmioModel, index: int, num: int) -> tuple[tuple[int, int, int], tuple]:
    """Linux vm_setup_vq after QueueSel, up to and including QueueReady=1."""
    desc, avail, used = ring_layout(index, num)
    wr(m, vm.QUEUE_SEL, index)
    assert rd(m, vm.QUEUE_READY) == 0
    assert rd(m, vm.QUEUE_NUM_MAX) == QUEUE_SIZES[index]
    assert wr(m, vm.QUEUE_NUM, num) == ()
    for low, addr in zip(ADDR_LOWS, (desc, avail, used)):
        assert wr(m, low, addr & 0xFFFF_FFFF) == ()
        assert wr(m, low + 4, addr >> 32) == ()
    effects = wr(m, vm.QUEUE_READY, 1)
    return (desc, avail, used), effects


def running(features: int = LINUX_FEATURES, **kw) -> VirtioMmioModel:
    m = make(**kw)
    negotiate(m, features)
    for i, n in enumerate(m.queues):
        program_queue(m, i, n.num_max)
    assert add_status(m, DRIVER_OK) == (DriverOk(),)
    return m


# ------------------------------------------------------------------ probe


def test_linux_probe_sequence_step_by_step():
    m = make()

    # 1. identity
    assert rd(m, vm.MAGIC_VALUE) == 0x74726976
    assert rd(m, vm.VERSION_REG) == 2
    assert rd(m, vm.DEVICE_ID) == 2
    assert rd(m, vm.VENDOR_ID) == 0x554D4551

    # 2. reset (a fresh device: no effect), ACKNOWLEDGE, DRIVER
    assert wr(m, vm.STATUS, 0) == ()
    assert rd(m, vm.STATUS) == 0
    assert add_status(m, ACK) == ()
    assert rd(m, vm.STATUS) == ACK
    assert add_status(m, DRIVER) == ()
    assert rd(m, vm.STATUS) == ACK | DRIVER

    # 3. features: high word first, as vm_get_features does
    assert wr(m, vm.DEVICE_FEATURES_SEL, 1) == ()
    hi = rd(m, vm.DEVICE_FEATURES)
    assert hi == DEVICE_FEATURES >> 32 == 0x101
    assert wr(m, vm.DEVICE_FEATURES_SEL, 0) == ()
    lo = rd(m, vm.DEVICE_FEATURES)
    assert lo == DEVICE_FEATURES & 0xFFFF_FFFF
    offered = hi << 32 | lo
    accepted = offered & LINUX_FEATURES
    assert wr(m, vm.DRIVER_FEATURES_SEL, 1) == ()
    assert wr(m, vm.DRIVER_FEATURES, accepted >> 32) == ()
    assert wr(m, vm.DRIVER_FEATURES_SEL, 0) == ()
    assert wr(m, vm.DRIVER_FEATURES, accepted & 0xFFFF_FFFF) == ()
    assert add_status(m, FEATURES_OK) == ()
    assert rd(m, vm.STATUS) == ACK | DRIVER | FEATURES_OK
    assert m.driver_features == accepted

    # 4. config between two generation reads
    gen = rd(m, vm.CONFIG_GENERATION)
    capacity = m.read(CONFIG_OFFSET, 4) | m.read(CONFIG_OFFSET + 4, 4) << 32
    seg_max = m.read(CONFIG_OFFSET + 12, 4)
    blk_size = m.read(CONFIG_OFFSET + 20, 4)
    assert rd(m, vm.CONFIG_GENERATION) == gen
    assert (capacity, seg_max, blk_size) == (CAPACITY, 126, 512)

    # 5. queues
    for i, num in enumerate(QUEUE_SIZES):
        (desc, avail, used), effects = program_queue(m, i, num)
        assert effects == ()  # DRIVER_OK is not set yet: nothing to start
        q = m.queues[i]
        assert (q.num, q.desc, q.driver, q.device, q.ready) == (num, desc, avail, used, True)
        assert rd(m, vm.QUEUE_READY) == 1
    # One past the last queue is "not available".
    wr(m, vm.QUEUE_SEL, len(QUEUE_SIZES))
    assert rd(m, vm.QUEUE_READY) == 0
    assert rd(m, vm.QUEUE_NUM_MAX) == 0

    # 6. DRIVER_OK starts the device, once
    assert add_status(m, DRIVER_OK) == (DriverOk(),)
    assert rd(m, vm.STATUS) == ACK | DRIVER | FEATURES_OK | DRIVER_OK
    assert m.ready_queues() == [0, 1]
    assert add_status(m, DRIVER_OK) == ()

    # 7. I/O: kick, complete, interrupt handler
    assert wr(m, vm.QUEUE_NOTIFY, 0) == (Kick(0),)
    assert wr(m, vm.QUEUE_NOTIFY, 1) == (Kick(1),)
    assert m.raise_interrupt(vm.INT_VRING) is True
    status = rd(m, vm.INTERRUPT_STATUS)
    assert status == vm.INT_VRING
    assert wr(m, vm.INTERRUPT_ACK, status) == (InterruptAck(0),)
    assert rd(m, vm.INTERRUPT_STATUS) == 0

    # 8. removal: reset, Status reads 0, then vm_del_vq per queue
    assert wr(m, vm.STATUS, 0) == (Reset(),)
    assert rd(m, vm.STATUS) == 0
    for i in range(len(QUEUE_SIZES)):
        wr(m, vm.QUEUE_SEL, i)
        assert wr(m, vm.QUEUE_READY, 0) == ()
        assert rd(m, vm.QUEUE_READY) == 0
    assert m.ready_queues() == []


def test_device_id_zero_placeholder_reads_zero():
    m = VirtioMmioModel(
        device_id=0, vendor_id=0, device_features=F_VERSION_1, queue_num_max=(), config=b""
    )
    assert rd(m, vm.MAGIC_VALUE) == vm.MAGIC
    assert rd(m, vm.DEVICE_ID) == 0


# ------------------------------------------------------------------ features


def test_feature_selectors():
    m = make(features=F_VERSION_1 | 0x8000_0001 | 1 << 63)
    wr(m, vm.DEVICE_FEATURES_SEL, 0)
    assert rd(m, vm.DEVICE_FEATURES) == 0x8000_0001
    wr(m, vm.DEVICE_FEATURES_SEL, 1)
    assert rd(m, vm.DEVICE_FEATURES) == 0x8000_0001
    for sel in (2, 3, 0xFFFF_FFFF):
        wr(m, vm.DEVICE_FEATURES_SEL, sel)
        assert rd(m, vm.DEVICE_FEATURES) == 0


def test_device_features_sel_defaults_to_zero():
    m = make()
    assert rd(m, vm.DEVICE_FEATURES) == DEVICE_FEATURES & 0xFFFF_FFFF


def test_driver_features_assembled_from_words():
    m = make()
    wr(m, vm.DRIVER_FEATURES_SEL, 1)
    wr(m, vm.DRIVER_FEATURES, 1)
    wr(m, vm.DRIVER_FEATURES_SEL, 0)
    wr(m, vm.DRIVER_FEATURES, F_EVENT_IDX)
    assert m.driver_features == F_VERSION_1 | F_EVENT_IDX
    wr(m, vm.DRIVER_FEATURES, 0)  # overwrite word 0 only
    assert m.driver_features == F_VERSION_1


def _to_driver(m, status=ACK | DRIVER):
    wr(m, vm.STATUS, ACK)
    if status & DRIVER:
        wr(m, vm.STATUS, ACK | DRIVER)


def _write_features(m, features):
    wr(m, vm.DRIVER_FEATURES_SEL, 1)
    wr(m, vm.DRIVER_FEATURES, features >> 32 & 0xFFFF_FFFF)
    wr(m, vm.DRIVER_FEATURES_SEL, 0)
    wr(m, vm.DRIVER_FEATURES, features & 0xFFFF_FFFF)


@pytest.mark.parametrize(
    "features",
    [
        LINUX_FEATURES | 1 << 5,  # a bit the device did not offer
        LINUX_FEATURES & ~F_VERSION_1,  # version 2 requires VERSION_1
        0,
        1 << 63,
    ],
    ids=["not-offered", "no-version-1", "nothing", "high-bit-not-offered"],
)
def test_features_ok_refused_does_not_stick(features):
    m = make()
    _to_driver(m)
    _write_features(m, features)
    assert add_status(m, FEATURES_OK) == ()  # refusal is not an error
    assert rd(m, vm.STATUS) == ACK | DRIVER
    # The driver may fix its choice and try again.
    _write_features(m, LINUX_FEATURES)
    assert add_status(m, FEATURES_OK) == ()
    assert rd(m, vm.STATUS) == ACK | DRIVER | FEATURES_OK


def test_refused_features_ok_still_applies_the_other_bits():
    m = make()
    wr(m, vm.STATUS, ACK)
    _write_features(m, 1 << 5)
    assert wr(m, vm.STATUS, ACK | DRIVER | FEATURES_OK) == ()
    assert rd(m, vm.STATUS) == ACK | DRIVER


def test_feature_word_past_offered_ones_blocks_features_ok():
    m = make()
    _to_driver(m)
    _write_features(m, LINUX_FEATURES)
    wr(m, vm.DRIVER_FEATURES_SEL, 2)
    wr(m, vm.DRIVER_FEATURES, 1)
    add_status(m, FEATURES_OK)
    assert not rd(m, vm.STATUS) & FEATURES_OK
    # Writing the word back to 0 withdraws the bogus acceptance.
    wr(m, vm.DRIVER_FEATURES, 0)
    add_status(m, FEATURES_OK)
    assert rd(m, vm.STATUS) & FEATURES_OK
    assert m.driver_features == LINUX_FEATURES


def test_foreign_feature_words_are_bounded():
    m = make()
    for sel in range(2, 2 + 16):
        wr(m, vm.DRIVER_FEATURES_SEL, sel)
        wr(m, vm.DRIVER_FEATURES, 1)
    wr(m, vm.DRIVER_FEATURES_SEL, 100)
    assert_rejected(m, wr, m, vm.DRIVER_FEATURES, 1)
    # Zero, or an already-remembered word, is still fine.
    assert wr(m, vm.DRIVER_FEATURES, 0) == ()
    wr(m, vm.DRIVER_FEATURES_SEL, 2)
    assert wr(m, vm.DRIVER_FEATURES, 7) == ()


def test_driver_features_frozen_after_features_ok():
    m = make()
    negotiate(m, LINUX_FEATURES)
    wr(m, vm.DRIVER_FEATURES_SEL, 0)
    assert_rejected(m, wr, m, vm.DRIVER_FEATURES, 0)
    wr(m, vm.DRIVER_FEATURES_SEL, 5)
    assert_rejected(m, wr, m, vm.DRIVER_FEATURES, 1)
    # Rewriting the same value is harmless and accepted.
    wr(m, vm.DRIVER_FEATURES_SEL, 0)
    assert wr(m, vm.DRIVER_FEATURES, LINUX_FEATURES & 0xFFFF_FFFF) == ()
    wr(m, vm.DRIVER_FEATURES_SEL, 5)
    assert wr(m, vm.DRIVER_FEATURES, 0) == ()
    assert m.driver_features == LINUX_FEATURES


# ------------------------------------------------------------------ status


@pytest.mark.parametrize(
    "prior, value",
    [
        (0, 0x10),  # reserved
        (0, 0x20),  # reserved
        (0, 0x100 | ACK),  # past the 8 status bits
        (0, NEEDS_RESET),  # only the device sets it
        (ACK, ACK | NEEDS_RESET),
        (ACK | DRIVER, ACK),  # clearing DRIVER
        (ACK | DRIVER, DRIVER),  # clearing ACKNOWLEDGE
        (0, DRIVER),  # DRIVER without ACKNOWLEDGE
        (ACK, ACK | FEATURES_OK),  # FEATURES_OK without DRIVER
        (ACK | DRIVER, ACK | DRIVER | DRIVER_OK),  # DRIVER_OK without FEATURES_OK
    ],
)
def test_status_writes_the_protocol_forbids(prior, value):
    m = make()
    _write_features(m, LINUX_FEATURES)
    if prior:
        wr(m, vm.STATUS, prior)
    assert rd(m, vm.STATUS) == prior
    assert_rejected(m, wr, m, vm.STATUS, value)


def test_status_all_at_once_in_order_is_fine():
    m = make()
    _write_features(m, LINUX_FEATURES)
    assert wr(m, vm.STATUS, ACK | DRIVER | FEATURES_OK) == ()
    assert wr(m, vm.STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK) == (DriverOk(),)


def test_single_write_with_refused_features_and_driver_ok_is_rejected():
    m = make()
    _write_features(m, 1 << 5)
    assert_rejected(m, wr, m, vm.STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK)
    assert rd(m, vm.STATUS) == 0


def test_driver_ok_emitted_exactly_once_per_cycle():
    m = make()
    negotiate(m, LINUX_FEATURES)
    effects = []
    for _ in range(3):
        effects += add_status(m, DRIVER_OK)
    effects += add_status(m, FAILED)
    assert effects == [DriverOk()]
    assert wr(m, vm.STATUS, 0) == (Reset(),)
    negotiate(m, LINUX_FEATURES)
    assert add_status(m, DRIVER_OK) == (DriverOk(),)


def test_failed_may_be_set_any_time_but_blocks_progress():
    m = make()
    assert wr(m, vm.STATUS, FAILED) == ()
    assert rd(m, vm.STATUS) == FAILED
    m = make()
    _to_driver(m)
    _write_features(m, LINUX_FEATURES)
    add_status(m, FAILED)
    assert_rejected(m, add_status, m, FEATURES_OK)
    m = make()
    negotiate(m, LINUX_FEATURES)
    add_status(m, FAILED)
    assert_rejected(m, add_status, m, DRIVER_OK)
    assert wr(m, vm.STATUS, 0) == (Reset(),)


# ------------------------------------------------------------------ queues


def test_queue_registers_rejected_for_non_existent_queue():
    m = make()
    negotiate(m, LINUX_FEATURES)
    wr(m, vm.QUEUE_SEL, 7)
    assert rd(m, vm.QUEUE_NUM_MAX) == 0
    assert rd(m, vm.QUEUE_READY) == 0
    assert rd(m, vm.QUEUE_RESET) == 0
    for reg, value in (
        (vm.QUEUE_NUM, 16),
        (vm.QUEUE_DESC_LOW, 0x1000),
        (vm.QUEUE_DESC_HIGH, 0),
        (vm.QUEUE_DRIVER_LOW, 0x2000),
        (vm.QUEUE_DRIVER_HIGH, 0),
        (vm.QUEUE_DEVICE_LOW, 0x3000),
        (vm.QUEUE_DEVICE_HIGH, 0),
        (vm.QUEUE_READY, 1),
    ):
        assert_rejected(m, wr, m, reg, value)


def test_linux_error_path_for_an_unavailable_queue():
    """vm_setup_vq: QueueNumMax reads 0 -> QueueReady=0, WARN_ON(QueueReady read)."""
    m = make()
    negotiate(m, LINUX_FEATURES)
    before = snapshot(m)
    wr(m, vm.QUEUE_SEL, 2)
    assert rd(m, vm.QUEUE_READY) == 0
    assert rd(m, vm.QUEUE_NUM_MAX) == 0
    assert wr(m, vm.QUEUE_READY, 0) == ()
    assert rd(m, vm.QUEUE_READY) == 0
    wr(m, vm.QUEUE_SEL, 0)
    assert snapshot(m) == before


def test_queue_address_halves_assemble_64_bit_addresses():
    m = make()
    wr(m, vm.QUEUE_SEL, 1)
    wr(m, vm.QUEUE_DESC_HIGH, 0x1234_5678)
    wr(m, vm.QUEUE_DESC_LOW, 0x9ABC_DEF0)
    wr(m, vm.QUEUE_DRIVER_LOW, 0x1000_0002)
    wr(m, vm.QUEUE_DRIVER_HIGH, 0xFFFF_FFFF)
    wr(m, vm.QUEUE_DEVICE_LOW, 4)
    q = m.queues[1]
    assert q.desc == 0x1234_5678_9ABC_DEF0
    assert q.driver == 0xFFFF_FFFF_1000_0002
    assert q.device == 4
    wr(m, vm.QUEUE_DESC_LOW, 0)
    assert q.desc == 0x1234_5678_0000_0000
    assert m.queues[0] == QueueState(num_max=QUEUE_SIZES[0])


@pytest.mark.parametrize("num", [0, 257, 512, 1 << 16, 0xFFFF_FFFF])
def test_queue_num_must_be_within_1_to_max(num):
    m = make()
    wr(m, vm.QUEUE_SEL, 0)
    assert_rejected(m, wr, m, vm.QUEUE_NUM, num)


@pytest.mark.parametrize("num", [1, 2, 3, 64, 100, 256])
def test_queue_num_accepts_any_size_up_to_max(num):
    m = make()
    wr(m, vm.QUEUE_SEL, 0)
    assert wr(m, vm.QUEUE_NUM, num) == ()
    assert m.queues[0].num == num


def _prepared(desc=None, avail=None, used=None, num=256, negotiate_first=True, packed=False):
    m = make(features=DEVICE_FEATURES | F_RING_PACKED)
    if negotiate_first:
        negotiate(m, LINUX_FEATURES | (F_RING_PACKED if packed else 0))
    d, a, u = ring_layout(0, 256)
    wr(m, vm.QUEUE_SEL, 0)
    if num:
        wr(m, vm.QUEUE_NUM, num)
    for low, addr in (
        (vm.QUEUE_DESC_LOW, d if desc is None else desc),
        (vm.QUEUE_DRIVER_LOW, a if avail is None else avail),
        (vm.QUEUE_DEVICE_LOW, u if used is None else used),
    ):
        wr(m, low, addr & 0xFFFF_FFFF)
        wr(m, low + 4, addr >> 32)
    return m


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num": 0},  # QueueNum never written
        {"num": 100},  # a split ring needs a power of two
        {"num": 3},
        {"desc": 0},
        {"avail": 0},
        {"used": 0},
        {"desc": RAM + 8},  # descriptor table needs 16
        {"avail": RAM + 0x2001},  # available ring needs 2
        {"used": RAM + 0x3002},  # used ring needs 4
        {"desc": (1 << 64) - 16},  # runs past the address space
        {"used": (1 << 64) - 4},
        {"negotiate_first": False},  # before FEATURES_OK
    ],
)
def test_queue_ready_validation(kwargs):
    m = _prepared(**kwargs)
    assert_rejected(m, wr, m, vm.QUEUE_READY, 1)
    assert rd(m, vm.QUEUE_READY) == 0
    assert m.ready_queues() == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num": 0},
        {"desc": RAM + 8},  # descriptor ring needs 16
        {"avail": RAM + 0x2002},  # driver event suppression needs 4
        {"used": RAM + 0x3002},  # device event suppression needs 4
        {"avail": 0},
        {"desc": (1 << 64) - 16},
    ],
)
def test_packed_queue_ready_validation(kwargs):
    m = _prepared(packed=True, **kwargs)
    assert_rejected(m, wr, m, vm.QUEUE_READY, 1)


def test_packed_queue_takes_any_size_and_4_byte_event_areas():
    m = _prepared(packed=True, num=100, desc=RAM + 16, avail=RAM + 0x1004, used=RAM + 0x2004)
    assert wr(m, vm.QUEUE_READY, 1) == ()
    q = m.queues[0]
    assert (q.num, q.desc, q.driver, q.device) == (100, RAM + 16, RAM + 0x1004, RAM + 0x2004)
    assert q.ready


def test_queue_ready_accepts_minimal_alignment():
    m = _prepared(desc=RAM + 16, avail=RAM + 0x1002, used=RAM + 0x2004)
    assert wr(m, vm.QUEUE_READY, 1) == ()
    assert rd(m, vm.QUEUE_READY) == 1
    assert m.ready_queues() == [0]


def test_queue_ready_takes_only_0_and_1():
    m = _prepared()
    assert_rejected(m, wr, m, vm.QUEUE_READY, 2)
    assert_rejected(m, wr, m, vm.QUEUE_READY, 0xFFFF_FFFF)


def test_queue_registers_locked_while_ready():
    m = _prepared()
    assert wr(m, vm.QUEUE_READY, 1) == ()
    for reg in (
        vm.QUEUE_NUM,
        vm.QUEUE_DESC_LOW,
        vm.QUEUE_DESC_HIGH,
        vm.QUEUE_DRIVER_LOW,
        vm.QUEUE_DRIVER_HIGH,
        vm.QUEUE_DEVICE_LOW,
        vm.QUEUE_DEVICE_HIGH,
    ):
        assert_rejected(m, wr, m, reg, 64)
    # Writing 1 again does nothing; 0 makes the queue writable again.
    assert wr(m, vm.QUEUE_READY, 1) == ()
    assert wr(m, vm.QUEUE_READY, 0) == ()  # not running: nothing to stop
    assert rd(m, vm.QUEUE_READY) == 0
    assert wr(m, vm.QUEUE_NUM, 64) == ()
    assert m.queues[0].num == 64


def test_queue_ready_0_on_a_running_queue_stops_it():
    m = running()
    wr(m, vm.QUEUE_SEL, 1)
    assert wr(m, vm.QUEUE_READY, 0) == (QueueReset(1),)
    assert rd(m, vm.QUEUE_READY) == 0
    assert m.ready_queues() == [0]
    assert_rejected(m, wr, m, vm.QUEUE_NOTIFY, 1)
    # Same ring again: registers were kept, so QueueReady=1 brings it back.
    assert wr(m, vm.QUEUE_READY, 1) == (QueueEnable(1),)
    assert wr(m, vm.QUEUE_NOTIFY, 1) == (Kick(1),)


# ------------------------------------------------------------------ notify


def test_notify_only_for_ready_queues_on_a_running_device():
    m = make()
    negotiate(m, LINUX_FEATURES)
    program_queue(m, 0, 256)
    assert_rejected(m, wr, m, vm.QUEUE_NOTIFY, 0)  # before DRIVER_OK
    add_status(m, DRIVER_OK)
    assert wr(m, vm.QUEUE_NOTIFY, 0) == (Kick(0),)
    assert_rejected(m, wr, m, vm.QUEUE_NOTIFY, 1)  # exists, not ready
    assert_rejected(m, wr, m, vm.QUEUE_NOTIFY, 2)  # does not exist
    assert_rejected(m, wr, m, vm.QUEUE_NOTIFY, 0x1_0000)  # no NOTIFICATION_DATA: index only


def test_notify_hot_path_reuses_effect_objects():
    m = running()
    first = wr(m, vm.QUEUE_NOTIFY, 0)
    assert wr(m, vm.QUEUE_NOTIFY, 0) is first


def test_notify_with_notification_data_uses_low_16_bits():
    m = make(features=DEVICE_FEATURES | F_NOTIFICATION_DATA)
    negotiate(m, LINUX_FEATURES | F_NOTIFICATION_DATA)
    program_queue(m, 0, 256)
    program_queue(m, 1, 128)
    add_status(m, DRIVER_OK)
    # next_off/next_wrap in bits 16-31 (split ring: avail idx).
    assert wr(m, vm.QUEUE_NOTIFY, 0x002A_0001) == (Kick(1),)
    assert_rejected(m, wr, m, vm.QUEUE_NOTIFY, 0x002A_0002)


# ------------------------------------------------------------------ interrupts


def test_raise_interrupt_reports_only_the_zero_to_nonzero_edge():
    m = running()
    assert m.raise_interrupt(vm.INT_VRING) is True
    assert m.raise_interrupt(vm.INT_VRING) is False
    assert m.raise_interrupt(vm.INT_CONFIG) is False
    assert m.interrupt_status == vm.INT_VRING | vm.INT_CONFIG
    assert rd(m, vm.INTERRUPT_STATUS) == 3


def test_ack_of_one_bit_leaves_the_other_pending():
    m = running()
    m.raise_interrupt(vm.INT_VRING)
    m.raise_interrupt(vm.INT_CONFIG)
    assert wr(m, vm.INTERRUPT_ACK, vm.INT_VRING) == (InterruptAck(vm.INT_CONFIG),)
    assert rd(m, vm.INTERRUPT_STATUS) == vm.INT_CONFIG
    assert wr(m, vm.INTERRUPT_ACK, vm.INT_CONFIG) == (InterruptAck(0),)
    # Acking nothing still tells the caller to settle the line.
    assert wr(m, vm.INTERRUPT_ACK, 0) == (InterruptAck(0),)


def test_two_completions_close_together_are_both_noticed():
    """Edge-triggered SPI: every event after an ack needs a fresh edge."""
    m = running()
    line_edges = 0

    def complete():
        nonlocal line_edges
        if m.raise_interrupt(vm.INT_VRING):
            line_edges += 1

    complete()  # completion A raises the line
    status = rd(m, vm.INTERRUPT_STATUS)  # handler runs...
    complete()  # ...completion B lands before the ack: no new edge
    assert line_edges == 1
    (ack,) = wr(m, vm.INTERRUPT_ACK, status)
    assert ack == InterruptAck(0)  # line lowered; the handler sees B in the ring
    complete()  # completion C after the ack gets its own edge
    assert line_edges == 2

    # A config change arriving while a used-buffer interrupt is being handled
    # must survive the ack of bit 0: the ack reports it, so the line is re-raised.
    status = rd(m, vm.INTERRUPT_STATUS)
    assert m.raise_interrupt(vm.INT_CONFIG) is False
    assert wr(m, vm.INTERRUPT_ACK, status) == (InterruptAck(vm.INT_CONFIG),)


def test_with_the_kernel_raising_vring_interrupts_interrupt_status_always_shows_them():
    """irqfd: the daemon's call raises the SPI in the kernel and the model
    never hears of it; the driver must still look at its used rings."""
    m = make()
    m.vring_irq_in_kernel = True
    assert rd(m, vm.INTERRUPT_STATUS) == 0  # no driver yet: nothing to report
    m = running()
    m.vring_irq_in_kernel = True
    assert rd(m, vm.INTERRUPT_STATUS) == vm.INT_VRING
    assert wr(m, vm.INTERRUPT_ACK, vm.INT_VRING) == (InterruptAck(0),)  # nothing latched: the line may stay low
    assert rd(m, vm.INTERRUPT_STATUS) == vm.INT_VRING
    m.raise_interrupt(vm.INT_CONFIG)
    assert rd(m, vm.INTERRUPT_STATUS) == vm.INT_VRING | vm.INT_CONFIG
    assert wr(m, vm.INTERRUPT_ACK, vm.INT_VRING | vm.INT_CONFIG) == (InterruptAck(0),)
    m.vring_irq_in_kernel = False
    assert rd(m, vm.INTERRUPT_STATUS) == 0


def test_interrupt_ack_with_undefined_bits_is_rejected():
    m = running()
    m.raise_interrupt(vm.INT_VRING)
    assert_rejected(m, wr, m, vm.INTERRUPT_ACK, 4)
    assert_rejected(m, wr, m, vm.INTERRUPT_ACK, 0xFFFF_FFFF)


def test_raise_interrupt_respects_device_status():
    m = make()
    assert m.raise_interrupt(vm.INT_CONFIG) is False  # no driver
    assert m.interrupt_status == 0
    negotiate(m, LINUX_FEATURES)
    assert m.raise_interrupt(vm.INT_VRING) is False  # no used buffers before DRIVER_OK
    assert m.interrupt_status == 0
    assert m.raise_interrupt(vm.INT_VRING | vm.INT_CONFIG) is True
    assert m.interrupt_status == vm.INT_CONFIG
    with pytest.raises(ValueError):
        m.raise_interrupt(4)
    with pytest.raises(ValueError):
        m.raise_interrupt(-1)


# ------------------------------------------------------------------ reset


def test_reset_returns_everything_to_defaults_and_emits_reset_once():
    m = running(features=LINUX_FEATURES | F_RING_RESET)
    fresh = make()
    m.update_config(CONFIG[:-1] + b"\x01")
    m.raise_interrupt(vm.INT_VRING)
    wr(m, vm.QUEUE_SEL, 1)
    wr(m, vm.DEVICE_FEATURES_SEL, 1)
    wr(m, vm.DRIVER_FEATURES_SEL, 1)
    wr(m, vm.SHM_SEL, 3)
    m.set_needs_reset()
    generation = m.config_generation
    assert generation == 1

    assert wr(m, vm.STATUS, 0) == (Reset(),)
    assert wr(m, vm.STATUS, 0) == ()  # already pristine
    assert rd(m, vm.STATUS) == 0
    assert m.status == 0
    assert m.driver_features == 0
    assert m.interrupt_status == 0
    assert m.ready_queues() == []
    assert m.queues == fresh.queues
    assert rd(m, vm.DEVICE_FEATURES) == DEVICE_FEATURES & 0xFFFF_FFFF  # selector back to 0
    assert rd(m, vm.QUEUE_NUM_MAX) == QUEUE_SIZES[0]  # QueueSel back to 0
    # ConfigGeneration keeps counting; the config belongs to the device.
    assert rd(m, vm.CONFIG_GENERATION) == generation
    assert m.config == CONFIG[:-1] + b"\x01"
    # Everything a reset clears equals a fresh model's.
    state, fresh_state = vars(m), vars(fresh)
    for key in state:
        if key not in ("_config", "_config_generation"):
            assert state[key] == fresh_state[key], key


def test_reset_of_a_device_touched_only_by_selectors_still_reports_reset():
    m = make()
    wr(m, vm.QUEUE_SEL, 1)
    assert wr(m, vm.STATUS, 0) == (Reset(),)
    assert wr(m, vm.STATUS, 0) == ()


def test_reset_then_full_reprobe():
    m = running()
    assert wr(m, vm.STATUS, 0) == (Reset(),)
    negotiate(m, LINUX_FEATURES)
    for i, n in enumerate(QUEUE_SIZES):
        _, effects = program_queue(m, i, n)
        assert effects == ()
    assert add_status(m, DRIVER_OK) == (DriverOk(),)


# ------------------------------------------------------------------ needs reset


def test_needs_reset():
    m = make()
    assert m.set_needs_reset() is False  # pristine: nothing to reset
    assert rd(m, vm.STATUS) == 0
    m = running()
    assert m.set_needs_reset() is True
    assert m.set_needs_reset() is False
    assert rd(m, vm.STATUS) == ACK | DRIVER | FEATURES_OK | DRIVER_OK | NEEDS_RESET
    # Kicks are no longer honoured, but that is not the guest's fault.
    assert wr(m, vm.QUEUE_NOTIFY, 0) == ()
    # A read-modify-write carries the bit; a plain write leaves it set.
    assert add_status(m, FAILED) == ()
    assert rd(m, vm.STATUS) & (NEEDS_RESET | FAILED) == NEEDS_RESET | FAILED
    assert wr(m, vm.STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK | FAILED) == ()
    assert rd(m, vm.STATUS) & NEEDS_RESET
    assert wr(m, vm.STATUS, 0) == (Reset(),)
    assert rd(m, vm.STATUS) == 0


def test_needs_reset_before_driver_ok_blocks_start():
    m = make()
    negotiate(m, LINUX_FEATURES)
    program_queue(m, 0, 256)
    assert m.set_needs_reset() is True
    wr(m, vm.QUEUE_SEL, 1)
    wr(m, vm.QUEUE_NUM, 128)
    for low, addr in zip(ADDR_LOWS, ring_layout(1, 128)):
        wr(m, low, addr)
    assert_rejected(m, wr, m, vm.QUEUE_READY, 1)
    assert rd(m, vm.QUEUE_READY) == 0
    assert_rejected(m, add_status, m, DRIVER_OK)


# ------------------------------------------------------------------ config


def test_config_reads_are_little_endian_at_every_width():
    m = make()
    base = CONFIG_OFFSET
    assert m.read(base, 8) == CAPACITY
    assert m.read(base, 4) == CAPACITY & 0xFFFF_FFFF
    assert m.read(base + 4, 4) == CAPACITY >> 32
    assert m.read(base, 2) == 0x789A
    assert m.read(base + 1, 1) == 0x78
    assert m.read(base + 16, 2) == 0x1234
    assert m.read(base + 18, 1) == 0x56
    assert m.read(base + 19, 1) == 0x78
    assert m.read(base + 20, 4) == 512
    last = base + len(CONFIG) - 8
    assert m.read(last, 8) == 0


@pytest.mark.parametrize(
    "offset, size",
    [
        (CONFIG_OFFSET + 1, 2),
        (CONFIG_OFFSET + 2, 4),
        (CONFIG_OFFSET + 4, 8),
        (CONFIG_OFFSET, 3),
        (CONFIG_OFFSET, 16),
        (CONFIG_OFFSET, 0),
        (CONFIG_OFFSET + len(CONFIG), 1),  # just past the config
        (CONFIG_OFFSET + len(CONFIG) - 2, 4),  # straddles the end (misaligned too)
        (0x1FC, 4),
        (0x200, 4),  # past the window
        (0x1000, 4),
        (-4, 4),
    ],
)
def test_bad_config_accesses(offset, size):
    m = make()
    assert_rejected(m, m.read, offset, size)
    assert_rejected(m, m.write, offset, size, 0)


def test_config_straddling_end_rejected_even_when_aligned():
    m = make(config=bytes(range(6)))
    assert m.read(CONFIG_OFFSET + 4, 2) == 0x0504
    assert_rejected(m, m.read, CONFIG_OFFSET + 4, 4)


def test_config_writes_update_bytes_and_emit_config_write():
    m = make()
    assert m.write(CONFIG_OFFSET + 20, 4, 4096) == (ConfigWrite(20, b"\x00\x10\x00\x00"),)
    assert m.read(CONFIG_OFFSET + 20, 4) == 4096
    assert m.write(CONFIG_OFFSET + 18, 1, 0x1FF) == (ConfigWrite(18, b"\xff"),)  # masked
    assert m.read(CONFIG_OFFSET + 18, 1) == 0xFF
    assert m.write(CONFIG_OFFSET + 8, 8, -1) == (ConfigWrite(8, b"\xff" * 8),)
    assert m.config_generation == 0  # the driver's own writes are not device changes


def test_read_only_config_rejects_writes():
    m = make(writable=False)
    assert_rejected(m, m.write, CONFIG_OFFSET, 1, 0)
    assert m.read(CONFIG_OFFSET, 1) == CONFIG[0]


def test_config_generation_bumps_and_linux_retry_loop_works():
    m = make()
    assert m.update_config(CONFIG) is False
    assert rd(m, vm.CONFIG_GENERATION) == 0

    new_capacity = CAPACITY * 2
    new_config = struct.pack("<Q", new_capacity) + CONFIG[8:]
    reads = []
    changed_midway = False
    while True:  # __virtio_cread_many
        before = rd(m, vm.CONFIG_GENERATION)
        low = m.read(CONFIG_OFFSET, 4)
        if not changed_midway:
            assert m.update_config(new_config) is True
            changed_midway = True
        high = m.read(CONFIG_OFFSET + 4, 4)
        reads.append(high << 32 | low)
        if rd(m, vm.CONFIG_GENERATION) == before:
            break
    assert len(reads) == 2
    assert reads[-1] == new_capacity
    assert rd(m, vm.CONFIG_GENERATION) == 1


def test_config_generation_wraps_at_32_bits():
    m = make()
    m._config_generation = 0xFFFF_FFFF
    m.update_config(b"\x01" + CONFIG[1:])
    assert rd(m, vm.CONFIG_GENERATION) == 0


def test_update_config_too_large():
    m = make()
    with pytest.raises(ValueError):
        m.update_config(bytes(0x101))


# ------------------------------------------------------------------ queue reset


def test_queue_reset_needs_ring_reset_negotiated():
    m = running()  # LINUX_FEATURES has no RING_RESET
    wr(m, vm.QUEUE_SEL, 0)
    assert rd(m, vm.QUEUE_RESET) == 0
    assert_rejected(m, wr, m, vm.QUEUE_RESET, 1)
    m = make()
    _write_features(m, LINUX_FEATURES | F_RING_RESET)  # written but not yet FEATURES_OK
    assert_rejected(m, wr, m, vm.QUEUE_RESET, 1)


def test_queue_reset_and_reenable():
    m = running(features=LINUX_FEATURES | F_RING_RESET)
    wr(m, vm.QUEUE_SEL, 1)
    assert wr(m, vm.QUEUE_RESET, 0) == ()
    assert rd(m, vm.QUEUE_READY) == 1
    assert wr(m, vm.QUEUE_RESET, 1) == (QueueReset(1),)
    # Complete by the time the write's ioreq completes: both read 0.
    assert rd(m, vm.QUEUE_RESET) == 0
    assert rd(m, vm.QUEUE_READY) == 0
    assert m.queues[1] == QueueState(num_max=QUEUE_SIZES[1])
    assert m.ready_queues() == [0]
    assert_rejected(m, wr, m, vm.QUEUE_NOTIFY, 1)
    assert wr(m, vm.QUEUE_NOTIFY, 0) == (Kick(0),)  # other queues unaffected
    assert_rejected(m, wr, m, vm.QUEUE_RESET, 2)
    # Old registers are gone: QueueReady=1 alone is refused.
    assert_rejected(m, wr, m, vm.QUEUE_READY, 1)
    # Re-enable with a different, smaller ring.
    wr(m, vm.QUEUE_NUM, 64)
    for low, addr in zip(ADDR_LOWS, ring_layout(5, 64)):
        wr(m, low, addr)
    assert wr(m, vm.QUEUE_READY, 1) == (QueueEnable(1),)
    assert rd(m, vm.QUEUE_RESET) == 0
    assert m.queues[1].num == 64
    assert wr(m, vm.QUEUE_NOTIFY, 1) == (Kick(1),)
    wr(m, vm.QUEUE_SEL, 9)
    assert_rejected(m, wr, m, vm.QUEUE_RESET, 1)


def test_queue_reset_before_driver_ok_only_clears_registers():
    m = make()
    negotiate(m, LINUX_FEATURES | F_RING_RESET)
    program_queue(m, 0, 256)
    wr(m, vm.QUEUE_SEL, 0)
    assert wr(m, vm.QUEUE_RESET, 1) == ()
    assert m.queues[0] == QueueState(num_max=QUEUE_SIZES[0])


# ------------------------------------------------------------------ shared memory


def test_no_shared_memory_regions():
    m = make()
    for sel in (0, 1, 0xFF):
        wr(m, vm.SHM_SEL, sel)
        for reg in (vm.SHM_LEN_LOW, vm.SHM_LEN_HIGH, vm.SHM_BASE_LOW, vm.SHM_BASE_HIGH):
            assert rd(m, reg) == 0xFFFF_FFFF


# ------------------------------------------------------------------ access rules

READ_ONLY = [
    vm.MAGIC_VALUE, vm.VERSION_REG, vm.DEVICE_ID, vm.VENDOR_ID, vm.DEVICE_FEATURES,
    vm.QUEUE_NUM_MAX, vm.INTERRUPT_STATUS, vm.SHM_LEN_LOW, vm.SHM_LEN_HIGH,
    vm.SHM_BASE_LOW, vm.SHM_BASE_HIGH, vm.CONFIG_GENERATION,
]  # fmt: skip
WRITE_ONLY = [
    vm.DEVICE_FEATURES_SEL, vm.DRIVER_FEATURES, vm.DRIVER_FEATURES_SEL, vm.QUEUE_SEL,
    vm.QUEUE_NUM, vm.QUEUE_NOTIFY, vm.INTERRUPT_ACK, vm.QUEUE_DESC_LOW, vm.QUEUE_DESC_HIGH,
    vm.QUEUE_DRIVER_LOW, vm.QUEUE_DRIVER_HIGH, vm.QUEUE_DEVICE_LOW, vm.QUEUE_DEVICE_HIGH,
    vm.SHM_SEL,
]  # fmt: skip
READ_WRITE = [vm.QUEUE_READY, vm.STATUS, vm.QUEUE_RESET]
DEFINED = set(READ_ONLY) | set(WRITE_ONLY) | set(READ_WRITE)


def test_register_table_is_complete():
    assert DEFINED == set(vm.REGISTER_NAMES)
    assert len(DEFINED) == len(READ_ONLY) + len(WRITE_ONLY) + len(READ_WRITE)


@pytest.mark.parametrize("offset", READ_ONLY)
def test_writes_to_read_only_registers_are_rejected(offset):
    m = running()
    assert_rejected(m, wr, m, offset, 0)


@pytest.mark.parametrize("offset", WRITE_ONLY)
def test_reads_of_write_only_registers_are_rejected(offset):
    m = running()
    assert_rejected(m, rd, m, offset)


@pytest.mark.parametrize("offset", sorted(set(range(0, 0x100, 4)) - DEFINED))
def test_undefined_control_offsets_are_rejected(offset):
    m = running()
    assert_rejected(m, rd, m, offset)
    assert_rejected(m, wr, m, offset, 0)


@pytest.mark.parametrize("size", [1, 2, 3, 8, 0])
@pytest.mark.parametrize("offset", [vm.STATUS, vm.QUEUE_NOTIFY, vm.MAGIC_VALUE])
def test_control_registers_take_32_bit_accesses_only(offset, size):
    m = running()
    assert_rejected(m, m.read, offset, size)
    assert_rejected(m, m.write, offset, size, 0)


@pytest.mark.parametrize("offset", [vm.STATUS + 1, vm.STATUS + 2, vm.QUEUE_NOTIFY + 2, 0x0FE])
def test_misaligned_control_accesses_are_rejected(offset):
    m = running()
    assert_rejected(m, m.read, offset, 4)
    assert_rejected(m, m.write, offset, 4, 0)


def test_control_write_values_are_masked_to_32_bits():
    m = make()
    wr(m, vm.QUEUE_SEL, (1 << 32) | 1)
    assert rd(m, vm.QUEUE_NUM_MAX) == QUEUE_SIZES[1]


# ------------------------------------------------------------------ construction


@pytest.mark.parametrize(
    "kwargs",
    [
        {"device_features": 0},  # no VERSION_1
        {"device_features": F_VERSION_1 | 1 << 37},  # SR_IOV
        {"device_features": F_VERSION_1 | 1 << 39},  # NOTIF_CONFIG_DATA
        {"device_features": F_VERSION_1 | 1 << 30},  # VHOST_USER_F_PROTOCOL_FEATURES
        {"device_features": F_VERSION_1 | 1 << 41},  # ADMIN_VQ
        {"device_features": -1},
        {"queue_num_max": (0,)},
        {"queue_num_max": (100,)},
        {"queue_num_max": (65536,)},
        {"config": bytes(0x101)},
        {"device_id": 1 << 32},
        {"vendor_id": -1},
    ],
)
def test_constructor_rejects_what_the_transport_cannot_serve(kwargs):
    args = dict(
        device_id=2,
        vendor_id=0,
        device_features=F_VERSION_1,
        queue_num_max=(256,),
        config=b"",
    )
    args.update(kwargs)
    with pytest.raises(ValueError):
        VirtioMmioModel(**args)


def test_full_size_config_fills_the_window():
    m = make(config=bytes(range(256)))
    assert m.read(0x1F8, 8) == int.from_bytes(bytes(range(248, 256)), "little")


# ------------------------------------------------------------------ property test

ALL_OFFSETS = sorted(DEFINED) + [CONFIG_OFFSET + i for i in range(0, len(CONFIG) + 8, 2)]
STATUS_VALUES = [
    0, ACK, ACK | DRIVER, ACK | DRIVER | FEATURES_OK, ACK | DRIVER | FEATURES_OK | DRIVER_OK,
    FAILED, NEEDS_RESET, DRIVER_OK, FEATURES_OK, 0x10, 0x20, 0xFF,
]  # fmt: skip
INTERESTING = STATUS_VALUES + [
    0, 1, 2, 3, 4, 16, 64, 128, 256, 0x101, 0xFFFF_FFFF,
    LINUX_FEATURES & 0xFFFF_FFFF, LINUX_FEATURES >> 32, (LINUX_FEATURES | F_RING_RESET) >> 32,
    RAM, RAM + 0x1000, RAM + 0x2000, RAM + 8,
]  # fmt: skip

offsets = st.one_of(st.integers(0, 0x300), st.sampled_from(ALL_OFFSETS))
sizes = st.one_of(st.just(4), st.sampled_from([1, 2, 3, 4, 8]))
values = st.one_of(
    st.sampled_from(INTERESTING),
    st.integers(0, (1 << 64) - 1),
    st.integers(-(1 << 64), -1),
)
random_access = st.tuples(st.sampled_from(["read", "write"]), offsets, sizes, values)
# Well-formed register accesses with likely values, so that sequences get deep
# into the state machine (reset, DRIVER_OK, queue enable/reset, kicks, acks).
register_access = st.tuples(
    st.sampled_from(["read", "write"]),
    st.sampled_from(sorted(DEFINED)),
    st.just(4),
    st.sampled_from(INTERESTING),
)


def _writes(offset: int, vals: list[int]):
    return st.tuples(st.just("write"), st.just(offset), st.just(4), st.sampled_from(vals))


protocol_access = st.one_of(
    _writes(vm.STATUS, STATUS_VALUES),
    _writes(vm.QUEUE_NOTIFY, [0, 1, 2, 0x1_0000]),
    _writes(vm.INTERRUPT_ACK, [0, 1, 2, 3, 4]),
    _writes(vm.QUEUE_READY, [0, 1, 2]),
    _writes(vm.QUEUE_SEL, [0, 1, 2]),
    _writes(vm.QUEUE_RESET, [0, 1, 2]),
    _writes(vm.QUEUE_NUM, [16, 64, 128, 256, 3, 100]),
)
guest_ops = st.one_of(random_access, register_access, protocol_access)
device_ops = st.one_of(
    st.tuples(st.just("irq"), st.sampled_from([0, 1, 2, 3])),
    st.tuples(st.just("needs_reset")),
    st.tuples(st.just("config"), st.binary(min_size=len(CONFIG), max_size=len(CONFIG))),
)
operations = st.lists(st.one_of(guest_ops, guest_ops, guest_ops, device_ops), max_size=80)


def check_invariants(m: VirtioMmioModel) -> None:
    s = m.status
    assert s & ~0xCF == 0
    if s & DRIVER:
        assert s & ACK
    if s & FEATURES_OK:
        assert s & DRIVER
        assert m.driver_features & ~m.device_features == 0
        assert m.driver_features & F_VERSION_1
    if s & DRIVER_OK:
        assert s & FEATURES_OK
    if s & NEEDS_RESET:
        assert s & ~NEEDS_RESET
    assert m.interrupt_status & ~3 == 0
    if s == 0:
        assert m.interrupt_status == 0
    if m.interrupt_status & vm.INT_VRING:
        assert s & DRIVER_OK
    assert 0 <= m.config_generation <= 0xFFFF_FFFF
    packed = bool(m.driver_features & F_RING_PACKED)
    for q in m.queues:
        assert 0 <= q.num <= q.num_max
        assert 0 <= q.desc < 1 << 64 and 0 <= q.driver < 1 << 64 and 0 <= q.device < 1 << 64
        if q.ready:
            assert s & FEATURES_OK
            assert q.num > 0
            if packed:
                assert q.desc and q.desc % 16 == 0
                assert q.driver and q.driver % 4 == 0
                assert q.device and q.device % 4 == 0
            else:
                assert is_valid_queue_size(q.num)
                assert q.desc and q.desc % 16 == 0
                assert q.driver and q.driver % 2 == 0
                assert q.device and q.device % 4 == 0
    assert m.ready_queues() == [i for i, q in enumerate(m.queues) if q.ready]


def check_effects(before: VirtioMmioModel, m: VirtioMmioModel, effects: tuple, size: int) -> None:
    assert isinstance(effects, tuple)
    for e in effects:
        if isinstance(e, DriverOk):
            assert not before.status & DRIVER_OK and m.status & DRIVER_OK
        elif isinstance(e, Reset):
            assert m.status == 0 and m.ready_queues() == [] and m.interrupt_status == 0
            assert not before._is_pristine() and m._is_pristine()
        elif isinstance(e, Kick):
            assert m.status & DRIVER_OK and not m.status & (NEEDS_RESET | FAILED)
            assert m.queues[e.queue].ready
        elif isinstance(e, InterruptAck):
            assert e.status == m.interrupt_status
        elif isinstance(e, ConfigWrite):
            assert len(e.data) == size
            assert m.config[e.offset : e.offset + size] == e.data
        elif isinstance(e, QueueEnable):
            assert m.status & DRIVER_OK and m.queues[e.queue].ready
            assert not before.queues[e.queue].ready
        elif isinstance(e, QueueReset):
            assert m.status & DRIVER_OK and not m.queues[e.queue].ready
        else:
            raise AssertionError(f"unknown effect {e!r}")
    kinds = [type(e) for e in effects]
    assert len(kinds) == len(set(kinds)) <= 1


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    start=st.sampled_from(["fresh", "features", "packed", "running", "running-ring-reset"]),
    ops=operations,
)
def test_random_accesses_keep_the_model_sound(start, ops):
    if start == "fresh":
        m = make()
    elif start == "features":
        m = make()
        negotiate(m, LINUX_FEATURES | F_RING_RESET)
    elif start == "packed":
        m = make(features=DEVICE_FEATURES | F_RING_PACKED)
        negotiate(m, LINUX_FEATURES | F_RING_PACKED)
    elif start == "running":
        m = running()
    else:
        m = running(features=LINUX_FEATURES | F_RING_RESET)
    check_invariants(m)
    for op in ops:
        kind = op[0]
        if kind in ("read", "write"):
            _, offset, size, value = op
            before = copy.deepcopy(m)
            before_state = snapshot(m)
            try:
                if kind == "read":
                    result = m.read(offset, size)
                    assert 0 <= result < 1 << (8 * size)
                    assert snapshot(m) == before_state  # reads have no side effects
                else:
                    effects = m.write(offset, size, value)
                    check_effects(before, m, effects, size)
            except GuestAccessError:
                assert snapshot(m) == before_state
        elif kind == "irq":
            had = m.interrupt_status
            edge = m.raise_interrupt(op[1])
            assert edge == (had == 0 and m.interrupt_status != 0)
        elif kind == "needs_reset":
            was = m.status
            newly = m.set_needs_reset()
            assert newly == (was != 0 and not was & NEEDS_RESET)
        else:
            old_gen, old_cfg = m.config_generation, m.config
            changed = m.update_config(op[1])
            assert changed == (op[1] != old_cfg)
            assert m.config_generation == (old_gen + changed) & 0xFFFF_FFFF
        check_invariants(m)
