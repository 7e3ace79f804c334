"""Generate the Grafana dashboards (grafana/dashboards/*.json) from code.

    api-token-exporter dashboards [--out grafana/dashboards] [--check]

Threshold lines come from prometheus/thresholds.yml, so a panel draws the same thresholds its
alert uses. The JSON is committed; a test fails when regenerating would change it.
"""
from __future__ import annotations

import json
from typing import Dict, List, Optional

from ..core.metrics import TOKEN_STATUS_VALUES
from .promql import TOKEN_STATUS, rate_limit, rate_limit_used
from .thresholds import load_thresholds

STATUS_COLOURS = {"active": "green", "rate_limited": "orange", "expired": "red", "inactive": "red"}
# apitoken_token_status is a number: Grafana shows its name
STATUS_MAPPINGS = [{"type": "value", "options": {
    str(v): {"text": name, "color": STATUS_COLOURS[name], "index": v} for name, v in TOKEN_STATUS_VALUES.items()}}]
# a token's limit per window: its own, or its window's default (docs/metrics.md)
HOUR = 'window="hour"'
HOUR_LIMIT = f"(max by (token) {rate_limit(window_selector=HOUR)} > 0)"
WINDOW_LIMIT = rate_limit(window_selector='window="$window"')

DS = {"type": "prometheus", "uid": "prometheus"}
REAL_TOKENS = 'token!~"__.*__"'
SECONDS_TO_MONTH_END = "scalar((days_in_month() - day_of_month()) * 86400 + 86400 - time() % 86400)"


def total(selector: str, by: str = "") -> str:
    """What a counter added over the dashboard's range, computed as the analytics API does
    (docs/analytics.md): per series, the last sample minus the last one before the range, or
    the whole value for a series born in it; never extrapolated. A series whose counter was
    reset in the range (a restart without state_dir) falls back to increase()."""
    resets = f"(resets({selector}[$__range]) > 0)"
    per_series = (f"{_added(f'{selector}[$__range]', f'{selector}[1h] offset $__range')} unless {resets}"
                  f" or (increase({selector}[$__range]) and {resets})")
    return f"sum{f' by ({by})' if by else ''} ({per_series})"


def _added(window: str, before: str) -> str:
    """Per series: the last sample in ``window`` minus the last one in ``before``, or the whole
    value for a series born in the window."""
    return f"((last_over_time({window}) - last_over_time({before})) or last_over_time({window}))"


def calendar_total(selector: str, days: int) -> str:
    """What a counter added in the ``days`` days that start at each evaluation time: a bar at
    the start of its day, week or month, so the current period shows from its first minute
    (Grafana aligns a 1d step to midnight UTC and never evaluates after now). Looks ahead with
    a negative offset (Prometheus 2.x: --enable-feature=promql-negative-offset; always on in
    3.x). last_over_time costs O(1) a step over a long window; resets() would not, so this
    assumes counters kept across restarts (state_dir), and clamps a reset period at 0."""
    ahead = f"{selector}[{days}d] offset -{days}d"
    return f"sum(clamp_min({_added(ahead, f'{selector}[1h]')}, 0))"


def calendar_bars(selector: str, period: str) -> str:
    """One value per calendar day, week (from Monday) or month (UTC), at the period's start,
    for a range query with a 1d step."""
    if period == "day":
        return calendar_total(selector, 1)
    if period == "week":
        return f"{calendar_total(selector, 7)} and on () (day_of_week() == 1)"
    months = " or ".join(f"({calendar_total(selector, n)} and on () (days_in_month() == {n}))"
                         for n in (28, 29, 30, 31))
    return f"({months}) and on () (day_of_month() == 1)"


def pace(selector: str, window: str) -> str:
    """Per second, summed over series, over the last ``window``. Forecasts multiply it: unlike
    predict_linear on a sum of counters, it does not read a series that stops (imported history
    at its cut-over, an exporter gone) as a fall."""
    return f"sum(rate({selector}[{window}]))"


def target(expr: str, legend: str = "", ref: str = "A", instant: bool = False, fmt: str = "time_series"):
    return {"datasource": DS, "refId": ref, "expr": expr, "legendFormat": legend,
            "instant": instant, "range": not instant, "format": fmt}


