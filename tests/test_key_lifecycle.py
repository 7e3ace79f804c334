"""Key rotation without downtime and key metadata: `keys rotate` gives the same id a new secret,
the old one keeps working through the grace period (counted), then gets its own refusal; the
metrics, limits and budget continue under the same id. Old-secret use is visible on /metrics,
in Prometheus and in `keys show`."""
import threading

import pytest
import requests
import yaml
from werkzeug.serving import make_server

from api_token_exporter.core.keystore import KeyStoreError, add_key, load_keys, rotate_key, update_key
from devstack.stack import find_binary, free_port, prometheus_config, start_prometheus
from support import build_app, needs, run_cli, sample_total, wait_for

@pytest.fixture
def key_file(tmp_path):
    path = str(tmp_path / "keys.yml")
    old = add_key(path, "shop", name="Shop", tenant="acme", description="checkout service",
                  rate_limits={"minute": 1000, "hour": 7}, budget_usd={"daily": 5.0})
    return path, old


def test_rotation_keeps_the_id_and_the_old_secret_works_through_its_grace(key_file):
    path, old = key_file
    app = build_app(path, metrics_public=True)
    client = app.test_client()
    assert client.get("/items", headers={"X-API-Key": old}).status_code == 200

    result = run_cli("keys", "rotate", "--file", path, "shop", "--grace", "3s")
    assert result.returncode == 0, result.stderr
    new = result.stdout.strip()
    assert new.startswith("atk_") and new != old and new not in result.stderr and old not in result.stdout
    assert "the old secret atk_" in result.stderr and "works until" in result.stderr
    keystore = app.extensions["api_token_exporter"].keystore
    wait_for("the key file watcher to load the rotation", lambda: keystore.get("shop").previous is not None, 10, 0.05)
    answers = [client.get("/items", headers={"X-API-Key": k}) for k in (old, new, old)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    # one id: the hour limit (7) counts both secrets, and the headers say so
    assert [a.headers["X-RateLimit-Hour-Remaining"] for a in answers] == ["5", "4", "3"]
    text = client.get("/metrics").get_data(as_text=True)
    assert sample_total(text, "apitoken_requests_total", token="shop") == 4
    assert sample_total(text, "apitoken_key_old_secret_requests_total", token="shop") == 2
    assert 'apitoken_key_event_timestamp_seconds{token="shop",event="grace_ends"}' in text
    assert 'apitoken_budget_usd{token="shop",period="daily"} 5.0' in text
    listing = run_cli("keys", "list", "--file", path).stdout
    assert "valid until" in listing and old not in listing and new not in listing

    wait_for("the grace period to end", lambda: not keystore.get("shop").previous_valid(), 10, 0.05)
    refused = client.get("/items", headers={"X-API-Key": old})
    assert refused.status_code == 401
    assert refused.get_json() == {"detail": "API key was rotated and its grace period is over: use the new key"}
    assert client.get("/items", headers={"X-API-Key": new}).status_code == 200
    text = client.get("/metrics").get_data(as_text=True)
    assert sample_total(text, "apitoken_auth_failures_total", reason="rotated") == 1
    assert sample_total(text, "apitoken_key_old_secret_requests_total", token="shop") == 2
    assert sample_total(text, "apitoken_requests_total", token="shop") == 6      # the refusal too, by id
    assert "refused since" in run_cli("keys", "list", "--file", path).stdout


def test_rotation_without_grace_and_key_metadata(key_file):
    path, old = key_file
    new, key = rotate_key(path, "shop", 0)
    assert key.previous is None and key.last_rotated_at is not None
    app = build_app(path)
    assert app.test_client().get("/items", headers={"X-API-Key": old}).get_json() == {"detail": "Invalid API key"}
    created = load_keys(path)[0].created_at
    update_key(path, "shop", description="checkout, v2", expires_at="2027-01-01T00:00:00Z")
    entry = yaml.safe_load(open(path))["keys"][0]
    assert entry["description"] == "checkout, v2" and entry["expires_at"].startswith("2027-01-01")
    assert entry["created_at"] == created.isoformat() and "updated_at" in entry
    assert old not in open(path).read() and new not in open(path).read()        # hashes only
    update_key(path, "shop", expires_at="")
    assert "expires_at" not in yaml.safe_load(open(path))["keys"][0]
    with pytest.raises(KeyStoreError, match="grace period must be from 0 to 90 days"):
        rotate_key(path, "shop", 91 * 86400)
    with pytest.raises(KeyStoreError, match="no key with id"):
        rotate_key(path, "nope", 60)
    assert run_cli("keys", "rotate", "--file", path, "shop", "--grace", "soon").returncode == 2


def test_admin_json_carries_the_metadata_and_the_pending_rotation(key_file):
    path, old = key_file
    rotate_key(path, "shop", 3600)
    app = build_app(path, admin_token="admin-secret")
    doc = app.test_client().get("/admin/token-details", headers={"Authorization": "Bearer admin-secret"}).get_json()
    shop = doc["tokens"][0]
    assert shop["description"] == "checkout service" and shop["created_at"] and shop["last_rotated_at"]
    assert shop["rotation"]["old_key_valid"] is True and shop["rotation"]["old_key"].startswith("atk_")
    assert old not in str(doc) and shop["rotation"]["old_key"] != shop["token_id"]


@pytest.mark.integration
@needs("prometheus")
def test_old_secret_use_is_in_prometheus_and_keys_show(key_file, tmp_path):
    if not find_binary("prometheus"):
        pytest.fail("prometheus is not installed: run .ci/install")
    path, old = key_file
    rotate_key(path, "shop", 3600)
    app = build_app(path, metrics_public=True)
    port = free_port()
    server = make_server("127.0.0.1", port, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    prom = start_prometheus(str(tmp_path / "prom"), prometheus_config(
        {"api-token-exporter": [f"127.0.0.1:{port}"]}, None, str(tmp_path / "rules"),
        scrape_interval="1s", evaluation_interval="1s"))
    try:
        def scraped():
            r = requests.get(prom.url + "/api/v1/query", timeout=10,
                             params={"query": 'apitoken_key_old_secret_requests_total{token="shop"}'}).json()
            return r["data"]["result"]
        url = f"http://127.0.0.1:{port}/items"
        wait_for("a first scrape", lambda: requests.get(prom.url + "/api/v1/query", timeout=10, params={
            "query": 'up{job="api-token-exporter"} == 1'}).json()["data"]["result"], timeout=60)
        for _ in range(4):
            assert requests.get(url, headers={"X-API-Key": old}, timeout=10).status_code == 200
        wait_for("the old-secret count in Prometheus", lambda: scraped() and float(scraped()[0]["value"][1]) == 4,
                 timeout=60)
        shown = run_cli("keys", "show", "--file", path, "shop", "--prometheus-url", prom.url)
        assert shown.returncode == 0, shown.stderr
        lines = dict(line.split(None, 1) if "  " not in line else (line[:line.index("  ")], line.split("  ", 1)[1].strip())
                     for line in shown.stdout.splitlines())
        assert lines["description"] == "checkout service" and "valid until" in lines["rotation"]
        assert lines["old secret used, 24h"] == "4" and lines["requests, 24h"] == "4"
        assert lines["last used"] != "never"
        assert old not in shown.stdout
    finally:
        prom.stop()
        server.shutdown()
