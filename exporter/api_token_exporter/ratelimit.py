"""Minute, hour and day windows per token, with the fixed-window semantics of the `limits`
library (a window starts at its first request and lasts its length), in one pass per request.

Storage by URI: ``memory://`` (per process), ``redis://[:password@]host:port/db`` (also
``rediss://``, ``unix://``) or ``redis+sentinel://[:password@]host:port[,host:port]/service[/db]``
(shared by workers and replicas). Windows are checked in order minute, hour, day; the first
that is exhausted refuses the request and the longer windows are not charged for it.

Why not `limits` itself: its MemoryStorage costs two calls and a key build per window (about
60-130 µs for three windows with their header values, benchmarks/bench_ratelimit.py), and its
Redis storage one round trip per call, six per request. Here memory is one dict pass and Redis
one EVALSHA per request; tests check that both give the same answers as `limits`.
"""
from __future__ import annotations

import math
import threading
import time
from typing import Dict, List, Optional, Tuple
from urllib.parse import unquote, urlsplit

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
    __slots__ = ("allowed", "windows", "refused_by", "plan")

    def __init__(self, allowed: bool, windows: List[WindowState], refused_by: Optional[WindowState],
                 plan: "Plan" = ()):
        self.allowed, self.windows, self.refused_by, self.plan = allowed, windows, refused_by, plan


Plan = Tuple[Tuple[str, int, int], ...]       # (window, limit, seconds), in window order


class MemoryBackend:
    """Counts per (token, window), as Redis keeps them: a change of a key's limit keeps the
    count of the running window (raising 3 to 5 after 3 hits leaves 2; lowering it never
    forgives what was used)."""

    def __init__(self):
        self._counters: Dict[str, Dict[str, list]] = {}   # token -> window -> [count, expires_at]
        self._lock = threading.Lock()
        self._next_sweep = 0.0

    def hit(self, token: str, plan: Plan, now: float) -> Decision:
        windows: List[WindowState] = []
        refused = None
        counters = self._counters
        with self._lock:
            entries = counters.get(token)
            if entries is None:
                entries = counters[token] = {}
            for window, limit, seconds in plan:
                entry = entries.get(window)
                if entry is None:
                    entry = entries[window] = [0, 0.0]
                if entry[1] <= now:                  # expired, or never started
                    if refused is not None:          # not charged: the window has not started
                        windows.append(WindowState(window, limit, limit, now + seconds))
                        continue
                    entry[0], entry[1] = 0, now + seconds
                if refused is None:
                    entry[0] += 1
                    state = WindowState(window, limit, max(0, limit - entry[0]), entry[1])
                    if entry[0] > limit:
                        refused = state
                else:
                    state = WindowState(window, limit, max(0, limit - entry[0]), entry[1])
                windows.append(state)
            if now >= self._next_sweep:              # forget windows that ended, once a minute
                self._next_sweep = now + 60.0
                for k in [k for k, e in counters.items() if all(x[1] <= now for x in e.values())]:
                    del counters[k]
        return Decision(refused is None, windows, refused, plan)

    def reset(self) -> None:
        with self._lock:
            self._counters.clear()


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


class RedisBackend:
    def __init__(self, client):
        self.client = client
        self._script = client.register_script(HIT_SCRIPT)

    def hit(self, token: str, plan: Plan, now: float) -> Decision:
        # {token} is a hash tag: a token's windows share a Redis Cluster slot
        keys = [f"ate:rl:{{{token}}}:{window}" for window, _, _ in plan]
        args = []
        for _, limit, seconds in plan:
            args += [limit, seconds * 1000]
        reply = self._script(keys=keys, args=args)
        windows: List[WindowState] = []
        refused = None
        charging = True
        for i, (window, limit, seconds) in enumerate(plan):
            count, ttl_ms = int(reply[2 * i]), int(reply[2 * i + 1])
            reset_at = now + ttl_ms / 1000.0 if ttl_ms >= 0 else now + seconds
            state = WindowState(window, limit, max(0, limit - count), reset_at)
            if charging and count > limit:
                refused, charging = state, False
            windows.append(state)
        return Decision(refused is None, windows, refused, plan)

    def reset(self) -> None:
        for key in self.client.scan_iter("ate:rl:*"):
            self.client.delete(key)


def _redis_backend(uri: str) -> RedisBackend:
    import redis
    timeouts = {"socket_timeout": 1.0, "socket_connect_timeout": 1.0}
    if uri.startswith("redis+sentinel://"):
        from redis.sentinel import Sentinel
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
        return RedisBackend(sentinel.master_for(path[0], password=password, db=db, **timeouts))
    return RedisBackend(redis.Redis.from_url(uri, **timeouts))


class RateLimiter:
    def __init__(self, storage_uri: str = "memory://"):
        self.storage_uri = storage_uri
        scheme = storage_uri.split("://", 1)[0] if "://" in storage_uri else ""
        try:
            if scheme == "memory":
                self.backend = MemoryBackend()
            elif scheme in ("redis", "rediss", "unix", "redis+sentinel"):
                self.backend = _redis_backend(storage_uri)
            else:
                raise ValueError("use memory://, redis://, rediss://, unix:// or redis+sentinel://")
        except ValueError as exc:
            raise ValueError(f"rate-limit storage {self._safe_uri()!r}: {exc}") from None
        self._plans: Dict[tuple, Plan] = {}

    def plan(self, limits: Dict[str, int]) -> Plan:
        items = tuple(limits.items())
        plan = self._plans.get(items)
        if plan is None:
            plan = self._plans[items] = tuple((w, limits[w], WINDOW_SECONDS[w])
                                              for w in WINDOW_ORDER if w in limits)
        return plan

    def hit(self, token_id: str, limits: Dict[str, int], now: Optional[float] = None) -> Decision:
        """Charge one request to ``token_id``. Raises StorageUnavailable if the backend is down."""
        return self.hit_plan(token_id, self.plan(limits), now)

    def hit_plan(self, token_id: str, plan: Plan, now: Optional[float] = None) -> Decision:
        try:
            return self.backend.hit(token_id, plan, now if now is not None else time.time())
        except Exception as exc:
            raise StorageUnavailable(f"rate-limit storage {self._safe_uri()} failed: "
                                     f"{type(exc).__name__}") from None

    def _safe_uri(self) -> str:
        # redis://:password@host/0 must not reach a log line
        scheme, sep, rest = self.storage_uri.partition("://")
        return scheme + sep + rest.rsplit("@", 1)[-1]

    def reset(self) -> None:
        self.backend.reset()