def steps(*pairs):
    """Threshold steps: ("green", None), ("orange", 1.0), ..."""
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for c, v in pairs]}


class Board:
    """Lays panels out left to right on Grafana's 24-column grid."""

    def __init__(self, uid: str, title: str, description: str, tags: List[str]):
        self.uid, self.title, self.description, self.tags = uid, title, description, tags
        self.panels: List[dict] = []
        self.variables: List[dict] = []
        self._x = self._y = self._row_h = 0

    def _place(self, w: int, h: int) -> dict:
        if self._x + w > 24:
            self._x, self._y, self._row_h = 0, self._y + self._row_h, 0
        pos = {"x": self._x, "y": self._y, "w": w, "h": h}
        self._x += w
        self._row_h = max(self._row_h, h)
        return pos

    def row(self, title: str) -> None:
        if self._x:
            self._x, self._y, self._row_h = 0, self._y + self._row_h, 0
        self.panels.append({"id": len(self.panels) + 1, "type": "row", "title": title, "collapsed": False,
                            "gridPos": {"x": 0, "y": self._y, "w": 24, "h": 1}, "panels": []})
        self._y += 1

    def panel(self, kind: str, title: str, targets: list, unit: str, w: int, h: int,
              description: str = "", thresholds: Optional[dict] = None, options: Optional[dict] = None,
              custom: Optional[dict] = None, time_from: Optional[str] = None, interval: Optional[str] = None,
              decimals: Optional[int] = None, transformations: Optional[list] = None,
              overrides: Optional[list] = None, max_data_points: Optional[int] = None,
              mappings: Optional[list] = None) -> dict:
        defaults = {"unit": unit, "thresholds": thresholds or steps(("green", None))}
        if mappings:
            defaults["mappings"] = mappings
        if decimals is not None:
            defaults["decimals"] = decimals
        if custom:
            defaults["custom"] = custom
        panel = {"id": len(self.panels) + 1, "type": kind, "title": title, "description": description,
                 "datasource": DS, "gridPos": self._place(w, h), "targets": targets,
                 "fieldConfig": {"defaults": defaults, "overrides": overrides or []}, "options": options or {}}
        if time_from:
            panel["timeFrom"] = time_from
        if interval:
            panel["interval"] = interval
        if max_data_points:
            panel["maxDataPoints"] = max_data_points
        if transformations:
            panel["transformations"] = transformations
        self.panels.append(panel)
        return panel

    def stat(self, title, expr, unit, w=3, h=4, legend="", **kw):
        text_mode = kw.pop("text_mode", "value")
        return self.panel("stat", title, [target(expr, legend, instant=True)], unit, w, h, options={
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value", "graphMode": "none", "textMode": text_mode, "justifyMode": "center"}, **kw)

    def timeseries(self, title, targets, unit, w=12, h=8, lines: Optional[dict] = None, bars=False, **kw):
        custom = {"drawStyle": "bars" if bars else "line", "fillOpacity": 60 if bars else 10,
                  "lineWidth": 1, "showPoints": "never", "spanNulls": True,
                  "thresholdsStyle": {"mode": "line+area" if lines else "off"}}
        return self.panel("timeseries", title, targets, unit, w, h, thresholds=lines, custom=custom,
                          options={"legend": {"displayMode": "table", "placement": "right",
                                              "calcs": ["lastNotNull", "max"]},
                                   "tooltip": {"mode": "multi", "sort": "desc"}}, **kw)

    def table(self, title, targets, unit, columns: Dict[str, str], w=12, h=8, dates=(), hide=(), **kw):
        """A table of instant queries merged on their labels. ``columns`` names every column in
        order: label names and "Value #<refId>" (just "Value" for a single query) to their
        headers; ``dates`` are headers whose values are milliseconds since the epoch."""
        organize = {"id": "organize", "options": {
            "excludeByName": {name: True for name in ("Time",) + tuple(hide)},
            "renameByName": dict(columns),
            "indexByName": {name: i for i, name in enumerate(columns)}}}
        overrides = [{"matcher": {"id": "byName", "options": header},
                      "properties": [{"id": "unit", "value": "dateTimeAsIso"}]} for header in dates]
        transformations = ([{"id": "merge", "options": {}}] if len(targets) > 1 else []) + [organize]
        return self.panel("table", title, targets, unit, w, h,
                          options={"showHeader": True, "cellHeight": "sm"},
                          transformations=transformations, overrides=overrides, **kw)

    def card(self, title, time_from, values, w=6, h=5):
        """A stat panel with several named values, each with its own unit: (name, expr, unit, decimals)."""
        refs = "ABCDEFGH"
        targets = [target(expr, name, refs[i], instant=True) for i, (name, expr, _, _) in enumerate(values)]
        overrides = [{"matcher": {"id": "byFrameRefID", "options": refs[i]},
                      "properties": [{"id": "unit", "value": unit}, {"id": "decimals", "value": decimals}]}
                     for i, (_, _, unit, decimals) in enumerate(values)]
        return self.panel("stat", title, targets, "short", w, h, time_from=time_from, overrides=overrides, options={
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value", "graphMode": "none", "textMode": "value_and_name", "justifyMode": "center",
            "orientation": "vertical"})

    def bargauge(self, title, targets, unit, w=12, h=8, **kw):
        return self.panel("bargauge", title, targets, unit, w, h, options={
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "orientation": "horizontal", "displayMode": "gradient", "showUnfilled": True}, **kw)

    def query_variable(self, name: str, label: str, query: str) -> None:
        self.variables.append({
            "type": "query", "name": name, "label": label, "datasource": DS,
            "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
            "definition": query, "refresh": 2, "sort": 1, "includeAll": False, "multi": False,
            "current": {}, "options": [], "hide": 0})

    def custom_variable(self, name: str, label: str, values: List[str], default: str) -> None:
        self.variables.append({
            "type": "custom", "name": name, "label": label, "query": ",".join(values),
            "current": {"selected": True, "text": default, "value": default},
            "options": [{"selected": v == default, "text": v, "value": v} for v in values],
            "includeAll": False, "multi": False, "hide": 0})

    def to_json(self) -> dict:
        return {
            "uid": self.uid, "title": self.title, "description": self.description,
            "tags": ["api-token-exporter"] + self.tags, "timezone": "utc", "editable": True,
            "graphTooltip": 1, "schemaVersion": 39, "version": 1, "refresh": "30s",
            "time": {"from": "now-6h", "to": "now"}, "timepicker": {},
            "fiscalYearStartMonth": 0, "liveNow": False, "weekStart": "monday",
            "annotations": {"list": [{
                "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                "name": "Annotations & Alerts", "type": "dashboard"}]},
            "links": [{"type": "dashboards", "tags": ["api-token-exporter"], "asDropdown": True,
                       "title": "api-token-exporter", "includeVars": False, "keepTime": True}],
            "templating": {"list": self.variables},
            "panels": self.panels,
        }


def _thresholds(t: dict) -> Dict[str, dict]:
    lat, err = t["latency"], t["error_rate"]
    return {
        "latency": steps(("green", None), ("orange", lat["warning"]), ("red", lat["critical"])),
        "errors": steps(("green", None), ("orange", err["warning"]), ("red", err["critical"])),
        "rate_limit": steps(("green", None), ("orange", t["rate_limit"]["approaching_ratio"]), ("red", 1)),
        "budget": steps(("green", None), ("orange", t["budgets"]["warning"]),
                        ("red", t["budgets"]["critical"]), ("dark-red", 1)),
        "unauthorized": steps(("green", None), ("orange", t["unauthorized"]["api_wide_warning"] + 1)),
        "headroom": steps(("red", None), ("orange", 1 - t["rate_limit"]["approaching_ratio"]), ("green", 0.5)),
    }


def overview(t: dict) -> dict:
    th = _thresholds(t)
    b = Board("ate-overview", "API tokens: overview",
              "Every token at a glance: status cards, calendar periods, volume, errors, latency, top tokens and endpoints.",
              ["overview"])
    b.row("Tokens")
    b.stat("Tokens", "count(count by (token) (apitoken_token_info)) or vector(0)", "none")
    b.stat("Active", f"count({TOKEN_STATUS} == {TOKEN_STATUS_VALUES['active']}) or vector(0)", "none",
           thresholds=steps(("green", None)))
    b.stat("Rate limited", f"count({TOKEN_STATUS} == {TOKEN_STATUS_VALUES['rate_limited']}) or vector(0)",
           "none", thresholds=steps(("green", None), ("yellow", 1)))
    b.stat("Invalid", f"count({TOKEN_STATUS} >= {TOKEN_STATUS_VALUES['expired']}) or vector(0)",
           "none", thresholds=steps(("green", None), ("red", 1)), description="Expired or revoked keys")
    b.stat("Requests", total("apitoken_requests_total") + " or vector(0)", "short", decimals=0)
    b.stat("Successes", total('apitoken_requests_total{code=~"[123].."}') + " or vector(0)", "short",
           decimals=0)
    b.stat("Errors", total('apitoken_requests_total{code=~"[45].."}') + " or vector(0)", "short",
           decimals=0, thresholds=steps(("green", None), ("red", 1)))
    b.stat("API limit per hour", f"sum({rate_limit(window_selector=HOUR)}) or vector(0)",
           "short", description="Sum of the hourly limits of the tokens seen")
    b.row("Usage by period (UTC)")
    for label, time_from in (("Today", "now/d"), ("This week (from Monday)", "now/w"),
                             ("This month", "now/M"), ("Last 12 months", "1y")):
        b.card(label, time_from, [
            ("requests", total(f"apitoken_requests_total{{{REAL_TOKENS}}}") + " or vector(0)", "short", 0),
            ("LLM tokens", total("apitoken_llm_tokens_total") + " or vector(0)", "short", 0),
            ("cost", total("apitoken_llm_cost_usd_total") + " or vector(0)", "currencyUSD", 2)])
    b.row("Traffic")
    b.timeseries("Request volume by status code", [target(
        "sum by (code) (rate(apitoken_requests_total[$__rate_interval]))", "{{code}}")], "reqps")
    b.timeseries("Success and error rate", [
        target('sum(rate(apitoken_requests_total{code=~"[123].."}[$__rate_interval])) / sum(rate(apitoken_requests_total[$__rate_interval]))',
               "success"),
        target('sum(rate(apitoken_requests_total{code=~"5.."}[$__rate_interval])) / sum(rate(apitoken_requests_total[$__rate_interval]))',
               "5xx errors", "B")],
        "percentunit", lines=th["errors"], description="Lines: the error-rate alert thresholds")
    b.timeseries("Latency", [target(       # every request, in the route histogram's fine buckets
        f"histogram_quantile({q}, sum by (le) (rate(apitoken_route_request_duration_seconds_bucket[$__rate_interval])))",
        f"p{int(q * 100)}", ref) for q, ref in ((0.5, "A"), (0.95, "B"), (0.99, "C"))],
        "s", lines=th["latency"], description="Lines: the latency alert thresholds")
    b.timeseries("Failed authentications by reason", [target(
        "sum by (reason) (rate(apitoken_auth_failures_total[$__rate_interval]))", "{{reason}}")], "reqps")
    b.bargauge("Top tokens", [target(
        f"topk(10, {total(f'apitoken_requests_total{{{REAL_TOKENS}}}', 'token')})", "{{token}}",
        instant=True)], "short")
    b.bargauge("Top endpoints", [target(
        f"topk(10, {total('apitoken_requests_total', 'route')})", "{{route}}", instant=True)], "short")
    return b.to_json()


def token_detail(t: dict) -> dict:
    th = _thresholds(t)
    b = Board("ate-token", "API tokens: token detail",
              "One token: status, uses, rate-limit windows, endpoints, latency and LLM spend.", ["token"])
    b.query_variable("token", "Token", "label_values(apitoken_token_info, token)")
    sel = 'token="$token"'
    b.stat("Status", f"max(apitoken_token_status{{{sel}}})", "none", w=4, mappings=STATUS_MAPPINGS)
    b.stat("Uses", total(f"apitoken_requests_total{{{sel}}}") + " or vector(0)", "short", w=4, decimals=0)
    b.stat("Successes", total(f'apitoken_requests_total{{{sel},code=~"[123].."}}') + " or vector(0)",
           "short", w=4, decimals=0)
    b.stat("Errors", total(f'apitoken_requests_total{{{sel},code=~"[45].."}}') + " or vector(0)",
           "short", w=4, decimals=0, thresholds=steps(("green", None), ("red", 1)))
    b.stat("Last used", f"max(apitoken_token_last_used_timestamp_seconds{{{sel}}}) * 1000", "dateTimeFromNow", w=4)
    b.stat("LLM cost in range", total(f"apitoken_llm_cost_usd_total{{{sel}}}") + " or vector(0)",
           "currencyUSD", w=4, decimals=2)
    b.bargauge("Remaining per window", [target(
        f"min by (window) (apitoken_rate_limit_remaining{{{sel}}})", "{{window}}", instant=True)], "short", w=8)
    b.table("Window limits and reset times", [
        target(f"max by (window) {rate_limit(token_selector=sel)}", "", "A", instant=True, fmt="table"),
        target(f"min by (window) (apitoken_rate_limit_remaining{{{sel}}})", "", "B", instant=True, fmt="table"),
        target(f"max by (window) (apitoken_rate_limit_reset_timestamp_seconds{{{sel}}}) * 1000", "", "C",
               instant=True, fmt="table")], "short",
        {"window": "Window", "Value #A": "Limit", "Value #B": "Remaining", "Value #C": "Resets at (UTC)"},
        w=8, dates=["Resets at (UTC)"])
    b.bargauge("Top 5 endpoints", [target(
        f"topk(5, {total(f'apitoken_requests_total{{{sel}}}', 'route')})", "{{route}}",
        instant=True)], "short", w=8)
    b.timeseries("Latency p50 / p95 / p99", [target(
        f"histogram_quantile({q}, sum by (le) (rate(apitoken_request_duration_seconds_bucket{{{sel}}}[$__rate_interval])))",
        f"p{int(q * 100)}", ref) for q, ref in ((0.5, "A"), (0.95, "B"), (0.99, "C"))], "s", lines=th["latency"])
    b.timeseries("Requests by status code", [target(
        f"sum by (code) (rate(apitoken_requests_total{{{sel}}}[$__rate_interval]))", "{{code}}")], "reqps")
    b.timeseries("LLM tokens by model", [target(
        f"sum by (model, type) (rate(apitoken_llm_tokens_total{{{sel}}}[$__rate_interval]))", "{{model}} {{type}}")],
        "short", description="LLM tokens per second")
    b.timeseries("LLM cost by model", [target(
        f"sum by (model) (rate(apitoken_llm_cost_usd_total{{{sel}}}[$__rate_interval])) * 3600", "{{model}}")],
        "currencyUSD", description="USD per hour at the current pace")
    return b.to_json()


def llm(t: dict) -> dict:
    th = _thresholds(t)
    b = Board("ate-llm", "API tokens: LLM usage and cost",
              "LLM tokens by model and service, cost per day, week and month, forecasts and budgets.", ["llm"])
    b.row("Usage")
    b.timeseries("Tokens by model", [target(
        "sum by (model, type) (rate(apitoken_llm_tokens_total[$__rate_interval]))", "{{model}} {{type}}")],
        "short", description="LLM tokens per second")
    b.timeseries("Tokens by service", [target(
        "sum by (service) (rate(apitoken_llm_tokens_total[$__rate_interval]))", "{{service}}")], "short")
    b.bargauge("Requests by model", [target(
        total("apitoken_llm_requests_total", "service, model"), "{{service}} {{model}}",
        instant=True)], "short", w=8)
    b.bargauge("Cost by model", [target(
        total("apitoken_llm_cost_usd_total", "service, model"), "{{service}} {{model}}",
        instant=True)], "currencyUSD", w=8)
    b.bargauge("Unpriced requests (no price in the pricing file)", [target(
        total("apitoken_llm_unpriced_requests_total", "service, model"),
        "{{service}} {{model}}", instant=True)], "short", w=8,
        description="Tokens of these models are counted, their cost is not: add them to the pricing file")
    b.row("Cost")
    for title, period, time_from in (("Cost per day (UTC)", "day", "30d"),
                                     ("Cost per week (from Monday)", "week", "12w"),
                                     ("Cost per month", "month", "1y")):
        b.timeseries(title, [target(calendar_bars("apitoken_llm_cost_usd_total", period), "cost")],
                     "currencyUSD", w=8, bars=True, interval="1d", time_from=time_from, max_data_points=1000,
                     description=f"Each bar is one calendar {period}, drawn at its start; the last one is "
                                 f"the {period} so far")
    b.row("Forecasts (the pace of the last 6 hours, to the end of the month)")
    month_end = SECONDS_TO_MONTH_END
    b.stat("Spent this month", total("apitoken_llm_cost_usd_total") + " or vector(0)", "currencyUSD",
           w=6, decimals=2, time_from="now/M")
    b.stat("Predicted month-end cost",
           total("apitoken_llm_cost_usd_total") + f" + {pace('apitoken_llm_cost_usd_total', '6h')} * {month_end}",
           "currencyUSD", w=6, decimals=2, time_from="now/M")
    b.stat("Projected requests to month end",
           f"{pace(f'apitoken_requests_total{{{REAL_TOKENS}}}', '6h')} * {month_end}",
           "short", w=6, decimals=0)
    b.stat("Projected LLM tokens to month end",
           f"{pace('apitoken_llm_tokens_total', '6h')} * {month_end}",
           "short", w=6, decimals=0)
    b.row("Budgets")
    b.bargauge("Budget used (daily: 24h, monthly: 30 days)", [target(
        "token_period:apitoken_llm_budget:usage_ratio", "{{token}} {{period}}", instant=True)],
        "percentunit", w=12, thresholds=th["budget"], description="Colours: the budget alert thresholds")
    b.table("Budgets and spend", [
        target("max by (token, period) (apitoken_budget_usd)", "", "A", instant=True, fmt="table"),
        target('label_replace(sum by (token) (increase(apitoken_llm_cost_usd_total[1d])), "period", "daily", "", "")'
               ' or label_replace(sum by (token) (increase(apitoken_llm_cost_usd_total[30d])), "period", "monthly", "", "")',
               "", "B", instant=True, fmt="table")], "currencyUSD",
        {"token": "Token", "period": "Period", "Value #A": "Budget", "Value #B": "Spent"}, w=12,
        description="Spent: daily over the last 24 hours, monthly over the last 30 days, as the budget alerts count")
    return b.to_json()


def capacity(t: dict) -> dict:
    th = _thresholds(t)
    b = Board("ate-capacity", "API tokens: capacity and forecasts",
              "Rate-limit headroom, predicted exhaustion and what-if traffic scenarios for planning.", ["capacity"])
    b.custom_variable("scenario", "Traffic scenario (x today)", ["1", "1.5", "2", "3"], "1")
    b.custom_variable("window", "Rate-limit window", ["minute", "hour", "day"], "hour")
    b.stat("Tokens over their hourly limit at $scenario x",
           f"count(sum by (token) (rate(apitoken_requests_total{{{REAL_TOKENS}}}[$__rate_interval])) * 3600 * $scenario / on (token) {HOUR_LIMIT} > 1) or vector(0)",
           "none", w=6, thresholds=steps(("green", None), ("red", 1)))
    b.stat("Requests, next 7 days at $scenario x",
           f"{pace(f'apitoken_requests_total{{{REAL_TOKENS}}}', '1h')} * 604800 * $scenario",
           "short", w=6, decimals=0)
    b.stat("LLM tokens, next 30 days at $scenario x",
           f"{pace('apitoken_llm_tokens_total', '1h')} * 2592000 * $scenario",
           "short", w=6, decimals=0)
    b.stat("LLM cost, next 30 days at $scenario x",
           f"{pace('apitoken_llm_cost_usd_total', '1h')} * 2592000 * $scenario",
           "currencyUSD", w=6, decimals=2)
    b.bargauge("Headroom per token ($window)", [target(
        f'min by (token) (apitoken_rate_limit_remaining{{window="$window"}} / on (token, window) group_left () ({WINDOW_LIMIT} > 0))',
        "{{token}}", instant=True)], "percentunit", thresholds=th["headroom"])
    b.timeseries("Window used per token ($window)", [target(
        f'max by (token) (1 - apitoken_rate_limit_remaining{{window="$window"}} / on (token, window) group_left () ({WINDOW_LIMIT} > 0))',
        "{{token}}")], "percentunit", lines=th["rate_limit"], description="Line: the 80 % alert threshold")
    b.timeseries("Predicted remaining in 1 hour at $scenario x ($window)", [target(
        'min by (token) (apitoken_rate_limit_remaining{window="$window"} - (apitoken_rate_limit_remaining{window="$window"} - predict_linear(apitoken_rate_limit_remaining{window="$window"}[15m], 3600)) * $scenario)',
        "{{token}}")], "short", description="Below 0: the window runs out before the hour is over")
    b.timeseries("Projected hourly requests at $scenario x", [target(
        f"sum by (token) (rate(apitoken_requests_total{{{REAL_TOKENS}}}[$__rate_interval])) * 3600 * $scenario",
        "{{token}}")], "short")
    b.bargauge("Projected hour-limit use at $scenario x", [target(
        f"sum by (token) (rate(apitoken_requests_total{{{REAL_TOKENS}}}[$__rate_interval])) * 3600 * $scenario / on (token) {HOUR_LIMIT}",
        "{{token}}", instant=True)], "percentunit", thresholds=th["rate_limit"])
    b.timeseries("429s by token and window", [target(
        "sum by (token, window) (rate(apitoken_rate_limited_total[$__rate_interval]))", "{{token}} {{window}}")],
        "reqps", w=12)
    upstream_pool(b, t)
    return b.to_json()


def upstream_pool(b: Board, t: dict) -> None:
    """The proxy's upstream credential pool (docs/proxy.md): each account's quota counted once."""
    share = t["upstream"]["headroom_warning"]
    b.row("Upstream credential pool (api-token-exporter proxy)")
    status = 'count(max by (credential, provider) (apitoken_upstream_credential_status{{status=~"{}"}}) == 1) or vector(0)'
    b.stat("Credentials active", status.format("active"), "none", w=6)
    b.stat("Rate limited or cooling down", status.format("rate_limited|cooling_down"), "none", w=6,
           thresholds=steps(("green", None), ("yellow", 1)))
    b.stat("Invalid (refused by the upstream)", status.format("invalid"), "none",
           w=6, thresholds=steps(("green", None), ("red", 1)),
           description="alert: ApiTokenUpstreamCredentialInvalid")
    b.stat("Pool headroom (lowest resource)", "min(provider_resource:apitoken_upstream_headroom:ratio)",
           "percentunit", w=6, thresholds=steps(("red", None), ("orange", share), ("green", 0.5)),
           description="The pool's remaining over its limit, each account once; "
                       "alert: ApiTokenUpstreamPoolHeadroomLow")
    b.timeseries("Remaining per credential", [
        target("max by (credential, resource) (apitoken_upstream_rate_limit_remaining)", "{{credential}} {{resource}}"),
        target("provider_resource:apitoken_upstream_rate_limit_remaining:sum", "pool {{provider}} {{resource}}", "B")],
        "short", description="Credentials of one account report the same quota; the pool line counts it once")
    b.table("Credentials: limits and reset times", [
        target("max by (credential, resource) (apitoken_upstream_rate_limit_limit)", "", "A", instant=True, fmt="table"),
        target("min by (credential, resource) (apitoken_upstream_rate_limit_remaining)", "", "B", instant=True,
               fmt="table"),
        target("max by (credential, resource) (apitoken_upstream_rate_limit_reset_timestamp_seconds) * 1000", "",
               "C", instant=True, fmt="table")], "short",
        {"credential": "Credential", "resource": "Resource", "Value #A": "Limit", "Value #B": "Remaining",
         "Value #C": "Resets at (UTC)"}, w=12, dates=["Resets at (UTC)"])
    b.timeseries("Upstream requests by credential and code", [target(
        "sum by (credential, code) (rate(apitoken_upstream_requests_total[$__rate_interval]))",
        "{{credential}} {{code}}")], "reqps")
    b.timeseries("Selections, rotations and refusals", [
        target("sum by (credential) (rate(apitoken_upstream_selections_total[$__rate_interval]))",
               "chosen {{credential}}"),
        target("sum by (credential, reason) (rate(apitoken_upstream_rotations_total[$__rate_interval]))",
               "left {{credential}} ({{reason}})", "B"),
        target("sum by (provider) (rate(apitoken_upstream_exhausted_total[$__rate_interval]))",
               "refused: pool exhausted", "C")], "reqps",
        description="Rotations: the pool moved away from a credential (under rotate_below, rate limited, "
                    "invalid, cooling down); refused: no credential could take the request")


def alerts(t: dict) -> dict:
    th = _thresholds(t)
    w = t["rate_window"]
    b = Board("ate-alerts", "API tokens: alerts",
              "Firing alerts, their history, and the thresholds drawn on the series they guard.", ["alerts"])
    b.stat("Firing", 'count(ALERTS{alertstate="firing", alertname!="Watchdog"}) or vector(0)', "none", w=6,
           thresholds=steps(("green", None), ("red", 1)))
    b.stat("Pending", 'count(ALERTS{alertstate="pending"}) or vector(0)', "none", w=6,
           thresholds=steps(("green", None), ("orange", 1)))
    b.stat("Watchdog (must be 1)", 'count(ALERTS{alertname="Watchdog", alertstate="firing"}) or vector(0)', "none",
           w=6, thresholds=steps(("red", None), ("green", 1)),
           description="0 means the alerting pipeline is broken")
    b.stat("Failed authentications (1h, all clients)", ":apitoken_auth_failures:count1h or vector(0)", "short",
           w=6, thresholds=th["unauthorized"], decimals=0,
           description="alerts: ApiTokenUnauthorizedAccessApiWide above the API-wide threshold, "
                       "ApiTokenUnauthorizedAccess per client")
    b.table("Firing alerts", [target(
        'max by (alertname, severity, token) (ALERTS{alertstate="firing", alertname!="Watchdog"})', "",
        instant=True, fmt="table")], "none", {"alertname": "Alert", "severity": "Severity", "token": "Token"},
        w=24, hide=["Value"])
    b.timeseries("Alert history", [target('count by (alertname, severity) (ALERTS{alertstate="firing"})',
                                          "{{alertname}} {{severity}}")], "none", w=24)
    b.timeseries("p95 latency by token (alert: ApiTokenHighLatency)", [target(
        f"token:apitoken_request_duration_seconds:p95_{w}", "{{token}}")], "s", lines=th["latency"])
    b.timeseries("5xx error ratio by token (alert: ApiTokenHighErrorRate)", [target(
        f"token:apitoken_request_errors:ratio_rate{w}", "{{token}}")], "percentunit", lines=th["errors"])
    b.timeseries("Rate-limit window used (alert: ApiTokenRateLimitApproaching)", [target(
        rate_limit_used(), "{{token}} {{window}}")], "percentunit",
        lines=th["rate_limit"])
    b.timeseries("LLM budget used (alerts: ApiTokenBudgetHigh / Exhausted)", [target(
        "token_period:apitoken_llm_budget:usage_ratio", "{{token}} {{period}}")], "percentunit", lines=th["budget"])
    return b.to_json()


BUILDERS = {"overview.json": overview, "token-detail.json": token_detail, "llm-usage-cost.json": llm,
            "capacity-forecasts.json": capacity, "alerts.json": alerts}


def render(thresholds_path: str) -> Dict[str, str]:
    t = load_thresholds(thresholds_path)
    return {name: json.dumps(build(t), indent=2, sort_keys=False) + "\n" for name, build in BUILDERS.items()}
