"""Shadow against passthrough memory, in one run, as ratios.

For each memory model a fresh qemu-storage-daemon, simulator and bridge are
started, and the simulated guest measures: 4 KiB random reads and writes at
queue depth 1 and 32 (IOPS), and 1 MiB sequential writes and reads (MiB/s).
The models alternate for ``--rounds`` rounds and the median of each is kept,
so that a noisy machine slows both alike; the table's last column is
shadow / passthrough. Run it with ``scripts/bench-memory``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile

from bridge.bench_blk import timed_ios
from bridge.processes import exit_cleanly_on_sigterm, run_trio
from bridge.testbed import BlkTestbed
from xen.sim.guest import SimGuest
from xen.sim.guest_memory import GuestAllocator
from xen.sim.virtio_blk import VirtioBlkDriver
from xen.sim.virtio_mmio_driver import VirtioMmioDriver

MiB = 1 << 20
MODES = ("passthrough", "shadow")


async def measure(bed: BlkTestbed, counts: dict[str, int], seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    async with SimGuest.open(bed.control) as guest:
        transport = VirtioMmioDriver(None, guest.ram, GuestAllocator(guest.ram.base, guest.ram.size), bed.mmio_base,
                                     bed.irq, guest)
        blk = await VirtioBlkDriver.open(transport, queue_size=128)
        disk = blk.capacity_bytes
        results = {}
        for op in ("write", "read"):  # write first: reads of written blocks
            for depth in (1, 32):
                n = counts["4k"]
                _, seconds = await timed_ios(blk, op=op, size=4096, depth=depth, count=n, disk=disk, rng=rng)
                results[f"4k rand{op} qd{depth} (IOPS)"] = n / seconds
            n = counts["1m"]
            _, seconds = await timed_ios(blk, op=op, size=MiB, depth=4, count=n, disk=disk, rng=rng)
            results[f"1m {op} qd4 (MiB/s)"] = n / seconds
        await transport.reset()
    return results


def main(argv: list[str] | None = None) -> int:
    exit_cleanly_on_sigterm()
    p = argparse.ArgumentParser(prog="scripts/bench-memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per model (default: 3)")
    p.add_argument("--quick", action="store_true", help="fewer requests and one round: a minute or less")
    p.add_argument("--json", metavar="PATH", help="also write the medians and ratios as JSON")
    args = p.parse_args(argv)
    counts = {"4k": 300, "1m": 40} if args.quick else {"4k": 2000, "1m": 200}
    rounds = 1 if args.quick else args.rounds
    samples: dict[str, dict[str, list[float]]] = {m: {} for m in MODES}
    for round_ in range(rounds):
        for mode in MODES:
            with tempfile.TemporaryDirectory(prefix="xvb-bench-") as work:
                with BlkTestbed(work, image_size=256 * MiB, bridge_extra=["--memory", mode]) as bed:
                    results = run_trio(measure, bed, counts, round_)
            for name, value in results.items():
                samples[mode].setdefault(name, []).append(value)
            print(f"bench: round {round_ + 1}/{rounds} {mode} done", file=sys.stderr)
    medians = {m: {k: statistics.median(v) for k, v in samples[m].items()} for m in MODES}
    names = list(medians["passthrough"])
    width = max(map(len, names))
    print(f"{'':{width}}  {'passthrough':>12}  {'shadow':>12}  {'shadow/pass':>11}")
    ratios = {}
    for name in names:
        a, b = medians["passthrough"][name], medians["shadow"][name]
        ratios[name] = b / a
        print(f"{name:{width}}  {a:12.1f}  {b:12.1f}  {ratios[name]:11.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rounds": rounds, "counts": counts, "median": medians, "shadow_over_passthrough": ratios}, f,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
