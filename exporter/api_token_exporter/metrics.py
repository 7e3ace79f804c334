"""The metric catalogue (docs/metrics.md) and its bounded label values.

Counters, histograms and gauges are prometheus_client objects. When PROMETHEUS_MULTIPROC_DIR is
set before prometheus_client is imported (``serve --workers N`` does this), every worker writes
its values to memory-mapped files and a scrape from any worker sums them, so totals are exact
across workers. Token info and status are derived at scrape time from the key store and the
collected rate-limit gauges, so they are right whichever worker answers.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Callable, Dict, Iterable, List, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder

UNAUTHENTICATED = "__unauthenticated__"   # token label of requests with a missing or invalid key
OVERFLOW = "__overflow__"                 # any label value past its family's cap
UNMATCHED_ROUTE = "__unmatched__"         # every path that matches no route template
STATUSES = ("active", "rate_limited", "inactive", "invalid", "expired")
AUTH_FAILURE_REASONS = ("missing", "invalid", "inactive", "expired")
# `_created` samples would double the series budget and no rule or dashboard reads them.
disable_created_metrics()

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0)


def multiprocess_dir() -> Optional[str]:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")


class LabelGuard:
    """Admits at most ``cap`` distinct values for one label; the rest become OVERFLOW.

    Fixed values (e.g. UNAUTHENTICATED) are always admitted and do not use the cap.
    """

    def __init__(self, name: str, cap: int, on_overflow: Callable[[str], None],
                 fixed: Iterable[str] = ()):
        self.name = name
        self.cap = cap
        self._seen = set(fixed)
        self._fixed = len(self._seen)
        self._on_overflow = on_overflow
        self._lock = threading.Lock()

    def admit(self, value: str) -> str:
        if value in self._seen:
            return value
        with self._lock:
            if value in self._seen:
                return value
            if len(self._seen) - self._fixed >= self.cap:
                self._on_overflow(self.name)
                return OVERFLOW
            self._seen.add(value)
            return value


class Metrics:
    def __init__(self, registry: Optional[CollectorRegistry] = None, max_tokens: int = 10_000,
                 max_routes: int = 500, max_models: int = 200):
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "apitoken_requests_total", "HTTP requests by API token, route template, method and status code.",
            ["token", "route", "method", "code"], registry=r)
        self.duration = Histogram(
            "apitoken_request_duration_seconds", "Request duration by API token.",
            ["token"], buckets=LATENCY_BUCKETS, registry=r)
        self.route_duration = Histogram(
            "apitoken_route_request_duration_seconds", "Request duration by route template and method.",
            ["route", "method"], buckets=LATENCY_BUCKETS, registry=r)
        self.auth_failures = Counter(
            "apitoken_auth_failures_total", "Requests refused for authentication, by reason.",
            ["reason"], registry=r)
        self.rate_limited = Counter(
            "apitoken_rate_limited_total", "Requests refused with 429, by token and the window that refused them.",
            ["token", "window"], registry=r)
        self.rl_limit = Gauge(
            "apitoken_rate_limit_limit", "Requests allowed per window.",
            ["token", "window"], registry=r, multiprocess_mode="mostrecent")
        self.rl_remaining = Gauge(
            "apitoken_rate_limit_remaining", "Requests left in the current window.",
            ["token", "window"], registry=r, multiprocess_mode="mostrecent")
        self.rl_reset = Gauge(
            "apitoken_rate_limit_reset_timestamp_seconds", "Unix time at which the current window resets.",
            ["token", "window"], registry=r, multiprocess_mode="mostrecent")
        self.last_used = Gauge(
            "apitoken_token_last_used_timestamp_seconds", "Unix time of the token's last request.",
            ["token"], registry=r, multiprocess_mode="max")
        self.llm_tokens = Counter(
            "apitoken_llm_tokens_total", "LLM tokens used, by API token, service, model and type (input, output).",
            ["token", "service", "model", "type"], registry=r)
        self.llm_requests = Counter(
            "apitoken_llm_requests_total", "Requests that reported LLM usage, by API token, service and model.",
            ["token", "service", "model"], registry=r)
        self.llm_cost = Counter(
            "apitoken_llm_cost_usd_total", "Cost in USD of the LLM tokens used, from the pricing file.",
            ["token", "service", "model"], registry=r)
        self.llm_unpriced = Counter(
            "apitoken_llm_unpriced_requests_total",
            "LLM usage reports for a model with no price: their cost is not counted.",
            ["service", "model"], registry=r)
        self.overflow = Counter(
            "apitoken_label_overflow_total", "Label values replaced by __overflow__ because a cap was reached.",
            ["label"], registry=r)
        self.rate_limit_storage_errors = Counter(
            "apitoken_rate_limit_storage_errors_total",
            "Requests let through unlimited because the rate-limit storage failed.", registry=r)
        self.ingest_events = Counter(
            "apitoken_ingest_events_total", "Usage events posted to the ingest endpoint, by result.",
            ["result"], registry=r)
        for reason in AUTH_FAILURE_REASONS:
            self.auth_failures.labels(reason)
        for result in ("accepted", "rejected"):
            self.ingest_events.labels(result)

        def count_overflow(label: str) -> None:
            self.overflow.labels(label).inc()

        self.tokens = LabelGuard("token", max_tokens, count_overflow, fixed=(UNAUTHENTICATED,))
        self.routes = LabelGuard("route", max_routes, count_overflow, fixed=(UNMATCHED_ROUTE,))
        self.models = LabelGuard("model", max_models, count_overflow)
        self.services = LabelGuard("service", 50, count_overflow)
        self.methods = LabelGuard("method", 16, count_overflow,
                                  fixed=("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"))

    # -- recording ---------------------------------------------------------------------------
    def observe_request(self, token: str, route: str, method: str, code: int,
                        duration: float, authenticated: bool, now: Optional[float] = None) -> None:
        token = self.tokens.admit(token)
        route = self.routes.admit(route)
        method = self.methods.admit(method.upper())
        self.requests.labels(token, route, method, str(code)).inc()
        self.duration.labels(token).observe(duration)
        self.route_duration.labels(route, method).observe(duration)
        if authenticated:
            self.last_used.labels(token).set(now if now is not None else time.time())

    def set_window(self, token: str, window: str, limit: int, remaining: int, reset_at: float) -> None:
        token = self.tokens.admit(token)
        self.rl_limit.labels(token, window).set(limit)
        self.rl_remaining.labels(token, window).set(remaining)
        self.rl_reset.labels(token, window).set(reset_at)

    def observe_rate_limited(self, token: str, window: str) -> None:
        self.rate_limited.labels(self.tokens.admit(token), window).inc()

    def observe_llm(self, token: str, service: str, model: str, input_tokens: int,
                    output_tokens: int, cost_usd: Optional[float]) -> None:
        """``cost_usd`` None means the model has no price: counted as unpriced, never as $0."""
        token = self.tokens.admit(token)
        service = self.services.admit(service.lower())
        model = self.models.admit(model)
        self.llm_tokens.labels(token, service, model, "input").inc(input_tokens)
        self.llm_tokens.labels(token, service, model, "output").inc(output_tokens)
        self.llm_requests.labels(token, service, model).inc()
        if cost_usd is None:
            self.llm_unpriced.labels(service, model).inc()
        else:
            self.llm_cost.labels(token, service, model).inc(cost_usd)


class ScrapeView:
    """What /metrics shows: the recorded families (summed over workers in multiprocess mode)
    plus token info and one-hot status derived from the key store at scrape time."""

    def __init__(self, metrics: Metrics, keystore, clock: Callable[[], float] = time.time):
        self.metrics = metrics
        self.keystore = keystore
        self.clock = clock

    def _source(self):
        mp_dir = multiprocess_dir()
        if mp_dir:
            from prometheus_client import multiprocess
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=mp_dir)
            return registry
        return self.metrics.registry

    def collect(self):
        families = list(self._source().collect())
        limited = self._limited_tokens(families)
        yield from families
        if self.keystore is None:
            return
        info = GaugeMetricFamily("apitoken_token_info", "Configured API tokens (value is always 1).",
                                 labels=["token", "name", "tenant"])
        status = GaugeMetricFamily("apitoken_token_status",
                                   "One-hot status of each configured API token.",
                                   labels=["token", "status"])
        budget = GaugeMetricFamily("apitoken_budget_usd",
                                   "LLM budget in USD per token and period (daily: trailing 24h, "
                                   "monthly: trailing 30 days).", labels=["token", "period"])
        now = self.clock()
        for key in self.keystore.all():
            info.add_metric([key.id, key.name, key.tenant], 1)
            current = token_status(key, key.id in limited, now)
            for s in STATUSES:
                status.add_metric([key.id, s], 1 if s == current else 0)
            for period, amount in sorted(key.budget_usd.items()):
                budget.add_metric([key.id, period], amount)
        yield info
        yield status
        yield budget

    def _limited_tokens(self, families) -> set:
        remaining: Dict[tuple, float] = {}
        resets: Dict[tuple, float] = {}
        for fam in families:
            if fam.name == "apitoken_rate_limit_remaining":
                remaining = {(s.labels["token"], s.labels["window"]): s.value for s in fam.samples}
            elif fam.name == "apitoken_rate_limit_reset_timestamp_seconds":
                resets = {(s.labels["token"], s.labels["window"]): s.value for s in fam.samples}
        now = self.clock()
        return {tok for (tok, win), value in remaining.items()
                if value <= 0 and resets.get((tok, win), 0) > now}

    def render(self, accept: Optional[str] = None):
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self), content_type


def token_status(key, rate_limited: bool, now: float) -> str:
    if not key.active:
        return "inactive"
    if key.expired(now):
        return "expired"
    if rate_limited:
        return "rate_limited"
    return "active"
