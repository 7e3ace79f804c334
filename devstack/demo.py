"""`api-token-exporter demo`: a small API behind the middleware, plus a traffic generator whose
clients are steady, bursty, erroring, slow, over their limit, LLM-heavy, and missing or
inventing keys, so that every metric moves. A sidecar exporter receives ingest events too."""
from __future__ import annotations

import datetime as dt
import json
import math
import logging
import os
import random
import secrets
import shutil
import threading
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import requests
import yaml
from flask import Flask, Response, jsonify, request

from api_token_exporter.core.keystore import add_key, load_keys, save_keys
from api_token_exporter.mixin import rules as rulegen, thresholds
from api_token_exporter import TokenAnalytics, record_llm_usage
from devstack.sinks import SmtpSink, WebhookSink

log = logging.getLogger("api_token_exporter")

# Limits that keep the healthy clients under 80 % of every window (the approaching alert's
# threshold) at their pace: steady ~46/min, bursty 40 at once a minute, errors 60/min, slow
# 15/min, LLM 30/min. Scaled by --speed with the traffic.
UNPRICED_MODEL = ("internal", "llama-3-70b-ft")   # self-hosted: no price anywhere, counted as unpriced
HEALTHY_LIMITS = {"minute": 100, "hour": 5000, "day": 150000}

# id -> (name, tenant, per-key rate limits, the alerts it exists to trigger)
DEMO_KEYS = {
    "demo-steady": ("Steady integration", "acme", HEALTHY_LIMITS, ()),
    "demo-bursty": ("Nightly batch", "acme", dict(HEALTHY_LIMITS, minute=60), ()),
    "demo-errors": ("Flaky partner", "globex", HEALTHY_LIMITS, ("ApiTokenHighErrorRate",)),
    "demo-slow": ("Report builder", "globex", HEALTHY_LIMITS, ("ApiTokenHighLatency",)),
    "demo-limited": ("Over-eager script", "initech", {"minute": 20, "hour": 300, "day": 5000},
                     ("ApiTokenRateLimitApproaching", "ApiTokenRateLimited",
                      "ApiTokenRateLimitExhaustionPredicted")),
    "demo-llm": ("Chat assistant", "initech", HEALTHY_LIMITS,             # small budgets
                 ("ApiTokenBudgetHigh", "ApiTokenBudgetExhausted", "ApiTokenBudgetForecast")),
    "demo-playground": ("You, with curl", "acme", {}, ()),     # the default limits, by hand
    "demo-inactive": ("Revoked key", "acme", HEALTHY_LIMITS, ("ApiTokenInvalidStillUsed",)),
    "demo-expired": ("Expired trial", "globex", HEALTHY_LIMITS, ("ApiTokenInvalidStillUsed",)),
    "demo-sidecar": ("Go service (ingest)", "umbrella", HEALTHY_LIMITS, ()),
    # with its history (make demo backfills it): every kind of anomaly at once; without: the
    # fixed thresholds only, since anomalies need a day to learn
    "demo-compromised": ("Compromised integration", "initech", {"minute": 300, "hour": 15000, "day": 300000}, (
        "ApiTokenHighErrorRate", "ApiTokenHighLatency", "ApiTokenUsageSpike", "ApiTokenTrafficAnomaly",
        "ApiTokenErrorAnomaly", "ApiTokenLatencyAnomaly", "ApiTokenNewRoute", "ApiTokenRouteMixAnomaly",
        "ApiTokenNewCountry")),
}
COMPROMISED_FROM = "200.160.0.8"     # a Brazilian address; the key's history is from Germany
# LLM budgets in USD, scaled by --speed: the chat assistant's are small on purpose; the
# sidecar's LLM calls (about $130 a day at speed 1) stay well inside its own
BUDGETS = {"demo-llm": {"daily": 0.5, "monthly": 10.0}, "demo-sidecar": {"daily": 1000.0, "monthly": 30000.0},
           None: {"daily": 5.0, "monthly": 100.0}}
# alerts with no token: the Watchdog, the missing and invalid keys the generator sends, and the
# proxy pool's revoked upstream token
UNTOKENED_ALERTS = ("Watchdog", "ApiTokenUnauthorizedAccess", "ApiTokenUnauthorizedAccessApiWide",
                    "ApiTokenUpstreamCredentialInvalid")
