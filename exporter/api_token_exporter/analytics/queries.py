"""Usage analytics answered from Prometheus (the store of record), over its HTTP API.

Totals over a time range are exact with respect to the samples Prometheus holds, never an
extrapolated `increase()`, for series that reset, stop being exported or are born inside the
range (exact.py).

Shapes: `tokens_report` is /analytics/tokens; `usage_report` is /api/analytics/usage.
"""
from __future__ import annotations

import calendar
import concurrent.futures
import datetime as dt
import re
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import requests

from ..core.timestamps import TimestampError, format_timestamp as iso, parse_timestamp
from .exact import ExactCounters
from ..core.ratelimit import WINDOW_SECONDS
from ..core.usage import INPUT_TYPES

UTC = dt.timezone.utc
Progress = Optional[Callable[[int, int], None]]


class PrometheusUnavailable(RuntimeError):
    """Prometheus could not answer; the message says why (for a 503)."""


class AnalyticsError(ValueError):
    """A bad parameter (for a 400); the message names it."""


class PrometheusClient:
    def __init__(self, url: str, timeout: float = 10.0):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()

    def query(self, expr: str, at: float) -> List[Tuple[Dict[str, str], float]]:
        return [(item["metric"], float(item["value"][1])) for item in self._query(expr, at)]

    def query_samples(self, expr: str, at: float) -> List[Tuple[Dict[str, str], List[Tuple[float, float]]]]:
        """A range-vector selector's raw samples per series."""
        return [(item["metric"], [(float(t), float(v)) for t, v in item["values"]])
                for item in self._query(expr, at)]

    def _query(self, expr: str, at: float) -> list:
        try:
            response = self.session.post(f"{self.url}/api/v1/query",
                                         data={"query": expr, "time": f"{at:.3f}"},
                                         timeout=self.timeout)
        except requests.RequestException as exc:
            raise PrometheusUnavailable(
                f"Prometheus at {self.url} cannot be reached ({type(exc).__name__})") from None
        try:
            doc = response.json()
        except ValueError:
            raise PrometheusUnavailable(
                f"Prometheus at {self.url} answered HTTP {response.status_code} without JSON") from None
        if doc.get("status") != "success":
            raise PrometheusUnavailable(f"Prometheus query failed: {doc.get('error', 'unknown error')}")
        return doc["data"]["result"]


class Scope:
    """Which tokens a caller may see: all (admin) or those of one tenant."""

    def __init__(self, tokens: Optional[Iterable[str]] = None):
        self.tokens = sorted(tokens) if tokens is not None else None

    def narrow(self, token: Optional[str]) -> "Scope":
        """One of the tokens in scope (the console's token filter); AnalyticsError otherwise."""
        if not token:
            return self
        if self.tokens is not None and token not in self.tokens:
            raise AnalyticsError("token must be one of the tokens you may see")
        from ..core.keystore import valid_token_id
        if not valid_token_id(token):
            raise AnalyticsError("token must be a key id (1-64 letters, digits, _ . : -)")
        return Scope([token])

    @property
    def matcher(self) -> str:
        if self.tokens is None:   # every real token, not the fixed __unauthenticated__ / __overflow__
            return 'token!~"__.*__"'
        if not self.tokens:
            return 'token="__no_token__"'
        return "token=~`" + "|".join(re.escape(t) for t in self.tokens) + "`"


def parse_time(name: str, value: str) -> float:
    try:
        return parse_timestamp(value, name)
    except TimestampError as exc:
        raise AnalyticsError(str(exc)) from None


def resolve_range(days: Optional[str], start: Optional[str], end: Optional[str],
                  now: float, max_days: int = 3650) -> Tuple[float, float]:
    if days is not None:
        try:
            n = int(days)
        except ValueError:
            raise AnalyticsError(f"days must be a whole number, got {days!r}") from None
        if not 1 <= n <= max_days:
            raise AnalyticsError(f"days must be from 1 to {max_days}, got {n}")
    else:
        n = 30
    end_ts = parse_time("end", end) if end else now
    start_ts = parse_time("start", start) if start else end_ts - n * 86400
    if end_ts > now + 60:
        raise AnalyticsError("end must not be in the future")
    if start_ts >= end_ts:
        raise AnalyticsError("start must be before end")
    if end_ts - start_ts > max_days * 86400:
        raise AnalyticsError(f"the range must be at most {max_days} days")
    return start_ts, end_ts


