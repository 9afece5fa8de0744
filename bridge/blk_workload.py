"""A verifying block workload: the simulated guest writes random patterns at
random offsets and sizes with many requests in flight, flushes, reads them
back, and the result is checked twice: what the guest read against what it
wrote, and the disk image file itself, byte for byte, against a mirror of
every write. The demo and the end-to-end tests run it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from typing import Any

import attrs
import trio

SECTOR = 512
MAX_REPORTED_MISMATCHES = 10


@attrs.define
class WorkloadResult:
    requests: int = 0
    bytes_written: int = 0
    bytes_read: int = 0
    io_seconds: float = 0.0
    mismatches: list[str] = attrs.Factory(list)
    mismatch_count: int = 0

    def mismatch(self, what: str) -> None:
        self.mismatch_count += 1
        if len(self.mismatches) < MAX_REPORTED_MISMATCHES:
            self.mismatches.append(what)

    @property
    def iops(self) -> float:
        return self.requests / self.io_seconds if self.io_seconds else 0.0


@attrs.frozen
class Extent:
    offset: int
    data: bytes

    @property
    def end(self) -> int:
        return self.offset + len(self.data)


def plan_writes(
    rng: random.Random, *, count: int, disk_size: int, min_size: int, max_size: int, depth: int
) -> list[list[Extent]]:
    """``count`` writes in rounds of up to ``depth``; writes within a round
    never overlap (so their outcome does not depend on completion order),
    writes in later rounds may overwrite earlier ones."""
    if min_size % SECTOR or max_size % SECTOR or not 0 < min_size <= max_size <= disk_size:
        raise ValueError(f"sizes must be multiples of {SECTOR} with 0 < min <= max <= disk size")
    rounds: list[list[Extent]] = []
    remaining = count
    while remaining:
        batch: list[Extent] = []
        for _ in range(min(depth, remaining)):
            for _attempt in range(100):
                size = rng.randrange(min_size // SECTOR, max_size // SECTOR + 1) * SECTOR
                offset = rng.randrange(0, (disk_size - size) // SECTOR + 1) * SECTOR
                if all(offset + size <= e.offset or e.end <= offset for e in batch):
                    batch.append(Extent(offset, rng.randbytes(size)))
                    break
        remaining -= len(batch)
        if not batch:
            raise ValueError("the disk is too small for writes this large")
        rounds.append(batch)
    return rounds


async def run_blk_workload(
    blk: Any,
    *,
    requests: int,
    min_size: int = 4096,
    max_size: int = 1 << 20,
    depth: int = 32,
    seed: int = 0,
    vcpus: Sequence[Any] = (),
    mirror: bytearray | None = None,
) -> tuple[WorkloadResult, bytearray]:
    """Writes, flush, read-back through ``blk`` (a guest VirtioBlkDriver).

    Returns the result and a mirror of what the disk must now hold; pass the
    mirror of an earlier run to continue from it (a fresh disk is zeros).
    Requests are spread over ``vcpus`` (the driver's default vCPU when
    empty)."""
    disk_size = blk.capacity_bytes
    rng = random.Random(seed)
    rounds = plan_writes(
        rng, count=requests, disk_size=disk_size, min_size=min_size, max_size=max_size, depth=depth
    )
    if mirror is None:
        mirror = bytearray(disk_size)
    elif len(mirror) != disk_size:
        raise ValueError(f"the mirror holds {len(mirror)} bytes, the disk {disk_size}")
    result = WorkloadResult()
    pick = (lambda i: vcpus[i % len(vcpus)]) if vcpus else (lambda i: None)

    async def write(i: int, extent: Extent) -> None:
        await blk.write(extent.offset // SECTOR, extent.data, vcpu=pick(i))

    async def read_back(i: int, extent: Extent) -> None:
        got = await blk.read(extent.offset // SECTOR, len(extent.data), vcpu=pick(i))
        want = mirror[extent.offset : extent.end]
        if got != want:
            result.mismatch(f"guest read of {len(want)} bytes at {extent.offset:#x}: {_first_difference(got, want)}")

    started = time.perf_counter()
    for batch in rounds:
        async with trio.open_nursery() as nursery:
            for i, extent in enumerate(batch):
                nursery.start_soon(write, i, extent)
        for extent in batch:
            mirror[extent.offset : extent.end] = extent.data
            result.bytes_written += len(extent.data)
            result.requests += 1
    await blk.flush()
    result.requests += 1
    for batch in rounds:
        async with trio.open_nursery() as nursery:
            for i, extent in enumerate(batch):
                nursery.start_soon(read_back, i, extent)
        result.requests += len(batch)
        result.bytes_read += sum(len(e.data) for e in batch)
    result.io_seconds = time.perf_counter() - started
    return result, mirror


def compare_image(path: str, mirror: bytes, result: WorkloadResult, chunk: int = 1 << 20) -> None:
    """Check the image file against the mirror, sector by sector."""
    with open(path, "rb") as f:
        for base in range(0, len(mirror), chunk):
            got = f.read(chunk)
            want = mirror[base : base + chunk]
            if got == want:
                continue
            for s in range(0, len(want), SECTOR):
                if got[s : s + SECTOR] != want[s : s + SECTOR]:
                    detail = _first_difference(got[s : s + SECTOR], want[s : s + SECTOR])
                    result.mismatch(f"image sector {(base + s) // SECTOR}: {detail}")


def _first_difference(got: bytes, want: bytes) -> str:
    if len(got) != len(want):
        return f"got {len(got)} bytes, expected {len(want)}"
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            return f"first difference at byte {i}: got {a:#04x}, expected {b:#04x}"
    return "identical"
