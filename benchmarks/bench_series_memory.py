"""Series and Prometheus memory of the per-token metrics, for N active tokens (docs/metrics.md
"Series budget"): each token calls 5 routes with GET and two status codes (200, 404), has a
daily and a monthly LLM budget in the key file, the default rate limits and, with
``--llm-models L``, LLM usage (input and output tokens) for L priced models.

1. The /metrics text comes from the checkout's own code, in a subprocess with
   ``PYTHONPATH=DIR/exporter``: a key file of N keys (keystore helpers), then either a Flask
   app wrapped by the real middleware, driven through its test client (``--driver app``, the
   default: authentication, rate limits and LLM capture as in production) or the recording
   calls of metrics.py (``--driver metrics``: observe_request, set_windows, observe_llm and a
   ScrapeView render). Only public recording calls are used, never family names, so the same
   script measures any checkout.
2. That text is served on 127.0.0.1 (its counters growing by the same traffic again every
   scrape interval, so every rate is steady) and scraped every 15 s by a real Prometheus (job
   ``api-token-exporter``), without rules and with the checkout's prometheus/rules/*.yml, each
   group at its shipped interval; ``--history`` backfills a day of what the rules record first.
3. Once prometheus_tsdb_head_series is stable for 3 reads, Prometheus's own RSS and Go heap in
   use are sampled for ``--sample-seconds``; the same is done for an empty target (baseline).

    python benchmarks/bench_series_memory.py --checkout . [--tokens 10000] [--llm-models 2]
    python benchmarks/bench_series_memory.py --compare OLD_DIR NEW_DIR [--tokens 10000]

``make bench-memory [OLD=c980e1f]`` compares a revision (a temporary git worktree) with the
working tree. It takes minutes: progress goes to stderr, the tables to stdout.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import gzip
import http.server
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Dict, List, Optional

ROUTES = 5
LLM_MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "gpt-4.1")   # priced in the shipped snapshot
LLM_SERVICE = "openai"
BUDGETS = {"daily": 5.0, "monthly": 100.0}
JOB = "api-token-exporter"            # the job the shipped rules select (thresholds.yml exporter_job)
FORBIDDEN_PORTS = {8000, 9464, 9090, 9093, 8025}   # the demo's and the compose stack's ports
MiB = 1024 * 1024


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def token_id(i: int, n: int) -> str:
    return f"tok-{i:0{max(5, len(str(n)))}d}"


def core_module(name: str):
    """A module of the package's core, in either layout a compared revision has: core/NAME.py
    (the layered package) or NAME.py (the flat one before it)."""
    import importlib
    try:
        return importlib.import_module(f"api_token_exporter.core.{name}")
    except ImportError:
        return importlib.import_module(f"api_token_exporter.{name}")


# -- 1. the /metrics text, generated in a subprocess by the checkout's own package -------------
def generate(args) -> int:
    """Runs with PYTHONPATH=CHECKOUT/exporter: writes the /metrics text to args.generate_to."""
    checkout = os.path.realpath(args.checkout)
    import api_token_exporter
    where = os.path.realpath(api_token_exporter.__file__)
    if not where.startswith(os.path.join(checkout, "exporter") + os.sep):
        raise SystemExit(f"api_token_exporter was imported from {where}, not from {checkout}/exporter")
    keystore = core_module("keystore")
    add_key, hash_key, load_keys, mask_key, save_keys = (keystore.add_key, keystore.hash_key, keystore.load_keys,
                                                         keystore.mask_key, keystore.save_keys)

    n, models = args.tokens, LLM_MODELS[:args.llm_models]
    work = tempfile.mkdtemp(prefix="ate-membench-gen-")
    try:
        started = time.perf_counter()
        keys_file = os.path.join(work, "keys.yml")
        ids = [token_id(i, n) for i in range(1, n + 1)]
        secrets_ = [f"atk_membench_{i:08d}_secret" for i in range(1, n + 1)]
        # add_key once (whatever fields a new key gets in this checkout), then the same key N times
        add_key(keys_file, ids[0], name=f"Bench {ids[0]}", tenant="bench", budget_usd=dict(BUDGETS),
                raw_key=secrets_[0])
        template = load_keys(keys_file)[0]
        import dataclasses
        entries = [template] + [dataclasses.replace(template, id=t, name=f"Bench {t}", key_hash=hash_key(s),
                                                    masked=mask_key(s))
                                for t, s in zip(ids[1:], secrets_[1:])]
        save_keys(keys_file, entries)
        log(f"  key file: {n} keys in {time.perf_counter() - started:.1f} s")

        started = time.perf_counter()
        drive = drive_app if args.driver == "app" else drive_metrics
        body = drive(keys_file, ids, secrets_, models, n)
        elapsed = time.perf_counter() - started
        with open(args.generate_to, "wb") as fh:
            fh.write(body)
        print(json.dumps({"seconds": round(elapsed, 1), "driver": args.driver, "bytes": len(body),
                          "package": os.path.dirname(where)}))
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _overrides(n: int) -> dict:
    """Settings only past the defaults' reach: more tokens than max_tokens, or than the store holds."""
    out = {}
    if n > 10_000:
        out.update(max_tokens=n, store_capacity=max(4_000_000, 200 * n))
    return out