# the proxy's pool in front of a fake GitHub: (id, account, revoked upstream); two tokens of one
# account share its quota; limits per 10-minute window, scaled by --speed
POOL = (("gh-acme-1", "acme-bot", False), ("gh-acme-2", "acme-bot", False),
        ("gh-globex", "globex-bot", False), ("gh-revoked", "initech-bot", True))
POOL_LIMIT, POOL_WINDOW = 300, 600.0      # 40 calls a minute: one account runs low every ~7 min


def expected_alerts() -> str:
    """What `demo --help` says to expect."""
    lines = [f"  {token_id:<16} {name}: {', '.join(alerts) or 'none (stays inside its limits)'}"
             for token_id, (name, _, _, alerts) in DEMO_KEYS.items()]
    return ("alerts to expect (Prometheus evaluates them in minutes; `for` durations then apply):\n"
            + "\n".join(lines)
            + f"\n  {'missing/invalid':<16} keys sent by the generator: ApiTokenUnauthorizedAccess (per client), "
              "ApiTokenUnauthorizedAccessApiWide"
            + f"\n  {'proxy pool':<16} gh-revoked, an upstream token GitHub refuses: ApiTokenUpstreamCredentialInvalid"
            + f"\n  {'(always)':<16} Watchdog, the dead man's switch"
            + "\nthe anomaly alerts (*Anomaly, ApiTokenNew*) need the backfilled history (the default) and fire\n"
              "after their 15-minute `for`; they are pending in Prometheus's /alerts before that")


MODELS = [("openai", "gpt-4o"), ("openai", "gpt-4o-mini"), ("openai", "o3"),
          ("anthropic", "claude-sonnet-4-5"), ("anthropic", "claude-haiku-4-5"),
          ("cohere", "command-r-08-2024"), UNPRICED_MODEL]
REASONING_MODELS = ("o3",)             # half their answer is reasoning
CACHED_PROMPT_TOKENS = 40               # the chat's system prompt, read from the provider's cache


def create_demo_api(**analytics_settings) -> Flask:
    """The demo API with TokenAnalytics wired in, as a user would do it. Its /metrics is opened
    on purpose (metrics_public), so the local Prometheus scrapes it without credentials."""
    analytics_settings.setdefault("metrics_public", True)
    app = Flask("devstack.demo")

    @app.get("/api/v1/items")
    def list_items():
        return jsonify({"items": [{"id": i, "name": f"item {i}"} for i in range(1, 6)]})

    @app.get("/api/v1/items/<int:item_id>")
    def get_item(item_id):
        if item_id > 100:
            return jsonify({"detail": "Not found"}), 404
        return jsonify({"id": item_id, "name": f"item {item_id}"})

    @app.get("/api/v1/repos/<owner>/<repo>")
    def get_repo(owner, repo):
        return jsonify({"full_name": f"{owner}/{repo}", "stars": len(owner) * 7 + len(repo)})

    @app.get("/api/v1/flaky")
    def flaky():
        if random.random() < float(request.args.get("fail", "0.3")):
            return jsonify({"detail": "Internal server error"}), 500
        return jsonify({"ok": True})

    @app.get("/api/v1/slow")
    def slow():
        delay = min(float(request.args.get("seconds", "1.5")), 5.0)
        time.sleep(delay)
        return jsonify({"slept": delay})

    @app.post("/api/v1/chat")
    def chat():
        """Answers in the shape of the chosen service, with a system prompt of 40 tokens read
        from the provider's prompt cache. OpenAI usage is reported through the public call;
        Anthropic and Cohere usage is read from the response by the middleware."""
        body = request.get_json(silent=True) or {}
        service, model = body.get("service", "openai"), body.get("model", "gpt-4o")
        prompt = str(body.get("prompt", "hello"))
        cached = CACHED_PROMPT_TOKENS if service != "cohere" else 0
        prompt_tokens = cached + max(1, len(prompt.split())) * 3
        completion_tokens = int(body.get("completion_tokens") or random.randint(20, 400))
        reasoning = completion_tokens // 2 if model in REASONING_MODELS else 0
        if service == "anthropic":      # Anthropic's input_tokens leave the cached tokens out
            usage = {"input_tokens": prompt_tokens - cached, "cache_read_input_tokens": cached,
                     "output_tokens": completion_tokens}
            if body.get("stream"):
                return Response(_anthropic_events(model, usage), content_type="text/event-stream")
            return jsonify({"type": "message", "model": model, "content": [{"type": "text", "text": "…"}],
                            "usage": usage})
        if service == "cohere":
            return jsonify({"text": "…", "meta": {"billed_units": {
                "input_tokens": prompt_tokens, "output_tokens": completion_tokens}}}), \
                200, {"X-LLM-Model": model}
        record_llm_usage(service, model, prompt_tokens, completion_tokens, cached_input_tokens=cached,
                         reasoning_tokens=reasoning)
        return jsonify({"model": model, "choices": [{"message": {"content": "…"}}],
                        "usage": {"prompt_tokens": prompt_tokens,
                                  "completion_tokens": completion_tokens,
                                  "total_tokens": prompt_tokens + completion_tokens,
                                  "prompt_tokens_details": {"cached_tokens": cached},
                                  "completion_tokens_details": {"reasoning_tokens": reasoning}}})

    analytics_settings.setdefault("capture_llm_usage", True)
    # the generator sends a forwarded address for the compromised key, as a proxy on 127.0.0.1 would
    analytics_settings.setdefault("country_lookup", True)
    analytics_settings.setdefault("trusted_proxies", ["127.0.0.1/32"])
    TokenAnalytics(app, **analytics_settings)
    return app


