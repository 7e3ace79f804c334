"""Anomaly detection rules: each token against its own learned behaviour (docs/alerts.md).

Three signals per token, read from the recording rules: its request rate (spikes and drops),
its 5xx ratio and its p95 latency (rises). A group evaluated every ``anomaly.interval`` records
per token and signal, from one value of the signal every ``anomaly.baseline_step`` (subqueries:
no copy of the signal is kept):

- a **centre**: the median of the same hour yesterday and of the same hour a week ago (the
  daily and the weekly cycle), the higher of the two for the upper band (``centre_high``) and
  the lower for the lower band (``centre_low``, request drops only), or the last day's median
  while neither exists;
- ``mad1d``, the median absolute deviation of the last day around its median: the spread.

The alerts (a group evaluated once a minute) read those and make the **band**: centre ± k MADs,
k from the token's sensitivity (low, medium, high; per key in the key file, else the default).
The 5xx and latency bands are recorded only for tokens that usually send enough requests in a
rate window for those alerts (``errors.min_requests``, ``latency.min_requests``): the ratio and
the p95 of a few requests are noise, not a baseline.

An alert needs the value outside the band, a minimum relative change from the centre (a flat
series has a MAD near 0), a minimum volume (a token with a few requests an hour never fires),
the learning period behind it (a spread recorded that long ago), ``for``, and ends only after
``keep_firing_for`` back inside.

Usage patterns and countries are read from the raw per-token counters, at a few instants: a
route or a country whose counter was 0 or absent hours, days and weeks ago, and a mix of routes
unlike both the same hour yesterday and the day before, in a group of their own every
``anomaly.interval`` (they read every raw request series several times). Nothing is recorded
per route or country (docs/scaling.md: what the rules cost at 10,000 tokens).
"""
from __future__ import annotations

from typing import List

from ..core.keystore import SENSITIVITIES
from .promql import ThresholdError, fmt_duration, per_second, piped, quantile_name, seconds

SIGNALS = {   # name: (recorded source, directions)
    "requests": ("token:apitoken_requests:rate{w}", ("up", "down")),
    "error_ratio": ("token:apitoken_request_errors:ratio_rate{w}", ("up",)),
    "latency": ("token:apitoken_request_duration_seconds:{q}_{w}", ("up",)),
}
LEVELS = SENSITIVITIES
# anomaly.errors settings newer than some thresholds files: those files get these
ERROR_EVIDENCE = {"min_errors": 5, "confidence_z": 3}


def error_settings(a: dict) -> dict:
    """anomaly.errors, with ERROR_EVIDENCE where a thresholds file predates them."""
    return {**ERROR_EVIDENCE, **(a.get("errors") or {})}


def validate(t: dict) -> None:
    a = t.get("anomaly")
    if not isinstance(a, dict):
        raise ThresholdError("thresholds: anomaly is missing")
    for key in ("interval", "baseline_step", "learning_period", "for", "keep_firing_for"):
        seconds(a.get(key))
    if seconds(a["baseline_step"]) < seconds(a["interval"]):
        raise ThresholdError("thresholds: anomaly.baseline_step must be at least anomaly.interval")
    if a.get("sensitivity") not in LEVELS:
        raise ThresholdError("thresholds: anomaly.sensitivity must be low, medium or high")
    for level in LEVELS:
        spec = (a.get("sensitivities") or {}).get(level) or {}
        for key in ("mads", "min_change"):
            value = spec.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ThresholdError(f"thresholds: anomaly.sensitivities.{level}.{key} must be a number above 0")
    try:
        seconds(a["routes"]["memory"]), seconds(a["countries"]["memory"])
        share = a["routes"]["mix_divergence"]
    except (KeyError, TypeError):
        raise ThresholdError("thresholds: anomaly.routes needs memory, mix_divergence, min_requests; "
                             "anomaly.countries needs memory") from None
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share < 1:
        raise ThresholdError("thresholds: anomaly.routes.mix_divergence must be between 0 and 1")
    errors = error_settings(a)
    for key in ("min_requests", "min_ratio", "min_errors", "confidence_z"):
        value, least = errors.get(key), 0
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < least:
            raise ThresholdError(f"thresholds: anomaly.errors.{key} must be a number, at least {least}")
    if seconds(a["learning_period"]) < 86400:
        raise ThresholdError("thresholds: anomaly.learning_period must be at least 1d (the spread is a day's)")


def _name(signal: str, what: str) -> str:
    return f"token:apitoken_anomaly_{signal}:{what}"


