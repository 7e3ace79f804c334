"""The metric store against prometheus_client: the same events give the same families and
samples in both formats; several processes sum exactly; promtool accepts the output."""
import multiprocessing
import os
import random
import subprocess

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from api_token_exporter.core.usage import LLMUsage
from api_token_exporter.core.metrics import AUTH_FAILURE_REASONS, Metrics, catalogue
from api_token_exporter.core.ratelimit import WindowState
from support import require_binary


def reference_registry():
    """prometheus_client objects with the catalogue's names, help texts and labels."""
    registry = CollectorRegistry()
    objects = {}
    for f in catalogue():
        name = f.name[:-6] if f.kind == "counter" else f.name
        if f.kind == "counter":
            objects[f.name] = Counter(name, f.help, f.labelnames, registry=registry)
        elif f.kind == "histogram":
            objects[f.name] = Histogram(name, f.help, f.labelnames, buckets=f.buckets, registry=registry)
        else:
            objects[f.name] = Gauge(name, f.help, f.labelnames, registry=registry)
    return registry, objects


def drive(metrics, ref, seed=7, tokens=40):
    """The same random events into our Metrics and into prometheus_client objects."""
    rnd = random.Random(seed)
    for reason in AUTH_FAILURE_REASONS:
        ref["apitoken_auth_failures_total"].labels(reason)
    for result in ("accepted", "rejected"):
        ref["apitoken_ingest_events_total"].labels(result)
    ref["apitoken_rate_limit_storage_errors_total"]
    for i in range(3000):
        token = f"tok-{rnd.randrange(tokens)}"
        route = rnd.choice(["/a", "/b/<id>", '/we"ird\\path'])
        code = rnd.choice([200, 200, 404, 500])
        duration = rnd.choice([0.001, 0.02, 0.3, 1.5, 3.0, 12.0])
        now = 1_700_000_000 + i
        metrics.observe_request(token, route, "GET", code, duration, authenticated=True, now=now)
        ref["apitoken_requests_total"].labels(token, route, "GET", str(code)).inc()
        ref["apitoken_request_duration_seconds"].labels(token).observe(duration)
        ref["apitoken_route_request_duration_seconds"].labels(route, "GET").observe(duration)
        ref["apitoken_token_last_used_timestamp_seconds"].labels(token).set(now)
        windows = [WindowState("minute", 100, rnd.randrange(100), now + 30.5),
                   WindowState("hour", 1000, rnd.randrange(1000), now + 1800)]
        metrics.set_windows(token, windows, now)
        for w in windows:
            ref["apitoken_rate_limit_limit"].labels(token, w.window).set(w.limit)
            ref["apitoken_rate_limit_remaining"].labels(token, w.window).set(w.remaining)
            ref["apitoken_rate_limit_reset_timestamp_seconds"].labels(token, w.window).set(w.reset_at)
        if i % 7 == 0:
            metrics.observe_llm(token, LLMUsage("openai", "gpt-4", 10, 20), 0.0009)
            ref["apitoken_llm_tokens_total"].labels(token, "openai", "gpt-4", "input").inc(10)
            ref["apitoken_llm_tokens_total"].labels(token, "openai", "gpt-4", "output").inc(20)
            ref["apitoken_llm_requests_total"].labels(token, "openai", "gpt-4").inc()
            ref["apitoken_llm_cost_usd_total"].labels(token, "openai", "gpt-4").inc(0.0009)
        if i % 11 == 0:
            client = f"10.0.0.{rnd.randrange(5)}"
            metrics.auth_failure("invalid", client)
            ref["apitoken_auth_failures_total"].labels("invalid").inc()
            ref["apitoken_auth_failures_by_client_total"].labels(client).inc()
            metrics.observe_rate_limited(token, "minute")
            ref["apitoken_rate_limited_total"].labels(token, "minute").inc()


def normalise(families):
    out = {}
    for fam in families:
        samples = sorted((s.name, tuple(sorted(s.labels.items())), round(s.value, 9)) for s in fam.samples
                         if not s.name.endswith("_created"))
        if samples:
            out[fam.name] = (fam.type, fam.documentation, samples)
    return out


@pytest.fixture
def pair():
    registry, ref = reference_registry()
    metrics = Metrics(directory="")
    drive(metrics, ref)
    return metrics, registry


