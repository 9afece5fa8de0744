"""Numbers for the benchmark: latency percentiles, medians with their
spread across repetitions, and ratios taken repetition by repetition (the
two sides of a pair run back to back in each repetition, so a noisy moment
slows both and the ratio holds)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def percentile(samples: Sequence[int], q: float) -> int:
    """The ``q`` quantile (0..1) of ``samples``, nearest rank."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def latency(samples_ns: Sequence[int], seconds: float) -> dict[str, float]:
    """Operations per second and p50/p99 latency (microseconds)."""
    return {
        "rate": len(samples_ns) / seconds,
        "p50_us": percentile(samples_ns, 0.50) / 1000,
        "p99_us": percentile(samples_ns, 0.99) / 1000,
    }


def spread(values: Sequence[float]) -> dict:
    """Median, minimum and maximum of one number over the repetitions."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "reps": list(values)}


def rotated(items: Sequence, rep: int) -> list:
    """``items`` starting at a different one each repetition, so no side
    always runs first (or right after a set-up)."""
    k = rep % len(items)
    return list(items[k:]) + list(items[:k])


class Pairs:
    """Repetitions of several sides of one case, and the ratios between
    them. ``add(rep, side, metrics)``; ``ratio(name, a, b, key)`` is the
    per-repetition a/b of one metric."""

    def __init__(self) -> None:
        self.sides: dict[str, list[dict[str, float]]] = {}
        self.ratios: dict[str, dict] = {}

    def add(self, side: str, metrics: dict[str, float]) -> None:
        self.sides.setdefault(side, []).append(metrics)

    def values(self, side: str, key: str) -> list[float]:
        return [m[key] for m in self.sides[side]]

    def ratio(self, name: str, a: str, b: str, key: str) -> dict:
        nums, dens = self.values(a, key), self.values(b, key)
        self.ratios[name] = spread([x / y for x, y in zip(nums, dens)])
        return self.ratios[name]

    def report(self) -> dict:
        sides = {}
        for side, reps in self.sides.items():
            sides[side] = {key: spread([m[key] for m in reps]) for key in reps[0]}
        return {"sides": sides, "ratios": self.ratios}
