"""The ASGI middleware in-process (a FastAPI app driven through httpx's ASGI transport): the
same auth errors, limits, headers, metrics, LLM usage and built-in endpoints as the WSGI
middleware, through the same core; Redis through redis.asyncio, shared with WSGI instances.
Real servers (uvicorn, gunicorn) are in test_asgi_serving.py."""
import asyncio
import contextlib

import httpx
import pytest
import redis

from api_token_exporter.web.asgi import TokenAnalytics, route_path
from asgi_app import ANTHROPIC_USAGE, OPENAI_USAGE, create_app
from support import build_app, free_port, sample_total

LIMITS = {"minute": 10**6, "hour": 10**6, "day": 10**6}


def run(app, scenario):
    """Run ``scenario(client)`` against ``app`` in a fresh event loop; return its result."""
    async def main():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as client:
            return await scenario(client)
    return asyncio.run(main())


def get(app, path, key=None, **kw):
    headers = kw.pop("headers", {})
    if key:
        headers["X-API-Key"] = key
    return run(app, lambda c: c.get(path, headers=headers, **kw))


def metrics(app) -> str:
    return get(app, "/metrics").text


@pytest.fixture
def app(keys):
    return create_app(keys_file=keys[0])


# -- auth: seed 002's errors -------------------------------------------------------------------
@pytest.mark.parametrize("who,code,detail", [
    (None, 401, "Missing API key"),
    ("atk_not_a_real_key", 401, "Invalid API key"),
    ("x" * 20000, 401, "Invalid API key"),
    ("atk_with space", 401, "Invalid API key"),
    ("revoked", 403, "API key is inactive"),
    ("old", 401, "API key has expired"),
])
def test_every_auth_error_as_the_wsgi_middleware_answers_it(app, keys, who, code, detail):
    raw = keys[1].get(who, who)
    r = get(app, "/api/v1/items", raw)
    assert (r.status_code, r.json()) == (code, {"detail": detail})
    assert r.headers["content-type"] == "application/json"
    wsgi = build_app(keys[0]).test_client().get("/items", headers={"X-API-Key": raw} if raw else {})
    assert (wsgi.status_code, wsgi.get_json()) == (r.status_code, r.json())


def test_auth_failures_and_refused_requests_are_counted_with_the_route_template(app, keys):
    async def scenario(c):
        await c.get("/api/v1/items/7")
        await c.get("/api/v1/items/7", headers={"X-API-Key": "nope"})
        await c.get("/api/v1/items", headers={"X-API-Key": keys[1]["revoked"]})
        await c.get("/api/v1/items", headers={"X-API-Key": keys[1]["old"]})
        return (await c.get("/metrics")).text
    text = run(app, scenario)
    for reason in ("missing", "invalid", "inactive", "expired"):
        assert sample_total(text, "apitoken_auth_failures_total", reason=reason) == 1
    assert sample_total(text, "apitoken_requests_total", token="__unauthenticated__", code="401",
                        route="/api/v1/items/{item_id}") == 2
    assert sample_total(text, "apitoken_requests_total", token="revoked", code="403") == 1
    assert sample_total(text, "apitoken_requests_total", token="old", code="401") == 1


def test_header_name_and_exempt_paths(keys):
    app = create_app(keys_file=keys[0], header_name="Authorization-Key")
    assert get(app, "/api/v1/items", keys[1]["alpha"]).status_code == 401
    assert get(app, "/api/v1/items", headers={"Authorization-Key": keys[1]["alpha"]}).status_code == 200
    assert get(app, "/healthz").json() == {"ok": True}          # exempt: no key needed


# -- limits and headers ----------------------------------------------------------------------
def test_the_same_rate_limit_headers_as_the_wsgi_middleware(app, keys):
    r = get(app, "/api/v1/items", keys[1]["alpha"])
    wsgi = build_app(keys[0]).test_client().get("/items", headers={"X-API-Key": keys[1]["alpha"]})
    names = [n for n in wsgi.headers.keys() if "ratelimit" in n.lower()]
    assert len(names) == 11
    for name in names:
        assert r.headers[name] == wsgi.headers[name], name
    assert r.headers["X-RateLimit-Minute-Remaining"] == "99"
    assert r.headers["RateLimit-Policy"] == '"minute";q=100;w=60, "hour";q=1000;w=3600, "day";q=10000;w=86400'


