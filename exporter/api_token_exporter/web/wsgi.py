"""The WSGI middleware and Flask extension: API-key auth, rate limits with headers, metrics.

    app = Flask(__name__)
    TokenAnalytics(app, keys_file="keys.yml")            # Flask: one line

    application = TokenAnalytics(wsgi_app, keys_file="keys.yml",
                                 routes=["/items/<id>"])  # any WSGI app
"""
from __future__ import annotations

import functools
import json
import logging
import time
from typing import Iterable, List, Optional, Tuple

from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map, Rule

from ..core.config import Settings, load_settings
from ..core.recording import UsageCore
from ..core.keystore import ApiKey, KeyStore, mask_key
from ..core.metrics import UNMATCHED_ROUTE
from ..core.geo import client_ip, parse_trusted_proxies
from ..core.usage import LLMUsage
from ..core.llmcapture import carries_usage
from .endpoints import build_endpoints, serve_metrics_port
from .pipeline import (CURRENT, BodyCapture, admit, capture_llm_usage, current_call, leave, record_llm_usage,
                       with_server_timing)

log = logging.getLogger("api_token_exporter")

ENVIRON_TOKEN = "api_token_exporter.token"
ENVIRON_ROUTE = "api_token_exporter.route"


_END = object()
_CONTENT_LENGTH = frozenset(("Content-Length", "content-length", "CONTENT-LENGTH"))
_CONTENT_TYPE = frozenset(("Content-Type", "content-type", "CONTENT-TYPE"))


class _Call:
    """One request through the middleware: the wrapped start_response, the response iterable
    that records the request, and the context record_llm_usage() reads.

    The call stays the current request (a context variable) from the app's call until the
    body is finished, so record_llm_usage() works inside a streamed body too. A body of known
    length is recorded just before its last chunk goes out (one chunk of look-ahead), so a
    client that has the whole response and then scrapes finds it counted; a streamed body (no
    Content-Length) is recorded when it ends, never held back a chunk."""

    __slots__ = ("analytics", "core", "environ", "start_response", "key", "llm_token", "started",
                 "extra_headers", "code", "headers", "result", "capture", "llm_recorded", "done",
                 "sized", "context")

    def __init__(self, analytics, environ, start_response, key, llm_token, started, extra_headers, capture):
        self.analytics, self.core, self.environ, self.start_response = analytics, analytics.core, environ, start_response
        self.key, self.llm_token, self.started, self.extra_headers = key, llm_token, started, extra_headers
        self.capture, self.code, self.headers, self.result = capture, 500, (), None
        self.llm_recorded = self.done = self.sized = False

    def start(self, status, headers, exc_info=None):
        try:
            code = self.code = int(status[:3])
        except (ValueError, TypeError):
            code = self.code = 500
        self.headers = headers
        limits = False
        for name, value in headers:
            if name in _CONTENT_LENGTH:
                self.sized = True
            elif name in _CONTENT_TYPE:
                if self.capture is not None and not carries_usage(value):
                    self.capture = None
            elif name[:1] in "xX":
                limits = True                # perhaps the app's X-RateLimit-*
        analytics = self.analytics
        flask_request = analytics._flask_request
        if flask_request is not None:        # Flask calls this inside its request context
            ctx = flask_request.get(None)
            if ctx is not None:
                rule = ctx.request.url_rule
                if rule is not None:
                    route = rule.rule
                    analytics.known_routes.add(route)     # a route the app has, even if added late
                    self.environ[ENVIRON_ROUTE] = route
                else:
                    self.environ[ENVIRON_ROUTE] = UNMATCHED_ROUTE
        if (limits or code == 429) and self.llm_token is not None and analytics.settings.observe_only:
            self.core.observe_upstream_limits(self.llm_token, headers, code)
        if self.extra_headers:
            headers = [*headers, *self.extra_headers]
        return self.start_response(status, headers, exc_info)

    def __iter__(self):
        chunks = iter(self.result)
        capture = self.capture
        if not self.sized:                   # streamed: recorded at close()
            if capture is None:
                yield from chunks
            else:
                for chunk in chunks:
                    capture.add(chunk)
                    yield chunk
            return
        pending = next(chunks, _END)
        while pending is not _END:
            if capture is not None:
                capture.add(pending)
            following = next(chunks, _END)
            if following is _END:
                self.finish()
            yield pending
            pending = following
        if not self.done:                    # no chunk at all
            self.finish()

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        leave(self.context)
        self.context = None
        try:
            self.analytics._record(self.environ, self.key, self.code, self.started)
            capture = self.capture
            if capture is not None and not self.llm_recorded and capture.complete:
                capture_llm_usage(self.core, self.llm_token, self.headers, capture.body())
        except Exception:                    # counting must never break the app's response
            log.exception("request not recorded")

    def close(self):
        try:
            close = getattr(self.result, "close", None)
            if close is not None:
                close()
        finally:
            if not self.done:
                self.finish()


def current_token() -> Optional[str]:
    """The id of the API token of the request being handled, or None."""
    call = current_call()
    return call.llm_token if call is not None else None


