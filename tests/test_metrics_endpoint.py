import base64
import subprocess

import pytest
import requests

from support import build_app, free_port, require_binary, sample_total, samples


def test_request_metrics_by_token_route_method_code(client, keys):
    alpha = {"X-API-Key": keys[1]["alpha"]}
    client.get("/items", headers=alpha)
    client.get("/items/7", headers=alpha)
    client.get("/items/8", headers=alpha)
    client.get("/items/100", headers=alpha)
    client.get("/nowhere/123", headers=alpha)
    text = client.get("/metrics").get_data(as_text=True)
    requests_total = samples(text, "apitoken_requests_total")
    assert requests_total[(("code", "200"), ("method", "GET"), ("route", "/items/<int:item_id>"),
                           ("token", "alpha"))] == 2
    assert requests_total[(("code", "404"), ("method", "GET"), ("route", "/items/<int:item_id>"),
                           ("token", "alpha"))] == 1
    assert requests_total[(("code", "404"), ("method", "GET"), ("route", "__unmatched__"),
                           ("token", "alpha"))] == 1
    assert sample_total(text, "apitoken_request_duration_seconds_count", token="alpha") == 5
    assert sample_total(text, "apitoken_request_duration_seconds_bucket", token="alpha", le="+Inf") == 5
    buckets = {dict(l)["le"] for l in samples(text, "apitoken_request_duration_seconds_bucket")}
    assert buckets == {"0.1", "0.25", "0.5", "1.0", "2.5", "+Inf"}        # few per token
    route_buckets = {dict(l)["le"] for l in samples(text, "apitoken_route_request_duration_seconds_bucket")}
    assert {"0.005", "1.0", "2.0", "10.0"} <= route_buckets                 # fine per route
    assert sample_total(text, "apitoken_route_request_duration_seconds_count",
                        route="/items/<int:item_id>") == 3
    assert sample_total(text, "apitoken_token_last_used_timestamp_seconds", token="alpha") > 1.7e9
    assert sample_total(text, "apitoken_token_info", token="alpha", name="Alpha app", tenant="acme") == 1
    # one series per key, its value the status: 0 active, 1 rate_limited, 2 expired, 3 inactive
    status = {dict(l)["token"]: v for l, v in samples(text, "apitoken_token_status").items()}
    assert status == {"alpha": 0, "beta": 0, "gamma": 0, "delta": 0, "revoked": 3, "old": 2}
    assert "_created" not in text


def test_openmetrics_on_request(client):
    r = client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert r.headers["Content-Type"].startswith("application/openmetrics-text")
    assert r.get_data(as_text=True).rstrip().endswith("# EOF")
    plain = client.get("/metrics")
    assert plain.headers["Content-Type"].startswith("text/plain")


def test_metrics_behind_basic_auth(make_app):
    client = make_app(metrics_basic_user="prom", metrics_basic_password="s3cret").test_client()
    assert client.get("/metrics").status_code == 401
    bad = base64.b64encode(b"prom:wrong").decode()
    assert client.get("/metrics", headers={"Authorization": f"Basic {bad}"}).status_code == 401
    good = base64.b64encode(b"prom:s3cret").decode()
    r = client.get("/metrics", headers={"Authorization": f"Basic {good}"})
    assert r.status_code == 200 and b"apitoken_requests_total" in r.data


def test_metrics_behind_bearer_auth(make_app):
    client = make_app(metrics_bearer_token="tok-123").test_client()
    r = client.get("/metrics")
    assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
    assert client.get("/metrics", headers={"Authorization": "Bearer tok-124"}).status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer tok-123"}).status_code == 200


def test_metrics_on_a_separate_port(keys):
    port = free_port()
    app = build_app(keys[0], metrics_port=port)
    analytics = app.extensions["api_token_exporter"]
    try:
        client = app.test_client()
        client.get("/items", headers={"X-API-Key": keys[1]["alpha"]})
        # not on the app any more: it is an ordinary (authenticated) path there
        assert client.get("/metrics").status_code == 401
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert sample_total(text, "apitoken_requests_total", token="alpha") == 1
    finally:
        analytics.stop()


def test_promtool_check_metrics_finds_nothing(client, keys):
    promtool = require_binary("promtool")
    for raw in keys[1].values():
        client.get("/items", headers={"X-API-Key": raw})
    client.get("/items")
    text = client.get("/metrics").get_data(as_text=True)
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == ""


def test_a_second_process_on_the_same_metrics_port_goes_on_without_it(keys, tmp_path, caplog):
    """As a second gunicorn worker would: the port is taken, so it logs once and serves the
    app (it used to fail to boot, and gunicorn restarted it without end)."""
    port = free_port()
    first = build_app(keys[0], metrics_port=port, state_dir=str(tmp_path))
    try:
        second = build_app(keys[0], metrics_port=port, state_dir=str(tmp_path))
        assert "already in use" in caplog.text
        second.test_client().get("/items", headers={"X-API-Key": keys[1]["alpha"]})
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert sample_total(text, "apitoken_requests_total", token="alpha") == 1   # shared state_dir
    finally:
        first.extensions["api_token_exporter"].stop()


def test_an_apps_metrics_are_not_public_by_default(keys):
    from flask import Flask
    from api_token_exporter import TokenAnalytics
    app = Flask("closed")
    TokenAnalytics(app, keys_file=keys[0])
    r = app.test_client().get("/metrics")
    assert r.status_code == 403
    assert "metrics_bearer_token" in r.get_json()["detail"] and "metrics_public" in r.get_json()["detail"]
    assert b"apitoken_token_info" not in r.get_data()
    opened = Flask("token")
    TokenAnalytics(opened, keys_file=keys[0], metrics_bearer_token="scrape-secret")
    client = opened.test_client()
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer scrape-secret"}).status_code == 200


@pytest.mark.parametrize("addr, status", [("127.0.0.1", 200), ("0.0.0.0", 403)])
def test_a_metrics_port_is_open_only_on_loopback(keys, addr, status):
    port = free_port()
    app = build_app(keys[0], metrics_port=port, metrics_addr=addr, metrics_public=False)
    try:
        assert requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).status_code == status
    finally:
        app.extensions["api_token_exporter"].stop()