def drive_app(keys_file: str, ids, secrets_, models, n: int) -> bytes:
    """A Flask app wrapped by TokenAnalytics, called through its test client: each token 5 routes
    x (200, 404), its first request reporting usage of each model with record_llm_usage."""
    from flask import Flask, jsonify
    from api_token_exporter import TokenAnalytics, record_llm_usage

    app = Flask("membench")

    def make_view(route_index: int):
        def view(item_id):
            if item_id >= 100:
                return jsonify(detail="Not found"), 404
            if route_index == 0:
                for m in models:
                    record_llm_usage(LLM_SERVICE, m, input_tokens=120, output_tokens=40)
            return jsonify(id=item_id)
        view.__name__ = f"route{route_index}"
        return view

    for r in range(ROUTES):
        app.add_url_rule(f"/v1/r{r}/<int:item_id>", view_func=make_view(r), methods=["GET"])
    analytics = TokenAnalytics(app, keys_file=keys_file, metrics_public=True, **_overrides(n))
    client = app.test_client()
    last = time.perf_counter()
    try:
        for i, (t, secret) in enumerate(zip(ids, secrets_), 1):
            headers = {"X-API-Key": secret}
            for r in range(ROUTES):
                for item, expected in ((1, 200), (404, 404)):
                    resp = client.get(f"/v1/r{r}/{item}", headers=headers)
                    resp.get_data()
                    resp.close()                  # the middleware records when the body is closed
                    if resp.status_code != expected:
                        raise SystemExit(f"{t} GET /v1/r{r}/{item}: {resp.status_code}, expected {expected}: "
                                         f"{resp.get_data(as_text=True)[:200]}")
            if time.perf_counter() - last > 10:
                last = time.perf_counter()
                log(f"  {i}/{n} tokens driven")
        resp = client.get("/metrics")
        if resp.status_code != 200:
            raise SystemExit(f"/metrics answered {resp.status_code}")
        return resp.get_data()
    finally:
        stop = getattr(analytics.keystore, "stop_watching", None)
        if stop:
            stop()


def drive_metrics(keys_file: str, ids, secrets_, models, n: int) -> bytes:
    """The recording calls as UsageCore makes them, without HTTP: Metrics, WindowState from the
    default limits, observe_llm with the snapshot's price, ScrapeView(...).render()."""
    load_settings = core_module("config").load_settings
    KeyStore = core_module("keystore").KeyStore
    Metrics, ScrapeView = core_module("metrics").Metrics, core_module("metrics").ScrapeView
    Pricing = core_module("pricing").Pricing
    WINDOW_SECONDS, WindowState = core_module("ratelimit").WINDOW_SECONDS, core_module("ratelimit").WindowState
    LLMUsage = core_module("usage").LLMUsage

    s = load_settings(None, keys_file=keys_file, **_overrides(n))
    keystore = KeyStore(keys_file)
    metrics = Metrics(max_tokens=s.max_tokens, max_routes=s.max_routes, max_models=s.max_models,
                      capacity=s.store_capacity)
    if hasattr(metrics, "init_tokens"):
        metrics.init_tokens(k.id for k in keystore.all())
    pricing = Pricing.load(s.pricing_file, s.prices_file)
    now = time.time()
    for t in ids:
        key = keystore.get(t)
        limits = {**s.rate_limits, **(key.rate_limits or {})}
        used = 0
        for r in range(ROUTES):
            for code in (200, 404):
                used += 1
                metrics.set_windows(t, [WindowState(w, limits[w], limits[w] - used, now + WINDOW_SECONDS[w])
                                        for w in WINDOW_SECONDS if w in limits], now)
                metrics.observe_request(t, f"/v1/r{r}/<int:item_id>", "GET", code, 0.003,
                                        authenticated=True, now=now)
                if r == 0 and code == 200:
                    for m in models:
                        usage = LLMUsage(LLM_SERVICE, m, 120, 40)
                        price = pricing.price(LLM_SERVICE, m)
                        metrics.observe_llm(t, usage, price.cost(usage) if price else None)
    body, _ = ScrapeView(metrics, keystore, pricing=pricing).render()
    return body


def generate_text(python: str, checkout: str, out: str, args) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.join(checkout, "exporter"))
    cmd = [python, os.path.abspath(__file__), "--generate-to", out, "--checkout", checkout,
           "--tokens", str(args.tokens), "--llm-models", str(args.llm_models), "--driver", args.driver]
    try:
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, timeout=args.generate_timeout)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"generating the text for {checkout} took more than {args.generate_timeout} s "
                         "(--generate-timeout, or fewer --tokens)") from None
    if proc.returncode != 0:
        raise SystemExit(f"generating the text for {checkout} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def count_series(text: str, n: int) -> dict:
    total = per_first = token_lines = 0
    first = f'token="{token_id(1, n)}"'
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        total += 1
        if 'token="tok-' in line:
            token_lines += 1
            if first in line:
                per_first += 1
    return {"total": total, "first_token": per_first, "token_lines": token_lines,
            "per_token": token_lines / n if n else 0.0, "other": total - token_lines}


# -- 2. serving the text, and a real Prometheus scraping it --------------------------------------
class TextServer:
    """The text at /metrics on 127.0.0.1 (gzip when asked), threaded. With ``every`` (seconds),
    every counter and histogram sample is its value times the periods of ``every`` seconds since
    the server started, plus one: the generated traffic again every period, so rates are steady
    in time (whether a scrape came late or Prometheus was restarted) and ratios stay what they
    were."""

    def __init__(self, body: bytes, every: Optional[float] = None):
        scaled = _Growing(body) if every and body else None
        fixed = (body, gzip.compress(body, 1))
        started = time.monotonic()

        def current():
            if scaled is None:
                return fixed
            return scaled.at(1 + (time.monotonic() - started) / every)

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                zipped = "gzip" in self.headers.get("Accept-Encoding", "")
                plain, packed = current()
                data = packed if zipped else plain
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                if zipped:
                    self.send_header("Content-Encoding", "gzip")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Growing:
    """The text with its counter and histogram samples multiplied by a growing factor."""

    def __init__(self, body: bytes):
        text = body.decode()
        growing = set()
        for m in re.finditer(r"^# TYPE (\S+) (counter|histogram)$", text, re.M):
            name = m.group(1)
            growing.update({name, name + "_total", name + "_bucket", name + "_count", name + "_sum"})
        self.parts: List[tuple] = []         # (text before the value, value or None)
        for line in text.split("\n"):
            head, _, value = line.rpartition(" ")
            name = re.match(r"[^{ ]*", line).group(0)
            if line and not line.startswith("#") and name in growing:
                self.parts.append((head + " ", float(value)))
            else:
                self.parts.append((line, None))

    def at(self, n: float):
        lines = [head if value is None else f"{head}{value * n:.17g}" for head, value in self.parts]
        plain = "\n".join(lines).encode()
        return plain, gzip.compress(plain, 1)


def free_port() -> int:
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in FORBIDDEN_PORTS:
            return port
    raise RuntimeError("no free port")


def http_get(url: str, timeout: float = 30) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read()


def self_metrics(base: str) -> Dict[str, float]:
    """Prometheus's own /metrics: unlabelled samples by name; for labelled ones the max over
    their series under "max:NAME" and the sum under "sum:NAME"."""
    out: Dict[str, float] = {}
    for line in http_get(base + "/metrics").decode().splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})? (\S+)$", line)
        if not m:
            continue
        name, labels, value = m.group(1), m.group(2), float(m.group(3))
        if labels is None:
            out[name] = value
        else:
            out["max:" + name] = max(out.get("max:" + name, value), value)
            out["sum:" + name] = out.get("sum:" + name, 0.0) + value
    return out


