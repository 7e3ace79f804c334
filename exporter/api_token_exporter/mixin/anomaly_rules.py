"""Anomaly detection rules: each token against its own learned behaviour (docs/alerts.md).

Three signals per token, read from the recording rules: its request rate (spikes and drops),
its 5xx ratio and its p95 latency (rises). For each, a group evaluated every ``anomaly.interval``
keeps one sample per interval and learns, robustly:

- a **centre**: the median of the same hour yesterday and of the same hour a week ago (the
  daily and the weekly cycle), the higher of the two for the upper band and the lower for the
  lower band, or the last day's median while neither exists;
- a **spread**: the median absolute deviation (MAD) of the last day's samples around their median;
- a **band**: centre ± k MADs, k from the token's sensitivity (low, medium, high; per key in
  the key file, else the default).

An alert needs the value outside the band, a minimum relative change from the centre (a flat
series has a MAD near 0), a minimum volume (a token with a few requests an hour never fires),
the learning period behind it (``token:apitoken_anomaly:learning`` is 1 until then), ``for``,
and ends only after ``keep_firing_for`` back inside.

Usage patterns and countries are learned in Prometheus too, from hourly per-route and
per-country series: a route or a country unseen for weeks, and a mix of routes unlike both the
same hour yesterday and the day before.
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


def validate(t: dict) -> None:
    a = t.get("anomaly")
    if not isinstance(a, dict):
        raise ThresholdError("thresholds: anomaly is missing")
    for key in ("interval", "learning_period", "for", "keep_firing_for"):
        seconds(a.get(key))
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
    if seconds(a["learning_period"]) < 86400:
        raise ThresholdError("thresholds: anomaly.learning_period must be at least 1d (the spread is a day's)")


def _name(signal: str, what: str) -> str:
    return f"token:apitoken_anomaly_{signal}:{what}"


def _per_token_setting(t: dict, field: str, name: str, w: str) -> dict:
    """A sensitivity setting per token: the key's own level (apitoken_anomaly_sensitivity, 1-3)
    mapped through thresholds.yml, else the default level's."""
    a = t["anomaly"]
    by_level = [f"(apitoken_anomaly_sensitivity == {i + 1}) * 0 + {a['sensitivities'][lvl][field]:g}"
                for i, lvl in enumerate(LEVELS)]
    default = a["sensitivities"][a["sensitivity"]][field]
    return {"record": name,
            "expr": ("max by (token) (\n  " + "\n  or ".join(by_level) + "\n)\n"
                     f"or on (token) token:apitoken_requests:rate{w} * 0 + {default:g}")}


def recording_rules(t: dict) -> List[dict]:
    a, w, q = t["anomaly"], t["rate_window"], quantile_name(t["latency"]["quantile"])
    rules = [_per_token_setting(t, "mads", "token:apitoken_anomaly:band_mads", w),
             _per_token_setting(t, "min_change", "token:apitoken_anomaly:min_change", w),
             {"record": "token:apitoken_anomaly:learning",
              "expr": (f"token:apitoken_requests:rate{w} * 0 + 1\n"
                       f"  unless on (token) present_over_time({_name('requests', 'sample')}[1h] offset "
                       f"{a['learning_period']})\n"
                       f"or token:apitoken_requests:rate{w} * 0")}]
    for signal, (source, _) in SIGNALS.items():
        sample = _name(signal, "sample")
        rules += [
            {"record": sample, "expr": f"{source.format(w=w, q=q)} >= 0"},     # NaN (no requests) is no sample
            {"record": _name(signal, "median1d"), "expr": f"quantile_over_time(0.5, {sample}[1d])"},
            {"record": _name(signal, "absdev"), "expr": f"abs({sample} - {_name(signal, 'median1d')})"},
            {"record": _name(signal, "mad1d"),
             "expr": f"quantile_over_time(0.5, {_name(signal, 'absdev')}[1d])"},
        ]
        seasonal = (f'label_replace(quantile_over_time(0.5, {sample}[1h] offset 23h30m), "ref", "1d", "", "")\n'
                    f'  or label_replace(quantile_over_time(0.5, {sample}[1h] offset 167h30m), "ref", "1w", "", "")')
        for side, agg in (("expected_high", "max"), ("expected_low", "min")):
            rules.append({"record": _name(signal, side),
                          "expr": f"{agg} without (ref) (\n  {seasonal}\n)\nor {_name(signal, 'median1d')}"})
        spread = f"on (token) token:apitoken_anomaly:band_mads * on (token) {_name(signal, 'mad1d')}"
        rules += [
            {"record": _name(signal, "upper"), "expr": f"{_name(signal, 'expected_high')} + {spread}"},
            {"record": _name(signal, "lower"),
             "expr": f"clamp_min({_name(signal, 'expected_low')} - {spread}, 0)"},
        ]
    rules += route_mix_rules(t)
    rules.append({"record": "token:apitoken_countries:count1d",
                  "expr": (f"count by (token) (sum_over_time(token_country:apitoken_requests:increase{t['coarse_window']}"
                           f'{{country!~"ZZ|__overflow__"}}[1d]) > 0)')})
    return [{"name": "apitoken.anomaly", "interval": a["interval"], "rules": rules}]