@pytest.mark.parametrize("who,window,allowed", [("beta", "minute", 3), ("gamma", "hour", 4), ("delta", "day", 2)])
def test_minute_hour_and_day_limits(app, keys, who, window, allowed):
    async def scenario(c):
        return [await c.get("/api/v1/items", headers={"X-API-Key": keys[1][who]}) for _ in range(allowed + 2)]
    answers = run(app, scenario)
    assert [r.status_code for r in answers] == [200] * allowed + [429, 429]
    refused = answers[-1]
    assert refused.json()["detail"].startswith(f"Rate limit exceeded for {window}. Try again in ")
    assert int(refused.headers["Retry-After"]) > 0
    assert refused.headers[f"X-RateLimit-{window.capitalize()}-Remaining"] == "0"
    text = metrics(app)
    assert sample_total(text, "apitoken_rate_limited_total", token=who, window=window) == 2
    assert sample_total(text, "apitoken_requests_total", token=who, code="429",
                        route="/api/v1/items") == 2


def test_observe_only_never_refuses_and_reads_the_apps_limit_headers(keys):
    app = create_app(keys_file=keys[0], observe_only=True)

    async def scenario(c):
        codes = [(await c.get("/api/v1/items")).status_code,
                 (await c.get("/api/v1/items", headers={"X-API-Key": "bogus"})).status_code]
        for _ in range(5):                     # beta's limit is 3 a minute: not enforced
            r = await c.get("/api/v1/items", headers={"X-API-Key": keys[1]["beta"]})
            codes.append(r.status_code)
            assert "x-ratelimit-minute-remaining" not in r.headers
        await c.get("/upstream", headers={"X-API-Key": keys[1]["alpha"]})
        return codes, (await c.get("/metrics")).text
    codes, text = run(app, scenario)
    assert codes == [200] * 7
    assert sample_total(text, "apitoken_requests_total", token="beta", code="200") == 5
    assert sample_total(text, "apitoken_rate_limit_remaining", token="alpha", window="minute") == 7
    assert sample_total(text, "apitoken_rate_limit_limit", token="alpha", window="minute") == 50


# -- metrics: route templates, errors --------------------------------------------------------
def test_route_templates_from_starlettes_routing(app, keys):
    alpha = keys[1]["alpha"]

    async def scenario(c):
        h = {"X-API-Key": alpha}
        codes = [(await c.get(p, headers=h)).status_code
                 for p in ("/api/v1/items/1", "/api/v1/items/2", "/api/v1/items/500", "/v2/hello/bob",
                           "/v2/hello/alice", "/no/such/path", "/api/v1/sync/x")]
        codes.append((await c.post("/api/v1/items", headers=h)).status_code)
        codes.append((await c.get("/api/v1/boom", headers=h)).status_code)
        return codes, (await c.get("/metrics")).text
    codes, text = run(app, scenario)
    assert codes == [200, 200, 404, 200, 200, 404, 200, 405, 500]
    assert sample_total(text, "apitoken_requests_total", route="/api/v1/items/{item_id}", code="200") == 2
    assert sample_total(text, "apitoken_requests_total", route="/api/v1/items/{item_id}", code="404") == 1
    assert sample_total(text, "apitoken_requests_total", route="/v2/hello/{name}") == 2     # mounted
    assert sample_total(text, "apitoken_requests_total", route="__unmatched__", code="404") == 1
    assert sample_total(text, "apitoken_requests_total", route="/api/v1/items", method="POST", code="405") == 1
    assert sample_total(text, "apitoken_requests_total", route="/api/v1/boom", code="500") == 1
    assert sample_total(text, "apitoken_requests_total", token="alpha") == 9
    assert sample_total(text, "apitoken_request_duration_seconds_count", token="alpha") == 9
    assert "bob" not in text and "alice" not in text and "/no/such" not in text