def rfc3339(value: Optional[str]) -> float:
    """Unix time of a timestamp of the Prometheus API, to the second (0 for none or year 1)."""
    import datetime as dt
    m = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.\d+)?(Z|[+-]\d\d:\d\d)$", value or "")
    if not m or m.group(1).startswith("0001"):
        return 0.0
    zone = "+00:00" if m.group(2) == "Z" else m.group(2)
    return dt.datetime.fromisoformat(m.group(1) + zone).timestamp()


def query(base: str, expr: str) -> Optional[float]:
    result = json.loads(http_get(base + "/api/v1/query?query=" + urllib.request.quote(expr)))["data"]["result"]
    return float(result[0]["value"][1]) if result else None


@dataclass
class Measurement:
    label: str
    head_series: int = 0
    rss: List[float] = field(default_factory=list)
    heap: List[float] = field(default_factory=list)
    seconds: float = 0.0
    scrape_seconds: float = 0.0         # the last scrape of the target
    rule_seconds: float = 0.0           # the slowest group's last evaluation
    missed: float = 0.0                 # rule group iterations missed (evaluation slower than its interval)
    groups: Dict[str, dict] = field(default_factory=dict)   # per rule group: rules, series, alerts, eval_max
    slowest_rules: List[tuple] = field(default_factory=list)  # (seconds, group, rule) of the last evaluations
    rule_costs: List[tuple] = field(default_factory=list)     # (group, rule, seconds, bytes allocated) alone

    def stat(self, name: str, how: str) -> float:
        values = getattr(self, name)
        return max(values) if how == "max" else statistics.median(values)


def rule_groups(paths: List[str]):
    """Every rule group of the rule files ``paths``, in order."""
    import yaml
    for path in paths:
        with open(path) as fh:
            yield from (yaml.safe_load(fh) or {}).get("groups") or []


def shipped_intervals(rules_dir: str, default: float = 15.0) -> Dict[str, float]:
    """Each rule group's interval as shipped, in seconds: its own, or the evaluation_interval of
    the checkout's prometheus/prometheus.yml (``default`` without one)."""
    import yaml
    config = os.path.join(os.path.dirname(rules_dir), "prometheus.yml")
    with contextlib.suppress(OSError):
        with open(config) as fh:
            default = duration_seconds(((yaml.safe_load(fh) or {}).get("global") or {}).get("evaluation_interval", "15s"))
    return {group["name"]: duration_seconds(group["interval"]) if group.get("interval") else default
            for group in rule_groups(sorted(glob.glob(os.path.join(rules_dir, "*.yml"))))}


def duration_seconds(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)", str(text)))


