"""The metric store under threads, forks, several stores, a full store and restarts: scrapes
never fail or double count, nothing writes over another series, counters continue."""
import gc
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from api_token_exporter.core.usage import LLMUsage
from api_token_exporter.core.metrics import Metrics, catalogue
from api_token_exporter.core.ratelimit import WindowState
from api_token_exporter.core.store import ARCHIVE, fold_dead_files
from support import sample_total, samples


def _render_text(metrics) -> str:
    text = metrics.store.render().decode()
    list(text_string_to_metric_families(text))       # it parses
    return text


def _quick_total(metrics, name="apitoken_requests_total") -> float:
    """Sum of one family, read straight off the exposition lines (fast enough to loop on)."""
    prefix = name + "{"
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.store.render().decode().splitlines()
               if line.startswith(prefix))


@pytest.mark.parametrize("mode", ["memory", "directory"])
def test_scrapes_while_series_are_created_never_fail_and_totals_are_exact(tmp_path, mode):
    metrics = Metrics(directory=str(tmp_path) if mode == "directory" else None, max_tokens=100_000,
                      max_routes=100_000)
    writers, per_writer = 4, 400
    errors, scrapes, totals = [], [], []
    done = threading.Event()

    def write(w):
        try:
            for i in range(per_writer):      # every request is a new series in three families
                metrics.observe_request(f"w{w}-t{i}", f"/r{i % 50}", "GET", 200 + (i % 4) * 100, 0.01,
                                        authenticated=True)
                metrics.set_windows(f"w{w}-t{i}", [WindowState("minute", 10, 9, 1e10)], 1.0)
        except Exception as exc:             # pragma: no cover - the assertion below reports it
            errors.append(exc)

    def scrape():
        last = 0.0
        while not done.is_set():
            try:
                total = _quick_total(metrics)
            except Exception as exc:
                errors.append(exc)
                return
            if total < last:
                errors.append(AssertionError(f"total went down: {last} -> {total}"))
            last = total
            scrapes.append(1)
        totals.append(last)

    scrapers = [threading.Thread(target=scrape) for _ in range(4)]
    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in scrapers + threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    for t in scrapers:
        t.join()
    assert errors == []
    assert len(scrapes) >= 8
    text = _render_text(metrics)
    assert sample_total(text, "apitoken_requests_total") == writers * per_writer
    assert sample_total(text, "apitoken_requests_total", code="500") == writers * per_writer / 4


def _count_requests(directory, token, n):
    m = Metrics(directory=directory)
    for _ in range(n):
        m.observe_request(token, "/a", "GET", 200, 0.1, authenticated=True)


def test_concurrent_scrapes_across_processes_never_double_count(tmp_path):
    ctx = multiprocessing.get_context("fork")
    reader = Metrics(directory=str(tmp_path))
    procs = [ctx.Process(target=_count_requests, args=(str(tmp_path), f"p{i}", 20_000)) for i in range(2)]
    for p in procs:
        p.start()
    errors, seen = [], []
    finished = threading.Event()         # set by this thread: Process objects are not thread-safe

    def scrape():
        last = 0.0
        while not finished.is_set() or not seen:
            try:
                total = _quick_total(reader)
            except Exception as exc:
                errors.append(exc)
                return
            if total < last or total > 40_000:
                errors.append((last, total))
            last = total
            seen.append(total)

    threads = [threading.Thread(target=scrape) for _ in range(4)]
    for t in threads:
        t.start()
    for p in procs:
        p.join(60)
    finished.set()
    for t in threads:
        t.join()
    assert [p.exitcode for p in procs] == [0, 0]
    assert errors == []
    assert len(seen) >= 8
    assert sample_total(_render_text(reader), "apitoken_requests_total") == 40_000
    # repeated scrapes after the fact give the same number (no cache that keeps adding)
    assert {sample_total(_render_text(reader), "apitoken_requests_total") for _ in range(3)} == {40_000}


