"""What a slow or hung Prometheus may cost the exporter service: analytics answers computed at once
are bounded overall and per caller, and after repeated failures a circuit breaker answers at
once instead of waiting the full ``prometheus_timeout`` each time.

Each answer waits on an app thread, so without a bound a few callers (any tenant's API key is
enough) could hold every thread and `/healthz` and ingest would wait behind them. With
``analytics_max_concurrent`` below the server's threads, the others always have some.

The breaker: after ``analytics_breaker_failures`` answers in a row that Prometheus could not give,
analytics are refused (503 with Retry-After) for ``analytics_breaker_cooldown``; then one answer
is let through as a probe: if it succeeds, analytics resume, else the pause starts again.
"""
from __future__ import annotations

import math
import threading
import time
from typing import Callable, Dict

from .queries import PrometheusUnavailable


class Refused(Exception):
    """The answer was not attempted: ``status`` (429 or 503), ``retry_after`` seconds, why."""

    def __init__(self, status: int, retry_after: int, detail: str):
        super().__init__(detail)
        self.status, self.retry_after, self.detail = status, retry_after, detail


class QueryGate:
    def __init__(self, overall: int, per_caller: int, failures: int, cooldown: float,
                 clock: Callable[[], float] = time.monotonic):
        self.overall, self.per_caller, self.failures, self.cooldown = overall, per_caller, failures, cooldown
        self.clock = clock
        self.lock = threading.Lock()
        self.in_flight: Dict[str, int] = {}
        self.total = 0
        self.failed = 0                     # answers in a row that Prometheus could not give
        self.paused_until = 0.0
        self.probing = False

    def run(self, caller: str, compute):
        """compute()'s answer, or Refused at once, or PrometheusUnavailable from compute()."""
        with self.lock:
            now = self.clock()
            probe = False
            if self.failed >= self.failures:
                if now < self.paused_until or self.probing:
                    wait = max(1, math.ceil(self.paused_until - now))
                    raise Refused(503, wait, f"Prometheus did not answer the last {self.failed} analytics "
                                             f"questions; analytics are paused, try again in {wait} seconds")
                probe = self.probing = True
            if self.total >= self.overall:
                raise Refused(503, 1, f"{self.total} analytics answers are being computed, the most at once "
                                      "(analytics_max_concurrent); try again in a second")
            if self.in_flight.get(caller, 0) >= self.per_caller:
                raise Refused(429, 1, f"This credential already waits for {self.per_caller} analytics answer(s) "
                                      "(analytics_max_per_caller); try again when it has arrived")
            self.total += 1
            self.in_flight[caller] = self.in_flight.get(caller, 0) + 1
        answered = None                      # None: failed, but not for Prometheus (not counted)
        try:
            answer = compute()
            answered = True
            return answer
        except PrometheusUnavailable:
            answered = False
            raise
        finally:
            with self.lock:
                self.total -= 1
                left = self.in_flight[caller] - 1
                if left:
                    self.in_flight[caller] = left
                else:
                    del self.in_flight[caller]
                if probe:
                    self.probing = False
                if answered:
                    self.failed = 0
                elif answered is False:
                    self.failed += 1
                    if self.failed >= self.failures:
                        self.paused_until = self.clock() + self.cooldown

    def state(self) -> dict:
        """For /healthz: whether analytics are paused, and for how long still."""
        with self.lock:
            paused = self.failed >= self.failures
            left = max(0.0, self.paused_until - self.clock()) if paused else 0.0
            return {"prometheus": "paused" if paused else "ok", "paused_for_seconds": round(left, 1),
                    "answers_in_flight": self.total}
