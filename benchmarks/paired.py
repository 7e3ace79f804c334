"""Paired rounds for the per-request benchmarks: every variant runs once per round, in a new
random order each round, and a variant's cost against a reference is taken within each round
(both measured under the same conditions) before the median over rounds is taken."""
from __future__ import annotations

import random
import statistics
from typing import Callable, Dict, Iterable, List


def shuffled_order(names: Iterable[str], rounds: int) -> List[str]:
    """Every name once per round, each round in a new random order."""
    names = list(names)
    return [name for _ in range(rounds) for name in random.sample(names, len(names))]


def shuffled_rounds(names: Iterable[str], rounds: int, measure: Callable[[str], float]) -> Dict[str, List[float]]:
    """{name: [seconds per request, one per round]}; ``measure(name)`` runs one round of one variant."""
    times: Dict[str, List[float]] = {name: [] for name in names}
    for name in shuffled_order(times, rounds):
        times[name].append(measure(name))
    return times


def table(times: Dict[str, List[float]], bare: str, reference: str) -> List[str]:
    """Markdown rows: median time, median added over ``bare``, and the median over rounds of the
    added time as a multiple of ``reference``'s added time in the same round."""
    rows = [f"| variant | µs per request | added over {bare} (µs) | added, against {reference} "
            "(median of rounds) |", "|---|---:|---:|---:|"]
    base = statistics.median(times[bare])
    for name, values in times.items():
        if name == bare:
            rows.append(f"| {name} | {base * 1e6:.1f} | — | — |")
            continue
        ratios = [(t - b) / (r - b) for t, b, r in zip(values, times[bare], times[reference])]
        rows.append(f"| {name} | {statistics.median(values) * 1e6:.1f} | "
                    f"{(statistics.median(values) - base) * 1e6:+.1f} | {statistics.median(ratios):.2f}x |")
    return rows
