"""Failed credentials per client address.

Past ``limit`` failures (a 401 to a request that carried a credential: the admin, ingest or
metrics token, an API key, the alert webhook's token, a console sign-in) within ``window``
seconds, that address gets 429 with Retry-After from the service's own endpoints until the
window is over, whatever it sends; other addresses are not affected. Each process counts its
own, so with several workers an address gets ``limit`` tries per worker at most. At most
``max_addresses`` are remembered (the oldest are forgotten first), so a flood of addresses
costs bounded memory.
"""
from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from typing import Callable, Optional, Tuple


class FailureThrottle:
    def __init__(self, limit: int, window: float = 60.0, max_addresses: int = 10_000,
                 clock: Callable[[], float] = time.monotonic):
        self.limit, self.window, self.max_addresses, self.clock = limit, window, max_addresses, clock
        self._lock = threading.Lock()
        self._failures: "OrderedDict[str, Tuple[float, int]]" = OrderedDict()   # address -> (since, count)

    def retry_after(self, address: str) -> Optional[int]:
        """Seconds until ``address`` may try again, or None if it may now."""
        if self.limit <= 0:
            return None
        with self._lock:
            entry = self._failures.get(address)
            if entry is None:
                return None
            since, count = entry
            left = since + self.window - self.clock()
            if left <= 0:
                del self._failures[address]
                return None
            return max(1, math.ceil(left)) if count >= self.limit else None

    def failed(self, address: str) -> None:
        if self.limit <= 0:
            return
        now = self.clock()
        with self._lock:
            since, count = self._failures.pop(address, (now, 0))
            if now - since >= self.window:
                since, count = now, 0
            self._failures[address] = (since, count + 1)
            while len(self._failures) > self.max_addresses:
                self._failures.popitem(last=False)