def group_durations(base: str) -> Dict[str, float]:
    """The last evaluation's duration of each rule group, by group name."""
    out = {}
    for line in http_get(base + "/metrics").decode().splitlines():
        m = re.match(r'^prometheus_rule_group_last_duration_seconds\{rule_group="[^"]*;([^"]*)"\} (\S+)$', line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def group_series(base: str, m: Measurement) -> Dict[str, dict]:
    """Per rule group: its rules, the series its recording rules hold now, its alerts firing or
    pending; each rule's last evaluation time into ``m.slowest_rules``."""
    out = {}
    for g in json.loads(http_get(base + "/api/v1/rules"))["data"]["groups"]:
        series = alerts = 0
        for r in g["rules"]:
            m.slowest_rules.append((float(r.get("evaluationTime") or 0), g["name"], r["name"]))
            if r["type"] == "recording":
                series += int(query(base, f'count({{__name__="{r["name"]}"}})') or 0)
            else:
                alerts += len(r.get("alerts") or [])
        out[g["name"]] = {"rules": len(g["rules"]), "series": series, "alerts": alerts}
    return out


def allocated_bytes(base: str) -> float:
    return self_metrics(base)["go_memstats_alloc_bytes_total"]


def rule_costs(run: "PrometheusRun", at: float, repeat: int = 3) -> List[tuple]:
    """Each rule of the run evaluated alone, as an instant query at ``at`` on a quiet Prometheus
    over the run's data (no scrapes, no rules, nothing else allocating): the wall time and the
    bytes its Go heap allocated (go_memstats_alloc_bytes_total before and after), the least of
    ``repeat`` evaluations. What a rule allocates is what the garbage collector must catch up
    with; what it holds while it runs sets how far the heap swings."""
    run.stop()
    run.configure(None)
    run.start()
    costs = []
    for group in rule_groups(run.rule_files):
        for rule in group.get("rules") or []:
            url = run.base + "/api/v1/query?" + urllib.parse.urlencode({"query": rule["expr"], "time": at})
            best = None
            for _ in range(repeat):
                before, started = allocated_bytes(run.base), time.perf_counter()
                http_get(url, 600)
                took = (time.perf_counter() - started, allocated_bytes(run.base) - before)
                best = min(best or took, took)
            costs.append((group["name"], rule.get("record") or rule.get("alert"), *best))
    return costs


def run_intervals(rules_dir: str, args) -> Dict[str, float]:
    """Each group's interval in this run: its shipped one capped at --longest-interval
    (``--rule-intervals shipped``), or the scrape interval for every group (``scrape``)."""
    if args.rule_intervals == "scrape":
        return {name: float(args.scrape_interval) for name in shipped_intervals(rules_dir)}
    return {name: min(seconds, args.longest_interval)
            for name, seconds in shipped_intervals(rules_dir, args.scrape_interval).items()}


def copy_rules(rules_dir: str, work: str, args) -> List[str]:
    """The checkout's rule files, copied, each group with its interval of this run."""
    import yaml
    sources = sorted(glob.glob(os.path.join(rules_dir, "*.yml")))
    if not sources:
        raise SystemExit(f"no rule files in {rules_dir}")
    os.makedirs(os.path.join(work, "rules"))
    intervals = run_intervals(rules_dir, args)
    out = []
    for path in sources:
        with open(path) as fh:
            doc = yaml.safe_load(fh) or {}
        for group in doc.get("groups") or []:
            group["interval"] = f"{intervals[group['name']]:g}s"
        target = os.path.join(work, "rules", os.path.basename(path))
        with open(target, "w") as fh:
            yaml.safe_dump(doc, fh, sort_keys=False)
        out.append(target)
    return out


HISTORY_STEP = 900          # the anomaly baselines' subquery step (thresholds anomaly.baseline_step)
# raw counters the pattern rules read at a few instants hours and days ago (the route mix, new
# routes and countries): backfilled around each offset the rules name, not for the whole day
RAW_HISTORY = ("apitoken_requests_total", "apitoken_requests_by_country_total")
RAW_STEP = 300


def raw_windows(rules_dir: str, now: int) -> List[tuple]:
    """Time ranges around every ``offset`` in the rules up to 8 days, merged: from 10 minutes
    before to 20 minutes after it (the run reads them for a quarter of an hour)."""
    offsets = set()
    for path in glob.glob(os.path.join(rules_dir, "*.yml")):
        with open(path) as fh:
            offsets |= {duration_seconds(o) for o in re.findall(r"offset (\w+)", fh.read())}
    spans = sorted((now - int(o) - 600, now - int(o) + 1200) for o in offsets if 3600 <= o <= 8 * 86400)
    merged: List[list] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [tuple(span) for span in merged]


def write_history(base: str, rules_dir: str, data_dir: str, args) -> int:
    """Backfill what the rules read from the past, so they are measured as after weeks of running
    (in a fresh Prometheus a day-long subquery finds a few steps, a week-ago offset nothing):
    every per-token recording rule output (``token:...``) that Prometheus at ``base`` holds now,
    over the last day and around the same time a week ago, at the larger of its group's interval
    and 15 minutes, each value its current one times 0.85-1.15 (a steady history: the bands hold
    the present, as on a quiet day; an ``increase<w>`` is its ``rate`` times the window); and the
    raw request counters around each offset the rules read them at, as if every series had grown
    at its present rate for 8 days. Blocks made by ``promtool tsdb create-blocks-from
    openmetrics`` in the data directory, read when Prometheus next starts. Returns the samples."""
    import random
    intervals = shipped_intervals(rules_dir)
    steps: Dict[str, int] = {}
    for group in rule_groups(sorted(glob.glob(os.path.join(rules_dir, "*.yml")))):
        for rule in group.get("rules") or []:
            if rule.get("record", "").startswith("token:"):
                steps[rule["record"]] = int(max(HISTORY_STEP, intervals[group["name"]]))
    now = int(time.time()) // HISTORY_STEP * HISTORY_STEP
    windows = [(now - 86400 - 3600, now - HISTORY_STEP), (now - 7 * 86400 - 7200, now - 7 * 86400 + 3600)]
    rng = random.Random(args.tokens)
    samples = 0
    source = os.path.join(data_dir, "history.om")
    current: Dict[str, Dict[str, float]] = {}
    for name in steps:
        answer = json.loads(http_get(base + "/api/v1/query?" + urllib.parse.urlencode({"query": name}), 120))
        current[name] = {",".join(f'{k}="{v}"' for k, v in sorted(item["metric"].items()) if k != "__name__"):
                         float(item["value"][1]) for item in answer["data"]["result"]}
    # a fresh Prometheus's increase over an hour covers its minutes: in steady state it is the
    # rate times the window (level:metric:increase<w> from level:metric:rate<r>)
    for name in steps:
        m = re.match(r"^(.*):increase(\w+)$", name)
        rates = [n for n in current if m and re.match(re.escape(m.group(1)) + r":rate\d+[smh]$", n)]
        if rates:
            window = duration_seconds(m.group(2))
            current[name] = {labels: value * window for labels, value in current[rates[0]].items()}
    # the raw counters as if each series had grown at its present rate for 8 days
    raw: Dict[str, Dict[str, float]] = {}
    for name in RAW_HISTORY:
        answer = json.loads(http_get(base + "/api/v1/query?" + urllib.parse.urlencode(
            {"query": f"rate({name}[5m])"}), 120))
        raw[name] = {",".join(f'{k}="{v}"' for k, v in sorted(item["metric"].items())): float(item["value"][1])
                     for item in answer["data"]["result"]}
    origin, spans = now - 8 * 86400 - 3600, raw_windows(rules_dir, now)
    with open(source, "w") as fh:
        for name, rates in raw.items():
            if not rates:
                continue
            fh.write(f"# TYPE {name.removesuffix('_total')} counter\n")
            for labels, rate in rates.items():
                for start, end in spans:
                    for t in range(start // RAW_STEP * RAW_STEP, end + 1, RAW_STEP):
                        fh.write(f"{name}{{{labels}}} {rate * (t - origin):.6g} {t}\n")
                        samples += 1
        for name, step in sorted(steps.items()):
            if not current[name]:
                continue
            fh.write(f"# TYPE {name} gauge\n")
            for labels, level in current[name].items():
                for start, end in windows:
                    for t in range(start // step * step, end + 1, step):
                        fh.write(f"{name}{{{labels}}} {level * rng.uniform(0.85, 1.15):.6g} {t}\n")
                        samples += 1
        fh.write("# EOF\n")
    promtool = os.path.join(os.path.dirname(shutil.which(args.prometheus) or args.prometheus), "promtool")
    proc = subprocess.run([promtool if os.path.exists(promtool) else "promtool", "tsdb",
                           "create-blocks-from", "openmetrics", "--quiet", source, data_dir],
                          capture_output=True, text=True)
    os.remove(source)
    if proc.returncode != 0:
        raise SystemExit(f"promtool could not make the history blocks: {proc.stderr[-2000:]}")
    return samples


class PrometheusRun:
    """One Prometheus in ``work`` (config, data, log), scraping ``port``; started again on the
    same data by ``restart``."""

    def __init__(self, work: str, target_port: int, rule_files: List[str], label: str, args):
        self.work, self.label, self.args = work, label, args
        self.log_path = os.path.join(work, "prometheus.log")
        self.data = os.path.join(work, "data")
        self.rule_files = rule_files
        self.cfg_path = os.path.join(work, "prometheus.yml")
        self.configure(target_port)
        self.proc = None
        self.base = ""

    def configure(self, target_port: Optional[int]) -> None:
        """Scrape the target with the rules; without a target, neither (a quiet Prometheus)."""
        interval = f"{self.args.scrape_interval}s"
        config = {"global": {"scrape_interval": interval, "evaluation_interval": interval,
                             "scrape_timeout": interval}}
        if target_port is not None:
            config["rule_files"] = self.rule_files
            config["scrape_configs"] = [{"job_name": JOB,
                                         "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}]}]
        with open(self.cfg_path, "w") as fh:
            json.dump(config, fh)               # JSON is YAML

    def tail(self) -> str:
        with contextlib.suppress(OSError), open(self.log_path, errors="replace") as fh:
            return "".join(fh.readlines()[-15:])
        return ""

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise SystemExit(f"prometheus exited with code {self.proc.returncode}:\n{self.tail()}")

    def start(self) -> None:
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        with open(self.log_path, "ab") as out:
            env = dict(os.environ, **go_runtime_env(self.args))
            self.proc = subprocess.Popen([self.args.prometheus, f"--config.file={self.cfg_path}",
                                          f"--web.listen-address=127.0.0.1:{port}",
                                          f"--storage.tsdb.path={self.data}",
                                          # the rules' calendar expressions look ahead (as stack.py runs it)
                                          "--enable-feature=promql-negative-offset"],
                                         stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while True:
            self.alive()
            with contextlib.suppress(OSError, urllib.error.URLError):
                if http_get(self.base + "/-/ready", 1):
                    return
            if time.monotonic() > deadline:
                raise SystemExit(f"prometheus not ready after 120 s:\n{self.tail()}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def settle(self, rules_dir: Optional[str]) -> None:
        """The target scraped successfully twice since start-up, then every rule group evaluated."""
        args, base, label = self.args, self.base, self.label
        since = time.time()
        deadline = time.monotonic() + args.settle_timeout
        while True:
            self.alive()
            targets = json.loads(http_get(base + "/api/v1/targets"))["data"]["activeTargets"]
            t = targets[0] if targets else {}
            up = query(base, f'sum_over_time(up{{job="{JOB}"}}[{int(time.time() - since) + 1}s])')
            if t.get("health") == "up" and up and up >= 2:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"{label}: fewer than 2 successful scrapes after {args.settle_timeout} s "
                                 f"(target {t.get('health')}: {t.get('lastError') or 'no error'})\n{self.tail()}")
            time.sleep(1)
        scraped = float(int(time.time()))        # the API's times are compared to the second
        if not self.rule_files:
            return
        # every group evaluated once with those samples in place (a group's first evaluation
        # comes up to one of its intervals after start-up; a slow group runs late)
        deadline = time.monotonic() + args.settle_timeout + max(run_intervals(rules_dir, args).values())
        while True:
            self.alive()
            groups = json.loads(http_get(base + "/api/v1/rules"))["data"]["groups"]
            errors = [(r["name"], r["lastError"]) for g in groups for r in g["rules"] if r.get("lastError")]
            if errors:
                raise SystemExit(f"{label}: rules fail to evaluate: {errors[:3]}")
            loaded = sum(len(g["rules"]) for g in groups)
            pending = [g["name"] for g in groups if rfc3339(g.get("lastEvaluation")) < scraped]
            if loaded and not pending:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"{label}: rule groups not evaluated after the second scrape within "
                                 f"{args.settle_timeout} s: {pending[:5]}")
            time.sleep(1)
        log(f"  {label}: {loaded} rules in {len(groups)} groups evaluated")


def measure_prometheus(body: bytes, rules_dir: Optional[str], label: str, args) -> Measurement:
    """Start Prometheus scraping ``body`` (with the rule files of ``rules_dir``; with --history,
    once more after backfilling their history), wait for a stable head, sample its memory;
    always stops it and removes its directory."""
    started = time.monotonic()
    work = tempfile.mkdtemp(prefix="ate-membench-prom-")
    server = TextServer(body, every=None if args.static else args.scrape_interval)
    run = None
    try:
        rule_files = copy_rules(rules_dir, work, args) if rules_dir else []
        run = PrometheusRun(work, server.port, rule_files, label, args)
        run.start()
        run.settle(rules_dir)
        if rule_files and body and args.history:
            made = time.monotonic()
            samples = write_history(run.base, rules_dir, run.data, args)
            run.stop()
            log(f"  {label}: a day of the recorded series and the raw counters at the rules' offsets "
                f"backfilled ({samples:,} samples, {time.monotonic() - made:.0f} s); starting again")
            run.start()
            run.settle(rules_dir)
        base = run.base

        # the head is populated: prometheus_tsdb_head_series the same for 3 reads in a row, one
        # scrape interval apart, or one evaluation of the slowest rule group apart if longer
        deadline = time.monotonic() + args.settle_timeout
        reads: List[float] = []
        while True:
            run.alive()
            own = self_metrics(base)
            reads.append(own["prometheus_tsdb_head_series"])
            if len(reads) >= 3 and reads[-1] == reads[-2] == reads[-3]:
                break
            if time.monotonic() > deadline:
                # alerts going pending and firing add ALERTS series: measured all the same, and said
                log(f"  {label}: head series still changing after {args.settle_timeout} s "
                    f"({[int(r) for r in reads[-6:]]}, ALERTS: {query(base, 'count(ALERTS)') or 0:.0f}); "
                    "sampling anyway")
                break
            time.sleep(min(120.0, max(args.scrape_interval,
                                      own.get("max:prometheus_rule_group_last_duration_seconds", 0.0))))
        # a run with rules and tokens is sampled long enough for every group to run in it
        sample = args.sample_seconds if rule_files and body else min(30.0, args.sample_seconds)
        log(f"  {label}: head stable at {int(reads[-1])} series; sampling memory for {sample:g} s")

        m = Measurement(label)
        end = time.monotonic() + sample
        while time.monotonic() < end:
            run.alive()
            s = self_metrics(base)
            m.rss.append(s["process_resident_memory_bytes"])
            m.heap.append(s["go_memstats_heap_inuse_bytes"])
            m.head_series = int(s["prometheus_tsdb_head_series"])
            m.rule_seconds = max(m.rule_seconds, s.get("max:prometheus_rule_group_last_duration_seconds", 0.0))
            m.missed = s.get("sum:prometheus_rule_group_iterations_missed_total", 0.0)
            if rule_files:
                for name, seconds in group_durations(base).items():
                    entry = m.groups.setdefault(name, {"eval_max": 0.0})
                    entry["eval_max"] = max(entry["eval_max"], seconds)
            time.sleep(1)
        if rule_files:
            for name, counts in group_series(base, m).items():
                m.groups.setdefault(name, {"eval_max": 0.0}).update(counts)
        m.scrape_seconds = query(base, f'max(scrape_duration_seconds{{job="{JOB}"}})') or 0.0
        if rule_files and body:
            log(f"  {label}: each rule alone on a quiet Prometheus over this data")
            m.rule_costs = rule_costs(run, time.time())
        m.seconds = time.monotonic() - started
        log(f"  {label}: RSS max {m.stat('rss', 'max') / MiB:.0f} MiB, heap in use max "
            f"{m.stat('heap', 'max') / MiB:.0f} MiB ({m.seconds:.0f} s)")
        return m
    finally:
        if run is not None:
            run.stop()
        server.close()
        shutil.rmtree(work, ignore_errors=True)



# -- 3. one checkout, and the comparison ---------------------------------------------------------
@dataclass
class Result:
    checkout: str
    tokens: int
    series: dict
    generate: dict
    base_plain: Measurement
    base_rules: Measurement
    plain: Measurement
    rules: Measurement


def describe(checkout: str) -> str:
    """DIR @ commit (+ changes when tracked files differ from it), or DIR outside git."""
    git = ["git", "-C", checkout]
    head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        return checkout
    dirty = subprocess.run(git + ["diff", "--quiet", "HEAD", "--", "exporter", "prometheus"]).returncode != 0
    return f"{os.path.basename(checkout)} @ {head.stdout.strip()}{' + changes' if dirty else ''}"


def measure_checkout(checkout: str, base_plain: Measurement, args) -> Result:
    checkout = os.path.realpath(checkout)
    rules_dir = os.path.join(checkout, "prometheus", "rules")
    if not os.path.isfile(os.path.join(checkout, "exporter", "api_token_exporter", "__init__.py")):
        raise SystemExit(f"{checkout} is not a checkout of api-token-exporter (no exporter/api_token_exporter)")
    work = tempfile.mkdtemp(prefix="ate-membench-")
    try:
        out = os.path.join(work, "metrics.txt")
        log(f"{checkout}: generating /metrics for {args.tokens} tokens ({args.driver} driver, "
            f"{args.llm_models} LLM models)")
        gen = generate_text(args.python, checkout, out, args)
        with open(out, "rb") as fh:
            body = fh.read()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    series = count_series(body.decode(), args.tokens)
    log(f"{checkout}: {series['total']} series ({series['first_token']} for {token_id(1, args.tokens)}, "
        f"{series['per_token']:.2f} per token on average), {len(body) / MiB:.1f} MiB, generated in "
        f"{gen['seconds']} s")
    base_rules = measure_prometheus(b"", rules_dir, "baseline, rules", args)
    plain = measure_prometheus(body, None, f"{args.tokens} tokens, no rules", args)
    rules = measure_prometheus(body, rules_dir, f"{args.tokens} tokens, rules", args)
    return Result(describe(checkout), args.tokens, series, gen, base_plain, base_rules, plain, rules)


def table(results: List[Result], how: str) -> str:
    scale = 10_000 / results[0].tokens

    def above(m: Measurement, base: Measurement, what: str) -> float:
        return (m.stat(what, how) - base.stat(what, how)) * scale / MiB

    def per_series(m: Measurement, base: Measurement) -> str:
        extra = m.head_series - base.head_series
        return f"{(m.stat('heap', how) - base.stat('heap', how)) / extra:,.0f}" if extra > 0 else "-"

    head = ["checkout", "tokens", "exposed series", "per token", "head series (no rules / rules)",
            "RSS MiB (no rules / rules)", "heap in use MiB (no rules / rules)",
            "heap bytes / head series (no rules / rules)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for r in results:
        lines.append("| " + " | ".join([
            r.checkout, f"{r.tokens:,}", f"{r.series['total']:,}",
            f"{r.series['first_token']} ({r.series['per_token']:.2f} avg)",
            f"{r.plain.head_series:,} / {r.rules.head_series:,}",
            f"{above(r.plain, r.base_plain, 'rss'):,.0f} / {above(r.rules, r.base_rules, 'rss'):,.0f}",
            f"{above(r.plain, r.base_plain, 'heap'):,.0f} / {above(r.rules, r.base_rules, 'heap'):,.0f}",
            f"{per_series(r.plain, r.base_plain)} / {per_series(r.rules, r.base_rules)}",
        ]) + " |")
    return "\n".join(lines)


def group_table(results: List[Result], rules_dirs: Dict[str, str], args) -> str:
    """Per checkout and rule group: rules, series recorded (per token), alerts, the slowest
    evaluation seen while sampling and its share of the group's interval in the run."""
    lines = ["| checkout | rule group | shipped interval | interval in the run | rules | series recorded "
             "| per token | alerts | slowest evaluation s | share of its interval |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        shipped = shipped_intervals(rules_dirs[r.checkout])
        ran = run_intervals(rules_dirs[r.checkout], args)
        base = r.base_rules.groups
        for name, g in r.rules.groups.items():
            interval = ran.get(name, float(args.scrape_interval))
            extra = g.get("series", 0) - base.get(name, {}).get("series", 0)
            lines.append(f"| {r.checkout} | {name} | {shipped.get(name, 15.0):g} s | {interval:g} s | "
                         f"{g.get('rules', 0)} | {g.get('series', 0):,} | "
                         f"{extra / r.tokens:.1f} | {g.get('alerts', 0):,} | {g['eval_max']:.2f} | "
                         f"{g['eval_max'] / interval * 100:.0f} % |")
        total = sum(g.get("series", 0) - base.get(n, {}).get("series", 0) for n, g in r.rules.groups.items())
        lines.append(f"| {r.checkout} | all groups | | | | | {total / r.tokens:.1f} | | | |")
    return "\n".join(lines)


def cost_table(results: List[Result], rules_dirs: Dict[str, str]) -> str:
    """Per checkout and rule group, each rule evaluated alone: seconds and MiB allocated per
    evaluation, and MiB allocated per second at the shipped interval; then the rules that
    allocate the most per second."""
    lines = ["| checkout | rule group | shipped interval | seconds per evaluation | MiB allocated per "
             "evaluation | MiB allocated per second |", "|---|---|---:|---:|---:|---:|"]
    top = []
    for r in results:
        shipped = shipped_intervals(rules_dirs[r.checkout])
        groups: Dict[str, List[float]] = {}
        for group, rule, seconds, allocated in r.rules.rule_costs:
            g = groups.setdefault(group, [0.0, 0.0, 0.0])     # seconds, bytes, bytes per second
            g[0] += seconds
            g[1] += allocated
            g[2] += allocated / shipped[group]
            top.append((allocated / shipped[group], r.checkout, group, rule, seconds, allocated))
        for group, (seconds, allocated, per_second) in groups.items():
            lines.append(f"| {r.checkout} | {group} | {shipped[group]:g} s | {seconds:.2f} | "
                         f"{allocated / MiB:,.0f} | {per_second / MiB:.1f} |")
        total = [sum(column) for column in zip(*groups.values())] or [0.0, 0.0, 0.0]
        lines.append(f"| {r.checkout} | all groups | | {total[0]:.2f} | {total[1] / MiB:,.0f} | {total[2] / MiB:.1f} |")
    lines += ["", "| checkout | rule group | rule | seconds | MiB allocated | MiB per second |",
              "|---|---|---|---:|---:|---:|"]
    for rate, checkout, group, rule, seconds, allocated in sorted(top, reverse=True)[:12 * len(results)]:
        lines.append(f"| {checkout} | {group} | {rule} | {seconds:.2f} | {allocated / MiB:,.0f} | {rate / MiB:.1f} |")
    return "\n".join(lines)


def details(results: List[Result]) -> str:
    lines = ["| checkout | run | head series | RSS MiB max / median | heap in use MiB max / median "
             "| scrape s | slowest rule group s | missed evaluations | run s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    seen = set()
    for r in results:
        for m in (r.base_plain, r.base_rules, r.plain, r.rules):
            name = "(all)" if m is r.base_plain else r.checkout
            if (name, m.label) in seen:
                continue
            seen.add((name, m.label))
            lines.append(f"| {name} | {m.label} | {m.head_series:,} | {m.stat('rss', 'max') / MiB:,.0f} / "
                         f"{m.stat('rss', 'median') / MiB:,.0f} | {m.stat('heap', 'max') / MiB:,.0f} / "
                         f"{m.stat('heap', 'median') / MiB:,.0f} | {m.scrape_seconds:.2f} | "
                         f"{m.rule_seconds:.2f} | {m.missed:.0f} | {m.seconds:.0f} |")
    return "\n".join(lines)


def go_runtime_env(args) -> Dict[str, str]:
    """The Go runtime's settings for Prometheus that the run asks for (none: Go's defaults)."""
    return {k: str(v) for k, v in (("GOGC", args.gogc), ("GOMEMLIMIT", args.gomemlimit)) if v is not None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkout", metavar="DIR", help="measure one checkout")
    which.add_argument("--compare", nargs=2, metavar=("OLD_DIR", "NEW_DIR"), help="measure two checkouts")
    p.add_argument("--tokens", type=int, default=10_000)
    p.add_argument("--llm-models", type=int, default=0, choices=range(len(LLM_MODELS) + 1),
                   help="LLM models each token uses (input and output tokens recorded)")
    p.add_argument("--driver", choices=("app", "metrics"), default="app",
                   help="app: a Flask app with the middleware via its test client; metrics: the "
                        "recording calls of metrics.py directly")
    p.add_argument("--sample-seconds", type=float,
                   help="how long memory and evaluations are sampled with rules and tokens (default: the "
                        "longest group interval of the run, at least 30 s, so every group runs while "
                        "sampled); other runs at most 30 s")
    p.add_argument("--static", action="store_true",
                   help="serve the same text at every scrape (counters do not grow: every rate is 0)")
    p.add_argument("--scrape-interval", type=int, default=15,
                   help="seconds, also the evaluation interval of groups without their own (shipped: 15)")
    p.add_argument("--settle-timeout", type=float, default=300, help="seconds to wait for scrapes, rules, a stable head")
    p.add_argument("--rule-intervals", choices=("shipped", "scrape"), default="shipped",
                   help="shipped: each group at its own interval, capped at --longest-interval; "
                        "scrape: every group at the scrape interval (all compete for the cores at once)")
    p.add_argument("--longest-interval", type=float, default=300,
                   help="seconds: longer shipped intervals (the 1h group) run at this, so a run does "
                        "not wait an hour for their first evaluation")
    p.add_argument("--history", action="store_true",
                   help="backfill a day (and an hour a week ago) of every per-token recorded series, "
                        "and the raw request counters around every offset the rules read them at, "
                        "before the run with rules, so their day-long and week-ago reads find data")
    p.add_argument("--gomemlimit", metavar="SIZE",
                   help="GOMEMLIMIT for Prometheus (e.g. 1400MiB): the Go heap is collected before it "
                        "passes this, instead of at twice the live heap")
    p.add_argument("--gogc", type=int, metavar="PERCENT",
                   help="GOGC for Prometheus (Go's default 100: collect when the heap reaches twice what "
                        "was live; Prometheus 2.53 and later default to 75)")
    p.add_argument("--generate-timeout", type=float, default=1800)
    p.add_argument("--python", default=sys.executable, help="the interpreter with flask and pyyaml for the generator")
    p.add_argument("--prometheus", default=shutil.which("prometheus") or "prometheus")
    p.add_argument("--generate-to", help=argparse.SUPPRESS)        # internal: the generator subprocess
    args = p.parse_args(argv)
    if args.tokens < 1:
        p.error("--tokens must be at least 1")
    if args.generate_to:
        return generate(args)
    if args.sample_seconds is None:
        longest = max(max(shipped_intervals(os.path.join(os.path.realpath(c), "prometheus", "rules")).values())
                      for c in (args.compare or [args.checkout]))
        args.sample_seconds = max(30.0, min(longest, args.longest_interval) if args.rule_intervals == "shipped"
                                  else args.scrape_interval)
    if not shutil.which(args.prometheus):
        raise SystemExit("prometheus is not installed (Debian: apt-get install prometheus)")

    started = time.monotonic()
    checkouts = args.compare or [args.checkout]
    log("baseline: Prometheus scraping an empty target, no rules")
    base_plain = measure_prometheus(b"", None, "baseline, no rules", args)
    results = [measure_checkout(c, base_plain, args) for c in checkouts]
    version = subprocess.run([args.prometheus, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    print(f"\n{args.tokens:,} tokens x {ROUTES} routes x GET x (200, 404), daily + monthly budgets, default "
          f"rate limits, {args.llm_models} LLM models; {args.driver} driver; counters "
          f"{'static' if args.static else 'growing by the traffic every scrape interval'}; {version}"
          f"{''.join(f', {k}={v}' for k, v in go_runtime_env(args).items())}; scrape every "
          f"{args.scrape_interval} s; memory sampled for {args.sample_seconds:.0f} s with rules (30 s without)")
    scaled = "" if args.tokens == 10_000 else ", scaled to 10,000 tokens"
    print(f"\nMemory above the baseline (an empty target; with rules: the same rules), max of the samples{scaled}:\n")
    print(table(results, "max"))
    print(f"\nThe same with the median of the samples{scaled}:\n")
    print(table(results, "median"))
    runs = {"shipped": f"at its shipped interval (those over {args.longest_interval:g} s at {args.longest_interval:g} s)",
            "scrape": f"every {args.scrape_interval} s (the groups' own intervals replaced)"}
    print(f"\nWith rules: the checkout's prometheus/rules/*.yml, every group evaluated {runs[args.rule_intervals]}; "
          "head series include their output (recording rules, ALERTS), memory includes the work of "
          "evaluating them (missed evaluations below: a group slower than its interval).")
    print("\nPer rule group, with the rules (series recorded above the empty target's, per token; "
          "the slowest evaluation while sampling against the group's interval in this run):\n")
    rules_dirs = {r.checkout: os.path.join(os.path.realpath(c), "prometheus", "rules")
                  for r, c in zip(results, checkouts)}
    print(group_table(results, rules_dirs, args))
    print("\nThe slowest rules (their last evaluation), with the rules:\n")
    print("| checkout | rule group | rule | seconds |\n|---|---|---|---:|")
    for r in results:
        for seconds, group, rule in sorted(r.rules.slowest_rules, reverse=True)[:12]:
            print(f"| {r.checkout} | {group} | {rule} | {seconds:.2f} |")
    print("\nEach rule alone (evaluated at the end of the run with rules, on a quiet Prometheus over its "
          "data; the least of 3):\n")
    print(cost_table(results, rules_dirs))
    print("\nEvery Prometheus run:\n")
    print(details(results))
    print("\nGenerating the text: " + "; ".join(
        f"{r.checkout}: {r.generate['seconds']} s, {r.generate['bytes'] / MiB:.1f} MiB" for r in results))
    print(f"Total run time: {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
