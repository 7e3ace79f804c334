"""Guessing credentials against the real service (`serve`, two gunicorn workers): each address
gets a bounded number of tries, then 429 with Retry-After, and no other address is affected."""
import http.client
import os
import subprocess
import sys

from api_token_exporter.core.keystore import add_key
from support import free_port, needs, sample_total, stop_process, wait_for_port

LIMIT = 5


def get(port, path, source="127.0.0.1", method="GET", **headers):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=(source, 0))
    try:
        conn.request(method, path, body=b"[]" if method == "POST" else None, headers=headers)
        response = conn.getresponse()
        return response.status, response.headers, response.read()      # names in any case
    finally:
        conn.close()


@needs("server")
def test_wrong_bearer_tokens_are_throttled_per_address_on_every_protected_endpoint(tmp_path):
    keys_file = tmp_path / "keys.yml"
    add_key(str(keys_file), "alpha")
    port = free_port()
    env = dict(os.environ, ATE_KEYS_FILE=str(keys_file), ATE_ADMIN_TOKEN="admin-secret", ATE_INGEST_TOKEN="in",
               ATE_METRICS_BEARER_TOKEN="metrics-secret", ATE_AUTH_FAILURE_LIMIT=str(LIMIT),
               ATE_ADMIN_RATE_LIMIT="100000")
    proc = subprocess.Popen([sys.executable, "-m", "api_token_exporter.cli", "serve", "--port", str(port),
                             "--workers", "2", "--threads", "4"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc, timeout=60)
        answers = [get(port, "/admin/stats", Authorization=f"Bearer guess-{i}") for i in range(300)]
        codes = [status for status, _, _ in answers]
        # every request answered; each worker allows LIMIT failures, then only 429s
        assert set(codes) == {401, 429} and LIMIT <= codes.count(401) <= 2 * LIMIT, codes
        assert codes[:LIMIT] == [401] * LIMIT
        throttled = [(headers, body) for status, headers, body in answers if status == 429]
        assert all(0 < int(h["Retry-After"]) <= 60 and b"auth_failure_limit" in b for h, b in throttled)
        # the right token from the throttled address waits too; the other endpoints as well
        assert get(port, "/admin/stats", Authorization="Bearer admin-secret")[0] == 429
        assert get(port, "/metrics", Authorization="Bearer metrics-secret")[0] == 429
        assert get(port, "/healthz")[0] == 200                        # health is always answered
        # another address: its own tries, the right token works
        assert get(port, "/admin/stats", "127.0.0.2", Authorization="Bearer admin-secret")[0] == 200
        assert get(port, "/admin/stats", "127.0.0.2", Authorization="Bearer wrong")[0] == 401
        status, _, body = get(port, "/metrics", "127.0.0.2", Authorization="Bearer metrics-secret")
        assert status == 200
        text = body.decode()
        assert sample_total(text, "apitoken_auth_failures_total", reason="throttled") >= 300 - 2 * LIMIT + 2
        assert sample_total(text, "apitoken_auth_failures_by_client_total", client="127.0.0.1") >= 300 - 2 * LIMIT
        # guessed metrics and ingest tokens count the same way, each address on its own
        for source, method, path in (("127.0.0.3", "GET", "/metrics"), ("127.0.0.4", "POST", "/v1/events")):
            codes = [get(port, path, source, method, Authorization=f"Bearer nope-{i}")[0] for i in range(60)]
            assert set(codes) == {401, 429} and codes.count(401) <= 2 * LIMIT, (path, codes)
    finally:
        stop_process(proc)
