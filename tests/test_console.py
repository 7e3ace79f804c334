"""The console (/ui). Sessions, CSRF and scopes through Flask's test client; then the pages in a
real headless Chromium (Debian's chromium and chromedriver through Selenium) against a demo API
with real Prometheus and Alertmanager: what the pages show is what the JSON API answers for the
same traffic, the charts hold the API's points, traffic changes a card by the auto-refresh,
acknowledging in the page silences the alert in Alertmanager, the CSV download is the JSON, a
tenant sees its tokens only, and requests without the session or its CSRF token are refused.
The browser tests write the screenshots docs/console.md shows."""
import base64
import csv
import datetime as dt
import hashlib
import io
import json
import pathlib
import re
import tempfile
import threading
import time

import pytest
import requests
import yaml
from werkzeug.serving import make_server

from api_token_exporter.analytics import queries as analytics
from api_token_exporter.mixin import rules as rulegen, thresholds
from api_token_exporter.core.config import ConfigError, load_settings
from api_token_exporter.core.keystore import rotate_key, set_active
from support import build_app, console_csrf, console_sign_in, free_port, needs, require_binary, wait_for

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHOTS = ROOT / "docs" / "console"
ADMIN_TOKEN = "console-admin-secret"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
STATIC = ROOT / "exporter" / "api_token_exporter" / "web" / "console" / "static"


# -- sessions, CSRF and scopes (no browser) -----------------------------------------------------

@pytest.fixture
def console(make_app):
    return make_app(admin_token=ADMIN_TOKEN).test_client()


def test_the_console_is_there_only_with_the_admin_token(make_app):
    without = make_app().test_client()
    assert without.get("/ui/tokens").status_code == 401          # just a path of the app: no key
    with_token = make_app(admin_token=ADMIN_TOKEN).test_client()
    r = with_token.get("/ui/tokens")
    assert r.status_code == 302 and r.headers["Location"].endswith("/ui/login?next=tokens")
    assert with_token.get("/ui").status_code == 302
    # pages that need Prometheus or Alertmanager say so, and are not in the navigation
    console_sign_in(with_token, ADMIN_TOKEN)
    usage = with_token.get("/ui/usage")
    assert usage.status_code == 404 and "prometheus_url" in usage.get_data(as_text=True)
    assert 'href="/ui/usage"' not in with_token.get("/ui/tokens").get_data(as_text=True)


def test_sign_in_sets_a_strict_http_only_cookie_that_holds_no_credential(console, keys):
    r = console_sign_in(console, "wrong")
    assert r.status_code == 401 and "neither the admin token" in r.get_data(as_text=True)
    assert "Set-Cookie" not in r.headers
    for inactive in ("revoked", "old"):
        assert console_sign_in(console, keys[1][inactive]).status_code == 401
    r = console_sign_in(console, ADMIN_TOKEN)
    assert r.status_code == 303 and r.headers["Location"].endswith("/ui/tokens")
    cookie = r.headers["Set-Cookie"]
    assert cookie.startswith("ate_console=") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert "Path=/;" in cookie and "Max-Age=43200" in cookie and "Secure" not in cookie   # plain http here
    value = cookie.split(";")[0].split("=", 1)[1]
    assert ADMIN_TOKEN not in value and ADMIN_TOKEN not in json.dumps(console.get_cookie("ate_console").value)
    page = console.get("/ui/tokens")
    assert page.status_code == 200 and ADMIN_TOKEN not in page.get_data(as_text=True)
    assert "Signed in as <strong" in page.get_data(as_text=True)
    # over https the cookie is Secure too
    assert "Secure" in console.post("/ui/login", data={"credential": ADMIN_TOKEN},
                                    base_url="https://localhost").headers["Set-Cookie"]


def test_json_endpoints_take_the_session_only_with_its_csrf_token(console):
    assert console.get("/admin/stats").status_code == 401
    console_sign_in(console, ADMIN_TOKEN)
    csrf = console_csrf(console)
    assert console.get("/admin/stats").status_code == 403                          # no header
    r = console.get("/admin/stats", headers={"X-CSRF-Token": csrf[:-1] + ("A" if csrf[-1] != "A" else "B")})
    assert r.status_code == 403 and "X-CSRF-Token" in r.json["detail"]
    assert console.get("/admin/stats", headers={"X-CSRF-Token": csrf}).status_code == 200
    cross = console.get("/admin/stats", headers={"X-CSRF-Token": csrf, "Sec-Fetch-Site": "cross-site"})
    assert cross.status_code == 403
    assert console.get("/admin/token-details", headers={"X-CSRF-Token": csrf}).status_code == 200
    # bearer auth is unchanged, with or without a session
    console.delete_cookie("ate_console")
    assert console.get("/admin/stats", headers=ADMIN).status_code == 200
    assert console.get("/admin/stats", headers={"X-CSRF-Token": csrf}).status_code == 401
    # a forged cookie is no session
    console.set_cookie("ate_console", "eyJyIjoiYWRtaW4ifQ.forged.signature")
    assert console.get("/admin/stats", headers={"X-CSRF-Token": csrf}).status_code == 401
    assert console.get("/ui/tokens").status_code == 302