class Exprs:
    """The PromQL of the anomaly alerts, for every token or, with ``token``, one (the alerts'
    texts query their band this way: ``token`` is then a Go template argument, ``%[1]s``)."""

    def __init__(self, t: dict, token: str = ""):
        self.t, self.a = t, t["anomaly"]
        self.w, self.q = t["rate_window"], quantile_name(t["latency"]["quantile"])
        self.one = f'token="{token}"' if token else ""
        self.step = self.a["interval"]
        # medians and MADs move slowly: the last one of the hour bridges the group's first
        # evaluation after a (re)start and a slow evaluation
        self.keep = fmt_duration(max(2 * seconds(self.step), 3600))

    def sel(self, series: str, *matchers: str) -> str:
        parts = [m for m in (self.one, *matchers) if m]
        return series + ("{" + ", ".join(parts) + "}" if parts else "")

    def source(self, signal: str) -> str:
        return self.sel(SIGNALS[signal][0].format(w=self.w, q=self.q))

    def recorded(self, signal: str, what: str) -> str:
        """A series of the anomaly group, written once an interval: its last value within the
        hour (an instant lookup sees only the last 5 minutes)."""
        return f"last_over_time({self.sel(_name(signal, what))}[{self.keep}])"

    def per_token(self, field: str) -> str:
        """A sensitivity setting per token: the key's own level (apitoken_anomaly_sensitivity,
        1-3) mapped through thresholds.yml, else the default level's."""
        a = self.a
        levels = " or ".join(f"({self.sel('apitoken_anomaly_sensitivity')} == {i + 1}) * 0 + "
                             f"{a['sensitivities'][lvl][field]:g}" for i, lvl in enumerate(LEVELS))
        default = a["sensitivities"][a["sensitivity"]][field]
        return f"(max by (token) ({levels}) or on (token) {self.source('requests')} * 0 + {default:g})"

    def expected(self, signal: str, side: str) -> str:
        """The recorded centre of the upper (``high``) or the lower (``low``) band."""
        return self.recorded(signal, f"centre_{side}")

    def spread(self, signal: str) -> str:
        return f"{self.per_token('mads')} * on (token) {self.recorded(signal, 'mad1d')}"

    def upper(self, signal: str) -> str:
        return f"({self.expected(signal, 'high')} + on (token) {self.spread(signal)})"

    def lower(self, signal: str) -> str:
        """The lower edge (around the upper band's centre for a signal only watched for rises)."""
        side = "low" if "down" in SIGNALS[signal][1] else "high"
        return f"clamp_min({self.expected(signal, side)} - on (token) {self.spread(signal)}, 0)"

    def learned(self) -> str:
        """The token had its request-rate spread a learning period ago (none before the
        anomaly group first ran: nothing may fire then)."""
        return (f"present_over_time({self.sel(_name('requests', 'mad1d'))}[1h] "
                f"offset {self.a['learning_period']})")


def recording_rules(t: dict) -> List[dict]:
    """Per token and signal: the centre of each band the signal has (the median of the same hour
    yesterday and a week ago, the higher for the upper band and the lower for the lower, or the
    day's median) and the median absolute deviation (MAD) of the last day around its median,
    from one value every ``anomaly.baseline_step`` (subqueries of the recorded signal)."""
    a, x = t["anomaly"], Exprs(t)
    step, w = a["baseline_step"], t["rate_window"]
    rules = []
    for signal, (_, directions) in SIGNALS.items():
        source = x.source(signal)
        day = f"[1d:{step}]"
        median = f"quantile_over_time(0.5, ({source} >= 0){day})"
        refs = [f'label_replace(quantile_over_time(0.5, {source}[1h:{step}] offset {offset}), "ref", "{ref}", "", "")'
                for ref, offset in (("1d", "23h30m"), ("1w", "167h30m"))]
        # a token with too few requests per window for this signal's alert gets no band
        c = t["coarse_window"]
        volume = ("" if signal == "requests" else
                  f"\nand on (token) avg_over_time(token:apitoken_requests:increase{c}[1d]) * "
                  f"{int(seconds(w))} / {int(seconds(c))} >= "
                  f"{a['errors' if signal == 'error_ratio' else 'latency']['min_requests']:g}")
        sides = [side for side, direction in (("high", "up"), ("low", "down")) if direction in directions]
        for i, side in enumerate(sides):
            agg = "max" if side == "high" else "min"
            # the day's median only where neither reference exists; a second side takes it
            # from the first, recorded just before in the same evaluation
            fallback = median if i == 0 else _name(signal, f"centre_{sides[0]}")
            rules.append({"record": _name(signal, f"centre_{side}"),
                          "expr": f"({agg} without (ref) ({' or '.join(refs)}) or {fallback}){volume}"})
        # around the day's median as of now (@ end(): worked out once, not at each of the steps)
        rules.append({"record": _name(signal, "mad1d"),
                      "expr": (f"quantile_over_time(0.5, abs({source} - on (token) "
                               f"quantile_over_time(0.5, ({source} >= 0){day} @ end())){day}){volume}")})
    return [{"name": "apitoken.anomaly", "interval": a["interval"], "rules": rules}]


