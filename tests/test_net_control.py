"""The front-end part of virtio-net the bridge does itself (bridge.net_control):
the features it offers, the config it supplies, the control commands, and
the device side of the control queue's split ring (bridge.served_queue),
driven by the simulated guest's own virtqueue code in a fake RAM."""

from __future__ import annotations

import socket
import struct

import pytest
import trio

from bridge import split_ring as sr
from bridge.device_types import DEVICE_TYPES, DeviceOptions, guest_features
from bridge.net_control import (
    EMULATED,
    VIRTIO_NET_ERR,
    VIRTIO_NET_OK,
    NetControl,
    NetEmulation,
    net_config,
    net_guest_features,
    parse_mac,
)
from bridge.served_queue import ServedQueue
from bridge.shadow_ring import GuestRing, RingError
from bridge.memory import OutsideGuestRam
from tests.guest_driver_fakes import FakeAccessFault, FakeRam
from tests.test_vhost_user_frontend import TESTPMD, FakeDaemon, RecordingHandler, region, ring
from vhost_user import VhostUserError, VhostUserFrontend
from vhost_user.protocol import VringState
from xen.sim.guest_memory import GuestAllocator
from xen.sim.guest_virtqueue import GuestVirtqueue

TESTPMD_FEATURES = 0xD7C66E7CB
"""What dpdk-testpmd 22.11's vhost PMD offers (GET_FEATURES)."""

MQ, CTRL_VQ, CTRL_RX, MAC, STATUS, MRG_RXBUF = 22, 17, 18, 5, 16, 15
VERSION_1, INDIRECT, EVENT_IDX = 32, 28, 29


def bits(value: int) -> list[int]:
    return [i for i in range(64) if value >> i & 1]


# -- features and config -------------------------------------------------------


def test_testpmd_features_become_an_offer_the_bridge_can_keep():
    offered = net_guest_features(guest_features(TESTPMD_FEATURES), pairs=4)
    # testpmd: CSUM GUEST_CSUM MTU GSO GUEST_TSO4/6 GUEST_ECN GUEST_UFO HOST_ECN HOST_UFO MRG_RXBUF
    # CTRL_VQ CTRL_RX GUEST_ANNOUNCE MQ | LOG_ALL ANY_LAYOUT INDIRECT EVENT_IDX PROTOCOL_FEATURES
    # VERSION_1 RING_PACKED IN_ORDER.
    assert bits(TESTPMD_FEATURES) == [0, 1, 3, 6, 7, 8, 9, 10, 13, 14, 15, 17, 18, 21, 22, 26, 27, 28, 29, 30, 32,
                                      34, 35]
    # Kept: the data path's bits; added: MAC, STATUS (the bridge's config);
    # dropped: MTU, GSO, HOST_ECN (no HOST_TSO4/6 to go with it),
    # GUEST_ANNOUNCE, vhost-user's own, and the packed ring (the control
    # queue is the bridge's, a split ring).
    assert bits(offered) == [0, 1, 5, 7, 8, 9, 10, 14, 15, 16, 17, 18, 22, 28, 29, 32, 35]


def test_one_pair_offers_no_mq_and_dependencies_are_kept():
    assert not net_guest_features(1 << MQ | 1 << VERSION_1, pairs=1) >> MQ & 1
    assert net_guest_features(1 << VERSION_1, pairs=2) >> MQ & 1
    # GUEST_TSO4 without GUEST_CSUM, HOST_TSO4 without CSUM: not offered.
    assert bits(net_guest_features(1 << 7 | 1 << 11, pairs=1)) == bits(EMULATED)
    # with them: kept
    assert bits(net_guest_features(1 << 0 | 1 << 1 | 1 << 7 | 1 << 11, pairs=1)) == sorted(
        [0, 1, 7, 11, *bits(EMULATED)])


def test_the_config_is_mac_link_up_and_the_pairs():
    assert net_config(bytes.fromhex("525400abcdef"), 128) == bytes.fromhex("525400abcdef") + b"\x01\x00\x80\x00"


@pytest.mark.parametrize("text, ok", [
    ("52:54:00:12:34:56", True), ("02:00:00:00:00:01", True), ("01:00:5e:00:00:01", False),
    ("52:54:00:12:34", False), ("52-54-00-12-34-56", False), ("zz:54:00:12:34:56", False), ("", False),
])
def test_mac_addresses(text, ok):
    if ok:
        assert parse_mac(text) == bytes(int(p, 16) for p in text.split(":"))
    else:
        with pytest.raises(ValueError):
            parse_mac(text)