def _anthropic_events(model: str, usage: dict):
    yield ("event: message_start\ndata: " + json.dumps({"type": "message_start", "message": {
        "model": model, "usage": dict(usage, output_tokens=1)}}) + "\n\n")
    yield 'event: content_block_delta\ndata: {"type": "content_block_delta"}\n\n'
    yield ("event: message_delta\ndata: " + json.dumps({"type": "message_delta", "usage": {
        "output_tokens": usage["output_tokens"]}}) + "\n\n")


def app_from_env():
    """Factory for gunicorn: settings from ATE_* variables."""
    return create_demo_api()


def write_demo_keys(path: str, speed: float = 1.0) -> Dict[str, str]:
    """Create the demo key file; returns id -> raw key (kept in memory for the generator).
    Limits scale with the traffic's speed, so who stays inside them does not change."""
    if os.path.exists(path):
        os.unlink(path)
    raw = {}
    for token_id, (name, tenant, limits, _) in DEMO_KEYS.items():
        budget = {period: usd * speed for period, usd in BUDGETS.get(token_id, BUDGETS[None]).items()}
        scaled = {window: max(1, int(n * speed)) for window, n in limits.items()}
        raw[token_id] = add_key(path, token_id, name=name, tenant=tenant, rate_limits=scaled,
                                budget_usd=budget)
    keys = load_keys(path)
    for key in keys:
        if key.id == "demo-inactive":
            key.active = False
        if key.id == "demo-expired":
            key.expires_at = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    save_keys(path, keys)
    return raw


@dataclass
class TrafficStats:
    sent: int = 0
    failed: int = 0


