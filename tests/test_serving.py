"""Real serving: gunicorn with several threaded workers under concurrent scrapes, against
prometheus_client's MultiProcessCollector as the oracle; `serve` stopped by signals; counters
that survive a restart with state_dir, as a real Prometheus sees them."""
import collections
import concurrent.futures
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from api_token_exporter.core.keystore import add_key
from support import free_port, needs, sample_total, samples, start_serve, wait_for

pytestmark = pytest.mark.integration
DEMO = "devstack.demo:app_from_env()"
CLI = [sys.executable, "-m", "api_token_exporter.cli"]

ORACLE = """
import json, os, sys
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.multiprocess import MultiProcessCollector
events = json.load(open(sys.argv[1]))
counter = Counter("apitoken_requests", "requests", ["token", "code"])
children = []
for part in (events[0::2], events[1::2]):          # two processes, as two workers
    pid = os.fork()
    if pid == 0:
        for token, code in part:
            counter.labels(token, code).inc()
        os._exit(0)
    children.append(pid)
for pid in children:
    os.waitpid(pid, 0)
registry = CollectorRegistry()
MultiProcessCollector(registry)
out = {}
for family in registry.collect():
    for s in family.samples:
        if s.name == "apitoken_requests_total":
            out[s.labels["token"] + "|" + s.labels["code"]] = s.value
print(json.dumps(out))
"""


def oracle_counts(tmp_path, events):
    """The same (token, code) events through prometheus_client's multiprocess mode."""
    path = tmp_path / "events.json"
    path.write_text(json.dumps(events))
    mp = tmp_path / "oracle-mp"
    mp.mkdir()
    result = subprocess.run([sys.executable, "-c", ORACLE, str(path)], capture_output=True, text=True,
                            env=dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(mp)), timeout=120, check=True)
    return {tuple(k.split("|")): v for k, v in json.loads(result.stdout).items()}


def test_gunicorn_threaded_workers_under_concurrent_scrapes_count_exactly(gunicorn_app, tmp_path):
    keys_file = str(tmp_path / "keys.yml")
    limits = {"minute": 1_000_000, "hour": 1_000_000, "day": 1_000_000}
    raw = {t: add_key(keys_file, t, rate_limits=limits) for t in ("alpha", "beta", "gamma")}
    raw["tight"] = add_key(keys_file, "tight", rate_limits={"minute": 50})
    url = gunicorn_app(DEMO, workers=2, threads=4, keys_file=keys_file)

    total = 20_000
    plan = []
    for i in range(total):
        token = ("alpha", "beta", "gamma", "tight", None)[i % 5]
        path = ("/api/v1/items", "/api/v1/items/7", "/api/v1/items/500", "/api/v1/nowhere")[i % 4]
        plan.append((token, path))

    stop = threading.Event()
    scrape_errors, scrapes = [], collections.Counter()

    def scraper(n):
        last = {}
        session = requests.Session()
        while not stop.is_set():
            try:
                text = session.get(url + "/metrics", timeout=30).text
                current = {}
                for family in text_string_to_metric_families(text):
                    for s in family.samples:
                        if s.name == "apitoken_requests_total":
                            current[tuple(sorted(s.labels.items()))] = s.value
            except Exception as exc:
                scrape_errors.append(repr(exc))
                return
            went_down = [k for k, v in last.items() if current.get(k, 0) < v]
            if went_down:
                scrape_errors.append(f"scraper {n}: {went_down[:3]} went down")
            if sum(current.values()) > total:
                scrape_errors.append(f"scraper {n}: {sum(current.values())} > {total} sent")
            last = current
            scrapes[n] += 1
            stop.wait(0.2)

    def client(part):
        host, port = url.split("//")[1].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)   # keep-alive, light client
        got = []
        for token, path in part:
            conn.request("GET", path, headers={"X-API-Key": raw[token]} if token else {})
            response = conn.getresponse()
            response.read()
            got.append((token or "__unauthenticated__", str(response.status)))
        conn.close()
        return got

    scrapers = [threading.Thread(target=scraper, args=(n,)) for n in range(4)]
    for t in scrapers:
        t.start()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        events = [e for part in pool.map(client, [plan[i::8] for i in range(8)]) for e in part]
    stop.set()
    for t in scrapers:
        t.join()

    assert scrape_errors == []
    assert min(scrapes[n] for n in range(4)) >= 2, scrapes
    sent = collections.Counter(events)
    assert sum(sent.values()) == total
    assert sent[("tight", "429")] > 0 and sent[("__unauthenticated__", "401")] == total // 5
    text = requests.get(url + "/metrics", timeout=30).text
    ours = {(t, c): sample_total(text, "apitoken_requests_total", token=t, code=c) for t, c in sent}
    assert ours == dict(sent)
    assert sample_total(text, "apitoken_requests_total") == total
    assert sample_total(text, "apitoken_request_duration_seconds_count") == total
    assert oracle_counts(tmp_path, [list(e) for e in events]) == {k: float(v) for k, v in sent.items()}


