"""In-process alert checks for one call: ``AlertService.check_all_alerts``.

    from api_token_exporter.alerting.checks import AlertService
    alerts = AlertService()                              # thresholds as in prometheus/thresholds.yml
    breaches = alerts.check_all_alerts(api_key_id=123, response_time=1.5, endpoint="/api/v1/test")
    breaches = await alerts.acheck_all_alerts(api_key_id=123, response_time=1.5, endpoint="/api/v1/test")
    alerts.check_unauthorized(client="203.0.113.7")      # on each failed authentication

A complement to the Prometheus rules, not a replacement: the rules (prometheus/rules/, rendered
from thresholds.yml) remain the real alerting. They see every worker and replica, keep history
across restarts and route to people through Alertmanager. This sees only its own process, for
code that wants an immediate answer about the call it just made (a log line, a header, a
fallback). Each breach is logged on ``api_token_exporter.alerts`` at WARNING or CRITICAL.

What is judged, with the rules' thresholds and volume guards (but not their p95 or baseline):
- response_time: this call's duration (``> warning`` / ``> critical`` seconds);
- error_rate: 5xx share of the key's calls in the last 5 minutes, once there are min_requests;
- usage_spike: the key's calls in the last minute against its mean per minute over the hour
  before that, once that hour lies entirely in the key's history and the last minute has more
  than min_requests_per_second * 60 calls (a key silent all that hour counts as a spike);
- unauthorized (``check_unauthorized``): more than ``critical`` failed attempts by one client
  in the last hour (fires on the 6th).

Dedupe: a breach is logged when it first appears, when it gets worse (warning -> critical), and
again every ``repeat_interval`` while it lasts; a check that finds it gone clears it, so the next
one is logged. The returned list always holds every current breach.

Memory is bounded: per key, 10-second buckets in fixed rings (366 call counts, 30 error counts,
about 2 KB), at most ``max_tokens`` keys and as many clients, least recently used evicted.
Windows move in 10-second steps: "the last 5 minutes" is now's bucket and the 29 before it. A
call stamped earlier than one already recorded for its key counts at the later time. Pass the
key's id, not the key: caller text in messages is escaped and cut to 64 characters.
"""
from __future__ import annotations

import logging
import threading
import time
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Dict, Hashable, List, Optional

log = logging.getLogger("api_token_exporter.alerts")

BUCKET = 10                       # seconds per bucket
ERROR_BUCKETS = 30                # 5m, the rules' rate_window
MINUTE_BUCKETS = 6
HOUR_BUCKETS = 360
RING = MINUTE_BUCKETS + HOUR_BUCKETS
UNAUTHORIZED_WINDOW = 3600
MAX_TEXT = 64

# alert_thresholds plus the rules' volume guards: prometheus/thresholds.yml's values
DEFAULT_THRESHOLDS = {
    "response_time": {"warning": 1.0, "critical": 2.0},
    "error_rate": {"warning": 0.05, "critical": 0.10, "min_requests": 20},
    "usage_spike": {"warning": 2.0, "critical": 3.0, "min_requests_per_second": 0.2},
    "unauthorized": {"critical": 5},
}
_RULES = {   # field -> (check, what it must be)
    "response_time": (lambda v: v > 0, "a number above 0"),
    "error_rate": (lambda v: 0 <= v <= 1, "a number from 0 to 1"),
    "usage_spike": (lambda v: v > 0, "a number above 0"),
    "min_requests": (lambda v: v >= 1, "a number of at least 1"),
    "min_requests_per_second": (lambda v: v >= 0, "a number of at least 0"),
    "unauthorized": (lambda v: v >= 0, "a number of at least 0"),
}
_RANK = {"warning": 1, "critical": 2}
_UNITS = {"response_time": "s", "usage_spike": "x", "error_rate": "", "unauthorized": ""}


def validate_thresholds(alert_thresholds: Optional[dict]) -> Dict[str, dict]:
    """``alert_thresholds`` (any part of it) over the defaults, checked field by field."""
    merged = {name: dict(fields) for name, fields in DEFAULT_THRESHOLDS.items()}
    for name, fields in (alert_thresholds or {}).items():
        if name not in merged:
            raise ValueError(f"alert_thresholds.{name}: unknown, expected one of {', '.join(merged)}")
        if not isinstance(fields, dict):
            raise ValueError(f"alert_thresholds.{name} must be a mapping of warning/critical")
        for field, value in fields.items():
            if field not in merged[name]:
                raise ValueError(f"alert_thresholds.{name}.{field}: unknown, expected one of "
                                 f"{', '.join(merged[name])}")
            check, what = _RULES[field if field.startswith("min_") else name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not check(value):
                raise ValueError(f"alert_thresholds.{name}.{field} must be {what}, got {value!r}")
            merged[name][field] = value
        if "warning" in merged[name] and merged[name]["warning"] > merged[name]["critical"]:
            raise ValueError(f"alert_thresholds.{name}.warning must not exceed "
                             f"alert_thresholds.{name}.critical")
    return merged


def _clip(value) -> str:
    """Caller text as it may appear in a log line: control characters escaped, at most 64 long."""
    text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in str(value))
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT - 1] + "…"


