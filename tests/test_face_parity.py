"""Every face answers through one request pipeline (web/pipeline.py): the same requests, sent to
the WSGI middleware, the ASGI middleware and the proxy in front of the same app, get the same
status, body, rate-limit headers and metrics; the analytics API and the console's sign-in refuse
the same keys with the same answers."""
import asyncio
import gzip
import json

import httpx
import pytest
import yaml
from werkzeug.test import Client

from api_token_exporter.core.keystore import rotate_key
from api_token_exporter.proxy.app import ProxyApp
from api_token_exporter.web.asgi import TokenAnalytics as AsgiAnalytics
from api_token_exporter.web.wsgi import TokenAnalytics as WsgiAnalytics
from support import samples, serve_wsgi

USAGE = {"prompt_tokens": 52, "completion_tokens": 17, "total_tokens": 69}
COMPLETION = json.dumps({"id": "c1", "object": "chat.completion", "model": "gpt-4o", "choices": [],
                         "usage": USAGE}).encode()
STREAM = [f"data: {json.dumps(chunk)}\n\n".encode() for chunk in (
    {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o",
     "choices": [{"index": 0, "delta": {"content": "Hi"}}], "usage": None},
    {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o", "choices": [], "usage": USAGE})] + [
    b"data: [DONE]\n\n"]
# path -> (status, headers, body chunks): the app behind both faces
ANSWERS = {
    "/items": (200, [("Content-Type", "application/json")], [b'{"items": []}']),
    "/llm/gzip": (200, [("Content-Type", "application/json"), ("Content-Encoding", "gzip")],
                  [gzip.compress(COMPLETION)]),
    "/llm/stream": (200, [("Content-Type", "text/event-stream")], STREAM),
}
ROUTES = ["/items", "/llm/gzip", "/llm/stream"]
SETTINGS = dict(routes=ROUTES, capture_llm_usage=True, metrics_public=True,
                rate_limits={"minute": 100, "hour": 1000, "day": 10000})
COMPARED = ("apitoken_requests_total", "apitoken_auth_failures_total", "apitoken_rate_limited_total",
            "apitoken_llm_tokens_total", "apitoken_llm_requests_total", "apitoken_key_old_secret_requests_total")


def wsgi_app(environ, start_response):
    code, headers, chunks = ANSWERS[environ["PATH_INFO"]]
    start_response(f"{code} OK", headers)
    return iter(chunks)


async def asgi_app(scope, receive, send):
    if scope["type"] != "http":
        return
    code, headers, chunks = ANSWERS[scope["path"]]
    await send({"type": "http.response.start", "status": code,
                "headers": [(n.lower().encode(), v.encode()) for n, v in headers]})
    for i, chunk in enumerate(chunks):
        await send({"type": "http.response.body", "body": chunk, "more_body": i < len(chunks) - 1})


class WsgiFace:
    def __init__(self, keys_file):
        self.client = Client(WsgiAnalytics(wsgi_app, keys_file=keys_file, **SETTINGS))

    def get(self, path, key=None):
        r = self.client.get(path, headers={"X-API-Key": key} if key else {}, buffered=True)
        body = r.get_data()
        r.close()
        return r.status_code, {k.lower(): v for k, v in r.headers.items()}, body


class AsgiFace:
    def __init__(self, keys_file):
        self.app = AsgiAnalytics(asgi_app, keys_file=keys_file, **SETTINGS)

    def get(self, path, key=None):
        async def call():
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as client:
                async with client.stream("GET", path, headers={"X-API-Key": key} if key else {}) as r:
                    raw = b"".join([chunk async for chunk in r.aiter_raw()])    # as sent, not decoded
                    return r.status_code, {k.lower(): v for k, v in r.headers.items()}, raw
        return asyncio.run(call())


class ProxyFace(WsgiFace):
    """The proxy (which forwards to the same app, served on 127.0.0.1) with a one-credential pool."""

    def __init__(self, keys_file, upstream_url, tmp_path, monkeypatch):
        monkeypatch.setenv("PARITY_UPSTREAM_SECRET", "upstream-secret-0123456789")
        pool = tmp_path / "pool.yml"
        pool.write_text(yaml.safe_dump({"upstream": upstream_url, "provider": "generic", "routes": ROUTES,
                                        "refresh_interval": 0,
                                        "credentials": [{"id": "up-1", "secret_env": "PARITY_UPSTREAM_SECRET"}]}))
        self.proxy = ProxyApp(keys_file=keys_file, upstream_pool_file=str(pool),
                              **{k: v for k, v in SETTINGS.items() if k != "routes"})
        self.client = Client(self.proxy)


@pytest.fixture
def upstream():
    url, stop = serve_wsgi(wsgi_app)
    yield url
    stop()


@pytest.fixture
def faces(keys, upstream, tmp_path, monkeypatch):
    path, raw = keys
    old_alpha = raw["alpha"]
    new_alpha, _ = rotate_key(path, "alpha", 3600)          # the old secret works for an hour more
    secrets = dict(raw, alpha=new_alpha, alpha_old=old_alpha)
    proxy = ProxyFace(path, upstream, tmp_path, monkeypatch)
    yield [WsgiFace(path), AsgiFace(path), proxy], secrets
    proxy.proxy.close()


CASES = [  # (what, path, key id or raw text): the same from every face
    ("missing", "/items", None),
    ("invalid", "/items", "atk_not_a_real_key_0123456789"),
    ("malformed", "/items", "x" * 300),
    ("revoked", "/items", "revoked"),
    ("expired", "/items", "old"),
    ("old secret in its grace period", "/items", "alpha_old"),
    ("allowed", "/items", "alpha"),
    ("gzip-encoded LLM answer", "/llm/gzip", "alpha"),
    ("streamed LLM answer", "/llm/stream", "alpha"),
    *[(f"beta's request {n} of a minute limit of 3", "/items", "beta") for n in range(1, 6)],
]


def rate_limit_headers(headers):
    return {k: v for k, v in headers.items() if "ratelimit" in k or k == "retry-after"}


def test_every_face_answers_every_case_the_same(faces):
    faces, secrets = faces
    for what, path, who in CASES:
        raw = secrets.get(who, who)
        answers = [face.get(path, raw) for face in faces]
        (code, headers, body), *others = answers
        for other_code, other_headers, other_body in others:
            assert other_code == code, what
            assert other_body == body, what
            assert rate_limit_headers(other_headers) == rate_limit_headers(headers), what
            assert other_headers.get("content-type") == headers.get("content-type"), what
        if code >= 400:
            assert headers["content-type"] == "application/json" and "detail" in json.loads(body), what
    statuses = [face.get("/items", secrets["beta"])[0] for face in faces]
    assert statuses == [429] * len(faces)               # beta stays over its limit on each

    texts = [face.get("/metrics")[2].decode() for face in faces]
    for family in COMPARED:
        counted = [samples(text, family) for text in texts]
        assert all(c == counted[0] for c in counted[1:]), family
    wsgi_text = texts[0]
    assert samples(wsgi_text, "apitoken_llm_tokens_total")        # both LLM answers were read
    assert sum(v for k, v in samples(wsgi_text, "apitoken_llm_tokens_total").items()
               if ("type", "input") in k) == 2 * USAGE["prompt_tokens"]
    assert sum(samples(wsgi_text, "apitoken_key_old_secret_requests_total").values()) == 1
    assert sum(v for k, v in samples(wsgi_text, "apitoken_auth_failures_total").items()) == 5


@pytest.mark.parametrize("who", ["invalid", "revoked", "old", "alpha_old"])
def test_the_analytics_api_and_the_console_judge_keys_as_the_middleware(keys, who):
    """An expired key gets the middleware's 401 "API key has expired" from the analytics API too
    (it answered 403 "inactive" before), and signs in to the console exactly when the API accepts it."""
    path, raw = keys
    old_alpha = raw["alpha"]
    rotate_key(path, "alpha", 3600)
    secret = {"invalid": "atk_not_a_real_key_0123456789", "alpha_old": old_alpha}.get(who) or raw[who]
    app = WsgiAnalytics(wsgi_app, keys_file=path, admin_token="a" * 32, prometheus_url="http://127.0.0.1:9",
                        **SETTINGS)
    client = Client(app)
    middleware = client.get("/items", headers={"X-API-Key": secret}, buffered=True)
    analytics = client.get("/analytics/tokens", headers={"X-API-Key": secret}, buffered=True)
    if middleware.status_code == 200:
        assert analytics.status_code not in (401, 403)        # past authentication (Prometheus is away)
    else:
        assert (analytics.status_code, analytics.get_json()) == (middleware.status_code, middleware.get_json())
    sign_in = client.post("/ui/login", data={"credential": secret}, buffered=True)
    assert ("ate_console=" in sign_in.headers.get("Set-Cookie", "")) == (middleware.status_code == 200), who
    assert sign_in.status_code == (303 if middleware.status_code == 200 else 401), who
