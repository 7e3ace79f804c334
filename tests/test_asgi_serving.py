"""The ASGI middleware on real servers, called with httpx over TCP: uvicorn in-process (a
streamed answer reaches the client chunk by chunk and its LLM usage is counted), uvicorn
--workers and gunicorn with uvicorn's worker (totals on /metrics equal what was sent, for
every token), Redis limits shared by two ASGI instances and a WSGI one, and the circuit
breaker around a Redis that hangs."""
import asyncio
import collections
import os
import pathlib
import subprocess
import sys
import time

import httpx
import pytest
import uvicorn

from api_token_exporter.core.keystore import add_key
from asgi_app import OPENAI_USAGE, create_app
from support import free_port, needs, sample_total, stop_process, wait_for_port
from test_storage_faults import own_redis  # noqa: F401  (a redis-server of the test alone)

pytestmark = pytest.mark.integration
TESTS = str(pathlib.Path(__file__).resolve().parent)
UNLIMITED = {"minute": 10**6, "hour": 10**6, "day": 10**6}


@pytest.fixture
@needs("server")
def serve_asgi(tmp_path):
    """Start ``asgi_app:app_from_env`` under ``uvicorn --workers N`` or ``gunicorn -k
    uvicorn.workers.UvicornWorker -w N``; settings as ATE_* variables. Returns its URL."""
    procs = []

    def start(server: str = "uvicorn", workers: int = 4, **settings) -> str:
        port = free_port()
        env = dict(os.environ, PYTHONPATH=TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.update({f"ATE_{k.upper()}": str(v) for k, v in settings.items()})
        if server == "uvicorn":          # the state directory is ours to give: the workers add up there
            env.setdefault("ATE_STATE_DIR", str(tmp_path / f"state-{port}"))
            command = [sys.executable, "-m", "uvicorn", "--factory", "asgi_app:app_from_env", "--host",
                       "127.0.0.1", "--port", str(port), "--workers", str(workers), "--log-level", "warning"]
        else:                            # gunicorn_conf makes a private one, as `serve` does
            command = [sys.executable, "-m", "gunicorn", "--workers", str(workers), "--worker-class",
                       "uvicorn.workers.UvicornWorker", "--bind", f"127.0.0.1:{port}", "--config",
                       "python:api_token_exporter.web.gunicorn_conf", "asgi_app:app_from_env()"]
        log = open(tmp_path / f"{server}-{port}.log", "w")
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=TESTS)
        procs.append(proc)
        wait_for_port(port, proc, timeout=30)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/metrics", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        return url

    yield start
    for proc in procs:
        stop_process(proc)