def day_buckets(start: float, end: float) -> List[Tuple[str, float, float]]:
    """The (day, start, end) of the UTC days that meet [start, end), each cut to it."""
    return list(_periods("daily", start, end))


Parts = Dict[str, Tuple[str, Tuple[str, ...]]]     # name -> (selector, group-by labels)


def run_queries(client: PrometheusClient, jobs: Sequence[Tuple[Parts, float, float]], progress: Progress,
         workers: int = 8, deadline: Optional[float] = None) -> List[List[Tuple[Dict[str, str], float]]]:
    """Each job's exact totals as rows of (labels with q=<part name>, value). With ``deadline``
    (seconds), the whole answer takes no longer: PrometheusUnavailable then."""
    counters = ExactCounters(client.query, client.query_samples)

    def one(job):
        parts, start, end = job
        return [({**labels, "q": name}, value)
                for name, rows in counters.totals(parts, start, end).items() for labels, value in rows]

    results: List = [None] * len(jobs)
    done = 0
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
    try:
        futures = {pool.submit(one, job): i for i, job in enumerate(jobs)}
        try:
            for future in concurrent.futures.as_completed(futures, timeout=deadline):
                results[futures[future]] = future.result()
                done += 1
                if progress:
                    progress(done, len(jobs))
        except concurrent.futures.TimeoutError:
            raise PrometheusUnavailable(
                f"Prometheus at {client.url} did not answer within {deadline:g} s "
                f"({done} of {len(jobs)} periods)") from None
    finally:
        pool.shutdown(wait=False, cancel_futures=True)     # a hung query must not hold the answer
    return results


def _llm_parts(m: str, by: Tuple[str, ...]) -> Parts:
    return {
        "tokens": (f"apitoken_llm_tokens_total{{{m}}}", by + ("type",)),
        "requests": (f"apitoken_llm_requests_total{{{m}}}", by),
        "cost": (f"apitoken_llm_cost_usd_total{{{m}}}", by),
    }


def _counts():
    return {"promptTokens": 0, "completionTokens": 0, "totalTokens": 0, "requestCount": 0,
            "estimatedCost": 0.0}


def _add(target: dict, q: str, labels: dict, value: float) -> None:
    value = round(value, 9) if q == "cost" else int(round(value))
    if q == "tokens":
        key = "promptTokens" if labels.get("type") in INPUT_TYPES else "completionTokens"
        target[key] += value
        target["totalTokens"] += value
    elif q == "requests":
        target["requestCount"] += value
    elif q == "cost":
        target["estimatedCost"] = round(target["estimatedCost"] + value, 9)


def tokens_report(client: PrometheusClient, scope: Scope, start: float, end: float,
                  progress: Progress = None, deadline: Optional[float] = None, by_day: bool = True) -> dict:
    """/analytics/tokens: summary, byModel, byDay (unless not ``by_day``), byService."""
    return tokens_report_rows(client, scope, start, end, progress, deadline, by_day)[0]


def tokens_report_rows(client: PrometheusClient, scope: Scope, start: float, end: float,
                       progress: Progress = None, deadline: Optional[float] = None,
                       by_day: bool = True) -> Tuple[dict, List[dict]]:
    """The /analytics/tokens document, and its totals per service and model (byModel merges
    services) for the report's rows, from the same queries."""
    m = scope.matcher
    days = day_buckets(start, end) if by_day else []
    jobs = [(_llm_parts(m, ("service", "model")), start, end)]
    jobs += [(_llm_parts(m, ()), lo, hi) for _, lo, hi in days]
    results = run_queries(client, jobs, progress, deadline=deadline)

    summary, by_model, by_service, by_pair = _counts(), {}, {}, {}
    for labels, value in results[0]:
        q, model, service = labels.get("q"), labels.get("model", ""), labels.get("service", "")
        _add(summary, q, labels, value)
        _add(by_pair.setdefault((service, model), {"service": service, "model": model, **_counts()}),
             q, labels, value)
        _add(by_model.setdefault(model, {"model": model, **_counts()}), q, labels, value)
        svc = by_service.setdefault(service, {**_counts(), "models": []})
        _add(svc, q, labels, value)
        if model not in svc["models"]:
            svc["models"].append(model)
    days_rows = []
    for (date, _, _), rows in zip(days, results[1:]):
        entry = {"date": date, **_counts()}
        for labels, value in rows:
            _add(entry, labels.get("q"), labels, value)
        days_rows.append(entry)
    for svc in by_service.values():
        svc["models"].sort()
    doc = {
        "summary": {
            "totalTokens": summary["totalTokens"],
            "promptTokens": summary["promptTokens"],
            "completionTokens": summary["completionTokens"],
            "estimatedCost": round(summary["estimatedCost"], 6),
            "timeframe": {"startDate": iso(start), "endDate": iso(end),
                          "days": int(round((end - start) / 86400)) or 1},
        },
        "byModel": sorted(by_model.values(), key=lambda e: (-e["totalTokens"], e["model"])),
        "byDay": days_rows,
        "byService": dict(sorted(by_service.items())),
    }
    if not by_day:
        del doc["byDay"]
    return doc, [by_pair[pair] for pair in sorted(by_pair)]