def test_a_login_from_another_site_and_a_sign_out_without_the_form_token_are_refused(console):
    r = console.post("/ui/login", data={"credential": ADMIN_TOKEN}, headers={"Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 403 and "Set-Cookie" not in r.headers
    console_sign_in(console, ADMIN_TOKEN)
    csrf = console_csrf(console)
    assert console.post("/ui/logout", data={"csrf_token": "nope"}).status_code == 403
    assert console.get("/ui/tokens").status_code == 200                            # still signed in
    r = console.post("/ui/logout", data={"csrf_token": csrf})
    assert r.status_code == 303 and "ate_console=;" in r.headers["Set-Cookie"]
    assert console.get("/ui/tokens").status_code == 302


def test_sessions_expire(make_app, monkeypatch):
    client = make_app(admin_token=ADMIN_TOKEN, console_session_lifetime="2m").test_client()
    assert "Max-Age=120" in console_sign_in(client, ADMIN_TOKEN).headers["Set-Cookie"]
    csrf = console_csrf(client)
    assert client.get("/admin/stats", headers={"X-CSRF-Token": csrf}).status_code == 200
    later = time.time() + 121
    monkeypatch.setattr(time, "time", lambda: later)
    r = client.get("/admin/stats", headers={"X-CSRF-Token": csrf})
    assert r.status_code == 401 and "sign in again" in r.json["detail"]
    assert client.get("/ui/tokens").status_code == 302


def test_every_worker_reads_a_session_and_a_new_admin_token_ends_it(keys):
    """Workers and replicas that share the admin token (or console_secret) share sessions; a
    changed admin token ends them, console_secret or not."""
    one, two = build_app(keys[0], admin_token=ADMIN_TOKEN), build_app(keys[0], admin_token=ADMIN_TOKEN)
    first = one.test_client()
    console_sign_in(first, ADMIN_TOKEN)
    cookie, csrf = first.get_cookie("ate_console").value, console_csrf(first)

    def status(app):
        client = app.test_client()
        client.set_cookie("ate_console", cookie)
        return client.get("/admin/stats", headers={"X-CSRF-Token": csrf}).status_code
    assert status(two) == 200
    assert status(build_app(keys[0], admin_token="another-admin-token")) == 401
    secret = "s" * 32
    a = build_app(keys[0], admin_token=ADMIN_TOKEN, console_secret=secret).test_client()
    console_sign_in(a, ADMIN_TOKEN)
    cookie, csrf = a.get_cookie("ate_console").value, console_csrf(a)
    assert status(build_app(keys[0], admin_token=ADMIN_TOKEN, console_secret=secret)) == 200
    assert status(build_app(keys[0], admin_token=ADMIN_TOKEN)) == 401               # other key
    assert status(build_app(keys[0], admin_token="rotated-admin-token", console_secret=secret)) == 401


def test_a_tenant_sees_its_tenants_tokens_only_and_revoking_its_key_ends_the_session(console, keys):
    path, raw = keys
    for token in ("alpha", "beta", "gamma"):
        for _ in range(2):
            console.get("/items", headers={"X-API-Key": raw[token]})
    console.get("/items")                                           # no key: nobody's
    console_sign_in(console, raw["alpha"])
    csrf = {"X-CSRF-Token": console_csrf(console)}
    page = console.get("/ui/tokens").get_data(as_text=True)
    assert "tenant acme (Alpha app)" in page and 'href="/ui/alerts"' not in page
    details = console.get("/admin/token-details", headers=csrf).json
    acme = sorted(k for k, spec in {"alpha": "acme", "beta": "globex", "gamma": "acme", "delta": "acme",
                                    "revoked": "acme", "old": "acme"}.items() if spec == "acme")
    assert sorted(t["id"] for t in details["tokens"]) == acme and details["total_tokens"] == len(acme)
    stats = console.get("/admin/stats", headers=csrf).json
    assert stats["tokens"]["count"] == 5 and stats["total_requests"] == 4
    assert stats["unauthenticated_requests"] == 0
    assert {r["token"] for r in stats["recent_requests"]} == {t["token_id"] for t in details["tokens"]
                                                              if t["id"] in ("alpha", "gamma")}
    admin = console.get("/admin/stats", headers=ADMIN).json
    assert admin["total_requests"] == 7 and admin["tokens"]["count"] == 6
    set_active(path, "alpha", False)
    wait_for("the revoked key's session refused", lambda: console.get(
        "/admin/stats", headers=csrf).status_code == 401, timeout=10, interval=0.2)


def test_a_tenant_session_lasts_as_long_as_the_secret_it_signed_in_with(console, keys):
    path, raw = keys
    new, _ = rotate_key(path, "alpha", grace_seconds=4)
    current = console.application.test_client()
    wait_for("the new secret in force", lambda: console_sign_in(current, new).status_code == 303, timeout=10, interval=0.1)
    current_csrf = {"X-CSRF-Token": console_csrf(current)}
    assert console_sign_in(console, raw["alpha"]).status_code == 303             # the replaced secret, in its grace
    csrf = {"X-CSRF-Token": console_csrf(console)}
    assert console.get("/admin/stats", headers=csrf).status_code == 200
    wait_for("the old secret's session refused after its grace", lambda: console.get(
        "/admin/stats", headers=csrf).status_code == 401, timeout=15, interval=0.2)
    assert current.get("/admin/stats", headers=current_csrf).status_code == 200


def test_every_configured_window_is_in_the_token_details(console, keys):
    console.get("/items", headers={"X-API-Key": keys[1]["gamma"]})
    details = {t["id"]: t for t in console.get("/admin/token-details", headers=ADMIN).json["tokens"]}
    gamma = details["gamma"]["rate_limits"]
    assert gamma["hour"]["limit"] == 4 and gamma["hour"]["remaining"] == 3 and gamma["hour"]["reset"]
    assert gamma["day"] == {"limit": 10000, "remaining": 9999, "reset": gamma["day"]["reset"]}
    assert details["alpha"]["rate_limits"] == {"minute": {"limit": 100, "remaining": 100, "reset": None},
                                               "hour": {"limit": 1000, "remaining": 1000, "reset": None},
                                               "day": {"limit": 10000, "remaining": 10000, "reset": None}}


def test_the_console_on_an_asgi_app(keys):
    """The ASGI middleware serves the same endpoints app: sign-in, pages, assets, the session on
    the JSON endpoints."""
    import asyncio
    import httpx
    from asgi_app import create_app

    async def scenario():
        app = create_app(keys_file=keys[0], admin_token=ADMIN_TOKEN)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api.test") as c:
            login = await c.post("/ui/login", data={"credential": ADMIN_TOKEN})
            page = await c.get("/ui/tokens")
            csrf = re.search(r'<meta name="ate-csrf" content="([^"]+)">', page.text).group(1)
            return (login.status_code, "HttpOnly" in login.headers["set-cookie"], page.status_code,
                    (await c.get("/admin/stats", headers={"X-CSRF-Token": csrf})).status_code,
                    (await c.get("/admin/stats")).status_code,
                    (await c.get("/ui/static/tokens.js")).headers["content-type"].split(";")[0])
    assert asyncio.run(scenario()) == (303, True, 200, 200, 403, "text/javascript")


def test_failed_sign_ins_are_throttled_per_address_only(make_app):
    app = make_app(admin_token=ADMIN_TOKEN, auth_failure_limit=3)
    client = app.test_client()
    assert [console_sign_in(client, "wrong").status_code for _ in range(4)] == [401, 401, 401, 429]
    refused = console_sign_in(client, ADMIN_TOKEN)                 # the right token too, from there
    assert refused.status_code == 429 and 0 < int(refused.headers["Retry-After"]) <= 60
    other = app.test_client()
    other.environ_base["REMOTE_ADDR"] = "192.0.2.7"
    assert console_sign_in(other, ADMIN_TOKEN).status_code == 303   # another address is not locked out


def test_a_sign_in_posted_from_another_site_is_refused(console):
    def post(**headers):
        return console.post("/ui/login", data={"credential": ADMIN_TOKEN}, headers=headers)
    assert post(**{"Sec-Fetch-Site": "cross-site"}).status_code == 403
    assert post(Origin="https://evil.example").status_code == 403       # no Fetch Metadata: the Origin
    assert post(Origin="http://localhost").status_code == 303
    assert post().status_code == 303                                      # not a browser: nothing to forge
    csrf = console_csrf(console)                # the session's JSON calls: the same check
    assert console.get("/admin/stats", headers={"X-CSRF-Token": csrf, "Origin": "https://evil.example"}).status_code == 403
    assert console.get("/admin/stats", headers={"X-CSRF-Token": csrf, "Origin": "http://localhost"}).status_code == 200


def test_pages_carry_security_headers_and_no_inline_script(console):
    console_sign_in(console, ADMIN_TOKEN)
    r = console.get("/ui/tokens")
    csp = r.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert r.headers["X-Content-Type-Options"] == "nosniff" and r.headers["Cache-Control"] == "no-store"
    html = r.get_data(as_text=True)
    assert not re.search(r"<script(?![^>]*\bsrc=)", html) and " on" + "click=" not in html
    assert console.get("/ui/static/console.js").status_code == 200          # assets need no session
    assert console.get("/ui/static/../__init__.py").status_code == 404


def test_console_settings():
    s = load_settings(environ={"ATE_CONSOLE_SESSION_LIFETIME": "8h", "ATE_CONSOLE_REFRESH_SECONDS": "0"})
    assert s.console_session_lifetime == 8 * 3600 and s.console_refresh_seconds == 0
    for bad in ({"console_refresh_seconds": 1}, {"console_session_lifetime": "10s"}, {"console_secret": "short"}):
        with pytest.raises(ConfigError):
            load_settings(environ={}, **bad)


def test_vendored_uplot_is_the_version_and_the_files_noted():
    note = (STATIC / "uplot" / "VERSION").read_text()
    version = re.match(r"uPlot (\S+) ", note).group(1)
    assert (STATIC / "uplot" / "uPlot.iife.min.js").read_text()[:80].startswith(
        f"/*! https://github.com/leeoniya/uPlot (v{version}) */")
    for digest, name in re.findall(r"^sha256 ([0-9a-f]{64})  (\S+)$", note, re.M):
        assert hashlib.sha256((STATIC / "uplot" / name).read_bytes()).hexdigest() == digest, name
    assert "MIT License" in (STATIC / "uplot" / "LICENSE").read_text()


@pytest.mark.parametrize("limit, remaining, reset_in, rate, window, expected", [
    (100, 40, 30, 1.0, 60, None),          # 30 left to use in this window; 60 a window later: lasts
    (100, 40, 30, 2.0, 60, 20.0),          # spent in 20 s
    (100, 0, 30, 0.0, 60, 0.0),            # out now, until it resets
    (100, 40, 30, 2.0, 3600, 20.0),
    (100, 90, 30, 2.0, 60, 30 + 50.0),     # lasts this window (60 < 90); the next one after 50 s
    (100, None, None, 2.0, 60, 50.0),      # no window running: a fresh one
    (100, None, None, 1.0, 60, None),
    (100, 40, None, 0.0, 60, None),
])
def test_when_a_window_runs_out(limit, remaining, reset_in, rate, window, expected):
    now = 1_000_000.0
    reset_at = None if reset_in is None else now + reset_in
    assert analytics.runs_out_in(limit, remaining, reset_at, rate, now, window) == expected


def test_a_token_filter_stays_inside_the_scope():
    assert analytics.Scope(["a", "b"]).narrow("a").tokens == ["a"]
    assert analytics.Scope().narrow("anything").tokens == ["anything"]
    assert analytics.Scope(["a"]).narrow(None).tokens == ["a"]
    for scope, token in ((analytics.Scope(["a"]), "b"), (analytics.Scope(), 'x"} or vector(1)')):
        with pytest.raises(analytics.AnalyticsError):
            scope.narrow(token)
    assert analytics.parse_multiplier("1.5x") == 1.5 and analytics.parse_multiplier(None) == 1.0
    for bad in ("0", "-1", "nan", "inf", "lots"):
        with pytest.raises(analytics.AnalyticsError):
            analytics.parse_multiplier(bad)


# -- in a real browser, against real Prometheus and Alertmanager ---------------------------------

FAST = {"rate_window": "1m", "error_rate": {"for": "2s", "min_requests": 5},
        "latency": {"for": "2s", "min_requests": 5}}
CHAT_COMPLETION = 250          # output tokens of each demo-llm chat


def serve(app):
    server = make_server("127.0.0.1", free_port(), app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}"


def send(url, key=None, path="/api/v1/items", n=1, method="GET", **kw):
    headers = {"X-API-Key": key} if key else {}
    for _ in range(n):
        requests.request(method, url + path, headers=headers, timeout=10, **kw)


def demo_traffic(url, raw):
    """The same every run: successes, 404s and 500s, a token over its minute limit, LLM chats,
    and refused keys (nine failed authentications from 127.0.0.1: the unauthorized alert)."""
    send(url, raw["demo-steady"], n=12)
    send(url, raw["demo-steady"], "/api/v1/items/7", n=3)
    send(url, raw["demo-limited"], n=25)                      # its hour allows 20
    send(url, raw["demo-bursty"], "/api/v1/repos/acme/portfolio", n=4)
    for model in ("gpt-4o", "gpt-4o", "gpt-4o-mini", "claude-haiku-4-5"):
        service = "anthropic" if model.startswith("claude") else "openai"
        send(url, raw["demo-llm"], "/api/v1/chat", method="POST",
             json={"service": service, "model": model, "prompt": "one two", "completion_tokens": CHAT_COMPLETION})
    send(url, raw["demo-inactive"], n=2)
    send(url, raw["demo-expired"], n=2)
    send(url, None, n=3)
    send(url, "atk_" + "x" * 40, n=2)
    send(url, raw["demo-errors"], "/api/v1/flaky?fail=1", n=6)
    send(url, raw["demo-errors"], "/api/v1/flaky?fail=0", n=2)
    send(url, raw["demo-steady"], "/api/v1/items/404", n=2)


def prometheus_total(prom_url):
    result = requests.get(prom_url + "/api/v1/query", params={"query": "sum(apitoken_requests_total)"},
                          timeout=10).json()["data"]["result"]
    return int(float(result[0]["value"][1])) if result else 0


@pytest.fixture(scope="module")
@needs("prometheus", "alertmanager")
def world(tmp_path_factory):
    """The demo API (the demo's keys, the console, the alert API) on a free port, Prometheus
    scraping it every second with the alert rules at test speed, Alertmanager with the history
    receiver, and the demo traffic once, counted by Prometheus."""
    from devstack.demo import create_demo_api, write_demo_keys
    from api_token_exporter.web.server import create_app
    from devstack.stack import (alertmanager_config, find_binary, prometheus_config,
                                          start_alertmanager, start_prometheus)
    for binary in ("prometheus", "chromium", "chromedriver"):
        require_binary(binary)
    if not find_binary("alertmanager", "prometheus-alertmanager"):
        pytest.fail("alertmanager is not installed: run .ci/install")
    from devstack import synthetic
    from api_token_exporter.core.keystore import load_keys, save_keys
    from api_token_exporter.core.pricing import Pricing
    tmp = tmp_path_factory.mktemp("console")
    keys_file = str(tmp / "keys.yml")
    raw = write_demo_keys(keys_file)
    keys = load_keys(keys_file)
    for key in keys:           # over its hour rather than its minute: rate limited for the whole module
        if key.id == "demo-limited":
            key.rate_limits = {"minute": 1000, "hour": 20, "day": 5000}
    save_keys(keys_file, keys)
    # thirty days of the demo's synthetic history up to today (UTC): the charts have a past
    midnight = dt.datetime.now(dt.timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
    synthetic.write_history(str(tmp / "prom" / "data"), midnight - 30 * 86400, midnight, pricing=Pricing.load())
    thresholds_file = tmp / "thresholds.yml"
    thresholds_file.write_text(yaml.safe_dump(thresholds.load_thresholds(
        str(ROOT / "prometheus" / "thresholds.yml"), FAST), sort_keys=False))
    rules_dir = tmp / "rules"
    rulegen.write(thresholds.load_thresholds(str(thresholds_file)), str(rules_dir))
    (tmp / "webhook-token").write_text("webhook-secret\n")
    (tmp / "slack").write_text("http://127.0.0.1:9/slack\n")
    prom_port, am_port, api_port, exporter_port = free_port(), free_port(), free_port(), free_port()
    prom_url, api_url = f"http://127.0.0.1:{prom_port}", f"http://127.0.0.1:{api_port}"
    exporter_url = f"http://127.0.0.1:{exporter_port}"
    started, servers = [], []
    try:
        am = start_alertmanager(str(tmp / "am"), alertmanager_config(
            None, "http://127.0.0.1:9", str(tmp / "slack"), group_wait="1s", group_interval="2s",
            repeat_interval="1h", history_url=exporter_url, history_token_file=str(tmp / "webhook-token")),
            port=am_port)
        started.append(am)
        fast = dict(admin_token=ADMIN_TOKEN, prometheus_url=prom_url, console_refresh_seconds=2, admin_rate_limit=100000)
        app = create_demo_api(keys_file=keys_file, country_lookup=False, **fast)
        # the alert API, and so the Alerts page, is the exporter service's
        exporter = create_app(keys_file=keys_file, alertmanager_url=am.url, alert_webhook_token="webhook-secret",
                              alert_db_url=f"sqlite:///{tmp}/alerts.db", alert_sync_interval=2, **fast)
        for port, wsgi, middleware in ((api_port, app, app.extensions["api_token_exporter"]),
                                       (exporter_port, exporter, exporter)):
            server = make_server("127.0.0.1", port, wsgi, threaded=True)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            servers.append((server, middleware))
        prom = start_prometheus(str(tmp / "prom"), prometheus_config(
            {"api-token-exporter": [f"127.0.0.1:{api_port}"]}, f"127.0.0.1:{am_port}", str(rules_dir),
            scrape_interval="1s", evaluation_interval="1s"), port=prom_port, retention="400d")
        started.append(prom)
        demo_traffic(api_url, raw)
        total = requests.get(api_url + "/admin/stats", headers=ADMIN, timeout=10).json()["total_requests"]
        wait_for("Prometheus to count the demo traffic", lambda: prometheus_total(prom.url) == total, timeout=60)
        yield {"url": api_url, "exporter": exporter_url, "raw": raw, "prom": prom.url, "am": am.url}
    finally:
        for server, middleware in servers:
            server.shutdown()
            alerts = middleware.endpoints.extensions.get("ate_alerts")
            if alerts is not None:
                alerts.stop()
        for service in reversed(started):
            service.stop()


@pytest.fixture(scope="module")
@needs("browser")
def browser(world):
    """Headless Chromium at laptop size, downloading into a fresh directory."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    downloads = tempfile.mkdtemp(prefix="ate-downloads-")
    options = webdriver.ChromeOptions()
    options.binary_location = require_binary("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tempfile.mkdtemp(prefix='ate-chromium-')}", "--window-size=1366,768",
                 "--lang=en-US"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": downloads,
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(require_binary("chromedriver")), options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": downloads})
    driver.downloads = pathlib.Path(downloads)
    try:
        yield driver
    finally:
        driver.quit()


def by_css(browser, selector):
    """The first element matching ``selector``, waited for: after a click the next page may
    still be loading."""
    from selenium.webdriver.common.by import By
    return wait_for(f"{selector} on {browser.current_url}", lambda: browser.find_elements(By.CSS_SELECTOR, selector),
                    timeout=20, interval=0.1)[0]


def page_sign_in(browser, world, credential):
    browser.get(world["url"] + "/ui/login")
    if browser.get_cookie("ate_console"):                 # signed in already: the form is a sign-out away
        by_css(browser, "form.who button").click()
        wait_for("signed out", lambda: browser.get_cookie("ate_console") is None, timeout=20)
    field = by_css(browser, "#credential")
    field.clear()
    field.send_keys(credential)
    by_css(browser, "form button[type=submit]").click()
    wait_for("the tokens page", lambda: browser.current_url.endswith("/ui/tokens"), timeout=20)


def updates(browser) -> int:
    return int(browser.execute_script("return Number(document.getElementById('updated').dataset.count || 0)"))


def open_page(browser, world, name):
    browser.get(f"{world['url']}/ui/{name}")
    wait_for(f"the {name} page loaded", lambda: updates(browser) >= 1, timeout=60, interval=0.2)


def refresh(browser):
    """Press the page's Refresh button and wait for its data."""
    before = updates(browser)
    by_css(browser, "#refresh").click()
    wait_for("the page refreshed", lambda: updates(browser) > before, timeout=60, interval=0.1)


def agree(what, shown, answered, timeout=60):
    """Until the page shows what the API answers (the page refreshes meanwhile); fails with both."""
    deadline = time.monotonic() + timeout
    while True:
        page, api = shown(), answered()
        if page == api or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert page == api, what
    return page


def get(world, path, headers=ADMIN, **params):
    """As a client should: an analytics call refused while the same credential (the page, with
    its refreshes) has answers in flight is repeated after its Retry-After."""
    for _ in range(10):
        r = requests.get(world["url"] + path, headers=headers, params=params, timeout=60)
        if r.status_code not in (429, 503) or "Retry-After" not in r.headers:
            break
        time.sleep(int(r.headers["Retry-After"]))
    assert r.status_code == 200, r.text
    return r.json()


def screenshot(browser, name):
    """The whole page at the window's width (1366 px, or the phone's) as docs/console/<name>.png."""
    SHOTS.mkdir(exist_ok=True)
    size = browser.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = browser.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                              "clip": {"x": 0, "y": 0, "width": size["width"],
                                                                       "height": size["height"], "scale": 1}})
    (SHOTS / f"{name}.png").write_bytes(base64.b64decode(shot["data"]))


PAGE_TOKENS = """
const value = (card, field) => card.querySelector(`[data-field="${field}"]`).dataset.value;
return {
  cards: Object.fromEntries([...document.querySelectorAll('[data-card]')].map(
    (c) => [c.dataset.card, Number(c.querySelector('.value').dataset.value)])),
  tokens: [...document.querySelectorAll('article.token')].map((t) => ({
    id: t.dataset.token, masked: t.querySelector('[data-field="masked"]').textContent,
    status: t.dataset.status, badge: t.querySelector('[data-field="status"]').className,
    uses: Number(value(t, 'usage_count')), successes: Number(value(t, 'success_count')),
    errors: Number(value(t, 'error_count')),
    windows: Object.fromEntries([...t.querySelectorAll('tr[data-window]')].map(
      (w) => [w.dataset.window, [Number(w.dataset.remaining), Number(w.dataset.limit)]])),
    endpoints: [...t.querySelectorAll('li[data-route]')].map((li) => [li.dataset.route, Number(li.dataset.count)]),
    last_used: t.querySelector('[data-field="last_used"]').textContent})),
  recent: [...document.querySelectorAll('#recent tbody tr[data-status]')].map((r) => [
    r.cells[0].textContent, r.cells[1].textContent, r.cells[2].textContent, Number(r.dataset.status),
    r.querySelector('.badge').className]),
};"""
BADGES = {"active": "badge good", "rate_limited": "badge warn", "inactive": "badge bad", "expired": "badge bad",
          "invalid": "badge bad"}


def expected_tokens(stats, details):
    t = stats["tokens"]
    return {
        "cards": {"total_tokens": t["count"], "active": t["active"], "rate_limited": t["rate_limited"],
                  "invalid": t["invalid"], "total_requests": stats["total_requests"],
                  "successes": stats["success_count"], "errors": stats["error_count"], "per_hour": t["effective_limit"]},
        "tokens": [{"id": d["id"], "masked": d["token_id"], "status": d["status"], "badge": BADGES[d["status"]],
                    "uses": d["usage_count"], "successes": d["success_count"], "errors": d["error_count"],
                    "windows": {w: [v["remaining"], v["limit"]] for w, v in d["rate_limits"].items()},
                    "endpoints": d["top_endpoints"], "last_used": d["last_used"] or "–"}
                   for d in details["tokens"]],
        "recent": [[r["time_str"], f"{r['method']} {r['endpoint']}", r["token"], r["status"],
                    "badge " + ("bad" if r["status"] >= 500 else "warn" if r["status"] >= 400 else "good")]
                   for r in stats["recent_requests"][:20]],
    }


@pytest.mark.integration
def test_sign_in_and_sign_out_in_the_browser(world, browser):
    browser.get(world["url"] + "/ui/usage")
    wait_for("the sign-in page", lambda: "/ui/login" in browser.current_url, timeout=20)
    screenshot(browser, "login")
    by_css(browser, "#credential").send_keys("not-the-token")
    by_css(browser, "form button[type=submit]").click()
    assert "neither the admin token" in by_css(browser, "#login-error").text
    assert browser.get_cookie("ate_console") is None
    by_css(browser, "#credential").send_keys(ADMIN_TOKEN)
    by_css(browser, "form button[type=submit]").click()
    wait_for("back on the usage page", lambda: browser.current_url.endswith("/ui/usage"), timeout=20)
    cookie = browser.get_cookie("ate_console")
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict" and cookie["path"] == "/"
    assert ADMIN_TOKEN not in cookie["value"] and ADMIN_TOKEN not in browser.page_source
    assert browser.execute_script("return document.cookie") == ""          # out of scripts' reach
    assert [a.text for a in browser.find_elements("css selector", "header nav a")] == ["Tokens", "Live", "Usage", "Capacity"]
    assert by_css(browser, 'header nav a[aria-current="page"]').text == "Usage"
    # the keyboard: the first Tab reaches the skip link, which moves on to the content
    from selenium.webdriver.common.keys import Keys
    by_css(browser, "body").send_keys(Keys.TAB)
    assert browser.switch_to.active_element.text == "Skip to content"
    # every field has a label, every chart a text alternative (and its data as a table)
    wait_for("the charts", lambda: browser.execute_script("return Object.keys(window.ATE_CHARTS).length") == 3)
    assert browser.execute_script("""return [...document.querySelectorAll('input:not([type=hidden]), select')]
        .filter((e) => !e.labels.length && !e.getAttribute('aria-label')).map((e) => e.outerHTML)""") == []
    assert all(re.match(r"(Requests|LLM tokens|Cost \(USD\)) per day, \d{4}-\d\d-\d\d to \d{4}-\d\d-\d\d: .+ in total",
                        label)
               for label in browser.execute_script(
                   "return [...document.querySelectorAll('.plot')].map((p) => p.getAttribute('aria-label'))"))
    by_css(browser, "form.who button").click()
    wait_for("signed out", lambda: "/ui/login" in browser.current_url, timeout=20)
    assert browser.get_cookie("ate_console") is None
    browser.get(world["url"] + "/ui/tokens")
    assert "/ui/login" in browser.current_url


@pytest.mark.integration
def test_the_tokens_page_shows_what_the_json_api_answers(world, browser):
    page_sign_in(browser, world, ADMIN_TOKEN)
    open_page(browser, world, "tokens")
    shown = agree("the tokens page and /admin/stats + /admin/token-details",
                  lambda: browser.execute_script(PAGE_TOKENS),
                  lambda: expected_tokens(get(world, "/admin/stats"), get(world, "/admin/token-details")))
    # the demo traffic: every status, 2xx/4xx/5xx, the limited token's 429s
    assert shown["cards"]["total_tokens"] == 11 and shown["cards"]["rate_limited"] == 1
    assert shown["cards"]["invalid"] == 2 and shown["cards"]["errors"] > 0
    statuses = {t["id"]: t["status"] for t in shown["tokens"]}
    assert statuses["demo-limited"] == "rate_limited" and statuses["demo-inactive"] == "inactive"
    assert statuses["demo-expired"] == "expired" and statuses["demo-steady"] == "active"
    assert {r[3] // 100 for r in shown["recent"]} == {2, 4, 5}
    screenshot(browser, "tokens")


@pytest.mark.integration
def test_traffic_changes_a_card_by_the_auto_refresh(world, browser):
    open_page(browser, world, "tokens")
    browser.execute_script("window.notReloaded = true")
    before = browser.execute_script(PAGE_TOKENS)["cards"]["total_requests"]
    send(world["url"], world["raw"]["demo-steady"], n=5)
    # nobody presses a button: the page asks again every console_refresh_seconds (2 s here)
    wait_for("the card to count the new requests", lambda: browser.execute_script(
        PAGE_TOKENS)["cards"]["total_requests"] == before + 5, timeout=30)
    assert browser.execute_script("return window.notReloaded === true")
    assert get(world, "/admin/stats")["total_requests"] == before + 5


PAGE_USAGE = """
const number = (node) => Number(node.dataset.value);
return {
  periods: Object.fromEntries([...document.querySelectorAll('[data-period]')].map((c) => [c.dataset.period,
    Object.fromEntries(['requests', 'tokens', 'cost'].map((f) => [f, number(c.querySelector(`[data-field="${f}"]`))]))])),
  predictions: Object.fromEntries([...document.querySelectorAll('[data-prediction]')].map(
    (c) => [c.dataset.prediction, number(c.querySelector('.value'))])),
  charts: Object.fromEntries(Object.entries(window.ATE_CHARTS).map(([k, u]) => [k, [u.data[0], u.data[1]]])),
  models: [...document.querySelectorAll('#models tbody tr')].map((r) => [...r.cells].slice(0, 4).map((c) => c.textContent)),
  services: [...document.querySelectorAll('#services tbody tr')].map((r) => [...r.cells].slice(0, 4).map((c) => c.textContent)),
};"""
# pixels of each chart's series colour in its plotting area: the points were drawn
DRAWN = """
const rgb = {requests: [11, 92, 173], tokens: [130, 80, 223], cost: [26, 127, 55]};
return Object.fromEntries(Object.entries(window.ATE_CHARTS).map(([k, u]) => {
  const b = u.bbox, d = u.ctx.getImageData(b.left, b.top, b.width, b.height).data, [r, g, bl] = rgb[k];
  let n = 0;
  for (let i = 0; i < d.length; i += 4) if (Math.abs(d[i] - r) < 30 && Math.abs(d[i + 1] - g) < 30 && Math.abs(d[i + 2] - bl) < 30 && d[i + 3] > 200) n++;
  return [k, n];
}));"""
PERIOD_FIELD = {"daily": "date", "weekly": "weekStart", "monthly": "month"}


def epoch(period: str) -> int:
    day = period + "-01" if len(period) == 7 else period
    return int(dt.datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=dt.timezone.utc).timestamp())


def expected_usage(usage, breakdown, view):
    rows = usage["trends"][view]
    xs = [epoch(r[PERIOD_FIELD[view]]) for r in rows]
    return {
        "periods": usage["summary"],
        "predictions": {k: usage["predictions"][k] for k in ("estimatedMonthlyCost", "projectedRequests", "projectedTokens")},
        "charts": {k: [xs, [r[k] for r in rows]] for k in ("requests", "tokens", "cost")},
        "models": [[m["model"], f"{m['promptTokens']:,}", f"{m['completionTokens']:,}", f"{m['requestCount']:,}"]
                   for m in breakdown["byModel"]],
        "services": [[name, ", ".join(s["models"]), f"{s['totalTokens']:,}", f"{s['requestCount']:,}"]
                     for name, s in breakdown["byService"].items()],
    }


def preset_from(view, today=None):
    """The first day of a view's usual span up to today (UTC): 30 days, 12 weeks from a
    Monday, 12 months from a first."""
    today = today or dt.datetime.now(dt.timezone.utc).date()
    if view == "daily":
        return (today - dt.timedelta(days=29)).isoformat()
    if view == "weekly":
        return (today - dt.timedelta(days=today.weekday() + 77)).isoformat()
    month = today.year * 12 + today.month - 1 - 11
    return dt.date(month // 12, month % 12 + 1, 1).isoformat()


def usage_answer(world, view, headers=ADMIN, token=None, start=None):
    """What the page asks for: the usage document's trend and the breakdown from ``start`` (the
    view's usual span by default) to today (UTC)."""
    start = start or preset_from(view)
    extra = {"token": token} if token else {}
    return expected_usage(get(world, "/api/analytics/usage", headers, view=view, start=start, **extra),
                          get(world, "/analytics/tokens", headers, start=start, byDay="false", **extra), view)


def choose(browser, selector):
    by_css(browser, selector).find_element("xpath", "..").click()     # the radio's label


def downloaded(browser, name):
    path = browser.downloads / name
    wait_for(f"{name} downloaded", lambda: path.exists() and path.stat().st_size > 0, timeout=20, interval=0.2)
    return path.read_text()


@pytest.mark.integration
def test_the_usage_page_charts_and_numbers_are_the_json_apis(world, browser):
    open_page(browser, world, "usage")
    for view in ("daily", "weekly", "monthly"):
        if view != "daily":
            choose(browser, f'#view input[value="{view}"]')
        shown = agree(f"the usage page ({view}) and /api/analytics/usage + /analytics/tokens",
                      lambda: browser.execute_script(PAGE_USAGE), lambda: usage_answer(world, view))
        counts = {"daily": 30, "weekly": 12, "monthly": 12}[view]
        for key, (xs, ys) in shown["charts"].items():
            assert len(xs) == len(ys) == counts and ys[-1] > 0, (view, key)   # today's traffic is in the last point
        assert all(n > 20 for n in browser.execute_script(DRAWN).values()), browser.execute_script(DRAWN)
        if view == "daily":
            assert shown["periods"]["today"]["tokens"] > 0 and shown["periods"]["allTime"]["cost"] > 0
            assert {"gpt-4o", "gpt-4o-mini", "claude-haiku-4-5"} <= {m[0] for m in shown["models"]}
            screenshot(browser, "usage")

    # the charts follow From and To: ten days, in every view
    choose(browser, '#view input[value="daily"]')
    start = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=9)).strftime("%Y-%m-%d")
    browser.execute_script("document.getElementById('f-from').value = arguments[0]", start)
    by_css(browser, "#filters button[type=submit]").click()
    for view in ("daily", "weekly"):
        if view != "daily":
            choose(browser, f'#view input[value="{view}"]')
        shown = agree(f"the usage page ({view}) from {start}", lambda: browser.execute_script(PAGE_USAGE),
                      lambda: usage_answer(world, view, start=start))
        assert len(shown["charts"]["requests"][0]) == (10 if view == "daily" else len(
            get(world, "/api/analytics/usage", view="weekly", start=start)["trends"]["weekly"]))
        assert f"from={start}" in browser.current_url

    # one token, and the exports of what is shown
    from selenium.webdriver.support.ui import Select
    choose(browser, '#view input[value="daily"]')
    browser.execute_script("document.getElementById('f-from').value = arguments[0]", preset_from("daily"))
    Select(by_css(browser, "#f-token")).select_by_value("demo-llm")
    by_css(browser, "#filters button[type=submit]").click()
    shown = agree("the usage page for demo-llm", lambda: browser.execute_script(PAGE_USAGE),
                  lambda: usage_answer(world, "daily", token="demo-llm"))
    assert shown["periods"]["today"]["requests"] == 4 and "token=demo-llm" in browser.current_url
    by_css(browser, "#export-csv").click()
    rows = list(csv.DictReader(io.StringIO(downloaded(browser, "usage-daily-demo-llm.csv"))))
    by_css(browser, "#export-json").click()
    exported = json.loads(downloaded(browser, "usage-daily-demo-llm.json"))
    usage = get(world, "/api/analytics/usage", token="demo-llm", view="daily", start=preset_from("daily"))   # as the page asked
    assert [(r["period"], int(r["requests"]), int(r["llm_tokens"]), float(r["cost_usd"])) for r in rows] == \
        [(d["date"], d["requests"], d["tokens"], d["cost"]) for d in usage["trends"]["daily"]]
    assert exported["trend"] == {"view": "daily", "points": usage["trends"]["daily"]}
    assert exported["summary"] == usage["summary"] and exported["filters"]["token"] == "demo-llm"
    assert exported["predictions"] == usage["predictions"]