def test_a_full_store_never_writes_over_another_series(keys):
    from werkzeug.test import Client
    from api_token_exporter.web.server import create_app
    exporter = create_app(keys_file=keys[0], store_capacity=200, ingest_token="in")
    metrics = exporter.metrics
    client = Client(exporter)
    client.post("/v1/events", headers={"Authorization": "Bearer in"},
                json=[{"token": "alpha", "route": "/items", "status": 200, "duration_ms": 3}])
    before = _render_text(metrics)
    for i in range(60):                  # far more series than 200 values hold
        metrics.observe_request(f"t{i}", "/a", "GET", 200, 0.3, authenticated=True, now=1.7e9)
        metrics.observe_llm(f"t{i}", LLMUsage("openai", "gpt-4", 5, 5), 0.1)
    after = _render_text(metrics)
    for name in ("apitoken_auth_failures_total", "apitoken_rate_limit_storage_errors_total"):
        assert sample_total(after, name) == sample_total(before, name) == 0, name
    assert sample_total(after, "apitoken_ingest_events_total", result="accepted") == 1
    assert sample_total(after, "apitoken_ingest_events_total", result="rejected") == 0
    assert sample_total(after, "apitoken_requests_total", token="alpha") == 1
    assert sample_total(after, "apitoken_request_duration_seconds_count", token="alpha") == 1
    stored = {dict(labels)["token"] for labels in
              samples(after, "apitoken_requests_total")}
    dropped = sample_total(after, "apitoken_store_dropped_series_total")
    assert dropped > 0
    # every dropped series is counted once, however often it is written
    for i in range(60):
        metrics.observe_request(f"t{i}", "/a", "GET", 200, 0.3, authenticated=True, now=1.7e9)
    assert sample_total(_render_text(metrics), "apitoken_store_dropped_series_total") == dropped
    assert len(stored) < 61
    health = client.get("/healthz").json
    assert health["store"]["dropped_series"] == dropped and health["store"]["capacity"] == 200


def test_two_stores_in_one_process_share_a_directory(tmp_path):
    one, two = Metrics(directory=str(tmp_path)), Metrics(directory=str(tmp_path))
    one.observe_request("a", "/x", "GET", 200, 0.1, authenticated=True)
    two.observe_request("a", "/x", "GET", 200, 0.1, authenticated=True)
    two.observe_request("b", "/x", "GET", 200, 0.1, authenticated=True)
    assert len(list(tmp_path.glob("ate-*.data"))) == 2
    for m in (one, two, Metrics(directory=str(tmp_path))):
        text = _render_text(m)
        assert sample_total(text, "apitoken_requests_total", token="a") == 2
        assert sample_total(text, "apitoken_requests_total", token="b") == 1


COUNT_AND_EXIT = """
import sys
from api_token_exporter.core.metrics import Metrics
from api_token_exporter.core.usage import LLMUsage
m = Metrics(directory=sys.argv[1])
for _ in range(int(sys.argv[2])):
    m.observe_request("alpha", "/a", "GET", 200, 0.1, authenticated=True)
    m.observe_llm("alpha", LLMUsage("openai", "gpt-4", 3, 4), 0.25)
"""


def test_counters_continue_across_runs_and_the_directory_does_not_grow(tmp_path):
    for run in range(1, 8):
        subprocess.run([sys.executable, "-c", COUNT_AND_EXIT, str(tmp_path), "10"], check=True, timeout=60)
        reader = Metrics(directory=str(tmp_path))
        text = _render_text(reader)
        assert sample_total(text, "apitoken_requests_total", token="alpha") == 10 * run
        assert sample_total(text, "apitoken_llm_cost_usd_total", token="alpha") == pytest.approx(2.5 * run)
        assert len(list(tmp_path.glob("ate-*.data"))) == 1          # the reader's; the rest folded
        reader.store.close()
    assert (tmp_path / ARCHIVE).exists()


