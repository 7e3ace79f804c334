"""Realistic synthetic history for the demo's keys: `api-token-exporter backfill --days N`.

Each token has a pace, a daily cycle (busiest mid-afternoon UTC, quiet at night), a weekly one
(weekends at half), growth over the period, its own error rate, latency and LLM use, and a few
deliberate anomalies (a spike, an error burst, a slow spell) for the anomaly baselines to find.
The traffic goes through history.Aggregate as imported records do, then into TSDB blocks, and
the recording rules are backfilled over it (`promtool tsdb create-blocks-from rules`).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

from api_token_exporter.analytics.importer import Aggregate, ImportResult, build_blocks
from api_token_exporter.core.metrics import LATENCY_BUCKETS
from api_token_exporter.core.usage import LLMUsage


STEP = 120          # seconds between samples: every 5-minute window holds two, as rate() needs


@dataclass
class Profile:
    per_minute: float                          # average pace over a week
    routes: Sequence[Tuple[str, str]]          # (route, method)
    error_rate: float = 0.01                   # share of 5xx
    not_found: float = 0.02                    # share of 404
    latency: Tuple[float, float] = (0.02, 0.2)  # typical range in seconds (log-uniform)
    llm: Sequence[Tuple[str, str]] = ()        # (service, model) it calls, one call per request
    llm_tokens: Tuple[int, int] = (200, 600)   # typical input and output tokens per call
    cached: float = 0.0                        # share of the input read from the prompt cache
    country: str = ""                          # where its requests come from (country_lookup)
    refused: float = 0.0                       # 429s a minute (over its minute limit)


ITEMS = (("/api/v1/items", "GET"), ("/api/v1/items/<int:item_id>", "GET"), ("/api/v1/repos/<owner>/<repo>", "GET"))
# what demo-steady calls through the proxy's credential pool (demo.DemoStack's pool file)
PROXIED = (("/repos/<owner>/<repo>", "GET"), ("/repos/<owner>/<repo>/issues/<int:number>", "GET"),
           ("/users/<user>", "GET"))
# the live demo's paces at speed 1 (demo.TrafficGenerator), so its live traffic is no spike
PROFILES: Dict[str, Profile] = {
    "demo-steady": Profile(86, ITEMS + PROXIED),     # 40/min to the API, 40 through the proxy, 6 lost
    "demo-bursty": Profile(40, ITEMS[:1]),
    # as the live generator: a third of its calls fail 40 % of the time, two thirds are 404s
    "demo-errors": Profile(60, (("/api/v1/flaky", "GET"), ITEMS[1]), error_rate=0.13, not_found=0.67),
    "demo-slow": Profile(15, (("/api/v1/slow", "GET"),), latency=(0.3, 2.5)),
    "demo-limited": Profile(20, ITEMS[:1], refused=40),
    "demo-llm": Profile(30, (("/api/v1/chat", "POST"),), latency=(0.3, 1.5),
                        llm=(("openai", "gpt-4o"), ("openai", "gpt-4o-mini"), ("anthropic", "claude-sonnet-4-5")),
                        cached=0.4),
    # calm for 30 days, from Germany; live it is the demo's compromised key (demo.DEMO_KEYS)
    "demo-compromised": Profile(12, ITEMS[:2], latency=(0.02, 0.2), country="DE"),
    "demo-sidecar": Profile(120, (("/v1/orders", "GET"), ("/v1/orders/{id}", "POST")), latency=(0.005, 0.9),
                            llm=(("openai", "gpt-4o-mini"),), llm_tokens=(20, 60)),
}


# refused before any key is known or valid: (token label, code, reason, per minute), as the demo sends them
REFUSED = [("__unauthenticated__", 401, "missing", 7.5), ("__unauthenticated__", 401, "invalid", 10),
           ("demo-inactive", 403, "inactive", 4), ("demo-expired", 401, "expired", 4)]


@dataclass
class Anomaly:
    token: str
    days_ago: float               # start, days before the end of the history
    hours: float
    kind: str                     # "spike" (x5 traffic), "errors" (40 % 5xx), "slow" (x8 latency)


ANOMALIES = [Anomaly("demo-steady", 3.4, 2, "spike"), Anomaly("demo-errors", 5.7, 3, "errors"),
             Anomaly("demo-slow", 8.2, 4, "slow"), Anomaly("demo-llm", 11.5, 1.5, "spike")]


@dataclass
class Plan:
    requests: int = 0
    anomalies: List[Anomaly] = field(default_factory=list)
    by_token: Dict[str, int] = field(default_factory=dict)     # requests by token label, refused ones too

    def count(self, token: str, n: int) -> None:
        self.by_token[token] = self.by_token.get(token, 0) + n


def seasonality(t: float) -> float:
    """Traffic relative to the week's average at Unix time t (UTC)."""
    hour = (t % 86400) / 3600
    daily = 1 + 0.7 * math.cos((hour - 15) / 24 * 2 * math.pi)        # peak 15:00, trough 03:00
    weekday = int((t // 86400 + 3) % 7)                                 # 0 = Monday (1970-01-01 was a Thursday)
    weekly = 0.5 if weekday >= 5 else 1.2
    return daily * weekly


def _count(rnd: random.Random, mean: float) -> int:
    """A whole count around ``mean`` (normal approximation of Poisson)."""
    return max(0, int(round(rnd.gauss(mean, math.sqrt(mean))))) if mean > 0 else 0


def split_counts(n: int, weights: Sequence[float], rnd: random.Random) -> List[int]:
    """n into parts proportional to weights (a weight below 0 counts as 0), whole numbers that
    add up to n: each part its whole share, and the units left over go, one each, to parts
    drawn in proportion to their fractions. A part of weight 0 never gets one (a latency bucket
    beyond a profile's range stays empty, a status share of 0 stays 0)."""
    weights = [max(0.0, w) for w in weights]
    total = sum(weights)
    if n <= 0 or total <= 0:
        return [0] * (len(weights) - 1) + [max(n, 0)] if weights else []
    shares = [n * w / total for w in weights]
    parts = [int(share) for share in shares]
    fractions = [share - part for share, part in zip(shares, parts)]
    for _ in range(n - sum(parts)):
        if sum(fractions) <= 0:                     # rounding: back to the shares themselves
            fractions = [w for w in weights]
        pick = rnd.choices(range(len(parts)), weights=fractions)[0]
        parts[pick] += 1
        fractions[pick] = 0.0
    return parts


def _bucket_shares(low: float, high: float) -> List[float]:
    """Share of a log-uniform latency in [low, high] falling in each bucket (then +Inf)."""
    bounds = list(LATENCY_BUCKETS)
    shares = []
    prev = low
    for b in bounds + [math.inf]:
        upper = min(b, high)
        shares.append(max(0.0, math.log(upper / prev)) if upper > prev else 0.0)
        prev = max(prev, upper)
    total = sum(shares) or 1.0
    return [s / total for s in shares]


def generate(agg: Aggregate, start: float, end: float, seed: int = 42,
             profiles: Dict[str, Profile] = PROFILES, anomalies: Sequence[Anomaly] = ANOMALIES) -> Plan:
    """Add synthetic traffic for every profile over [start, end) to ``agg``, a step at a time."""
    rnd = random.Random(seed)
    step = agg.step
    plan = Plan(anomalies=[a for a in anomalies if a.days_ago * 86400 < end - start])
    first_bin, last_bin = int(start // step), int(end // step)
    span = max(1.0, end - start)
    agg.first, agg.last = start, end
    for b in range(first_bin, last_bin):
        for token, code, reason, per_minute in REFUSED:
            n = _count(rnd, per_minute * step / 60)
            if n:
                agg.add_refusals(b, token, ITEMS[0][0], code, n, reason=reason)
                plan.count(token, n)
    # the pace at the end of the history is the live demo's (its generator keeps one pace):
    # otherwise, run at a daily peak, every healthy key's live traffic would read as a drop
    at_end = seasonality(end - 1) * 1.2
    for token, p in profiles.items():
        windows = [(end - a.days_ago * 86400, end - a.days_ago * 86400 + a.hours * 3600, a.kind)
                   for a in plan.anomalies if a.token == token]
        shares = _bucket_shares(*p.latency)
        slow_shares = _bucket_shares(p.latency[0] * 8, p.latency[1] * 8)
        low, high = p.latency
        mean = (high - low) / math.log(high / low)          # of a log-uniform latency
        for b in range(first_bin, last_bin):
            t = b * step
            growth = 0.8 + 0.4 * (t - start) / span                       # +50 % over the period
            mu = p.per_minute * step / 60 * seasonality(t) * growth / at_end
            kinds = {kind for lo, hi, kind in windows if lo <= t < hi}
            if "spike" in kinds:
                mu *= 5
            if p.refused:
                refused = _count(rnd, p.refused * step / 60 * seasonality(t) * growth)
                if refused:
                    agg.add_refusals(b, token, p.routes[0][0], 429, refused, window="minute")
                    plan.count(token, refused)
            n = _count(rnd, mu)
            if n and p.country:
                agg.add_country(b, token, p.country, n)
            if not n:
                continue
            plan.requests += n
            plan.count(token, n)
            errors = 0.4 if "errors" in kinds else p.error_rate
            ok, missing, failed = split_counts(n, [1 - errors - p.not_found, p.not_found, errors], rnd)
            for (route, method), k_ok, k_missing, k_failed in zip(
                    p.routes, split_counts(ok, [1] * len(p.routes), rnd), split_counts(missing, [1] * len(p.routes), rnd),
                    split_counts(failed, [1] * len(p.routes), rnd)):
                for code, k in ((200, k_ok), (404, k_missing), (500, k_failed)):
                    if k:
                        agg.add_requests(b, token, route, method, code, k)
                k = k_ok + k_missing + k_failed
                if k:
                    per_bucket = split_counts(k, slow_shares if "slow" in kinds else shares, rnd)
                    seconds = k * mean * (8 if "slow" in kinds else 1)
                    agg.add_durations(b, token, route, method, per_bucket, seconds)
            for (service, model), calls in zip(p.llm, split_counts(ok, [1] * len(p.llm), rnd) if p.llm else ()):
                if calls:
                    prompt = calls * rnd.randint(*sorted(p.llm_tokens))
                    agg.add_llm(b, token, LLMUsage(service, model, prompt,
                                                   calls * rnd.randint(p.llm_tokens[1], p.llm_tokens[1] * 2),
                                                   int(prompt * p.cached)), calls)
    return plan


def write_history(output_dir: str, start: float, end: float, step: int = STEP, pricing=None, seed: int = 42,
                  job: str = "api-token-exporter", instance: str = "backfill",
                  progress=None) -> Tuple[Plan, ImportResult]:
    """The synthetic history over [start, end) as TSDB blocks in ``output_dir``."""
    agg = Aggregate(step, pricing)
    plan = generate(agg, start, end, seed=seed)
    result = ImportResult(rows=plan.requests, accepted=plan.requests, first=start, last=end)
    build_blocks(result, agg, output_dir, job, instance, progress=progress)
    return plan, result