def process_group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@needs("server")
def test_a_signal_to_serve_stops_every_worker_and_frees_the_port(tmp_path, keys, sig):
    proc, port = start_serve(tmp_path, "--workers", "4", "--keys-file", keys[0])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:            # the master (the CLI itself) and four workers
        group = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
        if len(group) == 5:
            break
        time.sleep(0.1)
    assert len(group) == 5
    proc.send_signal(sig)
    # gunicorn gives its workers graceful_timeout (30 s) to finish; one still booting may need it all
    assert proc.wait(timeout=60) == 0
    deadline = time.monotonic() + 10
    while process_group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not process_group_alive(proc.pid), "a worker outlived the server"
    assert port_free(port)


@needs("server")
def test_workers_end_with_a_killed_master_and_a_restart_gets_the_port_and_the_counts(tmp_path, keys):
    """kill -9 of the master while requests are in flight: its workers end (they do not go on
    serving and holding the port), a new server binds the same port at once, and what the dead
    workers counted is in its totals (their files are folded at start)."""
    import threading
    state = tmp_path / "state"
    env = {"ATE_INGEST_TOKEN": "in"}
    args = ["--workers", "2", "--threads", "4", "--keys-file", keys[0], "--state-dir", str(state)]
    proc, port = start_serve(tmp_path, *args, env=env)
    workers = wait_for("two workers", lambda: (lambda pids: len(pids) == 2 and pids)(subprocess.run(
        ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()), timeout=30)
    post_events(port, 25)
    accepted, stop = [], threading.Event()

    def load():                  # keep-alive clients with requests in flight when the master dies
        session = requests.Session()
        while not stop.is_set():
            try:
                r = session.post(f"http://127.0.0.1:{port}/v1/events", timeout=5, headers={"Authorization": "Bearer in"},
                                  json={"events": [{"token": "alpha", "route": "/orders/{id}", "method": "GET",
                                                    "status": 200, "duration_ms": 4}]})
                if r.status_code == 200:
                    accepted.append(r.json()["accepted"])
            except requests.RequestException:
                pass
    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for("some load", lambda: len(accepted) >= 20, timeout=30)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        wait_for("the workers to end", lambda: not any(os.path.exists(f"/proc/{w}") for w in workers), timeout=10,
                 interval=0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
    # connections the dead workers had are in TIME_WAIT: gunicorn binds with SO_REUSEADDR
    again, _ = start_serve(tmp_path, *args, env=env, port=port)
    try:
        assert again.poll() is None, "the new server could not bind the port"
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        # every accepted event counted once; one answered as the master died may be lost to the
        # client yet counted, never the other way round
        assert 25 + sum(accepted) <= sample_total(text, "apitoken_requests_total", token="alpha") <= 25 + sum(accepted) + 4
    finally:
        again.send_signal(signal.SIGTERM)
        again.wait(timeout=60)


@needs("server")
def test_sigterm_drains_keep_alive_clients_without_resetting_a_request(tmp_path, keys):
    """SIGTERM under load from kept-alive clients: every request sent is answered (the last ones
    with Connection: close, and the clients reconnect at once), then new connections are refused;
    no request is reset, neither on a kept-alive connection nor on one the kernel completed as
    the listener closed, and what was acknowledged is exactly what the next run counts."""
    import threading
    state = tmp_path / "state"
    env = {"ATE_INGEST_TOKEN": "in"}
    args = ["--workers", "2", "--threads", "4", "--keys-file", keys[0], "--state-dir", str(state)]
    proc, port = start_serve(tmp_path, *args, env=env)
    body = json.dumps({"events": [{"token": "alpha", "route": "/orders/{id}", "method": "GET", "status": 200,
                                   "duration_ms": 4}]})
    acknowledged, closes, resets, refused = [], [], [], []

    def load():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while True:
            fresh = conn.sock is None
            try:
                conn.request("POST", "/v1/events", body=body, headers={"Authorization": "Bearer in"})
                response = conn.getresponse()
                answer = json.loads(response.read())
            except ConnectionRefusedError:
                assert fresh
                refused.append(1)
                return
            except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected) as exc:
                resets.append((type(exc).__name__, "new connection" if fresh else "kept alive"))
                conn.close()
                continue
            acknowledged.append(answer["accepted"])
            if response.will_close:
                closes.append(1)
                conn.close()
    threads = [threading.Thread(target=load) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        wait_for("some load", lambda: len(acknowledged) >= 300, timeout=30, interval=0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        for t in threads:
            t.join(timeout=30)
    assert resets == [] and len(refused) == 8 and closes, (resets, len(refused), len(closes))
    again, _ = start_serve(tmp_path, *args, env=env, port=port)
    try:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        assert sample_total(text, "apitoken_requests_total", token="alpha") == sum(acknowledged)
    finally:
        again.send_signal(signal.SIGTERM)
        again.wait(timeout=60)


@needs("server")
def test_workers_replaced_by_a_reload_leave_the_port_accepting(tmp_path, keys):
    """SIGHUP replaces the workers (each old one told to stop, as on SIGTERM) while the master
    keeps the listener: new connections go on being answered, and only the master's own stop
    refuses them."""
    proc, port = start_serve(tmp_path, "--workers", "2", "--keys-file", keys[0])
    children = lambda: set(subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                          text=True).stdout.split())
    try:
        first = wait_for("two workers", lambda: len(children()) == 2 and children(), timeout=30)
        proc.send_signal(signal.SIGHUP)
        wait_for("two new workers", lambda: (lambda now: len(now) == 2 and not now & first)(children()),
                 timeout=30, interval=0.05)
        for _ in range(20):               # fresh connections, one per request
            assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5,
                                headers={"Connection": "close"}).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)