def route_shares_moved(t: dict, token: str = "") -> str:
    """Per token, the share of its requests that moved to other routes (total variation
    distance, 0 to 1) against the same hour yesterday and against the whole day before, the
    smaller of the two: a mix that changes every night at the same hour is expected. From the
    raw counters at a few instants (a reset in between leaves that series out).

    The distance is 1 minus the overlap, the sum over routes of the smaller of the two shares,
    each ``now * min(base / now, 1)``: both bases in one vector (a ``base`` label), so the raw
    counters are read once per base and instant and twice now (the expression every 5 minutes
    is the most expensive of the rules at 10,000 tokens: docs/scaling.md). The shares now are
    over the token's recorded request rate. A token with requests the day before and no route
    in common with either base moved all of them: 1."""
    w, x = t["rate_window"], Exprs(t, token)
    raw = x.sel("apitoken_requests_total")

    def by_route(expr: str) -> str:
        return f"sum by (token, route) ({expr})"

    def shares(counts: str) -> str:
        return f"({counts} / on (token) group_left sum by (token) ({counts}))"
    now = f"({by_route(f'rate({raw}[{w}])')} / on (token) group_left {x.source('requests')})"
    bases = {"hour": shares(by_route(f"({raw} offset 23h - {raw} offset 1d >= 0)")),
             "day": shares(by_route(f"({raw} offset 1h - {raw} offset 25h >= 0)"))}
    stacked = " or ".join(f'label_replace({b}, "base", "{name}", "", "")' for name, b in bases.items())
    overlap = (f"sum by (token, base) ({now} * on (token, route) group_right "
               f"clamp_max(({stacked}) / on (token, route) group_left () ({now} > 0), 1))")
    hourly = x.sel(f"token:apitoken_requests:increase{t['coarse_window']}")
    busy_before = f"sum_over_time({hourly}[1d] offset 1h) > 0"
    return f"1 - max by (token) ({overlap}) or on (token) ({busy_before}) * 0 + 1"


def error_evidence(t: dict) -> str:
    """The lower Wilson score bound of the token's 5xx ratio over the rate window, at
    ``anomaly.errors.confidence_z`` standard deviations: the least error ratio that explains
    the errors seen among the requests seen. Two chance errors among 60 requests give about
    0.5 % at z = 3; an hour at 20 % over 600 requests about 15 %."""
    w, errors = t["rate_window"], error_settings(t["anomaly"])
    z = errors["confidence_z"]
    z2 = z ** 2
    p = f"token:apitoken_request_errors:ratio_rate{w}"
    n = f"(token:apitoken_requests:rate{w} * {int(seconds(w))})"
    return (f"(({p} + on (token) {z2 / 2:g} / {n} - on (token) {z:g} * "
            f"sqrt({p} * (1 - {p}) / on (token) {n} + on (token) {z2 / 4:g} / {n} ^ 2)) "
            f"/ on (token) (1 + {z2:g} / {n}))")


def _band_text(t: dict, signal: str, side: str, show) -> str:
    """'expected about X, band Y to Z' for a notification, queried for the alert's token."""
    x = Exprs(t, "%[1]s")

    def value(expr: str) -> str:
        quoted = expr.replace('"', '\\"')
        return (f'{{{{ with printf "{quoted}" $labels.token | query }}}}'
                f'{{{{ $v := . | first | value }}}}{show("$v")}{{{{ end }}}}')
    return (f"expected about {value(x.expected(signal, side))}, band {value(x.lower(signal))} "
            f"to {value(x.upper(signal))}")


def _who() -> str:
    return ('{{ $labels.token }}{{ with printf "apitoken_token_info{token=\\"%s\\"}" $labels.token | query }}'
            '{{ with first . }} ({{ .Labels.name }}, tenant {{ .Labels.tenant }}){{ end }}{{ end }}')