async def fire(url, plan, concurrency=16):
    """Send (key or None, method, path) requests concurrently, each on a new connection (so
    that every worker gets some); [(key, status, json or None)]."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        gate = asyncio.Semaphore(concurrency)

        async def one(item):
            key, method, path = item
            async with gate:
                r = await client.request(method, path, headers={"X-API-Key": key} if key else {},
                                         json={"model": "gpt-4o"} if method == "POST" else None)
                body = r.json() if r.headers.get("content-type") == "application/json" else None
                return key, r.status_code, body
        return await asyncio.gather(*(one(item) for item in plan))


# -- in-process uvicorn: streaming, lifespan, every refusal -----------------------------------
@needs("server")
def test_a_streamed_answer_reaches_the_client_before_the_app_finishes_and_is_counted(keys):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    started, stopped = [], []

    import contextlib

    @contextlib.asynccontextmanager
    async def lifespan(app):
        started.append(True)
        yield
        stopped.append(True)
    app = create_app(lifespan=lifespan, keys_file=keys[0], capture_llm_usage=True)

    async def main():
        app.state.gate = asyncio.Event()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                               lifespan="on"))
        serving = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        try:
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                headers = {"X-API-Key": keys[1]["alpha"]}
                async with client.stream("GET", "/api/v1/chat/stream", headers=headers) as r:
                    chunks = r.aiter_raw()
                    # the app waits for this event after its first chunk: a middleware that held
                    # the body back would never let this chunk through, and the app would time out
                    first = await asyncio.wait_for(chunks.__anext__(), 5)
                    assert b"Hello" in first and not app.state.gate.is_set()
                    app.state.gate.set()
                    rest = b"".join([chunk async for chunk in chunks])
                    headers = r.headers
                text = (await client.get("/metrics")).text      # counted once the client has it all
                refusals = [(await client.get("/api/v1/items", headers=h)) for h in (
                    {}, {"X-API-Key": "atk_nope"}, {"X-API-Key": keys[1]["revoked"]},
                    {"X-API-Key": keys[1]["old"]})]
                beta = [(await client.get("/api/v1/items", headers={"X-API-Key": keys[1]["beta"]}))
                        for _ in range(4)]
                return first + rest, headers, text, refusals, beta
        finally:
            server.should_exit = True
            await serving
    body, headers, text, refusals, beta = asyncio.run(main())
    assert body.endswith(b"data: [DONE]\n\n") and headers["X-RateLimit-Minute-Remaining"] == "99"
    assert sample_total(text, "apitoken_requests_total", token="alpha", route="/api/v1/chat/stream") == 1
    assert sample_total(text, "apitoken_llm_tokens_total", token="alpha", model="gpt-4o") == \
        OPENAI_USAGE["total_tokens"]
    assert [(r.status_code, r.json()["detail"]) for r in refusals] == [
        (401, "Missing API key"), (401, "Invalid API key"), (403, "API key is inactive"),
        (401, "API key has expired")]
    assert [r.status_code for r in beta] == [200, 200, 200, 429]
    assert [r.headers["X-RateLimit-Minute-Remaining"] for r in beta] == ["2", "1", "0", "0"]
    assert beta[-1].json()["detail"].startswith("Rate limit exceeded for minute. Try again in ")
    assert int(beta[-1].headers["Retry-After"]) > 0
    assert started == stopped == [True]


# -- several workers: exact totals -------------------------------------------------------------
def worker_plan(raw):
    plan = []
    for i in range(1200):
        token = ("alpha", "beta2", "gamma2", "tight", None, "bogus")[i % 6]
        path = ("/api/v1/items", "/api/v1/items/7", "/api/v1/items/500", "/api/v1/nowhere",
                "/v2/hello/x")[i % 5]
        plan.append((raw.get(token, "atk_definitely_not_a_key") if token else None, "GET", path))
    plan += [(raw["chatter"], "POST", "/api/v1/chat")] * 40
    plan += [(raw["chatter"], "GET", "/api/v1/chat/stream")] * 20
    return plan


@pytest.mark.parametrize("server", ["uvicorn", "gunicorn"])
def test_workers_add_up_exactly(serve_asgi, tmp_path, server):
    keys_file = str(tmp_path / "keys.yml")
    raw = {t: add_key(keys_file, t, rate_limits=UNLIMITED) for t in ("alpha", "beta2", "gamma2", "chatter")}
    raw["tight"] = add_key(keys_file, "tight", rate_limits={"minute": 30})   # per worker: memory://
    url = serve_asgi(server, workers=4, keys_file=keys_file, capture_llm_usage="true")
    answers = []
    deadline = time.monotonic() + 30               # until two workers or more answer
    while len({body["pid"] for _, _, body in answers}) < 2 and time.monotonic() < deadline:
        answers += asyncio.run(fire(url, [(raw["alpha"], "GET", "/api/v1/pid")] * 20))
    plan = [None] * len(answers) + worker_plan(raw)
    answers += asyncio.run(fire(url, plan[len(answers):]))
    by_id = {v: k for k, v in raw.items()}
    sent = collections.Counter()
    for key, status, _ in answers:
        sent[(by_id.get(key, "__unauthenticated__"), str(status))] += 1
    pids = {body["pid"] for _, _, body in answers if body and "pid" in body}
    assert len(pids) >= 2, "one worker answered everything"
    assert sent[("tight", "429")] > 0 and sent[("__unauthenticated__", "401")] == 400

    text = httpx.get(url + "/metrics", timeout=30).text
    for (token, code), n in sent.items():
        assert sample_total(text, "apitoken_requests_total", token=token, code=code) == n, (token, code)
    for token in ("alpha", "beta2", "gamma2", "tight", "chatter", "__unauthenticated__"):
        assert sample_total(text, "apitoken_requests_total", token=token) == \
            sum(n for (t, _), n in sent.items() if t == token), token
    assert sample_total(text, "apitoken_requests_total") == len(plan)
    assert sample_total(text, "apitoken_request_duration_seconds_count") == len(plan)
    assert sample_total(text, "apitoken_auth_failures_total", reason="missing") == 200
    assert sample_total(text, "apitoken_auth_failures_total", reason="invalid") == 200
    assert sample_total(text, "apitoken_requests_total", route="/v2/hello/{name}") == 240
    assert sample_total(text, "apitoken_requests_total", route="/api/v1/items/{item_id}", code="404") > 0
    # 40 calls recorded by the handler (100 in, 20 out), 20 streamed answers captured (52, 17)
    assert sample_total(text, "apitoken_llm_requests_total", token="chatter") == 60
    assert sample_total(text, "apitoken_llm_tokens_total", token="chatter", type="output") == 40 * 20 + 20 * 17
    assert sample_total(text, "apitoken_llm_tokens_total", token="chatter") == 40 * 120 + 20 * 69


# -- Redis: two ASGI instances and a WSGI one share limits ---------------------------------------
def test_redis_limits_hold_across_asgi_instances_and_a_wsgi_one(serve_asgi, gunicorn_app, keys, redis_uri):
    one = serve_asgi("uvicorn", workers=2, keys_file=keys[0], storage_uri=redis_uri)
    two = serve_asgi("gunicorn", workers=2, keys_file=keys[0], storage_uri=redis_uri)
    wsgi = gunicorn_app("devstack.demo:app_from_env()", workers=2, keys_file=keys[0],
                        storage_uri=redis_uri)
    urls = (one, two, wsgi)

    async def spread(raw, n):
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(*(client.get(urls[i % 3] + "/api/v1/items", headers={"X-API-Key": raw})
                                          for i in range(n)))
    beta = asyncio.run(spread(keys[1]["beta"], 12))           # 3 per minute
    assert [r.status_code for r in beta].count(200) == 3
    assert [r.status_code for r in beta].count(429) == 9
    gamma = asyncio.run(spread(keys[1]["gamma"], 10))         # 4 per hour
    assert [r.status_code for r in gamma].count(200) == 4
    assert all(r.json()["detail"].startswith("Rate limit exceeded for hour")
               for r in gamma if r.status_code == 429)
    remaining = sorted(int(r.headers["X-RateLimit-Minute-Remaining"]) for r in beta if r.status_code == 200)
    assert remaining == [0, 1, 2]
    limited = sum(sample_total(httpx.get(u + "/metrics", timeout=10).text, "apitoken_rate_limited_total",
                               token="beta") for u in urls)
    assert limited == 9


# -- a Redis that hangs: the same breaker as the WSGI side, through redis.asyncio ----------------
def test_a_hung_redis_opens_the_breaker_and_limits_come_back(own_redis, keys, caplog):
    import logging
    import signal
    proc, uri = own_redis
    caplog.set_level(logging.INFO, logger="api_token_exporter")
    timeout = 0.1
    app = create_app(keys_file=keys[0], storage_uri=uri, storage_timeout=timeout)

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            async def timed(raw):
                started = time.perf_counter()
                r = await c.get("/api/v1/items", headers={"X-API-Key": raw})
                return r.status_code, time.perf_counter() - started
            before = [(await timed(keys[1]["beta"]))[0] for _ in range(4)]
            os.kill(proc.pid, signal.SIGSTOP)
            try:
                away = [await timed(keys[1]["alpha"]) for _ in range(100)]
                text = (await c.get("/metrics")).text
            finally:
                os.kill(proc.pid, signal.SIGCONT)
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline:       # it probes by itself and limits apply again
                if (await timed(keys[1]["beta"]))[0] == 429:
                    break
                await asyncio.sleep(0.2)
            else:
                raise AssertionError("limits did not apply again after Redis came back")
            return before, away, text, (await c.get("/metrics")).text
    before, away, text, after = asyncio.run(main())
    assert before == [200, 200, 200, 429]
    assert {code for code, _ in away} == {200}             # fail open (the default)
    took = sorted(t for _, t in away)
    assert took[int(0.99 * len(took)) - 1] < 2 * timeout, took[-5:]
    assert sum(t > timeout / 2 for t in took) <= 6          # the calls that opened it, and probes
    assert sample_total(text, "apitoken_rate_limit_storage_breaker_state", state="open") == 1
    assert sample_total(text, "apitoken_rate_limit_storage_errors_total") == 100
    assert sample_total(after, "apitoken_rate_limit_storage_breaker_state", state="closed") == 1
    changes = [r.getMessage() for r in caplog.records if "circuit breaker" in r.getMessage()]
    assert "open" in changes[0] and "closed" in changes[-1] and len(changes) < 20