def test_mounted_apps_and_a_root_path(keys):
    app = create_app(keys_file=keys[0])

    async def scenario(c):
        h = {"X-API-Key": keys[1]["alpha"]}
        codes = [(await c.get("/prefix/v2/hello/bob", headers=h)).status_code,
                 (await c.get("/prefix/api/v1/items/3", headers=h)).status_code,
                 (await c.get("/prefix/api/v1/items/3")).status_code]
        return codes, (await c.get("/prefix/metrics")).text

    async def main():
        transport = httpx.ASGITransport(app=app, root_path="/prefix")
        async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as c:
            return await scenario(c)
    codes, text = asyncio.run(main())
    assert codes == [200, 200, 401]
    assert sample_total(text, "apitoken_requests_total", route="/v2/hello/{name}") == 1
    assert sample_total(text, "apitoken_requests_total", route="/api/v1/items/{item_id}") == 2


def test_any_asgi_app_with_werkzeug_route_templates(keys):
    async def plain(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})
    app = TokenAnalytics(plain, keys_file=keys[0], routes=["/users/<name>"], metrics_public=True)
    assert get(app, "/users/ann", keys[1]["alpha"]).text == "ok"
    assert get(app, "/other", keys[1]["alpha"]).status_code == 200
    assert get(app, "/users/ann").status_code == 401
    text = metrics(app)
    assert sample_total(text, "apitoken_requests_total", route="/users/<name>") == 2
    assert sample_total(text, "apitoken_requests_total", route="__unmatched__") == 1


def test_route_path_strips_the_root_path():
    assert route_path({"path": "/api/items", "root_path": "/api"}) == "/items"
    assert route_path({"path": "/apix", "root_path": "/api"}) == "/apix"
    assert route_path({"path": "/items", "root_path": ""}) == "/items"


# -- the current token, LLM usage --------------------------------------------------------------
def test_the_current_token_as_a_fastapi_dependency_in_sync_handlers_and_in_request_state(app, keys):
    alpha = keys[1]["alpha"]
    assert get(app, "/api/v1/me", alpha).json() == {"id": "alpha", "name": "Alpha app", "tenant": "acme"}
    assert get(app, "/api/v1/state", alpha).json() == {"id": "alpha"}
    assert get(app, "/api/v1/sync/x", alpha).json() == {"name": "x", "token": "alpha"}
    observing = create_app(keys_file=keys[0], observe_only=True)
    assert get(observing, "/api/v1/state").json() == {"id": None}


def test_record_llm_usage_in_async_handlers_and_background_tasks(app, keys):
    async def scenario(c):
        h = {"X-API-Key": keys[1]["alpha"]}
        first = await c.post("/api/v1/chat", json={"model": "gpt-4o"}, headers=h)
        second = await c.post("/api/v1/chat", json={"model": "gpt-4o", "later": True}, headers=h)
        return first.json(), second.json(), (await c.get("/metrics")).text
    first, second, text = run(app, scenario)
    assert first == second == {"ok": True, "token": "alpha"}
    assert sample_total(text, "apitoken_llm_tokens_total", token="alpha", service="openai", type="input") == 200
    assert sample_total(text, "apitoken_llm_tokens_total", token="alpha", service="openai", type="output") == 40
    assert sample_total(text, "apitoken_llm_tokens_total", token="alpha", service="anthropic") == 10
    assert sample_total(text, "apitoken_llm_requests_total", token="alpha") == 3


@pytest.mark.parametrize("path,service,total,cached", [
    ("/api/v1/chat/stream", "openai", 69, 40),
    ("/api/v1/chat/stream?service=anthropic", "anthropic", 85, 40),
    ("/api/v1/completion", "openai", 69, 40),
])
def test_usage_captured_from_streamed_and_whole_answers(keys, path, service, total, cached):
    app = create_app(keys_file=keys[0], capture_llm_usage=True)
    r = get(app, path, keys[1]["alpha"])
    assert r.status_code == 200
    text = metrics(app)
    assert sample_total(text, "apitoken_llm_tokens_total", token="alpha", service=service) == total
    assert sample_total(text, "apitoken_llm_tokens_total", token="alpha", type="cached_input") == cached
    out = OPENAI_USAGE["completion_tokens"] if service == "openai" else ANTHROPIC_USAGE["output_tokens"]
    assert sample_total(text, "apitoken_llm_tokens_total", token="alpha", type="output") == out


