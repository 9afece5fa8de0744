"""All devices side by side: one simulated Xen guest with a virtio-blk,
virtio-fs, virtio-gpu and virtio-net device, one xen-vhost-bridge process
serving all four, each through its own real daemon (qemu-storage-daemon,
virtiofsd, vhost-user-gpu, dpdk-testpmd). The guest drives them at the
same time; the demo prints one line per device and passes only if every
device's result checks out on the host side. Run it with
``scripts/demo all``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable

import attrs
import trio

import demo_blk
import demo_fs
import demo_gpu
import demo_net
from bridge.blk_workload import compare_image
from bridge.processes import ChildFailed, run_trio
from demo_common import add_common_args, parse
from bridge.testbed import BlkTestbed, FsTestbed, GpuTestbed, MultiTestbed, NetTestbed, _Testbed
from xen.sim.guest import SimGuest
from xen.sim.guest_memory import GuestAllocator
from xen.sim.virtio_mmio_driver import VirtioMmioDriver

MiB = 1 << 20


@attrs.frozen
class Part:
    """One device of the demo: its testbed (daemon and flags) and what the
    guest does with it, giving (passed, one summary line)."""

    name: str
    testbed: Callable[[str, argparse.Namespace], _Testbed]
    exercise: Callable[[VirtioMmioDriver, _Testbed, SimGuest, argparse.Namespace], Awaitable[tuple[bool, str]]]


async def _blk(transport: VirtioMmioDriver, bed: BlkTestbed, guest: SimGuest, args) -> tuple[bool, str]:
    info, result, mirror = await demo_blk.exercise_blk(transport, args, guest.vcpus)
    await trio.to_thread.run_sync(compare_image, bed.image, mirror, result)
    line = (f"{result.requests} requests, {(result.bytes_written + result.bytes_read) / MiB:.1f} MiB, "
            f"{result.iops:.0f} IOPS, {result.mismatch_count} mismatches on the image")
    return result.mismatch_count == 0 and info["capacity"] * 512 == args.image_mib * MiB, line


async def _fs(transport: VirtioMmioDriver, bed: FsTestbed, guest: SimGuest, args) -> tuple[bool, str]:
    outcome = await demo_fs.exercise_fs(transport, bed.shared_dir, seed=args.seed, file_mib=args.file_mib)
    return outcome.ok, outcome.line


async def _gpu(transport: VirtioMmioDriver, bed: GpuTestbed, guest: SimGuest, args) -> tuple[bool, str]:
    outcome = await demo_gpu.exercise_gpu(transport, bed.output_dir, seed=args.seed)
    line = outcome.line.rsplit("; last frame", 1)[0]
    if outcome.png is not None:
        await trio.to_thread.run_sync(shutil.copyfile, outcome.png, args.png)
        line += f"; the last frame: {args.png}"
    return outcome.ok, line


async def _net(transport: VirtioMmioDriver, bed: NetTestbed, guest: SimGuest, args) -> tuple[bool, str]:
    outcome = await demo_net.exercise_net(transport, seed=args.seed, frames=args.frames, pairs=args.pairs,
                                          max_frame=args.max_frame, vcpus=guest.vcpus)
    return outcome.ok, outcome.line


PARTS = [
    Part("blk", lambda work, args: BlkTestbed(work, image_size=args.image_mib * MiB), _blk),
    Part("fs", lambda work, args: FsTestbed(work, tag=demo_fs.TAG), _fs),
    Part("gpu", lambda work, args: GpuTestbed(work, resolution=args.resolution), _gpu),
    Part("net", lambda work, args: NetTestbed(work, daemon_pairs=args.pairs), _net),
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/demo all", description=__doc__.split("\n\n")[0])
    demo_blk.add_workload_args(p, requests=100, image_mib=32)
    p.add_argument("--file-mib", type=int, default=1, help="fs: size of the large files each way in MiB (default: 1)")
    p.add_argument("--resolution", type=demo_gpu.parse_resolution, default=(1024, 768),
                   help="gpu: the display mode the bridge offers (default: 1024x768)")
    p.add_argument("--png", default=os.path.join(tempfile.gettempdir(), "xen-vhost-bridge-gpu.png"),
                   help="gpu: where to keep the last frame (default: %(default)s)")
    demo_net.add_net_args(p, frames=100)
    p.add_argument("--timeout", type=float, default=120, help="seconds each device's part may take (default: 120)")
    add_common_args(p, memory_help="the bridge's memory model, for every device")
    return parse(p, argv)


async def guest_program(multi: MultiTestbed, args: argparse.Namespace) -> list[tuple[bool, str]]:
    results: list[tuple[bool, str]] = [(False, "did not finish")] * len(PARTS)
    async with SimGuest.open(multi.control) as guest:
        allocator = GuestAllocator(guest.ram.base, guest.ram.size)

        async def run(i: int, part: Part, bed: _Testbed) -> None:
            transport = await VirtioMmioDriver.for_device(guest, allocator, bed.mmio_base, bed.irq)
            try:
                with trio.fail_after(args.timeout):
                    results[i] = await part.exercise(transport, bed, guest, args)
            except trio.TooSlowError:
                results[i] = (False, f"FAILED: not done after {args.timeout:g} s")
            except Exception as exc:  # one device failing is that device's line, not the demo's end
                results[i] = (False, f"FAILED: {type(exc).__name__}: {exc}")

        async with trio.open_nursery() as nursery:
            for i, (part, bed) in enumerate(zip(PARTS, multi.beds)):
                nursery.start_soon(run, i, part, bed)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="xvb-demo-all-") as work:
        print(f"demo: seed {args.seed}; starting {', '.join(p.name for p in PARTS)} daemons, xen-sim and "
              f"one xen-vhost-bridge")
        beds = []
        for part in PARTS:
            os.makedirs(os.path.join(work, part.name))
            beds.append(part.testbed(os.path.join(work, part.name), args))
        try:
            with MultiTestbed(work, beds, vcpus=args.vcpus, bridge_extra=["--memory", args.memory]) as multi:
                print(f"demo: one bridge (pid {multi.bridge.pid}, {args.memory} memory) serving "
                      + ", ".join(f"{p.name} at {b.mmio_base:#x} irq {b.irq} (daemon pid {b.daemon.pid})"
                                  for p, b in zip(PARTS, beds)))
                results = run_trio(guest_program, multi, args)
        except ChildFailed as exc:
            print(f"demo: FAILED: {exc}", file=sys.stderr)
            return 1
    for part, (ok, line) in zip(PARTS, results):
        print(f"demo: virtio-{part.name:<4} {'ok  ' if ok else 'FAIL'} {line}")
    ok = all(ok for ok, _ in results)
    print("demo: PASS" if ok else "demo: FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
