"""Minute, hour and day windows per token, on the `limits` library's fixed-window strategy.

Storage is chosen by URI as in `limits`: ``memory://`` (per process) or ``redis://host:port/db``
(shared by workers and replicas). Windows are checked in order minute, hour, day; the first that
is exhausted refuses the request and the longer windows are not charged for it.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

from limits import RateLimitItemPerDay, RateLimitItemPerHour, RateLimitItemPerMinute
from limits.storage import storage_from_string
from limits.strategies import FixedWindowRateLimiter

WINDOW_ITEMS = {"minute": RateLimitItemPerMinute, "hour": RateLimitItemPerHour,
                "day": RateLimitItemPerDay}
WINDOW_SECONDS = {"minute": 60, "hour": 3600, "day": 86400}

log = logging.getLogger("api_token_exporter.ratelimit")


class StorageUnavailable(RuntimeError):
    pass


@dataclass
class WindowState:
    window: str
    limit: int
    remaining: int
    reset_at: float          # unix time the window resets

    def reset_in(self, now: float) -> int:
        return max(0, math.ceil(self.reset_at - now))


@dataclass
class Decision:
    allowed: bool
    windows: List[WindowState]
    refused_by: Optional[WindowState] = None


class RateLimiter:
    def __init__(self, storage_uri: str = "memory://"):
        try:
            self.storage = storage_from_string(storage_uri)
        except Exception as exc:  # limits raises ConfigurationError for bad URIs
            raise ValueError(f"rate-limit storage {storage_uri!r}: {exc}") from None
        self.storage_uri = storage_uri
        self.limiter = FixedWindowRateLimiter(self.storage)
        self._items: Dict[tuple, object] = {}

    def _item(self, window: str, amount: int):
        key = (window, amount)
        item = self._items.get(key)
        if item is None:
            item = self._items[key] = WINDOW_ITEMS[window](amount)
        return item

    def hit(self, token_id: str, limits: Dict[str, int], now: Optional[float] = None) -> Decision:
        """Charge one request to ``token_id``. Raises StorageUnavailable if the backend is down."""
        windows: List[WindowState] = []
        refused: Optional[WindowState] = None
        try:
            for window in ("minute", "hour", "day"):
                if window not in limits:
                    continue
                item = self._item(window, limits[window])
                allowed = True
                if refused is None:
                    allowed = self.limiter.hit(item, token_id)
                reset_at, remaining = self.limiter.get_window_stats(item, token_id)
                if reset_at <= 0:   # nothing counted yet in this window
                    reset_at = (now or time.time()) + WINDOW_SECONDS[window]
                state = WindowState(window, limits[window], int(remaining), float(reset_at))
                windows.append(state)
                if not allowed:
                    refused = state
        except Exception as exc:
            raise StorageUnavailable(f"rate-limit storage {self._safe_uri()} failed: "
                                     f"{type(exc).__name__}") from None
        return Decision(refused is None, windows, refused)

    def _safe_uri(self) -> str:
        # redis://:password@host/0 must not reach a log line
        scheme, sep, rest = self.storage_uri.partition("://")
        return scheme + sep + rest.rsplit("@", 1)[-1]

    def reset(self) -> None:
        self.storage.reset()