def test_no_capture_without_the_setting_or_a_token(app, keys):
    assert get(app, "/api/v1/chat/stream", keys[1]["alpha"]).status_code == 200
    assert sample_total(metrics(app), "apitoken_llm_tokens_total") == 0


# -- built-in endpoints ------------------------------------------------------------------------
def test_metrics_need_credentials_unless_opened(keys):
    closed = create_app(keys_file=keys[0], metrics_public=False)
    assert get(closed, "/metrics").status_code == 403
    guarded = create_app(keys_file=keys[0], metrics_public=False, metrics_bearer_token="s3cret-token")
    assert get(guarded, "/metrics").status_code == 401
    r = get(guarded, "/metrics", headers={"Authorization": "Bearer s3cret-token"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    r = get(guarded, "/metrics", headers={"Authorization": "Bearer s3cret-token",
                                          "Accept": "application/openmetrics-text"})
    assert r.text.endswith("# EOF\n")


def test_admin_and_ingest_endpoints(keys):
    app = create_app(keys_file=keys[0], admin_token="a" * 32, ingest_token="i" * 32, ingest_max_bytes=2000)

    async def scenario(c):
        await c.get("/api/v1/items", headers={"X-API-Key": keys[1]["alpha"]})
        denied = await c.get("/admin/stats")
        stats = await c.get("/admin/stats", headers={"Authorization": "Bearer " + "a" * 32})
        details = await c.get("/admin/token-details", headers={"Authorization": "Bearer " + "a" * 32})
        event = {"token": "alpha", "route": "/orders/{id}", "status": 200, "duration_ms": 5}
        posted = await c.post("/v1/events", json={"events": [event] * 3},
                              headers={"Authorization": "Bearer " + "i" * 32})
        big = await c.post("/v1/events", content=b"[" + b" " * 5000 + b"]",
                           headers={"Authorization": "Bearer " + "i" * 32})
        return denied, stats, details, posted, big, (await c.get("/metrics")).text
    denied, stats, details, posted, big, text = run(app, scenario)
    assert denied.status_code == 401 and denied.headers["WWW-Authenticate"].startswith("Bearer")
    assert stats.status_code == 200 and stats.json()["recent_requests"][0]["endpoint"] == "/api/v1/items"
    assert any(t["id"] == "alpha" for t in details.json()["tokens"])
    assert posted.json() == {"accepted": 3, "rejected": 0, "errors": []}
    assert big.status_code == 413
    assert sample_total(text, "apitoken_requests_total", token="alpha", route="/orders/{id}") == 3


# -- lifespan ------------------------------------------------------------------------------------
def test_lifespan_reaches_the_app_and_the_middleware(keys, redis_uri):
    events = []

    @contextlib.asynccontextmanager
    async def lifespan(app):
        events.append("app started")
        yield
        events.append("app stopped")
    app = create_app(lifespan=lifespan, keys_file=keys[0], storage_uri=redis_uri)

    async def main():
        inbox = asyncio.Queue()
        for kind in ("lifespan.startup", "lifespan.shutdown"):
            inbox.put_nowait({"type": kind})
        sent = []

        async def send(message):
            sent.append(message["type"])
            if message["type"] == "lifespan.startup.complete":
                middleware = find_middleware(app)
                events.append(("redis connected", middleware.core.limiter._async is not None))
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                    r = await c.get("/api/v1/items", headers={"X-API-Key": keys[1]["beta"]})
                    events.append(r.headers["X-RateLimit-Minute-Remaining"])
        await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, inbox.get, send)
        events.append(("redis closed", find_middleware(app).core.limiter._async is None))
        return sent
    assert asyncio.run(main()) == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert events == ["app started", ("redis connected", True), "2", "app stopped", ("redis closed", True)]


def find_middleware(app) -> TokenAnalytics:
    layer = app.middleware_stack
    while not isinstance(layer, TokenAnalytics):
        layer = layer.app
    return layer


# -- Redis through redis.asyncio -----------------------------------------------------------------
def test_redis_limits_are_shared_with_wsgi_instances(keys, redis_uri):
    asgi = create_app(keys_file=keys[0], storage_uri=redis_uri)
    wsgi = build_app(keys[0], storage_uri=redis_uri).test_client()
    beta = keys[1]["beta"]                        # 3 per minute
    codes = []
    for i in range(6):
        if i % 2:
            codes.append(wsgi.get("/items", headers={"X-API-Key": beta}).status_code)
        else:
            codes.append(get(asgi, "/api/v1/items", beta).status_code)
    assert codes == [200, 200, 200, 429, 429, 429]
    assert get(asgi, "/api/v1/items", keys[1]["alpha"]).headers["X-RateLimit-Minute-Remaining"] == "99"
    assert wsgi.get("/items", headers={"X-API-Key": keys[1]["alpha"]}).headers["X-RateLimit-Minute-Remaining"] == "98"


def test_redis_costs_one_round_trip_per_request(keys, redis_uri):
    app = create_app(keys_file=keys[0], storage_uri=redis_uri)
    server = redis.Redis.from_url(redis_uri)
    calls = []

    async def scenario(c):
        await c.get("/api/v1/items", headers={"X-API-Key": keys[1]["alpha"]})    # loads the script
        client = find_middleware(app).core.limiter._async.client
        original = client.execute_command

        async def counting(*args, **kwargs):
            calls.append(args[0])
            return await original(*args, **kwargs)
        client.execute_command = counting
        before = server.info("commandstats")["cmdstat_evalsha"]["calls"]
        for i in range(25):
            r = await c.get("/api/v1/items", headers={"X-API-Key": keys[1]["alpha"]})
            assert r.status_code == 200
        return server.info("commandstats")["cmdstat_evalsha"]["calls"] - before
    assert run(app, scenario) == 25
    assert calls == ["EVALSHA"] * 25


def test_redis_away_fails_open_and_opens_the_breaker(keys, caplog):
    app = create_app(keys_file=keys[0], storage_uri=f"redis://:hunter2secret@127.0.0.1:{free_port()}/0")

    async def scenario(c):
        answers = [await c.get("/api/v1/items", headers={"X-API-Key": keys[1]["alpha"]}) for _ in range(5)]
        return answers, (await c.get("/metrics")).text
    answers, text = run(app, scenario)
    assert [r.status_code for r in answers] == [200] * 5
    assert "x-ratelimit-minute-limit" not in answers[0].headers
    assert sample_total(text, "apitoken_rate_limit_storage_errors_total") == 5
    assert sample_total(text, "apitoken_rate_limit_storage_breaker_state", state="open") == 1
    assert "circuit breaker open" in caplog.text and "hunter2secret" not in caplog.text


@pytest.mark.parametrize("mode", ["closed", "local"])
def test_failure_modes_while_redis_is_away(keys, mode):
    app = create_app(keys_file=keys[0], storage_uri=f"redis://127.0.0.1:{free_port()}/0",
                     storage_failure_mode=mode)

    async def scenario(c):
        return [await c.get("/api/v1/items", headers={"X-API-Key": keys[1]["beta"]}) for _ in range(5)]
    answers = run(app, scenario)
    if mode == "closed":
        assert {r.status_code for r in answers} == {503}
        assert "storage_failure_mode: closed" in answers[-1].json()["detail"]
        assert int(answers[-1].headers["Retry-After"]) >= 1
    else:                                         # this process's own limits: 3 per minute
        assert [r.status_code for r in answers] == [200, 200, 200, 429, 429]


def test_an_asgi_app_is_required(keys):
    with pytest.raises(TypeError, match="api-token-exporter serve"):
        TokenAnalytics(None, keys_file=keys[0])


def test_websockets_pass_through_untouched(keys):
    seen = []

    async def app(scope, receive, send):
        seen.append(scope["type"])
    middleware = TokenAnalytics(app, keys_file=keys[0])
    asyncio.run(middleware({"type": "websocket", "path": "/ws", "headers": []}, None, None))
    assert seen == ["websocket"]


def test_a_mount_with_a_path_parameter_never_puts_its_value_in_a_label(keys):
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    async def item(request):
        return PlainTextResponse(request.path_params["tenant"] + "/" + request.path_params["item"])
    inner = Starlette(routes=[Route("/items/{item}", item)])
    app = Starlette(routes=[Mount("/tenants/{tenant}", app=inner)])
    app.add_middleware(TokenAnalytics, keys_file=keys[0], metrics_public=True)
    assert get(app, "/tenants/acme/items/9", keys[1]["alpha"]).text == "acme/9"
    assert get(app, "/tenants/globex/items/9").status_code == 401
    text = metrics(app)
    assert sample_total(text, "apitoken_requests_total", route="/tenants/{tenant}/items/{item}") == 2
    assert "acme" not in text.replace('tenant="acme"', "") and "globex" not in text.replace('tenant="globex"', "")


def test_a_body_left_unfinished_and_a_cancelled_request_are_counted_once(keys):
    gate = asyncio.Event()

    async def app(scope, receive, send):
        if scope["path"] == "/partial":        # starts, sends a chunk, never ends the body
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"part", "more_body": True})
            return
        await gate.wait()                      # /hang: never answers
    middleware = TokenAnalytics(app, keys_file=keys[0], routes=["/partial", "/hang"], metrics_public=True)
    scope = {"type": "http", "method": "GET", "root_path": "", "query_string": b"",
             "headers": [(b"x-api-key", keys[1]["alpha"].encode())], "client": ("127.0.0.1", 1)}

    async def main():
        async def receive():
            return {"type": "http.request", "body": b""}

        async def send(message):
            pass
        await middleware(dict(scope, path="/partial"), receive, send)
        task = asyncio.create_task(middleware(dict(scope, path="/hang"), receive, send))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    asyncio.run(main())
    text = metrics(middleware)
    assert sample_total(text, "apitoken_requests_total", route="/partial", code="200") == 1
    assert sample_total(text, "apitoken_requests_total", route="/hang", code="499") == 1
    assert sample_total(text, "apitoken_requests_total") == 2