PAGE_CAPACITY = """
return {
  multiplier: document.getElementById('capacity').dataset.multiplier,
  totals: Object.fromEntries([...document.querySelectorAll('[data-total]')].map((c) => [c.dataset.total, Number(c.querySelector('.value').dataset.value)])),
  rows: [...document.querySelectorAll('#capacity tbody tr')].map((r) => [r.dataset.token, r.dataset.window, r.dataset.runsOutIn]),
  costs: Object.fromEntries([...document.querySelectorAll('#capacity [data-field="month-end-cost"]')].map(
    (c) => [c.closest('tr').dataset.token, Number(c.dataset.value)])),
};"""


def expected_capacity(doc):
    return {
        "multiplier": str(doc["multiplier"]).removesuffix(".0"),
        "totals": {"mtd-cost": doc["total"]["monthToDate"]["cost"], "end-cost": doc["total"]["monthEnd"]["cost"],
                   "end-requests": doc["total"]["monthEnd"]["requests"], "end-tokens": doc["total"]["monthEnd"]["tokens"]},
        "rows": [[t["token"], w["window"] if w else "", "" if not w or w["runsOutInSeconds"] is None
                  else str(w["runsOutInSeconds"]).removesuffix(".0")]
                 for t in doc["tokens"] for w in (t["windows"] or [None])],
        "costs": {t["token"]: t["monthEnd"]["cost"] for t in doc["tokens"]},
    }


