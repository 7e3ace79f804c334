"""The WSGI middleware and Flask extension: API-key auth, rate limits with headers, metrics.

    app = Flask(__name__)
    TokenAnalytics(app, keys_file="keys.yml")            # Flask: one line

    application = TokenAnalytics(wsgi_app, keys_file="keys.yml",
                                 routes=["/items/<id>"])  # any WSGI app
"""
from __future__ import annotations

import contextvars
import os
import socket
import math
import json
import logging
import threading
import time
from typing import Dict, Iterable, List, Optional, Tuple

from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map, Rule

from ..core.config import Settings, load_settings
from ..core.recording import UsageCore
from ..core.keystore import ApiKey, KeyStore, mask_key
from ..core.metrics import UNMATCHED_ROUTE
from ..core.ratelimit import Decision, StorageUnavailable
from ..core.geo import client_ip, parse_trusted_proxies
from ..core.usage import LLMUsage, UsageError, validate_usage

log = logging.getLogger("api_token_exporter")

ENVIRON_TOKEN = "api_token_exporter.token"
ENVIRON_ROUTE = "api_token_exporter.route"


_END = object()
_CONTENT_LENGTH = frozenset(("Content-Length", "content-length", "CONTENT-LENGTH"))


class _Call:
    """One request through the middleware: the wrapped start_response, the response iterable
    that records the request, and the context record_llm_usage() reads.

    The call stays the current request (a context variable) from the app's call until the
    body is finished, so record_llm_usage() works inside a streamed body too. A body of known
    length is recorded just before its last chunk goes out (one chunk of look-ahead), so a
    client that has the whole response and then scrapes finds it counted; a streamed body (no
    Content-Length) is recorded when it ends, never held back a chunk."""

    __slots__ = ("analytics", "environ", "start_response", "key", "llm_token", "started",
                 "extra_headers", "code", "headers", "result", "capture", "llm_recorded", "done",
                 "sized", "context")

    def __init__(self, analytics, environ, start_response, key, llm_token, started, extra_headers):
        self.analytics, self.environ, self.start_response = analytics, environ, start_response
        self.key, self.llm_token, self.started = key, llm_token, started
        self.extra_headers = extra_headers
        self.code, self.headers = 500, ()
        self.result = self.capture = self.context = None
        self.llm_recorded = self.done = self.sized = False

    def start(self, status, headers, exc_info=None):
        self.code = _status_code(status)
        self.headers = headers
        for name, _ in headers:
            if name in _CONTENT_LENGTH:
                self.sized = True
                break
        analytics = self.analytics
        if analytics._flask_request is not None:   # Flask calls this inside its request context
            ctx = analytics._flask_request.get(None)
            if ctx is not None:
                rule = ctx.request.url_rule
                self.environ[ENVIRON_ROUTE] = rule.rule if rule is not None else UNMATCHED_ROUTE
        if self.llm_token is not None and analytics.settings.observe_only:
            analytics._observe_upstream_limits(self.llm_token, headers, self.code)
        if self.extra_headers:
            headers = list(headers) + self.extra_headers
        return self.start_response(status, headers, exc_info)

    def __iter__(self):
        chunks = iter(self.result)
        if self.sized:
            return self._look_ahead(chunks)
        if self.capture is not None:
            return self._captured(chunks)
        return chunks                        # streamed: recorded at close()

    def _look_ahead(self, chunks):
        capture = self.capture
        pending = next(chunks, _END)
        while pending is not _END:
            if capture is not None:
                capture.add(pending)
            following = next(chunks, _END)
            if following is _END:
                self.finish()
            yield pending
            pending = following
        self.finish()

    def _captured(self, chunks):
        capture = self.capture
        for chunk in chunks:
            capture.add(chunk)
            yield chunk

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        context, self.context = self.context, None
        if context is not None:
            try:
                _current.reset(context)
            except ValueError:               # closed from another context than the call's
                _current.set(None)
        try:
            self.analytics._finish(self)
        except Exception:                    # counting must never break the app's response
            log.exception("request not recorded")

    def close(self):
        try:
            close = getattr(self.result, "close", None)
            if close is not None:
                close()
        finally:
            self.finish()


_current: contextvars.ContextVar[Optional[_Call]] = contextvars.ContextVar(
    "api_token_exporter_request", default=None)

REFUSALS = {
    "missing": (401, "Missing API key"),
    "invalid": (401, "Invalid API key"),
    "inactive": (403, "API key is inactive"),
    "expired": (401, "API key has expired"),
    "rotated": (401, "API key was rotated and its grace period is over: use the new key"),
}


def current_token() -> Optional[str]:
    """The id of the API token of the request being handled, or None."""
    ctx = _current.get()
    return ctx.llm_token if ctx is not None else None


