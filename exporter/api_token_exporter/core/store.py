"""A metric store built for the request path and for large scrapes, safe under threads,
forked workers, concurrent scrapes and restarts.

Values are doubles in an mmap: anonymous memory for one process, or, with a directory (the
`state_dir` setting, or the private directory `serve --workers N` makes), one file per process
there, which a scrape from any process reads and sums, so totals are exact across workers. A
series is a slot (or a run of slots for histograms) found through one dict lookup; an increment
is one memoryview store. The exposition line prefix of each series is built once, so a scrape
formats only values.

Lifecycle of the files, as prometheus_client's multiprocess mode but without its gaps:
- each store creates its own pair ``ate-<pid>-<random>.data/.idx`` with O_EXCL, so two stores in
  one process, or a reused pid, never share or truncate a file;
- it holds an exclusive flock on its data file while it lives: the kernel drops the lock when
  the process ends, however it ends, so a file whose lock can be taken belongs to nobody;
- files that belong to nobody are folded into ``archive.json`` (written to a temporary file,
  fsynced and renamed, listing the files it folded so a crash before they are deleted never
  counts them twice) and deleted: the directory does not grow with restarts and the counters of
  earlier runs continue, so Prometheus sees no reset;
- readers hold a shared lock on the directory while they read, the folder an exclusive one, so a
  scrape never sees a file both in the archive and on its own;
- after fork the child closes the parent's mapping and file and opens its own.

The first slots are scratch: a series that does not fit (capacity is the ``store_capacity``
setting) is written there, never into another series, and is counted once in
``apitoken_store_dropped_series_total`` and logged once.

Why not prometheus_client's objects: `labels()` plus `inc()` costs 2-3 µs each, a dozen per
request, and `generate_latest` for 10,000 tokens takes seconds (benchmarks/bench_scrape.py);
the tests check that both expose the same families and samples.
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import logging
import math
import mmap
import os
import secrets
import threading
import weakref
from bisect import bisect_left
from itertools import accumulate, chain, repeat
from typing import Dict, Iterable, List, Optional, Sequence, Tuple


DEFAULT_CAPACITY = 4_000_000        # doubles (32 MiB of address space, used only as touched)
ALLOCATION_CHUNK = 131_072          # values (1 MiB) of disk reserved at a time for a file
DROPPED_SERIES = "apitoken_store_dropped_series_total"
ARCHIVE = "archive.json"
DIR_LOCK = ".lock"
DIR_GATE = ".gate"

log = logging.getLogger("api_token_exporter")


def float_to_go_string(value: float) -> str:
    """A sample value or bucket bound as Prometheus writes it (prometheus_client's
    floatToGoString, the oracle it is tested against): +Inf, -Inf, NaN, Go's exponent form
    for large positive numbers, else Python's shortest repr."""
    if value != value:
        return "NaN"
    if value in (math.inf, -math.inf):
        return "+Inf" if value > 0 else "-Inf"
    text = repr(float(value))
    dot = text.find(".")
    if value > 0 and dot > 6:                  # Go switches to exponents sooner than Python
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1:]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return text