def json_response(start_response, code: int, body: dict,
                  headers: Iterable[Tuple[str, str]] = ()) -> List[bytes]:
    from http import HTTPStatus
    payload = json.dumps(body).encode("utf-8")
    start_response(f"{code} {HTTPStatus(code).phrase}",
                   [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
                   + list(headers))
    return [payload]


class TokenAnalytics:
    def __init__(self, app=None, *, settings: Optional[Settings] = None,
                 config_file: Optional[str] = None, routes: Optional[List[str]] = None,
                 keystore: Optional[KeyStore] = None, admin_views=None, **overrides):
        self.settings = settings or load_settings(config_file, **overrides)
        s = self.settings
        core = self.core = UsageCore(s, keystore)
        self.keystore, self.metrics, self.view, self.tracker = (core.keystore, core.metrics,
                                                                core.view, core.tracker)
        self._key_environ = "HTTP_" + s.header_name.upper().replace("-", "_")
        self._exempt = set(s.exempt_paths)
        self._trusted_proxies = parse_trusted_proxies(s.trusted_proxies)
        self._client_of = functools.partial(client_ip, trusted_proxies=self._trusted_proxies)   # of an environ
        # bound once: matching a path then costs no environ parsing per request
        self._route_adapter = Map([Rule(r) for r in routes]).bind("localhost") if routes else None
        self.buffered_body_bytes = max(s.ingest_max_bytes, 1 << 20) + 1   # read before the app runs (bridge.py)
        self.known_routes = core.metrics.known_routes     # the app's routes: a flood cannot push them out
        self.known_routes.update(routes or ())
        self._route_adapter_source = None
        self._flask_request = None     # Flask's request context variable, once init_app ran
        self._metrics_server = None
        # on an API's own port, metrics (token names, tenants) are for Prometheus only
        self.endpoints, self._internal_paths, self._internal_prefixes = build_endpoints(
            self.core, serve_metrics=s.metrics_port is None, health=app is None,
            anonymous_metrics=app is None or s.metrics_public, admin_views=admin_views)
        self.app = None
        if app is not None:
            if hasattr(app, "url_map") and hasattr(app, "wsgi_app"):
                self.init_app(app)
            else:
                self.app = app
        if s.metrics_port is not None:
            self.start_metrics_server(s.metrics_port, s.metrics_addr)

    # -- wiring ------------------------------------------------------------------------------
    def init_app(self, flask_app) -> "TokenAnalytics":
        """Flask: wrap ``app.wsgi_app`` and label requests by Flask's own route templates."""
        self.app = flask_app.wsgi_app
        flask_app.wsgi_app = self
        self._route_adapter_source = flask_app.url_map
        self.known_routes.update(rule.rule for rule in flask_app.url_map.iter_rules())
        flask_app.extensions["api_token_exporter"] = self

        from flask.globals import _cv_request
        self._flask_request = _cv_request
        return self

    def start_metrics_server(self, port: int, addr: str = "127.0.0.1"):
        """Serve /metrics (with the same auth) on its own port, in a daemon thread."""
        self._metrics_server = serve_metrics_port(self.core, port, addr)
        return self._metrics_server

    def stop(self) -> None:
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server = None

    # -- request path ------------------------------------------------------------------------
    def route_template(self, environ) -> str:
        """The route template a request is labelled with (the proxy and Flask may set it)."""
        route = environ.get(ENVIRON_ROUTE)
        if route:
            return route
        try:
            if self._route_adapter is not None:
                rule, _ = self._route_adapter.match(environ.get("PATH_INFO", "/"),
                                                    environ.get("REQUEST_METHOD", "GET"), return_rule=True)
            elif self._route_adapter_source is not None:   # Flask, for requests refused before it
                rule, _ = self._route_adapter_source.bind_to_environ(environ).match(return_rule=True)
            else:
                return UNMATCHED_ROUTE
            return rule.rule
        except HTTPException:
            return UNMATCHED_ROUTE
        except Exception:  # a malformed path must not break the request
            return UNMATCHED_ROUTE

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path in self._internal_paths or self._internal_prefixes and path.startswith(self._internal_prefixes):
            return self.endpoints(environ, start_response)
        if self.app is None:
            return json_response(start_response, 404, {"detail": "Not found"})
        if path in self._exempt:
            return self.app(environ, start_response)

        started = time.perf_counter()
        key, llm_token, refusal, headers = admit(self.core, environ.get(self._key_environ),
                                                 self.settings.observe_only, self._client_of, environ)
        if self.settings.server_timing:
            headers = with_server_timing(started, headers, refusal)
        if refusal is not None:
            body = json_response(start_response, refusal.code, refusal.body(), refusal.headers)
            self._record(environ, key, refusal.code, started)
            return body

        environ[ENVIRON_TOKEN] = llm_token
        call = _Call(self, environ, start_response, key, llm_token, started, headers,
                     BodyCapture(self.settings.capture_max_bytes)       # dropped at start() for a type without usage
                     if llm_token is not None and self.settings.capture_llm_usage else None)
        call.context = CURRENT.set(call)       # left when the body is finished
        try:
            call.result = self.app(environ, call.start)
        except BaseException:
            leave(call.context)
            call.context = None
            self._record(environ, key, 500, started)
            raise
        return call

    def _record(self, environ, key: Optional[ApiKey], code: int, started: float) -> None:
        core = self.core
        core.record_request(key.id if key is not None else None,
                            self.route_template(environ),
                            environ.get("REQUEST_METHOD", "GET"), code, time.perf_counter() - started)
        if key is not None and core.countries is not None:
            core.record_country(key.id, client_ip(environ, self._trusted_proxies))

    def count_llm(self, token: str, usage: LLMUsage) -> LLMUsage:
        return self.core.count_llm(token, usage)


__all__ = ["TokenAnalytics", "record_llm_usage", "current_token", "mask_key", "json_response"]
