"""Register round trips: vCPUs of the simulated guest reading a plain
register (MagicValue) through the bridge, against the floor
(bridge.bench_floor); and the same reads spread over many vCPUs and
devices for the scale measurement.

The vCPUs run their load loop in the simulator (the guest-role op
``vcpu_loop``, ``xen.sim.vcpu_loop``), where Xen runs a vCPU: each access
takes the whole trap path (ioreq slot, event channel to the bridge, the
bridge's completion and notify), but not the simulated guest process's
trap socket, a round trip between two processes that a vCPU on Xen does
not make. So both sides of the ratio are two processes taking turns: the
vCPU (with the hypervisor under it) and the device model.

A third side, the socket floor (bridge.bench_floor.SocketFloor), is the
same ping-pong as the floor over what the simulator's event channel is
made of (SEQPACKET sockets, an epoll on each side): the share of the
round trip that is the simulated transport's, not the bridge's."""

from __future__ import annotations

from collections.abc import Sequence

from bridge.bench_floor import Floor, SocketFloor
from bridge.bench_stats import Pairs, latency, rotated
from bridge.virtio_mmio import MAGIC_VALUE


async def vcpu_reads(guest, nvcpus: int, addrs: Sequence[int], seconds: float) -> tuple[list[int], float]:
    """vCPUs 0 .. nvcpus - 1 each read ``addrs[i % len(addrs)] + MagicValue``
    (vCPU i) in a loop, one access in flight each, for ``seconds``: the
    latency of every access (ns) and the time taken."""
    plan = [(i, addrs[i % len(addrs)] + MAGIC_VALUE) for i in range(nvcpus)]
    return await guest.vcpu_loop(plan, seconds)


async def rotating_reads(guest, nvcpus: int, addrs: Sequence[int], seconds: float) -> tuple[list[int], float]:
    """One access at a time, each from the next vCPU to the next device:
    what one access costs when the bridge serves that many of each."""
    nv, na = nvcpus, len(addrs)
    # Access i: vCPU i % nv, device (i // nv + i) % na; the sequence repeats
    # after nv * na accesses, and every vCPU meets every device.
    plan = [(i % nv, addrs[(i // nv + i) % na] + MAGIC_VALUE) for i in range(nv * na)]
    return await guest.vcpu_loop(plan, seconds, one_at_a_time=True)


def cpu_ns(pid: int) -> int:
    """Nanoseconds process ``pid`` (its main thread) has run on a CPU."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0])


SOCKET_FLOOR = "socket floor"


async def measure_rtt(guests: dict, base: int, floors: dict[int, Floor], socket_floors: dict[int, SocketFloor], *,
                      reps: int, seconds: float, pids: dict[str, tuple[int, int]]) -> dict[str, Pairs]:
    """``guests``: side name -> open SimGuest (the bridge, and optionally a
    bridge from another tree); ``floors``, ``socket_floors``: pairs -> a
    Floor, a SocketFloor; ``pids``: side -> (the bridge's PID, the
    simulator's PID). Two cases: one vCPU
    reading, and every vCPU (as many floor pairs) reading at once. Each
    side's CPU time per access is kept, which other processes' noise does
    not change as it does the latency: the bridge's (``cpu_us``) and the
    simulated hypervisor's (``hv_cpu_us``); for the floors, their echoing
    process's (``cpu_us``), the device model's counterpart."""
    nvcpus = max(floors)
    cases = {"1 vCPU": 1, f"{nvcpus} vCPUs busy": nvcpus}
    results = {name: Pairs() for name in cases}
    for rep in range(reps):
        for name, n in cases.items():
            for side in rotated([*guests, "floor", SOCKET_FLOOR], rep):
                if side in ("floor", SOCKET_FLOOR):
                    floor = floors[n] if side == "floor" else socket_floors[n]
                    before = cpu_ns(floor.echo_pid)
                    samples = floor.run(seconds)
                    cpu_us = (cpu_ns(floor.echo_pid) - before) / 1000 / len(samples)
                    results[name].add(side, {**latency(samples, seconds), "cpu_us": cpu_us})
                else:
                    bridge_pid, sim_pid = pids[side]
                    before, hv_before = cpu_ns(bridge_pid), cpu_ns(sim_pid)
                    samples, took = await vcpu_reads(guests[side], n, [base], seconds)
                    per_access = 1000 * len(samples)
                    results[name].add(side, {
                        **latency(samples, took),
                        "cpu_us": (cpu_ns(bridge_pid) - before) / per_access,
                        "hv_cpu_us": (cpu_ns(sim_pid) - hv_before) / per_access,
                    })
    for name, pairs in results.items():
        for side in guests:
            pairs.ratio(f"{side}/floor", side, "floor", "rate")
            pairs.ratio(f"{side}/{SOCKET_FLOOR}", side, SOCKET_FLOOR, "rate")
        pairs.ratio(f"{SOCKET_FLOOR}/floor", SOCKET_FLOOR, "floor", "rate")
    return results