def alert_rules(t: dict, alert) -> List[dict]:
    """``alert``: rulegen's rule builder (name, severity, expr, for, summary, description, ...).
    The bands are worked out here from the two recorded series (evaluated once a minute)."""
    a, w, q = t["anomaly"], t["rate_window"], quantile_name(t["latency"]["quantile"])
    w_s = int(seconds(w))
    x = Exprs(t)
    learned = f"and on (token) {x.learned()}"
    change = f"(1 + {x.per_token('min_change')})"
    per_hour = a["volume"]["min_requests_per_hour"]
    errors = error_settings(a)
    enough = {"error_ratio": f"and on (token) token:apitoken_requests:rate{w} * {w_s} >= {errors['min_requests']:g}\n"
                             f"and {{value}} >= {errors['min_ratio']:g}\n"
                             f"and on (token) {{value}} * on (token) token:apitoken_requests:rate{w} * {w_s} "
                             f">= {errors['min_errors']:g}\n"
                             f"and on (token) {error_evidence(t)} > on (token) "
                             f"{x.expected('error_ratio', 'high')} * on (token) {change}",
              "latency": f"and on (token) token:apitoken_requests:rate{w} * {w_s} >= {a['latency']['min_requests']:g}"}
    what = {"requests": ("Traffic", "request rate", per_second, " req/s"),
            "error_ratio": ("Error", "5xx ratio", piped("humanizePercentage"), ""),
            "latency": ("Latency", f"{q} latency", piped("humanizeDuration"), "")}
    link = t.get("dashboard_url")
    mads = Exprs(t, "%[1]s").per_token("mads").replace('"', '\\"')
    rules = []
    for signal, (source, directions) in SIGNALS.items():
        value = source.format(w=w, q=q)
        kind, label, show, unit = what[signal]
        for direction in directions:
            side = "high" if direction == "up" else "low"
            centre = x.expected(signal, side)
            if direction == "up":
                expr = (f"{value} > on (token) {x.upper(signal)}\n"
                        f"and on (token) {value} > on (token) {centre} * on (token) {change}\n")
            else:
                expr = (f"{value} < on (token) {x.lower(signal)}\n"
                        f"and on (token) {value} < on (token) {centre} / on (token) {change}\n")
            if signal == "requests":
                expr += f"and on (token) ({value} > on (token) {centre} or on (token) {centre}) * 3600 >= {per_hour:g}\n"
            else:
                expr += enough[signal].format(value=value) + "\n"
            expr += learned
            expr = f'{value}{{token!~"__.*"}}' + expr[len(value):]
            moved = "above" if direction == "up" else "below"
            description = (f"Token {_who()}: {label} {show()}{unit} over the last {w}, "
                           f"{moved} its own band ({_band_text(t, signal, side, show)}{unit}; "
                           f'sensitivity {{{{ with printf "{mads}" $labels.token | query }}}}'
                           f"{{{{ . | first | value }}}}{{{{ end }}}} MADs).")
            change_word = "drop" if direction == "down" else "spike" if signal == "requests" else "rise"
            rule = alert(t, f"ApiToken{kind}Anomaly", "warning", expr, a["for"],
                         f"Unusual {label} {change_word} for token {{{{ $labels.token }}}}",
                         description, threshold=f"outside the learned band for {a['for']}",
                         extra_labels={"anomaly": kind.lower(), "direction": direction},
                         value=f"{show()}{unit}")
            rules.append(rule)
    new_route, mix, new_country = pattern_alerts(t, alert, learned)
    rules.append(mix)
    for rule in rules + [new_route, new_country]:
        rule["keep_firing_for"] = a["keep_firing_for"]
        if link:
            rule["annotations"]["dashboard"] = f"{link}/d/ate-token?var-token={{{{ $labels.token }}}}"
    # what reads the raw per-route and per-country counters (each rule reads all of them several
    # times, seconds at 10,000 tokens) runs once an anomaly interval, in a group of its own
    patterns = [{"record": "token:apitoken_anomaly_route_mix:divergence", "expr": route_shares_moved(t)},
                new_route, new_country]
    return [{"name": "apitoken.anomaly.alerts", "interval": "1m", "rules": rules},
            {"name": "apitoken.anomaly.patterns", "interval": a["interval"], "rules": patterns}]


def _seen_before(series: str, by: str, memory: str) -> str:
    """The (token, ``by``) pairs with a count above 0 in ``series`` 2 hours, 1, 3 and 7 days and
    ``memory`` ago: instants, not a range (a counter keeps its count while its exporter keeps it,
    and a restart without state_dir is bridged by the older instants)."""
    offsets = ["2h", "1d", "3d", "7d"] + ([memory] if seconds(memory) > 7 * 86400 else [])
    return " or ".join(f"count by (token, {by}) ({series} offset {o} > 0)" for o in offsets)


