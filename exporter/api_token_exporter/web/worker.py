"""The gunicorn worker of `serve` and `proxy`: uvicorn's event loop in front of the WSGI app
(bridge.py), so a client costs a socket until its whole request has arrived.

What a client may hold is bounded by the `serving` settings: the request's head must come within
``http_header_timeout`` (uvicorn has no such limit: a connection that sends part of a request
line and goes silent would stay forever), its body within ``http_body_timeout`` (bridge.py), an
idle kept-alive connection lasts ``http_keepalive_timeout``, and past ``http_max_connections``
per worker a request is answered 503 at once. Heads are at most 16 KiB (h11's limit).

On SIGTERM the worker stops accepting and drains: a request in flight is answered with
``Connection: close``, and so is one that comes on an idle kept-alive connection within
``DRAIN_IDLE`` seconds (uvicorn would close those at once, resetting a client whose next request
is already on its way), and so is the first request of a connection accepted while draining
(drain.py: how the listener closes); then the worker exits, within gunicorn's graceful timeout.
"""
from __future__ import annotations

import sys

from gunicorn.arbiter import Arbiter
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn_worker import UvicornWorker

from ..core.config import load_settings
from .bridge import DRAINING, WsgiBridge
from .drain import DrainingServer

DRAIN_IDLE = 1.0
CLOSE = (b"connection", b"close")
REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class HeadTimeoutProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, closing a connection whose request head is overdue."""

    header_timeout = 10.0
    head_timer = None
    draining = False

    def connection_made(self, transport):
        super().connection_made(transport)
        self.arm_head_timer()
        if DRAINING.is_set():              # accepted as the worker began to stop
            self.shutdown()

    def on_response_complete(self):
        super().on_response_complete()
        self.arm_head_timer()              # the next request's head, if the connection stays

    def handle_events(self):
        super().handle_events()
        if self.draining and self.cycle is not None and not self.cycle.response_complete:
            self.last_request()

    def shutdown(self):
        """SIGTERM: drain, do not reset (see the module's doc); endless streams end."""
        DRAINING.set()
        self.draining = True
        if self.cycle is None or self.cycle.response_complete:
            self.loop.call_later(DRAIN_IDLE, self.close_if_idle)
        else:
            self.last_request()

    def last_request(self):
        """The request being answered is this connection's last: its answer says so (uvicorn
        would close after it without a word, and the client's next request would be reset)."""
        cycle = self.cycle
        cycle.keep_alive = False
        if not cycle.response_started and CLOSE not in cycle.scope["headers"]:
            cycle.scope["headers"].append(CLOSE)   # uvicorn answers a request that asks to close with Connection: close

    def close_if_idle(self):
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self.transport.close()

    def connection_lost(self, exc):
        if self.head_timer is not None:
            self.head_timer.cancel()
        super().connection_lost(exc)

    def arm_head_timer(self):
        if self.head_timer is not None:
            self.head_timer.cancel()
        self.head_timer = self.loop.call_later(self.header_timeout, self.head_overdue)

    def head_overdue(self):
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return                         # closed already, or a request is being answered
        if self.conn.trailing_data[0]:     # part of a request came: say why it ends
            self.transport.write(REQUEST_TIMEOUT)
        self.transport.close()


class ServingWorker(UvicornWorker):
    """gunicorn worker class: ``-k api_token_exporter.web.worker.ServingWorker`` (set by
    gunicorn_conf.py and `serve`/`proxy`); ``--threads`` run the app."""

    CONFIG_KWARGS = {"loop": "asyncio", "http": HeadTimeoutProtocol, "lifespan": "on",
                     "proxy_headers": False, "server_header": False}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        settings = load_settings()
        HeadTimeoutProtocol.header_timeout = settings.http_header_timeout
        config = self.config
        config.timeout_keep_alive = settings.http_keepalive_timeout
        config.limit_concurrency = settings.http_max_connections
        config.timeout_graceful_shutdown = self.cfg.graceful_timeout
        config.access_log = bool(self.cfg.accesslog)
        self.body_timeout = settings.http_body_timeout

    async def _serve(self):
        """UvicornWorker._serve with the draining server."""
        self.config.app = self.wsgi
        server = DrainingServer(config=self.config)
        self._install_sigquit_handler()
        await server.serve(sockets=self.sockets)
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)

    def load_wsgi(self):
        super().load_wsgi()
        begin = getattr(self.wsgi, "begin", None)      # the proxy's pool upkeep, in this worker
        if begin is not None:
            begin()
        self.wsgi = WsgiBridge(self.wsgi, threads=max(1, self.cfg.threads), body_timeout=self.body_timeout)
