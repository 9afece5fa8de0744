"""End to end: the simulated guest's virtio-net driver -> xen-sim -> the
bridge (its own process, the real CLI, --device net) -> a real
dpdk-testpmd (vhost PMD, io forwarding) and back: every frame the guest
transmits on pair N, testpmd sends back on pair N's receive queue. Each
frame is checked byte for byte and in order; the control queue, which the
bridge serves itself, is checked by what testpmd then forwards."""

from __future__ import annotations

import contextlib
import os
import random
import struct

import pytest
import trio

from bridge import split_ring as sr
from bridge.testbed import NetTestbed
from bridge.virtio_mmio import QUEUE_NOTIFY
from xen.sim.guest import SimGuest
from xen.sim.guest_memory import GuestAllocator
from xen.sim.virtio_mmio_driver import VirtioMmioDriver
from xen.sim.virtio_net import (
    DEFAULT_FEATURES,
    HDR_SIZE,
    VIRTIO_ID_NET,
    VIRTIO_NET_CTRL_ANNOUNCE,
    VIRTIO_NET_CTRL_ANNOUNCE_ACK,
    VIRTIO_NET_CTRL_MAC,
    VIRTIO_NET_CTRL_MAC_ADDR_SET,
    VIRTIO_NET_CTRL_MAC_TABLE_SET,
    VIRTIO_NET_CTRL_MQ,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
    VIRTIO_NET_CTRL_RX,
    VIRTIO_NET_CTRL_RX_ALLMULTI,
    VIRTIO_NET_CTRL_RX_PROMISC,
    VIRTIO_NET_CTRL_VLAN,
    VIRTIO_NET_CTRL_VLAN_ADD,
    VIRTIO_NET_ERR,
    VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_OK,
    VirtioNetDriver,
)

pytestmark = pytest.mark.e2e

GUEST_TIMEOUT = 60
"""Seconds a test's guest session may take: a frame that never comes back
fails the test instead of hanging it."""
DAEMON_PAIRS = 4
MAC = "52:54:00:ab:cd:01"
MRG_BUFFER = 512
"""Receive buffers this small make every frame over 500 bytes span several."""

# Feature bits of the offer (virtio 1.2 5.1.3).
CSUM, GUEST_CSUM, CTRL_GUEST_OFFLOADS, MTU, MAC_BIT, GSO = 0, 1, 2, 3, 5, 6
HOST_TSO4, HOST_TSO6, HOST_ECN = 11, 12, 13
STATUS, CTRL_VQ, CTRL_RX, CTRL_VLAN, CTRL_RX_EXTRA, GUEST_ANNOUNCE, CTRL_MAC_ADDR = 16, 17, 18, 19, 20, 21, 23
RING_PACKED = 34


@pytest.fixture(params=["passthrough", "shadow"])
def memory(request):
    """Every test runs in both memory models."""
    return request.param


@contextlib.contextmanager
def net_testbed(workdir, memory, **kwargs):
    bed = NetTestbed(workdir, mac=MAC, daemon_pairs=kwargs.pop("daemon_pairs", DAEMON_PAIRS),
                     bridge_extra=["--memory", memory, *kwargs.pop("bridge_extra", ())], **kwargs).start()
    daemon_pid, runtime_dir = bed.daemon.pid, bed.daemon.runtime_dir
    assert os.path.isdir(runtime_dir)  # testpmd made it: it is what stop must remove
    try:
        yield bed
    finally:
        bridge = bed.bridge
        bed.stop()
    assert bridge is None or bridge.proc.returncode == 0, bridge.output()
    for pid in (daemon_pid, bridge.pid if bridge else None):
        if pid is not None:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    # Nothing left behind: sockets, and testpmd's runtime files under /var/run/dpdk.
    leftovers = [p for p in (bed.daemon_socket, bed.control, runtime_dir) if os.path.exists(p)]
    assert leftovers == []


@pytest.fixture
def bed(workdir, memory):
    with net_testbed(workdir, memory) as testbed:
        yield testbed


