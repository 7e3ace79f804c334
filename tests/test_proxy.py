"""The proxy end to end against a fake upstream on a real socket: rotation, exhaustion and
recovery, invalid credentials, streaming, LLM usage, the middleware's auth and limits, and no
secret anywhere."""
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests
import yaml

from devstack.fake_upstream import FakeUpstream, go_duration
from api_token_exporter.proxy.app import ProxyApp
from support import free_port, needs, sample_total, serve_wsgi, stop_process, wait_for, wait_for_port

NOW = 1_800_000_000.0
GH = [f"ghp_{c * 4}{'s3cr3t' * 5}{c * 4}" for c in "ABC"]
OPENAI = ["sk-proj-" + "Q" * 40 + "w1", "sk-proj-" + "R" * 40 + "w2"]
ANTHROPIC = ["sk-ant-api03-" + "Z" * 40 + "z9"]
SHORT = {"github": "gh", "openai": "oa", "anthropic": "an"}


class Clock:
    def __init__(self, t=NOW):
        self.t = t

    def __call__(self):
        return self.t


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def servers():
    stops = []

    def serve(app):
        url, stop = serve_wsgi(app)
        stops.append(stop)
        return url
    yield serve
    for stop in stops:
        stop()


@pytest.fixture
def stack(keys, tmp_path, monkeypatch, clock, servers):
    """stack(provider, secrets, **pool) -> (proxy URL, ProxyApp, FakeUpstream)."""
    made = []

    def build(provider="github", secrets=GH, upstream=None, settings=None, limit=5000, **pool):
        fake = FakeUpstream(provider, limit=limit, clock=clock)
        for secret in secrets:
            fake.add(secret)
        url = upstream or fake.serve()
        creds = []
        for i, secret in enumerate(secrets):
            monkeypatch.setenv(f"UPSTREAM_SECRET_{i}", secret)
            creds.append({"id": f"{SHORT[provider]}-{i}", "secret_env": f"UPSTREAM_SECRET_{i}"})
        doc = {"upstream": url, "provider": provider, "refresh_interval": 0, "credentials": creds}
        doc.update(pool)
        pool_file = tmp_path / f"pool-{len(made)}.yml"
        pool_file.write_text(yaml.safe_dump(doc))
        app = ProxyApp(keys_file=keys[0], upstream_pool_file=str(pool_file), admin_token="admin-secret-token",
                       metrics_public=True, **(settings or {}))
        app.pool.clock = clock
        made.append((app, fake))
        return servers(app), app, fake
    yield build
    for app, fake in made:
        app.close()
        fake.stop()


def get(url, key, path="/repos/a/b", **kw):
    headers = dict(kw.pop("headers", {}), **({"X-API-Key": key} if key else {}))
    return requests.request(kw.pop("method", "GET"), url + path, headers=headers, timeout=30, **kw)


def used(fake):
    return [s["secret"] for s in fake.seen]


def metrics(url):
    return requests.get(url + "/metrics", timeout=10).text


# -- choosing and rotating --------------------------------------------------------------------
def test_most_left_first_then_rotation_at_the_threshold(stack, keys):
    url, app, fake = stack(rotate_below=440, refresh_interval="1h")
    fake.add(GH[0], limit=1000, remaining=150)
    fake.add(GH[1], limit=5000, remaining=2000)
    fake.add(GH[2], limit=500, remaining=450)
    assert app.pool.refresh(app.upstream.fetch_rate_limit, now=NOW) == ["gh-0", "gh-1", "gh-2"]   # free
    fake.seen.clear()
    for _ in range(13):
        assert get(url, keys[1]["alpha"]).status_code == 200
    assert used(fake) == [GH[2]] * 11 + [GH[1]] * 2           # 90 %, until under 440; then 40 % beats 15 %
    text = metrics(url)
    assert sample_total(text, "apitoken_upstream_rotations_total", credential="gh-2", reason="threshold") == 1
    assert sample_total(text, "apitoken_upstream_requests_total", credential="gh-2", code="200") == 11
    assert sample_total(text, "apitoken_upstream_rate_limit_remaining", credential="gh-1", resource="core") == 1998
    assert sample_total(text, "apitoken_requests_total", token="alpha", code="200") == 13


