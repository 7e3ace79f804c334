"""One ingest client floods the real service with label combinations (route x method x status
under one known token): the series stay bounded by the token's budget, nothing sent is lost
from the totals, and the real keys that come after keep their own routes and models."""
import subprocess
import time

import requests

from api_token_exporter.core.metrics import Metrics
from api_token_exporter.core.keystore import add_key
from support import INGEST, needs, running_cli as running, samples

FLOOD = 400_000
METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "FOO")


def test_a_tokens_budget_sends_new_combinations_to_overflow_and_counts_them():
    m = Metrics(max_series_per_token=3, known_routes=["/known"])
    for code in (200, 201, 202, 500, 503, 404):
        m.observe_request("t", "/a", "GET", code, 0.01, True)
    m.observe_request("t", "/known", "GET", 200, 0.01, True)
    m.observe_request("t", "/a", "GET", 200, 0.01, True)       # one it has: still its own
    m.observe_request("u", "/a", "GET", 200, 0.01, True)       # another token: its own budget
    values = m.store.values_by_key(m.requests)
    assert values == {("t", "/a", "GET", "200"): 2, ("t", "/a", "GET", "201"): 1, ("t", "/a", "GET", "202"): 1,
                      ("t", "__overflow__", "GET", "5xx"): 2, ("t", "__overflow__", "GET", "4xx"): 1,
                      ("t", "/known", "GET", "2xx"): 1, ("u", "/a", "GET", "200"): 1}
    assert m.store.values_by_key(m.series_overflow) == {("t",): 4}


def worker_rss_mib(master_pid: int) -> float:
    children = subprocess.run(["pgrep", "-P", str(master_pid)], capture_output=True, text=True).stdout.split()
    total = 0
    for pid in children:
        with open(f"/proc/{pid}/status") as fh:
            total += next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
    return total / 1024


@needs("server")
def test_a_combination_flood_ends_bounded_and_the_real_keys_keep_their_routes_and_models(tmp_path):
    keys_file = str(tmp_path / "keys.yml")
    for token in ("flood", "real1", "real2"):
        add_key(keys_file, token, rate_limits={"minute": 10 ** 9})
    with running(["serve"], tmp_path, keys_file=keys_file, ingest_token=INGEST, metrics_public="true",
                 known_routes="/v1/chat/completions", ingest_max_events=5000,
                 ingest_max_bytes=4_000_000) as port:
        url = f"http://127.0.0.1:{port}"
        session = requests.Session()
        headers = {"Authorization": f"Bearer {INGEST}"}
        sent = 0
        while sent < FLOOD:
            batch = [{"token": "flood", "route": f"/r/{i % 2999}", "method": METHODS[(i // 2999) % 6],
                      "status": 100 + (i * 13 // 7) % 500, "duration_ms": 2} for i in range(sent, sent + 5000)]
            r = session.post(url + "/v1/events", json=batch, headers=headers, timeout=60)
            assert r.status_code == 200 and r.json()["accepted"] == 5000
            sent += 5000
        real = [{"token": token, "route": "/v1/chat/completions", "method": "POST", "status": 200,
                 "duration_ms": 300, "llm": {"service": "openai", "model": "gpt-4o", "input_tokens": 10,
                                             "output_tokens": 5}} for token in ("real1", "real2") for _ in range(7)]
        assert session.post(url + "/v1/events", json=real, headers=headers, timeout=60).json()["accepted"] == 14
        started = time.monotonic()
        text = session.get(url + "/metrics", timeout=60).text
        render = time.monotonic() - started
        rss = worker_rss_mib(int(subprocess.run(["pgrep", "-f", "--", f"serve --port {port}"], capture_output=True,
                                                text=True).stdout.split()[0]))
    lines = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
    requests_total = samples(text, "apitoken_requests_total")
    flood = {dict(k)["route"]: 0 for k in requests_total if dict(k)["token"] == "flood"}
    flood_series = sum(1 for k in requests_total if dict(k)["token"] == "flood")
    print(f"{FLOOD} events: {lines} samples ({flood_series} request series of the flooding token), "
          f"/metrics {len(text) / 1e6:.1f} MB in {render:.2f} s, worker RSS {rss:.0f} MiB")
    assert flood_series <= 1000 + 10 * 5 and "__overflow__" in flood
    assert sum(v for k, v in requests_total.items() if dict(k)["token"] == "flood") == FLOOD   # none lost
    assert samples(text, "apitoken_series_overflow_total")[(("token", "flood"),)] > 0
    assert lines < 150_000 and rss < 400
    for token in ("real1", "real2"):
        mine = {dict(k)["route"]: v for k, v in requests_total.items() if dict(k)["token"] == token}
        assert mine == {"/v1/chat/completions": 7}
        models = {dict(k)["model"]: v for k, v in samples(text, "apitoken_llm_requests_total").items()
                  if dict(k)["token"] == token}
        assert models == {"gpt-4o": 7}
