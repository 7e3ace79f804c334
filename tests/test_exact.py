"""Exact increases across resets, vanished and new series: the sample arithmetic (Hypothesis)
and the PromQL plus refinement against a real Prometheus scraping a target we control."""
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hypothesis import given, strategies as st

from api_token_exporter.analytics.queries import PrometheusClient
from api_token_exporter.analytics.exact import ExactCounters, samples_increase
from devstack.stack import free_port, prometheus_config, start_prometheus
from support import needs, wait_for


@given(st.lists(st.tuples(st.integers(0, 50), st.booleans()), min_size=1, max_size=60),
       st.integers(0, 59))
def test_samples_increase_counts_every_increment_once(steps, cut):
    """A counter that rises by the given amounts and restarts from 0 where asked: the exact
    increase after sample ``cut`` is the sum of the increments made after it."""
    samples, value, made = [], 0, []
    for t, (amount, restart) in enumerate(steps):
        if restart:
            value = 0
        value += amount
        made.append(amount if not restart or amount else 0)
        samples.append((float(t), float(value)))
    cut = min(cut, len(samples) - 1)
    # a restart to the same or higher value is invisible to any counter arithmetic: skip those
    visible = all(not r or samples[i][1] < samples[i - 1][1] or i == 0
                  for i, (_, r) in enumerate(steps) if r and i > 0)
    if visible:
        assert samples_increase(samples, float(cut)) == sum(made[cut + 1:])
    assert samples_increase(samples, -1.0) == pytest.approx(samples_increase(samples, -1.0))


def test_samples_increase_by_hand():
    s = [(0, 5.0), (1, 7.0), (2, 2.0), (3, 4.0), (4, 4.0)]
    assert samples_increase(s, 0) == 2 + 2 + 2           # 5→7, reset to 2 (counts 2), 2→4
    assert samples_increase(s, -1) == 5 + 2 + 2 + 2       # born inside the range: its 5 counts
    assert samples_increase(s, 4) == 0


class Target:
    """A /metrics endpoint whose counter values the test sets."""

    def __init__(self):
        self.values = {}
        self.scrapes = 0                   # answered so far
        target = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                target.scrapes += 1
                lines = ["# TYPE demo_events_total counter"]
                lines += [f'demo_events_total{{token="{t}"}} {v}' for t, v in sorted(target.values.items())]
                body = ("\n".join(lines) + "\n").encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.address = f"127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture(scope="module")
@needs("prometheus")
def prometheus_and_target(tmp_path_factory):
    target = Target()
    prom = start_prometheus(str(tmp_path_factory.mktemp("exact")), prometheus_config(
        {"api-token-exporter": [target.address]}, None, str(tmp_path_factory.mktemp("rules")), scrape_interval="1s",
        evaluation_interval="1s"))
    try:
        yield prom, target
    finally:
        prom.stop()
        target.server.shutdown()


def test_exact_totals_across_resets_vanished_and_new_series(prometheus_and_target):
    prom, target = prometheus_and_target
    client = PrometheusClient(prom.url, 10)
    made = {"steady": 0, "restarts": 0, "vanishes": 0, "late": 0}

    def step(**changes):
        for token, value in changes.items():
            if value is None:
                target.values.pop(token, None)
            else:
                target.values[token] = value
        scraped = target.scrapes
        wait_for("two scrapes of the new values", lambda: target.scrapes >= scraped + 2, timeout=30, interval=0.1)

    step(steady=0, restarts=0, vanishes=0)
    start = time.time()
    step(steady=3, restarts=4, vanishes=2)
    step(steady=5, restarts=9, vanishes=6)
    step(steady=9, restarts=1, vanishes=None)         # restart: from 9 back to 0, then +1
    step(steady=10, restarts=6, late=7)               # a series born at 7
    step(steady=12, restarts=2, late=8)               # a second restart
    end = time.time()
    step(steady=20, restarts=5, late=9)               # after the range: must not count
    made.update(steady=12, restarts=9 + 1 + 5 + 2, vanishes=6, late=8)

    parts = {"all": ('demo_events_total{job="api-token-exporter"}', ("token",))}
    for leaf in (1000, 2):                            # one part, and refined down to 2 s leaves
        counters = ExactCounters(client.query, client.query_samples, leaf_seconds=leaf, split=3)
        got = {labels["token"]: value for labels, value in counters.totals(parts, start, end)["all"]}
        assert got == {k: float(v) for k, v in made.items()}, leaf