class TrafficGenerator:
    """Bounded background traffic: every client stops when ``stop()`` is called."""

    def __init__(self, base_url: str, keys: Dict[str, str], sidecar_url: Optional[str] = None,
                 ingest_token: Optional[str] = None, speed: float = 1.0, seed: int = 0,
                 proxy_url: Optional[str] = None):
        self.base_url = base_url.rstrip("/")
        self.proxy_url = proxy_url
        self.keys = keys
        self.sidecar_url = sidecar_url
        self.ingest_token = ingest_token
        self.speed = speed
        self.stats = TrafficStats()
        self._stop = threading.Event()
        self._threads = []
        self._lock = threading.Lock()
        self._random = random.Random(seed)

    def _get(self, session, path, key=None, method="GET", headers=None, **kw):
        headers = dict(headers or {}, **({"X-API-Key": key} if key else {}))
        try:
            session.request(method, self.base_url + path, headers=headers, timeout=10, **kw)
        except requests.RequestException:
            with self._lock:
                self.stats.failed += 1
            return
        with self._lock:
            self.stats.sent += 1

    def _loop(self, interval: float, action):
        session = requests.Session()
        while not self._stop.wait(interval / self.speed):
            action(session)

    def start(self) -> "TrafficGenerator":
        r, k = self._random, self.keys
        clients = [
            # healthy tokens stay inside their limits (HEALTHY_LIMITS)
            (1.5, lambda s: self._get(s, r.choice(["/api/v1/items", f"/api/v1/items/{r.randint(1, 50)}",
                                                    "/api/v1/repos/acme/portfolio"]), k["demo-steady"])),
            (60.0, lambda s: [self._get(s, "/api/v1/items", k["demo-bursty"]) for _ in range(40)]),
            (1.0, lambda s: self._get(s, r.choice(["/api/v1/flaky?fail=0.4", "/api/v1/items/404",
                                                   f"/api/v1/items/{r.randint(101, 999)}"]),
                                      k["demo-errors"])),
            (4.0, lambda s: self._get(s, f"/api/v1/slow?seconds={r.choice([0.3, 1.2, 2.5])}",
                                      k["demo-slow"])),
            (1.0, lambda s: self._get(s, "/api/v1/items", k["demo-limited"])),
            (2.0, lambda s: self._get(s, "/api/v1/chat", k["demo-llm"], method="POST",
                                      json=dict(zip(("service", "model"), r.choice(MODELS)),
                                                prompt="summarise this " * r.randint(1, 40),
                                                stream=r.random() < 0.3))),
            # ten times its usual pace, on routes it never called, slow and failing, from Brazil
            (0.5, lambda s: self._get(s, "/api/v1/flaky?fail=0.3", k["demo-compromised"],
                                      headers={"X-Forwarded-For": COMPROMISED_FROM})),
            (2.0, lambda s: self._get(s, "/api/v1/slow?seconds=1.5", k["demo-compromised"],
                                      headers={"X-Forwarded-For": COMPROMISED_FROM})),
            (8.0, lambda s: self._get(s, "/api/v1/items")),                                 # missing
            (6.0, lambda s: self._get(s, "/api/v1/items", "atk_" + secrets.token_urlsafe(24))),  # invalid
            (15.0, lambda s: self._get(s, "/api/v1/items", k["demo-inactive"])),
            (15.0, lambda s: self._get(s, "/api/v1/items", k["demo-expired"])),
            (10.0, lambda s: self._get(s, f"/no/such/path/{r.randint(1, 10**6)}", k["demo-steady"])),
        ]
        if self.sidecar_url and self.ingest_token:
            clients.append((5.0, self._post_events))
        if self.proxy_url:                   # GitHub calls through the proxy's credential pool
            clients.append((1.5, lambda s: self._call(s, self.proxy_url + r.choice(
                ["/repos/acme/portfolio", "/users/acme", f"/repos/acme/portfolio/issues/{r.randint(1, 30)}"]),
                k["demo-steady"])))
        for interval, action in clients:
            t = threading.Thread(target=self._loop, args=(interval, action), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _call(self, session, url, key):
        try:
            session.get(url, headers={"X-API-Key": key}, timeout=10)
        except requests.RequestException:
            with self._lock:
                self.stats.failed += 1
            return
        with self._lock:
            self.stats.sent += 1

    def _post_events(self, session):
        r = self._random
        events = []
        for _ in range(r.randint(5, 15)):
            service, model = r.choice(MODELS)
            event = {"token": "demo-sidecar", "route": r.choice(["/v1/orders", "/v1/orders/{id}"]),
                     "method": r.choice(["GET", "POST"]), "status": r.choice([200] * 199 + [503]),   # 0.5 %: healthy
                     "duration_ms": round(math.exp(r.uniform(math.log(5), math.log(900))))}
            if r.random() < 0.1:
                event["llm"] = {"service": service, "model": model,
                                "input_tokens": r.randint(10, 200), "output_tokens": r.randint(10, 200)}
            events.append(event)
        events.append({"token": "demo-sidecar", "route": "/v1/orders", "status": 999})  # refused
        try:
            session.post(self.sidecar_url.rstrip("/") + "/v1/events", json={"events": events},
                         headers={"Authorization": f"Bearer {self.ingest_token}"}, timeout=10)
        except requests.RequestException:
            pass

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=15)


