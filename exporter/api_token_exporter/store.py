"""A metric store built for the request path and for large scrapes.

Values are doubles in an mmap: anonymous memory for one process, or with several workers one
file per process in a shared directory (PROMETHEUS_MULTIPROC_DIR, as prometheus_client's
multiprocess mode uses), which a scrape from any worker reads and sums, so totals are exact
across workers. A series is a slot (or a run of slots for histograms) found through one dict
lookup; an increment is one memoryview store. The exposition line prefix of each series
(`name{labels} `) is built once, so a scrape formats only values.

Why not prometheus_client's objects: `labels()` plus `inc()` costs 2-3 µs each, a dozen per
request, and `generate_latest` for 10,000 tokens takes seconds (benchmarks/bench_scrape.py);
the tests check that both expose the same families and samples.
"""
from __future__ import annotations

import bisect
import contextlib
import gc
import glob
import json
import mmap
import os
import threading
import weakref
from itertools import accumulate
from operator import add
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from prometheus_client.utils import floatToGoString

DEFAULT_CAPACITY = 4_000_000        # doubles (32 MiB of address space, used only as touched)


def escape_label(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')


def escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


class Family:
    """One metric family: kind is counter, histogram, gauge_recent (latest write wins across
    processes), gauge_max, or gauge (derived at scrape time, never stored)."""

    __slots__ = ("name", "kind", "help", "labelnames", "buckets", "width", "series", "prefixes")

    def __init__(self, name: str, kind: str, help_text: str, labelnames: Sequence[str],
                 buckets: Sequence[float] = ()):
        self.name, self.kind, self.help, self.labelnames = name, kind, help_text, tuple(labelnames)
        self.buckets = tuple(buckets)
        self.width = {"counter": 1, "gauge_max": 1, "gauge_recent": 2,
                      "histogram": len(self.buckets) + 2}.get(kind, 0)
        self.series: Dict[tuple, int] = {}
        self.prefixes: Dict[tuple, str] = {}

    @property
    def type_name(self) -> str:
        return {"gauge_recent": "gauge", "gauge_max": "gauge"}.get(self.kind, self.kind)

    def labels_text(self, key: tuple, extra: str = "") -> str:
        parts = [f'{n}="{escape_label(str(v))}"' for n, v in zip(self.labelnames, key)]
        if extra:
            parts.append(extra)
        return "{" + ",".join(parts) + "}" if parts else ""


_STORES: "weakref.WeakSet[Store]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for store in list(_STORES):
        store.reopen()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class Store:
    def __init__(self, families: Iterable[Family], directory: Optional[str] = None,
                 capacity: int = DEFAULT_CAPACITY):
        self.families = list(families)
        self.by_name = {f.name: f for f in self.families}
        self.directory = directory
        self.capacity = capacity
        self.lock = threading.Lock()
        self._merge_cache: Dict[str, Tuple[int, List[tuple]]] = {}
        self._snapshot = threading.local()
        self._open()
        _STORES.add(self)

    # -- memory ------------------------------------------------------------------------------
    def _open(self) -> None:
        self.pid = os.getpid()
        size = self.capacity * 8
        self._index = None
        if self.directory:
            os.makedirs(self.directory, exist_ok=True)
            base = os.path.join(self.directory, f"ate-{self.pid}")
            fd = os.open(base + ".data", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.ftruncate(fd, size)          # sparse: pages cost memory only once touched
                self._mm = mmap.mmap(fd, size)
            finally:
                os.close(fd)
            self._index = open(base + ".idx", "w", encoding="utf-8")
        else:
            self._mm = mmap.mmap(-1, size)
        self.values = memoryview(self._mm).cast("d")
        self.next_slot = 1                      # slot 0 absorbs writes once capacity is exhausted
        for family in self.families:
            family.series.clear()
        for callback in getattr(self, "on_reopen", ()):
            callback()

    def reopen(self) -> None:
        """In a forked child: its own memory and file, nothing shared with the parent."""
        self.lock = threading.Lock()
        self._open()

    def new_series(self, family: Family, key: tuple) -> int:
        """Allocate a series (caller holds the lock). Its slot is returned and remembered."""
        slot = self.next_slot
        if slot + family.width > self.capacity:
            return 0
        self.next_slot += family.width
        family.series[key] = slot
        if self._index is not None:
            self._index.write(f"{slot}\t{family.name}\t{json.dumps(list(key))}\n")
            self._index.flush()
        return slot

    # -- reading -----------------------------------------------------------------------------
    def family_data(self, family: Family) -> Tuple[List[tuple], list]:
        """(keys, values): a float per key, or a list of floats per key for histograms.
        In multiprocess mode, summed over every process's file (gauges: newest or max)."""
        if self.directory:
            merged = self._merged().get(family.name, {})
            keys = list(merged)
            if family.kind == "histogram":
                return keys, [merged[k] for k in keys]
            return keys, [merged[k][0] for k in keys]
        v = self.values
        keys = list(family.series)
        if family.kind == "histogram":
            width = family.width
            return keys, [v[slot:slot + width].tolist() for slot in family.series.values()]
        return keys, [v[slot] for slot in family.series.values()]

    @contextlib.contextmanager
    def snapshot(self):
        """Reads inside share one merge of the worker files (multiprocess mode). Per thread, so
        concurrent scrapes each read a consistent view; nested snapshots reuse the outer one."""
        local = self._snapshot
        if not self.directory or getattr(local, "merged", None) is not None:
            yield
            return
        local.merged = self._merge_files()
        try:
            yield
        finally:
            local.merged = None

    def data(self):
        """(family, keys, values) for every stored family, from one snapshot."""
        with self.snapshot():
            for family in self.families:
                if family.width:
                    yield (family,) + self.family_data(family)

    def _merged(self) -> Dict[str, Dict[tuple, List[float]]]:
        merged = getattr(self._snapshot, "merged", None)
        return merged if merged is not None else self._merge_files()

    def _merge_files(self) -> Dict[str, Dict[tuple, List[float]]]:
        """Sum counters and histograms over every process's file; gauges: newest or max."""
        merged: Dict[str, Dict[tuple, List[float]]] = {f.name: {} for f in self.families}
        for data_path in sorted(glob.glob(os.path.join(self.directory, "ate-*.data"))):
            entries = self._read_index(data_path[:-5] + ".idx")
            if not entries:
                continue
            with open(data_path, "rb") as fh:
                try:
                    mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
                except ValueError:
                    continue
            values = memoryview(mm).cast("d")
            try:
                for slot, name, key in entries:
                    family = self.by_name.get(name)
                    if family is None:
                        continue
                    current = values[slot:slot + family.width].tolist()
                    target = merged[name].get(key)
                    if target is None:
                        merged[name][key] = current
                    elif family.kind in ("counter", "histogram"):
                        for i, x in enumerate(current):
                            target[i] += x
                    elif family.kind == "gauge_max":
                        target[0] = max(target[0], current[0])
                    elif current[1] > target[1]:            # gauge_recent: newer timestamp wins
                        target[:] = current
            finally:
                values.release()
                mm.close()
        return merged

    def _read_index(self, path: str) -> List[tuple]:
        """Index lines of one process, parsed once and then incrementally."""
        offset, entries = self._merge_cache.get(path, (0, []))
        try:
            with open(path, "r", encoding="utf-8") as fh:
                fh.seek(offset)
                chunk = fh.read()
        except FileNotFoundError:
            return []
        complete = chunk[:chunk.rfind("\n") + 1] if "\n" in chunk else ""
        for line in complete.splitlines():
            slot, name, key = line.split("\t", 2)
            entries.append((int(slot), name, tuple(json.loads(key))))
        self._merge_cache[path] = (offset + len(complete.encode("utf-8")), entries)
        return entries

    def gauge_values(self, name: str) -> Dict[tuple, float]:
        keys, values = self.family_data(self.by_name[name])
        return dict(zip(keys, values))

    # -- exposition --------------------------------------------------------------------------
    def render(self, derived: Iterable[Tuple[Family, List[Tuple[tuple, float]]]] = (),
               openmetrics: bool = False) -> bytes:
        """The exposition text. Values are finite by construction, so repr() formats them
        (it parses to the same float as prometheus_client's Go-style formatting)."""
        out: List[str] = []
        gc_was_enabled = gc.isenabled()
        gc.disable()             # hundreds of thousands of short strings: nothing to collect
        try:
            for family, keys, values in self.data():
                self._header(out, family, openmetrics)
                if not keys:
                    continue
                prefixes = family.prefixes
                if family.kind == "histogram":
                    nb = len(family.buckets)
                    for key, row in zip(keys, values):
                        lines = prefixes.get(key)
                        if lines is None:
                            lines = prefixes[key] = self._histogram_prefixes(family, key)
                        acc = list(accumulate(row[:nb + 1]))
                        acc += (acc[-1], row[nb + 1])
                        out.append("\n".join(map(add, lines, map(repr, acc))) + "\n")
                    continue
                line_prefixes = [prefixes.get(k) or self._prefix(family, k) for k in keys]
                out.append("\n".join(map(add, line_prefixes, map(repr, values))) + "\n")
            for family, rows in derived:
                self._header(out, family, openmetrics)
                for key, value in rows:
                    out.append(f"{family.name}{family.labels_text(key)} {floatToGoString(value)}\n")
            if openmetrics:
                out.append("# EOF\n")
            return "".join(out).encode("utf-8")
        finally:
            if gc_was_enabled:
                gc.enable()

    @staticmethod
    def _prefix(family: Family, key: tuple) -> str:
        prefix = family.prefixes[key] = f"{family.name}{family.labels_text(key)} "
        return prefix

    @staticmethod
    def _histogram_prefixes(family: Family, key: tuple) -> tuple:
        les = [f'le="{floatToGoString(b)}"' for b in family.buckets] + ['le="+Inf"']
        plain = family.labels_text(key)
        return tuple([f"{family.name}_bucket{family.labels_text(key, le)} " for le in les]
                     + [f"{family.name}_count{plain} ", f"{family.name}_sum{plain} "])

    @staticmethod
    def _header(out: List[str], family: Family, openmetrics: bool) -> None:
        name = family.name
        if openmetrics and family.kind == "counter" and name.endswith("_total"):
            name = name[:-6]
        out.append(f"# HELP {name} {escape_help(family.help)}\n# TYPE {name} {family.type_name}\n")


def bucket_index(buckets: Sequence[float], value: float) -> int:
    """Index of the first bucket whose upper bound is >= value (len(buckets) for +Inf)."""
    return bisect.bisect_left(buckets, value)