@dataclass(frozen=True)
class Breach:
    type: str                      # response_time, error_rate, usage_spike or unauthorized
    severity: str                  # warning or critical
    token: Hashable                # the api_key_id (the client, for unauthorized)
    endpoint: Optional[str]
    value: float                   # seconds, error ratio, times normal, failed attempts
    threshold: float
    message: str


class _Key:
    __slots__ = ("calls", "errors", "first", "last", "prev_calls", "prev_errors", "prev_minute",
                 "baseline", "alerted")

    def __init__(self, bucket: int):
        self.calls, self.errors = array("I", [0]) * RING, array("I", [0]) * ERROR_BUCKETS
        self.first = self.last = bucket
        self.prev_calls = self.prev_errors = self.prev_minute = self.baseline = 0
        self.alerted: Dict[str, tuple] = {}        # type -> (rank logged, when)

    def advance(self, bucket: int) -> None:
        """Make ``bucket`` the current one: clear the buckets it reuses, and sum the finished
        buckets each window needs once here rather than on every call."""
        if bucket <= self.last:
            return
        for ring in (self.calls, self.errors):
            if bucket - self.last >= len(ring):
                ring[:] = array("I", [0]) * len(ring)
            else:
                for b in range(self.last + 1, bucket + 1):
                    ring[b % len(ring)] = 0
        self.last = bucket
        self.prev_calls = _total(self.calls, bucket - ERROR_BUCKETS + 1, bucket)
        self.prev_errors = _total(self.errors, bucket - ERROR_BUCKETS + 1, bucket)
        self.prev_minute = _total(self.calls, bucket - MINUTE_BUCKETS + 1, bucket)
        self.baseline = _total(self.calls, bucket - RING + 1, bucket - MINUTE_BUCKETS + 1)


def _total(ring: array, lo: int, hi: int) -> int:
    """Sum of buckets lo .. hi - 1 (absolute numbers, at most one ring's worth)."""
    a, b = lo % len(ring), hi % len(ring)
    return 0 if hi <= lo else sum(ring[a:b]) if a < b else sum(ring[a:]) + sum(ring[:b])