def test_exhaustion_then_recovery_after_the_reset(stack, keys, clock):
    url, app, fake = stack(secrets=GH[:2])
    fake.add(GH[0], limit=50, remaining=1, reset_in=60)
    fake.add(GH[1], limit=50, remaining=1, reset_in=90)
    assert [get(url, keys[1]["alpha"]).status_code for _ in range(2)] == [200, 200]
    r = get(url, keys[1]["alpha"])
    assert r.status_code == 429 and r.headers["Retry-After"] == "60"
    assert r.json() == {"detail": "Every upstream credential of the proxy is rate limited. Try again in 60 seconds"}
    assert "X-RateLimit-Minute-Remaining" in r.headers          # the client's own limits, as always
    assert len(fake.seen) == 2                                 # the pool knew: nothing sent
    stats = requests.get(url + "/admin/pool/stats", headers={"Authorization": "Bearer admin-secret-token"}).json()
    assert stats["tokens"]["rate_limited"] == 2 and stats["exhausted_requests"] == 1
    clock.t += 61                                              # gh-0's window resets
    r = get(url, keys[1]["alpha"])
    assert r.status_code == 200 and used(fake)[-1] == GH[0]
    app.pool.tick()
    text = metrics(url)
    assert sample_total(text, "apitoken_upstream_credential_status", credential="gh-0", status="active") == 1
    assert sample_total(text, "apitoken_upstream_credential_status", credential="gh-1", status="rate_limited") == 1
    assert sample_total(text, "apitoken_upstream_exhausted_total") == 1


def test_an_upstream_429_is_retried_on_the_next_and_all_exhausted_gets_the_earliest_retry_after(stack, keys):
    url, app, fake = stack(secrets=GH[:2])
    fake.add(GH[0], remaining=0, reset_in=30)                  # the pool does not know yet
    fake.add(GH[1], remaining=0, reset_in=90)
    r = get(url, keys[1]["alpha"], method="POST", json={"q": 1})
    assert r.status_code == 429 and r.headers["Retry-After"] == "30"
    assert used(fake) == GH[:2]
    assert "rate limit exceeded" not in r.text.lower() or "upstream credential" in r.text   # ours, not GitHub's
    fake.add(GH[1], remaining=10, reset_in=90)
    app.pool.observe(app.pool.by_id["gh-1"], 200, {}, ("core",))   # nothing new: still spent for the pool
    assert get(url, keys[1]["alpha"]).status_code == 429


def test_a_revoked_token_is_taken_out_and_the_request_retried_with_its_body(stack, keys, caplog):
    url, app, fake = stack()
    fake.revoke(GH[0])
    r = get(url, keys[1]["alpha"], path="/repos/a/b/issues", method="POST", json={"title": "bug"})
    assert r.status_code == 200 and r.json()["bytes"] == len(json.dumps({"title": "bug"}))
    assert used(fake) == [GH[0], GH[1]] and fake.seen[1]["body"] == fake.seen[0]["body"]
    for _ in range(3):
        get(url, keys[1]["alpha"])
    assert GH[0] not in used(fake)[2:]
    text = metrics(url)
    assert sample_total(text, "apitoken_upstream_credential_status", credential="gh-0", status="invalid") == 1
    assert sample_total(text, "apitoken_upstream_rotations_total", credential="gh-0", reason="invalid") == 1
    assert sample_total(text, "apitoken_upstream_requests_total", credential="gh-0", code="401") == 1
    assert "gh-0" in caplog.text and "taken out of the pool" in caplog.text
    for secret in GH[1:]:
        fake.revoke(secret)
    r = get(url, keys[1]["alpha"])
    assert r.status_code == 503 and "Retry-After" not in r.headers
    assert r.json()["detail"].startswith("No upstream credential of the proxy is valid")


def test_a_body_too_large_to_keep_is_streamed_once_and_not_retried(stack, keys):
    url, app, fake = stack(retry_body_max_bytes=10)
    fake.revoke(GH[0])
    body = b"x" * 5000
    r = get(url, keys[1]["alpha"], method="PUT", data=body)
    assert r.status_code == 502 and "too large" in r.json()["detail"]
    assert fake.seen[0]["body"] == body and len(fake.seen) == 1
    assert get(url, keys[1]["alpha"], method="PUT", data=body).json()["bytes"] == 5000   # gh-1, streamed

    def chunks():                                               # no Content-Length: chunked upstream too
        for _ in range(5):
            yield b"y" * 1000
    r = get(url, keys[1]["alpha"], method="POST", data=chunks())
    assert r.status_code == 200 and r.json()["bytes"] == 5000
    assert fake.seen[-1]["body"] == b"y" * 5000 and fake.seen[-1]["headers"]["HTTP_TRANSFER_ENCODING"] == "chunked"
    r = get(url, keys[1]["alpha"], method="POST", data=iter([b"small"]))        # chunked, but small: kept
    assert r.json()["bytes"] == 5 and "HTTP_TRANSFER_ENCODING" not in fake.seen[-1]["headers"]


