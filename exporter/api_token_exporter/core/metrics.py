"""The metric catalogue (docs/metrics.md), its bounded label values, and what /metrics shows.

Values live in a Store (store.py): one dict lookup and one memoryview write per value on the
request path; with a directory (``state_dir``, or the private one ``serve --workers N`` makes)
every process writes its own file and a scrape from any of them sums them all, so totals are
exact across workers and restarts. Token info, status and budgets are derived at scrape time
from the key store and the collected rate-limit gauges, so they are right whichever worker
answers.

Per token, only what a question reads is kept (docs/metrics.md "Series budget"): a token's
request totals and 5xx counts come from ``apitoken_requests_total``, its status is one series
with a value, its latency histogram has few buckets (the route histogram keeps the fine ones),
a window's limit is exported only where the key's differs from the default, and a 429 counter
only for a window that refused. Counters born at their first event lose it in rate(): the
rules count a series born within their window in full (rulegen.counted).
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Dict, Iterable, Optional, Tuple

from . import validation
from .keystore import SENSITIVITIES
from .ratelimit import WindowState
from .store import DEFAULT_CAPACITY, DROPPED_SERIES, Family, Store
from .usage import LLMUsage

UNAUTHENTICATED = "__unauthenticated__"   # token label of requests with a missing or invalid key
OVERFLOW = "__overflow__"                 # any label value past its family's cap
UNMATCHED_ROUTE = "__unmatched__"         # every path that matches no route template
STATUSES = ("active", "rate_limited", "inactive", "invalid", "expired")
# apitoken_token_status is one series per key; its value is the status, worse statuses higher,
# so max() over instances is the worst any of them sees
TOKEN_STATUS_VALUES = {"active": 0, "rate_limited": 1, "expired": 2, "inactive": 3}
AUTH_FAILURE_REASONS = ("missing", "invalid", "inactive", "expired", "rotated", "throttled")
# the route histogram: bounds around the latency thresholds (1 s and 2 s by default) close
# enough that a quantile estimated from them is within a quarter second there
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0, 10.0)
FORMER_LATENCY_BUCKETS = ((0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0),)
# the per-token histogram, one series per bucket per token: few bounds, each one of the route
# histogram's (so a count moves between the layouts exactly), 1 s on a bound and one above the
# 2 s critical threshold; a latency threshold must stay below the last bound (2.5 s)
TOKEN_LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5)
FORMER_TOKEN_LATENCY_BUCKETS = FORMER_LATENCY_BUCKETS + (LATENCY_BUCKETS,)
MICROSECONDS = 1e6                        # duration sums are kept in whole microseconds
NANO_USD = 1e9                            # cost is kept in whole nano-dollars (exact to $9M a series)
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
TEXT = "text/plain; version=0.0.4; charset=utf-8"


class LabelGuard:
    """Admits at most ``cap`` distinct values for one label; the rest become OVERFLOW.

    Fixed values (e.g. UNAUTHENTICATED) are always admitted and do not use the cap. Reserved
    values (the keys of the key file) are always admitted and do use it: other values share
    what they leave. Known values (``known(value)`` true: the app's routes, listed models) are
    always admitted and do not use it, so a flood of other values cannot push them out.
    """

    def __init__(self, name: str, cap: int, on_overflow: Callable[[str], None],
                 fixed: Iterable[str] = (), known: Callable[[str], bool] = lambda value: False):
        self.name = name
        self.cap = cap
        self._seen = set(fixed)
        self._counted = 0
        self._on_overflow = on_overflow
        self.known = known
        self._lock = threading.Lock()

    def after_fork(self) -> None:
        self._lock = threading.Lock()

    def reserve(self, values: Iterable[str]) -> None:
        with self._lock:
            for value in values:
                if value not in self._seen:
                    self._seen.add(value)
                    self._counted += 1

    def admit(self, value: str, count: bool = True) -> str:
        """The value, or OVERFLOW past the cap (counted unless ``count`` is False: a second
        family written for the same event must not count the same overflow again)."""
        if value in self._seen:
            return value
        with self._lock:
            if value in self._seen:
                return value
            if self.known(value):
                self._seen.add(value)
                return value
            if self._counted >= self.cap:
                if count:
                    self._on_overflow(self.name)
                return OVERFLOW
            self._seen.add(value)
            self._counted += 1
            return value


def code_class(code: int) -> str:
    """The label of a status code past a token's series budget: 2xx, 4xx, 5xx... (still matched
    by code=~"5..")."""
    return f"{code // 100}xx"


def catalogue() -> Tuple[Family, ...]:
    b = LATENCY_BUCKETS
    return (
        Family("apitoken_requests_total", "counter",
               "HTTP requests by API token, route template, method and status code.",
               ("token", "route", "method", "code")),
        Family("apitoken_request_duration_seconds", "histogram",
               "Request duration by API token (coarse buckets: the route histogram has the fine ones).",
               ("token",), TOKEN_LATENCY_BUCKETS, scale=MICROSECONDS,
               former_buckets=FORMER_TOKEN_LATENCY_BUCKETS),
        Family("apitoken_route_request_duration_seconds", "histogram",
               "Request duration by route template and method.", ("route", "method"), b,
               scale=MICROSECONDS, former_buckets=FORMER_LATENCY_BUCKETS),
        Family("apitoken_auth_failures_total", "counter",
               "Requests refused for authentication, by reason.", ("reason",)),
        Family("apitoken_auth_failures_by_client_total", "counter",
               "Requests refused for authentication, by client address (the first max_clients clients "
               "get their own series; later ones share __overflow__).", ("client",)),
        Family("apitoken_requests_by_country_total", "counter",
               "Requests of a token by the client's country (country_lookup); each token's first "
               "max_countries_per_token countries get their own series, later ones share __overflow__.",
               ("token", "country")),
        Family("apitoken_rate_limited_total", "counter",
               "Requests refused with 429, by token and the window that refused them.", ("token", "window")),
        Family("apitoken_rate_limit_limit", "gauge_recent",
               "Requests allowed per window, where the token's limit differs from "
               "apitoken_rate_limit_default_limit.", ("token", "window")),
        Family("apitoken_rate_limit_remaining", "gauge_recent",
               "Requests left in the current window (the whole limit once the window has reset).",
               ("token", "window")),
        Family("apitoken_rate_limit_reset_timestamp_seconds", "gauge_recent",
               "Unix time at which the current window resets.", ("token", "window")),
        Family("apitoken_rate_limit_storage_errors_total", "counter",
               "Requests let through unlimited because the rate-limit storage failed.", ()),
        Family("apitoken_token_last_used_timestamp_seconds", "gauge_max",
               "Unix time of the token's last request.", ("token",)),
        Family("apitoken_llm_tokens_total", "counter",
               "LLM tokens used, by API token, service, model and type: input, cached_input, cache_write "
               "(prompt tokens: uncached, read from and written to the prompt cache), output, reasoning.",
               ("token", "service", "model", "type")),
        Family("apitoken_llm_requests_total", "counter",
               "Requests that reported LLM usage, by API token, service and model.", ("token", "service", "model")),
        Family("apitoken_llm_cost_usd_total", "counter",
               "Cost in USD of the LLM tokens used, at the prices in force when they were used.",
               ("token", "service", "model"),
               scale=NANO_USD),
        Family("apitoken_llm_unpriced_requests_total", "counter",
               "LLM usage reports for a model with no price: their cost is not counted.", ("service", "model")),
        Family("apitoken_label_overflow_total", "counter",
               "Label values replaced by __overflow__ because a cap was reached.", ("label",)),
        Family("apitoken_series_overflow_total", "counter",
               "Events of a token recorded in its overflow series because it had used its series budget "
               "(max_series_per_token): route or model __overflow__ (a known route: its own, with the "
               "status code's class).", ("token",)),
        Family("apitoken_ingest_events_total", "counter",
               "Usage events posted to the ingest endpoint, by result.", ("result",)),
        Family("apitoken_key_file_reload_errors_total", "counter",
               "Versions of the key file that could not be loaded (the previous keys stayed).", ()),
        Family("apitoken_key_old_secret_requests_total", "counter",
               "Requests authenticated with the secret a rotation replaced, during its grace period.",
               ("token",)),
        Family("apitoken_alert_feedback_total", "counter",
               "Verdicts given on alerts through the alert API (true_positive, false_positive), by "
               "alert name.", ("alertname", "verdict")),
        Family(DROPPED_SERIES, "counter",
               "Series not stored because the metric store was full (store_capacity).", ()),
    ) + upstream_catalogue()


UPSTREAM_STATUSES = ("active", "rate_limited", "invalid", "cooling_down")


def upstream_catalogue() -> Tuple[Family, ...]:
    """The proxy's upstream credential pool (credential_pool.py): a credential is its configured
    id (or a hash prefix), never its secret."""
    cp = ("credential", "provider")
    return (
        Family("apitoken_upstream_requests_total", "counter",
               "Requests the proxy sent upstream, by credential and the upstream's status code "
               "(error: no answer).", cp + ("code",)),
        Family("apitoken_upstream_selections_total", "counter",
               "Times the pool chose a credential for a request (a retry chooses again).", cp),
        Family("apitoken_upstream_rotations_total", "counter",
               "Times the pool moved away from a credential, by reason: threshold, rate_limited, "
               "invalid, cooling_down.", cp + ("reason",)),
        Family("apitoken_upstream_exhausted_total", "counter",
               "Requests refused because no credential of the pool could take them, by the pool's provider.",
               ("provider",)),
        Family("apitoken_upstream_rate_limit_limit", "gauge_recent",
               "The upstream's limit of a credential per resource, from its response headers.",
               cp + ("resource",)),
        Family("apitoken_upstream_rate_limit_remaining", "gauge_recent",
               "What the upstream says is left of the credential's limit.", cp + ("resource",)),
        Family("apitoken_upstream_rate_limit_reset_timestamp_seconds", "gauge_recent",
               "Unix time at which the upstream resets the credential's limit.", cp + ("resource",)),
        Family("apitoken_upstream_credential_status", "gauge_recent",
               "One-hot status of each upstream credential: active, rate_limited, invalid, cooling_down.",
               cp + ("status",)),
        Family("apitoken_upstream_credential_info", "gauge_recent",
               "Upstream credentials of the pool (value 1); credentials of one account share its quota.",
               cp + ("account",)),
        Family("apitoken_upstream_credential_last_used_timestamp_seconds", "gauge_max",
               "Unix time the credential was last sent upstream.", cp),
    )


INFO = Family("apitoken_token_info", "gauge", "Configured API tokens (value is always 1).",
              ("token", "name", "tenant"))
STATUS = Family("apitoken_token_status", "gauge",
                "Status of each configured API token: 0 active, 1 rate_limited, 2 expired, 3 inactive.",
                ("token",))
DEFAULT_LIMIT = Family("apitoken_rate_limit_default_limit", "gauge",
                       "Requests allowed per window to a token whose key sets no limit of its own.",
                       ("window",))
BREAKER = Family("apitoken_rate_limit_storage_breaker_state", "gauge",
                 "Circuit breaker in front of the shared rate-limit storage (one-hot): closed, "
                 "half_open (probing) or open (storage skipped).", ("state",))
KEYS_LOADED = Family("apitoken_keys_loaded", "gauge", "API keys loaded from the key file.", ())
KEY_FILE_HEALTHY = Family("apitoken_key_file_healthy", "gauge",
                          "1 while the key file loads; 0 while the last change could not be loaded "
                          "(the previous keys are in force) or it is missing or empty.", ())
KEY_FILE_SUCCESS = Family("apitoken_key_file_last_success_timestamp_seconds", "gauge",
                          "Unix time the key file was last loaded successfully.", ())
SENSITIVITY = Family("apitoken_anomaly_sensitivity", "gauge",
                     "A key's own anomaly sensitivity (1 low, 2 medium, 3 high); keys without one use "
                     "the rules' default.", ("token",))
PRICING_INFO = Family("apitoken_pricing_info", "gauge",
                      "The LLM price table in force (value 1): the snapshot's version and a checksum of "
                      "the prices with the pricing file's applied.", ("version", "checksum"))
KEY_TIMES = Family("apitoken_key_event_timestamp_seconds", "gauge",
                   "When a key was created, expires, was last rotated, and when the secret a rotation "
                   "replaced stops working (grace_ends); only the events a key has.", ("token", "event"))
BUDGET = Family("apitoken_budget_usd", "gauge",
                "LLM budget in USD per token and period (daily: trailing 24h, monthly: trailing 30 days).",
                ("token", "period"))


class Metrics:
    """The recording primitives over one Store: caps on label values, series found once and
    remembered, every write in the store's own layout."""

    def __init__(self, max_tokens: int = 10_000, max_routes: int = 500, max_models: int = 200,
                 directory: Optional[str] = None, capacity: Optional[int] = None, max_clients: int = 100,
                 max_countries_per_token: int = 10, max_series_per_token: int = 1000,
                 known_routes: Iterable[str] = (), listed_model: Callable[[str], bool] = lambda model: False):
        families = catalogue()
        (self.requests, self.duration, self.route_duration, self.auth_failures,
         self.auth_failures_by_client, self.by_country, self.rate_limited, self.rl_limit,
         self.rl_remaining, self.rl_reset, self.storage_errors,
         self.last_used, self.llm_tokens, self.llm_requests, self.llm_cost, self.llm_unpriced,
         self.overflow, self.series_overflow, self.ingest_events, self.key_file_errors, self.old_secret,
         self.alert_feedback, _dropped, *upstream) = families
        self.upstream = {f.name: f for f in upstream}       # recorded by credential_pool.py
        self.store = Store(families, directory, capacity or DEFAULT_CAPACITY)
        self._window_slots = {}
        self._limit_slots = {}        # token -> (plan, the gauge slots of each of its windows)
        self._request_slots = {}
        self._configured: tuple = ()

        def count_overflow(label: str) -> None:      # called with the store lock held
            self._add(self.overflow, (label,), 1.0)

        self.known_routes = set(known_routes)
        self.tokens = LabelGuard("token", max_tokens, count_overflow, fixed=(UNAUTHENTICATED,))
        self.routes = LabelGuard("route", max_routes, count_overflow, fixed=(UNMATCHED_ROUTE,),
                                 known=self.known_routes.__contains__)
        self.models = LabelGuard("model", max_models, count_overflow, known=listed_model)
        # per token: how many label combinations it has of requests (route, method, code) and of
        # LLM usage (service, model); past the budget new ones share __overflow__
        self.series_budget = max_series_per_token
        self._combinations: Dict[str, int] = {}
        self.services = LabelGuard("service", 50, count_overflow)
        self.alertnames = LabelGuard("alertname", 200, count_overflow)
        # failing clients are unbounded over time: the ones the store already holds (earlier
        # runs, other workers) count against the cap, so it bounds the state directory too
        self.clients = LabelGuard("client", max_clients, count_overflow)
        self.max_countries = max_countries_per_token
        self._countries: dict = {}          # token -> countries with their own series (bounded)
        with self.store.snapshot():
            self.clients.reserve(key[0] for key in self.store.values_by_key(self.auth_failures_by_client))
            self.alertnames.reserve(key[0] for key in self.store.values_by_key(self.alert_feedback))
            for token, country in self.store.values_by_key(self.by_country):
                self._countries.setdefault(token, set()).add(country)
        self._count_combinations()
        self.store.on_reopen.append(self._reopened)
        self._initial_series()

    def _count_combinations(self) -> None:
        """Each token's combinations so far (earlier runs, other workers, a parent process)."""
        counts: Dict[str, int] = {}
        with self.store.snapshot():
            for family, overflowed in ((self.requests, lambda k: k[1] == OVERFLOW),
                                       (self.llm_requests, lambda k: k[2] == OVERFLOW)):
                for key in self.store.values_by_key(family):
                    if not overflowed(key):
                        counts[key[0]] = counts.get(key[0], 0) + 1
        self._combinations = counts

    def _reopened(self) -> None:
        """After fork: the parent's slots mean nothing in the child's new file."""
        self._window_slots.clear()
        self._limit_slots.clear()
        self._request_slots.clear()
        self._count_combinations()
        for guard in (self.tokens, self.routes, self.models, self.services, self.clients, self.alertnames):
            guard.after_fork()
        self._initial_series()

    def _initial_series(self) -> None:
        with self.store.lock:                          # exposed at 0 before the first event
            for reason in AUTH_FAILURE_REASONS:
                self._add(self.auth_failures, (reason,), 0.0)
            for result in ("accepted", "rejected"):
                self._add(self.ingest_events, (result,), 0.0)
            self._add(self.storage_errors, (), 0.0)
            self._add(self.key_file_errors, (), 0.0)
            self._initial_token_series(self._configured)

    def init_tokens(self, token_ids) -> None:
        """The configured tokens keep their place under max_tokens."""
        self._configured = tuple(token_ids)
        with self.store.lock:
            self._initial_token_series(self._configured)

    def _initial_token_series(self, token_ids) -> None:
        self.tokens.reserve(token_ids)

    # -- series lookup (store lock held) ------------------------------------------------------
    def _add(self, family: Family, key: tuple, amount: float) -> None:
        store = self.store
        store.add(family, store.slot(family, key), amount)

    # -- recording -----------------------------------------------------------------------------
    def observe_request(self, token: str, route: str, method: str, code: int,
                        duration: float, authenticated: bool, now: Optional[float] = None) -> None:
        store = self.store
        with store.lock:
            slots = self._request_slots.get((token, route, method, code, authenticated))
            if slots is None:
                slots = self._new_request_slots(token, route, method, code, authenticated)
            store.observe_request(slots, duration, now if now is not None else time.time())

    def _new_request_slots(self, token, route, method, code, authenticated) -> tuple:
        """All slots a request writes, found once: the caps and the token's series budget apply
        here (store lock held)."""
        store = self.store
        a_token, a_route, a_method = (self.tokens.admit(token), self.routes.admit(route),
                                      validation.method(method))
        key = (a_token, a_route, a_method, str(code))
        within = self._within_budget(self.requests, key)
        if not within:
            key = (a_token, a_route if a_route in self.known_routes else OVERFLOW, a_method, code_class(code))
        slots = store.request_slots(store.slot(self.requests, key),
                                    (store.slot(self.duration, (a_token,)), self.duration),
                                    (store.slot(self.route_duration, (a_route, a_method)), self.route_duration),
                                    store.slot(self.last_used, (a_token,)) if authenticated else 0)
        if within and (a_token, a_route, a_method) == (token, route, method):   # overflowed ones: not remembered
            self._request_slots[(token, route, method, code, authenticated)] = slots
        return slots

    def _within_budget(self, family: Family, key: tuple) -> bool:
        """Whether ``key`` (token first) has or may get a series of its own; else the event is
        counted in apitoken_series_overflow_total (store lock held)."""
        if key in family.series:
            return True
        token = key[0]
        used = self._combinations.get(token, 0)
        if used < self.series_budget:
            self._combinations[token] = used + 1
            return True
        self._add(self.series_overflow, (token,), 1.0)
        return False

    def auth_failure(self, reason: str, client: str = "") -> None:
        with self.store.lock:
            self._add(self.auth_failures, (reason,), 1.0)
            self._add(self.auth_failures_by_client, (self.clients.admit(client or "unknown"),), 1.0)

    def observe_country(self, token: str, country: str) -> None:
        """One request of ``token`` from ``country``; at most max_countries_per_token countries
        per token get their own series."""
        with self.store.lock:
            token = self.tokens.admit(token, count=False)
            seen = self._countries.get(token)
            if seen is None:
                seen = self._countries[token] = set()
            if country not in seen:
                if len(seen) >= self.max_countries:
                    self._add(self.overflow, ("country",), 1.0)
                    country = OVERFLOW
                else:
                    seen.add(country)
            self._add(self.by_country, (token, country), 1.0)

    def set_windows(self, token: str, windows, now: float) -> None:
        """Limit, remaining and reset time of each window, as of ``now``."""
        cache = self._window_slots
        store = self.store
        with store.lock:
            for w in windows:
                slots = cache.get((token, w.window))
                if slots is None:
                    slots = self._new_window_slots(token, w.window)
                store.set_recent3(slots, w.limit, w.remaining, w.reset_at, now)

    def set_limits(self, token: str, decision, now: float) -> None:
        """A rate-limit decision's windows (limit, remaining, reset time), as of ``now``."""
        plan = decision.plan
        store = self.store
        with store.lock:
            cached = self._limit_slots.get(token)
            if cached is None or cached[0] is not plan:
                cached = self._new_limit_slots(token, plan, now)
            store.set_limits(cached[1], decision.values, now)

    def _new_limit_slots(self, token: str, plan, now: float) -> tuple:
        """(plan, the remaining and reset slots of its windows, flat). The limits are written
        here, once per plan: the newest write of any process wins when they are merged, so the
        gauge shows the newest plan's (store lock held)."""
        windows = [self._new_window_slots(token, window) for window, _, _ in plan]
        for (limit_slot, _, _), (_, limit, _) in zip(windows, plan):
            self.store.set_recent(limit_slot, limit, now)
        cached = (plan, tuple(slot for _, remaining, reset in windows for slot in (remaining, reset)))
        if self.tokens.admit(token, count=False) == token:     # an overflowed token is not remembered
            self._limit_slots[token] = cached
        return cached

    def _new_window_slots(self, token: str, window: str) -> tuple:
        key = (self.tokens.admit(token), window)
        slots = tuple(self.store.slot(f, key) for f in (self.rl_limit, self.rl_remaining, self.rl_reset))
        if key[0] == token:                   # an overflowed token is not remembered
            self._window_slots[(token, window)] = slots
        return slots

    def set_window(self, token: str, window: str, limit: int, remaining: int, reset_at: float) -> None:
        self.set_windows(token, [WindowState(window, limit, remaining, reset_at)], time.time())

    def observe_rate_limited(self, token: str, window: str) -> None:
        with self.store.lock:
            self._add(self.rate_limited, (self.tokens.admit(token), window), 1.0)

    def storage_error(self) -> None:
        with self.store.lock:
            self._add(self.storage_errors, (), 1.0)

    def key_file_error(self) -> None:
        with self.store.lock:
            self._add(self.key_file_errors, (), 1.0)

    def ingest(self, accepted: int, rejected: int) -> None:
        with self.store.lock:
            self._add(self.ingest_events, ("accepted",), float(accepted))
            self._add(self.ingest_events, ("rejected",), float(rejected))

    def old_secret_used(self, token: str) -> None:
        with self.store.lock:
            self._add(self.old_secret, (self.tokens.admit(token),), 1.0)

    def count_alert_feedback(self, alertname: str, verdict: str) -> None:
        with self.store.lock:
            self._add(self.alert_feedback, (self.alertnames.admit(alertname), verdict), 1.0)

    def observe_llm(self, token: str, usage: LLMUsage, cost_usd: Optional[float]) -> None:
        """``cost_usd`` None means the model has no price: counted as unpriced, never as $0.
        A token overflow is counted with the request of the same event, not again here. Input
        and output exist for every model used; the cache and reasoning types once they occur."""
        with self.store.lock:
            token = self.tokens.admit(token, count=False)
            service = self.services.admit(usage.service.lower())
            model = self.models.admit(usage.model)
            if not self.models.known(model) and not self._within_budget(self.llm_requests, (token, service, model)):
                model = OVERFLOW                     # a listed model never does: bounded by the price tables
            for kind, n in usage.exported_parts().items():
                self._add(self.llm_tokens, (token, service, model, kind), float(n))
            self._add(self.llm_requests, (token, service, model), 1.0)
            if cost_usd is None:
                self._add(self.llm_unpriced, (service, model), 1.0)
            else:
                self._add(self.llm_cost, (token, service, model), cost_usd)


