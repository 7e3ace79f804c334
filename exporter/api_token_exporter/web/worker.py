"""The gunicorn worker of `serve` and `proxy`: uvicorn's event loop in front of the WSGI app
(bridge.py), so a client costs a socket until its whole request has arrived.

What a client may hold is bounded by the `serving` settings: the request's head must come within
``http_header_timeout`` (uvicorn has no such limit: a connection that sends part of a request
line and goes silent would stay forever), its body within ``http_body_timeout`` (bridge.py), an
idle kept-alive connection lasts ``http_keepalive_timeout``, and past ``http_max_connections``
per worker a request is answered 503 at once. Heads are at most 16 KiB (h11's limit).

On SIGTERM the worker stops accepting, closes idle connections, lets requests in flight finish
(answered with ``Connection: close``) within gunicorn's graceful timeout, then exits.
"""
from __future__ import annotations

from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn_worker import UvicornWorker

from ..core.config import load_settings
from .bridge import WsgiBridge

REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class HeadTimeoutProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, closing a connection whose request head is overdue."""

    header_timeout = 10.0
    head_timer = None

    def connection_made(self, transport):
        super().connection_made(transport)
        self.arm_head_timer()

    def on_response_complete(self):
        super().on_response_complete()
        self.arm_head_timer()              # the next request's head, if the connection stays

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

    def load_wsgi(self):
        super().load_wsgi()
        self.wsgi = WsgiBridge(self.wsgi, threads=max(1, self.cfg.threads), body_timeout=self.body_timeout)