def test_text_exposition_parses_identically_to_prometheus_client(pair):
    metrics, registry = pair
    ours = normalise(text_string_to_metric_families(metrics.store.render().decode()))
    theirs = normalise(text_string_to_metric_families(generate_latest(registry).decode()))
    assert set(ours) == set(theirs)
    for name in theirs:
        assert ours[name] == theirs[name], name


def test_openmetrics_parses_identically_to_prometheus_client(pair):
    metrics, registry = pair
    ours = normalise(parse_openmetrics(metrics.store.render(openmetrics=True).decode()))
    theirs = normalise(parse_openmetrics(generate_openmetrics(registry).decode()))
    assert ours == theirs


def test_promtool_accepts_the_output(pair):
    metrics, _ = pair
    result = subprocess.run([require_binary("promtool"), "check", "metrics"],
                            input=metrics.store.render().decode(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout


def _worker(directory, token, n, stamp):
    m = Metrics(directory=directory)
    for _ in range(n):
        m.observe_request(token, "/a", "GET", 200, 0.2, authenticated=True, now=stamp)
        m.observe_llm("shared", LLMUsage("openai", "gpt-4", 3, 4), 0.5)
    m.set_windows("shared", [WindowState("minute", 100, 100 - n, stamp + 60)], stamp)


def test_several_processes_sum_exactly_and_gauges_take_the_newest(tmp_path):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_worker, args=(str(tmp_path), f"t{i}", 100 * (i + 1), 1000.0 + i))
             for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    reader = Metrics(directory=str(tmp_path))
    text = reader.store.render().decode()
    from support import sample_total
    for i in range(4):
        assert sample_total(text, "apitoken_requests_total", token=f"t{i}") == 100 * (i + 1)
        assert sample_total(text, "apitoken_request_duration_seconds_count", token=f"t{i}") == 100 * (i + 1)
        assert sample_total(text, "apitoken_token_last_used_timestamp_seconds", token=f"t{i}") == 1000.0 + i
    assert sample_total(text, "apitoken_llm_tokens_total", token="shared", type="input") == 3 * 1000
    assert sample_total(text, "apitoken_llm_cost_usd_total", token="shared") == pytest.approx(500.0)
    # the newest write (process 3, stamp 1003) wins for a gauge shared by all
    assert sample_total(text, "apitoken_rate_limit_remaining", token="shared") == 100 - 400


def test_a_forked_child_writes_its_own_file(tmp_path):
    parent = Metrics(directory=str(tmp_path))
    parent.observe_request("p", "/a", "GET", 200, 0.1, authenticated=False)
    pid = os.fork()
    if pid == 0:
        try:
            parent.observe_request("child", "/a", "GET", 200, 0.1, authenticated=False)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    from support import sample_total
    text = parent.store.render().decode()
    assert sample_total(text, "apitoken_requests_total", token="p") == 1
    assert sample_total(text, "apitoken_requests_total", token="child") == 1
    assert len(list(tmp_path.glob("ate-*.data"))) == 2


def test_one_scrape_reads_the_worker_files_once(tmp_path, keys):
    from api_token_exporter.core.keystore import KeyStore
    from api_token_exporter.core.metrics import ScrapeView
    from api_token_exporter.core.stats import UsageTracker
    from api_token_exporter.core.live import RequestFeed
    metrics = Metrics(directory=str(tmp_path))
    metrics.observe_request("alpha", "/a", "GET", 200, 0.1, authenticated=True)
    metrics.set_windows("alpha", [WindowState("minute", 5, 0, 4_000_000_000.0)], 1.0)
    view = ScrapeView(metrics, KeyStore(keys[0]))
    merges = []
    original = metrics.store._merge_files
    metrics.store._merge_files = lambda: merges.append(1) or original()
    body, _ = view.render()
    assert len(merges) == 1
    assert b'apitoken_token_status{token="alpha"} 1.0' in body         # rate_limited
    merges.clear()
    details = UsageTracker(RequestFeed()).token_details(view.keystore, {"hour": 1000}, view)
    assert len(merges) == 1
    assert {t["id"]: t["status"] for t in details["tokens"]}["alpha"] == "rate_limited"
