"""Scale: one bridge serving V vCPUs and N devices, next to a bridge that
serves one of each. Per set-up: the latency of one register read at a time
rotating over every vCPU and device (interleaved with the same on the
1 x 1 set-up, whose p99 it is held against), every vCPU busy at once
(ioreqs/s, p50, p99), the bridge's memory and its time to ready."""

from __future__ import annotations

from bridge.bench_rtt import rotating_reads, vcpu_reads
from bridge.bench_stats import Pairs, latency, rotated


async def measure_scale(base_guest, base_addrs: list[int], guest, addrs: list[int], *, reps: int,
                        seconds: float) -> Pairs:
    """Sides "1x1" (one access at a time on the 1 x 1 set-up), "single"
    (the same on this one) and "busy" (every vCPU of this one at once)."""
    pairs = Pairs()
    nvcpus, base_nvcpus = len(guest.vcpus), len(base_guest.vcpus)
    for rep in range(reps):
        for side in rotated(["1x1", "single", "busy"], rep):
            if side == "1x1":
                samples, took = await rotating_reads(base_guest, base_nvcpus, base_addrs, seconds)
            elif side == "single":
                samples, took = await rotating_reads(guest, nvcpus, addrs, seconds)
            else:
                samples, took = await vcpu_reads(guest, nvcpus, addrs, seconds)
            pairs.add(side, latency(samples, took))
    pairs.ratio("p99 single/1x1", "single", "1x1", "p99_us")
    return pairs


def memory_mib(bed) -> dict[str, float]:
    """The bridge's VmRSS and VmHWM in MiB."""
    kib = bed.bridge_memory_kib()
    return {"rss_mib": kib["VmRSS"] / 1024, "hwm_mib": kib["VmHWM"] / 1024}