class DemoStack:
    """The demo API with traffic, the sidecar exporter and, where their binaries are installed,
    Prometheus and Alertmanager with the committed config files, plus notification sinks."""

    def __init__(self, host: str = "127.0.0.1", port: int = 8000, exporter_port: Optional[int] = 9464,
                 data_dir: str = "demo-data", storage_uri: str = "memory://", speed: float = 1.0,
                 traffic: bool = True, prometheus_port: Optional[int] = 9090,
                 alertmanager_port: Optional[int] = 9093, sink_port: Optional[int] = 8025,
                 scrape_interval: str = "5s", sidecar_url: Optional[str] = None,
                 ingest_token: Optional[str] = None, admin_token: Optional[str] = None,
                 keep_data: bool = False, backfill_days: int = 0, proxy_port: Optional[int] = 0):
        self.host, self.port, self.exporter_port = host, port, exporter_port
        self.keep_data, self.backfill_days = keep_data, backfill_days
        self.data_dir = os.path.abspath(data_dir)
        self.storage_uri, self.speed, self.traffic = storage_uri, speed, traffic
        self.prometheus_port, self.alertmanager_port = prometheus_port, alertmanager_port
        self.sink_port, self.scrape_interval = sink_port, scrape_interval
        self.sidecar_url = sidecar_url
        self.proxy_port, self.proxy_url, self.proxy, self.fake_github = proxy_port, None, None, None
        self.ingest_token = ingest_token or secrets.token_urlsafe(16)
        self.admin_token = admin_token or secrets.token_urlsafe(16)
        self.servers, self.services, self.notes = [], [], []
        self.generator = self.prometheus = self.alertmanager = self.webhook = self.smtp = None
        self.history_end: Optional[float] = None       # where the backfilled history ends
        self.history_plan = None                        # what the generator put in it
        self.rules_backfill_error: Optional[str] = None
        self.raw_keys: Dict[str, str] = {}

    def _serve(self, app, port: int):
        from werkzeug.serving import make_server
        server = make_server(self.host, port, app, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.servers.append(server)
        return f"http://{self.host}:{server.server_port}"

    def start(self) -> "DemoStack":
        """Start everything; whatever started is stopped again if a later part fails or the
        start is interrupted."""
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> "DemoStack":
        from devstack import stack
        logging.getLogger("werkzeug").setLevel(logging.WARNING)   # no access log flood
        os.makedirs(self.data_dir, exist_ok=True)
        if not self.keep_data:          # a new key file each run: old Prometheus data would mix in
            for old in ("prometheus", "alertmanager"):
                shutil.rmtree(os.path.join(self.data_dir, old), ignore_errors=True)
        keys_file = os.path.join(self.data_dir, "keys.yml")
        self.raw_keys = write_demo_keys(keys_file, self.speed)
        for name, token in (("admin-token", self.admin_token), ("ingest-token", self.ingest_token)):
            token_file = os.path.join(self.data_dir, name)
            with open(token_file, "w") as fh:
                fh.write(token)
            os.chmod(token_file, 0o600)

        prom_port = self.prometheus_port
        if prom_port is not None and not os.path.exists(stack.PROMETHEUS_YML):
            self.notes.append(f"Prometheus      {stack.PROMETHEUS_YML} not found: run the demo from a checkout")
            prom_port = None
        if prom_port is not None and stack.find_binary("prometheus"):
            prom_port = prom_port or stack.free_port()
            prom_url = f"http://127.0.0.1:{prom_port}"
        else:
            prom_url = None
        prom_dir = os.path.join(self.data_dir, "prometheus")
        history_span = self._backfill(os.path.join(prom_dir, "data")) if prom_url else None
        if history_span:                   # before anything that asks the demo's Prometheus starts
            self.history_end = history_span[1]
            self._backfill_rules(prom_dir, *history_span)
        # the API's console (/ui) shows its live tokens, and usage and capacity from Prometheus
        self.api_url = self._serve(create_demo_api(keys_file=keys_file, storage_uri=self.storage_uri,
                                                   admin_token=self.admin_token, prometheus_url=prom_url), self.port)
        if self.proxy_port is not None:
            self.proxy_url = self._start_proxy(keys_file)
        with_alertmanager = (self.alertmanager_port is not None and prom_url is not None
                             and stack.find_binary(*stack.ALERTMANAGER_BINARIES) is not None)
        if self.exporter_port is not None and not self.exporter_port:
            self.exporter_port = stack.free_port()
        # the rules Prometheus reads, rendered with runbook links to this demo's exporter; the
        # alert API's settings re-render them from the same thresholds file
        rules_dir = os.path.join(self.data_dir, "rules")
        shutil.rmtree(rules_dir, ignore_errors=True)
        thresholds_file = self._write_thresholds(self.sidecar_url or (
            f"http://{self.host}:{self.exporter_port}" if self.exporter_port is not None else None))
        rulegen.write(thresholds.load_thresholds(thresholds_file), rules_dir)
        am_port = (self.alertmanager_port or stack.free_port()) if with_alertmanager else None
        webhook_token_file = os.path.join(self.data_dir, "alert-webhook-token")
        if self.exporter_port is not None:
            from api_token_exporter.web.server import create_app
            alerting = {}
            if with_alertmanager:
                webhook_token = secrets.token_urlsafe(16)
                with open(webhook_token_file, "w") as fh:
                    fh.write(webhook_token)
                os.chmod(webhook_token_file, 0o600)
                alerting = dict(alertmanager_url=f"http://127.0.0.1:{am_port}", alert_webhook_token=webhook_token,
                                alert_db_url=f"sqlite:///{os.path.abspath(os.path.join(self.data_dir, 'alerts.db'))}",
                                alert_rules_dir=rules_dir, alert_sync_interval=15,
                                alertmanager_config_file=os.path.join(self.data_dir, "alertmanager", "alertmanager.yml"))
            exporter = create_app(keys_file=keys_file, ingest_token=self.ingest_token, thresholds_file=thresholds_file,
                                  admin_token=self.admin_token, prometheus_url=prom_url, **alerting)
            self.sidecar_url = self._serve(exporter, self.exporter_port)

        am_addr = None
        if with_alertmanager:
            webhook = WebhookSink(self.host, self.sink_port or 0)
            try:
                self.smtp = SmtpSink(self.host).start()
                webhook.mail_source = self.smtp.summaries
            except ImportError:
                self.notes.append("mail sink       aiosmtpd not installed: critical alerts are not emailed")
            webhook.start()
            self.webhook = webhook                  # stop() shuts down only a started server
            slack_file = os.path.join(self.data_dir, "slack_api_url")
            with open(slack_file, "w") as fh:
                fh.write(self.webhook.url + "/slack\n")
            self.alertmanager = stack.start_alertmanager(
                os.path.join(self.data_dir, "alertmanager"), stack.alertmanager_config(
                    f"{self.host}:{self.smtp.port}" if self.smtp else None, self.webhook.url, slack_file,
                    group_wait="10s", group_interval="30s",
                    history_url=self.sidecar_url if self.exporter_port is not None else None,
                    history_token_file=webhook_token_file), port=am_port)
            self.services.append(self.alertmanager)
            am_addr = self.alertmanager.url.split("://", 1)[1]
        elif prom_url:
            self.notes.append("Alertmanager    not installed (Debian: prometheus-alertmanager): alerts stay in Prometheus")
        if prom_url:
            targets = {"api-token-exporter": [u.split("://", 1)[1] for u in (self.api_url, self.sidecar_url,
                                                                               self.proxy_url) if u],
                       "prometheus": [f"127.0.0.1:{prom_port}"]}
            if am_addr:
                targets["alertmanager"] = [am_addr]
            prom_config = stack.prometheus_config(
                targets, am_addr, rules_dir,
                scrape_interval=self.scrape_interval, evaluation_interval=self.scrape_interval)
            # 400 days as the compose stack: a year of trends
            self.prometheus = stack.start_prometheus(prom_dir, prom_config, port=prom_port, retention="400d",
                                                     timeout=120)
            self.services.append(self.prometheus)
        elif self.prometheus_port is not None and not stack.find_binary("prometheus"):
            self.notes.append("Prometheus      not installed (Debian: prometheus): metrics are on the /metrics URLs")
        if self.traffic:
            self.generator = TrafficGenerator(self.api_url, self.raw_keys, self.sidecar_url,
                                              self.ingest_token, speed=self.speed, proxy_url=self.proxy_url).start()
        return self

    def _write_thresholds(self, exporter_url: Optional[str]) -> str:
        """The shipped thresholds, with runbook links to ``exporter_url`` (the exporter serves
        /runbooks) where there is one; the file's path."""
        from devstack.stack import ROOT
        with open(os.path.join(ROOT, "prometheus", "thresholds.yml"), encoding="utf-8") as fh:
            doc = yaml.safe_load(fh)
        if exporter_url:
            doc["runbook_base_url"] = exporter_url.rstrip("/") + "/runbooks"
        path = os.path.join(self.data_dir, "thresholds.yml")
        with open(path, "w", encoding="utf-8") as fh:
            yaml.safe_dump(doc, fh, sort_keys=False)
        return path

    def _start_proxy(self, keys_file: str) -> str:
        """The proxy in front of a fake GitHub, with a pool of upstream tokens in secret files
        (written here, 0600) and one the upstream refuses."""
        import yaml
        from devstack.fake_upstream import FakeUpstream
        from api_token_exporter.proxy.app import ProxyApp
        limit = max(10, int(POOL_LIMIT * self.speed))
        self.fake_github = FakeUpstream("github", limit=limit, window=POOL_WINDOW)
        credentials = []
        for cid, account, revoked in POOL:
            secret = "ghp_" + secrets.token_hex(18)
            path = os.path.join(self.data_dir, f"upstream-{cid}")
            with open(path, "w") as fh:
                fh.write(secret)
            os.chmod(path, 0o600)
            self.fake_github.add(secret, account=account)
            if revoked:
                self.fake_github.revoke(secret)
            credentials.append({"id": cid, "secret_file": path, "account": account})
        self.fake_github.record = False
        upstream = self._serve(self.fake_github, 0)
        pool_file = os.path.join(self.data_dir, "pool.yml")
        with open(pool_file, "w") as fh:
            yaml.safe_dump({"upstream": upstream, "provider": "github", "rotate_below": max(1, limit // 10),
                            "refresh_interval": "60s", "credentials": credentials,
                            "routes": ["/repos/<owner>/<repo>", "/repos/<owner>/<repo>/issues/<int:number>",
                                       "/users/<user>"]}, fh, sort_keys=False)
        self.proxy = ProxyApp(keys_file=keys_file, upstream_pool_file=pool_file, storage_uri=self.storage_uri,
                              admin_token=self.admin_token, metrics_public=True)
        return self._serve(self.proxy, self.proxy_port)

    def _backfill(self, tsdb: str):
        """Synthetic history for the demo's keys (a fresh data directory only): its blocks go in
        before Prometheus starts; returns (start, end) or None."""
        if not self.backfill_days or os.path.exists(tsdb):
            return None
        from devstack import synthetic
        from api_token_exporter.core.pricing import Pricing
        end = time.time()
        start = end - self.backfill_days * 86400
        plan, _ = synthetic.write_history(tsdb, start, end, pricing=Pricing.load())
        self.history_plan = plan
        total = sum(plan.by_token.values())           # as "All time" counts them: refusals too
        self.notes.append(f"history         {self.backfill_days} days backfilled ({total:,} requests, "
                          f"{total - plan.requests:,} of them refused; {len(plan.anomalies)} anomalies; "
                          "--no-backfill to start empty)")
        return start, end

    def _backfill_rules(self, prom_dir: str, start: float, end: float) -> None:
        """The recording and anomaly rules over the history, before the demo's Prometheus starts:
        restarting it to load each dependency level's blocks would reset every alert's `for`
        timer. A private Prometheus on the same data, without targets or rules, answers the
        rules' queries and is restarted between levels; the demo's own then opens every block.
        A failure is noted and the demo runs on without them."""
        from api_token_exporter.analytics.rule_backfill import backfill_rules
        from devstack import stack
        rules = os.path.join(stack.ROOT, "prometheus", "rules")
        # the history has no upstream credential pool: its groups would be work for nothing
        recording = os.path.join(self.data_dir, "backfill-recording.yml")
        with open(os.path.join(rules, "apitoken-recording.yml"), encoding="utf-8") as fh:
            doc = yaml.safe_load(fh)
        doc["groups"] = [g for g in doc["groups"] if not g["name"].startswith("apitoken.upstream")]
        with open(recording, "w", encoding="utf-8") as fh:
            yaml.safe_dump(doc, fh, sort_keys=False)
        config = stack.prometheus_config({}, None, os.path.join(self.data_dir, "no-rules"))
        work = {}

        def restart():                     # on the same port: the backfill keeps asking its URL
            port = int(work["prometheus"].url.rsplit(":", 1)[1])
            work["prometheus"].stop()
            work["prometheus"] = stack.start_prometheus(prom_dir, config, port=port, retention="400d", timeout=120)
        try:
            work["prometheus"] = stack.start_prometheus(prom_dir, config, retention="400d", timeout=120)
            backfill_rules(work["prometheus"].url,     # so the anomaly bands are learned from the start
                           [recording, os.path.join(rules, "apitoken-anomalies.yml")],
                           start, end, os.path.join(prom_dir, "data"), eval_interval="300s", reload=restart)
        except Exception as exc:
            self.rules_backfill_error = str(exc)
            log.warning("backfilling the recording rules failed: %s", exc)
        finally:
            if "prometheus" in work:
                work["prometheus"].stop()

    def describe(self) -> List[str]:
        lines = [f"console         {self.api_url}/ui   (sign in with the admin token in "
                 f"{os.path.join(self.data_dir, 'admin-token')}, or a demo API key for its tenant's view)"]
        if self.alertmanager and self.sidecar_url and self.exporter_port is not None:
            lines.append(f"alerts console  {self.sidecar_url}/ui/alerts   (the exporter's console, beside its alert API)")
        lines += [f"demo API        {self.api_url}/api/v1/items   (X-API-Key header required)",
                  f"its metrics     {self.api_url}/metrics",
                  f"admin JSON      {self.api_url}/admin/stats and /admin/token-details "
                  f"(Authorization: Bearer <{os.path.join(self.data_dir, 'admin-token')}>)"]
        ingest_file = os.path.join(self.data_dir, "ingest-token")
        if self.sidecar_url:
            lines.append(f"exporter        {self.sidecar_url}/metrics")
            lines.append(f"runbooks        {self.sidecar_url}/runbooks   (where the alerts' runbook links point)")
            if self.exporter_port is not None:
                lines.append(f"ingest          curl -H \"Authorization: Bearer $(cat {ingest_file})\" "
                             f"-d '{{\"events\": [{{\"token\": \"demo-sidecar\", \"route\": \"/orders\", "
                             f"\"status\": 200, \"duration_ms\": 42}}]}}' {self.sidecar_url}/v1/events")
        if self.prometheus:
            lines.append(f"Prometheus      {self.prometheus.url}   (alerts: {self._prometheus_alerts_page()})")
            if self.sidecar_url:
                lines.append(f"analytics       {self.sidecar_url}/analytics/tokens and /api/analytics/usage (admin token)")
        if self.alertmanager:
            lines.append(f"Alertmanager    {self.alertmanager.url}/api/v2/alerts   (its API: "
                         "Debian's package has no web page)")
            if self.sidecar_url and self.exporter_port is not None:
                lines.append(f"alert API       {self.sidecar_url}/api/v1/alerts and /api/v1/alerts/history "
                             "(admin token; acknowledge, feedback, settings: docs/alerts.md)")
            lines.append(f"notifications   {self.webhook.url}/ (webhook and Slack posts), {self.webhook.url}/mail (emails)")
        if self.proxy_url:
            lines.append(f"proxy           {self.proxy_url}/repos/acme/portfolio   (X-API-Key; a fake GitHub "
                         f"behind a pool of {len(POOL)} upstream tokens: docs/proxy.md)")
            lines.append(f"pool JSON       {self.proxy_url}/admin/pool/stats and /admin/pool/token-details (admin token)")
        lines += self.notes
        lines.append("Grafana         needs Docker (docker compose up); the dashboards are in grafana/dashboards/")
        lines.append(f"key file        {os.path.join(self.data_dir, 'keys.yml')}")
        lines.append(f"try it          curl -i -H 'X-API-Key: {self.raw_keys['demo-playground']}' "
                     f"{self.api_url}/api/v1/items")
        if self.generator:
            lines.append("traffic         steady, bursty, erroring, slow, over-limit, LLM, missing and invalid keys"
                         + (", GitHub calls through the proxy" if self.proxy_url else ""))
        return lines

    def _prometheus_alerts_page(self) -> str:
        """The alerts page of the Prometheus that runs: Debian's package ships only the classic
        UI, where /alerts is a 404."""
        for path in ("/alerts", "/classic/alerts"):
            try:
                if requests.get(self.prometheus.url + path, timeout=5).status_code == 200:
                    return self.prometheus.url + path
            except requests.RequestException:
                break
        return self.prometheus.url + "/api/v1/alerts"

    def stop(self) -> None:
        if self.generator:
            self.generator.stop()
        for service in reversed(self.services):
            service.stop()
        for server in self.servers:
            server.shutdown()
        if self.proxy is not None:
            self.proxy.close()
        if self.webhook:
            self.webhook.stop()
        if self.smtp:
            self.smtp.stop()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run_demo(out=print, duration: float = 0, **options) -> None:
    import signal
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)     # stop Prometheus and Alertmanager too
        # Ctrl-C too when started in the background of a script, which ignores SIGINT
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if options.get("backfill_days"):
        out(f"backfilling {options['backfill_days']} days of history for the demo's keys "
            "(--no-backfill to skip) ...")
    demo = DemoStack(**options).start()
    try:
        for line in demo.describe():
            out(line)
        out("Ctrl-C stops the demo." if not duration else f"running for {duration:.0f} s")
        deadline = time.monotonic() + duration if duration else None
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        if demo.generator:
            out(json.dumps({"requests_sent": demo.generator.stats.sent,
                            "connection_failures": demo.generator.stats.failed}))
        demo.stop()