def escape_label(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')


def escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _layout_name(name: str, buckets: Tuple[float, ...]) -> str:
    return f"{name}~le" + "_".join(float_to_go_string(b) for b in buckets)


def rebucket(counts: Sequence[float], old: Sequence[float], new: Sequence[float]) -> List[float]:
    """Per-bucket counts (``old`` bounds, then above the last) in ``new`` bounds: a count goes
    to the first new bucket at or above its old bound (exact where every new bound is an old one)."""
    out = [0.0] * (len(new) + 1)
    for bound, count in zip(old, counts):
        out[min(bisect_left(new, bound), len(new))] += count
    out[len(new)] += counts[len(old)]
    return out


class Family:
    """One metric family: kind is counter, histogram, gauge_recent (latest write wins across
    processes), gauge_max, or gauge (derived at scrape time, never stored)."""

    __slots__ = ("name", "kind", "help", "labelnames", "buckets", "width", "series", "prefixes",
                 "dropped", "scale", "stored_as", "former")

    def __init__(self, name: str, kind: str, help_text: str, labelnames: Sequence[str],
                 buckets: Sequence[float] = (), scale: float = 1.0,
                 former_buckets: Sequence[Sequence[float]] = ()):
        """``scale``: fractional amounts (a counter's, or a histogram's sum) are stored as whole
        multiples of 1/scale. Whole numbers add exactly in any order, so the sum over processes
        and the archive never depends on how it was grouped: without it, folding a dead
        worker's file could lower a float counter by one rounding step, which Prometheus reads
        as a reset."""
        self.name, self.kind, self.help, self.labelnames = name, kind, help_text, tuple(labelnames)
        self.scale = scale
        self.buckets = tuple(buckets)
        self.width = {"counter": 1, "gauge_max": 1, "gauge_recent": 2,
                      "histogram": len(self.buckets) + 2}.get(kind, 0)
        self.series: Dict[tuple, int] = {}
        self.prefixes: Dict[tuple, str] = {}
        self.dropped: set = set()
        # A histogram whose buckets changed is stored under a name of its own layout, and the
        # values of earlier layouts (``former_buckets``, oldest first; the oldest stored under
        # the plain name) are moved into the current buckets when read: a count in an old
        # bucket goes to the first current bucket at or above its bound.
        self.stored_as = _layout_name(name, self.buckets) if former_buckets else name
        self.former: Dict[str, Tuple[float, ...]] = {
            (name if i == 0 else _layout_name(name, tuple(b))): tuple(b) for i, b in enumerate(former_buckets)}

    def current_values(self, stored_as: str, values: List[float]) -> List[float]:
        """Values stored under ``stored_as`` (this layout or a former one) in this layout."""
        old = self.former.get(stored_as)
        if old is None:
            return values
        return rebucket(values[:len(old) + 1], old, self.buckets) + [values[len(old) + 1]]

    @property
    def type_name(self) -> str:
        return {"gauge_recent": "gauge", "gauge_max": "gauge"}.get(self.kind, self.kind)

    def labels_text(self, key: tuple, extra: str = "") -> str:
        parts = [f'{n}="{escape_label(str(v))}"' for n, v in zip(self.labelnames, key)]
        if extra:
            parts.append(extra)
        return "{" + ",".join(parts) + "}" if parts else ""


def merge_into(merged: Dict[tuple, List[float]], kind: str, key: tuple, current: List[float]) -> None:
    """Combine one process's values of a series with what was gathered so far."""
    target = merged.get(key)
    if target is None:
        merged[key] = list(current)
    elif kind in ("counter", "histogram"):
        for i, x in enumerate(current):
            target[i] += x
    elif kind == "gauge_max":
        target[0] = max(target[0], current[0])
    elif current[1] > target[1]:                      # gauge_recent: the newer write wins
        target[:] = current


_STORES: "weakref.WeakSet[Store]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for store in list(_STORES):
        store.reopen()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@contextlib.contextmanager
def _dir_lock(directory: str, exclusive: bool):
    """Shared for readers, exclusive for a fold. Readers pass a gate first, which a fold holds
    while it waits, so a steady stream of scrapes cannot starve it (flock is not fair)."""
    gate = os.open(os.path.join(directory, DIR_GATE), os.O_RDWR | os.O_CREAT, 0o600)
    lock = None
    try:
        fcntl.flock(gate, fcntl.LOCK_EX)
        lock = os.open(os.path.join(directory, DIR_LOCK), os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        if not exclusive:
            fcntl.flock(gate, fcntl.LOCK_UN)
        yield
    finally:
        if lock is not None:
            os.close(lock)                            # releases the lock
        os.close(gate)


class Store:
    def __init__(self, families: Iterable[Family], directory: Optional[str] = None,
                 capacity: int = DEFAULT_CAPACITY):
        self.families = list(families)
        self.by_name = stored_names(self.families)
        self.directory = directory or None
        self.scratch = max([f.width for f in self.families] + [1])
        if capacity < self.scratch + 16:
            raise ValueError(f"store capacity {capacity} is too small (at least {self.scratch + 16} values)")
        self.capacity = capacity
        self.on_reopen: List = []
        self._snapshot = threading.local()
        self._mm = self._fd = self._index = self.values = None
        self._open()
        _STORES.add(self)

    # -- memory ------------------------------------------------------------------------------
    def _open(self, fold: bool = True) -> None:
        self.lock = threading.Lock()            # writers and series creation
        self._merge_lock = threading.Lock()     # the index cache of the readers
        self._index_cache: Dict[str, Tuple[int, Tuple[tuple, ...]]] = {}
        self._archive_cache: Tuple[Optional[tuple], dict] = (None, {})
        self._logged_full = False
        self.pid = os.getpid()
        size = self.capacity * 8
        if self.directory:
            try:
                self._open_files(size, fold)
            except OSError as exc:
                raise OSError(exc.errno, f"the metric store cannot create its files in {self.directory}: "
                                         f"{exc.strerror or exc}") from None
        else:
            self._mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self.path = None
            self._allocated = self.capacity
        self.values = memoryview(self._mm).cast("d")
        self.next_slot = self.scratch           # slots below: scratch for series that do not fit
        for family in self.families:
            family.series.clear()
            family.dropped.clear()
        dropped = self.by_name.get(DROPPED_SERIES)
        self._dropped_slot = self.new_series(dropped, ()) if dropped is not None else 0
        for callback in self.on_reopen:
            callback()

    def _open_files(self, size: int, fold: bool) -> None:
        os.makedirs(self.directory, exist_ok=True)
        if fold:                            # not in a forked child: the parent may hold the lock
            fold_dead_files_safely(self.directory, self.families)
        while True:
            base = os.path.join(self.directory, f"ate-{self.pid}-{secrets.token_hex(4)}")
            try:
                index = os.open(base + ".idx", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                break
            except FileExistsError:
                continue
        try:
            # locked before it gets the name a fold looks for: never seen unowned while we live
            fd = os.open(base + ".data.new", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.ftruncate(fd, size)          # sparse: pages cost memory only once touched
                # blocks are reserved ahead of use, so a full disk refuses new series (counted)
                # instead of killing the process with SIGBUS when a page is first written
                os.posix_fallocate(fd, 0, min(size, ALLOCATION_CHUNK * 8))
                os.rename(base + ".data.new", base + ".data")
            except OSError:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(base + ".data.new")
                raise
        except OSError:
            os.close(index)
            with contextlib.suppress(OSError):
                os.unlink(base + ".idx")
            raise
        self._allocated = min(self.capacity, ALLOCATION_CHUNK)
        self._index, self._index_size = index, 0
        self._fd = fd
        self._mm = mmap.mmap(fd, size)
        self.path = base + ".data"

    def write_index_line(self, line: bytes) -> None:
        """Append one index line whole or not at all: a failed write (a full disk) is cut off
        again, so no part of it can join a later line. Written at its offset, unbuffered: a
        line that failed is never written later (a buffered file would, pointing at a slot
        another series then gets)."""
        offset = self._index_size
        try:
            written = 0
            while written < len(line):
                written += os.pwrite(self._index, line[written:], offset + written)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._index, offset)
            raise
        self._index_size = offset + written

    def reopen(self) -> None:
        """In a forked child: close the parent's mapping and file, then open our own."""
        old_values, old_mm, old_fd, old_index = self.values, self._mm, self._fd, self._index
        with contextlib.suppress(Exception):
            old_values.release()
        with contextlib.suppress(Exception):
            old_mm.close()
        if old_fd is not None:
            with contextlib.suppress(OSError):
                os.close(old_fd)                # the parent's lock stays with the parent
        if old_index is not None:
            with contextlib.suppress(OSError):
                os.close(old_index)
        self._open(fold=False)

    def close(self) -> None:
        """Flush and let go of the file: its values stay and are folded by the next store.
        Nothing may be recorded through this store afterwards."""
        with self.lock:
            if self._fd is not None:
                self._mm.flush()
                os.close(self._index)
                self.values.release()
                self._mm.close()                 # mmap holds a dup of the descriptor
                os.close(self._fd)               # the last one: our lock on the file is released
                self._fd = self._index = None

    def new_series(self, family: Family, key: tuple) -> int:
        """Allocate a series (caller holds the lock). Its slot is returned and remembered.
        A series that does not fit gets the scratch slot 0, is counted once and logged once."""
        slot = self.next_slot
        why = None
        if slot + family.width > self.capacity:
            why = f"metric store full ({self.capacity} values): raise store_capacity"
        elif slot + family.width > self._allocated:
            try:
                os.posix_fallocate(self._fd, self._allocated * 8,
                                   min(ALLOCATION_CHUNK, self.capacity - self._allocated) * 8)
                self._allocated = min(self.capacity, self._allocated + ALLOCATION_CHUNK)
            except OSError as exc:
                why = f"no disk space for the metric store in {self.directory} ({exc.strerror})"
        if why is None and self._index is not None:
            try:
                self.write_index_line(f"{slot}\t{family.stored_as}\t{json.dumps(list(key))}\n".encode("utf-8"))
            except OSError as exc:
                why = f"the metric store's index in {self.directory} cannot be written ({exc.strerror})"
        if why is not None:
            if key not in family.dropped:
                family.dropped.add(key)
                self.values[self._dropped_slot] += 1.0
                if not self._logged_full:
                    self._logged_full = True
                    log.error("%s: new series are dropped and counted in %s", why, DROPPED_SERIES)
            return 0
        self.next_slot += family.width
        family.series[key] = slot
        return slot

    def slot(self, family: Family, key: tuple) -> int:
        """The slot of a series, created if new (caller holds the lock)."""
        slot = family.series.get(key)
        return slot if slot is not None else self.new_series(family, key)

    # -- writing (caller holds the lock); the slot layout stays in here ----------------------
    def add(self, family: Family, slot: int, amount: float) -> None:
        scale = family.scale
        self.values[slot] += amount if scale == 1.0 else round(amount * scale)

    def request_slots(self, counter: int, token_histogram: Tuple[int, Family],
                      route_histogram: Tuple[int, Family], max_slot: int) -> tuple:
        """What ``observe_request`` writes for one kind of request, worked out once: the counter,
        the two histograms' (slot, family) as first bucket, bounds, sum slot and scale, and the
        gauge_max slot (0: none)."""
        (a, fa), (b, fb) = token_histogram, route_histogram
        return (counter, a, fa.buckets, a + fa.width - 1, fa.scale,
                b, fb.buckets, b + fb.width - 1, fb.scale, max_slot)

    def observe_request(self, slots: tuple, value: float, stamp: float) -> None:
        """The request path in one call: +1 on the counter, ``value`` observed into both
        histograms, ``stamp`` raised into the gauge_max (``slots`` from request_slots)."""
        counter, a, a_bounds, a_sum, a_scale, b, b_bounds, b_sum, b_scale, max_slot = slots
        v = self.values
        v[counter] += 1.0
        v[a + bisect_left(a_bounds, value)] += 1.0
        v[a_sum] += round(value * a_scale)
        v[b + bisect_left(b_bounds, value)] += 1.0
        v[b_sum] += round(value * b_scale)
        if max_slot and stamp > v[max_slot]:
            v[max_slot] = stamp

    def set_recent3(self, slots: Tuple[int, int, int], x: float, y: float, z: float, now: float) -> None:
        """Three gauge_recent series at once (a window's limit, remaining, reset), each with
        ``now``, so the newest write wins when processes are merged."""
        a, b, c = slots
        v = self.values
        v[a] = x
        v[b] = y
        v[c] = z
        v[a + 1] = v[b + 1] = v[c + 1] = now

    def set_limits(self, slots: Sequence[int], values: Sequence[float], now: float) -> None:
        """Rate-limit windows' remaining requests and reset times into their gauge_recent slots
        (``slots`` and ``values`` flat and in the same order, as a Decision holds the values),
        each stamped ``now``."""
        v = self.values
        for slot, value in zip(slots, values):
            v[slot] = value
            v[slot + 1] = now

    def set_recent(self, slot: int, value: float, now: float) -> None:
        """One gauge_recent series, stamped ``now`` (the newest write wins across processes)."""
        v = self.values
        v[slot] = value
        v[slot + 1] = now

    def set_max(self, slot: int, value: float) -> None:
        """Raise a gauge_max series to ``value``."""
        if value > self.values[slot]:
            self.values[slot] = value

    # -- reading -----------------------------------------------------------------------------
    def recent_values(self, family: Family) -> Dict[tuple, Tuple[float, float]]:
        """(value, time written) of each series of a gauge_recent family: the newest write of
        any process in directory mode."""
        if self.directory:
            return {k: (row[0], row[1]) for k, row in self._merged().get(family.stored_as, {}).items()}
        v = self.values
        with self.lock:
            items = list(family.series.items())
        return {k: (v[slot], v[slot + 1]) for k, slot in items}

    def family_data(self, family: Family) -> Tuple[List[tuple], list]:
        """(keys, values): a float per key, or a list of floats per key for histograms.
        With a directory, summed over every process's file and the archive (gauges: newest or
        max)."""
        if self.directory:
            merged = self._merged().get(family.stored_as, {})
            keys = list(merged)
            if family.kind == "histogram":
                rows = [merged[k] for k in keys]
            else:
                values = [merged[k][0] for k in keys]
        else:
            v = self.values
            with self.lock:                          # writers may be adding series right now
                items = list(family.series.items())
            keys = [k for k, _ in items]
            if family.kind == "histogram":
                width = family.width
                rows = [v[slot:slot + width].tolist() for _, slot in items]
            else:
                values = [v[slot] for _, slot in items]
        scale = family.scale
        if family.kind == "histogram":
            if scale != 1.0:
                if self.directory:                   # the merge's rows are cached: copies
                    rows = [row[:-1] + [row[-1] / scale] for row in rows]
                else:                                # fresh lists from tolist()
                    for row in rows:
                        row[-1] /= scale
            return keys, rows
        if scale != 1.0:
            values = [x / scale for x in values]
        return keys, values

    @contextlib.contextmanager
    def snapshot(self):
        """Reads inside share one merge of the files (directory mode). Per thread, so concurrent
        scrapes each read a consistent view; nested snapshots reuse the outer one."""
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
        """Sum counters and histograms over the archive and every process's file; gauges:
        newest or max. The result is new on every call; nothing is shared between callers."""
        with self._merge_lock, _dir_lock(self.directory, exclusive=False):
            archive = self._read_archive()
            merged: Dict[str, Dict[tuple, List[float]]] = {f.stored_as: {} for f in self.families}
            for name, rows in archive.get("series", {}).items():
                family = self.by_name.get(name)
                if family is not None and family.width:
                    target = merged[family.stored_as]
                    for key, values in rows.items():
                        merge_into(target, family.kind, key, family.current_values(name, values))
            folded = archive.get("folded", frozenset())
            seen = set()
            for data_path in sorted(glob.glob(os.path.join(self.directory, "ate-*.data"))):
                if os.path.basename(data_path) in folded:
                    continue
                seen.add(data_path)
                read_file_into(merged, self.by_name, data_path, self._entries(data_path[:-5] + ".idx"))
            for gone in set(self._index_cache) - {p[:-5] + ".idx" for p in seen}:
                del self._index_cache[gone]
            return merged

    def _entries(self, path: str) -> Tuple[tuple, ...]:
        """Index lines of one process, parsed once and then incrementally (merge lock held)."""
        offset, entries = self._index_cache.get(path, (0, ()))
        new, consumed = read_index(path, offset)
        if new:
            entries = entries + tuple(new)
        self._index_cache[path] = (offset + consumed, entries)
        return entries

    def _read_archive(self) -> dict:
        path = os.path.join(self.directory, ARCHIVE)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return {}
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached_stamp, cached = self._archive_cache
        if cached_stamp != stamp:
            cached = load_archive(path)
            self._archive_cache = (stamp, cached)
        return cached

    def values_by_key(self, family: Family) -> Dict[tuple, float]:
        keys, values = self.family_data(family)
        return dict(zip(keys, values))

    def dropped_series(self) -> int:
        """Series not stored because the store was full, over all processes."""
        family = self.by_name.get(DROPPED_SERIES)
        return int(sum(self.family_data(family)[1])) if family is not None else 0

    # -- exposition --------------------------------------------------------------------------
    def render(self, derived: Iterable[Tuple[Family, List[tuple], List[float]]] = (),
               openmetrics: bool = False, skip: Iterable[Family] = ()) -> bytes:
        """The exposition text; stored families in ``skip`` are left to ``derived``. Values are
        finite by construction, so repr() formats them (it parses to the same float as
        prometheus_client's Go-style formatting)."""
        out: List[str] = []
        skip = set(map(id, skip))
        with self.snapshot():
            stored = [(f,) + self.family_data(f) for f in self.families if f.width and id(f) not in skip]
        for family, keys, values in stored:
            self._header(out, family, openmetrics)
            if not keys:
                continue
            prefixes = family.prefixes
            if family.kind == "histogram":       # the whole family in one join
                nb = len(family.buckets)
                lines = [prefixes.get(key) or self._histogram_prefixes(family, key) for key in keys]
                numbers: List[float] = []
                extend, append = numbers.extend, numbers.append
                for row in values:                # cumulative buckets, +Inf again as the count, sum
                    extend(accumulate(row[:nb + 1]))
                    append(numbers[-1])
                    append(row[nb + 1])
                out.append(exposition_lines(chain.from_iterable(lines), numbers))
                continue
            out.append(exposition_lines(self._line_prefixes(family, keys), values))
        for family, keys, values in derived:
            self._header(out, family, openmetrics)
            if keys:                     # per key in the key file, or per token's window: cached
                out.append(exposition_lines(self._line_prefixes(family, keys), values))
        if openmetrics:
            out.append("# EOF\n")
        # validation.py keeps lone surrogates out; should one slip past, it must not cost a scrape
        return "".join(out).encode("utf-8", "replace")

    @classmethod
    def _line_prefixes(cls, family: Family, keys) -> List[str]:
        """Each key's `name{labels} `, built once per series and cached on the family."""
        prefixes = family.prefixes
        return [prefixes.get(k) or cls._prefix(family, k) for k in keys]

    @staticmethod
    def _prefix(family: Family, key: tuple) -> str:
        prefix = family.prefixes[key] = f"{family.name}{family.labels_text(key)} "
        return prefix

    @staticmethod
    def _histogram_prefixes(family: Family, key: tuple) -> tuple:
        les = [f'le="{float_to_go_string(b)}"' for b in family.buckets] + ['le="+Inf"']
        plain = family.labels_text(key)
        lines = family.prefixes[key] = tuple([f"{family.name}_bucket{family.labels_text(key, le)} " for le in les]
                                             + [f"{family.name}_count{plain} ", f"{family.name}_sum{plain} "])
        return lines

    @staticmethod
    def _header(out: List[str], family: Family, openmetrics: bool) -> None:
        name = family.name
        if openmetrics and family.kind == "counter" and name.endswith("_total"):
            name = name[:-6]
        out.append(f"# HELP {name} {escape_help(family.help)}\n# TYPE {name} {family.type_name}\n")


def exposition_lines(prefixes: Iterable[str], values: Iterable[float]) -> str:
    """``prefix value`` lines, each ending in a newline, in one join (no string per line)."""
    return "".join(chain.from_iterable(zip(prefixes, map(repr, values), repeat("\n"))))


# -- files: reading, folding ----------------------------------------------------------------
def stored_names(families: Iterable[Family]) -> Dict[str, Family]:
    """Family by every name its values may be stored under: its own and its former layouts'."""
    out = {}
    for family in families:
        out[family.stored_as] = family
        out.update(dict.fromkeys(family.former, family))
    return out


def read_index(path: str, offset: int = 0) -> Tuple[List[tuple], int]:
    """(entries, bytes consumed) of the complete lines of an index file from ``offset``."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            chunk = fh.read()
    except FileNotFoundError:
        return [], 0
    end = chunk.rfind(b"\n") + 1               # a line still being written waits for next time
    entries = []
    for line in chunk[:end].split(b"\n")[:-1]:
        try:
            slot, name, key = line.decode("utf-8").split("\t", 2)
            entries.append((int(slot), name, tuple(json.loads(key))))
        except ValueError:                      # never written by a store: no scrape fails on it
            log.error("metric store index %s: a line that cannot be read is skipped", path)
    return entries, end


def read_file_into(merged: Dict[str, Dict[tuple, List[float]]], by_name: Dict[str, Family],
                   data_path: str, entries: Sequence[tuple]) -> None:
    if not entries:
        return
    try:
        with open(data_path, "rb") as fh:
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except (FileNotFoundError, ValueError):
        return
    values = memoryview(mm).cast("d")
    try:
        for slot, name, key in entries:
            family = by_name.get(name)
            if family is None or not family.width:
                continue
            width = family.width if name == family.stored_as else len(family.former[name]) + 2
            if slot + width > len(values):
                continue
            merge_into(merged.setdefault(family.stored_as, {}), family.kind, key,
                       family.current_values(name, values[slot:slot + width].tolist()))
    finally:
        values.release()
        mm.close()


def load_archive(path: str) -> dict:
    """{"folded": set of file names, "series": {family: {key tuple: values}}}."""
    try:
        with open(path, "r", encoding="utf-8") as fh:
            doc = json.load(fh)
    except FileNotFoundError:
        return {}
    return {"folded": frozenset(doc.get("folded", ())),
            "series": {name: {tuple(key): values for key, values in rows}
                       for name, rows in doc.get("series", {}).items()}}


def _owned_by_nobody(data_path: str) -> bool:
    try:
        fd = os.open(data_path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def check_directory(directory: str) -> None:
    """Raise OSError, naming ``directory``, if a store could not start there: it cannot be made
    or written, or has no room for a store's first reservation (a full disk at start-up)."""
    probe = os.path.join(directory, f".probe-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.makedirs(directory, exist_ok=True)
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, ALLOCATION_CHUNK * 8)
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(probe)
    except OSError as exc:
        raise OSError(exc.errno, f"the metric store cannot start in {directory}: {exc.strerror or exc} "
                                 f"(each process needs {ALLOCATION_CHUNK * 8 // 1048576} MiB there to begin)") from None


def fold_dead_files_safely(directory: str, families: Iterable[Family]) -> int:
    """fold_dead_files, but a full or failing disk is logged, not raised: the dead files stay
    and their counts are still summed by every scrape; the next fold tries again."""
    try:
        return fold_dead_files(directory, families)
    except OSError as exc:
        log.error("metric files in %s not folded: %s", directory, exc)
        return 0


def fold_dead_files(directory: str, families: Iterable[Family]) -> int:
    """Fold the files of processes that ended into the archive and delete them. Returns how
    many were folded. Safe to call from any process at any time (gunicorn's master calls it
    when it starts and when a worker exits)."""
    by_name = stored_names(families)
    path = os.path.join(directory, ARCHIVE)
    with _dir_lock(directory, exclusive=True):
        archive = load_archive(path)
        for name in archive.get("folded", ()):   # folded before a crash, not yet deleted
            for suffix in (".data", ".idx"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(directory, name[:-5] + suffix))
        dead = [p for p in sorted(glob.glob(os.path.join(directory, "ate-*.data")))
                if _owned_by_nobody(p)]
        if not dead:
            return 0
        merged: Dict[str, Dict[tuple, List[float]]] = {}
        for name, rows in archive.get("series", {}).items():
            merged[name] = dict(rows)
        for data_path in dead:
            entries, _ = read_index(data_path[:-5] + ".idx")
            for _, name, _ in entries:
                merged.setdefault(name, {})
            read_file_into(merged, by_name, data_path, [e for e in entries if e[1] in by_name])
        doc = {"folded": [os.path.basename(p) for p in dead],
               "series": {name: [[list(k), v] for k, v in rows.items()] for name, rows in merged.items()}}
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(doc, fh, separators=(",", ":"))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        for data_path in dead:
            for p in (data_path, data_path[:-5] + ".idx"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)
        return len(dead)
