"""Repeated, interleaved measurements for the benchmarks: every ratio is a median of paired runs with its range.

A benchmark names its variants and a function that runs one of them once and returns a number (rows/s, seconds).
`interleave` runs the variants in a balanced order (A B, then B A, ...) `repeats` times, so slow drift of the
machine (other processes, thermal state, caches) falls on every variant alike; `ratio` pairs the runs of one
round, so each round gives one ratio, and reports the median with the min-max over the rounds.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Spread:
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))

    def __format__(self, spec: str) -> str:
        spec = spec or ".3f"
        return f"{self.median:{spec}} [{self.low:{spec}}-{self.high:{spec}}]"


def interleave(variants: Sequence[str], run: Callable[[str], float], repeats: int,
               report: Callable[[str], None] = print) -> dict[str, list[float]]:
    """{variant: [one value per round]}: round r runs the variants forwards when r is even, backwards when odd."""
    results: dict[str, list[float]] = {v: [] for v in variants}
    for round_ in range(repeats):
        for variant in (variants if round_ % 2 == 0 else list(reversed(variants))):
            value = run(variant)
            results[variant].append(value)
            report(f"  round {round_ + 1}/{repeats} {variant}: {value:.4g}")
    return results


def ratio(numerator: Sequence[float], denominator: Sequence[float]) -> Spread:
    """Median and range of the per-round ratios numerator[r] / denominator[r]."""
    return Spread.of([n / d for n, d in zip(numerator, denominator, strict=True)])
