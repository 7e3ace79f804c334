"""The one recording core: keys → validation → rate limit → store.

Every path that counts goes through a ``UsageCore``: the WSGI and ASGI middleware (and later
the proxy) for live requests, the ingest endpoint for events posted by other
services, and the LLM capture. Nothing records by a second route, so a request counted by the
middleware and the same request posted as an event give the same series.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Dict, Iterable, Optional, Tuple

from .config import Settings
from .keystore import KEY_PREFIX, MAX_KEY_LENGTH, ApiKey, KeyStore, last_good_copy
from .live import RequestFeed
from .llmcapture import extract_usage
from .metrics import UNAUTHENTICATED, Metrics, ScrapeView
from .pricing import Pricing
from .ratelimit import WINDOW_ORDER, Decision, RateLimiter, StorageUnavailable
from .stats import UsageTracker
from .usage import LLMUsage, UsageError, validate_usage

log = logging.getLogger("api_token_exporter")
MIN_KEY_LENGTH = 16     # shorter parts of a label are not looked up as keys (a hash each)


class UsageCore:
    def __init__(self, settings: Settings, keystore: Optional[KeyStore] = None):
        s = self.settings = settings
        self.keystore = keystore if keystore is not None else KeyStore(
            s.keys_file, logger=log, allow_empty=s.allow_empty_keys, last_good=last_good_copy(s.state_dir))
        self.limiter = RateLimiter(s.storage_uri, timeout=s.storage_timeout,
                                   failure_mode=s.storage_failure_mode, logger=log)
        self.pricing = Pricing.load(s.pricing_file, s.prices_file)
        self.metrics = Metrics(max_tokens=s.max_tokens, max_routes=s.max_routes,
                               max_models=s.max_models, max_clients=s.max_clients,
                               max_countries_per_token=s.max_countries_per_token, directory=s.state_dir,
                               capacity=s.store_capacity, max_series_per_token=s.max_series_per_token,
                               known_routes=s.known_routes, listed_model=self.pricing.lists_model)
        self.keystore.on_install.append(lambda keys: self.metrics.init_tokens(k.id for k in keys))
        self.keystore.on_error.append(self.metrics.key_file_error)
        self.keystore.watch()                     # a broken file shows in /healthz without traffic
        self.metrics.init_tokens(k.id for k in self.keystore.all())
        self.countries = None
        if s.country_lookup:
            from .geo import CountryResolver
            self.countries = CountryResolver(s.geo_database)
        self.view = ScrapeView(self.metrics, self.keystore, limiter=self.limiter, pricing=self.pricing,
                               default_limits=self.settings.rate_limits)
        self.feed = RequestFeed(s.state_dir)
        self.tracker = UsageTracker(self.feed, s.recent_requests)

    # -- keys --------------------------------------------------------------------------------
    def authenticate(self, raw: Optional[str]) -> Tuple[Optional[ApiKey], Optional[str]]:
        """(key, None) for a usable key, else (key or None, refusal reason)."""
        if not raw:
            return None, "missing"
        if len(raw) > MAX_KEY_LENGTH:         # not worth hashing; any other unknown value: no key has its hash
            return None, "invalid"
        key, previous = self.keystore.lookup_secret(raw)
        if key is None:
            return None, "invalid"
        if previous:                       # the secret a rotation replaced
            if not key.previous_valid():
                return key, "rotated"
            self.metrics.old_secret_used(key.id)
        if not key.active:
            return key, "inactive"
        if key.expires_at is not None and key.expired():
            return key, "expired"
        return key, None

    # -- rate limits -------------------------------------------------------------------------
    def limits_for(self, key: ApiKey) -> Dict[str, int]:
        if not key.rate_limits:
            return self.settings.rate_limits
        return {**self.settings.rate_limits, **key.rate_limits}

    def _plan(self, key: ApiKey):
        """The key's windows, computed once per key object (a reload makes new objects)."""
        plan = key.__dict__.get("_ate_plan")
        if plan is None:
            plan = key.__dict__["_ate_plan"] = self.limiter.plan(self.limits_for(key))
        return plan

    def hit(self, key: ApiKey, now: float) -> Optional[Decision]:
        """Charge one request; None when the shared storage is away and the failure mode is
        ``open`` (the request goes through, counted). In ``closed`` mode StorageUnavailable
        reaches the caller (a 503); in ``local`` mode this process's memory limits answer. The
        circuit breaker logs each change of state; requests are not logged one by one."""
        try:
            decision = self.limiter.hit_plan(key.id, self._plan(key), now)
        except StorageUnavailable as exc:
            return self._storage_unavailable(exc)
        return self._decided(key, decision, now)

    async def hit_async(self, key: ApiKey, now: float) -> Optional[Decision]:
        """hit() for asyncio front ends: Redis through redis.asyncio, never blocking the loop."""
        try:
            decision = await self.limiter.hit_plan_async(key.id, self._plan(key), now)
        except StorageUnavailable as exc:
            return self._storage_unavailable(exc)
        return self._decided(key, decision, now)

    def _storage_unavailable(self, exc: StorageUnavailable) -> None:
        self.metrics.storage_error()
        if self.limiter.failure_mode == "closed":
            raise exc
        return None

    def _decided(self, key: ApiKey, decision: Decision, now: float) -> Decision:
        self.metrics.set_limits(key.id, decision, now)
        if not decision.allowed:
            self.metrics.observe_rate_limited(key.id, decision.plan[decision.refused][0])
        return decision

    # -- recording ---------------------------------------------------------------------------
    def auth_failure(self, reason: str, client: str = "") -> None:
        self.metrics.auth_failure(reason, client)

    def record_country(self, token: str, client: str) -> None:
        """With country_lookup: the country of a request of ``token`` from address ``client``."""
        if self.countries is not None:
            self.metrics.observe_country(token, self.countries.country(client))

    def record_request(self, token: Optional[str], route: str, method: str, code: int,
                       duration: float, now: Optional[float] = None) -> None:
        """One request: ``token`` is the key id, or None for a missing or unknown key. It is
        counted in the store and written to the live feed."""
        if now is None:
            now = time.time()
        if token is None:
            self.metrics.observe_request(UNAUTHENTICATED, route, method, code, duration, False, now)
        else:
            self.metrics.observe_request(token, route, method, code, duration, True, now)
        self.feed.record(now, token, method, route, code, duration)

    def is_a_key(self, value: str) -> bool:
        """Whether a label a client sent is, or holds, an API key (never to become a label):
        the keys' prefix anywhere, or a current key as the whole value or one of its path
        segments (keys may be imported without the prefix)."""
        if KEY_PREFIX in value:
            return True
        return any(self.keystore.lookup(part) is not None
                   for part in {value, *value.split("/")} if len(part) >= MIN_KEY_LENGTH)

    def validate_usage(self, *values) -> LLMUsage:
        """validate_usage, and neither the service nor the model may be an API key."""
        usage = validate_usage(*values)
        for field, value in (("service", usage.service), ("model", usage.model)):
            if self.is_a_key(value):
                raise UsageError(f"{field} must not be an API key")
        return usage

    def count_llm(self, token: str, usage: LLMUsage) -> LLMUsage:
        """Count validated usage: tokens by type, requests, and cost at the current prices."""
        price = self.pricing.price(usage.service, usage.model)
        self.metrics.observe_llm(token, usage, price.cost(usage) if price else None)
        return usage

    # -- what a front end reads from a response (shared by the WSGI and ASGI middleware) ------
    def capture_llm(self, token: str, content_type: str, body: bytes, model_hint: str = "") -> None:
        """Count the LLM usage an OpenAI, Anthropic or Cohere answer (JSON or server-sent
        events) reports, if any; a bad value is logged and nothing is counted."""
        found = extract_usage(content_type, body, model_hint or None)
        if found is None:
            return
        try:
            self.count_llm(token, self.validate_usage(*found))
        except UsageError as exc:
            log.warning("LLM usage in a response for token %s not counted: %s", token, exc)

    def observe_upstream_limits(self, token: str, headers: Iterable[Tuple[str, str]], code: int) -> None:
        """Observe-only mode: take rate-limit values from the headers the app (or its upstream)
        set, in the form ``X-RateLimit-Minute-Remaining`` or GitHub's
        ``X-RateLimit-Remaining`` (reported as the ``default`` window)."""
        found: Dict[str, Dict[str, float]] = {}
        for name, value in headers:
            lname = name.lower()
            if not lname.startswith("x-ratelimit-"):
                continue
            parts = lname[len("x-ratelimit-"):].split("-")
            if len(parts) == 2 and parts[0] in WINDOW_ORDER:
                window, field = parts
            elif len(parts) == 1:
                window, field = "default", parts[0]
            else:
                continue
            if field not in ("limit", "remaining", "reset"):
                continue
            try:
                number = float(value)
            except ValueError:
                continue
            if math.isfinite(number):        # the store holds finite values only
                found.setdefault(window, {})[field] = number
        now = time.time()
        exhausted = None
        for window, values in found.items():
            if "limit" not in values or "remaining" not in values:
                continue
            reset = values.get("reset", 0.0)
            reset_at = reset if reset > 1e9 else now + reset   # epoch or seconds from now
            self.metrics.set_window(token, window, int(values["limit"]),
                                    int(values["remaining"]), reset_at)
            if values["remaining"] <= 0 and exhausted is None:
                exhausted = window
        if code == 429:
            self.metrics.observe_rate_limited(token, exhausted or "default")