def route_mix_rules(t: dict) -> List[dict]:
    """Each route's share of a token's requests now, against the same hour yesterday and the
    whole day before; the divergence is the share of traffic that moved (total variation
    distance, 0 to 1), the smaller of the two, so a mix that changes every night at the same
    hour is expected."""
    w, c = t["rate_window"], t["coarse_window"]
    now = f"token_route:apitoken_requests:rate{w} / on (token) group_left token:apitoken_requests:rate{w}"
    # an hourly series is written once an hour: an instant lookup 23 h back (5 minutes of
    # lookback) mostly finds nothing, so take the last value of that hour
    hour = (f"last_over_time(token_route:apitoken_requests:increase{c}[{c}] offset 23h) / on (token) group_left "
            f"last_over_time(token:apitoken_requests:increase{c}[{c}] offset 23h)")
    day = (f"sum_over_time(token_route:apitoken_requests:increase{c}[1d] offset {c}) / on (token) group_left "
           f"sum_over_time(token:apitoken_requests:increase{c}[1d] offset {c})")
    rules = [{"record": "token_route:apitoken_anomaly_route_share:now", "expr": now},
             {"record": "token_route:apitoken_anomaly_route_share:hour_yesterday", "expr": hour},
             {"record": "token_route:apitoken_anomaly_route_share:day_before", "expr": day}]

    def distance(base: str) -> str:
        a, b = "token_route:apitoken_anomaly_route_share:now", f"token_route:apitoken_anomaly_route_share:{base}"
        return f"0.5 * sum by (token) (abs(({a} or {b} * 0) - ({b} or {a} * 0)))"
    rules.append({"record": "token:apitoken_anomaly_route_mix:divergence",
                  "expr": (f'min without (base) (\n  label_replace({distance("hour_yesterday")}, "base", "hour", "", "")\n'
                           f'  or label_replace({distance("day_before")}, "base", "day", "", "")\n)')})
    return rules


def _band_text(signal: str, show) -> str:
    """'expected about X, band Y to Z' from the recorded series, for a notification; ``show``
    makes the template of one value."""
    def value(what: str) -> str:
        return (f'{{{{ with printf "{_name(signal, what)}{{token=\\"%s\\"}}" $labels.token | query }}}}'
                f'{{{{ $v := . | first | value }}}}{show("$v")}{{{{ end }}}}')
    return f"usually about {value('median1d')}, expected band {value('lower')} to {value('upper')}"


def _who() -> str:
    return ('{{ $labels.token }}{{ with printf "apitoken_token_info{token=\\"%s\\"}" $labels.token | query }}'
            '{{ with first . }} ({{ .Labels.name }}, tenant {{ .Labels.tenant }}){{ end }}{{ end }}')


def alert_rules(t: dict, alert) -> List[dict]:
    """``alert``: rulegen's rule builder (name, severity, expr, for, summary, description, ...)."""
    a, w, q = t["anomaly"], t["rate_window"], quantile_name(t["latency"]["quantile"])
    w_s = int(seconds(w))
    # the anomaly group writes every `interval`: read its latest value from up to two intervals
    # back, or an alert evaluated just as the last one left the lookback window would reset `for`
    keep = fmt_duration(2 * seconds(a["interval"]))

    def latest(series: str) -> str:
        return f"last_over_time({series}[{keep}])"
    # `and ... == 0`, not `unless ... == 1`: before the anomaly group first runs there is no
    # learning series, and nothing may fire then
    learned = f"and on (token) {latest('token:apitoken_anomaly:learning')} == 0"
    change = f"(1 + {latest('token:apitoken_anomaly:min_change')})"
    per_hour = a["volume"]["min_requests_per_hour"]
    enough = {"error_ratio": f"and on (token) token:apitoken_requests:rate{w} * {w_s} >= {a['errors']['min_requests']:g}\n"
                             f"and {{value}} >= {a['errors']['min_ratio']:g}",
              "latency": f"and on (token) token:apitoken_requests:rate{w} * {w_s} >= {a['latency']['min_requests']:g}"}
    what = {"requests": ("Traffic", "request rate", per_second, " req/s"),
            "error_ratio": ("Error", "5xx ratio", piped("humanizePercentage"), ""),
            "latency": ("Latency", f"{q} latency", piped("humanizeDuration"), "")}
    link = t.get("dashboard_url")
    rules = []
    for signal, (source, directions) in SIGNALS.items():
        value = source.format(w=w, q=q)
        kind, label, show, unit = what[signal]
        for direction in directions:
            side = latest(_name(signal, "expected_high" if direction == "up" else "expected_low"))
            if direction == "up":
                expr = (f"{value} > on (token) {latest(_name(signal, 'upper'))}\n"
                        f"and on (token) {value} > on (token) {side} * on (token) {change}\n")
            else:
                expr = (f"{value} < on (token) {latest(_name(signal, 'lower'))}\n"
                        f"and on (token) {value} < on (token) {side} / on (token) {change}\n")
            if signal == "requests":
                expr += f"and on (token) ({value} > on (token) {side} or on (token) {side}) * 3600 >= {per_hour:g}\n"
            else:
                expr += enough[signal].format(value=value) + "\n"
            expr += learned
            expr = expr.replace(value, f'{value}{{token!~"__.*"}}', 1)
            moved = "above" if direction == "up" else "below"
            description = (f"Token {_who()}: {label} {show()}{unit} over the last {w}, "
                           f"{moved} its own band ({_band_text(signal, show)}{unit}; "
                           f"sensitivity {{{{ with printf \"token:apitoken_anomaly:band_mads{{token=\\\"%s\\\"}}\" "
                           f"$labels.token | query }}}}{{{{ . | first | value }}}}{{{{ end }}}} MADs).")
            change_word = "drop" if direction == "down" else "spike" if signal == "requests" else "rise"
            rule = alert(t, f"ApiToken{kind}Anomaly", "warning", expr, a["for"],
                         f"Unusual {label} {change_word} for token {{{{ $labels.token }}}}",
                         description, threshold=f"outside the learned band for {a['for']}",
                         extra_labels={"anomaly": kind.lower(), "direction": direction},
                         value=f"{show()}{unit}")
            rules.append(rule)
    rules += pattern_alerts(t, alert, latest, learned)
    for rule in rules:
        rule["keep_firing_for"] = a["keep_firing_for"]
        if link:
            rule["annotations"]["dashboard"] = f"{link}/d/ate-token?var-token={{{{ $labels.token }}}}"
    return rules


