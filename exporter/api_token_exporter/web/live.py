"""The live view's stream: ``GET /admin/live`` answers Server-Sent Events, one ``tick`` a second
with the requests since the last one and the counts of the last minute (core/live.py), for the
admin or a tenant's tokens only.

Bounded: at most ``console_live_viewers`` streams at once per process (more are answered 503
with Retry-After), one message a second each with at most 50 requests (the rest counted as
``not_shown``), and a stream ends after ``console_live_seconds`` (the page reconnects, and its
session is checked again). Served by `serve` (bridge.py), a stream waits on the event loop and
holds no thread; under another WSGI server it holds one of its threads while it lasts.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Callable, Iterator, Optional, Tuple

from ..core.live import LiveView, Viewer

LIVE_PATH = "/admin/live"
INTERVAL = 1.0                      # seconds between a stream's messages
RETRY_MS = 2000                     # the browser's EventSource waits this before reconnecting


class LiveStreams:
    """This process's live views of ``core``'s request feed."""

    def __init__(self, core, viewers: int, seconds: float, interval: float = INTERVAL):
        self.core, self.viewers, self.seconds, self.interval = core, viewers, seconds, interval
        self._view: Optional[LiveView] = None
        self._open = 0
        self._lock = threading.Lock()

    @property
    def view(self) -> LiveView:
        with self._lock:
            if self._view is None:
                self._view = LiveView(self.core.feed)
            return self._view

    def open(self, tokens) -> Optional["LiveStream"]:
        """A stream for a viewer of ``tokens`` (None: every token), or None when
        ``viewers`` are streaming already."""
        view = self.view
        with self._lock:
            if self._open >= self.viewers:
                return None
            self._open += 1
        now = time.time()
        return LiveStream(self, view, view.viewer(tokens, now), now + self.seconds)

    def _closed(self) -> None:
        with self._lock:
            self._open -= 1

    def describe(self, token: Optional[str]) -> Tuple[Optional[str], str, Optional[str]]:
        """(name, shown id, tenant) of a token."""
        if token is None:
            return None, "(no key)", None
        key = self.core.keystore.get(token)
        if key is None:
            return None, token, None
        return key.name, key.masked or key.id, key.tenant


class LiveStream:
    """One viewer's stream: a WSGI answer's iterable (iterated on a server's thread, which
    closes it), or, once an event loop ``take``s it, ``on_loop()``. It frees its place once,
    whether or not it was ever iterated."""

    def __init__(self, streams: LiveStreams, view: LiveView, viewer: Viewer, deadline: float):
        self.streams, self.view, self.viewer, self.deadline = streams, view, viewer, deadline
        self._taken = self._released = False

    def _tick(self) -> bytes:
        now = time.time()
        self.view.update(now)
        message = self.view.message(self.viewer, now, self.streams.describe)
        return b"event: tick\ndata: " + json.dumps(message, separators=(",", ":")).encode() + b"\n\n"

    def _end(self, reason: str) -> bytes:
        return b"event: end\ndata: " + json.dumps({"reason": reason}).encode() + b"\n\n"

    def take(self) -> None:
        """An event loop serves it: closing the WSGI answer no longer ends it; ``release`` does."""
        self._taken = True

    def close(self) -> None:
        if not self._taken:
            self.release()

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.streams._closed()

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield b"retry: %d\n\n" % RETRY_MS + self._tick()
            while time.time() + self.streams.interval < self.deadline:
                time.sleep(self.streams.interval)
                yield self._tick()
            yield self._end("time")
        finally:
            self.release()

    async def on_loop(self, stopping: Callable[[], bool]):
        """The chunks, waiting on the loop; ends early when ``stopping()`` (the client left, the
        server drains)."""
        try:
            yield b"retry: %d\n\n" % RETRY_MS + self._tick()
            while time.time() + self.streams.interval < self.deadline:
                for _ in range(10):
                    await asyncio.sleep(self.streams.interval / 10)
                    if stopping():
                        yield self._end("server stopping")
                        return
                yield self._tick()
            yield self._end("time")
        finally:
            self.release()
