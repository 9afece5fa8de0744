"""Measure the data path: every number a ratio against what the bridge is
held to, each pair measured side by side in one run.

a. rtt: a vCPU reading a plain register (MagicValue) through the bridge,
   against two processes ping-ponging eventfds (the floor; neither side is
   pinned, as the simulator and the bridge are not); with one vCPU, and
   with every vCPU busy against as many floor pairs. The vCPUs run their
   load loop in the simulator, where Xen runs a vCPU (the guest op
   vcpu_loop): both sides are then two processes taking turns. The CPU
   time per access of the device model (the bridge; the floor's echoing
   process) and of the simulated hypervisor is shown too. The socket
   floor is the same ping-pong over the simulator's event-channel
   transport (SEQPACKET sockets and epoll): its share is the simulation's.
b. blk: 4 KiB random reads and writes at queue depth 1 and 32 from the
   simulated guest through the bridge to qemu-storage-daemon, against the
   same guest driving the daemon itself (it is the vhost-user front-end,
   kicks its kick eventfd and waits on its call eventfd: no bridge in the
   data path); with passthrough and shadow memory, through the bridge's
   userspace relay (--no-fast-path) and the simulated kernel fast path
   (irqfd; --kernel-kicks adds ioeventfd).
c. scale: one bridge serving 1, 8 and 64 vCPUs with 1, 4 and 16 devices:
   one access at a time rotating over all of them (p50, p99, held against
   the 1 x 1 set-up's), every vCPU busy (ioreqs/s, p50, p99), the bridge's
   VmRSS and VmHWM, and its time from start to the "ready:" line.

The sides of a pair run alive side by side and take turns in every
repetition (in rotating order), so a noisy moment slows both; a ratio is
taken per repetition and reported as its median with the spread (min-max)
across repetitions. Run it with ``scripts/bench``; ``--quick`` runs a
subset in under a minute.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from bridge.bench_blk import measure_blk, open_mmio_blk
from bridge.bench_direct import open_direct_blk
from bridge.bench_floor import Floor, SocketFloor
from bridge.bench_rtt import measure_rtt
from bridge.bench_scale import measure_scale, memory_mib
from bridge.bench_testbed import BlkBenchBed
from bridge.processes import exit_cleanly_on_sigterm, run_trio
from xen.sim.guest import SimGuest
from xen.sim.guest_memory import GuestAllocator

BLK_SETUPS = {
    "direct": None,
    "pass-relay": ["--memory", "passthrough", "--no-fast-path"],
    "pass-fast": ["--memory", "passthrough"],
    "pass-kicks": ["--memory", "passthrough", "--kernel-kicks"],
    "shadow-relay": ["--memory", "shadow", "--no-fast-path"],
    "shadow-fast": ["--memory", "shadow"],
}
BEFORE = "@before"
"""Suffix of a side whose bridge runs from --before-tree."""

FULL = {
    "reps": 5, "seconds": 1.0, "rtt_vcpus": 4,
    "blk_setups": list(BLK_SETUPS),
    "workloads": [("read", 1), ("write", 1), ("read", 32), ("write", 32)],
    "scale": [(1, 1), (1, 4), (1, 16), (8, 1), (8, 4), (8, 16), (64, 1), (64, 4), (64, 16)],
    "scale_reps": 3, "scale_seconds": 1.0,
}
QUICK = {
    "reps": 3, "seconds": 0.3, "rtt_vcpus": 4,
    "blk_setups": ["direct", "pass-relay", "pass-fast", "shadow-relay"],
    "workloads": [("read", 1), ("read", 32), ("write", 32)],
    "scale": [(1, 1), (8, 4), (64, 16)],
    "scale_reps": 2, "scale_seconds": 0.3,
}


def parse_scale(text: str) -> list[tuple[int, int]]:
    configs = []
    for item in text.split(","):
        vcpus, _, devices = item.partition("x")
        try:
            configs.append((int(vcpus), int(devices)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not VCPUSxDEVICES (e.g. 64x16)") from None
    return configs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="a subset in under a minute: blk sides direct, pass-relay, pass-fast, shadow-relay at "
                        "4k randread qd1 and randread/randwrite qd32; scale 1x1, 8x4, 64x16; 3 repetitions of 0.3 s")
    p.add_argument("--json", metavar="PATH", help="also write every number as JSON")
    p.add_argument("--sections", default="rtt,blk,scale", help="which of rtt,blk,scale to run (default: all)")
    p.add_argument("--reps", type=int, help="repetitions of each pair (default: 5, scale 3; quick: 3, scale 2)")
    p.add_argument("--seconds", type=float, help="seconds per side and repetition (default: 1; quick: 0.3)")
    p.add_argument("--rtt-vcpus", type=int, help="vCPUs of the rtt guest, all busy in the second case (default: 4)")
    p.add_argument("--blk", metavar="SIDES", help=f"blk sides, comma-separated, from {','.join(BLK_SETUPS)}")
    p.add_argument("--scale", type=parse_scale, metavar="VxN,...", help="scale set-ups (default: 1x1 ... 64x16)")
    p.add_argument("--before-tree", metavar="DIR",
                   help="also run the rtt bridge and the pass-relay side from another source tree (one with "
                        "bridge/, xen/, vhost_user/), for before/after ratios in the same run")
    args = p.parse_args(argv)
    config = dict(QUICK if args.quick else FULL)
    for key in ("reps", "seconds", "rtt_vcpus"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
            if key != "rtt_vcpus":
                config[f"scale_{key}"] = config[key]
    if args.blk:
        sides = args.blk.split(",")
        unknown = [s for s in sides if s not in BLK_SETUPS]
        if unknown or "direct" not in sides:
            p.error(f"--blk takes sides from {','.join(BLK_SETUPS)}, including direct")
        config["blk_setups"] = sides
    if args.scale:
        config["scale"] = args.scale
    sections = args.sections.split(",")
    if not set(sections) <= {"rtt", "blk", "scale"}:
        p.error("--sections takes rtt, blk and scale")
    if config["reps"] < 1 or config["seconds"] <= 0 or config["rtt_vcpus"] < 2:
        p.error("--reps must be >= 1, --seconds > 0, --rtt-vcpus >= 2")
    config["sections"] = sections
    config["before_tree"] = args.before_tree
    args.config = config
    return args


class Beds:
    """Every set-up of the run, each in a temporary directory of its own,
    started in parallel and stopped (by PID) at the end."""

    def __init__(self) -> None:
        self.beds: dict[str, BlkBenchBed] = {}
        self._dirs: list[str] = []

    def add(self, name: str, **kwargs) -> BlkBenchBed:
        workdir = tempfile.mkdtemp(prefix="xvb-")
        self._dirs.append(workdir)
        self.beds[name] = bed = BlkBenchBed(workdir, **kwargs)
        return bed

    def start(self, names) -> None:
        with ThreadPoolExecutor(max_workers=4) as pool:
            for future in [pool.submit(self.beds[n].start) for n in names]:
                future.result()

    def stop(self, name: str) -> None:
        self.beds.pop(name).stop()

    def close(self) -> None:
        for bed in self.beds.values():
            bed.stop()
        self.beds.clear()
        for workdir in self._dirs:
            shutil.rmtree(workdir, ignore_errors=True)


def blk_bed_kwargs(side: str, before_tree: str | None) -> dict:
    name = side.removesuffix(BEFORE)
    extra = BLK_SETUPS[name]
    if extra is None:
        return {"bridge": False, "ram_mib": 128}
    return {"bridge_extra": extra, "ram_mib": 128, "bridge_tree": before_tree if side.endswith(BEFORE) else None}


async def run(beds: Beds, config: dict) -> dict:
    results: dict = {"config": {k: v for k, v in config.items()}}
    before = config["before_tree"]
    async with contextlib.AsyncExitStack() as stack:
        if "rtt" in config["sections"]:
            print("bench: rtt ...", file=sys.stderr)
            guests = {side: await stack.enter_async_context(SimGuest.open(beds.beds[f"rtt:{side}"].control))
                      for side in rtt_sides(config)}
            floors = {n: stack.enter_context(Floor(n)) for n in (1, config["rtt_vcpus"])}
            socket_floors = {n: stack.enter_context(SocketFloor(n)) for n in (1, config["rtt_vcpus"])}
            pids = {side: (beds.beds[f"rtt:{side}"].bridge.pid, beds.beds[f"rtt:{side}"].sim.pid) for side in guests}
            rtt = await measure_rtt(guests, beds.beds["rtt:bridge"].mmio_base(0), floors, socket_floors,
                                    reps=config["reps"], seconds=config["seconds"], pids=pids)
            for pairs in rtt.values():
                if before:
                    pairs.ratio(f"bridge/bridge{BEFORE}", "bridge", f"bridge{BEFORE}", "rate")
                    pairs.ratio(f"bridge{BEFORE}/bridge CPU per access", f"bridge{BEFORE}", "bridge", "cpu_us")
            results["rtt"] = {name: pairs.report() for name, pairs in rtt.items()}
        if "blk" in config["sections"]:
            print("bench: blk ...", file=sys.stderr)
            drivers = {}
            for slot, side in enumerate(blk_sides(config)):
                bed = beds.beds[f"blk:{side}"]
                guest = await stack.enter_async_context(SimGuest.open(bed.control))
                if bed.with_bridge:
                    _, drivers[side] = await open_mmio_blk(guest, bed.mmio_base(0), bed.irq(0))
                else:
                    allocator = GuestAllocator(guest.ram.base, 64 << 20)
                    drivers[side] = await stack.enter_async_context(
                        open_direct_blk(guest, bed.control, bed.sockets[0], allocator))
            blk = await measure_blk(drivers, config["workloads"], reps=config["reps"], seconds=config["seconds"])
            for pairs in blk.values():
                for side in drivers:
                    if side != "direct":
                        pairs.ratio(f"{side}/direct", side, "direct", "iops")
                for shadow, passthrough in (("shadow-relay", "pass-relay"), ("shadow-fast", "pass-fast")):
                    if shadow in drivers and passthrough in drivers:
                        pairs.ratio(f"{shadow}/{passthrough}", shadow, passthrough, "iops")
                if before:
                    pairs.ratio(f"pass-relay/pass-relay{BEFORE}", "pass-relay", f"pass-relay{BEFORE}", "iops")
            results["blk"] = {name: pairs.report() for name, pairs in blk.items()}
    if "scale" in config["sections"]:
        results["scale"] = await run_scale(beds, config)
    return results


async def run_scale(beds: Beds, config: dict) -> list[dict]:
    rows = []
    base = beds.beds["scale:1x1"]
    async with SimGuest.open(base.control) as base_guest:
        base_addrs = [base.mmio_base(0)]
        for vcpus, devices in config["scale"]:
            name = f"scale:{vcpus}x{devices}"
            print(f"bench: scale {vcpus} vCPUs x {devices} devices ...", file=sys.stderr)
            own = name != "scale:1x1"
            if own:
                beds.add(name, vcpus=vcpus, devices=devices, image_mib=16, ram_mib=128)
                beds.start([name])
            bed = beds.beds[name]
            try:
                async with contextlib.AsyncExitStack() as stack:
                    guest = base_guest if not own else await stack.enter_async_context(SimGuest.open(bed.control))
                    addrs = [bed.mmio_base(i) for i in range(devices)]
                    pairs = await measure_scale(base_guest, base_addrs, guest, addrs, reps=config["scale_reps"],
                                                seconds=config["scale_seconds"])
                    rows.append({"vcpus": vcpus, "devices": devices, "ready_s": bed.ready_seconds,
                                 **memory_mib(bed), **pairs.report()})
            finally:
                if own:
                    beds.stop(name)
    return rows


def rtt_sides(config: dict) -> list[str]:
    return ["bridge"] + ([f"bridge{BEFORE}"] if config["before_tree"] else [])


def blk_sides(config: dict) -> list[str]:
    sides = list(config["blk_setups"])
    if config["before_tree"] and "pass-relay" in sides:
        sides.append(f"pass-relay{BEFORE}")
    return sides


def plan(beds: Beds, config: dict) -> list[str]:
    names = []
    if "rtt" in config["sections"]:
        for side in rtt_sides(config):
            beds.add(f"rtt:{side}", vcpus=config["rtt_vcpus"], ram_mib=64,
                     bridge_tree=config["before_tree"] if side.endswith(BEFORE) else None)
            names.append(f"rtt:{side}")
    if "blk" in config["sections"]:
        for side in blk_sides(config):
            beds.add(f"blk:{side}", **blk_bed_kwargs(side, config["before_tree"]))
            names.append(f"blk:{side}")
    if "scale" in config["sections"]:
        beds.add("scale:1x1", image_mib=16, ram_mib=64)
        names.append("scale:1x1")
    return names


# --- targets and the table -------------------------------------------------


def targets(results: dict) -> list[dict]:
    out = []

    def check(name: str, value: float | None, op: str, goal: float) -> None:
        if value is None:
            return
        met = value >= goal if op == ">=" else value <= goal if op == "<=" else value < goal
        out.append({"target": f"{name} {op} {goal:g}", "value": value, "met": met})

    for case, rep in results.get("rtt", {}).items():
        check(f"rtt {case}: bridge/floor", rep["ratios"]["bridge/floor"]["median"], ">=", 0.6)
    for case, rep in results.get("blk", {}).items():
        if "qd32" not in case:
            continue
        ratios = rep["ratios"]
        for name, goal in (("pass-relay/direct", 0.8), ("pass-fast/direct", 0.95), ("pass-kicks/direct", 0.95),
                           ("shadow-relay/pass-relay", 0.5), ("shadow-fast/pass-fast", 0.5)):
            if name in ratios:
                check(f"blk {case}: {name}", ratios[name]["median"], ">=", goal)
    scale = results.get("scale", [])
    for row in scale:
        if (row["vcpus"], row["devices"]) == (64, 16):
            check("scale 64x16: p99 single/1x1", row["ratios"]["p99 single/1x1"]["median"], "<=", 2)
    if scale:
        check("bridge VmHWM MiB (largest set-up)", max(row["hwm_mib"] for row in scale), "<", 50)
    return out


def fmt_spread(s: dict) -> str:
    return f"{s['median']:.2f} [{s['min']:.2f}-{s['max']:.2f}]"


def print_table(results: dict) -> None:
    if "rtt" in results:
        print("a. register round trip (MagicValue read) vs floor (eventfd ping-pong, unpinned)")
        print(f"  {'case':<18} {'side':<16} {'ops/s':>10} {'p50 us':>8} {'p99 us':>8} {'DM CPU us/op':>13} "
              f"{'hypervisor CPU us/op':>21}")
        for case, rep in results["rtt"].items():
            for side, m in rep["sides"].items():
                hv = f"{m['hv_cpu_us']['median']:>21.1f}" if "hv_cpu_us" in m else ""
                print(f"  {case:<18} {side:<16} {m['rate']['median']:>10.0f} {m['p50_us']['median']:>8.1f} "
                      f"{m['p99_us']['median']:>8.1f} {m['cpu_us']['median']:>13.1f} {hv}")
            for name, s in rep["ratios"].items():
                print(f"  {case:<18} {name:<34} ratio {fmt_spread(s)}")
    if "blk" in results:
        print("b. virtio-blk 4 KiB random I/O: IOPS through the bridge vs the guest driving the daemon directly")
        sides = list(next(iter(results["blk"].values()))["sides"])
        print(f"  {'workload':<18}" + "".join(f" {s:>14}" for s in sides))
        for case, rep in results["blk"].items():
            print(f"  {case:<18}" + "".join(f" {rep['sides'][s]['iops']['median']:>14.0f}" for s in sides))
        for case, rep in results["blk"].items():
            for name, s in rep["ratios"].items():
                print(f"  {case:<18} {name:<34} ratio {fmt_spread(s)}")
    if "scale" in results:
        print("c. scale: one bridge, V vCPUs x N devices (single: one access at a time over all; busy: every vCPU)")
        print(f"  {'VxN':<7} {'ready s':>7} {'RSS MiB':>7} {'HWM MiB':>7} {'1x1 p99':>8} {'single p50':>10} "
              f"{'single p99':>10} {'p99/1x1':>16} {'busy ops/s':>10} {'busy p50':>9} {'busy p99':>9}")
        for row in results["scale"]:
            s = row["sides"]
            print(f"  {row['vcpus']}x{row['devices']:<5} {row['ready_s']:>7.2f} {row['rss_mib']:>7.1f} "
                  f"{row['hwm_mib']:>7.1f} {s['1x1']['p99_us']['median']:>8.1f} {s['single']['p50_us']['median']:>10.1f} "
                  f"{s['single']['p99_us']['median']:>10.1f} {fmt_spread(row['ratios']['p99 single/1x1']):>16} "
                  f"{s['busy']['rate']['median']:>10.0f} {s['busy']['p50_us']['median']:>9.1f} "
                  f"{s['busy']['p99_us']['median']:>9.1f}")
    if results.get("targets"):
        print("targets (medians of per-repetition ratios)")
        for t in results["targets"]:
            print(f"  {'met   ' if t['met'] else 'MISSED'} {t['target']:<52} {t['value']:.2f}")


def main(argv: list[str] | None = None) -> int:
    exit_cleanly_on_sigterm()
    args = parse_args(argv)
    config = args.config
    started = time.perf_counter()
    beds = Beds()
    try:
        names = plan(beds, config)
        print(f"bench: starting {len(names)} set-ups ...", file=sys.stderr)
        beds.start(names)
        results = run_trio(run, beds, config)
    finally:
        beds.close()
    results["targets"] = targets(results)
    results["seconds"] = time.perf_counter() - started
    print_table(results)
    print(f"({results['seconds']:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