def test_pairs_come_from_get_queue_num_and_queue_pairs_caps_them():
    emu = NetEmulation(parse_mac("52:54:00:00:00:01"))
    features, queues, config = emu.setup(guest_features(TESTPMD_FEATURES), 256, daemon_mq=True)
    assert (emu.pairs, queues, emu.ctrl_queue, emu.daemon_rings) == (128, 257, 256, 256)
    assert config[8:10] == struct.pack("<H", 128) and features >> MQ & 1
    assert emu.is_served_here(256) and not emu.is_served_here(255)
    capped = NetEmulation(parse_mac("52:54:00:00:00:01"), queue_pairs=3)
    assert capped.setup(guest_features(TESTPMD_FEATURES), 256, daemon_mq=True)[1] == 7
    # Without the MQ protocol feature (or the MQ bit) the daemon has one pair.
    single = NetEmulation(parse_mac("52:54:00:00:00:01"))
    features, queues, _ = single.setup(guest_features(TESTPMD_FEATURES), 2, daemon_mq=False)
    assert (single.pairs, queues, single.ctrl_queue) == (1, 3, 2) and not features >> MQ & 1
    with pytest.raises(ValueError, match="queue-pairs=2, but the daemon serves at most 1"):
        NetEmulation(b"\x02" * 6, queue_pairs=2).setup(TESTPMD_FEATURES, 2, daemon_mq=False)


def test_the_daemon_is_told_only_the_data_path_features():
    driver = 1 << MAC | 1 << STATUS | 1 << CTRL_VQ | 1 << CTRL_RX | 1 << MQ | 1 << MRG_RXBUF | 1 << VERSION_1
    assert bits(NetEmulation.daemon_features(driver, TESTPMD_FEATURES)) == [MRG_RXBUF, MQ, VERSION_1]


def test_only_a_started_active_pair_is_enabled_and_only_transmit_rings_drain():
    emu = NetEmulation(b"\x02" * 6)
    emu.setup(guest_features(TESTPMD_FEATURES), 8, daemon_mq=True)
    emu.start(None, 1 << MQ)
    assert emu.enabled_rings([0, 1, 2, 3, 6, 7]) == [0, 1]
    emu.control.pairs = 2
    assert emu.enabled_rings([0, 1, 2, 3, 6, 7]) == [0, 1, 2, 3]
    assert [i for i in range(6) if emu.needs_drain(i)] == [1, 3, 5]


def test_the_net_type_is_the_bridges_and_its_options_build_it():
    net = DEVICE_TYPES["net"]
    assert (net.virtio_id, net.rings_per_queue, net.config_size) == (1, 2, 0)
    emu = net.emulation(DeviceOptions(mac="52:54:00:00:00:07", queue_pairs=2))
    assert emu.mac == bytes.fromhex("525400000007") and emu.wanted_pairs == 2


# -- control commands ----------------------------------------------------------


def command(cls: int, cmd: int, data: bytes = b"") -> bytes:
    return bytes([cls, cmd]) + data


def mac_table(unicast: list[bytes], multicast: list[bytes]) -> bytes:
    return (struct.pack("<I", len(unicast)) + b"".join(unicast) + struct.pack("<I", len(multicast))
            + b"".join(multicast))


def test_rx_mode_and_mac_table_commands_are_recorded():
    control = NetControl(4, 1 << CTRL_RX | 1 << MQ | 1 << CTRL_VQ)
    assert (control.promisc, control.allmulti) == (True, False)  # QEMU's state after a reset
    assert control.command(command(0, 0, b"\x00")) == (VIRTIO_NET_OK, None)
    assert control.command(command(0, 1, b"\x01")) == (VIRTIO_NET_OK, None)
    assert (control.promisc, control.allmulti) == (False, True)
    uni, multi = [b"\x02\x00\x00\x00\x00\x01"], [b"\x01\x00\x5e\x00\x00\x01", b"\x33\x33\x00\x00\x00\x01"]
    assert control.command(command(1, 0, mac_table(uni, multi))) == (VIRTIO_NET_OK, None)
    assert (control.unicast, control.multicast) == (uni, multi)