@pytest.mark.integration
def test_the_capacity_page_plans_a_scenario(world, browser):
    open_page(browser, world, "capacity")
    choose(browser, '#preset input[value="2"]')
    shown = agree("the capacity page at 2x and /api/analytics/capacity?multiplier=2",
                  lambda: browser.execute_script(PAGE_CAPACITY),
                  lambda: expected_capacity(get(world, "/api/analytics/capacity", multiplier="2")))
    # demo-limited spent its hour (20): it is out until that window resets
    assert ["demo-limited", "hour", "0"] in shown["rows"]
    assert shown["totals"]["end-cost"] > shown["totals"]["mtd-cost"] > 0
    screenshot(browser, "capacity")
    field = by_css(browser, "#multiplier")
    field.clear()
    field.send_keys("1.7")
    by_css(browser, "#scenario button[type=submit]").click()
    agree("the capacity page at a typed 1.7x", lambda: browser.execute_script(PAGE_CAPACITY),
          lambda: expected_capacity(get(world, "/api/analytics/capacity", multiplier="1.7")))


def alertmanager_alert(world, fingerprint):
    held = [a for a in requests.get(world["am"] + "/api/v2/alerts", timeout=10).json() if a["fingerprint"] == fingerprint]
    return held[0] if held else None


PAGE_ALERT = """
const card = [...document.querySelectorAll('article.alert')].find((a) => a.querySelector('h3').textContent === arguments[0]);
return card ? {id: card.dataset.alertId, state: card.dataset.state} : null;"""