class AlertService:
    def __init__(self, alert_thresholds: Optional[dict] = None, *, max_tokens: int = 10_000,
                 repeat_interval: float = 300.0):
        if max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        self.thresholds = validate_thresholds(alert_thresholds)
        self.max_tokens, self.repeat_interval = max_tokens, repeat_interval
        self._keys: "OrderedDict[Hashable, _Key]" = OrderedDict()
        self._clients: "OrderedDict[Hashable, tuple]" = OrderedDict()   # client -> (times, alerted)
        self._lock = threading.Lock()

    @classmethod
    def from_thresholds(cls, path: Optional[str] = None, **kwargs) -> "AlertService":
        """The values of a thresholds.yml, the file the Prometheus rules are rendered from (the
        packaged defaults, the same as prometheus/thresholds.yml, when ``path`` is None)."""
        from ..mixin.thresholds import load_thresholds
        t = load_thresholds(path)
        return cls({"response_time": {k: t["latency"][k] for k in ("warning", "critical")},
                    "error_rate": {k: t["error_rate"][k] for k in ("warning", "critical", "min_requests")},
                    "usage_spike": {k: t["usage_spike"][k]
                                    for k in ("warning", "critical", "min_requests_per_second")},
                    "unauthorized": {"critical": t["unauthorized"]["critical"]}}, **kwargs)

    def check_all_alerts(self, api_key_id: Hashable, response_time: float, endpoint: str,
                         status: int = 200, now: Optional[float] = None) -> List[Breach]:
        """Record one call of ``api_key_id`` and return the breaches it shows (logged, deduped)."""
        now = time.time() if now is None else now
        th = self.thresholds
        with self._lock:
            key = self._entry(self._keys, api_key_id, lambda: _Key(int(now // BUCKET)))
            key.advance(int(now // BUCKET))
            current = key.last                       # never earlier than a call already recorded
            key.calls[current % RING] += 1
            key.errors[current % ERROR_BUCKETS] += 500 <= status < 600
            calls = key.prev_calls + key.calls[current % RING]
            errors = key.prev_errors + key.errors[current % ERROR_BUCKETS]
            minute = key.prev_minute + key.calls[current % RING]
            spike = th["usage_spike"]
            ready = current - key.first >= RING - 1 and minute > spike["min_requests_per_second"] * 60
            mean = key.baseline / (HOUR_BUCKETS / MINUTE_BUCKETS)      # calls per minute
            found = {"response_time": self._grade("response_time", response_time),
                     "error_rate": (self._grade("error_rate", errors / calls)
                                    if calls >= th["error_rate"]["min_requests"] else (None, 0)),
                     "usage_spike": (self._grade("usage_spike", minute / mean if mean else float("inf"))
                                     if ready else (None, 0))}
            breaches = []
            for kind, (severity, value) in found.items():
                if severity:
                    detail = (f" ({errors} of {calls} calls in the last 5m)" if kind == "error_rate" else
                              f" ({minute} calls in the last minute, {mean:.3g} a minute in the hour "
                              "before)" if kind == "usage_spike" else "")
                    breaches.append(self._breach(kind, severity, api_key_id, endpoint, value, detail))
            to_log = self._dedupe(key.alerted, found, breaches, now)
        self._log(to_log)
        return breaches

    async def acheck_all_alerts(self, api_key_id: Hashable, response_time: float, endpoint: str,
                                status: int = 200, now: Optional[float] = None) -> List[Breach]:
        """``check_all_alerts`` for ``await``: it does no I/O, so it simply runs inline."""
        return self.check_all_alerts(api_key_id, response_time, endpoint, status, now)

    def check_unauthorized(self, client: Hashable, now: Optional[float] = None) -> List[Breach]:
        """Record one failed authentication by ``client`` (an address or client id); critical
        once it made more than ``unauthorized.critical`` in the last hour."""
        now = time.time() if now is None else now
        limit = self.thresholds["unauthorized"]["critical"]
        with self._lock:
            # the last limit + 1 attempts decide whether more than limit fall in the hour
            times, alerted = self._entry(self._clients, client,
                                         lambda: (deque(maxlen=int(limit) + 1), {}))
            times.append(now)
            count = sum(1 for t in times if now - t < UNAUTHORIZED_WINDOW)
            found = {"unauthorized": ("critical", count) if count > limit else (None, count)}
            breaches = [self._breach("unauthorized", "critical", client, None, count,
                                     " failed authentications in the last hour")] if count > limit else []
            to_log = self._dedupe(alerted, found, breaches, now)
        self._log(to_log)
        return breaches

    def snapshot(self, api_key_id: Hashable, now: Optional[float] = None) -> Dict[str, int]:
        """Calls and 5xx errors of ``api_key_id`` in the error-rate window ending at ``now``."""
        now = time.time() if now is None else now
        with self._lock:
            key = self._keys.get(api_key_id)
            if key is None:
                return {"calls": 0, "errors": 0}
            key.advance(int(now // BUCKET))
            return {"calls": key.prev_calls + key.calls[key.last % RING],
                    "errors": key.prev_errors + key.errors[key.last % ERROR_BUCKETS]}

    def _entry(self, table: OrderedDict, name: Hashable, make):
        entry = table.get(name)
        if entry is None:
            entry = table[name] = make()
            if len(table) > self.max_tokens:
                table.popitem(last=False)
        else:
            table.move_to_end(name)
        return entry

    def _grade(self, kind: str, value: float) -> tuple:
        th = self.thresholds[kind]
        severity = "critical" if value > th["critical"] else "warning" if value > th["warning"] else None
        return severity, value

    def _breach(self, kind, severity, token, endpoint, value, detail) -> Breach:
        threshold = self.thresholds[kind][severity]
        shown = f"{value:.1%} > {threshold * 100:g}%" if kind == "error_rate" else (
            f"{value:.4g}{_UNITS[kind]} > {threshold:g}{_UNITS[kind]}")
        where = f" on {_clip(endpoint)}" if endpoint is not None else ""
        who = "client" if kind == "unauthorized" else "token"
        return Breach(kind, severity, token, endpoint, value, threshold,
                      f"{kind} {severity}: {who} {_clip(token)}{where}: {shown}{detail}")

    def _dedupe(self, alerted: dict, found: dict, breaches: List[Breach], now: float) -> List[Breach]:
        for kind, (severity, _) in found.items():
            if severity is None:
                alerted.pop(kind, None)
        to_log = []
        for b in breaches:
            rank, at = alerted.get(b.type, (0, None))
            if _RANK[b.severity] > rank or now - at >= self.repeat_interval:
                alerted[b.type] = (_RANK[b.severity], now)
                to_log.append(b)
        return to_log

    @staticmethod
    def _log(breaches: List[Breach]) -> None:
        for b in breaches:     # outside the lock: a slow log handler must not stall other threads
            log.log(logging.CRITICAL if b.severity == "critical" else logging.WARNING, b.message)


__all__ = ["AlertService", "Breach", "DEFAULT_THRESHOLDS", "validate_thresholds"]