def pattern_alerts(t: dict, alert, latest, learned: str) -> List[dict]:
    """A route the token never called before, and a mix of routes unlike its own."""
    a, w, c = t["anomaly"], t["rate_window"], t["coarse_window"]
    r = a["routes"]
    new_route = alert(
        t, "ApiTokenNewRoute", "warning",
        (f'token_route:apitoken_requests:rate{w}{{token!~"__.*", route!="__unmatched__"}} > 0\n'
         f"unless on (token, route) max_over_time(token_route:apitoken_requests:increase{c}[{r['memory']}] "
         f"offset {fmt_duration(2 * seconds(c))}) > 0\n{learned}"),
        "5m", "Token {{ $labels.token }} calls {{ $labels.route }} for the first time",
        (f"Token {_who()} called {{{{ $labels.route }}}}, a route it had not called in the "
         f"{r['memory']} before: {per_second()} req/s over the last {w}. A new client "
         "version, or a key used by someone else?"),
        threshold=f"not called in {r['memory']}", extra_labels={"anomaly": "pattern"},
        value=f"{per_second()} req/s")
    top = ('{{ with printf "topk(1, token_route:apitoken_anomaly_route_share:now{token=\\"%s\\"} - on (token, route) '
           '(token_route:apitoken_anomaly_route_share:day_before or token_route:apitoken_anomaly_route_share:now * 0))" '
           '$labels.token | query }}{{ with first . }}{{ .Labels.route }}, now '
           '{{ printf "token_route:apitoken_anomaly_route_share:now{token=\\"%s\\",route=\\"%s\\"}" '
           '.Labels.token .Labels.route | query | first | value | humanizePercentage }} of its requests{{ end }}{{ end }}')
    mix = alert(
        t, "ApiTokenRouteMixAnomaly", "warning",
        (f"{latest('token:apitoken_anomaly_route_mix:divergence')} > {r['mix_divergence']:g}\n"
         f"and on (token) token:apitoken_requests:rate{w} * {int(seconds(w))} >= {r['min_requests']:g}\n{learned}"),
        a["for"], "Token {{ $labels.token }} calls its routes in an unusual mix",
        (f"{{{{ $value | humanizePercentage }}}} of the requests of token {_who()} moved to other routes "
         f"than the same hour yesterday and the day before (alert above {r['mix_divergence'] * 100:g}%). "
         f"Most grown: {top}."),
        threshold=f"{r['mix_divergence'] * 100:g}% of traffic moved", extra_labels={"anomaly": "pattern"},
        value="{{ $value | humanizePercentage }} moved")
    memory = a["countries"]["memory"]
    new_country = alert(
        t, "ApiTokenNewCountry", "warning",
        (f'token_country:apitoken_requests:rate{w}{{token!~"__.*", country!~"ZZ|__overflow__"}} > 0\n'
         f"unless on (token, country) max_over_time(token_country:apitoken_requests:increase{c}[{memory}] "
         f"offset {fmt_duration(2 * seconds(c))}) > 0\n{learned}"),
        "5m", "Token {{ $labels.token }} is used from {{ $labels.country }} for the first time",
        (f"Requests with token {_who()} come from {{{{ $labels.country }}}} ({per_second()} req/s "
         f"over the last {w}), a country none came from in the {memory} before; it was used from "
         '{{ with printf "token:apitoken_countries:count1d{token=\\"%s\\"}" $labels.token | query }}'
         "{{ . | first | value }}{{ end }} countries in the last day. A leaked key?"),
        threshold=f"no request from there in {memory}", extra_labels={"anomaly": "geographic"},
        value=f"{per_second()} req/s")
    return [new_route, mix, new_country]
