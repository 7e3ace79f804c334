"""The ASGI middleware, for FastAPI, Starlette and any ASGI app: the same API-key auth, rate
limits with headers, metrics, LLM capture and built-in endpoints as the WSGI one, through the
same core.

    from fastapi import FastAPI
    from api_token_exporter.asgi import TokenAnalytics

    app = FastAPI()
    app.add_middleware(TokenAnalytics, keys_file="keys.yml")      # FastAPI / Starlette

    app = TokenAnalytics(asgi_app, keys_file="keys.yml",
                         routes=["/items/<id>"])                  # any ASGI app

A pure ASGI middleware (not Starlette's BaseHTTPMiddleware): it wraps ``send`` and passes every
message on as it comes, so streamed bodies are never buffered and the app's context variables
are its own. The request is recorded just before its last body message goes out, so a client
that has the whole answer and then scrapes finds it counted, like the WSGI middleware does.

- Route labels: the template of the route Starlette matched (``scope["route"].path``); for a
  mounted sub-application, and for requests refused before the app ran, the app's routes are
  matched here (mount paths joined to the route's). ``routes=`` gives werkzeug-style templates
  for apps without Starlette routing. Anything else shares ``__unmatched__``.
- Rate limits: memory storage is called directly (no I/O); Redis through ``redis.asyncio``
  with the script, keys, circuit breaker and failure mode of the WSGI side, one round trip
  per request, so WSGI and ASGI instances share their counts exactly.
- ``record_llm_usage()`` and ``current_token()`` from the package work in async handlers, in
  sync handlers (Starlette copies the context to its thread pool), in streamed bodies and in
  the request's background tasks. For FastAPI, ``Depends(current_token)`` from this module gives
  the request's ApiKey; ``request.state.api_key`` holds it too.
- Lifespan: start-up opens the Redis connection of the serving event loop and loads the script;
  shutdown closes it, stops the metrics_port server and the key file watcher. An app that does
  not speak lifespan still works: the connection is then opened on the first request.
- The built-in endpoints (/metrics, /admin/*, the ingest and analytics endpoints) are the WSGI
  ones, run in a worker thread, so a large scrape never blocks the event loop.
- WebSocket connections pass through untouched.

Needs an asyncio event loop (uvicorn, hypercorn's asyncio worker, gunicorn with uvicorn's
worker).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Dict, List, Optional, Tuple

from werkzeug.routing import Map, Rule

from ..core.config import Settings, load_settings
from ..core.recording import UsageCore
from ..core.geo import client_ip, parse_trusted_proxies
from ..core.keystore import ApiKey, KeyStore
from ..core.metrics import UNMATCHED_ROUTE
from .bridge import call_wsgi, send_answer, wsgi_environ
from .endpoints import build_endpoints, serve_metrics_port
from .pipeline import (CURRENT, BodyCapture, admit, admit_async, capture_llm_usage, current_call, leave,
                       record_llm_usage, with_server_timing)

log = logging.getLogger("api_token_exporter")

STREAM_SEND_TIMEOUT = 30.0  # a client that takes no chunk of a live stream for this long is dropped
CANCELLED = 499            # the request's task was cancelled before an answer (client went away)
_JSON = (b"content-type", b"application/json")
_NAMES: Dict[str, bytes] = {}


def _encode(headers: List[Tuple[str, str]]) -> List[Tuple[bytes, bytes]]:
    """(str, str) header pairs as ASGI wants them: lower-case names, latin-1 values."""
    names = _NAMES
    return [(names.get(name) or _encoded_name(name), value.encode("latin-1")) for name, value in headers]


def _encoded_name(name: str) -> bytes:
    encoded = _NAMES[name] = name.lower().encode("latin-1")
    return encoded


def route_path(scope, root: Optional[str] = None) -> str:
    """The path the app routes on: ``path`` without the ``root_path`` a server or a mount put
    in front of it (as Starlette reads it)."""
    path = scope["path"]
    if root is None:
        root = scope.get("root_path", "")
    if root and path.startswith(root):
        if path == root:
            return ""
        if path[len(root)] == "/":
            return path[len(root):]
    return path


class _Request:
    """One request through the middleware: the wrapped ``send`` and the context that
    record_llm_usage() reads (the attributes it shares with the WSGI middleware's call)."""

    __slots__ = ("analytics", "core", "scope", "send_", "key", "llm_token", "started", "root_path",
                 "extra_headers", "code", "headers", "capture", "llm_recorded", "done",
                 "response_started")

    def __init__(self, analytics, scope, send, key, llm_token, started, root_path, extra_headers):
        self.analytics, self.core, self.scope, self.send_ = analytics, analytics.core, scope, send
        self.key, self.llm_token, self.started, self.root_path = key, llm_token, started, root_path
        self.extra_headers = extra_headers
        self.code, self.headers = 500, ()
        self.capture = None
        self.llm_recorded = self.done = self.response_started = False

    async def send(self, message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.response_started = True
            self.code = message["status"]
            headers = self.headers = message.get("headers") or ()
            if self.extra_headers:
                message = dict(message)
                message["headers"] = [*headers, *self.extra_headers]
            if self.llm_token is not None and self.analytics.settings.observe_only:
                self.analytics._observe_upstream_limits(self.llm_token, headers, self.code)
        elif kind == "http.response.body":
            if self.capture is not None:
                self.capture.add(message.get("body", b""))
            if not message.get("more_body", False):
                self.finish()                # counted before the last chunk goes out
        elif kind == "http.response.pathsend":    # a file sent by the server: the whole body
            self.finish()
        await self.send_(message)

    def finish(self, code: Optional[int] = None) -> None:
        if self.done:
            return
        self.done = True
        if code is not None:
            self.code = code
        try:
            self.analytics._finish(self)
        except Exception:                    # counting must never break the app's response
            log.exception("request not recorded")


class TokenAnalytics:
    """ASGI middleware: ``app.add_middleware(TokenAnalytics, **settings)`` in FastAPI and
    Starlette, or ``TokenAnalytics(asgi_app, **settings)``. Settings as for the WSGI
    middleware (keyword arguments, ``config_file``, ATE_* variables)."""

    def __init__(self, app, *, settings: Optional[Settings] = None, config_file: Optional[str] = None,
                 routes: Optional[List[str]] = None, keystore: Optional[KeyStore] = None, **overrides):
        if app is None:
            raise TypeError("TokenAnalytics (ASGI) wraps an app; the exporter service without an "
                            "API of its own is `api-token-exporter serve`")
        self.app = app
        self.settings = settings or load_settings(config_file, **overrides)
        s = self.settings
        core = self.core = UsageCore(s, keystore)
        self._own_keystore = keystore is None          # a key store given to us is not ours to stop
        self.keystore, self.metrics, self.view, self.tracker = (core.keystore, core.metrics,
                                                                core.view, core.tracker)
        self._key_header = s.header_name.lower().encode("latin-1")
        self._exempt = frozenset(s.exempt_paths)
        self._trusted_proxies = parse_trusted_proxies(s.trusted_proxies)
        self._route_adapter = Map([Rule(r) for r in routes]).bind("localhost") if routes else None
        core.metrics.known_routes.update(routes or ())  # a flood cannot push them out
        self._routes = None                  # the app's Starlette routes, found on first need
        self._metrics_server = None
        self.endpoints, self._internal_paths, self._internal_prefixes = build_endpoints(
            core, serve_metrics=s.metrics_port is None, anonymous_metrics=s.metrics_public)
        self._endpoint_body_limit = max(s.ingest_max_bytes, 65536) + 1
        if s.metrics_port is not None:
            self.start_metrics_server(s.metrics_port, s.metrics_addr)

    # -- wiring ------------------------------------------------------------------------------
    def start_metrics_server(self, port: int, addr: str = "127.0.0.1"):
        """Serve /metrics (with the same auth) on its own port, in a daemon thread, as the
        WSGI middleware does (the first worker to bind serves the sum of all of them)."""
        self._metrics_server = serve_metrics_port(self.core, port, addr)
        return self._metrics_server

    async def startup(self) -> None:
        """Lifespan start-up: open the Redis connection of this event loop, load the script."""
        await self.core.limiter.open_async()

    async def shutdown(self) -> None:
        """Lifespan shutdown: close the Redis connections, stop the metrics_port server and the
        key file watcher (of a key store it made). Counts are already in the store (its file,
        with state_dir)."""
        try:
            await self.core.limiter.aclose()
        except Exception:
            log.warning("closing the rate-limit storage connection failed", exc_info=True)
        self.stop()

    def stop(self) -> None:
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server = None
        if self._own_keystore:
            self.keystore.stop_watching()

    async def _lifespan(self, scope, receive, send) -> None:
        async def receive_():
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.startup()
            return message

        async def send_(message):
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                await self.shutdown()        # after the app's own shutdown
            await send(message)

        await self.app(scope, receive_, send_)

    # -- request path ------------------------------------------------------------------------
    async def __call__(self, scope, receive, send) -> None:
        kind = scope["type"]
        if kind != "http":
            if kind == "lifespan":
                return await self._lifespan(scope, receive, send)
            return await self.app(scope, receive, send)
        path = route_path(scope)
        if path in self._internal_paths or self._internal_prefixes and path.startswith(self._internal_prefixes):
            return await self._endpoint(scope, receive, send, path)
        if path in self._exempt:
            return await self.app(scope, receive, send)

        started = time.perf_counter()
        raw = None
        name = self._key_header
        for header, value in scope["headers"]:
            if header == name:
                raw = value.decode("latin-1")
                break
        core, observe = self.core, self.settings.observe_only
        if core.limiter.shared and not observe:      # Redis, asked without blocking the loop
            key, llm_token, refusal, headers = await admit_async(core, raw, observe, self._client, scope, True)
        else:                                        # no I/O: no coroutine to make and await
            key, llm_token, refusal, headers = admit(core, raw, observe, self._client, scope, True)
        if self.settings.server_timing:
            headers = with_server_timing(started, headers, refusal, True)
        if refusal is not None:
            return await self._refuse(scope, send, key, started, refusal)

        state = scope.get("state")
        if state is None:
            state = scope["state"] = {}
        state["api_key"] = key if llm_token is not None else None
        call = _Request(self, scope, send, key, llm_token, started, scope.get("root_path", ""),
                        headers or None)
        if llm_token is not None and self.settings.capture_llm_usage:
            call.capture = BodyCapture(self.settings.capture_max_bytes)
        context = CURRENT.set(call)          # background tasks run inside the app call too
        try:
            await self.app(scope, receive, call.send)
        except asyncio.CancelledError:
            call.finish(None if call.response_started else CANCELLED)
            raise
        except BaseException:
            call.finish(None if call.response_started else 500)
            raise
        finally:
            leave(context)
        if not call.done:                    # the client left mid-body, or no answer at all
            call.finish(None if call.response_started else 500)

    async def _refuse(self, scope, send, key, started: float, refusal) -> None:
        body = json.dumps(refusal.body()).encode("utf-8")
        self._record(scope, key, refusal.code, started, scope.get("root_path", ""))
        await send({"type": "http.response.start", "status": refusal.code,
                    "headers": [_JSON, (b"content-length", str(len(body)).encode()), *_encode(refusal.headers)]})
        await send({"type": "http.response.body", "body": body})

    def _finish(self, call: _Request) -> None:
        self._record(call.scope, call.key, call.code, call.started, call.root_path)
        capture = call.capture
        if capture is not None and not call.llm_recorded and capture.complete:
            capture_llm_usage(self.core, call.llm_token,
                              [(n.decode("latin-1"), v.decode("latin-1")) for n, v in call.headers], capture.body())

    def _record(self, scope, key: Optional[ApiKey], code: int, started: float, root_path: str) -> None:
        core = self.core
        core.record_request(key.id if key is not None else None, self._route(scope, root_path),
                            scope.get("method", "GET"), code, time.perf_counter() - started)
        if key is not None and core.countries is not None:
            core.record_country(key.id, self._client(scope))

    def _observe_upstream_limits(self, token_id: str, headers, code: int) -> None:
        pairs = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in headers
                 if n[:12].lower() == b"x-ratelimit-"]
        if pairs or code == 429:
            self.core.observe_upstream_limits(token_id, pairs, code)

    def count_llm(self, token, usage):
        return self.core.count_llm(token, usage)

    def _client(self, scope) -> str:
        client = scope.get("client")
        environ = {"REMOTE_ADDR": client[0] if client else None}
        if self._trusted_proxies:
            forwarded = [v.decode("latin-1") for n, v in scope["headers"] if n == b"x-forwarded-for"]
            environ["HTTP_X_FORWARDED_FOR"] = ",".join(forwarded)
        return client_ip(environ, self._trusted_proxies)

    # -- route templates ---------------------------------------------------------------------
    def _route(self, scope, root_path: str) -> str:
        """The route template of a request. ``root_path`` is the one it came in with: a
        changed one means a mount matched, whose path is found by matching the routes here."""
        route = scope.get("route")
        if route is not None and scope.get("root_path", "") == root_path:
            path = getattr(route, "path", None)
            if isinstance(path, str) and path:
                return path
        try:
            if self._route_adapter is not None:
                rule, _ = self._route_adapter.match(route_path(scope, root_path),
                                                    scope.get("method", "GET"), return_rule=True)
                return rule.rule
            routes = self._starlette_routes()
            if routes:
                return _match(routes, {**scope, "root_path": root_path}, "") or UNMATCHED_ROUTE
        except Exception:                    # no match (werkzeug raises), or a malformed path
            pass
        return UNMATCHED_ROUTE

    def _starlette_routes(self):
        """The routes of the app this middleware wraps: the app itself (FastAPI, Starlette), or
        the router at the end of the middleware chain (add_middleware). Found once; the live
        list, so routes added later are seen."""
        routes = self._routes
        if routes is None:
            app = self.app
            for _ in range(64):
                if app is None or hasattr(app, "routes"):
                    break
                app = getattr(app, "app", None)
            routes = getattr(app, "routes", None) if app is not None else None
            if not isinstance(routes, list):
                return None
            self._routes = routes
        return routes

    # -- the built-in endpoints ----------------------------------------------------------------
    async def _endpoint(self, scope, receive, send, path: str) -> None:
        """The WSGI endpoints app, called in a worker thread with the request's body (at most
        ingest_max_bytes + 1 bytes are read: more is refused by the endpoint)."""
        chunks, size = [], 0
        while size < self._endpoint_body_limit:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)[:self._endpoint_body_limit]
        environ = wsgi_environ(scope, path, body)
        answer = await asyncio.get_running_loop().run_in_executor(None, call_wsgi, self.endpoints, environ)
        await send_answer(answer, send, receive, STREAM_SEND_TIMEOUT)


def _match(routes, scope, prefix: str) -> Optional[str]:
    """Starlette's routing order over ``routes``: the first full match, else the first partial
    one (a path served with other methods, answered 405); a mount continues in its routes."""
    from starlette.routing import Match
    partial = None
    for route in routes:
        path = getattr(route, "path", None)
        if not isinstance(path, str):
            continue
        match, child = route.matches(scope)
        if match is Match.FULL:
            inner = getattr(route, "routes", None)        # a Mount (or a Router)
            if inner is not None and hasattr(route, "app"):
                found = _match(inner, {**scope, **child}, prefix + path) if inner else None
                return found or prefix + path
            return prefix + path
        if match is Match.PARTIAL and partial is None:
            partial = prefix + path
    return partial


async def current_token() -> Optional[ApiKey]:
    """FastAPI: ``key: ApiKey = Depends(current_token)``, the request's API key (id, name,
    tenant, limits), or None (observe-only mode, an exempt path, outside a request)."""
    call = current_call()
    return call.key if call is not None and call.llm_token is not None else None


__all__ = ["TokenAnalytics", "current_token", "record_llm_usage", "route_path"]
