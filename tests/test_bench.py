"""scripts/bench: every pair measured, every ratio taken from the numbers
it reports, nothing left running; the guest's direct vhost-user front-end
(the baseline) really moves data; the statistics. No timed assertions: the
benchmark is the measure."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
import trio

from bridge.bench_direct import open_direct_blk
from bridge.bench_floor import Floor
from bridge.bench_stats import Pairs, percentile
from bridge.bench_testbed import BlkBenchBed
from bridge.processes import REPO_ROOT, child_env
from tests.e2e_helpers import assert_on_image
from tests.test_scripts import alive, children_of
from xen.sim.guest import SimGuest
from xen.sim.guest_memory import GuestAllocator

BLK_SIDES = ["direct", "pass-relay", "pass-fast", "pass-kicks", "shadow-relay", "shadow-fast"]
WORKLOADS = ["4k randread qd1", "4k randread qd32", "4k randwrite qd32"]


def close_to(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(abs(a), abs(b))


@pytest.mark.e2e
def test_quick_bench_measures_every_pair_and_leaves_nothing(workdir):
    out_json = os.path.join(workdir, "bench.json")
    argv = [os.path.join(REPO_ROOT, "scripts", "bench"), "--quick", "--json", out_json, "--reps", "1",
            "--seconds", "0.1", "--rtt-vcpus", "2", "--blk", ",".join(BLK_SIDES), "--scale", "1x1,2x3"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env(),
                            start_new_session=True)
    started: set[int] = set()
    try:
        while proc.poll() is None:
            started |= children_of(proc.pid)
            time.sleep(0.05)
        out = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert started, "the bench started no set-up"
    time.sleep(0.2)
    assert not [pid for pid in started if alive(pid)], "children outlived the bench"

    results = json.load(open(out_json))
    # a. round trips: the bridge and the floor, with one and with every vCPU
    assert set(results["rtt"]) == {"1 vCPU", "2 vCPUs busy"}
    for case in results["rtt"].values():
        assert set(case["sides"]) == {"bridge", "floor", "socket floor"}
        for side in case["sides"].values():
            assert side["rate"]["median"] > 0
            assert 0 < side["p50_us"]["median"] <= side["p99_us"]["median"]
            assert side["cpu_us"]["median"] > 0  # the device model's: the bridge, the floor's echo
        assert case["sides"]["bridge"]["hv_cpu_us"]["median"] > 0
        rate = {side: m["rate"]["median"] for side, m in case["sides"].items()}
        assert set(case["ratios"]) == {"bridge/floor", "bridge/socket floor", "socket floor/floor"}
        for name, ratio in case["ratios"].items():
            a, b = name.split("/")
            assert close_to(ratio["median"], rate[a] / rate[b]), name
    # b. blk: every side of every workload, and the ratios from those IOPS
    assert list(results["blk"]) == WORKLOADS
    for case in results["blk"].values():
        assert set(case["sides"]) == set(BLK_SIDES)
        iops = {side: m["iops"]["median"] for side, m in case["sides"].items()}
        assert all(v > 0 for v in iops.values()), iops
        expected = {f"{s}/direct": iops[s] / iops["direct"] for s in BLK_SIDES if s != "direct"}
        expected["shadow-relay/pass-relay"] = iops["shadow-relay"] / iops["pass-relay"]
        expected["shadow-fast/pass-fast"] = iops["shadow-fast"] / iops["pass-fast"]
        assert set(case["ratios"]) == set(expected)
        for name, value in expected.items():
            assert close_to(case["ratios"][name]["median"], value), name
    # c. scale: each set-up with its latency, rate, memory and time to ready
    assert [(r["vcpus"], r["devices"]) for r in results["scale"]] == [(1, 1), (2, 3)]
    for row in results["scale"]:
        assert row["ready_s"] > 0 and 0 < row["rss_mib"] <= row["hwm_mib"]
        for side in ("1x1", "single", "busy"):
            m = row["sides"][side]
            assert m["rate"]["median"] > 0 and 0 < m["p50_us"]["median"] <= m["p99_us"]["median"]
        assert close_to(row["ratios"]["p99 single/1x1"]["median"],
                        row["sides"]["single"]["p99_us"]["median"] / row["sides"]["1x1"]["p99_us"]["median"])
    names = [t["target"] for t in results["targets"]]
    assert any(n.startswith("rtt 1 vCPU") for n in names)
    assert any("pass-relay/direct" in n for n in names)
    assert all(isinstance(t["met"], bool) and t["value"] > 0 for t in results["targets"])
    assert "targets" in out and "bridge/floor" in out  # the table


@pytest.mark.e2e
def test_the_direct_baseline_writes_and_reads_the_daemons_disk(workdir):
    """The guest as its own vhost-user front-end: data goes to the image."""
    with BlkBenchBed(workdir, bridge=False, image_mib=16, ram_mib=64) as bed:
        assert bed.bridge is None

        async def main():
            async with SimGuest.open(bed.control) as guest:
                allocator = GuestAllocator(guest.ram.base, 32 << 20)
                async with open_direct_blk(guest, bed.control, bed.sockets[0], allocator) as blk:
                    assert blk.capacity_bytes == 16 << 20
                    async with trio.open_nursery() as nursery:
                        for i in range(32):
                            nursery.start_soon(blk.write, i * 16, bytes([i + 1]) * 4096)
                    await blk.flush()
                    for i in range(32):
                        assert await blk.read(i * 16, 4096) == bytes([i + 1]) * 4096

        trio.run(main)
        assert_on_image(bed.images[0], {i * 16: bytes([i + 1]) * 4096 for i in range(32)})
    assert not any(os.path.exists(p) for p in [*bed.images, *bed.sockets, bed.control])


def test_floor_round_trips_through_a_second_process():
    with Floor(2) as floor:
        samples = floor.run(0.05)
        assert samples and all(s > 0 for s in samples)
        pid = floor._echo.pid
    assert floor._echo.returncode is not None and not alive(pid)


def test_percentiles_and_per_repetition_ratios():
    assert percentile([5, 1, 4, 2, 3], 0.5) == 3
    assert percentile(list(range(1, 101)), 0.99) == 99
    assert percentile([7], 0.99) == 7
    pairs = Pairs()
    for a, b in ((10.0, 20.0), (30.0, 20.0), (12.0, 24.0)):
        pairs.add("a", {"x": a})
        pairs.add("b", {"x": b})
    ratio = pairs.ratio("a/b", "a", "b", "x")
    # per repetition, not the ratio of the medians (12 / 20)
    assert ratio["reps"] == [0.5, 1.5, 0.5] and ratio["median"] == 0.5
    assert (ratio["min"], ratio["max"]) == (0.5, 1.5)
    report = pairs.report()
    assert report["sides"]["a"]["x"]["median"] == 12.0 and report["ratios"]["a/b"] is ratio
