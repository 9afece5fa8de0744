"""The virtio-net battery (dpdk-testpmd's vhost PMD and the like).

The reference daemon forwards what comes in on a pair's transmit queue out
on the same pair's receive queue (testpmd's io forwarding), so the I/O
check sends frames of several sizes on every pair and wants each back,
byte for byte and in order. The bridge supplies the config space (the MAC
given with --mac here) and serves the control queue itself.

``{name}`` in --daemon-cmd is a name unique to the run, for a daemon's
private runtime files (DPDK's ``--file-prefix``); what DPDK leaves under
that name is removed whenever the daemon stops.
"""

from __future__ import annotations

import os
import random
import shutil
import struct

import trio

from bridge.daemons import dpdk_runtime_dir
from bridge.smoke.battery import Check, CheckFailed
from bridge.smoke.device_battery import DeviceBattery, Opened
from xen.sim.guest_memory import GuestAllocator
from xen.sim.guest_virtqueue import VirtioDriverError
from xen.sim.virtio_mmio_driver import VirtioMmioDriver
from xen.sim.virtio_net import VirtioNetDriver

MAC = "52:54:00:5e:00:53"
"""The MAC the harness gives the bridge (--mac) and looks for in config space."""
ETHERTYPE = b"\x88\xb5"  # IEEE 802 local experimental
SIZES = (60, 128, 590, 1514)

FEATURE_NAMES = {
    0: "NET_CSUM", 1: "NET_GUEST_CSUM", 2: "NET_CTRL_GUEST_OFFLOADS", 3: "NET_MTU", 5: "NET_MAC",
    6: "NET_GSO", 7: "NET_GUEST_TSO4", 8: "NET_GUEST_TSO6", 9: "NET_GUEST_ECN", 10: "NET_GUEST_UFO",
    11: "NET_HOST_TSO4", 12: "NET_HOST_TSO6", 13: "NET_HOST_ECN", 14: "NET_HOST_UFO", 15: "NET_MRG_RXBUF",
    16: "NET_STATUS", 17: "NET_CTRL_VQ", 18: "NET_CTRL_RX", 19: "NET_CTRL_VLAN", 20: "NET_CTRL_RX_EXTRA",
    21: "NET_GUEST_ANNOUNCE", 22: "NET_MQ", 23: "NET_CTRL_MAC_ADDR",
}


def prepare(workdir: str, options) -> dict[str, str]:
    return {"name": f"xvb-smoke-{os.getpid()}-{os.urandom(4).hex()}"}


def after_daemon(values: dict[str, str]) -> None:
    """Remove what DPDK keeps under the run's --file-prefix (and never removes)."""
    shutil.rmtree(dpdk_runtime_dir(values["name"]), ignore_errors=True)


async def open_net(rig, guest) -> Opened:
    allocator = GuestAllocator(guest.ram.base, guest.ram.size)
    transport = await VirtioMmioDriver.for_device(guest, allocator, rig.mmio_base, rig.irq)
    # One pair: a daemon forwards on as many as it was told to (testpmd:
    # --rxq/--txq, default 1), which it does not tell.
    net = await VirtioNetDriver.open(transport, pairs=1)
    return Opened(guest, transport, net)


def daemon_rings(opened: Opened) -> list[int]:
    """The receive and transmit rings; the control queue is the bridge's own."""
    net = opened.driver
    return sorted(i for pair in range(net.pairs) for i in (2 * pair, 2 * pair + 1))


def _frame(rng: random.Random, size: int, tag: int) -> bytes:
    head = b"\xff" * 6 + bytes.fromhex(MAC.replace(":", "")) + ETHERTYPE
    return head + struct.pack("<I", tag) + rng.randbytes(size - len(head) - 4)