class ScrapeView:
    """What /metrics shows: the recorded families (summed over workers in multiprocess mode)
    plus token info, status and budgets derived from the key store at scrape time, and the
    rate-limit gauges as of the scrape."""

    def __init__(self, metrics: Metrics, keystore, clock: Callable[[], float] = time.time,
                 limiter=None, pricing=None, default_limits: Optional[Dict[str, int]] = None):
        self.metrics = metrics
        self.keystore = keystore
        self.clock = clock
        self.limiter = limiter
        self.pricing = pricing
        self.default_limits = dict(default_limits or {})

    def window_rows(self, now: float):
        """The rate-limit gauges as of ``now`` (a window that has reset has its whole limit
        left; a limit only where it is not the window's default) and the tokens with a window
        used up: (limit, remaining, reset, rate-limited tokens), each gauge as (keys, values)
        columns. It runs on every scrape, for every token's windows: list comprehensions over
        columns, no row objects."""
        m = self.metrics
        store = m.store
        with store.snapshot():
            keys, limits = store.family_data(m.rl_limit)
            remaining_keys, remaining = store.family_data(m.rl_remaining)
            reset_keys, resets = store.family_data(m.rl_reset)
        if remaining_keys != keys:             # written together, so normally the same order
            by_key = dict(zip(remaining_keys, remaining))
            remaining = [by_key.get(k, limit) for k, limit in zip(keys, limits)]
        if reset_keys != keys:
            by_key = dict(zip(reset_keys, resets))
            resets = [by_key.get(k, 0.0) for k in keys]
        left = [r if at > now else limit for limit, r, at in zip(limits, remaining, resets)]
        limited = {k[0] for k, n in zip(keys, left) if n <= 0}
        defaults = self.default_limits
        own = [i for i, (k, limit) in enumerate(zip(keys, limits)) if defaults.get(k[1]) != limit]
        return ([keys[i] for i in own], [limits[i] for i in own]), (keys, left), (keys, resets), limited

    def limited_tokens(self, now: Optional[float] = None) -> set:
        """Tokens with a window used up that has not reset yet: status rate_limited."""
        return self.window_rows(now if now is not None else self.clock())[3]

    def derived(self):
        """The families computed at scrape time, as (family, keys, values)."""
        now = self.clock()
        limit, remaining, reset, limited = self.window_rows(now)
        m = self.metrics
        out = [(m.rl_limit, *limit), (m.rl_remaining, *remaining), (m.rl_reset, *reset)]
        rows = [(DEFAULT_LIMIT, [((w,), float(n)) for w, n in self.default_limits.items()])]
        if self.keystore is not None:
            rows += self._key_rows(now, limited)
        return out + [(family, [k for k, _ in pairs], [v for _, v in pairs]) for family, pairs in rows]

    def _key_rows(self, now: float, limited: set):
        info, status, budget, sensitivity, times = [], [], [], [], []
        for key in self.keystore.all():
            for event, at in (("created", key.created_at), ("expires", key.expires_at),
                              ("rotated", key.last_rotated_at),
                              ("grace_ends", key.previous.valid_until if key.previous else None)):
                if at is not None:
                    times.append(((key.id, event), at.timestamp()))
            if key.anomaly_sensitivity:
                sensitivity.append(((key.id,), float(SENSITIVITIES.index(key.anomaly_sensitivity) + 1)))
            info.append(((key.id, key.name, key.tenant), 1.0))
            status.append(((key.id,), float(TOKEN_STATUS_VALUES[token_status(key, key.id in limited, now)])))
            budget.extend(((key.id, period), amount) for period, amount in sorted(key.budget_usd.items()))
        keystore = self.keystore
        health = [(KEYS_LOADED, [((), float(len(keystore)))]),
                  (KEY_FILE_HEALTHY, [((), 1.0 if keystore.healthy else 0.0)])]
        if keystore.last_success is not None:
            health.append((KEY_FILE_SUCCESS, [((), keystore.last_success)]))
        if self.limiter is not None and self.limiter.shared:
            state = self.limiter.breaker.state
            health.append((BREAKER, [((s,), 1.0 if s == state else 0.0)
                                     for s in ("closed", "half_open", "open")]))
        if self.pricing is not None:
            health.append((PRICING_INFO, [((self.pricing.version, self.pricing.checksum), 1.0)]))
        return [(INFO, info), (STATUS, status), (BUDGET, budget), (SENSITIVITY, sensitivity),
                (KEY_TIMES, times)] + health

    def render(self, accept: Optional[str] = None) -> Tuple[bytes, str]:
        openmetrics = bool(accept) and "application/openmetrics-text" in accept
        store = self.metrics.store
        m = self.metrics
        with store.snapshot():              # one read of the worker files for the whole scrape
            body = store.render(self.derived(), openmetrics=openmetrics,
                                skip=(m.rl_limit, m.rl_remaining, m.rl_reset))
        return body, OPENMETRICS if openmetrics else TEXT


def token_status(key, rate_limited: bool, now: float) -> str:
    if not key.active:
        return "inactive"
    if key.expired(now):
        return "expired"
    if rate_limited:
        return "rate_limited"
    return "active"
