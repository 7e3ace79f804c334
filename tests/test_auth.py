import datetime as dt
import functools

from api_token_exporter.core.keystore import add_key, load_keys, save_keys
from api_token_exporter.core.metrics import TOKEN_STATUS_VALUES
from support import sample_total


def metrics_text(client):
    return client.get("/metrics").get_data(as_text=True)


def test_missing_key(client):
    r = client.get("/items")
    assert r.status_code == 401
    assert r.get_json() == {"detail": "Missing API key"}


def test_invalid_key(client):
    r = client.get("/items", headers={"X-API-Key": "atk_not_a_real_key"})
    assert r.status_code == 401
    assert r.get_json() == {"detail": "Invalid API key"}


def test_inactive_key(client, keys):
    r = client.get("/items", headers={"X-API-Key": keys[1]["revoked"]})
    assert r.status_code == 403
    assert r.get_json() == {"detail": "API key is inactive"}


def test_expired_key(client, keys):
    r = client.get("/items", headers={"X-API-Key": keys[1]["old"]})
    assert r.status_code == 401
    assert r.get_json() == {"detail": "API key has expired"}


def test_valid_key_reaches_the_app(client, keys):
    r = client.get("/items", headers={"X-API-Key": keys[1]["alpha"]})
    assert r.status_code == 200
    assert r.get_json() == {"items": [1, 2, 3]}


def test_huge_and_malformed_keys_are_invalid_not_errors(client):
    for bad in ("x" * 20000, "atk_with space", "atk_\x7fcontrol"):
        r = client.get("/items", headers={"X-API-Key": bad})
        assert r.status_code == 401
        assert r.get_json() == {"detail": "Invalid API key"}


def test_auth_failures_are_counted_by_reason(client, keys):
    client.get("/items")
    client.get("/items", headers={"X-API-Key": "nope"})
    client.get("/items", headers={"X-API-Key": "nope2"})
    client.get("/items", headers={"X-API-Key": keys[1]["revoked"]})
    client.get("/items", headers={"X-API-Key": keys[1]["old"]})
    text = metrics_text(client)
    assert sample_total(text, "apitoken_auth_failures_total", reason="missing") == 1
    assert sample_total(text, "apitoken_auth_failures_total", reason="invalid") == 2
    assert sample_total(text, "apitoken_auth_failures_total", reason="inactive") == 1
    assert sample_total(text, "apitoken_auth_failures_total", reason="expired") == 1
    # refused requests are still requests: counted under a fixed label, or the known key id
    assert sample_total(text, "apitoken_requests_total", token="__unauthenticated__", code="401") == 3
    assert sample_total(text, "apitoken_requests_total", token="revoked", code="403") == 1


def test_header_name_is_configurable(make_app, keys):
    client = make_app(header_name="Authorization-Key").test_client()
    assert client.get("/items", headers={"X-API-Key": keys[1]["alpha"]}).status_code == 401
    assert client.get("/items", headers={"Authorization-Key": keys[1]["alpha"]}).status_code == 200


def test_exempt_paths_pass_without_a_key(client):
    assert client.get("/healthz").status_code == 200


def test_revoking_takes_effect_without_restart(make_app, keys):
    app = make_app()
    store = app.extensions["api_token_exporter"].keystore
    store.check_interval = 0
    client = app.test_client()
    assert client.get("/items", headers={"X-API-Key": keys[1]["alpha"]}).status_code == 200
    entries = load_keys(keys[0])
    for e in entries:
        if e.id == "alpha":
            e.active = False
    save_keys(keys[0], entries)
    assert client.get("/items", headers={"X-API-Key": keys[1]["alpha"]}).status_code == 403
    new_raw = add_key(keys[0], "newcomer", expires_at=(
        dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1)).isoformat())
    assert client.get("/items", headers={"X-API-Key": new_raw}).status_code == 200