@contextlib.asynccontextmanager
async def guest_net(bed: NetTestbed, **kwargs):
    """A guest session with the net device open, bounded in time."""
    with trio.fail_after(GUEST_TIMEOUT):
        async with SimGuest.open(bed.control) as guest:
            # DMA as the device tree says (grants with grant_usage=1), as Linux does.
            transport = await VirtioMmioDriver.for_device(guest, GuestAllocator(guest.ram.base, guest.ram.size),
                                                          bed.mmio_base, bed.irq)
            yield transport, await VirtioNetDriver.open(transport, **kwargs)


def frame(rng: random.Random, size: int, tag: int) -> bytes:
    """An Ethernet frame: broadcast destination, the guest's source, an
    experimental EtherType, and random payload starting with a tag."""
    head = b"\xff" * 6 + bytes.fromhex(MAC.replace(":", "")) + b"\x88\xb5"
    body = struct.pack("<I", tag) + rng.randbytes(size - len(head) - 4)
    return head + body


async def echo_round(net: VirtioNetDriver, pairs: range, sizes: list[int], rng: random.Random, tag: int,
                     *, expect_buffers=None) -> int:
    """Send frames of ``sizes`` on every pair in turn (interleaved), then
    check that each pair gets exactly its frames back, intact and in order.
    Returns the next tag."""
    sent: dict[int, list[bytes]] = {pair: [] for pair in pairs}
    completions = []
    for size in sizes:
        for pair in pairs:
            f = frame(rng, size, tag)
            tag += 1
            sent[pair].append(f)
            completions.append(await net.send(pair, f, split=bool(tag % 2)))
    for completion in completions:
        assert await completion == 0  # a transmit buffer: the device writes nothing
    for pair in pairs:
        for want in sent[pair]:
            got, buffers = await net.receive_with_count(pair)
            assert len(got) == len(want) and got == want, (pair, len(want), len(got))
            if expect_buffers is not None:
                assert buffers == expect_buffers(len(want)), (pair, len(want), buffers)
    return tag


