"""The Prometheus requests Grafana 10.4 sends for a dashboard panel, computed without Grafana.

Follows Grafana's code: the panel's time range (dashboard default, or the panel's relative
time such as ``now/d`` or ``30d``); the frontend's interval (range / maxDataPoints, rounded,
at least the panel's min interval or the data source's scrape interval); the backend's step
(that interval, or a rounder one when range / maxDataPoints is larger); ``$__interval``,
``$__range`` and ``$__rate_interval`` as the backend interpolates them; a range query's
start and end rounded down to a multiple of the step (pkg/promlib/models/query.go,
AlignTimeRange); an instant query at the end of the range (pkg/promlib/client/client.go).
maxDataPoints defaults to the panel's width in pixels on a 1920-pixel screen.
"""
from __future__ import annotations

import calendar
import datetime as dt
import re
from dataclasses import dataclass
from typing import Dict, Optional

PX_PER_COLUMN = 75          # a 24-column grid about 1800 pixels wide
SAFE_RESOLUTION = 11000
UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "M": 2592000, "y": 31536000}

# Grafana's roundInterval (pkg/promlib/intervalv2): up to the first bound -> the value, in ms
_ROUND = [(10, 1), (15, 10), (35, 20), (75, 50), (150, 100), (350, 200), (750, 500), (1500, 1000),
          (3500, 2000), (7500, 5000), (12500, 10000), (17500, 15000), (25000, 20000), (45000, 30000),
          (90000, 60000), (210000, 120000), (450000, 300000), (750000, 600000), (1050000, 900000),
          (1500000, 1200000), (2700000, 1800000), (5400000, 3600000), (9000000, 7200000),
          (16200000, 10800000), (32400000, 21600000), (86400000, 43200000), (172800000, 86400000),
          (604800000, 86400000), (1814400000, 604800000)]


def round_interval_ms(ms: float) -> int:
    for bound, value in _ROUND:
        if ms <= bound:
            return value
    return 2592000000 if ms < 3628800000 else 31536000000


def parse_duration(text: str) -> float:
    m = re.fullmatch(r"(\d+)(ms|[smhdwMy])", text)
    if not m:
        raise ValueError(f"not a Grafana duration: {text!r}")
    return int(m.group(1)) * UNITS[m.group(2)]


def format_interval(seconds: float) -> str:
    """Grafana's gtime.FormatInterval: the largest whole unit."""
    ms = round(seconds * 1000)
    for unit, size in (("y", 31536000000), ("d", 86400000), ("h", 3600000), ("m", 60000), ("s", 1000)):
        if ms >= size:
            return f"{ms // size}{unit}"
    return f"{max(ms, 1)}ms"


def go_duration(seconds: float) -> str:
    """Go's time.Duration.String() for whole seconds, as $__rate_interval is written."""
    s = int(seconds)
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    if h:
        return f"{h}h{m}m{sec}s"
    if m:
        return f"{m}m{sec}s"
    return f"{sec}s"


def resolve(expr: str, now: dt.datetime, week_start: int = 0) -> dt.datetime:
    """Grafana date math for what dashboards use: now, now-6h, now/d, now/w, now/M, now-30d/d."""
    m = re.fullmatch(r"now(?:-(\d+)([smhdwMy]))?(?:/([dwMy]))?", expr)
    if not m:
        raise ValueError(f"unsupported time expression {expr!r}")
    t = now
    if m.group(1):
        n, unit = int(m.group(1)), m.group(2)
        if unit == "M":
            month = t.month - 1 - n
            t = t.replace(year=t.year + month // 12, month=month % 12 + 1,
                          day=min(t.day, calendar.monthrange(t.year + month // 12, month % 12 + 1)[1]))
        elif unit == "y":
            t = t.replace(year=t.year - n)
        else:
            t = t - dt.timedelta(seconds=n * UNITS[unit])
    rounding = m.group(3)
    if rounding:
        t = t.replace(hour=0, minute=0, second=0, microsecond=0)
        if rounding == "w":
            t -= dt.timedelta(days=(t.weekday() - week_start) % 7)
        elif rounding == "M":
            t = t.replace(day=1)
        elif rounding == "y":
            t = t.replace(month=1, day=1)
    return t


@dataclass
class Request:
    kind: str                  # "range" or "instant"
    expr: str
    start: float
    end: float
    step: float
    ref: str


def time_range(dashboard: dict, panel: dict, now: dt.datetime):
    week_start = 0 if dashboard.get("weekStart", "monday") == "monday" else 6
    time_from = panel.get("timeFrom")
    if time_from:
        if not time_from.startswith("now"):
            time_from = f"now-{time_from}"
        return resolve(time_from, now, week_start), now
    return (resolve(dashboard["time"]["from"], now, week_start),
            resolve(dashboard["time"]["to"], now, week_start))


def requests_for(dashboard: dict, panel: dict, scrape_interval: str, variables: Dict[str, str],
                 now: Optional[dt.datetime] = None):
    now = now or dt.datetime.now(dt.timezone.utc)
    start, end = time_range(dashboard, panel, now)
    range_s = (end - start).total_seconds()
    max_points = panel.get("maxDataPoints") or panel["gridPos"]["w"] * PX_PER_COLUMN
    scrape = parse_duration(scrape_interval)
    low_limit = parse_duration(panel["interval"]) if panel.get("interval") else scrape
    interval_ms = max(round_interval_ms(range_s * 1000 / max_points), low_limit * 1000)   # frontend
    calculated = range_s * 1000 / max_points                                             # backend
    step_ms = interval_ms if calculated < interval_ms else round_interval_ms(calculated)
    step_ms = max(step_ms, round_interval_ms(range_s * 1000 / SAFE_RESOLUTION))
    step = step_ms / 1000
    rate_interval = max(interval_ms / 1000 + scrape, 4 * scrape)
    out = []
    for t in panel["targets"]:
        expr = t["expr"]
        for name, value in sorted(variables.items(), key=lambda kv: -len(kv[0])):
            expr = expr.replace("${" + name + "}", value).replace("$" + name, value)
        expr = (expr.replace("$__rate_interval", go_duration(rate_interval))
                    .replace("$__interval", format_interval(step))
                    .replace("$__range", f"{round(range_s)}s"))
        assert "$" not in expr, expr
        if t.get("instant") and not t.get("range"):
            out.append(Request("instant", expr, end.timestamp(), end.timestamp(), step, t["refId"]))
        else:
            aligned = lambda x: (x.timestamp() // step) * step   # noqa: E731 (UTC dashboards: offset 0)
            out.append(Request("range", expr, aligned(start), aligned(end), step, t["refId"]))
    return out