def _usage_parts(m: str) -> Parts:
    return {
        "requests": (f"apitoken_requests_total{{{m}}}", ()),
        "tokens": (f"apitoken_llm_tokens_total{{{m}}}", ()),
        "cost": (f"apitoken_llm_cost_usd_total{{{m}}}", ()),
    }


def _usage_entry(rows) -> dict:
    entry = {"requests": 0, "tokens": 0, "cost": 0.0}
    for labels, value in rows:
        q = labels.get("q")
        if q == "cost":
            entry["cost"] = round(entry["cost"] + value, 6)
        elif q in entry:
            entry[q] += int(round(value))
    return entry


# a trend's points: the field naming each, how many at most, how many by default
TRENDS = {"daily": ("date", 92, 30), "weekly": ("weekStart", 104, 12), "monthly": ("month", 36, 12)}


def _period_start(view: str, at: dt.datetime) -> dt.datetime:
    day = at.replace(hour=0, minute=0, second=0, microsecond=0)
    if view == "weekly":
        return day - dt.timedelta(days=day.weekday())
    return day.replace(day=1) if view == "monthly" else day


def _next_period(view: str, first: dt.datetime) -> dt.datetime:
    if view == "monthly":
        return (first + dt.timedelta(days=32)).replace(day=1)
    return first + dt.timedelta(weeks=1) if view == "weekly" else first + dt.timedelta(days=1)


def trend_periods(view: str, now: float, start: Optional[float] = None,
                  end: Optional[float] = None) -> List[Tuple[str, float, float]]:
    """The (label, start, end) of each point of a trend: the days, weeks (from Monday) or
    months (UTC) that meet [start, end), each cut to it. Without ``start``: the last 30 days,
    12 weeks or 12 months up to ``end`` (default ``now``)."""
    _, most, default = TRENDS[view]
    end = now if end is None else end
    last = _period_start(view, dt.datetime.fromtimestamp(end - 1e-6, UTC))
    if start is None:
        first = last
        for _ in range(default - 1):
            first = _period_start(view, first - dt.timedelta(days=1))
        start = first.timestamp()
    periods = []
    for period in _periods(view, start, end):
        periods.append(period)
        if len(periods) > most:
            raise AnalyticsError(f"the {view} trend has at most {most} points: choose a shorter range "
                                 "or a longer period")
    return periods


def _periods(view: str, start: float, end: float):
    first = _period_start(view, dt.datetime.fromtimestamp(start, UTC))
    while first.timestamp() < end:
        nxt = _next_period(view, first)
        lo, hi = max(start, first.timestamp()), min(end, nxt.timestamp())
        if hi > lo:
            yield first.strftime("%Y-%m" if view == "monthly" else "%Y-%m-%d"), lo, hi
        first = nxt


def trend_request(view: Optional[str], start: Optional[str], end: Optional[str],
                  now: float) -> Tuple[Optional[float], Optional[float], Tuple[str, ...]]:
    """(start, end, views) of /api/analytics/usage's ``view``, ``start`` and ``end`` parameters."""
    if view not in (None, "") and view not in TRENDS:
        raise AnalyticsError(f"view must be one of {', '.join(TRENDS)}, got {view!r}")
    first = parse_time("start", start) if start else None
    last = parse_time("end", end) if end else None
    if last is not None and last > now + 60:
        raise AnalyticsError("end must not be in the future")
    if first is not None and first >= (now if last is None else last):
        raise AnalyticsError("start must be before end")
    return first, last, (view,) if view else tuple(TRENDS)


