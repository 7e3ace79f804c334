"""Exact counter increases over a time range, from the samples Prometheus holds.

`increase()` extrapolates to the edges of its range (5 failures read 5.08) and loses the value
a series was born with. Here, per series, over the range (a, b]:

    increase = last sample in [a, b]  -  last sample at or before a (within BASELINE_LOOKBACK; 0 if none)

which is exact for a series that has no counter reset in the range, including one born inside
it (its whole value counts) and one that stopped being exported (its last value counts). One
Prometheus query gives these sums for every series without a reset, plus the list of series
whose counter went down (`resets() > 0`, an exporter restarted without `state_dir`). Those few
are refined: the range is split into parts and each part is treated the same way, down to
parts of at most LEAF_SECONDS, whose raw samples are summed in Python: each rise counts, and
after a reset the new value counts in full. Resets are rare, so refinement costs a few queries
only where one happened.

Limits, shared with every PromQL counter function: a reset is only seen if the value after it
is lower than the value before it, and a series absent for more than BASELINE_LOOKBACK before
the range starts (an exporter or Prometheus down that long) is counted as born in the range.
"""
from __future__ import annotations

import math
import re
from typing import Callable, Dict, List, Sequence, Tuple

BASELINE_LOOKBACK = 3600          # seconds before a range start in which its baseline is looked for
LEAF_SECONDS = 900                # parts this short are summed from their raw samples
SPLIT = 12                        # parts per refinement step

Labels = Dict[str, str]
Query = Callable[[str, float], list]   # (expr, time) -> [(labels, value)] or, for a range, [(labels, [(t, v)])]


def _dur(seconds: float) -> str:
    return f"{max(1, int(math.ceil(seconds)))}s"


def per_series(selector: str, a: float, b: float) -> str:
    """PromQL: the increase over (a, b] of every series of ``selector`` without a reset."""
    r = _dur(b - a)
    last = f"last_over_time({selector}[{r}] @ {b:.3f})"
    base = f"last_over_time({selector}[{BASELINE_LOOKBACK}s] @ {a:.3f})"
    return f"(({last} - {base}) or {last}) unless {reset_series(selector, a, b)}"


def reset_series(selector: str, a: float, b: float) -> str:
    """PromQL: the series of ``selector`` whose counter went down in (a - lookback, b]."""
    return f"(resets({selector}[{_dur(b - a + BASELINE_LOOKBACK)}] @ {b:.3f}) > 0)"


def samples_increase(samples: Sequence[Tuple[float, float]], a: float) -> float:
    """Exact increase over (a, ...] of raw samples (sorted by time) that may start before a."""
    prev = None
    total = 0.0
    for t, v in samples:
        if t <= a:
            prev = v
            continue
        if prev is None:
            total += v                    # born inside the range: counted from 0
        elif v >= prev:
            total += v - prev
        else:
            total += v                    # a reset: the counter started again from 0
        prev = v
    return total


def _identity(labels: Labels) -> tuple:
    return tuple(sorted((k, v) for k, v in labels.items() if k not in ("__name__", "q")))


def _narrowed(selector: str, series: List[Labels]) -> str:
    """``selector`` limited to the tokens of ``series`` (a superset of them: filtered after)."""
    tokens = sorted({s["token"] for s in series if "token" in s})
    if not tokens:
        return selector
    alternatives = "|".join(re.escape(t) for t in tokens)
    return selector[:-1] + f",token=~`{alternatives}`}}" if selector.endswith("}") else \
        f"{selector}{{token=~`{alternatives}`}}"


class ExactCounters:
    """Increases of counter families over ranges, exact with respect to Prometheus' samples."""

    def __init__(self, query: Query, query_range_vector: Query, leaf_seconds: float = LEAF_SECONDS,
                 split: int = SPLIT):
        self.query = query
        self.query_range_vector = query_range_vector
        self.leaf_seconds, self.split = leaf_seconds, split

    def totals(self, parts: Dict[str, Tuple[str, Sequence[str]]], a: float, b: float
               ) -> Dict[str, List[Tuple[Labels, float]]]:
        """{name: [(group labels, increase)]} for each part name -> (selector, group-by labels),
        over (a, b], from one query (more only where a counter was reset)."""
        pieces = []
        for name, (selector, by) in parts.items():
            by_clause = ", ".join(by)
            pieces.append(f'label_replace(sum by ({by_clause}) ({per_series(selector, a, b)}), '
                          f'"q", "{name}", "", "")')
            pieces.append(f'label_replace({reset_series(selector, a, b)}, "q", "{name}:resets", "", "")')
        rows = self.query(" or ".join(pieces), b)
        out: Dict[str, Dict[tuple, float]] = {name: {} for name in parts}
        resets: Dict[str, List[Labels]] = {}
        for labels, value in rows:
            q = labels.get("q", "")
            if q.endswith(":resets"):
                resets.setdefault(q[:-7], []).append(labels)
            elif q in out:
                by = parts[q][1]
                key = tuple(labels.get(l, "") for l in by)
                out[q][key] = out[q].get(key, 0.0) + value
        for name, series in resets.items():
            selector, by = parts[name]
            for labels, value in self._refine(selector, series, a, b):
                key = tuple(labels.get(l, "") for l in by)
                out[name][key] = out[name].get(key, 0.0) + value
        return {name: [(dict(zip(parts[name][1], key)), value) for key, value in groups.items()]
                for name, groups in out.items()}

    def _refine(self, selector: str, series: List[Labels], a: float, b: float) -> List[Tuple[Labels, float]]:
        """Exact increases over (a, b] of ``series``, which had a reset somewhere around it."""
        wanted = {_identity(s): s for s in series}
        narrowed = _narrowed(selector, series)
        if b - a <= self.leaf_seconds:
            result = []
            expr = f"{narrowed}[{_dur(b - a + BASELINE_LOOKBACK)}] @ {b:.3f}"
            for labels, values in self.query_range_vector(expr, b):
                if _identity(labels) in wanted:
                    result.append((labels, samples_increase(values, a)))
            return result
        step = (b - a) / self.split
        totals: Dict[tuple, float] = {}
        for i in range(self.split):
            lo, hi = a + i * step, (b if i == self.split - 1 else a + (i + 1) * step)
            expr = (f'label_replace({per_series(narrowed, lo, hi)}, "q", "inc", "", "") or '
                    f'label_replace({reset_series(narrowed, lo, hi)}, "q", "resets", "", "")')
            again = []
            for labels, value in self.query(expr, hi):
                ident = _identity(labels)
                if ident not in wanted:
                    continue
                if labels.get("q") == "resets":
                    again.append(wanted[ident])
                else:
                    totals[ident] = totals.get(ident, 0.0) + value
            if again:
                for labels, value in self._refine(selector, again, lo, hi):
                    ident = _identity(labels)
                    totals[ident] = totals.get(ident, 0.0) + value
        return [(wanted[ident], value) for ident, value in totals.items()]