def test_a_fold_interrupted_before_its_deletes_counts_nothing_twice(tmp_path):
    subprocess.run([sys.executable, "-c", COUNT_AND_EXIT, str(tmp_path), "7"], check=True, timeout=60)
    saved = tmp_path / "saved"
    saved.mkdir()
    for f in tmp_path.glob("ate-*"):
        shutil.copy(f, saved / f.name)
    assert fold_dead_files(str(tmp_path), catalogue()) == 1
    for f in saved.iterdir():            # as if the process crashed after the rename
        shutil.copy(f, tmp_path / f.name)
    assert json.loads((tmp_path / ARCHIVE).read_text())["folded"] == [
        f.name for f in saved.iterdir() if f.name.endswith(".data")]
    text = _render_text(Metrics(directory=str(tmp_path)))          # opening folds again
    assert sample_total(text, "apitoken_requests_total", token="alpha") == 7
    assert not any(f.name in {g.name for g in saved.iterdir()} for f in tmp_path.glob("ate-*"))


def test_a_forked_child_never_writes_into_the_parents_memory():
    parent = Metrics()
    parent.observe_request("p", "/a", "GET", 200, 0.1, authenticated=True)
    pid = os.fork()
    if pid == 0:
        try:
            for _ in range(100):
                parent.observe_request("p", "/a", "GET", 200, 0.1, authenticated=True)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert sample_total(_render_text(parent), "apitoken_requests_total", token="p") == 1


def test_no_side_effects_on_the_host_app(monkeypatch, tmp_path):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    metrics = Metrics()
    assert metrics.store.directory is None and not list(tmp_path.iterdir())
    metrics.observe_request("a", "/x", "GET", 200, 0.1, authenticated=True)
    monkeypatch.setattr(gc, "disable", lambda: pytest.fail("rendering switched the garbage collector off"))
    assert gc.isenabled()
    _render_text(metrics)
    assert gc.isenabled()


def test_float_counters_never_go_down_when_files_are_folded(tmp_path):
    """An archive and two live files: the later one ends and is folded, which regroups the sum
    (archive + first + second becomes (archive + second) + first). With float amounts that
    could lower the total by one rounding step, a counter reset to Prometheus. Amounts are kept
    as whole multiples of a unit, which add exactly in any order."""
    import random
    from api_token_exporter.core.store import fold_dead_files
    rnd = random.Random(1)
    for trial in range(40):
        d = tmp_path / str(trial)
        costs = [round(rnd.uniform(0, 5), 6) for _ in range(3)]
        first_run = Metrics(directory=str(d))
        first_run.observe_llm("t", LLMUsage("openai", "gpt-4", 1, 1), costs[0])
        first_run.observe_request("t", "/a", "GET", 200, costs[0] / 3, authenticated=True)
        first_run.store.close()
        fold_dead_files(str(d), catalogue())
        one, two = Metrics(directory=str(d)), Metrics(directory=str(d))
        first, second = sorted([one, two], key=lambda m: m.store.path)
        first.observe_llm("t", LLMUsage("openai", "gpt-4", 1, 1), costs[1])
        second.observe_llm("t", LLMUsage("openai", "gpt-4", 1, 1), costs[2])
        second.observe_request("t", "/a", "GET", 200, costs[2] / 3, authenticated=True)

        def totals():
            text = _render_text(first)
            return (sample_total(text, "apitoken_llm_cost_usd_total", token="t"),
                    sample_total(text, "apitoken_request_duration_seconds_sum", token="t"))
        before = totals()
        second.store.close()
        fold_dead_files(str(d), catalogue())
        after = totals()
        assert after[0] >= before[0] and after[1] >= before[1], (trial, before, after)
        first.store.close()