def test_repeated_5xx_cool_a_credential_down(stack, keys, clock):
    url, app, fake = stack(secrets=GH[:2], cooldown_after=2, cooldown="30s")
    fake.fail_next = 2
    assert [get(url, keys[1]["alpha"]).status_code for _ in range(2)] == [500, 500]   # passed through
    assert app.pool.status("gh-0") == "cooling_down"
    get(url, keys[1]["alpha"])
    assert used(fake)[-1] == GH[1]
    clock.t += 31
    assert app.pool.status("gh-0") == "active"


# -- a proper proxy ---------------------------------------------------------------------------
def test_streamed_chunks_arrive_before_the_upstream_has_finished(stack, keys):
    url, app, fake = stack()
    fake.gate.clear()                         # the upstream holds its last event back
    r = requests.get(url + "/stream", headers={"X-API-Key": keys[1]["alpha"]}, stream=True, timeout=30)
    assert r.status_code == 200 and r.headers["Content-Type"] == "text/event-stream"
    chunks = r.iter_content(chunk_size=None)
    first = next(chunks)
    assert first.startswith(b"data: ") and not fake.finished.is_set()
    fake.gate.set()
    rest = b"".join(chunks)
    assert fake.finished.is_set() and rest.endswith(b"data: [DONE]\n\n")
    r.close()
    # the connection went back to the pool once the stream was read to its end
    wait_for("the stream recorded", lambda: sample_total(metrics(url), "apitoken_requests_total", token="alpha") == 1,
             timeout=10, interval=0.1)
    assert get(url, keys[1]["alpha"]).status_code == 200
    assert app.upstream.http.num_connections == 1


def test_connections_are_pooled_and_timeouts_answer_504(stack, keys):
    url, app, fake = stack(settings={"upstream_read_timeout": "300ms"})
    for _ in range(10):
        assert get(url, keys[1]["alpha"]).status_code == 200
    assert app.upstream.http.num_connections == 1
    r = get(url, keys[1]["alpha"], path="/sleep?1")
    assert r.status_code == 504 and r.json() == {"detail": "The upstream did not answer within 0.3 s"}
    assert sample_total(metrics(url), "apitoken_upstream_requests_total", code="error") == 1


def test_an_unreachable_upstream_is_a_502(stack, keys):
    dead = free_port()
    url, app, fake = stack(upstream=f"http://127.0.0.1:{dead}")
    r = get(url, keys[1]["alpha"])
    assert r.status_code == 502 and r.json()["detail"].startswith("The upstream could not be reached")
    assert sample_total(metrics(url), "apitoken_requests_total", token="alpha", code="502") == 1


def test_status_and_headers_pass_through_hop_by_hop_and_upstream_limits_do_not(stack, keys):
    url, app, fake = stack()
    r = get(url, keys[1]["alpha"], path="/status/404?x=%2F1",
            headers={"Connection": "keep-alive, X-Private", "X-Private": "no", "TE": "trailers",
                     "X-Trace": "t-1", "Accept-Encoding": "gzip"})
    assert r.status_code == 404 and r.json() == {"status": 404}
    seen = fake.seen[-1]
    assert seen["query"] == "x=%2F1" and seen["headers"]["HTTP_X_TRACE"] == "t-1"
    assert not {"HTTP_X_PRIVATE", "HTTP_TE", "HTTP_X_API_KEY"} & set(seen["headers"])
    assert seen["headers"]["HTTP_AUTHORIZATION"] == "Bearer " + GH[0]
    assert not any(h.lower().startswith("x-ratelimit-") and "minute" not in h.lower()
                   and "hour" not in h.lower() and "day" not in h.lower() for h in r.headers)
    assert r.headers["X-RateLimit-Minute-Limit"] == "100"          # the client's own, from the middleware
    assert get(url, keys[1]["alpha"], path="/status/201").status_code == 201
    url2, _, _ = stack(forward_rate_limit_headers=True)
    assert get(url2, keys[1]["alpha"]).headers["X-RateLimit-Resource"] == "core"