@pytest.mark.integration
def test_acknowledging_in_the_page_silences_the_alert_in_alertmanager(world, browser):
    exporter = {"url": world["exporter"]}       # the alert API's console
    page_sign_in(browser, exporter, ADMIN_TOKEN)
    open_page(browser, exporter, "alerts")
    assert [a.text for a in browser.find_elements("css selector", "header nav a")] == \
        ["Tokens", "Live", "Usage", "Alerts", "Capacity"]
    # nine failed authentications from 127.0.0.1 in the demo traffic: more than five an hour
    alert = wait_for("the unauthorized-access alert on the page", lambda: browser.execute_script(
        PAGE_ALERT, "ApiTokenUnauthorizedAccess"), timeout=120)
    assert alert["state"] == "firing" and alertmanager_alert(world, alert["id"])["status"]["state"] == "active"
    by_css(browser, "#by").send_keys("ana")
    card = f'article[data-alert-id="{alert["id"]}"]'
    by_css(browser, f"{card} input[name=comment]").send_keys("blocking the client")
    by_css(browser, f"{card} button[data-action=acknowledge]").click()
    held = wait_for("Alertmanager silences it", lambda: (alertmanager_alert(world, alert["id"]) or {}).get(
        "status", {}).get("silencedBy") and alertmanager_alert(world, alert["id"]), timeout=30)
    assert held["status"]["state"] == "suppressed"
    silence = requests.get(f"{world['am']}/api/v2/silence/{held['status']['silencedBy'][0]}", timeout=10).json()
    assert silence["createdBy"] == "admin (ana)" and silence["comment"] == "blocking the client"
    assert {m["name"]: m["value"] for m in silence["matchers"]} == held["labels"]
    wait_for("the page shows it acknowledged", lambda: browser.execute_script(
        PAGE_ALERT, "ApiTokenUnauthorizedAccess")["state"] == "acknowledged", timeout=30)
    # feedback from the page reaches the history
    by_css(browser, f'{card} button[data-verdict="true_positive"]').click()
    wait_for("the feedback in the history", lambda: [
        a for a in get(exporter, "/api/v1/alerts/history", type="ApiTokenUnauthorizedAccess")["alerts"]
        if a["id"] == alert["id"] and (a["feedback"] or {}).get("verdict") == "true_positive"], timeout=30)
    wait_for("the history table", lambda: "admin (ana)" in by_css(browser, "#history").text, timeout=30)
    screenshot(browser, "alerts")


