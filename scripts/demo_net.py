"""The net demo: a simulated Xen guest's virtio-net driver sends frames on
several queue pairs through the bridge to DPDK's dpdk-testpmd, whose io
forwarding sends every frame straight back; the guest checks each one.
Run it with ``scripts/demo net``.

    simulated vCPUs -> xen-sim -> xen-vhost-bridge -> vhost-user -> dpdk-testpmd (vhost PMD, io forwarding)
      -> the same pair's receive queue -> the guest

The bridge serves the control queue itself (testpmd only has the data
rings): the guest's VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET turns the extra pairs
on at testpmd. Exit status 0 only if every frame came back intact, on the
pair it was sent on, in the order it was sent.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from typing import Any

import attrs

from bridge.processes import ChildFailed, run_trio
from demo_common import add_common_args, parse
from bridge.testbed import NetTestbed
from xen.sim.guest import SimGuest
from xen.sim.guest_memory import GuestAllocator
from xen.sim.virtio_mmio_driver import VirtioMmioDriver
from xen.sim.virtio_net import VIRTIO_NET_F_MRG_RXBUF, VirtioNetDriver

MiB = 1 << 20
MAC = "52:54:00:d3:40:01"
RX_BUFFER = 512
"""Small receive buffers: a full-size frame spans three of them (mergeable
receive buffers, num_buffers in the header)."""
BATCH = 8
"""Frames in flight per pair at a time: well inside the receive ring."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/demo net", description=__doc__.split("\n\n")[0])
    add_net_args(p)
    add_common_args(p)
    return parse(p, argv)


def add_net_args(p: argparse.ArgumentParser, *, frames: int = 200, pairs: int = 2) -> None:
    """The net workload's knobs (``scripts/demo all`` shares them)."""
    p.add_argument("--frames", type=int, default=frames, help=f"frames per queue pair (default: {frames})")
    p.add_argument("--pairs", type=int, default=pairs,
                   help=f"queue pairs testpmd forwards and the guest uses (default: {pairs})")
    p.add_argument("--max-frame", type=int, default=3000,
                   help="largest frame in bytes, beyond 1514 only thanks to mergeable buffers (default: 3000)")


@attrs.frozen
class NetOutcome:
    ok: bool
    line: str


def _frame(rng: random.Random, size: int, mac: bytes, pair: int, seq: int) -> bytes:
    head = b"\xff" * 6 + mac + b"\x88\xb5" + bytes([pair]) + seq.to_bytes(4, "little")
    return head + rng.randbytes(size - len(head))


async def exercise_net(transport: VirtioMmioDriver, *, seed: int, frames: int, pairs: int,
                       max_frame: int = 3000, vcpus: list[Any] | None = None) -> NetOutcome:
    """Open the device with ``pairs`` queue pairs (the daemon must forward
    that many), send ``frames`` frames of random sizes (60 to
    ``max_frame`` bytes) on each pair, in batches, and check every frame
    that comes back; reset the device at the end."""
    rng = random.Random(seed)
    net = await VirtioNetDriver.open(transport, pairs=pairs, rx_buffer_size=RX_BUFFER)
    mergeable = transport.has_feature(VIRTIO_NET_F_MRG_RXBUF)
    largest = max_frame if mergeable else min(max_frame, 1514)
    problems: list[str] = []
    moved = 0
    widest = 0
    start = time.monotonic()
    for first in range(0, frames, BATCH):
        batch = range(first, min(first + BATCH, frames))
        sent: dict[int, list[bytes]] = {}
        waits = []
        for pair in range(pairs):
            vcpu = vcpus[pair % len(vcpus)] if vcpus else None
            sent[pair] = [_frame(rng, rng.randrange(60, largest + 1), net.mac, pair, seq) for seq in batch]
            for f in sent[pair]:
                waits.append(await net.send(pair, f, split=bool(len(f) % 2), vcpu=vcpu))
        for completion in waits:
            await completion
        for pair in range(pairs):
            for want in sent[pair]:
                got, buffers = await net.receive_with_count(pair)
                widest = max(widest, buffers)
                moved += len(want)
                if got != want and len(problems) < 5:
                    problems.append(f"pair {pair}: a {len(want)}-byte frame came back as {len(got)} different bytes")
    seconds = time.monotonic() - start
    total = frames * pairs
    await net.close()
    if net.frames_received != total:
        problems.append(f"{net.frames_received} of {total} frames came back")
    line = (f"mac {net.mac_text}, {net.active_pairs} of {net.max_pairs} pairs active: {total} frames "
            f"(60-{largest} bytes, {moved / MiB:.1f} MiB) echoed by testpmd, "
            f"{total / seconds:.0f} frames/s; "
            + (f"mergeable buffers of {RX_BUFFER} bytes, up to {widest} per frame; " if mergeable else "")
            + ("all intact, on their pair, in order" if not problems else "; ".join(problems)))
    return NetOutcome(not problems, line)


async def run_net_guest(guest: SimGuest, mmio_base: int, irq: int, *, allocator: GuestAllocator | None = None,
                        seed: int = 0, frames: int = 200, pairs: int = 2, max_frame: int = 3000) -> NetOutcome:
    """The guest side for a net device of a running guest (``scripts/demo
    all``): the window at ``mmio_base`` with ``irq``, its DMA as the
    device tree says."""
    if allocator is None:
        allocator = GuestAllocator(guest.ram.base, guest.ram.size)
    transport = await VirtioMmioDriver.for_device(guest, allocator, mmio_base, irq)
    return await exercise_net(transport, seed=seed, frames=frames, pairs=pairs, max_frame=max_frame,
                              vcpus=guest.vcpus)


async def guest_program(bed: NetTestbed, args: argparse.Namespace) -> NetOutcome:
    async with SimGuest.open(bed.control) as guest:
        return await run_net_guest(guest, bed.mmio_base, bed.irq, seed=args.seed, frames=args.frames,
                                   pairs=args.pairs, max_frame=args.max_frame)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not 1 <= args.pairs <= 128 or args.frames < 1 or not 60 <= args.max_frame <= 9000:
        print("demo: --pairs is 1 to 128, --frames at least 1, --max-frame 60 to 9000", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="xvb-demo-net-") as work:
        print(f"demo: seed {args.seed}; starting dpdk-testpmd ({args.pairs} pairs, io forwarding), xen-sim, "
              "xen-vhost-bridge")
        try:
            with NetTestbed(work, mac=MAC, daemon_pairs=args.pairs, vcpus=args.vcpus,
                            bridge_extra=["--memory", args.memory]) as bed:
                print(f"demo: domU {bed.domid} -> virtio-mmio {bed.mmio_base:#x} irq {bed.irq} -> bridge "
                      f"(pid {bed.bridge.pid}, {args.memory} memory) -> dpdk-testpmd (pid {bed.daemon.pid})")
                outcome = run_trio(guest_program, bed, args)
        except ChildFailed as exc:
            print(f"demo: FAILED: {exc}", file=sys.stderr)
            return 1
    print(f"demo: virtio-net {outcome.line}")
    print("demo: PASS" if outcome.ok else "demo: FAIL")
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main())
