"""Minute, hour and day windows per token, with the fixed-window semantics of the `limits`
library (a window starts at its first request and lasts its length), in one pass per request.

Storage by URI: ``memory://`` (per process), ``redis://[:password@]host:port/db`` (also
``rediss://``, ``unix://``), ``redis+sentinel://[:password@]host:port[,host:port]/service[/db]``
or ``redis+cluster://[:password@]host:port[,host:port]`` (shared by workers and replicas; in
Redis Cluster a token's windows share a hash slot, so the script still runs on one node). Windows are checked in order minute, hour, day; the first
that is exhausted refuses the request and the longer windows are not charged for it.

Why not `limits` itself: its MemoryStorage costs two calls and a key build per window (about
60-130 µs for three windows with their header values, benchmarks/bench_ratelimit.py), and its
Redis storage one round trip per call, six per request. Here memory is one dict pass and Redis
one EVALSHA per request; tests check that both give the same answers as `limits`.

Asyncio code (the ASGI middleware) calls ``hit_plan_async``: the same script, keys, circuit
breaker and failure mode through ``redis.asyncio``, so WSGI and ASGI instances share counts.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from typing import Dict, List, Optional, Tuple
from urllib.parse import unquote, urlsplit

log = logging.getLogger("api_token_exporter")

WINDOW_SECONDS = {"minute": 60, "hour": 3600, "day": 86400}
WINDOW_ORDER = ("minute", "hour", "day")


class StorageUnavailable(RuntimeError):
    pass


class WindowState:
    __slots__ = ("window", "limit", "remaining", "reset_at")

    def __init__(self, window: str, limit: int, remaining: int, reset_at: float):
        self.window, self.limit, self.remaining, self.reset_at = window, limit, remaining, reset_at

    def reset_in(self, now: float) -> int:
        return max(0, math.ceil(self.reset_at - now))

    def __repr__(self):
        return f"WindowState({self.window}, limit={self.limit}, remaining={self.remaining})"


class Decision:
    """One request's charge. ``values`` holds each window's remaining requests and reset time,
    flat and in plan order (remaining, reset_at, remaining, reset_at, ...): what the headers and
    the gauges read on every request, without an object per window; ``refused`` is the index
    of the window that refused the request, or -1."""
    __slots__ = ("allowed", "plan", "values", "refused")

    def __init__(self, plan: "Plan", values: List[float], refused: int = -1):
        self.plan, self.values, self.refused = plan, values, refused
        self.allowed = refused < 0

    @property
    def windows(self) -> List[WindowState]:
        values = self.values
        return [WindowState(window, limit, values[2 * i], values[2 * i + 1])
                for i, (window, limit, _) in enumerate(self.plan)]

    @property
    def refused_by(self) -> Optional[WindowState]:
        return None if self.refused < 0 else self.windows[self.refused]


Plan = Tuple[Tuple[str, int, int], ...]       # (window, limit, seconds), in window order


class MemoryBackend:
    """Counts per (token, window), as Redis keeps them: a change of a key's limit keeps the
    count of the running window (raising 3 to 5 after 3 hits leaves 2; lowering it never
    forgives what was used)."""

    def __init__(self):
        self._counters: Dict[str, Dict[str, list]] = {}   # token -> window -> [count, expires_at]
        self._lanes: Dict[str, tuple] = {}                # token -> (plan, its windows' entries)
        self._lock = threading.Lock()
        self._next_sweep = 0.0

    def hit(self, token: str, plan: Plan, now: float) -> Decision:
        values: List[float] = []
        refused = -1
        with self._lock:
            lanes = self._lanes.get(token)
            if lanes is None or lanes[0] is not plan:
                lanes = self._lanes_of(token, plan)
            for entry, limit, seconds in lanes[1]:
                if entry[1] <= now:                  # expired, or never started
                    if refused >= 0:                 # not charged: the window has not started
                        values += (limit, now + seconds)
                        continue
                    entry[0], entry[1] = 0, now + seconds
                if refused < 0:
                    count = entry[0] = entry[0] + 1
                    if count > limit:
                        refused = len(values) >> 1
                else:
                    count = entry[0]
                values += (limit - count if count < limit else 0, entry[1])
            if now >= self._next_sweep:              # forget windows that ended, once a minute
                self._sweep(now)
        return Decision(plan, values, refused)

    def _lanes_of(self, token: str, plan: Plan) -> tuple:
        """(plan, (entry, limit, seconds) per window): a token's counts in the plan's order, kept
        by window name, so a new plan for the token (a changed limit) goes on counting them."""
        entries = self._counters.get(token)
        if entries is None:
            entries = self._counters[token] = {}
        lanes = self._lanes[token] = (plan, tuple((entries.setdefault(window, [0, 0.0]), limit, seconds)
                                                  for window, limit, seconds in plan))
        return lanes

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + 60.0
        counters = self._counters
        for k in [k for k, e in counters.items() if all(x[1] <= now for x in e.values())]:
            del counters[k]
            self._lanes.pop(k, None)

    def reset(self) -> None:
        with self._lock:
            self._counters.clear()
            self._lanes.clear()


# One round trip: charge the windows in order until one is exhausted, report count and TTL of all.
HIT_SCRIPT = """
local out = {}
local refused = 0
for i = 1, #KEYS do
  local limit = tonumber(ARGV[2 * i - 1])
  local size = tonumber(ARGV[2 * i])
  local count
  if refused == 0 then
    count = redis.call('INCR', KEYS[i])
    if count == 1 then redis.call('PEXPIRE', KEYS[i], size) end
    if count > limit then refused = i end
  else
    count = tonumber(redis.call('GET', KEYS[i]) or '0')
  end
  local ttl = redis.call('PTTL', KEYS[i])
  if count > 0 and ttl < 0 then
    redis.call('PEXPIRE', KEYS[i], size)
    ttl = size
  end
  out[#out + 1] = count
  out[#out + 1] = ttl
end
return out
"""


def redis_call(token: str, plan: Plan) -> Tuple[List[str], List[int]]:
    """The keys and arguments of HIT_SCRIPT for one request: the same for the sync and the
    asyncio client, so WSGI and ASGI instances share counts exactly."""
    # {token} is a hash tag: a token's windows share a Redis Cluster slot
    keys = [f"ate:rl:{{{token}}}:{window}" for window, _, _ in plan]
    args: List[int] = []
    for _, limit, seconds in plan:
        args += [limit, seconds * 1000]
    return keys, args


def redis_decision(reply, plan: Plan, now: float) -> Decision:
    """HIT_SCRIPT's reply (count and TTL of every window) as a Decision."""
    values: List[float] = []
    refused = -1
    for i, (window, limit, seconds) in enumerate(plan):
        count, ttl_ms = int(reply[2 * i]), int(reply[2 * i + 1])
        values += (max(0, limit - count), now + ttl_ms / 1000.0 if ttl_ms >= 0 else now + seconds)
        if refused < 0 and count > limit:
            refused = i
    return Decision(plan, values, refused)


class RedisBackend:
    def __init__(self, client):
        self.client = client
        self._script = client.register_script(HIT_SCRIPT)

    def hit(self, token: str, plan: Plan, now: float) -> Decision:
        keys, args = redis_call(token, plan)
        return redis_decision(self._script(keys=keys, args=args), plan, now)

    def reset(self) -> None:
        for key in self.client.scan_iter("ate:rl:*"):
            self.client.delete(key)


class AsyncRedisBackend:
    """The same script and keys through ``redis.asyncio``: one round trip per request that
    never blocks the event loop (the ASGI middleware)."""

    def __init__(self, client):
        self.client = client
        self._script = client.register_script(HIT_SCRIPT)

    async def hit(self, token: str, plan: Plan, now: float) -> Decision:
        keys, args = redis_call(token, plan)
        return redis_decision(await self._script(keys=keys, args=args), plan, now)

    async def aclose(self) -> None:
        close = getattr(self.client, "aclose", None) or self.client.close    # redis < 5: close()
        await close()


def redis_client(uri: str, timeout: float, asyncio: bool = False):
    """A client for a redis://, rediss://, unix://, redis+sentinel:// or redis+cluster:// URI,
    from ``redis`` or, with ``asyncio``, from ``redis.asyncio`` (redis>=4.5), with the same
    timeouts."""
    from .errors import optional_import
    redis = optional_import("redis.asyncio" if asyncio else "redis", "redis", "Redis")
    timeouts = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    if uri.startswith("redis+cluster://"):
        cluster = optional_import(redis.__name__ + ".cluster", "redis", "Redis Cluster")
        ClusterNode, RedisCluster = cluster.ClusterNode, cluster.RedisCluster
        parts = urlsplit(uri)
        nodes = []
        for hostport in parts.netloc.rsplit("@", 1)[-1].split(","):
            host, _, port = hostport.partition(":")
            nodes.append(ClusterNode(host, int(port or 6379)))
        password = unquote(parts.password) if parts.password else None
        username = unquote(parts.username) if parts.username else None
        # No retries of a failed call: each would wait its own timeout (and a backoff), so a call
        # during a failover would wait for the client instead of answering within
        # storage_timeout. The failure goes to the breaker and the failure mode; the client still
        # follows MOVED/ASK and refreshes its slot map on the next call, which finds the new primary.
        retry = optional_import(redis.__name__ + ".retry", "redis", "Redis Cluster").Retry
        backoff = optional_import("redis.backoff", "redis", "Redis Cluster").NoBackoff
        return RedisCluster(startup_nodes=nodes, password=password, username=username,
                            retry=retry(backoff(), 0), **timeouts)
    if uri.startswith("redis+sentinel://"):
        Sentinel = optional_import(redis.__name__ + ".sentinel", "redis", "Redis").Sentinel
        parts = urlsplit(uri)
        password = unquote(parts.password) if parts.password else None
        hosts = []
        for hostport in parts.netloc.rsplit("@", 1)[-1].split(","):
            host, _, port = hostport.partition(":")
            hosts.append((host, int(port or 26379)))
        path = [p for p in parts.path.split("/") if p]
        if not path:
            raise ValueError("redis+sentinel:// needs the service name: redis+sentinel://host:26379/mymaster")
        db = int(path[1]) if len(path) > 1 else 0
        sentinel = Sentinel(hosts, sentinel_kwargs=timeouts, **timeouts)
        return sentinel.master_for(path[0], password=password, db=db, **timeouts)
    return redis.Redis.from_url(uri, **timeouts)


def _redis_backend(uri: str, timeout: float) -> RedisBackend:
    return RedisBackend(redis_client(uri, timeout))


class CircuitBreaker:
    """Stops calling a shared storage that fails: after ``threshold`` failures in a row it opens
    (no calls, answers at once), after a backoff lets one probe through (half-open), and closes
    when the probe succeeds; each failed probe doubles the backoff up to ``max_backoff``. Every
    state change is logged once, never the requests in between."""

    CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"

    def __init__(self, name: str, threshold: int = 3, backoff: float = 1.0, max_backoff: float = 30.0,
                 clock=time.monotonic, logger=None):
        self.name, self.threshold, self.base_backoff, self.max_backoff = name, threshold, backoff, max_backoff
        self.clock, self.logger = clock, logger
        self.state = self.CLOSED
        self.failures = 0
        self.backoff = backoff
        self.retry_at = 0.0
        self._lock = threading.Lock()

    def allow(self) -> bool:
        """True if a call may go to the storage now (closed, or this caller is the probe)."""
        if self.state == self.CLOSED:
            return True
        with self._lock:
            if self.state == self.OPEN and self.clock() >= self.retry_at:
                self._change(self.HALF_OPEN, "probing")
                return True
            return False

    def success(self) -> None:
        if self.state == self.CLOSED and not self.failures:
            return
        with self._lock:
            self.failures = 0
            self.backoff = self.base_backoff
            if self.state != self.CLOSED:
                self._change(self.CLOSED, "storage answers again; limits apply")

    def failure(self, reason: str) -> None:
        with self._lock:
            self.failures += 1
            if self.state == self.HALF_OPEN:
                self.backoff = min(self.backoff * 2, self.max_backoff)
            elif self.state == self.CLOSED and self.failures < self.threshold:
                return
            self.retry_at = self.clock() + self.backoff
            if self.state != self.OPEN:
                self._change(self.OPEN, f"{reason}; next probe in {self.backoff:g} s")

    def _change(self, state: str, why: str) -> None:
        self.state = state
        if self.logger:
            log = self.logger.info if state == self.CLOSED else self.logger.error
            log("rate-limit storage %s: circuit breaker %s (%s)", self.name, state, why)


FAILURE_MODES = ("open", "closed", "local")


class RateLimiter:
    """``failure_mode`` says what a request gets while the shared storage is away: ``open``
    (let through without limits, the default), ``closed`` (refused: StorageUnavailable reaches
    the caller, which answers 503) or ``local`` (this process's own memory limits)."""

    def __init__(self, storage_uri: str = "memory://", timeout: float = 0.1, failure_mode: str = "open",
                 logger=None):
        self.storage_uri = storage_uri
        scheme = storage_uri.split("://", 1)[0] if "://" in storage_uri else ""
        try:
            if failure_mode not in FAILURE_MODES:
                raise ValueError(f"failure mode must be one of {', '.join(FAILURE_MODES)}")
            if scheme == "memory":
                self.backend = MemoryBackend()
            elif scheme in ("redis", "rediss", "unix", "redis+sentinel", "redis+cluster"):
                self.backend = _redis_backend(storage_uri, timeout)
            else:
                raise ValueError("use memory://, redis://, rediss://, unix://, redis+sentinel:// or "
                                 "redis+cluster://")
        except ValueError as exc:
            raise ValueError(f"rate-limit storage {self.safe_uri()!r}: {exc}") from None
        self.shared = scheme != "memory"
        self.failure_mode = failure_mode
        self.breaker = CircuitBreaker(self.safe_uri(), logger=logger)
        self._local = MemoryBackend() if failure_mode == "local" else None
        self._plans: Dict[tuple, Plan] = {}
        self.timeout = timeout
        self._async: Optional[AsyncRedisBackend] = None     # made on first use, in its event loop
        self._async_loop = None

    def plan(self, limits: Dict[str, int]) -> Plan:
        items = tuple(limits.items())
        plan = self._plans.get(items)
        if plan is None:
            plan = self._plans[items] = tuple((w, limits[w], WINDOW_SECONDS[w])
                                              for w in WINDOW_ORDER if w in limits)
        return plan

    def hit(self, token_id: str, limits: Dict[str, int], now: Optional[float] = None) -> Decision:
        """Charge one request to ``token_id``. Raises StorageUnavailable if the backend is down
        (at once while the circuit breaker is open), unless the failure mode is ``local``."""
        return self.hit_plan(token_id, self.plan(limits), now)

    def hit_plan(self, token_id: str, plan: Plan, now: Optional[float] = None) -> Decision:
        now = now if now is not None else time.time()
        if not self.shared:
            return self.backend.hit(token_id, plan, now)
        breaker = self.breaker
        if breaker.allow():
            try:
                decision = self.backend.hit(token_id, plan, now)
            except Exception as exc:
                return self._failed(exc, token_id, plan, now)
            breaker.success()
            return decision
        return self._unavailable(token_id, plan, now)

    async def hit_plan_async(self, token_id: str, plan: Plan, now: Optional[float] = None) -> Decision:
        """hit_plan() for asyncio code: Redis through ``redis.asyncio`` (the same script, keys,
        circuit breaker and failure mode); memory storage answers at once, as it does no I/O."""
        now = now if now is not None else time.time()
        if not self.shared:
            return self.backend.hit(token_id, plan, now)
        breaker = self.breaker
        if breaker.allow():
            try:
                decision = await self._async_backend().hit(token_id, plan, now)
            except Exception as exc:
                return self._failed(exc, token_id, plan, now)
            breaker.success()
            return decision
        return self._unavailable(token_id, plan, now)

    def _async_backend(self) -> AsyncRedisBackend:
        """The asyncio client of the running event loop (a client is bound to its loop)."""
        import asyncio
        loop = asyncio.get_running_loop()
        backend = self._async
        if backend is None or self._async_loop is not loop:
            backend = self._async = AsyncRedisBackend(redis_client(self.storage_uri, self.timeout, asyncio=True))
            self._async_loop = loop
        return backend

    async def open_async(self) -> None:
        """Open the asyncio client of the running event loop and load the script (an ASGI
        app's start-up); a storage that does not answer is logged, and requests meet the
        breaker and the failure mode."""
        if not self.shared:
            return
        try:
            await self._async_backend().client.script_load(HIT_SCRIPT)
        except Exception as exc:
            log.warning("rate-limit storage %s does not answer at start-up (%s); limits apply "
                        "once it does (storage_failure_mode: %s)", self.safe_uri(),
                        type(exc).__name__, self.failure_mode)

    async def aclose(self) -> None:
        """Close the asyncio client's connections (the ASGI middleware's shutdown)."""
        backend, self._async, self._async_loop = self._async, None, None
        if backend is not None:
            await backend.aclose()

    def _failed(self, exc: Exception, token_id: str, plan: Plan, now: float) -> Decision:
        self.breaker.failure(type(exc).__name__)
        return self._fallback(token_id, plan, now,
                              f"rate-limit storage {self.safe_uri()} failed: {type(exc).__name__}")

    def _unavailable(self, token_id: str, plan: Plan, now: float) -> Decision:
        return self._fallback(token_id, plan, now,
                              f"rate-limit storage {self.safe_uri()} unavailable (circuit breaker open)")

    def _fallback(self, token_id: str, plan: Plan, now: float, reason: str) -> Decision:
        if self._local is not None:
            return self._local.hit(token_id, plan, now)
        raise StorageUnavailable(reason)

    def safe_uri(self) -> str:
        # redis://:password@host/0 (or ?password=...) must not reach a log line
        scheme, sep, rest = self.storage_uri.partition("://")
        return scheme + sep + rest.rsplit("@", 1)[-1].split("?", 1)[0]

    def reset(self) -> None:
        self.backend.reset()