def tenant_tokens(world, tenant):
    from devstack.demo import DEMO_KEYS
    return sorted(token for token, (_, owner, _, _) in DEMO_KEYS.items() if owner == tenant)


@pytest.mark.integration
def test_a_tenant_sees_only_its_tokens(world, browser):
    by_css(browser, "form.who button").click()
    page_sign_in(browser, world, world["raw"]["demo-steady"])             # tenant acme
    open_page(browser, world, "tokens")
    acme = tenant_tokens(world, "acme")

    def expected():
        """The admin's JSON, cut down to acme's tokens here."""
        details = [d for d in get(world, "/admin/token-details")["tokens"] if d["id"] in acme]
        return {"ids": sorted(d["id"] for d in details),
                "cards": {"total_tokens": len(details), "active": sum(d["status"] == "active" for d in details),
                          "rate_limited": sum(d["status"] == "rate_limited" for d in details),
                          "invalid": sum(d["status"] in ("inactive", "expired", "invalid") for d in details),
                          "total_requests": sum(d["usage_count"] for d in details),
                          "successes": sum(d["success_count"] for d in details),
                          "errors": sum(d["error_count"] for d in details),
                          "per_hour": sum(d["rate_limit"]["limit"] for d in details
                                          if d["status"] in ("active", "rate_limited"))}}
    agree("the tenant's tokens page", lambda: (lambda p: {"ids": sorted(t["id"] for t in p["tokens"]),
                                                         "cards": p["cards"]})(browser.execute_script(PAGE_TOKENS)),
          expected)
    assert [a.text for a in browser.find_elements("css selector", "header nav a")] == ["Tokens", "Live", "Usage", "Capacity"]
    assert "tenant acme" in by_css(browser, "#who").text
    screenshot(browser, "tenant")
    key = {"X-API-Key": world["raw"]["demo-steady"]}
    open_page(browser, world, "usage")
    shown = agree("the tenant's usage page and the JSON API with its key",
                  lambda: browser.execute_script(PAGE_USAGE), lambda: usage_answer(world, "daily", headers=key))
    assert shown["periods"]["allTime"]["requests"] < get(world, "/api/analytics/usage")["summary"]["allTime"]["requests"]
    browser.get(world["url"] + "/ui/alerts")
    assert "exporter service" in browser.page_source              # the API has no alert API
    browser.get(world["exporter"] + "/ui/alerts")                 # the same sign-in: one host, one admin token
    assert "Alerts are for the admin" in browser.page_source