def record_llm_usage(service: str, model: str, input_tokens: int = 0, output_tokens: int = 0,
                     token: Optional[str] = None, *, cached_input_tokens: int = 0,
                     cache_write_tokens: int = 0, reasoning_tokens: int = 0) -> LLMUsage:
    """Count LLM usage (tokens, cost) for the current request's token, or ``token``.

    ``input_tokens`` counts every prompt token and ``output_tokens`` every answer token (OpenAI's
    prompt_tokens and completion_tokens); the cached, cache-write and reasoning tokens are parts
    of them, priced at their own rates. Raises UsageError for bad values, which are then not
    counted at all."""
    ctx = _current.get()
    if ctx is None:
        raise RuntimeError("record_llm_usage() called outside a request handled by TokenAnalytics")
    token = token or ctx.llm_token
    if not token:
        raise UsageError("no API token: call inside an authenticated request or pass token=")
    usage = ctx.analytics.count_llm(token, validate_usage(service, model, input_tokens, output_tokens,
                                                         cached_input_tokens, cache_write_tokens, reasoning_tokens))
    ctx.llm_recorded = True
    return usage


def _status_code(status: str) -> int:
    try:
        return int(status[:3])
    except (ValueError, TypeError):
        return 500


def json_response(start_response, code: int, body: dict,
                  headers: Iterable[Tuple[str, str]] = ()) -> List[bytes]:
    from http import HTTPStatus
    payload = json.dumps(body).encode("utf-8")
    start_response(f"{code} {HTTPStatus(code).phrase}",
                   [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
                   + list(headers))
    return [payload]


class _Capture:
    """The first ``limit`` bytes of a response body, kept while it streams through."""
    __slots__ = ("chunks", "size", "limit")

    def __init__(self, limit: int):
        self.chunks: List[bytes] = []
        self.size = 0
        self.limit = limit

    def add(self, chunk: bytes) -> None:
        if self.size <= self.limit:
            self.chunks.append(chunk)
            self.size += len(chunk)

    @property
    def complete(self) -> bool:
        return self.size <= self.limit

    def body(self) -> bytes:
        return b"".join(self.chunks)


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
        # bound once: matching a path then costs no environ parsing per request
        self._route_adapter = Map([Rule(r) for r in routes]).bind("localhost") if routes else None
        self._route_adapter_source = None
        self._flask_request = None     # Flask's request context variable, once init_app ran
        self._metrics_server = None
        from .endpoints import build_endpoints  # the built-in /metrics and /admin/* endpoints
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
        flask_app.extensions["api_token_exporter"] = self

        from flask.globals import _cv_request
        self._flask_request = _cv_request
        return self

    def start_metrics_server(self, port: int, addr: str = "127.0.0.1"):
        """Serve /metrics (with the same auth) on its own port, in a daemon thread.

        Under a server with several workers only the first to bind serves it (with state_dir
        shared, its answer sums every worker); the others log it once and go on, rather than
        failing to boot again and again."""
        import errno
        from werkzeug.serving import make_server
        from .endpoints import build_endpoints
        open_ = metrics_open_without_credentials(self.settings, addr)
        metrics_app, _, _ = build_endpoints(self.core, serve_metrics=True, admin=False, anonymous_metrics=open_)
        probe = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as the server will
            probe.bind((addr, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            log.warning("metrics_port %s:%d is already in use (another worker of this server, or "
                        "another program): this process (pid %d) does not serve it", addr, port,
                        os.getpid())
            return None
        finally:
            probe.close()
        server = make_server(addr, port, metrics_app, threaded=True)
        thread = threading.Thread(target=server.serve_forever, name="metrics-server", daemon=True)
        thread.start()
        self._metrics_server = server
        return server

    def stop(self) -> None:
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server = None

    # -- request path ------------------------------------------------------------------------
    def _route(self, environ) -> str:
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
        key, reason = self.core.authenticate(environ.get(self._key_environ))
        observe = self.settings.observe_only
        if reason is not None:
            self.core.auth_failure(reason, client_ip(environ, self._trusted_proxies))
            if not observe:
                code, detail = REFUSALS[reason]
                body = json_response(start_response, code, {"detail": detail})
                self._record(environ, key, code, started)
                return body

        extra_headers: List[Tuple[str, str]] = []
        if key is not None and reason is None and not observe:
            now = time.time()
            try:
                decision = self.core.hit(key, now)
            except StorageUnavailable:              # storage_failure_mode: closed
                wait = max(1, math.ceil(self.core.limiter.breaker.backoff))
                body = json_response(start_response, 503, {
                    "detail": "Rate limiting is unavailable, so requests are refused "
                              f"(storage_failure_mode: closed). Try again in {wait} seconds"},
                    [("Retry-After", str(wait))])
                self._record(environ, key, 503, started)
                return body
            if decision is not None:
                extra_headers = rate_limit_headers(decision, now)
                if not decision.allowed:
                    refused = decision.refused_by
                    wait = refused.reset_in(now)
                    body = json_response(start_response, 429, {
                        "detail": f"Rate limit exceeded for {refused.window}. "
                                  f"Try again in {wait} seconds"},
                        extra_headers + [("Retry-After", str(wait))])
                    self._record(environ, key, 429, started)
                    return body

        identified = key is not None and reason is None
        llm_token = key.id if identified else None
        environ[ENVIRON_TOKEN] = llm_token
        call = _Call(self, environ, start_response, key, llm_token, started, extra_headers)
        call.context = _current.set(call)      # reset when the body is finished
        try:
            call.result = self.app(environ, call.start)
        except BaseException:
            _current.reset(call.context)
            call.context = None
            self._record(environ, key, 500, started)
            raise
        if identified and self.settings.capture_llm_usage:
            call.capture = _Capture(self.settings.capture_max_bytes)
        return call

    def _finish(self, call: _Call) -> None:
        self._record(call.environ, call.key, call.code, call.started)
        capture = call.capture
        if capture is not None and not call.llm_recorded and capture.complete:
            self._capture_llm(call.llm_token, call.headers, capture.body())

    def _capture_llm(self, token_id: str, headers, body: bytes) -> None:
        content_type = model_hint = encoding = ""
        for name, value in headers:
            lname = name.lower()
            if lname == "content-type":
                content_type = value
            elif lname == "x-llm-model":
                model_hint = value
            elif lname == "content-encoding":
                encoding = value.strip().lower()
        if encoding in ("gzip", "x-gzip", "deflate"):       # a proxied upstream's compressed answer
            body = _decompressed(body, encoding, self.settings.capture_max_bytes)
            if body is None:
                return
        self.core.capture_llm(token_id, content_type, body, model_hint)

    def _record(self, environ, key: Optional[ApiKey], code: int, started: float) -> None:
        self.core.record_request(key.id if key is not None else None, self._route(environ),
                                 environ.get("REQUEST_METHOD", "GET"), code,
                                 time.perf_counter() - started, key=key)
        if key is not None and self.core.countries is not None:
            self.core.record_country(key.id, client_ip(environ, self._trusted_proxies))

    def _observe_upstream_limits(self, token_id: str, headers, code: int) -> None:
        self.core.observe_upstream_limits(token_id, headers, code)   # observe-only: the app's X-RateLimit-*

    def count_llm(self, token: str, usage: LLMUsage) -> LLMUsage:
        return self.core.count_llm(token, usage)


def _decompressed(body: bytes, encoding: str, limit: int) -> Optional[bytes]:
    """At most ``limit`` bytes of a gzip or deflate body; None if it is broken or larger."""
    import zlib
    wbits = 47 if encoding != "deflate" else 15          # gzip or zlib header; deflate as zlib
    try:
        d = zlib.decompressobj(wbits)
        out = d.decompress(body, limit + 1)
    except zlib.error:
        if encoding != "deflate":
            return None
        try:                                              # raw deflate, as some servers send it
            d = zlib.decompressobj(-15)
            out = d.decompress(body, limit + 1)
        except zlib.error:
            return None
    return out if len(out) <= limit else None


def metrics_open_without_credentials(settings: Settings, addr: str) -> bool:
    """A metrics port may answer without credentials when opened on purpose or only local."""
    return settings.metrics_public or addr in ("127.0.0.1", "::1", "localhost")


_STATIC_HEADERS: Dict[tuple, tuple] = {}


def _static_headers(plan) -> tuple:
    """What a limit plan makes constant: names, limits and the RateLimit-Policy value."""
    static = _STATIC_HEADERS.get(plan)
    if static is None:
        per_window = tuple((f"X-RateLimit-{w.capitalize()}-Limit", str(limit),
                            f"X-RateLimit-{w.capitalize()}-Remaining", f"X-RateLimit-{w.capitalize()}-Reset",
                            f'"{w}";r=') for w, limit, _ in plan)
        policy = ", ".join(f'"{w}";q={limit};w={seconds}' for w, limit, seconds in plan)
        static = _STATIC_HEADERS[plan] = (per_window, ("RateLimit-Policy", policy))
    return static


def rate_limit_headers(decision: Decision, now: float) -> List[Tuple[str, str]]:
    """Seed 002's X-RateLimit-{Window}-{Limit,Remaining,Reset} (Reset in seconds) and the IETF
    draft-ietf-httpapi-ratelimit-headers-10 RateLimit-Policy / RateLimit fields."""
    if not decision.windows:
        return []
    per_window, policy = _static_headers(decision.plan)
    headers: List[Tuple[str, str]] = []
    current = []
    for s, (limit_name, limit, remaining_name, reset_name, item) in zip(decision.windows, per_window):
        reset = str(s.reset_in(now))
        remaining = str(s.remaining)
        headers += ((limit_name, limit), (remaining_name, remaining), (reset_name, reset))
        current.append(f"{item}{remaining};t={reset}")
    headers.append(policy)
    headers.append(("RateLimit", ", ".join(current)))
    return headers


__all__ = ["TokenAnalytics", "record_llm_usage", "current_token", "mask_key"]
