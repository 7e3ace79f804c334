"""The requests as they happen, across every process that shares a store directory: what the
console's live view and the recent requests of /admin/stats show.

Each process writes each request it records into its own ring of fixed-size records (a memory
map: one file per process in the store directory, like the store's own files, else anonymous
memory). Writing is three ``pack_into`` (about 0.4 µs in a loop, 2 µs inside a real request,
where its cache lines are cold); nothing waits on a reader. A reader keeps a
cursor per ring and takes the records written since its last look; a ring it fell behind by more
than its size lapped it, and the records it lost are counted, not guessed.

Each record carries its sequence number last, so a reader that meets a record being written
(another process, or a thread of this one that took its number first) sees the old number and
looks again next time. Files: ``live-<pid>-<random>.ring``, created as ``.new``, locked, then
renamed, so a reader never takes a ring being born for a dead one; a ring whose lock can be
taken belongs to nobody, and a process creating its ring removes those whose last request is
more than two minutes old (readers still see the last requests of a worker that just ended).
"""
from __future__ import annotations

import collections
import contextlib
import fcntl
import glob
import itertools
import logging
import math
import mmap
import os
import secrets
import struct
import threading
import time
import weakref
from typing import Dict, FrozenSet, Iterable, List, NamedTuple, Optional, Tuple

log = logging.getLogger("api_token_exporter")

SLOTS = 4096                          # records per ring: a reader looking every second keeps up
HEADER = 64                           # bytes before the first record: the count written so far
_COUNT = struct.Struct("<Q")
# time, duration, code, lengths of token, method and route, flags, method, token, route, sequence
_RECORD = struct.Struct("<ddHBBBB10s64s152sQ")
RECORD_SIZE = _RECORD.size
SIZE = HEADER + SLOTS * RECORD_SIZE
# written in two parts: the numbers with the labels (the same for every request of a token,
# method and route: packed once), then the sequence number
_LABELS = struct.Struct("<BBBB10s64s152s")
_BODY = struct.Struct(f"<ddH{_LABELS.size}s")
_SEQUENCE = struct.Struct("<Q")
_SEQUENCE_AT = _BODY.size
KEEP_LABELS = 4096                    # packed label sets kept; past that the cache starts again
_HAS_TOKEN, _ROUTE_CUT = 1, 2
STUCK = 64                            # a record still unwritten this far behind the count is lost
KEEP_DEAD = 120.0                     # seconds the ring of a process that ended is still read


class Request(NamedTuple):
    time: float
    token: Optional[str]              # the key id, None for a request without a usable key
    method: str
    route: str
    code: int
    duration: float