def test_dot_segments_are_not_forwarded(stack, keys):
    url, app, fake = stack()
    r = requests.get(url + "/repos/%2e%2e/admin", headers={"X-API-Key": keys[1]["alpha"]}, timeout=10)
    assert r.status_code in (400, 200)
    import http.client
    conn = http.client.HTTPConnection(url.split("//")[1])
    conn.request("GET", "/a/../admin", headers={"X-API-Key": keys[1]["alpha"]})
    assert conn.getresponse().status == 400 and all(s["path"] != "/admin" for s in fake.seen)


# -- the client's side: the middleware's auth, limits and usage --------------------------------
def test_clients_get_the_middlewares_auth_errors_limits_and_headers(stack, keys):
    url, app, fake = stack()
    assert get(url, None).json() == {"detail": "Missing API key"}
    assert get(url, "atk_not_a_key_of_ours_0123456789").json() == {"detail": "Invalid API key"}
    r = get(url, keys[1]["revoked"])
    assert r.status_code == 403 and r.json() == {"detail": "API key is inactive"}
    assert get(url, keys[1]["old"]).json() == {"detail": "API key has expired"}
    codes = [get(url, keys[1]["beta"]).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]                            # beta: 3 a minute
    r = get(url, keys[1]["beta"])
    assert r.json()["detail"].startswith("Rate limit exceeded for minute") and "Retry-After" in r.headers
    assert len(fake.seen) == 3                                      # only the allowed ones went upstream
    assert get(url, None, path="/healthz").json()["status"] == "ok" and len(fake.seen) == 3
    text = metrics(url)
    assert sample_total(text, "apitoken_requests_total", token="beta", code="429") == 2
    assert sample_total(text, "apitoken_auth_failures_total", reason="missing") == 1
    assert sample_total(text, "apitoken_rate_limited_total", token="beta", window="minute") == 2


def test_bearer_keys_from_sdks_work_and_never_reach_the_upstream(stack, keys):
    url, app, fake = stack("openai", OPENAI)
    r = requests.post(url + "/v1/chat/completions", json={"model": "gpt-4o", "messages": []},
                      headers={"Authorization": f"Bearer {keys[1]['alpha']}"}, timeout=10)
    assert r.status_code == 200
    assert fake.seen[-1]["headers"]["HTTP_AUTHORIZATION"] == "Bearer " + OPENAI[0]
    r = requests.get(url + "/v1/models", headers={"Authorization": "Bearer sk-someone-elses-openai-key"}, timeout=10)
    assert r.status_code == 401 and len(fake.seen) == 1


def test_llm_usage_is_captured_under_the_clients_token_streamed_or_not_compressed_or_not(stack, keys):
    url, app, fake = stack("openai", OPENAI)
    for headers in ({"Accept-Encoding": "identity"}, {"Accept-Encoding": "br, gzip"}):
        r = get(url, keys[1]["alpha"], path="/v1/chat/completions", method="POST", json={"model": "gpt-4o"},
                headers=headers)
        assert r.json()["usage"]["prompt_tokens"] == 11
    assert fake.seen[-1]["headers"]["HTTP_ACCEPT_ENCODING"] == "gzip"           # br dropped: capture reads gzip
    r = get(url, keys[1]["gamma"], path="/v1/chat/completions", method="POST", json={"model": "gpt-4o", "stream": True})
    assert r.text.count("data: ") == 4
    url2, _, _ = stack("anthropic", ANTHROPIC)
    r = get(url2, keys[1]["alpha"], path="/v1/messages", method="POST",
            json={"model": "claude-sonnet-4-5", "stream": True}, headers={"anthropic-version": "2023-06-01"})
    assert "message_delta" in r.text

    def tokens(u, token, kind):
        return sample_total(metrics(u), "apitoken_llm_tokens_total", token=token, type=kind)
    assert wait_for("usage", lambda: tokens(url, "alpha", "input") == 22, timeout=10, interval=0.1)
    assert tokens(url, "alpha", "output") == 14
    assert tokens(url, "gamma", "input") == 11 and tokens(url, "gamma", "output") == 5
    assert tokens(url2, "alpha", "input") == 12 and tokens(url2, "alpha", "output") == 9
    assert sample_total(metrics(url2), "apitoken_upstream_rate_limit_limit", credential="an-0",
                        resource="input_tokens") == 0      # the fake sends requests and tokens only
    assert sample_total(metrics(url2), "apitoken_upstream_rate_limit_remaining", credential="an-0",
                        resource="requests") == 4999


