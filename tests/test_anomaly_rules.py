"""The anomaly rules (prometheus/rules/apitoken-anomalies.yml) on three days of synthetic
traffic, with promtool: each kind of anomaly fires, and what must not fire does not (a daily
peak that recurs, a quiet token, a token still learning, a change within a key's own low
sensitivity)."""
import os
import subprocess

import yaml

from api_token_exporter.mixin import anomaly_rules, thresholds
from support import needs, require_binary

ROOT = os.path.join(os.path.dirname(__file__), "..")
RULES = [os.path.abspath(os.path.join(ROOT, "prometheus", "rules", f))
         for f in ("apitoken-recording.yml", "apitoken-anomalies.yml")]
STEP = 60                        # seconds between input samples, a scrape a minute
DAYS = 3
HOUR, DAY = 3600, 86400
ANOMALY = (2 * DAY + 10 * HOUR, 2 * DAY + 11 * HOUR)     # day 3, 10:00 to 11:00
LABELS = 'job="api-token-exporter",instance="app:8000"'


def during(t, span=ANOMALY):
    return span[0] <= t < span[1]


def counter(rate, born=0):
    """promtool values of a counter whose per-second rate at time t is rate(t)."""
    total, out = 0.0, []
    for i in range(DAYS * DAY // STEP + 1):
        t = i * STEP
        if t < born:
            out.append("_")
            continue
        out.append(f"{total:.4f}".rstrip("0").rstrip("."))     # promtool reads no exponents
        total += rate(t) * STEP
    return " ".join(out)


def steady(level):
    return lambda t: level


def peak_daily(t):                     # 2 req/s, 6 req/s from 14:00 to 17:00 every day
    return 6 if 14 * HOUR <= t % DAY < 17 * HOUR else 2


TRAFFIC = {   # token: (req/s at t, born at)
    "steady": (steady(2), 0),
    "daily-peak": (peak_daily, 0),
    "spike": (lambda t: 10 if during(t) else 2, 0),
    "drop": (lambda t: 0 if during(t) else 2, 0),
    "quiet": (lambda t: 0.01 if during(t) else 0.001, 0),          # 3.6 an hour, then 36
    "young": (lambda t: 10 if during(t) else 2, 2 * DAY),          # still learning
    "mod-default": (lambda t: 3.5 if during(t) else 2, 0),         # 1.75x: above medium's 1.5x
    "mod-low": (lambda t: 3.5 if during(t) else 2, 0),             # under its own low sensitivity's 2x
    "errors": (steady(2), 0),
    "slow": (steady(2), 0),
    "sparse-errors": (steady(0.2), 0),                             # 60 requests a window, 1 % errors
}
# sparse-errors: one 5xx every 2 minutes for half an hour (2-3 in a window of 60 requests, 4 %:
# above min_ratio and every band of a ratio whose median and MAD are 0), no evidence of a change
SPARSE = (2 * DAY + 8 * HOUR, 2 * DAY + 8 * HOUR + 30 * 60)


def nightly(t):                         # 02:00 to 03:00 every night
    return 2 <= (t % DAY) // HOUR < 3


ROUTES = {    # token: {route: req/s at t}
    "new-route": {"/a": steady(2), "/admin": lambda t: 0.5 if t >= ANOMALY[0] else 0},
    "mix": {"/a": lambda t: 0.2 if during(t) else 1.8, "/b": lambda t: 1.8 if during(t) else 0.2},
    "nightly": {"/a": lambda t: 0 if nightly(t) else 2, "/export": lambda t: 2 if nightly(t) else 0},
}


def input_series():
    series = []
    for token, (rate, born) in TRAFFIC.items():
        if token == "sparse-errors":
            errors = lambda t: 1 / 120 if during(t, SPARSE) else 0.002        # noqa: E731
            series += [(f'apitoken_requests_total{{{LABELS},token="{token}",route="/a",method="GET",code="200"}}',
                        counter(lambda t: rate(t) - errors(t))),
                       (f'apitoken_requests_total{{{LABELS},token="{token}",route="/a",method="GET",code="500"}}',
                        counter(errors))]
            continue
        if token == "errors":      # 1 % errors, 20 % for the hour
            share = lambda t: 0.2 if during(t) else 0.01          # noqa: E731
            series += [(f'apitoken_requests_total{{{LABELS},token="errors",route="/a",method="GET",code="200"}}',
                        counter(lambda t: rate(t) * (1 - share(t)))),
                       (f'apitoken_requests_total{{{LABELS},token="errors",route="/a",method="GET",code="500"}}',
                        counter(lambda t: rate(t) * share(t)))]
            continue
        series.append((f'apitoken_requests_total{{{LABELS},token="{token}",route="/a",method="GET",code="200"}}',
                       counter(rate, born)))
    # slow: every request between 0.1 s and 0.25 s (p95 about 0.24 s); for the hour 1 s to 2.5 s
    fast = lambda t: 0 if during(t) else 2                          # noqa: E731
    for le, rate in (("0.1", steady(0)), ("0.25", fast), ("0.5", fast), ("1.0", fast), ("2.5", steady(2)),
                     ("+Inf", steady(2))):
        series.append((f'apitoken_request_duration_seconds_bucket{{{LABELS},token="slow",le="{le}"}}',
                       counter(rate)))
    for token, routes in ROUTES.items():
        for route, rate in routes.items():
            series.append((f'apitoken_requests_total{{{LABELS},token="{token}",route="{route}",method="GET",code="200"}}',
                           counter(rate)))
    # travels: always from DE; from BR too for the hour (new); from ZZ (no country known) too
    for country, rate in (("DE", steady(2)), ("BR", lambda t: 0.3 if during(t) else 0),
                          ("ZZ", lambda t: 0.3 if during(t) else 0)):
        series.append((f'apitoken_requests_by_country_total{{{LABELS},token="travels",country="{country}"}}',
                       counter(rate)))
    series.append((f'apitoken_requests_total{{{LABELS},token="travels",route="/a",method="GET",code="200"}}',
                   counter(lambda t: 2.6 if during(t) else 2)))
    series.append((f'up{{{LABELS}}}', " ".join(["1"] * (DAYS * DAY // STEP + 1))))
    series.append((f'apitoken_anomaly_sensitivity{{{LABELS},token="mod-low"}}',
                   " ".join(["1"] * (DAYS * DAY // STEP + 1))))
    return [{"series": s, "values": v} for s, v in series]


LEARNED = anomaly_rules.Exprs(thresholds.load_thresholds()).learned()
TOKENS = len(TRAFFIC) + len(ROUTES) + 1          # and travels; only slow has latencies


def at(seconds):
    return f"{seconds // 60}m"


FIRING = 'count by (alertname, token, direction) (ALERTS{alertstate="firing", anomaly!=""})'


def firing(*alerts):
    return [{"labels": "{" + f'alertname="{name}",token="{token}"' + (f',direction="{direction}"' if direction else "")
             + "}", "value": 1} for name, token, direction in alerts]


@needs("slow")          # promtool evaluates every rule over hours of samples
def test_each_anomaly_fires_and_nothing_else(tmp_path):
    alerts = {r["alert"] for g in yaml.safe_load(open(RULES[1]))["groups"] for r in g["rules"] if "alert" in r}
    assert alerts == {"ApiTokenTrafficAnomaly", "ApiTokenErrorAnomaly", "ApiTokenLatencyAnomaly",  # each fires below
                      "ApiTokenNewRoute", "ApiTokenRouteMixAnomaly", "ApiTokenNewCountry"}
    checks = [
        # the daily peak on day 2 and 3 is what yesterday did at that hour: quiet
        {"expr": FIRING, "eval_time": at(DAY + 15 * HOUR + 30 * 60), "exp_samples": []},
        {"expr": FIRING, "eval_time": at(2 * DAY + 15 * HOUR + 30 * 60), "exp_samples": []},
        {"expr": FIRING, "eval_time": at(2 * DAY + 9 * HOUR), "exp_samples": []},
        # 40 minutes into the hour: every real anomaly, nothing for quiet, young or mod-low
        {"expr": FIRING, "eval_time": at(ANOMALY[0] + 40 * 60), "exp_samples": firing(
            ("ApiTokenTrafficAnomaly", "spike", "up"), ("ApiTokenTrafficAnomaly", "drop", "down"),
            ("ApiTokenTrafficAnomaly", "mod-default", "up"), ("ApiTokenErrorAnomaly", "errors", "up"),
            ("ApiTokenLatencyAnomaly", "slow", "up"), ("ApiTokenNewRoute", "new-route", None),
            ("ApiTokenRouteMixAnomaly", "mix", None), ("ApiTokenNewCountry", "travels", None))},
        # a few chance errors of a token with little traffic: no evidence, nothing fires
        {"expr": FIRING, "eval_time": at(SPARSE[1]), "exp_samples": []},
        # the nightly export changes the mix every night at the same hour: expected
        {"expr": FIRING, "eval_time": at(2 * DAY + 2 * HOUR + 40 * 60), "exp_samples": []},
        # two hours after it ended (past keep_firing_for, and /admin known by then): all resolved
        {"expr": FIRING, "eval_time": at(ANOMALY[1] + 2 * HOUR), "exp_samples": []},
        # a new install, still learning: nothing fires or is pending (the demo's test checks the
        # first minutes, before the anomaly group has run, on a real Prometheus)
        {"expr": 'count(ALERTS{anomaly!=""})', "eval_time": at(2 * HOUR), "exp_samples": []},
        # learned: every token but the young one had its baseline a learning period ago
        {"expr": f"count by (token) ({LEARNED})", "eval_time": at(2 * DAY + 12 * HOUR),
         "exp_samples": [{"labels": f'{{token="{t}"}}', "value": 1}
                         for t in list(TRAFFIC) + list(ROUTES) + ["travels"] if t != "young"]},
        # per token and signal a centre per band and a MAD, the route mix's, nothing per route or
        # country (docs/scaling.md); no 5xx band for the quiet token (a few requests a window)
        {"expr": 'count by (__name__) ({__name__=~"token.*:apitoken_anomaly.*"})', "eval_time": at(2 * DAY + 12 * HOUR),
         "exp_samples": [{"labels": f'{{__name__="token:apitoken_anomaly_{signal}:{what}"}}', "value": n}
                         for signal, whats, n in (("requests", ("centre_high", "centre_low", "mad1d"), TOKENS),
                                                  ("error_ratio", ("centre_high", "mad1d"), TOKENS - 1),
                                                  ("latency", ("centre_high", "mad1d"), 1))
                         for what in whats] + [
                            {"labels": '{__name__="token:apitoken_anomaly_route_mix:divergence"}', "value": TOKENS}]},
    ]
    # every 5 minutes, as the anomaly group runs (the 5-minute rates it reads are as fresh at its
    # evaluations); a minute would evaluate every rule five times as often for the same answers
    doc = {"rule_files": RULES, "evaluation_interval": "5m",
           "tests": [{"interval": f"{STEP // 60}m", "input_series": input_series(), "promql_expr_test": checks}]}
    path = tmp_path / "anomaly_test.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    result = subprocess.run([require_binary("promtool"), "test", "rules", str(path)], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


def test_route_mix_is_the_share_of_requests_that_moved(tmp_path):
    """The shipped route-mix expression alone, on 26 hours of counters that change at 25h50m,
    with the per-token rate and hourly increase it reads given: the same mix 0, half the traffic
    moved 0.5, every request on routes neither base had 1, a token with no day before none."""
    groups = yaml.safe_load(open(RULES[1]))["groups"]
    mix = [r for g in groups for r in g["rules"] if r.get("record") == "token:apitoken_anomaly_route_mix:divergence"]
    (tmp_path / "mix.yml").write_text(yaml.safe_dump({"groups": [{"name": "mix", "rules": mix}]}))
    switch, end = 1550, 1560                 # minutes: the mix changes at 25h50m, read at 26h

    def series(token, route, values):
        return {"series": f'apitoken_requests_total{{{LABELS},token="{token}",route="{route}",method="GET",'
                          f'code="200"}}', "values": values}
    steady, stops = f"0+60x{end}", f"0+60x{switch} {60 * switch}+0x{end - switch - 1}"
    starts = f"_x{switch} 60+60x{end - switch - 1}"
    inputs = [series("same", "/a", steady), series("same", "/b", steady),
              series("half", "/a", f"0+60x{switch} {60 * switch + 120}+120x{end - switch - 1}"),
              series("half", "/b", stops),
              series("moved", "/a", stops), series("moved", "/c", starts),
              series("new", "/a", starts)]
    for token, per_second in (("same", 2), ("half", 2), ("moved", 1)):
        inputs += [{"series": f'token:apitoken_requests:rate5m{{token="{token}"}}', "values": f"{per_second}x{end}"},
                   {"series": f'token:apitoken_requests:increase1h{{token="{token}"}}',
                    "values": f"{per_second * 3600}x{end}"}]
    inputs.append({"series": 'token:apitoken_requests:rate5m{token="new"}', "values": f"_x{switch} 1x{end - switch - 1}"})
    check = {"expr": "round(token:apitoken_anomaly_route_mix:divergence, 0.001)", "eval_time": f"{end}m",
             "exp_samples": [{"labels": f'{{token="{t}"}}',
                              "value": v} for t, v in (("same", 0), ("half", 0.5), ("moved", 1))]}
    doc = {"rule_files": ["mix.yml"], "evaluation_interval": "1m",
           "tests": [{"interval": "1m", "input_series": inputs, "promql_expr_test": [check]}]}
    (tmp_path / "mix_test.yml").write_text(yaml.safe_dump(doc, sort_keys=False))
    result = subprocess.run([require_binary("promtool"), "test", "rules", "mix_test.yml"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
