"""The simulated guest's virtio-net driver against a register-level fake
device (tests/guest_driver_fakes.py) that echoes every transmitted frame
into the same pair's receive queue, the way dpdk-testpmd's io forwarding
does, spreading it over as many mergeable buffers as it needs."""

from __future__ import annotations

import struct

import attrs
import pytest

from tests.guest_driver_fakes import IRQ, MMIO_BASE, DevChain, FakeGuest, FakeMmioDevice
from xen.sim import virtio_mmio_driver as mmio
from xen.sim import virtio_net as vnet
from xen.sim.guest_memory import GuestAllocator

MAX_PAIRS = 4
QUEUE_SIZE = 16
OFFERED = vnet.DEFAULT_FEATURES | 1 << 0  # and CSUM, which the driver does not take


@attrs.define
class FakeNet:
    """Echoes frames; answers control commands with ``ack`` (used length
    ``ack_len``); records what it saw."""

    max_pairs: int = MAX_PAIRS
    ack: int = vnet.VIRTIO_NET_OK
    ack_len: int = 1
    num_buffers_override: int | None = None
    rx: dict[int, list[DevChain]] = attrs.Factory(dict)
    sent: list[tuple[int, bytes, DevChain]] = attrs.Factory(list)
    commands: list[tuple[bytes, int]] = attrs.Factory(list)

    def __call__(self, dev: FakeMmioDevice, queue: int, chain: DevChain) -> int | None:
        if queue == 2 * self.max_pairs:
            self.commands.append((chain.read_out(dev.ram), dev.status))
            chain.write_in(dev.ram, bytes([self.ack]))
            return self.ack_len
        if queue % 2 == 0:
            self.rx.setdefault(queue, []).append(chain)
            return None
        data = chain.read_out(dev.ram)
        self.sent.append((queue // 2, data, chain))
        self.deliver(dev, queue - 1, data[vnet.HDR_SIZE:])
        return 0

    def deliver(self, dev: FakeMmioDevice, queue: int, frame: bytes) -> None:
        mergeable = dev.driver_features >> vnet.VIRTIO_NET_F_MRG_RXBUF & 1
        waiting = self.rx.setdefault(queue, [])
        # How many buffers the frame and its header fill, in order.
        need, room = vnet.HDR_SIZE + len(frame), 0
        count = 0
        for chain in waiting:
            count += 1
            room += sum(n for _, n in chain.writable)
            if room >= need or not mergeable:
                break
        assert room >= need, "the driver posted too little to receive the frame"
        num = count if self.num_buffers_override is None else self.num_buffers_override
        data = vnet.HDR.pack(0, 0, 0, 0, 0, 0, num if mergeable else 0) + frame
        for _ in range(count):
            chain = waiting.pop(0)
            size = min(len(data), sum(n for _, n in chain.writable))
            chain.write_in(dev.ram, data[:size])
            data = data[size:]
            dev.complete(queue, chain.head, size)


class Rig:
    def __init__(self, nursery, *, features=OFFERED, max_pairs=MAX_PAIRS, status=1,
                 mac=bytes.fromhex("525400000042"), net: FakeNet | None = None) -> None:
        self.guest = FakeGuest()
        self.guest.nursery = nursery
        self.net = net or FakeNet(max_pairs=max_pairs)
        config = mac + struct.pack("<HH", status, max_pairs)
        self.dev = FakeMmioDevice(self.guest, device_id=vnet.VIRTIO_ID_NET, features=features, handler=self.net,
                                  config=config, queue_num_max=(QUEUE_SIZE,) * (2 * max_pairs + 1))
        self.alloc = GuestAllocator(self.guest.ram.base, self.guest.ram.size)
        self.t = mmio.VirtioMmioDriver(None, self.guest.ram, self.alloc, MMIO_BASE, IRQ, self.guest,
                                       reset_poll_interval=0.0005)

    async def open(self, **kw) -> vnet.VirtioNetDriver:
        return await vnet.VirtioNetDriver.open(self.t, **kw)


async def test_probe_reads_the_config_sets_up_the_pairs_and_the_control_queue(nursery):
    rig = Rig(nursery)
    net = await rig.open(pairs=2)
    assert net.mac_text == "52:54:00:00:00:42" and net.link_up
    assert (net.max_pairs, net.pairs, net.active_pairs) == (MAX_PAIRS, 2, 2)
    assert rig.t.features == vnet.DEFAULT_FEATURES
    # receiveq/transmitq of each pair used, and the control queue after
    # *every* pair the device has.
    assert sorted(rig.t.queues) == [0, 1, 2, 3, 2 * MAX_PAIRS]
    # VQ_PAIRS_SET after DRIVER_OK (the device starts with one pair).
    ((command, status),) = rig.net.commands
    assert command == bytes([vnet.VIRTIO_NET_CTRL_MQ, vnet.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET]) + b"\x02\x00"
    assert status & mmio.STATUS_DRIVER_OK
    # Both receive queues full of buffers.
    assert [len(rig.net.rx[q]) for q in (0, 2)] == [QUEUE_SIZE, QUEUE_SIZE]
    assert all(c.writable == [(c.writable[0][0], vnet.SMALL_BUFFER)] for c in rig.net.rx[0])


async def test_link_down_and_one_pair_without_mq(nursery):
    rig = Rig(nursery, features=OFFERED & ~(1 << vnet.VIRTIO_NET_F_MQ), status=0)
    net = await rig.open()
    assert not net.link_up and (net.max_pairs, net.pairs) == (1, 1)
    assert sorted(rig.t.queues) == [0, 1, 2]  # the control queue right after pair 0
    assert rig.net.commands == []  # one pair: nothing to tell


async def test_frames_spread_over_mergeable_buffers_come_back_whole_and_in_order(nursery):
    rig = Rig(nursery)
    net = await rig.open(pairs=2, rx_buffer_size=100)
    frames = {0: [b"a" * 60, b"b" * 450, b"c" * 88], 1: [b"d" * 300, b"e" * 1]}
    for pair, sent in frames.items():
        for f in sent:
            assert await (await net.send(pair, f)) == 0
    for pair, sent in frames.items():
        for f in sent:
            got, buffers = await net.receive_with_count(pair)
            assert got == f and buffers == -(-(len(f) + vnet.HDR_SIZE) // 100)
    # The receive queue was refilled as frames were taken.
    assert len(rig.net.rx[0]) == QUEUE_SIZE
    assert net.frames_sent == net.frames_received == 5


async def test_a_transmitted_frame_carries_a_header_of_zeros(nursery):
    rig = Rig(nursery)
    net = await rig.open(pairs=1)
    await (await net.send(0, b"x" * 70))
    await (await net.send(0, b"y" * 70, split=True))
    (_, whole, one), (_, split_data, two) = rig.net.sent
    assert whole[:vnet.HDR_SIZE] == bytes(vnet.HDR_SIZE) and whole[vnet.HDR_SIZE:] == b"x" * 70
    assert [n for _, n in one.readable] == [82] and [n for _, n in two.readable] == [12, 70]
    assert split_data == bytes(12) + b"y" * 70
    with pytest.raises(ValueError):
        await net.send(0, b"")


async def test_without_mergeable_buffers_each_buffer_holds_a_whole_frame(nursery):
    features = OFFERED & ~(1 << vnet.VIRTIO_NET_F_MRG_RXBUF)
    with pytest.raises(ValueError, match="at least 1530 without MRG_RXBUF"):
        await Rig(nursery, features=features).open(rx_buffer_size=512)
    rig = Rig(nursery, features=features)
    net = await rig.open(pairs=1, rx_split=True)
    assert all([n for _, n in c.writable] == [12, 1518] for c in rig.net.rx[0])
    await net.send(0, b"z" * 1514)
    assert await net.receive_with_count(0) == (b"z" * 1514, 1)


async def test_a_header_with_num_buffers_zero_is_an_error(nursery):
    rig = Rig(nursery, net=FakeNet(num_buffers_override=0))
    net = await rig.open(pairs=1, rx_buffer_size=100)
    await net.send(0, b"q" * 10)
    with pytest.raises(vnet.VirtioNetError, match="num_buffers 0"):
        await net.receive(0)


@pytest.mark.parametrize("ack, ack_len, message", [
    (vnet.VIRTIO_NET_ERR, 1, "refused 2 queue pairs"),
    (7, 1, "ack 7 is neither OK nor ERR"),
    (vnet.VIRTIO_NET_OK, 0, "wrote 0 bytes"),
])
async def test_control_answers_a_driver_does_not_take(nursery, ack, ack_len, message):
    rig = Rig(nursery, net=FakeNet(ack=ack, ack_len=ack_len))
    with pytest.raises(vnet.VirtioNetError, match=message):
        await rig.open(pairs=2)


async def test_no_control_queue_without_ctrl_vq(nursery):
    features = OFFERED & ~(1 << vnet.VIRTIO_NET_F_CTRL_VQ | 1 << vnet.VIRTIO_NET_F_MQ | 1 << vnet.VIRTIO_NET_F_CTRL_RX)
    rig = Rig(nursery, features=features)
    net = await rig.open()
    assert sorted(rig.t.queues) == [0, 1] and net.ctrl is None
    with pytest.raises(vnet.VirtioNetError, match="no control queue"):
        await net.control(vnet.VIRTIO_NET_CTRL_RX, vnet.VIRTIO_NET_CTRL_RX_PROMISC, b"\x01")


async def test_asking_more_pairs_than_the_device_has_fails_the_device(nursery):
    rig = Rig(nursery)
    with pytest.raises(vnet.VirtioNetError, match="5 pairs asked, the device has 4"):
        await rig.open(pairs=5)
    assert rig.dev.status & mmio.STATUS_FAILED


async def test_close_resets_the_device_and_frees_every_buffer(nursery):
    rig = Rig(nursery)
    net = await rig.open(pairs=3, rx_buffer_size=256)
    await net.send(1, b"m" * 500)
    assert await net.receive(1) == b"m" * 500
    await net.close()
    assert rig.dev.status == 0
    assert rig.alloc.allocation_count == 0