@pytest.mark.integration
def test_requests_without_the_session_or_with_a_wrong_csrf_token_are_refused(world, browser):
    page_sign_in(browser, world, ADMIN_TOKEN)
    open_page(browser, world, "tokens")
    cookie = {"ate_console": browser.get_cookie("ate_console")["value"]}
    csrf = browser.execute_script("return document.querySelector('meta[name=\"ate-csrf\"]').content")
    url = world["url"]
    assert requests.get(url + "/admin/stats", timeout=10).status_code == 401
    assert requests.get(url + "/admin/stats", cookies=cookie, timeout=10).status_code == 403
    assert requests.get(url + "/admin/stats", cookies=cookie, headers={"X-CSRF-Token": "forged"},
                        timeout=10).status_code == 403
    assert requests.get(url + "/admin/stats", cookies=cookie, headers={"X-CSRF-Token": csrf},
                        timeout=10).status_code == 200
    assert requests.get(url + "/api/analytics/usage", cookies=cookie, timeout=10).status_code == 403
    assert requests.get(url + "/admin/stats", cookies=cookie, timeout=10,
                        headers={"X-CSRF-Token": csrf, "Sec-Fetch-Site": "cross-site"}).status_code == 403
    # a write with a wrong token changes nothing in Alertmanager
    exporter = {"url": world["exporter"]}
    target = wait_for("a firing, unacknowledged alert", lambda: [
        a for a in get(exporter, "/api/v1/alerts", state="firing")["alerts"]], timeout=60)[0]
    silences = len(requests.get(world["am"] + "/api/v2/silences", timeout=10).json())
    ack = f"{exporter['url']}/api/v1/alerts/{target['id']}/acknowledge"
    for headers in ({}, {"X-CSRF-Token": "forged"}):
        r = requests.post(ack, cookies=cookie, json={}, headers=headers, timeout=10)
        assert r.status_code == 403, r.text
    assert requests.post(ack, json={}, timeout=10).status_code == 401
    assert requests.post(ack, json={}, cookies=cookie, headers={"X-CSRF-Token": csrf, "Sec-Fetch-Site": "same-site"},
                         timeout=10).status_code == 403
    assert len(requests.get(world["am"] + "/api/v2/silences", timeout=10).json()) == silences
    assert alertmanager_alert(world, target["id"])["status"]["state"] == "active"
    # and from the page itself, as a script with a wrong token would send it
    status = browser.execute_async_script("""
      const done = arguments[arguments.length - 1];
      fetch('../admin/stats', {headers: {'X-CSRF-Token': 'forged'}}).then((r) => done(r.status));""")
    assert status == 403


