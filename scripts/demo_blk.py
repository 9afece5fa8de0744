"""The blk demo: a simulated Xen guest does block I/O through the bridge to
a real qemu-storage-daemon, and every byte is checked. Run it with
``scripts/demo`` or ``scripts/demo blk`` (which install what is missing
first).

    simulated vCPUs -> ioreq page + event channels (xen-sim)
      -> xen-vhost-bridge -> vhost-user -> qemu-storage-daemon -> disk image
      -> call eventfd -> bridge -> set_irq_level -> the guest's interrupt

Exit status 0 only if the guest read back exactly what it wrote and the
image file holds exactly that too.
"""

from __future__ import annotations

import argparse
import sys
import tempfile


from bridge.blk_workload import WorkloadResult, compare_image, run_blk_workload
from bridge.processes import ChildFailed, run_trio
from demo_common import add_common_args, parse
from bridge.testbed import BlkTestbed
from xen.sim.guest import SimGuest
from xen.sim.guest_memory import GuestAllocator
from xen.sim.virtio_blk import VirtioBlkDriver
from xen.sim.virtio_mmio_driver import VirtioMmioDriver

MiB = 1 << 20


def add_workload_args(p: argparse.ArgumentParser, *, requests: int = 400, image_mib: int = 64) -> None:
    """The blk workload's knobs (also the blk part of ``scripts/demo all``)."""
    p.add_argument("--requests", type=int, default=requests,
                   help=f"writes to make (as many reads follow) (default: {requests})")
    p.add_argument("--min-size", type=int, default=4096, help="smallest write in bytes, a multiple of 512 (default: 4096)")
    p.add_argument("--max-size", type=int, default=MiB, help="largest write in bytes, a multiple of 512 (default: 1 MiB)")
    p.add_argument("--depth", type=int, default=32, help="requests in flight at once (default: 32)")
    p.add_argument("--image-mib", type=int, default=image_mib,
                   help=f"size of the temporary disk image (default: {image_mib})")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/demo blk", description=__doc__.split("\n\n")[0])
    add_workload_args(p)
    add_common_args(p, memory_help="the bridge's memory model: the daemon maps guest RAM, or only an arena of "
                    "in-flight buffers")
    p.add_argument("--arena-mib", type=int, default=64, help="shadow arena size in MiB (default: 64)")
    return parse(p, argv)


async def exercise_blk(transport: VirtioMmioDriver, args: argparse.Namespace, vcpus) -> tuple[dict, WorkloadResult, bytearray]:
    """The guest's side on a probed-for window: open the disk, write
    patterns with many requests in flight, flush, read everything back;
    then reset the device. Returns what the driver saw, the result and the
    guest's mirror of the disk (to compare with the image)."""
    blk = await VirtioBlkDriver.open(transport, queue_size=max(args.depth, 32))
    info = {
        "capacity": blk.capacity,
        "features": transport.features,
        "id": (await blk.get_id()).decode(errors="replace"),
        "vcpus": len(vcpus),
    }
    result, mirror = await run_blk_workload(
        blk,
        requests=args.requests,
        min_size=args.min_size,
        max_size=args.max_size,
        depth=args.depth,
        seed=args.seed,
        vcpus=vcpus,
    )
    info["interrupts"] = transport.interrupts_handled
    await transport.reset()
    return info, result, mirror


async def guest_program(bed: BlkTestbed, args: argparse.Namespace) -> tuple[dict, WorkloadResult, bytearray]:
    async with SimGuest.open(bed.control) as guest:
        allocator = GuestAllocator(guest.ram.base, guest.ram.size)
        transport = await VirtioMmioDriver.for_device(guest, allocator, bed.mmio_base, bed.irq)
        return await exercise_blk(transport, args, guest.vcpus)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    image_size = args.image_mib * MiB
    with tempfile.TemporaryDirectory(prefix="xvb-demo-blk-") as work:
        print(f"demo: seed {args.seed}; starting qemu-storage-daemon on a {args.image_mib} MiB image, xen-sim, xen-vhost-bridge")
        try:
            bridge_flags = ["--memory", args.memory, "--arena-mib", str(args.arena_mib)]
            with BlkTestbed(work, image_size=image_size, vcpus=args.vcpus, bridge_extra=bridge_flags) as bed:
                print(
                    f"demo: domU {bed.domid} ({bed.vcpus} vCPUs) -> virtio-mmio {bed.mmio_base:#x} irq {bed.irq} "
                    f"-> bridge (pid {bed.bridge.pid}, {args.memory} memory) -> qemu-storage-daemon "
                    f"(pid {bed.daemon.pid}) -> {bed.image}"
                )
                info, result, mirror = run_trio(guest_program, bed, args)
                compare_image(bed.image, mirror, result)
        except ChildFailed as exc:
            print(f"demo: FAILED: {exc}", file=sys.stderr)
            return 1

    capacity_ok = info["capacity"] * 512 == image_size
    print(f"demo: device id {info['id']!r}, capacity {info['capacity']} sectors "
          f"({'matches' if capacity_ok else 'DOES NOT MATCH'} the image), features {info['features']:#x}")
    writes = args.requests
    print(
        f"demo: {result.requests} requests ({writes} writes, 1 flush, {result.requests - writes - 1} reads), "
        f"{result.bytes_written / MiB:.1f} MiB written, {result.bytes_read / MiB:.1f} MiB read, "
        f"up to {args.depth} in flight on {info['vcpus']} vCPUs"
    )
    print(f"demo: {result.iops:.0f} IOPS ({result.io_seconds:.2f} s of I/O), {info['interrupts']} guest interrupts")
    print(f"demo: {result.mismatch_count} mismatches (guest read-back and the image file, byte for byte)")
    for line in result.mismatches:
        print(f"demo:   {line}")
    ok = capacity_ok and result.mismatch_count == 0
    print("demo: PASS" if ok else "demo: FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