@needs("server")
def test_serve_refuses_metrics_port_with_several_workers_and_bad_settings(tmp_path, keys):
    refused = subprocess.run(CLI + ["serve", "--workers", "2", "--keys-file", keys[0]], capture_output=True,
                             text=True, timeout=60, env=dict(os.environ, ATE_METRICS_PORT=str(free_port())))
    assert refused.returncode == 2
    assert "metrics_port" in refused.stderr and "one worker" in refused.stderr
    bad = subprocess.run(CLI + ["serve", "--keys-file", keys[0]], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, ATE_STORE_CAPACITY="lots"))
    assert bad.returncode == 2 and "store_capacity" in bad.stderr


def post_events(port, n, token="alpha"):
    events = [{"token": token, "route": "/orders/{id}", "method": "GET", "status": 200, "duration_ms": 4}] * n
    r = requests.post(f"http://127.0.0.1:{port}/v1/events", json={"events": events}, timeout=10,
                      headers={"Authorization": "Bearer in"})
    assert r.json()["accepted"] == n


@needs("server")
def test_counters_survive_a_restart_with_state_dir(tmp_path, keys):
    state = tmp_path / "state"
    env = {"ATE_INGEST_TOKEN": "in"}
    args = ["--workers", "2", "--keys-file", keys[0], "--state-dir", str(state)]
    proc, port = start_serve(tmp_path, *args, env=env)
    post_events(port, 60)
    post_events(port, 40)
    assert sample_total(requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text,
                        "apitoken_requests_total", token="alpha") == 100
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    proc, port = start_serve(tmp_path, *args, env=env, port=port)
    try:
        post_events(port, 50)
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        assert sample_total(text, "apitoken_requests_total", token="alpha") == 150
        assert sample_total(text, "apitoken_request_duration_seconds_count", token="alpha") == 150
        assert sample_total(text, "apitoken_ingest_events_total", result="accepted") == 150
        # the folded files of the first run are gone: the archive and the live workers' files
        assert len(list(state.glob("ate-*.data"))) <= 2 and (state / "archive.json").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.parametrize("keep_state", [True, False], ids=["state_dir", "no_state_dir"])
