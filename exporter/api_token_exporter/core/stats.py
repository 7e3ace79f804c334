"""The admin JSON (/admin/token-details, /admin/stats), answered from the metric
store and the live request feed, so under several workers (a shared store directory) it covers
all of them."""
from __future__ import annotations

import collections
import datetime as dt
import time
from typing import Collection, Dict, Optional

from .metrics import STATUSES, UNAUTHENTICATED, token_status


def time_str(ts: Optional[float]) -> Optional[str]:
    if not ts:
        return None
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


class _Usage:
    __slots__ = ("usage_count", "success_count", "error_count", "endpoints", "last_used", "windows")

    def __init__(self):
        self.usage_count = self.success_count = self.error_count = 0
        self.endpoints: Dict[str, int] = collections.Counter()
        self.last_used: Optional[float] = None
        self.windows: Dict[str, dict] = {}


def _iso(when) -> Optional[str]:
    return time_str(when.timestamp()) if when is not None else None


class UsageTracker:
    def __init__(self, feed, recent: int = 100):
        """``feed``: the live.RequestFeed the recent requests are read from, ``recent`` of them."""
        self.feed, self.recent = feed, recent

    @classmethod
    def _read(cls, view, now: float):
        """Usage per token and the rate-limited tokens, from one snapshot of the store."""
        metrics = view.metrics
        with metrics.store.snapshot():
            return cls._usage(metrics), view.limited_tokens(now)

    @staticmethod
    def _usage(metrics) -> Dict[str, _Usage]:
        usage: Dict[str, _Usage] = collections.defaultdict(_Usage)
        gauges = {metrics.rl_limit: "limit", metrics.rl_remaining: "remaining",
                  metrics.rl_reset: "reset_at"}
        for family, keys, values in metrics.store.data():
            if family is metrics.requests:
                for (token, route, _method, code), value in zip(keys, values):
                    n = int(value)
                    u = usage[token]
                    u.usage_count += n
                    if int(code) < 400:
                        u.success_count += n
                    else:
                        u.error_count += n
                    u.endpoints[route] += n
            elif family is metrics.last_used:
                for (token,), value in zip(keys, values):
                    usage[token].last_used = value
            elif family in gauges:
                for (token, window), value in zip(keys, values):
                    usage[token].windows.setdefault(window, {})[gauges[family]] = value
        return usage

    def token_details(self, keystore, default_limits: Dict[str, int], view, now: Optional[float] = None,
                      tokens: Optional[Collection[str]] = None) -> dict:
        """The token details; ``tokens`` limits it to those key ids (a tenant's)."""
        now = now or time.time()
        usage, limited = self._read(view, now)
        entries = []
        for key in _keys(keystore, tokens):
            u = usage.get(key.id) or _Usage()
            hour = u.windows.get("hour")
            limit = key.rate_limits.get("hour", default_limits.get("hour"))
            limits = {**default_limits, **key.rate_limits}
            entries.append({
                "token_id": key.masked or key.id,
                "id": key.id,
                "name": key.name,
                "tenant": key.tenant,
                "usage_count": u.usage_count,
                "success_count": u.success_count,
                "error_count": u.error_count,
                "status": token_status(key, key.id in limited, now),
                "rate_limit": {
                    "remaining": int(hour["remaining"]) if hour else limit,
                    "limit": limit,
                    "reset": time_str(hour.get("reset_at")) if hour else None,
                },
                "rate_limits": _windows(limits, u.windows, now),
                "last_used": time_str(u.last_used),
                "endpoints_used": dict(u.endpoints.most_common()),
                "top_endpoints": [[r, n] for r, n in u.endpoints.most_common(5)],
                "description": key.description,
                "created_at": _iso(key.created_at),
                "updated_at": _iso(key.updated_at),
                "expires_at": _iso(key.expires_at),
                "last_rotated_at": _iso(key.last_rotated_at),
                "rotation": None if key.previous is None else {
                    "old_key": key.previous.masked, "old_key_valid_until": _iso(key.previous.valid_until),
                    "old_key_valid": key.previous_valid(now)},
            })
        return {"tokens": entries, "total_tokens": len(entries), "timestamp": time_str(now)}

    def stats(self, keystore, default_limits: Dict[str, int], view, now: Optional[float] = None,
              tokens: Optional[Collection[str]] = None) -> dict:
        """The stats; ``tokens`` limits every count and the recent requests to those key
        ids (a tenant's), and leaves out unauthenticated requests."""
        now = now or time.time()
        usage, limited = self._read(view, now)
        if tokens is not None:
            usage = {t: u for t, u in usage.items() if t in tokens}
        counts = dict.fromkeys(STATUSES, 0)
        effective = 0
        keys = _keys(keystore, tokens)
        for key in keys:
            status = token_status(key, key.id in limited, now)
            counts[status] += 1
            if status in ("active", "rate_limited"):
                effective += key.rate_limits.get("hour", default_limits.get("hour", 0))
        recent_used = [(u.last_used, t) for t, u in usage.items() if u.last_used and "hour" in u.windows]
        current = usage[max(recent_used)[1]].windows["hour"] if recent_used else None
        total = sum(u.usage_count for u in usage.values())
        success = sum(u.success_count for u in usage.values())
        recent = [{"timestamp": int(r.time), "endpoint": r.route, "method": r.method,
                   "token": shown_token(keystore, r.token), "status": r.code, "time_str": time_str(r.time)}
                  for r in self.feed.latest(self.recent if tokens is None else SEARCHED)
                  if tokens is None or r.token in tokens][-self.recent:]
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
            "current_rate_limit": ({"remaining": int(current["remaining"]), "limit": int(current["limit"]),
                                    "reset": int(current["reset_at"])} if current else None),
            "reset_time": time_str(current["reset_at"]) if current else None,
            "total_requests": total,
            "success_count": success,
            "error_count": total - success,
            "unauthenticated_requests": usage[UNAUTHENTICATED].usage_count if UNAUTHENTICATED in usage else 0,
            "recent_requests": recent[::-1],
        }


SEARCHED = 4096          # a tenant's recent requests are found among this many of everyone's


def shown_token(keystore, token: Optional[str]) -> str:
    """A token as lists of requests show it: its key's masked form (or id), '(none)' without one."""
    if token is None:
        return "(none)"
    key = keystore.get(token)
    return (key.masked or key.id) if key is not None else token


def _keys(keystore, tokens: Optional[Collection[str]]):
    return [k for k in keystore.all() if tokens is None or k.id in tokens]


def _windows(limits: Dict[str, int], live: Dict[str, dict], now: float) -> Dict[str, dict]:
    """Every window the key is limited by: the live state while the window runs, the whole
    limit (reset None: the next request starts a window) before or after."""
    out = {}
    for window, limit in limits.items():
        state = live.get(window)
        if state and state.get("reset_at", 0) > now:
            out[window] = {"limit": int(state.get("limit", limit)), "remaining": int(state.get("remaining", 0)),
                           "reset": time_str(state["reset_at"])}
        else:
            out[window] = {"limit": int(limit), "remaining": int(limit), "reset": None}
    for window, state in live.items():        # observe-only windows (the app's own headers)
        if window not in out:
            out[window] = {"limit": int(state.get("limit", 0)), "remaining": int(state.get("remaining", 0)),
                           "reset": time_str(state.get("reset_at"))}
    return out