def spans(size: int) -> int:
    """Mergeable buffers of MRG_BUFFER bytes a frame and its header fill."""
    return -(-(size + HDR_SIZE) // MRG_BUFFER)


async def test_frames_come_back_intact_and_in_order_on_every_pair(bed):
    rng = random.Random(8)
    async with guest_net(bed, pairs=DAEMON_PAIRS, rx_buffer_size=MRG_BUFFER) as (transport, net):
        assert (transport.version, transport.device_id) == (2, VIRTIO_ID_NET)
        # The config the bridge supplies: testpmd has none.
        assert net.mac_text == MAC and net.link_up
        assert net.max_pairs == 128  # GET_QUEUE_NUM: DPDK 22.11 counts 128 pairs
        assert net.active_pairs == DAEMON_PAIRS  # VQ_PAIRS_SET on the bridge's control queue
        offered = transport.device_features
        for bit in (MAC_BIT, STATUS, CTRL_VQ, CTRL_RX, VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF, 32):
            assert offered >> bit & 1, bit
        # What the bridge cannot honour is not offered, whatever testpmd says.
        for bit in (GSO, MTU, CTRL_GUEST_OFFLOADS, CTRL_VLAN, CTRL_RX_EXTRA, GUEST_ANNOUNCE, CTRL_MAC_ADDR,
                    RING_PACKED):
            assert not offered >> bit & 1, bit
        # testpmd offers HOST_ECN without HOST_TSO4/6, which it requires.
        assert not offered >> HOST_ECN & 1 and not offered >> HOST_TSO4 & 1 and not offered >> HOST_TSO6 & 1
        assert transport.features == DEFAULT_FEATURES & offered == DEFAULT_FEATURES
        tag = 0
        for _ in range(3):
            sizes = [60, 1514, 3000] + [rng.randrange(60, 1515) for _ in range(8)]
            tag = await echo_round(net, range(DAEMON_PAIRS), sizes, rng, tag, expect_buffers=spans)
        assert net.frames_received == net.frames_sent == tag
        await net.close()
        assert await transport.status() == 0


async def test_without_mergeable_buffers_each_frame_fills_one_buffer(bed):
    rng = random.Random(9)
    features = DEFAULT_FEATURES & ~(1 << VIRTIO_NET_F_MRG_RXBUF)
    async with guest_net(bed, pairs=2, features=features, rx_split=True) as (transport, net):
        assert not transport.has_feature(VIRTIO_NET_F_MRG_RXBUF)
        sizes = [60, 1514, 64, 1000, 1514, 61]
        await echo_round(net, range(2), sizes, rng, 0, expect_buffers=lambda _size: 1)
        await net.close()


async def test_a_pair_carries_frames_only_once_the_control_queue_enables_it(bed):
    rng = random.Random(10)
    async with guest_net(bed, pairs=2, set_pairs=False, rx_buffer_size=MRG_BUFFER) as (_transport, net):
        assert net.active_pairs == 1
        tag = await echo_round(net, range(1), [60, 1514], rng, 0)
        # Pair 1's rings run at testpmd, but disabled: nothing is taken.
        waiting = frame(rng, 200, 1000)
        completion = await net.send(1, waiting)
        await trio.sleep(0.5)
        assert not completion.done and not net.rx[1].frames
        await net.set_queue_pairs(2)  # VQ_PAIRS_SET -> SET_VRING_ENABLE for rings 2 and 3
        assert await completion == 0
        assert await net.receive(1) == waiting
        tag = await echo_round(net, range(2), [60, 1514, 3000], rng, tag)
        # Back to one pair, then out-of-range requests are refused.
        await net.set_queue_pairs(1)
        for pairs in (0, 129, 0xFFFF):
            ack = await net.control(VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", pairs))
            assert ack == VIRTIO_NET_ERR, pairs
        ack = await net.control(VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, b"\x02")  # short
        assert ack == VIRTIO_NET_ERR
        await echo_round(net, range(1), [60, 1514], rng, tag)
        await net.close()


async def test_control_commands_are_answered_as_qemu_answers_them(bed):
    rng = random.Random(11)
    async with guest_net(bed, pairs=1, rx_buffer_size=MRG_BUFFER) as (_transport, net):
        table = struct.pack("<I", 1) + bytes(6) + struct.pack("<I", 2) + b"\x01\x00\x5e\x00\x00\x01" * 2
        answers = {
            "promisc off": (VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, b"\x00", VIRTIO_NET_OK),
            "allmulti on": (VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_ALLMULTI, b"\x01", VIRTIO_NET_OK),
            "rx mode with 2 bytes": (VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, b"\x01\x01", VIRTIO_NET_ERR),
            "rx extra (not offered)": (VIRTIO_NET_CTRL_RX, 2, b"\x01", VIRTIO_NET_ERR),
            "mac table": (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, table, VIRTIO_NET_OK),
            "mac table too short": (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, table[:-1], VIRTIO_NET_ERR),
            "mac address set": (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET, bytes(6), VIRTIO_NET_ERR),
            "vlan add": (VIRTIO_NET_CTRL_VLAN, VIRTIO_NET_CTRL_VLAN_ADD, b"\x05\x00", VIRTIO_NET_ERR),
            "announce ack": (VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK, b"", VIRTIO_NET_ERR),
            "unknown class": (99, 0, b"", VIRTIO_NET_ERR),
        }
        for what, (cls, cmd, data, want) in answers.items():
            assert await net.control(cls, cmd, data) == want, what
        # Best effort, as the spec allows: nothing is filtered, the frames
        # go on (promiscuous mode is off, and their destination is not ours).
        await echo_round(net, range(1), [60, 1514], rng, 0)
        await net.close()


async def test_the_guest_resets_and_starts_the_device_again(bed):
    rng = random.Random(12)
    tag = 0
    async with guest_net(bed, pairs=DAEMON_PAIRS, rx_buffer_size=MRG_BUFFER) as (transport, net):
        tag = await echo_round(net, range(DAEMON_PAIRS), [60, 1514], rng, tag)
        # Frames sent and never received before the reset are the device's
        # to drop; the next session starts clean.
        await net.send(0, frame(rng, 100, 9999))
        await net.close()
        assert await transport.status() == 0
        # Another driver session on the same device: fewer pairs, no
        # mergeable buffers, other queue addresses.
        features = DEFAULT_FEATURES & ~(1 << VIRTIO_NET_F_MRG_RXBUF)
        net = await VirtioNetDriver.open(transport, pairs=2, features=features)
        assert net.active_pairs == 2
        for _ in range(2):
            while net.rx[0].frames:  # a frame of the old session may still come in before the reset
                net.rx[0].frames.popleft()
            tag = await echo_round(net, range(2), [1514, 60], rng, tag, expect_buffers=lambda _size: 1)
        await net.close()
        net = await VirtioNetDriver.open(transport, pairs=DAEMON_PAIRS, rx_buffer_size=MRG_BUFFER)
        tag = await echo_round(net, range(DAEMON_PAIRS), [3000, 60], rng, tag, expect_buffers=spans)
        await net.close()
    assert bed.bridge.alive()
    assert "DEVICE_NEEDS_RESET" not in bed.bridge.output() and "needs a reset" not in bed.bridge.output()


@pytest.mark.parametrize("queue_pairs", [1, 2])
async def test_queue_pairs_and_mac_are_what_the_flags_say(workdir, memory, queue_pairs):
    rng = random.Random(13)
    with net_testbed(workdir, memory, daemon_pairs=2, queue_pairs=queue_pairs) as bed:
        async with guest_net(bed, rx_buffer_size=MRG_BUFFER) as (transport, net):
            assert net.mac_text == MAC
            # One pair: no MQ, and the control queue is queue 2.
            assert transport.has_feature(VIRTIO_NET_F_MQ) == (queue_pairs > 1)
            assert net.max_pairs == queue_pairs == net.pairs
            assert sorted(transport.queues) == list(range(2 * queue_pairs + 1))
            assert net.ctrl is transport.queues[2 * queue_pairs]
            await echo_round(net, range(queue_pairs), [60, 1514, 3000], rng, 0, expect_buffers=spans)
            assert await net.control(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, b"\x01") == VIRTIO_NET_OK
            await net.close()


async def test_a_restarted_testpmd_takes_over_the_running_rings(bed):
    """testpmd crashes (SIGKILL) with the guest's rings running; a new one
    on the same socket gets the features, memory, rings and enabled pairs
    back from the bridge (--reconnect), and frames flow on every pair again
    without the guest resetting anything."""
    rng = random.Random(14)
    async with guest_net(bed, pairs=2, rx_buffer_size=MRG_BUFFER) as (transport, net):
        tag = await echo_round(net, range(2), [60, 1514, 3000], rng, 0)
        old = bed.daemon
        await trio.to_thread.run_sync(bed.restart_daemon)
        assert not os.path.exists(old.runtime_dir) and bed.daemon.pid != old.pid
        # The bridge redials in the background; frames sent meanwhile wait in the rings.
        tag = await echo_round(net, range(2), [60, 1514, 3000], rng, tag)
        assert not await transport.needs_reset()
        await net.close()
    assert "the daemon is back" in bed.bridge.output()


async def test_frames_keep_flowing_while_testpmd_polls_the_rings(bed):
    """testpmd never sleeps: its forwarding core reads every ring's avail
    index in a loop, so it reads each index while the bridge stores it. The
    store must never show it anything but the old or the new index (with
    shadow memory the bridge writes the indices testpmd polls: a 0 seen in
    passing made it take a whole lap of stale descriptors). Enough frames
    go through every pair that the window would be hit; none may be lost,
    duplicated or reordered, and the device must never need a reset."""
    rng = random.Random(18)
    async with guest_net(bed, pairs=DAEMON_PAIRS, rx_buffer_size=MRG_BUFFER) as (transport, net):
        tag = 0
        for _ in range(25):
            sizes = [rng.randrange(60, 1515) for _ in range(16)]
            tag = await echo_round(net, range(DAEMON_PAIRS), sizes, rng, tag)
        assert net.frames_received == net.frames_sent == tag
        assert not await transport.needs_reset()
        await net.close()
    assert "needs a reset" not in bed.bridge.output()


async def test_guest_ram_in_two_banks_is_two_regions_for_testpmd(workdir):
    """A guest of more than 3 GiB has a second RAM bank (Xen on Arm's
    layout); in passthrough testpmd maps both (it takes at most 8 regions:
    no CONFIGURE_MEM_SLOTS), and frames flow. testpmd answers SET_MEM_TABLE
    of that much RAM only after seconds (it builds its page table in 4 KiB
    pages without hugepages: about 8 s here), past the default --timeout
    of 5 s: the bridge gives a daemon time by the size of what it maps."""
    rng = random.Random(15)
    with net_testbed(workdir, "passthrough", daemon_pairs=1, ram_mib=3072 + 64) as bed:
        async with guest_net(bed, pairs=1, rx_buffer_size=MRG_BUFFER) as (_transport, net):
            await echo_round(net, range(1), [60, 1514, 3000], rng, 0, expect_buffers=spans)
            await net.close()
        assert "bridge.device: virtio-net started" in bed.bridge.output()
    sizes = [int(s, 16) for s in _region_sizes(bed.daemon_output)]
    assert sizes == [3072 << 20, 64 << 20]


def _region_sizes(testpmd_output: str) -> list[str]:
    return [line.rsplit("0x", 1)[1] for line in testpmd_output.splitlines()
            if "guest memory region size:" in line]


async def test_a_guest_that_gives_grant_references(workdir):
    """virtio = ["net,grant_usage=1"]: every address the guest's driver gives
    is a grant reference (xen-grant-dma), the control queue's too, which the
    bridge serves through grant mappings; only shadow memory can serve it."""
    rng = random.Random(16)
    with net_testbed(workdir, "shadow", daemon_pairs=2, virtio="net,grant_usage=1") as bed:
        async with guest_net(bed, pairs=2, rx_buffer_size=MRG_BUFFER) as (transport, net):
            assert type(transport.dma).__name__ == "GrantDma"
            assert net.active_pairs == 2  # VQ_PAIRS_SET read through a grant
            await echo_round(net, range(2), [60, 1514, 3000], rng, 0, expect_buffers=spans)
            assert await net.control(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, b"\x01") == VIRTIO_NET_OK
            await net.close()


async def test_a_broken_control_queue_needs_a_reset_and_the_reset_recovers(bed):
    """The guest makes a control 'chain' available whose head is no
    descriptor of the queue: the bridge, which serves that queue, reports
    DEVICE_NEEDS_RESET (and stays up); after the guest's reset the device
    works again."""
    rng = random.Random(17)
    async with guest_net(bed, pairs=2, rx_buffer_size=MRG_BUFFER) as (transport, net):
        ctrl = net.ctrl
        idx = ctrl.avail_idx
        transport.ram.write(ctrl.avail_gpa + sr.avail_ring_entry(idx % ctrl.size), struct.pack("<H", ctrl.size))
        transport.ram.write(ctrl.avail_gpa + sr.AVAIL_IDX, struct.pack("<H", (idx + 1) & 0xFFFF))
        seen = transport.config_changes
        await transport.write_reg(QUEUE_NOTIFY, 2 * net.max_pairs)
        await transport.wait_config_change(seen)
        assert await transport.needs_reset()
        await net.close()
        net = await VirtioNetDriver.open(transport, pairs=2, rx_buffer_size=MRG_BUFFER)
        assert not await transport.needs_reset()
        await echo_round(net, range(2), [60, 1514], rng, 0)
        await net.close()
    assert "the guest broke queue 256" in bed.bridge.output()
    assert bed.bridge.alive()