@needs("server")
def test_analytics_stay_exact_across_a_restart(tmp_path, keys, keep_state):
    from api_token_exporter.analytics.queries import PrometheusClient
    from api_token_exporter.analytics.exact import samples_increase
    from devstack.stack import prometheus_config, start_prometheus
    port = free_port()
    prom = start_prometheus(str(tmp_path / "prom"), prometheus_config(
        {"api-token-exporter": [f"127.0.0.1:{port}"]}, None, str(tmp_path / "no-rules"),
        scrape_interval="1s", evaluation_interval="1s"))
    env = {"ATE_INGEST_TOKEN": "in", "ATE_ADMIN_TOKEN": "adm", "ATE_PROMETHEUS_URL": prom.url}
    args = ["--keys-file", keys[0]] + (["--state-dir", str(tmp_path / "state")] if keep_state else [])
    proc = None
    try:
        client = PrometheusClient(prom.url)

        def scraped_value(expected):
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                got = client.query('sum(apitoken_requests_total{token="alpha"})', time.time())
                if got and got[0][1] == expected:
                    time.sleep(1.5)                       # and once more
                    return
                time.sleep(0.2)
            raise AssertionError(f"Prometheus never saw {expected}")

        proc, _ = start_serve(tmp_path, *args, env=env, port=port)
        post_events(port, 100)
        scraped_value(100)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        proc, _ = start_serve(tmp_path, *args, env=env, port=port)
        post_events(port, 50)
        scraped_value(150 if keep_state else 50)
        usage = requests.get(f"http://127.0.0.1:{port}/api/analytics/usage", timeout=30,
                             headers={"Authorization": "Bearer adm"}).json()
        now = time.time()
        resets = client.query('resets(apitoken_requests_total{token="alpha"}[10m])', now)
        raw = client.query_samples('apitoken_requests_total{token="alpha"}[10m]', now)
        scraped = sum(samples_increase(values, now - 600) for _, values in raw)
        assert scraped == 150, raw                        # Prometheus saw every increment
        assert usage["summary"]["allTime"]["requests"] == 150
        assert usage["summary"]["today"]["requests"] == 150 or dt_is_midnight(now)
        if keep_state:
            assert [v for _, v in resets] == [0.0]        # no reset: the counter continued
        else:
            assert sum(v for _, v in resets) >= 1         # it did reset, and nothing was lost
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        prom.stop()


def dt_is_midnight(ts: float) -> bool:
    """The test straddled 00:00 UTC, when 'today' legitimately starts over."""
    return time.gmtime(ts).tm_hour == 0 and time.gmtime(ts).tm_min == 0


@needs("server")
def test_serve_threads_create_series_while_four_scrapers_read(tmp_path, keys):
    """One threaded worker: ingest threads add new tokens and routes (new series) while four
    threads scrape; no scrape fails, no counter goes down, the final totals are exact."""
    env = {"ATE_INGEST_TOKEN": "in", "ATE_INGEST_ALLOW_UNKNOWN_TOKENS": "true"}
    proc, port = start_serve(tmp_path, "--threads", "8", "--keys-file", keys[0], env=env)
    url = f"http://127.0.0.1:{port}"
    stop = threading.Event()
    errors, scrapes = [], collections.Counter()

    def scraper(n):
        session, last = requests.Session(), 0.0
        while not stop.is_set():
            try:
                r = session.get(url + "/metrics", timeout=30)
                assert r.status_code == 200, r.status_code
                total = sample_total(r.text, "apitoken_requests_total")
            except Exception as exc:
                errors.append(repr(exc))
                return
            if total < last:
                errors.append(f"{last} -> {total}")
            last = total
            scrapes[n] += 1

    def writer(w):
        session = requests.Session()
        for batch in range(20):
            events = [{"token": f"svc-{w}-{batch}", "route": f"/r/{w}/{batch}/{i}", "status": 200 + (i % 4) * 100,
                       "duration_ms": i} for i in range(25)]
            r = session.post(url + "/v1/events", json=events, headers={"Authorization": "Bearer in"}, timeout=30)
            assert r.json()["accepted"] == 25

    threads = [threading.Thread(target=scraper, args=(n,)) for n in range(4)]
    try:
        for t in threads:
            t.start()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(writer, range(4)))
        stop.set()
        for t in threads:
            t.join()
        assert errors == [] and min(scrapes[n] for n in range(4)) >= 1, (errors, scrapes)
        text = requests.get(url + "/metrics", timeout=30).text
        assert sample_total(text, "apitoken_requests_total") == 4 * 20 * 25
        assert sum(v for l, v in samples(text, "apitoken_requests_total").items()
                   if dict(l)["code"].startswith("5")) == 4 * 20 * 6
    finally:
        stop.set()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
