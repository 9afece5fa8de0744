"""Register round trips: vCPUs of the simulated guest reading a plain
register (MagicValue) through the bridge, against the floor
(bridge.bench_floor); and the same reads spread over many vCPUs and
devices for the scale measurement."""

from __future__ import annotations

import time
from collections.abc import Sequence

import trio

from bridge.bench_floor import Floor
from bridge.bench_stats import Pairs, latency, rotated
from bridge.virtio_mmio import MAGIC_VALUE
from xen.sim.guest import GuestAccessFault

SIM_ONLY = "sim only"
UNCLAIMED = 0x10_0000
"""From a device window's base: an address no ioreq server claims (libxl
would put the 2049th virtio-mmio device there)."""


async def vcpu_reads(vcpus: Sequence, addrs: Sequence[int], seconds: float, *,
                     offset: int = MAGIC_VALUE) -> tuple[list[int], float]:
    """Every vCPU reads ``addrs[i % len(addrs)] + offset`` (vCPU i) in a
    loop, one access in flight each, for ``seconds``: the latency of every
    access (ns) and the time taken. An address no ioreq server claims is
    answered by the simulator itself (a data abort)."""
    samples: list[int] = []
    clock = time.perf_counter_ns
    end = clock() + int(seconds * 1e9)

    async def loop(vcpu, addr: int) -> None:
        read, record = vcpu.read, samples.append
        now = clock()
        while now < end:
            try:
                await read(addr, 4)
            except GuestAccessFault:
                pass
            after = clock()
            record(after - now)
            now = after

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i, vcpu in enumerate(vcpus):
            nursery.start_soon(loop, vcpu, addrs[i % len(addrs)] + offset)
    return samples, time.perf_counter() - started


async def rotating_reads(vcpus: Sequence, addrs: Sequence[int], seconds: float) -> tuple[list[int], float]:
    """One access at a time, each from the next vCPU to the next device:
    what one access costs when the bridge serves that many of each."""
    samples: list[int] = []
    clock = time.perf_counter_ns
    end = clock() + int(seconds * 1e9)
    started = time.perf_counter()
    i = 0
    now = clock()
    nv, na = len(vcpus), len(addrs)
    while now < end:
        await vcpus[i % nv].read(addrs[(i // nv + i) % na] + MAGIC_VALUE, 4)
        after = clock()
        samples.append(after - now)
        now = after
        i += 1
    return samples, time.perf_counter() - started


def cpu_ns(pid: int) -> int:
    """Nanoseconds process ``pid`` (its main thread) has run on a CPU."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0])


async def measure_rtt(guests: dict, base: int, floors: dict[int, Floor], *, reps: int, seconds: float,
                      pids: dict[str, int]) -> dict[str, Pairs]:
    """``guests``: side name -> open SimGuest (the bridge, and optionally a
    bridge from another tree); ``floors``: pairs -> Floor; ``pids``: side
    -> the bridge's PID, for its CPU time per access (``cpu_us``), which
    other processes' noise does not change as it does the latency. Two
    cases: one vCPU reading, and every vCPU (as many floor pairs) reading
    at once. A third side, "sim only", reads an address no ioreq server
    claims on the first guest: the simulator's own share of the round trip
    (guest -> simulator -> guest; on Xen a trap into the hypervisor)."""
    nvcpus = max(floors)
    cases = {"1 vCPU": 1, f"{nvcpus} vCPUs busy": nvcpus}
    results = {name: Pairs() for name in cases}
    first = next(iter(guests.values()))
    for rep in range(reps):
        for name, n in cases.items():
            sides = [*guests, SIM_ONLY, "floor"]
            for side in rotated(sides, rep):
                if side == "floor":
                    floor_samples = floors[n].run(seconds)
                    results[name].add(side, latency(floor_samples, seconds))
                elif side == SIM_ONLY:
                    samples, took = await vcpu_reads(first.vcpus[:n], [base], seconds, offset=UNCLAIMED)
                    results[name].add(side, latency(samples, took))
                else:
                    before = cpu_ns(pids[side])
                    samples, took = await vcpu_reads(guests[side].vcpus[:n], [base], seconds)
                    cpu_us = (cpu_ns(pids[side]) - before) / 1000 / len(samples)
                    results[name].add(side, {**latency(samples, took), "cpu_us": cpu_us})
    for name, pairs in results.items():
        for side in guests:
            pairs.ratio(f"{side}/floor", side, "floor", "rate")
            pairs.ratio(f"{side}/{SIM_ONLY}", side, SIM_ONLY, "rate")
        pairs.ratio(f"{SIM_ONLY}/floor", SIM_ONLY, "floor", "rate")
    return results
