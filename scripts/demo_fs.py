"""The fs demo: a simulated Xen guest's virtio-fs driver (a FUSE client)
reads, writes and lists files of a host directory through the bridge and
QEMU's virtiofsd, and the host checks what the guest wrote. Run it with
``scripts/demo fs``.

    simulated vCPUs -> xen-sim -> xen-vhost-bridge -> vhost-user -> virtiofsd -> a host directory

Exit status 0 only if the guest read exactly what the host wrote, the host
reads exactly what the guest wrote, and the guest's listing is the host's.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile

import attrs

from bridge.processes import ChildFailed, run_trio
from demo_common import add_common_args, parse
from bridge.testbed import FsTestbed
from xen.sim.guest import SimGuest
from xen.sim.guest_memory import GuestAllocator
from xen.sim.virtio_fs import VirtioFsDriver
from xen.sim.virtio_mmio_driver import VirtioMmioDriver

MiB = 1 << 20
TAG = "demo-share"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/demo fs", description=__doc__.split("\n\n")[0])
    p.add_argument("--file-mib", type=int, default=4, help="size of the large files each way in MiB (default: 4)")
    add_common_args(p)
    return parse(p, argv)


@attrs.frozen
class FsOutcome:
    ok: bool
    line: str


def host_files(rng: random.Random, file_mib: int) -> dict[str, bytes]:
    return {
        "hello.txt": b"written by the host, read by a Xen guest through virtiofsd\n",
        "data/big.bin": rng.randbytes(file_mib * MiB + 4321),
    }


async def exercise_fs(transport: VirtioMmioDriver, shared_dir: str, *, seed: int, file_mib: int) -> FsOutcome:
    """The host puts files in ``shared_dir``; the guest mounts the tag,
    reads them, writes its own, lists the root; the host then checks. The
    device is reset at the end."""
    rng = random.Random(seed)
    theirs = host_files(rng, file_mib)
    for name, data in theirs.items():
        path = os.path.join(shared_dir, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    ours = {"from-guest.txt": b"written by the Xen guest\n", "guest.bin": rng.randbytes(file_mib * MiB + 1234)}

    fs = await VirtioFsDriver.open(transport)
    problems = []
    for name, data in theirs.items():
        if await fs.read_file(name) != data:
            problems.append(f"guest read {name} wrong")
    for name, data in ours.items():
        await fs.write_file(name, data)
    listing = sorted(await fs.listdir("/"))
    requests = fs.requests_sent
    await fs.close()
    await transport.reset()

    for name, data in ours.items():
        with open(os.path.join(shared_dir, name), "rb") as f:
            if f.read() != data:
                problems.append(f"host read {name} wrong")
    host_listing = sorted(os.listdir(shared_dir))
    if listing != host_listing:
        problems.append(f"guest listed {listing}, host has {host_listing}")
    moved = sum(map(len, theirs.values())) + sum(map(len, ours.values()))
    line = (f"tag {fs.tag!r}: read {len(theirs)} host files, wrote {len(ours)}, listed {len(listing)} entries; "
            f"{moved / MiB:.1f} MiB in {requests} FUSE requests; "
            + ("all match" if not problems else "; ".join(problems)))
    return FsOutcome(not problems, line)


async def guest_program(bed: FsTestbed, args: argparse.Namespace) -> FsOutcome:
    async with SimGuest.open(bed.control) as guest:
        allocator = GuestAllocator(guest.ram.base, guest.ram.size)
        transport = await VirtioMmioDriver.for_device(guest, allocator, bed.mmio_base, bed.irq)
        return await exercise_fs(transport, bed.shared_dir, seed=args.seed, file_mib=args.file_mib)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="xvb-demo-fs-") as work:
        print(f"demo: seed {args.seed}; starting virtiofsd on a temporary directory, xen-sim, xen-vhost-bridge")
        try:
            with FsTestbed(work, tag=TAG, vcpus=args.vcpus, bridge_extra=["--memory", args.memory]) as bed:
                print(f"demo: domU {bed.domid} -> virtio-mmio {bed.mmio_base:#x} irq {bed.irq} -> bridge "
                      f"(pid {bed.bridge.pid}, {args.memory} memory) -> virtiofsd (pid {bed.daemon.pid}) "
                      f"-> {bed.shared_dir}")
                outcome = run_trio(guest_program, bed, args)
        except ChildFailed as exc:
            print(f"demo: FAILED: {exc}", file=sys.stderr)
            return 1
    print(f"demo: virtio-fs {outcome.line}")
    print("demo: PASS" if outcome.ok else "demo: FAIL")
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main())