async def _echo(rig, net: VirtioNetDriver, pair: int, frames: list[bytes]) -> None:
    rig.step = f"sending {len(frames)} frame(s) on pair {pair}"
    completions = [await net.send(pair, f) for f in frames]
    for completion in completions:
        await completion
    for i, sent in enumerate(frames):
        rig.step = f"waiting for frame {i + 1} of {len(frames)} ({len(sent)} bytes) to come back on pair {pair}"
        got = await net.receive(pair)
        if got != sent:
            tag = struct.unpack_from("<I", got, 14)[0] if len(got) >= 18 else None
            raise CheckFailed(f"pair {pair}: frame {i + 1} came back as {len(got)} bytes (tag {tag}), "
                              f"not the {len(sent)} bytes sent (tag {struct.unpack_from('<I', sent, 14)[0]})")


ROUND_TRIES = 10
ROUND_WAIT = 3.0
"""Seconds a round waits for its frame before sending another: a frame the
daemon had taken when it was killed is lost, as networks lose frames."""


async def io_round(rig, opened: Opened, n: int) -> None:
    """One frame echoed on pair 0, sent again if it is lost (a daemon
    killed with the frame in hand); echoes of earlier tries are skipped."""
    net = opened.driver
    for attempt in range(ROUND_TRIES):
        sent = _frame(random.Random(n), 100, n * ROUND_TRIES + attempt)
        rig.step = f"sending frame {n} (try {attempt + 1}) on pair 0 and waiting for it to come back"
        with trio.move_on_after(ROUND_WAIT):
            await (await net.send(0, sent))
            while await net.receive(0) != sent:
                pass
            return
    raise CheckFailed(f"frame {n} did not come back on pair 0 in {ROUND_TRIES} tries of {ROUND_WAIT:g} s")


def start_in_flight(rig, opened: Opened, nursery, count: int) -> None:
    # Receive buffers are always in flight at a net device; add frames to send.
    async def send(i: int) -> None:
        try:
            await opened.driver.send(0, _frame(random.Random(i), 200, 1000 + i))
        except* VirtioDriverError:
            pass  # the reset took it (also inside a driver's nursery): expected

    for i in range(count):
        nursery.start_soon(send, i)


async def check_echo(rig):
    async with rig.guest() as guest:
        opened = await rig.open(guest)
        net = opened.driver
        rng = random.Random(7)
        tag = 0
        frames = {}
        for pair in range(net.pairs):
            frames[pair] = []
            for size in SIZES:
                frames[pair].append(_frame(rng, size, tag))
                tag += 1
        async with trio.open_nursery() as nursery:
            for pair, sent in frames.items():
                nursery.start_soon(_echo, rig, net, pair, sent)
        await opened.transport.reset()
    return [f"{tag} frames ({', '.join(map(str, SIZES))} bytes) on {len(frames)} pair(s) came back intact, in order"]


async def check_config(rig, opened: Opened, daemon_config: bytes | None) -> list[str]:
    net = opened.driver
    if net.mac_text != MAC:
        raise CheckFailed(f"the guest reads MAC {net.mac_text}, the bridge was given {MAC}")
    if not net.link_up:
        raise CheckFailed("the guest reads the link as down")
    source = "the daemon's config space" if daemon_config else "supplied by the bridge"
    return [f"MAC {net.mac_text}, link up, {net.max_pairs} queue pair(s) ({source})"]


BATTERY = DeviceBattery(
    name="net",
    bridge_device="net",
    summary="virtio-net (dpdk-testpmd, io forwarding): frames sent on a pair must come back on it; "
            "{name} is a unique name for DPDK's --file-prefix",
    open=open_net,
    feature_names=FEATURE_NAMES,
    placeholders=("name",),
    prepare=prepare,
    after_daemon=after_daemon,
    bridge_flags=lambda rig: ["--mac", MAC],
    xenstore_virtio=lambda options: "net",
    io_checks=(Check("io.net.echo", check_echo),),
    io_round=io_round,
    start_in_flight=start_in_flight,
    check_config=check_config,
    daemon_rings=daemon_rings,
)