def pattern_alerts(t: dict, alert, learned: str) -> List[dict]:
    """A route the token never called before, and a mix of routes unlike its own; a country no
    request of it came from. From the raw counters: nothing is recorded per route or country."""
    a, w = t["anomaly"], t["rate_window"]
    r = a["routes"]
    routes = 'apitoken_requests_total{token!~"__.*", route!="__unmatched__"}'
    new_route = alert(
        t, "ApiTokenNewRoute", "warning",
        (f"sum by (token, route) (rate({routes}[{w}])) > 0\n"
         f"unless on (token, route) ({_seen_before(routes, 'route', r['memory'])})\n{learned}"),
        "5m", "Token {{ $labels.token }} calls {{ $labels.route }} for the first time",
        (f"Token {_who()} called {{{{ $labels.route }}}}, a route it had not called in the "
         f"{r['memory']} before: {per_second()} req/s over the last {w}. A new client "
         "version, or a key used by someone else?"),
        threshold=f"not called in {r['memory']}", extra_labels={"anomaly": "pattern"},
        value=f"{per_second()} req/s")
    x = Exprs(t, "%[1]s")
    raw = x.sel("apitoken_requests_total")
    grown = (f"topk(1, sum by (route) (rate({raw}[{w}])) / scalar(sum(rate({raw}[{w}]))) - "
             f"(sum by (route) ({raw} offset 1h - {raw} offset 25h >= 0) / "
             f"scalar(sum({raw} offset 1h - {raw} offset 25h >= 0)) or sum by (route) (rate({raw}[{w}])) * 0))")
    share = (f'sum(rate({x.sel("apitoken_requests_total", "route=%[2]q")}[{w}])) / sum(rate({raw}[{w}]))')
    top = (f'{{{{ with printf "{grown.replace(chr(34), chr(92) + chr(34))}" $labels.token | query }}}}'
           '{{ with first . }}{{ .Labels.route }}, now '
           f'{{{{ printf "{share.replace(chr(34), chr(92) + chr(34))}" $labels.token .Labels.route | query | first | value '
           '| humanizePercentage }} of its requests{{ end }}{{ end }}')
    mix = alert(
        t, "ApiTokenRouteMixAnomaly", "warning",
        (f"last_over_time(token:apitoken_anomaly_route_mix:divergence[{fmt_duration(2 * seconds(a['interval']))}])"
         f" > {r['mix_divergence']:g}\n"
         f"and on (token) token:apitoken_requests:rate{w} * {int(seconds(w))} >= {r['min_requests']:g}\n{learned}"),
        a["for"], "Token {{ $labels.token }} calls its routes in an unusual mix",
        (f"{{{{ $value | humanizePercentage }}}} of the requests of token {_who()} moved to other routes "
         f"than the same hour yesterday and the day before (alert above {r['mix_divergence'] * 100:g}%). "
         f"Most grown: {top}."),
        threshold=f"{r['mix_divergence'] * 100:g}% of traffic moved", extra_labels={"anomaly": "pattern"},
        value="{{ $value | humanizePercentage }} moved")
    memory = a["countries"]["memory"]
    countries = 'apitoken_requests_by_country_total{token!~"__.*", country!~"ZZ|__overflow__"}'
    per_day = ('count(sum by (country) (increase(apitoken_requests_by_country_total'
               '{token=\\"%s\\", country!~\\"ZZ|__overflow__\\"}[1d])) > 0)')
    new_country = alert(
        t, "ApiTokenNewCountry", "warning",
        (f"sum by (token, country) (rate({countries}[{w}])) > 0\n"
         f"unless on (token, country) ({_seen_before(countries, 'country', memory)})\n{learned}"),
        "5m", "Token {{ $labels.token }} is used from {{ $labels.country }} for the first time",
        (f"Requests with token {_who()} come from {{{{ $labels.country }}}} ({per_second()} req/s "
         f"over the last {w}), a country none came from in the {memory} before; it was used from "
         f'{{{{ with printf "{per_day}" $labels.token | query }}}}'
         "{{ . | first | value }}{{ end }} countries in the last day. A leaked key?"),
        threshold=f"no request from there in {memory}", extra_labels={"anomaly": "geographic"},
        value=f"{per_second()} req/s")
    return [new_route, mix, new_country]