@pytest.mark.integration
def test_the_exporter_service_serves_the_console_too(world, browser, tmp_path):
    from api_token_exporter.core.keystore import add_key
    from api_token_exporter.web.server import create_app
    keys_file = str(tmp_path / "keys.yml")
    add_key(keys_file, "go-service", name="Go service", tenant="umbrella")
    server, url = serve(create_app(keys_file=keys_file, ingest_token="ingest-secret", admin_token=ADMIN_TOKEN,
                                   console_refresh_seconds=2))
    try:
        events = [{"token": "go-service", "route": "/v1/orders", "status": code, "duration_ms": 12}
                  for code in (200, 200, 200, 503)]
        assert requests.post(url + "/v1/events", json={"events": events}, timeout=10,
                             headers={"Authorization": "Bearer ingest-secret"}).json()["accepted"] == 4
        exporter = {"url": url}
        page_sign_in(browser, exporter, ADMIN_TOKEN)
        open_page(browser, exporter, "tokens")
        shown = agree("the exporter's tokens page", lambda: browser.execute_script(PAGE_TOKENS),
                      lambda: expected_tokens(get(exporter, "/admin/stats"), get(exporter, "/admin/token-details")))
        assert shown["tokens"][0]["uses"] == 4 and shown["tokens"][0]["errors"] == 1
        assert [a.text for a in browser.find_elements("css selector", "header nav a")] == ["Tokens", "Live"]
    finally:
        server.shutdown()


PAGE_LIVE = """
return {
  rows: [...document.querySelectorAll('#live-requests tbody tr[data-status]')].map((r) => [
    r.dataset.token, r.cells[2].textContent, Number(r.dataset.status)]),
  tokens: Object.fromEntries([...document.querySelectorAll('#live-tokens tbody tr[data-token]')].map(
    (r) => [r.dataset.token, [Number(r.dataset.requests), Number(r.dataset.errors)]])),
  streams: Number(document.getElementById('updated').dataset.connects || 0),
  ticks: Number(document.getElementById('updated').dataset.count || 0),
};"""


def live_rows(browser, sent):
    """Waits until the live page lists every request of ``sent`` [(token, "METHOD /path", status)],
    and returns what it shows then (the requests of others may be there too)."""
    def shown():
        page = browser.execute_script(PAGE_LIVE)
        page["rows"] = [tuple(row) for row in page["rows"]]
        return page if all(page["rows"].count(row) >= sent.count(row) for row in sent) else None
    return wait_for("the live page to show the requests", shown, timeout=20, interval=0.1)


@pytest.mark.integration
def test_the_live_page_shows_requests_as_they_happen(world, browser):
    """Pushed by the server, one stream, no polling: each request is on the page within two of
    its one-second ticks; the counts per token are the requests sent; a tenant sees its own."""
    page_sign_in(browser, world, ADMIN_TOKEN)
    open_page(browser, world, "live")
    raw = world["raw"]
    send(world["url"], raw["demo-steady"], n=3)
    send(world["url"], raw["demo-errors"], "/api/v1/flaky?fail=1", n=2)
    sent_at = browser.execute_script(PAGE_LIVE)["ticks"]
    sent = [("demo-steady", "GET /api/v1/items", 200)] * 3 + [("demo-errors", "GET /api/v1/flaky", 500)] * 2
    shown = live_rows(browser, sent)
    assert shown["ticks"] - sent_at <= 2, "shown later than two ticks after the requests were answered"
    assert shown["streams"] == 1                     # pushed on one stream, never asked again
    wait_for("the per-token counts", lambda: (lambda t: t.get("demo-steady", [0])[0] >= 3
                                              and t.get("demo-errors", [0, 0])[1] >= 2)(
        browser.execute_script(PAGE_LIVE)["tokens"]), timeout=20, interval=0.2)
    screenshot(browser, "live")
    # a tenant (acme) sees acme's requests, not globex's nor those without a key
    page_sign_in(browser, world, raw["demo-steady"])
    open_page(browser, world, "live")
    send(world["url"], raw["demo-errors"], "/api/v1/flaky?fail=1", n=2)
    send(world["url"], None, n=2)
    send(world["url"], raw["demo-bursty"], "/api/v1/repos/acme/portfolio", n=2)
    shown = live_rows(browser, [("demo-bursty", "GET /api/v1/repos/<owner>/<repo>", 200)] * 2)
    acme = set(tenant_tokens(world, "acme"))
    assert {row[0] for row in shown["rows"]} <= acme and set(shown["tokens"]) <= acme, shown
    page_sign_in(browser, world, ADMIN_TOKEN)


WIDER_THAN_THE_SCREEN = """
const edge = window.innerWidth;
return [document.documentElement.scrollWidth, edge,
        [...document.querySelectorAll('body *')].filter((e) => e.getBoundingClientRect().right > edge + 1)
          .slice(0, 5).map((e) => e.tagName.toLowerCase() + (e.id ? '#' + e.id : '') + '.' + e.className)];"""


@pytest.mark.integration
@pytest.mark.parametrize("page", ["tokens", "live", "usage", "capacity", "alerts"])
def test_every_page_fits_a_phone_and_a_laptop_without_scrolling_sideways(world, browser, page):
    """At 390 x 844 (a phone) and 1366 x 768 nothing is wider than the screen: numbers wrap,
    tables scroll inside their box; once loaded, the loading look is gone. The phone screenshots
    go in docs/console/."""
    site = {"url": world["exporter"]} if page == "alerts" else world     # the alert API's console
    page_sign_in(browser, site, ADMIN_TOKEN)
    for width, height in ((390, 844), (1366, 768)):
        browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 700})
        try:
            open_page(browser, site, page)
            time.sleep(1)                       # charts and tables drawn after the first answer
            assert browser.execute_script("return document.getElementById('main').getAttribute('aria-busy')") is None
            scroll, screen, wide = browser.execute_script(WIDER_THAN_THE_SCREEN)
            assert scroll <= screen, (page, width, scroll, wide)
            if width < 700:
                screenshot(browser, f"{page}-phone")
        finally:
            browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