def test_observe_only_identifies_and_never_refuses(make_app, keys):
    client = make_app(observe_only=True).test_client()
    assert client.get("/items").status_code == 200
    assert client.get("/items", headers={"X-API-Key": "bogus"}).status_code == 200
    for _ in range(5):   # beta's minute limit is 3, but observe-only enforces nothing
        r = client.get("/items", headers={"X-API-Key": keys[1]["beta"]})
        assert r.status_code == 200
        assert "X-RateLimit-Minute-Remaining" not in r.headers
    text = metrics_text(client)
    assert sample_total(text, "apitoken_requests_total", token="beta", code="200") == 5
    assert sample_total(text, "apitoken_auth_failures_total", reason="missing") == 1
    assert sample_total(text, "apitoken_auth_failures_total", reason="invalid") == 1


def test_observe_only_takes_limits_from_the_apps_headers(keys):
    from flask import Flask
    from api_token_exporter import TokenAnalytics
    from support import BufferedClient
    app = Flask("upstream")
    app.test_client_class = BufferedClient

    @app.get("/proxy")
    def proxy():
        return "ok", 200, {"X-RateLimit-Minute-Limit": "50", "X-RateLimit-Minute-Remaining": "7",
                           "X-RateLimit-Minute-Reset": "30", "X-RateLimit-Limit": "5000",
                           "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "1999999999"}

    @app.get("/limited")
    def limited():
        return "slow down", 429, {"X-RateLimit-Limit": "5000", "X-RateLimit-Remaining": "0",
                                  "X-RateLimit-Reset": "1999999999"}

    TokenAnalytics(app, keys_file=keys[0], observe_only=True, metrics_public=True)
    client = app.test_client()
    client.get("/proxy", headers={"X-API-Key": keys[1]["alpha"]})
    client.get("/limited", headers={"X-API-Key": keys[1]["alpha"]})
    text = metrics_text(client)
    assert sample_total(text, "apitoken_rate_limit_limit", token="alpha", window="minute") == 50
    assert sample_total(text, "apitoken_rate_limit_remaining", token="alpha", window="minute") == 7
    assert sample_total(text, "apitoken_rate_limit_reset_timestamp_seconds", token="alpha",
                        window="default") == 1999999999
    assert sample_total(text, "apitoken_rate_limited_total", token="alpha", window="default") == 1
    assert sample_total(text, "apitoken_token_status", token="alpha") == TOKEN_STATUS_VALUES["rate_limited"]


def test_plain_wsgi_app_with_route_templates(keys):
    from api_token_exporter import TokenAnalytics

    def wsgi(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"hello"]

    app = TokenAnalytics(wsgi, keys_file=keys[0], routes=["/users/<name>"], metrics_public=True)
    from werkzeug.test import Client
    client = Client(app)
    client.open = functools.partial(client.open, buffered=True)
    r = client.get("/users/ada", headers={"X-API-Key": keys[1]["alpha"]})
    assert r.status_code == 200 and r.get_data() == b"hello"
    assert r.headers["X-RateLimit-Minute-Limit"] == "100"
    client.get("/users/bob", headers={"X-API-Key": keys[1]["alpha"]})
    client.get("/elsewhere/1", headers={"X-API-Key": keys[1]["alpha"]})
    text = client.get("/metrics").get_data(as_text=True)
    assert sample_total(text, "apitoken_requests_total", token="alpha", route="/users/<name>") == 2
    assert sample_total(text, "apitoken_requests_total", token="alpha", route="__unmatched__") == 1


def test_handler_exception_is_counted_as_500(make_app, keys):
    app = make_app()
    app.testing = False   # let Flask turn the exception into a 500 response
    client = app.test_client()
    r = client.get("/boom", headers={"X-API-Key": keys[1]["alpha"]})
    assert r.status_code == 500
    text = metrics_text(client)
    assert sample_total(text, "apitoken_requests_total", token="alpha", route="/boom", code="500") == 1
