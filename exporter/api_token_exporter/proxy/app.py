"""`api-token-exporter proxy`: a reverse proxy in front of one upstream API that holds a pool of
upstream credentials.

    application = create_proxy(upstream_pool_file="pool.yml", keys_file="keys.yml")
    gunicorn 'api_token_exporter.proxy.app:app_from_env()'      # settings from ATE_* variables

Clients authenticate with this project's API keys (``header_name``, or ``Authorization:
Bearer <key>`` as the OpenAI and GitHub SDKs send it). The proxy app is wrapped in
TokenAnalytics, so auth errors, rate limits, headers, metrics and LLM usage capture are the
middleware's own, recorded through the one core; only authenticated requests reach the code
below, which sends an upstream credential from the pool instead of the client's key (never
forwarded, nor any header carrying it). Bodies stream both ways (urllib3, pooled
connections, one chunk at a time); hop-by-hop headers are dropped; a request whose body fits
``retry_body_max_bytes`` is retried on another credential when the upstream refuses the
credential (401, 429).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import urllib.parse
from http import HTTPStatus
from typing import Dict, List, Optional, Tuple

from . import upstream_limits as ul
from ..core.config import ConfigError, Settings, load_settings, optional_import
from .pool import CredentialPool, load_pool
from ..core.metrics import UNMATCHED_ROUTE
from ..web.wsgi import ENVIRON_ROUTE, ENVIRON_TOKEN, TokenAnalytics, json_response

log = logging.getLogger("api_token_exporter")

HOP_BY_HOP = frozenset(("connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                        "trailer", "trailers", "transfer-encoding", "upgrade", "proxy-connection"))
CHUNK = 65536
POOL_PATHS = ("/admin/pool/token-details", "/admin/pool/stats")
LLM_PROVIDERS = ("openai", "anthropic")
CAPTURABLE_ENCODINGS = ("gzip", "x-gzip", "deflate", "identity")


def _header_name(environ_key: str) -> str:
    return environ_key[5:].replace("_", "-").title()


def _accept_capturable(value: str) -> Optional[str]:
    """Accept-Encoding without the codings the LLM capture cannot read (br, zstd): a client
    must take any coding it offered, so offering fewer is always allowed."""
    kept = [part.strip() for part in value.split(",")
            if part.split(";", 1)[0].strip().lower() in CAPTURABLE_ENCODINGS]
    return ", ".join(kept) or None


class _Body:
    """The upstream body, passed on as it arrives. Fully read: the connection goes back to the
    pool; abandoned (the client went away): it is closed, never reused half-read."""

    __slots__ = ("resp", "done", "cred")

    def __init__(self, resp, cred):
        self.resp, self.cred, self.done = resp, cred, False

    def __iter__(self):
        read = self.resp.read1
        try:
            while True:
                chunk = read(CHUNK, decode_content=False)
                if not chunk:
                    self.done = True
                    return
                yield chunk
        except Exception as exc:      # the client must see a broken body, not a complete one
            log.warning("upstream body broke off (credential %s): %s", self.cred.id, type(exc).__name__)
            raise

    def close(self):
        if self.done:
            self.resp.release_conn()
        else:
            self.resp.close()


class UpstreamApp:
    """The WSGI app TokenAnalytics wraps: it answers only requests the middleware authenticated
    (``/healthz`` aside), and never forwards one without."""

    def __init__(self, settings: Settings, pool_config):
        urllib3 = optional_import("urllib3", "proxy", "The proxy")
        self.settings = settings
        self.config = pool_config
        parts = urllib.parse.urlsplit(pool_config.upstream)
        self.base_path = parts.path.rstrip("/")
        self.provider = pool_config.provider
        self.http = urllib3.connection_from_url(
            pool_config.upstream, maxsize=settings.upstream_max_connections, block=False, retries=False,
            timeout=urllib3.Timeout(connect=settings.upstream_connect_timeout, read=settings.upstream_read_timeout))
        self._errors = urllib3.exceptions
        key_header = settings.header_name.lower()
        self._key_environ = "HTTP_" + settings.header_name.upper().replace("-", "_")
        self._drop = HOP_BY_HOP | {"host", "authorization", "content-length", "expect", key_header,
                                   "x-api-key"} | {c.header.lower() for c in pool_config.credentials}
        self._capture = settings.capture_llm_usage
        self._forward_limits = pool_config.forward_rate_limit_headers
        self.pool: Optional[CredentialPool] = None
        self.analytics: Optional[TokenAnalytics] = None

    def bind(self, pool: CredentialPool, analytics: TokenAnalytics) -> None:
        self.pool, self.analytics = pool, analytics

    # -- the request ---------------------------------------------------------------------------
    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "") or "/"
        token = environ.get(ENVIRON_TOKEN)
        if token is None:
            if path == "/healthz":
                return self.health(start_response)
            return json_response(start_response, 404, {"detail": "Not found"})
        if any(seg in (".", "..") for seg in path.split("/")):
            return json_response(start_response, 400, {"detail": "Paths with . or .. segments are not forwarded"})
        method = environ.get("REQUEST_METHOD", "GET")
        route = self.analytics.route_template(environ)
        environ[ENVIRON_ROUTE] = route                 # the middleware labels with it, no second match
        endpoint = route if route != UNMATCHED_ROUTE else path
        try:
            headers = self._request_headers(environ)
            body, replayable, chunked = self._request_body(environ, headers)
        except (OSError, ValueError) as exc:
            return json_response(start_response, 400, {"detail": f"Request body could not be read ({type(exc).__name__})"})
        url = self.base_path + self._target(environ, path)
        resources = ul.resources_for(self.provider, method, path, self.config.rate_limit_headers)
        tried: List[str] = []
        pool = self.pool
        verdict = None
        for _ in range(len(pool.credentials)):
            cred = pool.acquire(resources, exclude=tried)
            if cred is None:
                break
            tried.append(cred.id)
            name, value = cred.auth()
            headers[name] = value
            try:
                resp = self.http.urlopen(method, url, body=body, headers=headers, redirect=False, retries=False,
                                         preload_content=False, decode_content=False, assert_same_host=False,
                                         chunked=chunked)
            except self._errors.HTTPError as exc:
                pool.failure(cred, endpoint, token)
                timeout = (isinstance(exc, self._errors.TimeoutError)      # refused is not a timeout,
                           and not isinstance(exc, self._errors.NewConnectionError))  # though urllib3 says so
                log.warning("upstream request with credential %s failed: %s", cred.id, type(exc).__name__)
                if timeout:
                    return json_response(start_response, 504, {
                        "detail": f"The upstream did not answer within {self.settings.upstream_read_timeout:g} s"})
                return json_response(start_response, 502, {"detail": f"The upstream could not be reached ({type(exc).__name__})"})
            verdict = pool.observe(cred, resp.status, resp.headers, resources, endpoint, token)
            if verdict == "ok":
                return self._respond(resp, cred, start_response)
            resp.close()                               # a refusal: not the client's answer
            if not replayable:
                break
        return self._exhausted(start_response, resources, verdict if tried and not replayable else None)

    def _target(self, environ, path: str) -> str:
        """The path and query as the client sent them (percent-encoding kept)."""
        raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
        if raw and raw.startswith("/"):
            return raw
        query = environ.get("QUERY_STRING")
        target = urllib.parse.quote(path.encode("latin-1"), safe="/:@!$&'()*+,;=-._~%")
        return f"{target}?{query}" if query else target

    def _request_headers(self, environ) -> Dict[str, str]:
        drop = self._drop
        connection = environ.get("HTTP_CONNECTION")
        if connection:
            drop = drop | {t.strip().lower() for t in connection.split(",")}
        secret = environ.get(self._key_environ) or ""
        headers: Dict[str, str] = {}
        for key, value in environ.items():
            if not key.startswith("HTTP_"):
                continue
            name = _header_name(key)
            if name.lower() in drop or (secret and secret in value):
                continue                                   # the client's key goes nowhere upstream
            headers[name] = value
        if environ.get("CONTENT_TYPE"):
            headers["Content-Type"] = environ["CONTENT_TYPE"]
        if self._capture and "Accept-Encoding" in headers:
            kept = _accept_capturable(headers.pop("Accept-Encoding"))
            if kept:
                headers["Accept-Encoding"] = kept
        if self.provider == "github" and "User-Agent" not in headers:
            headers["User-Agent"] = "api-token-exporter-proxy"     # GitHub refuses requests without one
        return headers

    def _request_body(self, environ, headers) -> Tuple[object, bool, bool]:
        """(body, replayable, chunked): kept in memory up to retry_body_max_bytes, so another
        credential can be tried; larger bodies stream through once."""
        stream = environ.get("wsgi.input")
        limit = self.config.retry_body_max_bytes
        length = environ.get("CONTENT_LENGTH")
        if length:
            n = int(length)
            if n < 0:
                raise ValueError("negative Content-Length")
            if n == 0:
                return None, True, False
            headers["Content-Length"] = str(n)
            if n <= limit:
                data = stream.read(n)
                if len(data) != n:
                    raise ValueError("body shorter than its Content-Length")
                return data, True, False
            return _read_input(stream, n), False, False
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        if not chunked or stream is None:
            return None, True, False
        first = stream.read(limit + 1)
        if len(first) <= limit:
            if first:
                headers["Content-Length"] = str(len(first))
            return (first or None), True, False
        return _chain(first, _read_input(stream, None)), False, True

    def _respond(self, resp, cred, start_response):
        drop = HOP_BY_HOP
        connection = resp.headers.get("Connection")
        if connection:
            drop = drop | {t.strip().lower() for t in connection.split(",")}
        forward = self._forward_limits
        headers = [(k, v) for k, v in resp.headers.items()
                   if k.lower() not in drop and (forward or not ul.is_rate_limit_header(k))]
        reason = resp.reason or _phrase(resp.status)
        start_response(f"{resp.status} {reason}", headers)
        return _Body(resp, cred)

    def _exhausted(self, start_response, resources, verdict: Optional[str]):
        now = self.pool.clock()
        if verdict == "invalid":           # a streamed body cannot be sent again
            return json_response(start_response, 502, {
                "detail": "The upstream refused the proxy's credential and the request's body was too large "
                          "to try another one"})
        retry = self.pool.retry_at(resources, now)
        if retry is None:
            return json_response(start_response, 503, {
                "detail": "No upstream credential of the proxy is valid: the upstream refuses all of them"})
        wait = max(1, math.ceil(retry - now))
        return json_response(start_response, 429, {
            "detail": f"Every upstream credential of the proxy is rate limited. Try again in {wait} seconds"},
            [("Retry-After", str(wait))])

    def health(self, start_response):
        now = self.pool.clock()
        statuses = [self.pool.status(c.id, now) for c in self.pool.credentials]
        usable = statuses.count("active")
        keystore = self.analytics.keystore
        return json_response(start_response, 200, {
            "status": "ok" if usable and keystore.healthy else "degraded",
            "keys": len(keystore), "key_file_error": keystore.last_error,
            "upstream": {"credentials": len(statuses), **{s: statuses.count(s) for s in sorted(set(statuses))}}})

    # -- GitHub's free GET /rate_limit, for idle credentials -------------------------------
    def fetch_rate_limit(self, cred):
        name, value = cred.auth()
        resp = self.http.urlopen("GET", self.base_path + "/rate_limit", retries=False, redirect=False,
                                 headers={name: value, "User-Agent": "api-token-exporter-proxy",
                                          "Accept": "application/vnd.github+json"})
        return resp.status, resp.headers, resp.data

    def close(self) -> None:
        self.http.close()


def _read_input(stream, remaining: Optional[int]):
    while remaining is None or remaining > 0:
        data = stream.read(CHUNK if remaining is None else min(CHUNK, remaining))
        if not data:
            if remaining:
                raise ValueError("body shorter than its Content-Length")
            return
        if remaining is not None:
            remaining -= len(data)
        yield data


def _chain(first: bytes, rest):
    yield first
    yield from rest


def _phrase(code: int) -> str:
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return ""


class _BearerKey:
    """Takes the API key from ``Authorization: Bearer <key>`` when the key header is absent,
    so SDKs that only know bearer tokens (OpenAI's, GitHub's) work unchanged."""

    def __init__(self, app, key_environ: str):
        self.app, self.key_environ = app, key_environ

    def __call__(self, environ, start_response):
        if self.key_environ not in environ:
            auth = environ.get("HTTP_AUTHORIZATION")
            if auth and auth[:7].lower() == "bearer " and not environ.get("PATH_INFO", "").startswith("/admin/"):
                environ[self.key_environ] = auth[7:].strip()
        return self.app(environ, start_response)


class ProxyApp:
    """The proxy as one WSGI callable: ``.pool``, ``.analytics`` (TokenAnalytics), ``.close()``."""

    def __init__(self, settings: Optional[Settings] = None, pool_config=None, **overrides):
        settings = settings or load_settings(**overrides)
        if settings.observe_only:
            raise ConfigError("observe_only does not apply to the proxy: it authenticates and limits every request")
        if pool_config is None:
            if not settings.upstream_pool_file:
                raise ConfigError("the proxy needs upstream_pool_file (--pool, ATE_UPSTREAM_POOL_FILE)")
            pool_config = load_pool(settings.upstream_pool_file, upstream=settings.upstream_url)
        if any(c.provider in LLM_PROVIDERS for c in pool_config.credentials):
            settings = dataclasses.replace(settings, capture_llm_usage=True)   # usage under the client's token
        self.settings = settings
        self.upstream = UpstreamApp(settings, pool_config)
        self.analytics = TokenAnalytics(self.upstream, settings=settings, routes=pool_config.routes or None,
                                        admin_views={POOL_PATHS[0]: lambda: self.pool.token_details(),
                                                     POOL_PATHS[1]: lambda: self.pool.stats()})
        self.pool = CredentialPool(pool_config, metrics=self.analytics.metrics)
        self.upstream.bind(self.pool, self.analytics)
        self._app = _BearerKey(self.analytics, "HTTP_" + settings.header_name.upper().replace("-", "_"))
        # bodies another credential may be tried with are read whole before a thread is taken
        self.buffered_body_bytes = pool_config.retry_body_max_bytes + 1
        self._pid = None
        self._lock = threading.Lock()

    def __call__(self, environ, start_response):
        if self._pid != os.getpid():
            self.begin()
        return self._app(environ, start_response)

    def begin(self) -> None:
        """The pool's upkeep thread, in this process: it asks idle GitHub credentials for their
        limits at once, so the pool's figures are there before the first request. The serving
        worker calls it once it has loaded the app; elsewhere the first request does. A server
        that loads the app before forking (gunicorn --preload) gets one in every worker and none
        in its master, which never calls the upstream."""
        with self._lock:
            if self._pid != os.getpid():
                self.pool.restart(fetch=self.upstream.fetch_rate_limit)
                self._pid = os.getpid()

    def close(self) -> None:
        self.pool.stop()
        self.analytics.stop()
        self.upstream.close()


def create_proxy(**settings) -> ProxyApp:
    return ProxyApp(**settings)


def app_from_env() -> ProxyApp:
    """The gunicorn factory: settings from ATE_CONFIG and ATE_* variables."""
    return ProxyApp()


__all__ = ["ProxyApp", "create_proxy", "app_from_env", "UpstreamApp"]