def usage_report(client: PrometheusClient, scope: Scope, now: float, progress: Progress = None,
                 deadline: Optional[float] = None, compare: Optional[str] = None,
                 start: Optional[float] = None, end: Optional[float] = None,
                 views: Sequence[str] = tuple(TRENDS)) -> dict:
    """/api/analytics/usage: summary, trends and predictions (UTC calendar); with
    ``compare="previous"`` also ``comparison``: today, this week and this month against the same
    stretch of the period before (see previous_stretch). The trends of ``views`` cover
    [start, end) (trend_periods); the summary and predictions are always the calendar's."""
    if compare not in (None, "", "previous"):
        raise AnalyticsError(f"compare must be 'previous', got {compare!r}")
    m = scope.matcher
    today = dt.datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    week = today - dt.timedelta(days=today.weekday())
    month = today.replace(day=1)
    periods = {"today": today.timestamp(), "thisWeek": week.timestamp(),
               "thisMonth": month.timestamp(), "allTime": 0.0}
    trend_spans = {view: trend_periods(view, now, start, end) for view in views}

    parts = _usage_parts(m)
    jobs: List[Tuple[Parts, float, float]] = [(parts, first, now) for first in periods.values()]
    for spans in trend_spans.values():
        jobs += [(parts, lo, hi) for _, lo, hi in spans]
    previous = {}
    if compare:
        previous = {name: previous_stretch(name, periods[name], now) for name in COMPARED_PERIODS}
        jobs += [(parts, lo, hi) for lo, hi in previous.values()]
    results = run_queries(client, jobs, progress, deadline=deadline)

    summary = {name: _usage_entry(rows) for name, rows in zip(periods, results[:4])}
    at, trends = 4, {}
    for view, spans in trend_spans.items():
        field = TRENDS[view][0]
        trends[view] = [{field: label, **_usage_entry(rows)}
                        for (label, _, _), rows in zip(spans, results[at:at + len(spans)])]
        at += len(spans)
    month_seconds = calendar.monthrange(month.year, month.month)[1] * 86400
    elapsed = max(1.0, now - month.timestamp())
    factor = month_seconds / elapsed
    mtd = summary["thisMonth"]
    extra = {}
    if compare:
        before = results[at:]
        extra["comparison"] = {
            name: {"period": {"start": iso(periods[name]), "end": iso(now)},
                   "previousPeriod": {"start": iso(lo), "end": iso(hi)},
                   **compare_entries(summary[name], _usage_entry(rows))}
            for (name, (lo, hi)), rows in zip(previous.items(), before)}
    return {
        "summary": summary,
        "trends": trends,
        "predictions": {
            "estimatedMonthlyCost": round(mtd["cost"] * factor, 6),
            "projectedRequests": int(round(mtd["requests"] * factor)),
            "projectedTokens": int(round(mtd["tokens"] * factor)),
            "basis": "month-to-date pace, linear to the end of the month (UTC)",
            "monthProgress": round(elapsed / month_seconds, 6),
        },
        "generatedAt": iso(now),
        **extra,
    }


PACE_SECONDS = 3600       # the recent pace a scenario multiplies, for rate-limit windows


