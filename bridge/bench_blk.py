"""Block I/O for the benchmarks: random requests of one size at a fixed
queue depth from the simulated guest's virtio-blk driver, for a number of
requests or for a time; and the driver opened on a window of a benchmark
set-up. scripts/bench and scripts/bench-memory use it."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

import trio

from bridge.bench_stats import Pairs, rotated
from xen.sim.guest_memory import GuestAllocator
from xen.sim.virtio_blk import VirtioBlkDriver
from xen.sim.virtio_mmio_driver import VirtioMmioDriver

SECTOR = 512
MiB = 1 << 20


async def timed_ios(blk, *, op: str, size: int, depth: int, disk: int, rng: random.Random,
                    count: int | None = None, seconds: float | None = None) -> tuple[int, float]:
    """``count`` requests, or as many as fit in ``seconds``, of ``size``
    bytes at random aligned offsets with ``depth`` in flight. Returns the
    requests completed and the seconds they took."""
    if (count is None) == (seconds is None):
        raise ValueError("give a count or a duration")
    if op not in ("read", "write"):
        raise ValueError(f"op is 'read' or 'write', not {op!r}")
    step = size // SECTOR
    slots = (disk // SECTOR - step) // step
    data = rng.randbytes(size)
    done = 0
    remaining = count if count is not None else -1
    started = time.perf_counter()
    deadline = started + seconds if seconds is not None else None

    async def worker() -> None:
        nonlocal done, remaining
        while remaining != 0 and (deadline is None or time.perf_counter() < deadline):
            remaining -= 1
            sector = rng.randrange(slots) * step
            if op == "read":
                await blk.read(sector, size)
            else:
                await blk.write(sector, data)
            done += 1

    async with trio.open_nursery() as nursery:
        for _ in range(depth):
            nursery.start_soon(worker)
    return done, time.perf_counter() - started


async def open_mmio_blk(guest, mmio_base: int, irq: int, *, slot: int = 0, slot_mib: int = 32,
                        queue_size: int = 128) -> tuple[VirtioMmioDriver, VirtioBlkDriver]:
    """The guest's virtio-mmio and virtio-blk drivers on one window, with
    ``slot_mib`` of guest RAM of their own (slot ``slot``)."""
    allocator = GuestAllocator(guest.ram.base + slot * slot_mib * MiB, slot_mib * MiB)
    transport = VirtioMmioDriver(None, guest.ram, allocator, mmio_base, irq, guest)
    return transport, await VirtioBlkDriver.open(transport, queue_size=queue_size)


async def measure_blk(drivers: dict, workloads: Sequence[tuple[str, int]], *, reps: int, seconds: float,
                      size: int = 4096, seed: int = 0) -> dict[str, Pairs]:
    """``drivers``: side name -> an open VirtioBlkDriver. Each repetition
    runs every workload (op, depth) on every side in turn; IOPS per side."""
    rng = random.Random(seed)
    results = {f"4k rand{op} qd{depth}": Pairs() for op, depth in workloads}
    for rep in range(reps):
        for (op, depth), pairs in zip(workloads, results.values()):
            for side in rotated(list(drivers), rep):
                blk = drivers[side]
                done, took = await timed_ios(blk, op=op, size=size, depth=depth, disk=blk.capacity_bytes,
                                             rng=rng, seconds=seconds)
                pairs.add(side, {"iops": done / took})
    return results