@pytest.mark.parametrize("data, why", [
    (b"", "no header"),
    (b"\x00", "half a header"),
    (command(0, 0), "rx mode without its byte"),
    (command(0, 0, b"\x01\x00"), "rx mode with two bytes"),
    (command(0, 2, b"\x01"), "ALLUNI: CTRL_RX_EXTRA is not offered"),
    (command(1, 0, mac_table([b"\x02" * 6], [])[:-1]), "a short MAC table"),
    (command(1, 0, mac_table([], []) + b"\x00"), "a byte after the MAC tables"),
    (command(1, 0, struct.pack("<I", 1 << 30)), "a table count past the end"),
    (command(1, 1, b"\x02" * 6), "MAC_ADDR_SET: CTRL_MAC_ADDR is not offered"),
    (command(2, 0, b"\x05\x00"), "VLAN: CTRL_VLAN is not offered"),
    (command(3, 0), "ANNOUNCE: GUEST_ANNOUNCE is not offered"),
    (command(4, 0, b"\x00\x00"), "0 pairs"),
    (command(4, 0, b"\x05\x00"), "more pairs than the device has"),
    (command(4, 0, b"\x02"), "a short pair count"),
    (command(4, 1, bytes(20)), "RSS is not offered"),
    (command(5, 0, bytes(8)), "guest offloads are not offered"),
    (command(200, 0), "no such class"),
])
def test_commands_the_device_does_not_take_are_answered_err(data, why):
    control = NetControl(4, 1 << CTRL_RX | 1 << MQ | 1 << CTRL_VQ)
    assert control.command(data) == (VIRTIO_NET_ERR, None), why


def test_commands_of_features_not_negotiated_are_err():
    control = NetControl(4, 1 << CTRL_VQ)
    assert control.command(command(0, 0, b"\x01"))[0] == VIRTIO_NET_ERR
    assert control.command(command(4, 0, b"\x02\x00"))[0] == VIRTIO_NET_ERR
    assert control.command(command(0, 0, b"\x01"), truncated=True)[0] == VIRTIO_NET_ERR
    assert NetControl(4, 1 << MQ).command(command(4, 0, b"\x04\x00")) == (VIRTIO_NET_OK, 4)


# -- the control queue, served from guest memory --------------------------------


class BridgeRam(FakeRam):
    """Fake guest RAM with the bridge's memory contract: a range outside
    it raises OutsideGuestRam."""

    def read(self, gpa: int, length: int) -> bytes:
        try:
            return super().read(gpa, length)
        except FakeAccessFault as exc:
            raise OutsideGuestRam(str(exc)) from None

    def write(self, gpa: int, data: bytes) -> None:
        try:
            super().write(gpa, data)
        except FakeAccessFault as exc:
            raise OutsideGuestRam(str(exc)) from None


class Rig:
    """A guest control queue in fake RAM, driven by the simulated guest's
    virtqueue; the bridge's side serves it."""

    def __init__(self, *, num: int = 16, event_idx: bool = False, indirect: bool = False) -> None:
        self.ram = BridgeRam()
        self.alloc = GuestAllocator(self.ram.base, self.ram.size)
        self.kicks = 0

        async def notify(_vcpu):
            self.kicks += 1

        self.vq = GuestVirtqueue.create(self.ram, self.alloc, 4, num, notify, event_idx=event_idx,
                                        indirect=indirect)
        self.ring = GuestRing(num=num, desc=self.vq.desc_gpa, avail=self.vq.avail_gpa, used=self.vq.used_gpa)
        self.served = ServedQueue(self.ram, self.ring, event_idx=event_idx, indirect=indirect)

    def buffer(self, data: bytes) -> tuple[int, int]:
        gpa = self.alloc.allocate(max(len(data), 1), 8)
        self.ram.write(gpa, data)
        return gpa, len(data)

    async def add(self, data: bytes, ack_bytes: int = 1, *, split: bool = True):
        parts = [data[:2], data[2:]] if split and len(data) > 2 else [data]
        readable = [self.buffer(p) for p in parts if p]
        status = self.buffer(b"\xee" * ack_bytes) if ack_bytes else None
        completion = await self.vq.add(readable, [status] if status else [])
        return completion, status


