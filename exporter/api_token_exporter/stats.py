"""Per-token usage counts and the recent-requests ring buffer behind /admin/* (seed 003).

This is the live, in-process view an admin asks for; Prometheus is the store of record for
history. Under several workers each worker answers for the requests it served.
"""
from __future__ import annotations

import collections
import datetime as dt
import threading
import time
from typing import Dict, Optional

from .metrics import STATUSES, token_status

MAX_ENDPOINTS_PER_TOKEN = 100


def time_str(ts: Optional[float]) -> Optional[str]:
    if not ts:
        return None
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


class _TokenUsage:
    __slots__ = ("usage_count", "success_count", "error_count", "endpoints", "last_used", "windows")

    def __init__(self):
        self.usage_count = 0
        self.success_count = 0
        self.error_count = 0
        self.endpoints: Dict[str, int] = collections.Counter()
        self.last_used: Optional[float] = None
        self.windows: Dict[str, object] = {}


class UsageTracker:
    def __init__(self, recent: int = 100):
        self._lock = threading.Lock()
        self._tokens: Dict[str, _TokenUsage] = {}
        self._recent = collections.deque(maxlen=recent)
        self._last_token: Optional[str] = None

    def record(self, token_id: str, masked: str, route: str, method: str, code: int,
               ts: float) -> None:
        with self._lock:
            usage = self._tokens.get(token_id)
            if usage is None:
                usage = self._tokens[token_id] = _TokenUsage()
            usage.usage_count += 1
            if code < 400:
                usage.success_count += 1
            else:
                usage.error_count += 1
            if route in usage.endpoints or len(usage.endpoints) < MAX_ENDPOINTS_PER_TOKEN:
                usage.endpoints[route] += 1
            usage.last_used = ts
            self._recent.append({"timestamp": int(ts), "endpoint": route, "method": method,
                                 "token": masked, "status": code, "time_str": time_str(ts)})

    def record_windows(self, token_id: str, windows) -> None:
        with self._lock:
            usage = self._tokens.get(token_id)
            if usage is None:
                usage = self._tokens[token_id] = _TokenUsage()
            for state in windows:
                usage.windows[state.window] = state
            self._last_token = token_id   # "current_rate_limit" is the last limited token's

    def _rate_limited(self, usage: Optional[_TokenUsage], now: float) -> bool:
        return bool(usage) and any(s.remaining <= 0 and s.reset_at > now
                                   for s in usage.windows.values())

    def token_details(self, keystore, default_limits: Dict[str, int], now: Optional[float] = None) -> dict:
        now = now or time.time()
        tokens = []
        with self._lock:
            for key in keystore.all():
                usage = self._tokens.get(key.id) or _TokenUsage()
                hour = usage.windows.get("hour")
                limit = key.rate_limits.get("hour", default_limits.get("hour"))
                endpoints = dict(usage.endpoints.most_common())
                tokens.append({
                    "token_id": key.masked or key.id,
                    "id": key.id,
                    "name": key.name,
                    "tenant": key.tenant,
                    "usage_count": usage.usage_count,
                    "success_count": usage.success_count,
                    "error_count": usage.error_count,
                    "status": token_status(key, self._rate_limited(usage, now), now),
                    "rate_limit": {
                        "remaining": hour.remaining if hour else limit,
                        "limit": limit,
                        "reset": time_str(hour.reset_at) if hour else None,
                    },
                    "rate_limits": {
                        w: {"limit": s.limit, "remaining": s.remaining, "reset": time_str(s.reset_at)}
                        for w, s in usage.windows.items()
                    },
                    "last_used": time_str(usage.last_used),
                    "endpoints_used": endpoints,
                    "top_endpoints": [[r, n] for r, n in usage.endpoints.most_common(5)],
                })
        return {"tokens": tokens, "total_tokens": len(tokens), "timestamp": time_str(now)}

    def stats(self, keystore, default_limits: Dict[str, int], now: Optional[float] = None) -> dict:
        now = now or time.time()
        counts = dict.fromkeys(STATUSES, 0)
        effective = 0
        with self._lock:
            keys = keystore.all()
            for key in keys:
                status = token_status(key, self._rate_limited(self._tokens.get(key.id), now), now)
                counts[status] += 1
                if status in ("active", "rate_limited"):
                    effective += key.rate_limits.get("hour", default_limits.get("hour", 0))
            current = None
            if self._last_token and self._last_token in self._tokens:
                current = self._tokens[self._last_token].windows.get("hour")
            total = sum(u.usage_count for u in self._tokens.values())
            success = sum(u.success_count for u in self._tokens.values())
            recent = list(self._recent)
        return {
            "tokens": {
                "count": len(keys),
                "effective_limit": effective,
                "per_token_limit": default_limits.get("hour"),
                "active": counts["active"],
                "rate_limited": counts["rate_limited"],
                "invalid": counts["invalid"] + counts["expired"] + counts["inactive"],
                "inactive": counts["inactive"],
                "expired": counts["expired"],
            },
            "current_rate_limit": ({"remaining": current.remaining, "limit": current.limit,
                                    "reset": int(current.reset_at)} if current else None),
            "reset_time": time_str(current.reset_at) if current else None,
            "total_requests": total,
            "success_count": success,
            "error_count": total - success,
            "recent_requests": recent[::-1],
        }