def test_a_full_disk_during_a_fold_is_logged_and_loses_nothing(tmp_path, monkeypatch, caplog):
    import errno
    from api_token_exporter.core import store as store_module
    subprocess.run([sys.executable, "-c", COUNT_AND_EXIT, str(tmp_path), "5"], check=True, timeout=60)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(store_module.os, "fsync", full)
    reader = Metrics(directory=str(tmp_path))                 # its open folds: the disk is "full"
    assert "not folded" in caplog.text and "No space left" in caplog.text
    assert not list(tmp_path.glob("*.tmp"))
    assert sample_total(_render_text(reader), "apitoken_requests_total", token="alpha") == 5
    monkeypatch.undo()
    reader.store.close()
    assert sample_total(_render_text(Metrics(directory=str(tmp_path))), "apitoken_requests_total",
                        token="alpha") == 5


OLD_LAYOUT_WRITER = """
import sys
from api_token_exporter.core import metrics
from api_token_exporter.core.store import Family
from api_token_exporter.core.metrics import FORMER_LATENCY_BUCKETS, LATENCY_BUCKETS, Metrics
real = metrics.catalogue
def catalogue():          # as an earlier release wrote its files: every histogram in one layout
    if sys.argv[2] == "oldest":
        return tuple(Family(f.name, f.kind, f.help, f.labelnames, FORMER_LATENCY_BUCKETS[0], scale=f.scale)
                     if f.kind == "histogram" else f for f in real())
    return tuple(Family(f.name, f.kind, f.help, f.labelnames, LATENCY_BUCKETS, scale=f.scale,
                        former_buckets=FORMER_LATENCY_BUCKETS) if f.kind == "histogram" else f for f in real())
metrics.catalogue = catalogue
m = Metrics(directory=sys.argv[1])
for seconds in map(float, sys.argv[3:]):
    m.observe_request("alpha", "/a", "GET", 200, seconds, authenticated=True)
"""


def test_histograms_written_with_the_former_buckets_are_read_into_the_new_ones(tmp_path):
    """An upgrade keeps every count: an old bucket's observations move to the first new bucket
    at or above its bound, from a dead file and from the archive alike; the per-token histogram
    lost most of its buckets, the route histogram kept them."""
    def old_run(layout, *seconds):
        subprocess.run([sys.executable, "-c", OLD_LAYOUT_WRITER, str(tmp_path), layout, *map(str, seconds)],
                       check=True, timeout=60)
    old_run("oldest", 0.7, 3.5)
    assert fold_dead_files(str(tmp_path), catalogue()) == 1           # into the archive, old layout
    old_run("oldest", 0.004, 20)                                       # a dead file, old layout
    old_run("previous", 0.03, 1.3)                                     # the release before this one
    now = Metrics(directory=str(tmp_path))
    now.observe_request("alpha", "/a", "GET", 200, 0.7, authenticated=True)   # the new layout
    text = _render_text(now)

    def bucket(le, family="apitoken_request_duration_seconds_bucket", **labels):
        return sample_total(text, family, le=le, **(labels or {"token": "alpha"}))
    assert sample_total(text, "apitoken_request_duration_seconds_count", token="alpha") == 7
    assert sample_total(text, "apitoken_request_duration_seconds_sum", token="alpha") == pytest.approx(
        0.7 + 3.5 + 0.004 + 20 + 0.03 + 1.3 + 0.7)
    assert [bucket(le) for le in ("0.1", "0.25", "0.5", "1.0", "2.5", "+Inf")] == [2, 2, 2, 4, 5, 7]
    route = "apitoken_route_request_duration_seconds_bucket"
    assert [bucket(le, route, route="/a") for le in ("0.005", "0.05", "0.5", "0.75", "1.0", "1.5", "3.0",
                                                      "5.0", "10.0", "+Inf")] == [1, 2, 2, 3, 4, 5, 5, 6, 6, 7]
    assert sample_total(text, "apitoken_route_request_duration_seconds_count", route="/a") == 7
    now.store.close()
    assert fold_dead_files(str(tmp_path), catalogue()) == 1            # the archive now holds every layout
    again = _render_text(Metrics(directory=str(tmp_path)))
    assert sample_total(again, "apitoken_request_duration_seconds_bucket", token="alpha", le="1.0") == 4
    assert sample_total(again, "apitoken_request_duration_seconds_count", token="alpha") == 7