def test_openai_durations_from_the_fake_parse_back():
    assert go_duration(0.012) == "12ms" and go_duration(360) == "6m0s" and go_duration(72.5) == "1m12.5s"


# -- the admin view ---------------------------------------------------------------------------
def test_pool_admin_json_needs_the_admin_token(stack, keys):
    url, app, fake = stack()
    for _ in range(3):
        get(url, keys[1]["alpha"], path="/users/octocat")
    assert requests.get(url + "/admin/pool/stats", timeout=10).status_code == 401
    auth = {"Authorization": "Bearer admin-secret-token"}
    details = requests.get(url + "/admin/pool/token-details", headers=auth, timeout=10).json()
    first = details["tokens"][0]
    assert first["token_id"] == GH[0][:8] + "..." + GH[0][-4:] and first["usage_count"] == 3
    assert first["endpoints_used"] == {"/users/octocat": 3} and first["rate_limit"]["limit"] == 5000
    stats = requests.get(url + "/admin/pool/stats", headers=auth, timeout=10).json()
    assert stats["tokens"]["effective_limit"] == 15000 and stats["recent_requests"][0]["client"] == "alpha"
    # the middleware's own admin JSON is about the clients' keys, as before
    clients = requests.get(url + "/admin/stats", headers=auth, timeout=10).json()
    assert clients["tokens"]["count"] == 6 and clients["total_requests"] == 3


# -- secrets ----------------------------------------------------------------------------------
def test_no_secret_in_metrics_logs_responses_or_errors(stack, keys, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    url, app, fake = stack("openai", OPENAI, cooldown_after=1)
    fake.revoke(OPENAI[0])
    seen = []

    def keep(r):
        seen.append(r.text + json.dumps(dict(r.headers)))
        return r
    client_keys = list(keys[1].values()) + ["atk_this_is_someone_elses_real_key_0123456789"]
    for raw in client_keys:
        keep(get(url, raw, path="/v1/chat/completions", method="POST", json={"model": "gpt-4o"}))
        keep(requests.get(url + "/v1/models", headers={"Authorization": f"Bearer {raw}"}, timeout=10))
    fake.fail_next = 1
    keep(get(url, keys[1]["alpha"], path="/v1/x"))
    fake.revoke(OPENAI[1])
    keep(get(url, keys[1]["alpha"], path="/v1/x"))                              # 503: none valid
    dead_url, dead_app, _ = stack("openai", OPENAI, upstream=f"http://127.0.0.1:{free_port()}")
    keep(get(dead_url, keys[1]["alpha"]))                                      # 502
    auth = {"Authorization": "Bearer admin-secret-token"}
    for u in (url, dead_url):
        for path in ("/metrics", "/admin/pool/token-details", "/admin/pool/stats", "/admin/stats",
                     "/admin/token-details", "/healthz"):
            keep(requests.get(u + path, headers=auth, timeout=10))
        keep(requests.get(u + "/metrics", headers={"Accept": "application/openmetrics-text"}, timeout=10))
    captured = capsys.readouterr()
    haystack = "\n".join(seen) + caplog.text + captured.out + captured.err
    for secret in client_keys + OPENAI:
        assert secret not in haystack
        assert secret[4:20] not in haystack and secret[-20:] not in haystack
    for request in fake.seen:                                 # the upstream never sees a client's key
        assert not any(raw in value for raw in client_keys for value in request["headers"].values())
    assert {r["secret"] for r in fake.seen} <= set(OPENAI)
    assert OPENAI[0][:12] + "..." + OPENAI[0][-4:] in haystack         # masked, as admins see it


# -- under gunicorn -----------------------------------------------------------------------------
@pytest.mark.integration
@needs("server")
def test_gunicorn_workers_share_what_they_learn_through_the_state_dir(keys, tmp_path):
    fake = FakeUpstream("github")
    for secret in GH:
        fake.add(secret)
    upstream = fake.serve()
    env = dict(os.environ, **{f"UPSTREAM_SECRET_{i}": s for i, s in enumerate(GH)})
    pool_file = tmp_path / "pool.yml"
    pool_file.write_text(yaml.safe_dump({"provider": "github", "refresh_interval": 0, "sync_interval": "1s",
                                         "credentials": [{"id": f"gh-{i}", "secret_env": f"UPSTREAM_SECRET_{i}"}
                                                         for i in range(3)]}))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "api_token_exporter.cli", "proxy", "--pool", str(pool_file), "--upstream", upstream,
         "--keys-file", keys[0], "--port", str(port), "--workers", "2", "--threads", "4",
         "--state-dir", str(tmp_path / "state")],
        env=dict(env, ATE_METRICS_PUBLIC="true"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_port(port, proc)
        url = f"http://127.0.0.1:{port}"
        fake.revoke(GH[0])
        session = requests.Session()
        assert get(url, keys[1]["alpha"]).status_code == 200
        time.sleep(2.5)                                        # both workers synced from the store
        for _ in range(20):
            assert session.get(url + "/repos/a/b", headers={"X-API-Key": keys[1]["alpha"]}).status_code == 200
        assert used(fake).count(GH[0]) == 1                    # the other worker never tried it
        text = requests.get(url + "/metrics", timeout=10).text
        assert sample_total(text, "apitoken_upstream_credential_status", credential="gh-0", status="invalid") == 1
        assert sample_total(text, "apitoken_requests_total", token="alpha") == 21
        assert sample_total(text, "apitoken_upstream_requests_total") == 22
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=20)[0]
        fake.stop()
    assert proc.returncode == 0, out
    assert all(s not in out for s in GH + list(keys[1].values()))
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
    _ = stop_process