async def test_a_command_is_read_whole_and_answered_in_its_ack_byte():
    for indirect in (False, True):
        rig = Rig(indirect=indirect)
        completion, status = await rig.add(command(4, 0, b"\x03\x00"))
        chain = rig.served.pop()
        assert chain.readable == command(4, 0, b"\x03\x00") and chain.writable == (status,)
        assert rig.served.pop() is None
        assert rig.served.push(chain, bytes([VIRTIO_NET_OK]))  # the guest wants its interrupt
        assert rig.vq.collect_used() == 1
        assert await completion == 1 and rig.ram.read(status[0], 1) == b"\x00"


async def test_the_emulation_enables_and_disables_pairs_in_order():
    rig = Rig()
    emu = NetEmulation(b"\x02" * 6, queue_pairs=4)
    emu.setup(1 << MQ | 1 << VERSION_1, 256, daemon_mq=True)
    emu.start(rig.served, 1 << MQ | 1 << CTRL_VQ | 1 << VERSION_1)
    calls = []

    async def enable(indices, on):
        calls.append((list(indices), on))

    first, _ = await rig.add(command(4, 0, b"\x03\x00"))
    second, _ = await rig.add(command(4, 0, b"\x02\x00"))
    third, status = await rig.add(command(4, 0, b"\x09\x00"))  # more than 4: ERR, nothing changes
    assert await emu.serve(enable)
    rig.vq.collect_used()
    assert calls == [([2, 3, 4, 5], True), ([4, 5], False)]
    assert emu.active_pairs() == 2 and emu.enabled_rings(range(8)) == [0, 1, 2, 3]
    assert [await c for c in (first, second, third)] == [1, 1, 1]
    assert rig.ram.read(status[0], 1) == bytes([VIRTIO_NET_ERR])
    emu.stop()
    assert await emu.serve(enable) is False and emu.active_pairs() == 1


async def test_a_command_without_room_for_its_ack_breaks_the_queue():
    rig = Rig()
    emu = NetEmulation(b"\x02" * 6)
    emu.setup(1 << VERSION_1, 2, daemon_mq=False)
    emu.start(rig.served, 1 << CTRL_VQ)
    await rig.add(command(0, 0, b"\x01"), ack_bytes=0)

    async def enable(indices, on):
        raise AssertionError("nothing to enable")

    with pytest.raises(RingError, match="no device-writable byte"):
        await emu.serve(enable)


async def test_event_idx_and_no_interrupt_decide_the_interrupt():
    rig = Rig(event_idx=True)
    await rig.add(command(0, 0, b"\x01"))
    await rig.add(command(0, 0, b"\x00"))
    one, two = rig.served.pop(), rig.served.pop()
    # avail_event follows what the bridge consumed: it wants every kick.
    assert rig.ram.read16(rig.ring.used + sr.avail_event_offset(16)) == 2
    assert rig.served.push(one, b"\x00")  # used_event 0: the first completion interrupts
    assert not rig.served.push(two, b"\x00")  # the guest has not moved used_event on
    plain = Rig()
    await plain.add(command(0, 0, b"\x01"))
    plain.ram.write16(plain.ring.avail + sr.AVAIL_FLAGS, sr.VIRTQ_AVAIL_F_NO_INTERRUPT)
    assert not plain.served.push(plain.served.pop(), b"\x00")


async def test_a_long_command_is_read_only_up_to_the_limit():
    rig = Rig()
    rig.served.max_readable = 16
    await rig.add(command(1, 0, bytes(100)))
    chain = rig.served.pop()
    assert len(chain.readable) == 16 and chain.readable_len == 102 and chain.truncated


def write_desc(rig: Rig, index: int, addr: int, length: int, flags: int, nxt: int, table: int | None = None) -> None:
    base = rig.ring.desc if table is None else table
    rig.ram.write(base + sr.DESC_SIZE * index, sr.DESC.pack(addr, length, flags, nxt))


def make_available(rig: Rig, head: int, count: int = 1) -> None:
    for i in range(count):
        rig.ram.write16(rig.ring.avail + sr.avail_ring_entry(i), head)
    rig.ram.write16(rig.ring.avail + sr.AVAIL_IDX, count)