class RequestFeed:
    """This process's ring, and readers of every ring in the directory."""

    def __init__(self, directory: Optional[str] = None):
        self.directory = directory or None
        self._open()
        _FEEDS.add(self)

    def _open(self) -> None:
        self._counter = itertools.count()
        self._labels: Dict[tuple, bytes] = {}
        self.path = None
        self.pid = os.getpid()
        mm = None
        if self.directory:
            try:
                mm = self._open_file()
            except OSError as exc:      # a full disk: this process's requests show to its own readers only
                log.warning("the live request feed cannot create its file in %s (%s): this process's "
                            "requests are shown only by its own console", self.directory, exc.strerror or exc)
        if mm is None:
            mm = mmap.mmap(-1, SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._mm = mm

    def _open_file(self) -> mmap.mmap:
        os.makedirs(self.directory, exist_ok=True)
        remove_dead_rings(self.directory)
        base = os.path.join(self.directory, f"live-{os.getpid()}-{secrets.token_hex(4)}.ring")
        fd = os.open(base + ".new", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.posix_fallocate(fd, 0, SIZE)       # the pages are there: a write never meets a full disk
            mm = mmap.mmap(fd, SIZE)
            os.rename(base + ".new", base)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(base + ".new")
            raise
        self._fd, self.path = fd, base        # the lock lives as long as the descriptor
        return mm

    def reopen(self) -> None:
        """After fork: the parent's ring is the parent's."""
        with contextlib.suppress(Exception):
            self._mm.close()
        if self.path is not None:
            os.close(self._fd)
        self._open()

    def record(self, ts: float, token: Optional[str], method: str, route: str, code: int,
               duration: float) -> None:
        labels = self._labels.get((token, method, route))
        if labels is None:
            labels = self._pack_labels(token, method, route)
        i = next(self._counter)               # atomic: threads never share a number
        at = HEADER + (i % SLOTS) * RECORD_SIZE
        mm = self._mm
        try:
            _BODY.pack_into(mm, at, ts, duration, code, labels)
        except (struct.error, ValueError, TypeError):   # a value no record holds is not shown
            return
        _SEQUENCE.pack_into(mm, at + _SEQUENCE_AT, i + 1)
        _COUNT.pack_into(mm, 0, i + 1)

    def _pack_labels(self, token: Optional[str], method: str, route: str) -> bytes:
        t = token.encode("ascii", "replace")[:64] if token else b""      # key ids: at most 64
        m = method.encode("utf-8", "replace")[:10]
        r = route.encode("utf-8", "replace")
        flags = _HAS_TOKEN if token else 0
        if len(r) > 152:
            r, flags = r[:152], flags | _ROUTE_CUT
        labels = _LABELS.pack(len(t), len(m), len(r), flags, m, t, r)
        if len(self._labels) >= KEEP_LABELS:
            self._labels = {}
        self._labels[(token, method, route)] = labels
        return labels

    def rings(self) -> List[Tuple[Optional[str], mmap.mmap]]:
        """(path, map) of this process's ring and every other one in the directory."""
        out = [(self.path, self._mm)]
        if self.directory:
            for path in sorted(glob.glob(os.path.join(self.directory, "live-*.ring"))):
                if path != self.path:
                    mm = _map(path)
                    if mm is not None:
                        out.append((path, mm))
        return out

    def latest(self, n: int) -> List[Request]:
        """The last ``n`` requests of every process, oldest first."""
        found: List[Request] = []
        for path, mm in self.rings():
            count = _COUNT.unpack_from(mm, 0)[0]
            for index in range(max(0, count - min(n, SLOTS)), count):
                request = _read(mm, index)
                if request is not None:
                    found.append(request)
            if path != self.path:
                mm.close()
        found.sort(key=lambda r: r.time)
        return found[-n:] if n > 0 else []

    def reader(self) -> "FeedReader":
        return FeedReader(self)


class FeedReader:
    """A cursor per ring: ``read`` gives the requests written since the last ``read``."""

    def __init__(self, feed: RequestFeed):
        self.feed = feed
        self._cursors: Dict[Optional[str], int] = {}
        self._pid = feed.pid
        self.skip()

    def skip(self) -> None:
        """Start from now: what was written before is not new."""
        self._cursors = {}
        for path, mm in self.feed.rings():
            self._cursors[path] = _COUNT.unpack_from(mm, 0)[0]
            if path != self.feed.path:
                mm.close()

    def read(self) -> Tuple[List[Request], int]:
        """(new requests oldest first, how many were lost because a ring lapped this reader)."""
        if self._pid != self.feed.pid:            # forked: the rings are not the ones we followed
            self._pid = self.feed.pid
            self.skip()
        found: List[Request] = []
        lost = 0
        seen = {}
        for path, mm in self.feed.rings():
            count = _COUNT.unpack_from(mm, 0)[0]
            cursor = self._cursors.get(path, 0 if path != self.feed.path else count)
            if count - cursor > SLOTS:
                lost += count - cursor - SLOTS
                cursor = count - SLOTS
            index = cursor
            while index < count:
                request = _read(mm, index)
                if request is None and count - index <= STUCK:
                    break                              # being written: taken next time
                if request is None:
                    lost += 1
                else:
                    found.append(request)
                index += 1
            seen[path] = index
            if path != self.feed.path:
                mm.close()
        self._cursors = seen                           # rings that are gone are forgotten
        found.sort(key=lambda r: r.time)
        return found, lost


def _read(mm: mmap.mmap, index: int) -> Optional[Request]:
    """The record of sequence ``index``, or None if it is not (or no longer) there."""
    (ts, duration, code, tlen, mlen, rlen, flags, m, t, r, seq) = _RECORD.unpack_from(
        mm, HEADER + (index % SLOTS) * _RECORD.size)
    if seq != index + 1:
        return None
    route = r[:rlen].decode("utf-8", "ignore") + ("…" if flags & _ROUTE_CUT else "")
    return Request(ts, t[:tlen].decode("ascii", "replace") if flags & _HAS_TOKEN else None,
                   m[:mlen].decode("utf-8", "replace"), route, code, duration)


def _map(path: str) -> Optional[mmap.mmap]:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        if os.fstat(fd).st_size < SIZE:
            return None
        return mmap.mmap(fd, SIZE, prot=mmap.PROT_READ)
    except OSError:
        return None
    finally:
        os.close(fd)


def remove_dead_rings(directory: str, now: Optional[float] = None, keep: float = KEEP_DEAD) -> int:
    """Remove the rings of processes that are gone (their lock can be taken) whose last request
    is more than ``keep`` seconds old; how many."""
    now = time.time() if now is None else now
    removed = 0
    for path in glob.glob(os.path.join(directory, "live-*.ring")):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue                                   # its process holds it
        else:
            if _last_time(fd) < now - keep:
                with contextlib.suppress(OSError):
                    os.unlink(path)
                    removed += 1
        finally:
            os.close(fd)
    return removed


def _last_time(fd: int) -> float:
    """When a ring's last request came (0: none, or not a whole ring)."""
    try:
        if os.fstat(fd).st_size < SIZE:
            return 0.0
        with mmap.mmap(fd, SIZE, prot=mmap.PROT_READ) as mm:
            count = _COUNT.unpack_from(mm, 0)[0]
            last = _read(mm, count - 1) if count else None
    except OSError:
        return 0.0
    return last.time if last is not None else 0.0


_FEEDS: "weakref.WeakSet[RequestFeed]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for feed in list(_FEEDS):
        feed.reopen()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# -- the live view ---------------------------------------------------------------------------------
class Viewer:
    """One open live view: which tokens it may see (None: all, with requests without a key)."""
    __slots__ = ("tokens", "last")

    def __init__(self, tokens: Optional[FrozenSet[str]], last: int):
        self.tokens, self.last = tokens, last

    def sees(self, token: Optional[str]) -> bool:
        return self.tokens is None or token in self.tokens


class LiveView:
    """Per-second counts per token over the last ``history`` seconds and the newest requests,
    from one reader shared by every viewer of this process; brought up to date at most every
    ``min_interval`` seconds whoever asks."""

    def __init__(self, feed: RequestFeed, history: int = 60, window: int = 10, rows: int = 50,
                 durations_per_second: int = 200, min_interval: float = 0.25):
        self.history, self.window, self.rows = history, window, rows
        self.durations_per_second = durations_per_second
        self.min_interval = min_interval
        self._reader = feed.reader()
        self._lock = threading.Lock()
        # second -> token -> [requests, errors, durations (the first durations_per_second)]
        self._seconds: Dict[int, Dict[Optional[str], list]] = {}
        self._recent: collections.deque = collections.deque(maxlen=max(1000, rows * 4))   # (number, request)
        self._number = 0
        self.lost = 0
        self._updated = 0.0

    def viewer(self, tokens: Optional[Iterable[str]], now: float) -> Viewer:
        with self._lock:
            if now - self._updated > self.history:        # nobody looked for a while: start afresh
                self._reader.skip()
                self._seconds.clear()
                self._recent.clear()
                self._updated = now
            return Viewer(None if tokens is None else frozenset(tokens), self._number)

    def update(self, now: float) -> None:
        with self._lock:
            if now - self._updated < self.min_interval:
                return
            self._updated = now
            requests, lost = self._reader.read()
            self.lost += lost
            oldest = int(now) - self.history
            for r in requests:
                self._number += 1
                self._recent.append((self._number, r))
                second = int(r.time)
                if second < oldest:
                    continue
                cell = self._seconds.setdefault(second, {}).get(r.token)
                if cell is None:
                    cell = self._seconds[second][r.token] = [0, 0, []]
                cell[0] += 1
                if r.code >= 400:
                    cell[1] += 1
                if len(cell[2]) < self.durations_per_second:
                    cell[2].append(r.duration)
            for second in [s for s in self._seconds if s < oldest]:
                del self._seconds[second]

    def message(self, viewer: Viewer, now: float, describe) -> dict:
        """What ``viewer`` is shown now: the new requests it may see (at most ``rows``, newest
        first), requests and errors in each of the last ``history`` whole seconds (from
        ``start``), and per token over the last ``window`` of them. ``describe(token)``
        gives a token's (name, masked id, tenant)."""
        with self._lock:
            new = [r for n, r in self._recent if n > viewer.last and viewer.sees(r.token)]
            viewer.last = self._number
            current = int(now)
            per_second, failed_per_second, tokens = [], [], {}
            for second in range(current - self.history, current):
                cells = self._seconds.get(second, {})
                requests = errors = 0
                for token, (count, failed, durations) in cells.items():
                    if not viewer.sees(token):
                        continue
                    requests += count
                    errors += failed
                    if second >= current - self.window:
                        t = tokens.setdefault(token, [0, 0, []])
                        t[0] += count
                        t[1] += failed
                        t[2].extend(durations)
                per_second.append(requests)
                failed_per_second.append(errors)
        rows = [_row(r, describe) for r in new[-self.rows:]]
        table = []
        for token, (count, failed, durations) in sorted(tokens.items(), key=lambda kv: -kv[1][0])[:self.rows]:
            name, masked, tenant = describe(token)
            durations.sort()
            table.append({"token": token, "name": name, "token_id": masked, "tenant": tenant,
                          "requests": count, "per_second": round(count / self.window, 2), "errors": failed,
                          "p50_ms": _ms(_quantile(durations, 0.5)), "p95_ms": _ms(_quantile(durations, 0.95))})
        return {"time": now, "window_seconds": self.window,
                "seconds": {"start": current - self.history, "requests": per_second, "errors": failed_per_second},
                "tokens": table,
                "requests": rows[::-1], "not_shown": max(0, len(new) - self.rows)}


def _row(r: Request, describe) -> dict:
    name, masked, _ = describe(r.token)
    return {"time": r.time, "token": r.token, "name": name, "token_id": masked, "method": r.method,
            "endpoint": r.route, "status": r.code, "duration_ms": _ms(r.duration)}


def _quantile(ordered: List[float], q: float) -> Optional[float]:
    """The nearest-rank quantile of sorted values."""
    if not ordered:
        return None
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else round(seconds * 1000, 1)