def test_the_cli_names_a_bad_pool_entry_and_never_its_secret(tmp_path, capsys, monkeypatch):
    from api_token_exporter import cli
    monkeypatch.setenv("GH_X", GH[0])
    pool = tmp_path / "pool.yml"
    pool.write_text(yaml.safe_dump({"upstream": "https://api.github.com", "provider": "github",
                                    "credentials": [{"id": "ok", "secret_env": "GH_X"},
                                                    {"id": "dup", "secret_env": "GH_X"}]}))
    monkeypatch.setenv("ATE_UPSTREAM_POOL_FILE", "")         # the command sets it: restored after the test
    assert cli.main(["proxy", "--pool", str(pool)]) == 2
    err = capsys.readouterr().err
    assert "credentials[1]: same secret as ok" in err and GH[0] not in err and GH[0][4:20] not in err
    monkeypatch.delenv("ATE_UPSTREAM_POOL_FILE")
    assert cli.main(["proxy"]) == 2 and "needs a pool file" in capsys.readouterr().err


@needs("server")
def test_the_served_pool_knows_its_credentials_limits_before_the_first_request(keys, tmp_path, caplog):
    """`api-token-exporter proxy` asks idle GitHub credentials (the free /rate_limit) as soon as
    its worker has loaded, so the pool's JSON has their limits before any client came."""
    from support import running_cli
    fake = FakeUpstream("github", limit=5000)
    for secret in GH[:2]:
        fake.add(secret)
    upstream = fake.serve()
    pool_file = tmp_path / "pool.yml"
    pool_file.write_text(yaml.safe_dump({"provider": "github", "refresh_interval": "1h", "credentials": [
        {"id": f"gh-{i}", "secret_env": f"UPSTREAM_SECRET_{i}"} for i in range(2)]}))
    env = {f"UPSTREAM_SECRET_{i}": s for i, s in enumerate(GH[:2])}
    try:
        with running_cli(["proxy", "--pool", str(pool_file), "--upstream", upstream, "--workers", "1"], tmp_path,
                         env, keys_file=keys[0], admin_token="a" * 32) as port:
            # before any request to the proxy: it asked each credential by itself
            wait_for("both credentials asked", lambda: len(fake.seen) >= 2, timeout=20, interval=0.2)
            assert [s["path"] for s in fake.seen] == ["/rate_limit"] * 2
            r = requests.get(f"http://127.0.0.1:{port}/admin/pool/stats", timeout=10,
                             headers={"Authorization": "Bearer " + "a" * 32})
            assert r.json()["tokens"]["effective_limit"] == 10000
    finally:
        fake.stop()