@pytest.mark.parametrize("build, message", [
    (lambda r, b: (write_desc(r, 0, b, 2, sr.VIRTQ_DESC_F_NEXT, 1), write_desc(r, 1, b, 1, sr.VIRTQ_DESC_F_NEXT, 0)),
     "loops"),
    (lambda r, b: write_desc(r, 0, b, 2, sr.VIRTQ_DESC_F_NEXT, 16), "outside its table"),
    (lambda r, b: (write_desc(r, 0, b, 1, sr.VIRTQ_DESC_F_WRITE | sr.VIRTQ_DESC_F_NEXT, 1),
                   write_desc(r, 1, b, 2, 0, 0)), "device-readable buffer after a device-writable"),
    (lambda r, b: write_desc(r, 0, b, 32, sr.VIRTQ_DESC_F_INDIRECT, 0), "without VIRTIO_F_INDIRECT_DESC"),
    (lambda r, b: write_desc(r, 0, 0x10, 2, 0, 0), "out of range"),
])
async def test_a_broken_chain_is_a_ring_error(build, message):
    rig = Rig()
    buf = rig.alloc.allocate(64, 16)
    build(rig, buf)
    make_available(rig, 0)
    with pytest.raises(RingError, match=message):
        rig.served.pop()


async def test_an_avail_index_too_far_ahead_or_a_bad_head_is_a_ring_error():
    rig = Rig()
    rig.ram.write16(rig.ring.avail + sr.AVAIL_IDX, 17)
    with pytest.raises(RingError, match="more than the queue size"):
        rig.served.pop()
    rig2 = Rig()
    make_available(rig2, 16)
    with pytest.raises(RingError, match="names descriptor 16"):
        rig2.served.pop()


async def test_a_reply_longer_than_the_writable_space_is_refused():
    rig = Rig()
    await rig.add(command(0, 0, b"\x01"))
    with pytest.raises(RingError, match="1 device-writable bytes"):
        rig.served.push(rig.served.pop(), b"\x00\x00")


def test_the_served_queue_needs_a_power_of_two():
    with pytest.raises(ValueError):
        ServedQueue(FakeRam(), GuestRing(num=6, desc=0, avail=0, used=0))


async def test_trio_is_needed_only_by_the_guest_side():
    # serve() with nothing made available answers nothing and wants no interrupt.
    rig = Rig()
    emu = NetEmulation(b"\x02" * 6)
    emu.setup(1 << VERSION_1, 2, daemon_mq=False)
    emu.start(rig.served, 1 << CTRL_VQ)
    assert await emu.serve(lambda *a: trio.sleep(0)) is False


# -- what the front-end does for virtio-net (vhost_user.frontend) ------------------

async def _testpmd_frontend(nursery):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    daemon = FakeDaemon(trio.socket.from_stdlib_socket(b), **TESTPMD)
    nursery.start_soon(daemon.run)
    fe = await VhostUserFrontend.from_socket(trio.socket.from_stdlib_socket(a), nursery=nursery,
                                             handler=RecordingHandler(), default_num_queues=2, config_size=0,
                                             timeout=2.0, label="fake testpmd", rings_per_queue=2)
    return fe, daemon


async def test_get_queue_num_of_a_net_daemon_counts_pairs(nursery):
    fe, daemon = await _testpmd_frontend(nursery)
    assert fe.num_queues == 256  # 128 pairs, all the rings vhost-user can name
    await fe.aclose()


async def test_only_the_active_pairs_are_enabled_and_more_follow_on_demand(nursery, memfds, eventfds):
    fe, daemon = await _testpmd_frontend(nursery)
    rings = [ring(i, eventfds) for i in range(4)]
    await fe.start(1 << 32 | 1 << MQ, [region(memfds(), 0)], rings, enabled=[0, 1])
    assert daemon.payloads("SET_VRING_ENABLE") == [VringState(0, 1).pack(), VringState(1, 1).pack()]
    assert daemon.names()[-1] == "SET_STATUS"  # DRIVER_OK after the enables
    await fe.set_rings_enabled([2, 3], True)
    await fe.set_rings_enabled([2, 3], False)
    assert daemon.payloads("SET_VRING_ENABLE")[2:] == [VringState(i, on).pack() for on in (1, 0) for i in (2, 3)]
    with pytest.raises(VhostUserError, match=r"rings \[4\] are not running"):
        await fe.set_rings_enabled([4], True)
    with pytest.raises(VhostUserError, match="does not exist"):
        await fe.set_rings_enabled([256], True)
    assert not daemon.violations
    await fe.aclose()
