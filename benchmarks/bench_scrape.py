"""/metrics for many active tokens: prometheus_client's generate_latest against this package's
scrape view (what /metrics renders), for the same series, side by side in one run; plus memory
per series.

Each token: requests on one route with two status codes, the duration histogram (8 series),
three rate-limit windows on the default limits (remaining and reset: 6 gauges) and last used:
17 series, as docs/metrics.md's series budget counts them. The run checks that both outputs
parse to the same families and samples before it times anything.

    python benchmarks/bench_scrape.py [--tokens 1000 10000 50000] [--repeat 3]
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import tracemalloc

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from api_token_exporter.core.config import DEFAULT_RATE_LIMITS
from api_token_exporter.core.metrics import TOKEN_LATENCY_BUCKETS, Metrics, ScrapeView
from api_token_exporter.core.ratelimit import WindowState

NOW = 1.79e9                     # the scrape's clock: every window below is still running
SERIES_PER_TOKEN = 17


def populate_client(n: int):
    registry = CollectorRegistry()
    requests = Counter("apitoken_requests", "HTTP requests by API token, route template, method and status code.",
                       ["token", "route", "method", "code"], registry=registry)
    duration = Histogram("apitoken_request_duration_seconds", "Request duration by API token.", ["token"],
                         buckets=TOKEN_LATENCY_BUCKETS, registry=registry)
    gauges = {name: Gauge(name, text, ["token", "window"], registry=registry) for name, text in (
        ("apitoken_rate_limit_remaining", "Requests left in the current window."),
        ("apitoken_rate_limit_reset_timestamp_seconds", "Unix time at which the current window resets."))}
    last = Gauge("apitoken_token_last_used_timestamp_seconds", "Unix time of the token's last request.",
                 ["token"], registry=registry)
    for i in range(n):
        t = f"token-{i:06d}"
        requests.labels(t, "/items/<int:item_id>", "GET", "200").inc(3)
        requests.labels(t, "/items/<int:item_id>", "GET", "404").inc()
        duration.labels(t).observe(0.02 + (i % 7) / 10)
        for window, limit in DEFAULT_RATE_LIMITS.items():
            gauges["apitoken_rate_limit_remaining"].labels(t, window).set(limit - 4)
            gauges["apitoken_rate_limit_reset_timestamp_seconds"].labels(t, window).set(1.8e9 + i)
        last.labels(t).set(NOW + i)
    return registry


def populate_store(n: int) -> ScrapeView:
    m = Metrics(directory="", max_tokens=n + 10)
    for i in range(n):
        t = f"token-{i:06d}"
        for _ in range(3):
            m.observe_request(t, "/items/<int:item_id>", "GET", 200, 0.02 + (i % 7) / 10, False)
        m.observe_request(t, "/items/<int:item_id>", "GET", 404, 0.02 + (i % 7) / 10, True, now=NOW + i)
        m.set_windows(t, [WindowState(w, limit, limit - 4, 1.8e9 + i) for w, limit in DEFAULT_RATE_LIMITS.items()],
                      NOW)
    return ScrapeView(m, None, clock=lambda: NOW, default_limits=DEFAULT_RATE_LIMITS)


def render(view: ScrapeView) -> bytes:
    return view.render()[0]


def comparable(text: str, keep: set):
    out = {}
    for fam in text_string_to_metric_families(text):
        if fam.name in keep:
            out[fam.name] = sorted((s.name, tuple(sorted(s.labels.items())), s.value) for s in fam.samples)
    return out


def check_identical(n: int = 300) -> None:
    """Both outputs parse to the same samples (the store's observations differ only in count:
    it records each request's duration, the client one observation per token)."""
    ours = render(populate_store(n)).decode()
    theirs = generate_latest(populate_client(n)).decode()
    keep = {"apitoken_requests", "apitoken_rate_limit_remaining", "apitoken_rate_limit_reset_timestamp_seconds",
            "apitoken_token_last_used_timestamp_seconds"}
    assert comparable(ours, keep) == comparable(theirs, keep), "outputs differ"
    per_token = [line for line in ours.splitlines() if 'token="token-000000"' in line]
    assert len(per_token) == SERIES_PER_TOKEN, per_token


def measured(fn, repeat: int):
    times = []
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def retained_bytes(build):
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    obj = build()
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return after - before, obj


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1000, 10000, 50000])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    check_identical()
    print(f"python {sys.version.split()[0]}; median of {args.repeat} scrapes; {SERIES_PER_TOKEN} series per token")
    print("| tokens | lines | generate_latest (s) | store render (s) | speed-up | client bytes/series | store bytes/series |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.tokens:
        print(row(n, args.repeat))
        gc.collect()                              # free this size's objects before the next
    return 0


def row(n: int, repeat: int) -> str:
    client_mem, registry = retained_bytes(lambda: populate_client(n))
    store_mem, view = retained_bytes(lambda: populate_store(n))
    render(view)                                  # the first scrape builds each line's prefix
    t_client, _ = measured(lambda: generate_latest(registry), repeat if n <= 10000 else 1)
    t_store, ours = measured(lambda: render(view), repeat)
    lines = sum(1 for line in ours.splitlines() if not line.startswith(b"#"))
    series = n * SERIES_PER_TOKEN
    return (f"| {n:,} | {lines:,} | {t_client:.3f} | {t_store:.3f} | {t_client / t_store:.1f}x | "
            f"{client_mem / series:.0f} | {store_mem / series:.0f} |")


if __name__ == "__main__":
    sys.exit(main())