def test_a_redis_that_does_not_answer_at_start_up_is_logged_not_fatal(keys, caplog):
    app = create_app(keys_file=keys[0], storage_uri=f"redis://127.0.0.1:{free_port()}/0")

    async def main():
        inbox = asyncio.Queue()
        for kind in ("lifespan.startup", "lifespan.shutdown"):
            inbox.put_nowait({"type": kind})
        sent = []

        async def send(message):
            sent.append(message["type"])
        await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, inbox.get, send)
        return sent
    assert asyncio.run(main()) == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert "does not answer at start-up" in caplog.text
    assert get(app, "/api/v1/items", keys[1]["alpha"]).status_code == 200      # fails open


def test_server_timing_on_every_answer_of_both_faces_only_when_asked(keys):
    """server_timing: the W3C Server-Timing field with the middleware's own time, on the app's
    answer and on each of its own refusals (401, 403, 429), the same from WSGI and ASGI."""
    import re
    field = re.compile(r'^apitoken;dur=(\d+\.\d{3});desc="api-token-exporter"$')
    limits = {"minute": 1, "hour": 100, "day": 100}
    asgi_app = create_app(keys_file=keys[0], rate_limits=limits, server_timing=True)
    wsgi = build_app(keys[0], rate_limits=limits, server_timing=True).test_client()
    asks = [(keys[1]["alpha"], 200), (keys[1]["alpha"], 429), (None, 401), ("atk_nope", 401),
            (keys[1]["revoked"], 403)]
    for raw, code in asks:
        answers = (get(asgi_app, "/api/v1/items", raw),
                   wsgi.get("/items", headers={"X-API-Key": raw} if raw else {}))
        for answer in answers:
            assert answer.status_code == code
            found = field.match(answer.headers.get("Server-Timing", ""))
            assert found and float(found.group(1)) > 0, (code, answer.headers)
    assert "Server-Timing" not in get(create_app(keys_file=keys[0]), "/api/v1/items", keys[1]["beta"]).headers
    assert "Server-Timing" not in build_app(keys[0]).test_client().get(
        "/items", headers={"X-API-Key": keys[1]["beta"]}).headers