def _month(now: float) -> Tuple[float, float]:
    """(start, end) of the UTC calendar month around ``now``."""
    start = dt.datetime.fromtimestamp(now, UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return start.timestamp(), start.timestamp() + calendar.monthrange(start.year, start.month)[1] * 86400


def runs_out_in(limit: int, remaining: Optional[int], reset_at: Optional[float], rate: float, now: float,
                seconds: int) -> Optional[float]:
    """Seconds from ``now`` until a fixed window's allowance is first spent at ``rate`` requests
    per second: in the running window (``remaining`` left until ``reset_at``) or, if that one
    lasts, in a later full window; None if it never is at this rate."""
    running = reset_at is not None and reset_at > now and remaining is not None
    if running and remaining <= 0:
        return 0.0
    if rate <= 0:
        return None
    if running:
        if rate * (reset_at - now) >= remaining:
            return remaining / rate
        return (reset_at - now) + limit / rate if rate * seconds >= limit else None
    return limit / rate if rate * seconds >= limit else None


def capacity_report(client: PrometheusClient, scope: Scope, now: float, keys: Dict[str, dict],
                    multiplier: float = 1.0, deadline: Optional[float] = None) -> dict:
    """The scenario planner: at ``multiplier`` times today's traffic, when each token's rate-limit
    windows first run out (its requests over the last hour, exact, and the windows' live state) and
    what the month comes to by its end (the month-to-date pace, as usage_report's predictions: at
    1x the tokens' month-end costs add up to its estimatedMonthlyCost). ``keys``: {token id:
    {"name", "tenant", "limits": {window: limit}}} of the tokens in scope, with no limits for those
    that may not send requests (inactive, expired)."""
    m = scope.matcher
    month_start, month_end = _month(now)
    parts = {"requests": (f"apitoken_requests_total{{{m}}}", ("token",)),
             "tokens": (f"apitoken_llm_tokens_total{{{m}}}", ("token",)),
             "cost": (f"apitoken_llm_cost_usd_total{{{m}}}", ("token",))}
    pace_parts = {"requests": (f'apitoken_requests_total{{{m},code!="429"}}', ("token",))}
    month_rows, pace_rows = run_queries(client, [(parts, month_start, now), (pace_parts, now - PACE_SECONDS, now)], None,
                                 deadline=deadline)
    mtd: Dict[str, dict] = {}
    for labels, value in month_rows:
        _add_usage(mtd.setdefault(labels["token"], {"requests": 0, "tokens": 0, "cost": 0.0}), labels["q"], value)
    pace = {labels["token"]: value / PACE_SECONDS for labels, value in pace_rows}
    live: Dict[Tuple[str, str], dict] = {}
    for field, agg, metric in (("remaining", "min", "remaining"), ("reset_at", "max", "reset_timestamp_seconds")):
        for labels, value in client.query(f"{agg} by (token, window) (apitoken_rate_limit_{metric}{{{m}}})", now):
            live.setdefault((labels.get("token"), labels.get("window")), {})[field] = value

    elapsed, ahead = max(1.0, now - month_start), max(0.0, month_end - now)
    zero = {"requests": 0, "tokens": 0, "cost": 0.0}

    def month_end_at(used: dict) -> dict:
        return {"requests": int(round(used["requests"] + used["requests"] / elapsed * multiplier * ahead)),
                "tokens": int(round(used["tokens"] + used["tokens"] / elapsed * multiplier * ahead)),
                "cost": round(used["cost"] + used["cost"] / elapsed * multiplier * ahead, 6)}

    rows, totals = [], {"monthToDate": dict(zero), "monthEnd": dict(zero)}
    for token in sorted(set(keys) | set(mtd)):
        info = keys.get(token, {})
        rate = pace.get(token, 0.0) * multiplier
        windows = []
        for window, limit in info.get("limits", {}).items():
            state = live.get((token, window), {})
            reset_at = state.get("reset_at")
            running = reset_at is not None and reset_at > now
            remaining = int(state["remaining"]) if running and "remaining" in state else None
            seconds = WINDOW_SECONDS[window]
            out_in = runs_out_in(limit, remaining, reset_at, rate, now, seconds)
            windows.append({
                "window": window, "limit": limit, "remaining": remaining if running else limit,
                "resetsAt": iso(reset_at) if running else None,
                "scenarioUse": round(rate * seconds, 3),
                "useRatio": round(rate * seconds / limit, 4) if limit else None,
                "runsOutInSeconds": None if out_in is None else round(out_in, 3),
                "runsOutAt": None if out_in is None else iso(now + out_in)})
        used = mtd.get(token, dict(zero))
        end = month_end_at(used)
        for name in zero:
            totals["monthToDate"][name] += used[name]
            totals["monthEnd"][name] += end[name]
        rows.append({"token": token, "name": info.get("name"), "tenant": info.get("tenant"),
                     "pacePerHour": round(pace.get(token, 0.0) * 3600, 3),
                     "scenarioPerHour": round(rate * 3600, 3), "windows": windows,
                     "monthToDate": used, "monthEnd": end})
    for part in totals.values():
        part["cost"] = round(part["cost"], 6)
    return {
        "multiplier": multiplier,
        "tokens": rows,
        "total": totals,
        "basis": {"windows": "the requests of the last hour not refused with 429 on every instance, times the "
                             "multiplier, against the lowest remaining any instance reports (with a shared "
                             "Redis storage the windows are shared; with memory:// each instance has its own "
                             "and this is the pessimistic view)",
                  "monthEnd": "month-to-date pace times the multiplier, to the end of the month (UTC)"},
        "monthEnds": iso(month_end),
        "generatedAt": iso(now),
    }


def _add_usage(entry: dict, q: str, value: float) -> None:
    if q == "cost":
        entry["cost"] = round(entry["cost"] + value, 9)
    elif q in entry:
        entry[q] += int(round(value))


def parse_multiplier(value: Optional[str]) -> float:
    if value is None or value == "":
        return 1.0
    try:
        number = float(value.rstrip("xX"))
    except ValueError:
        raise AnalyticsError(f"multiplier must be a number such as 1.5 or 2x, got {value!r}") from None
    if not 0 < number <= 1000:
        raise AnalyticsError("multiplier must be above 0 and at most 1000")
    return number


# -- period comparison ---------------------------------------------------------------------------
COMPARED = ("requests", "tokens", "cost")
COMPARED_PERIODS = ("today", "thisWeek", "thisMonth")


def change(current: float, previous: float, digits: int = 6) -> dict:
    """This period against the previous one: absolute and percent change; the percent is None
    (JSON null) when the previous period had nothing, where no percentage means anything."""
    if isinstance(current, int) and isinstance(previous, int):
        diff = current - previous
    else:
        diff = round(current - previous, digits)
    percent = None if previous == 0 else round((current - previous) / abs(previous) * 100.0, 2)
    return {"current": current, "previous": previous, "change": diff, "changePercent": percent}


def compare_entries(current: dict, previous: dict, names: Sequence[str] = COMPARED) -> dict:
    """{name: change(...)} for each of ``names`` in two usage entries."""
    return {name: change(current[name], previous[name]) for name in names}


def previous_range(start: float, end: float) -> Tuple[float, float]:
    """The period of the same length just before (start, end]."""
    return start - (end - start), start


def previous_stretch(period: str, start: float, now: float) -> Tuple[float, float]:
    """For a calendar period so far (today, this week, this month, from ``start`` to ``now``):
    the same stretch of the period before, so a half-finished day is set against the same hours
    of yesterday. A month compares the same elapsed time from the previous month's first day,
    at most to that month's end (March 31st so far against all of February)."""
    begin = dt.datetime.fromtimestamp(start, UTC)
    if period == "today":
        lo = begin - dt.timedelta(days=1)
    elif period == "thisWeek":
        lo = begin - dt.timedelta(weeks=1)
    elif period == "thisMonth":
        lo = (begin - dt.timedelta(days=1)).replace(day=1)
    else:
        raise AnalyticsError(f"no previous period for {period!r}")
    return lo.timestamp(), min(start, lo.timestamp() + (now - start))


def usage_totals(client: PrometheusClient, scope: Scope, ranges: Sequence[Tuple[float, float]],
                 progress: Progress = None, deadline: Optional[float] = None) -> List[dict]:
    """{requests, tokens, cost} of the scope's tokens over each range, as /api/analytics/usage
    counts them (HTTP requests, all LLM tokens, cost in USD)."""
    parts = _usage_parts(scope.matcher)
    return [_usage_entry(rows) for rows in run_queries(client, [(parts, lo, hi) for lo, hi in ranges],
                                                progress, deadline=deadline)]


def compare_periods(client: PrometheusClient, scope: Scope, start: float, end: float,
                    progress: Progress = None, deadline: Optional[float] = None) -> dict:
    """(start, end] against the period of the same length just before it."""
    before = previous_range(start, end)
    current, previous = usage_totals(client, scope, [(start, end), before], progress, deadline)
    return {"period": {"start": iso(start), "end": iso(end)},
            "previousPeriod": {"start": iso(before[0]), "end": iso(before[1])},
            **compare_entries(current, previous)}
