"""Series stay bounded whatever clients send: invalid keys never become labels, raw paths share
one label, and every per-token family has a cap."""
import secrets

from werkzeug.test import create_environ

from support import samples


def series_count(text):
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


def test_10000_invalid_keys_and_20000_raw_paths_stay_bounded(client, keys):
    baseline = None
    alpha = keys[1]["alpha"]
    client.get("/items", headers={"X-API-Key": alpha})
    baseline = series_count(client.get("/metrics").get_data(as_text=True))
    app = client.application                 # through the WSGI callable, as a server calls it
    template = create_environ("/items")

    def call(path, key):
        environ = dict(template, PATH_INFO=path, HTTP_X_API_KEY=key)
        body = app(environ, lambda status, headers, exc_info=None: None)
        for _ in body:
            pass
        getattr(body, "close", lambda: None)()
    for _ in range(10_000):
        call("/items", "atk_" + secrets.token_urlsafe(24))
    for i in range(20_000):
        call(f"/raw/path/{i}/{secrets.token_hex(4)}", alpha)
    text = client.get("/metrics").get_data(as_text=True)
    tokens = {dict(l)["token"] for l in samples(text, "apitoken_requests_total")}
    routes = {dict(l)["route"] for l in samples(text, "apitoken_requests_total")}
    assert tokens == {"alpha", "__unauthenticated__"}
    assert routes == {"/items", "__unmatched__"}
    # a handful of new series (one token label, one route label), not thousands
    assert series_count(text) - baseline < 60


def test_the_apps_own_routes_are_known_and_never_capped(keys):
    """Routes of the Flask app (its own templates: bounded by its code) always get their series;
    max_routes caps only routes nobody declared."""
    from flask import Flask
    from api_token_exporter import TokenAnalytics
    from support import BufferedClient
    app = Flask("many-routes")
    app.test_client_class = BufferedClient
    for i in range(30):
        app.add_url_rule(f"/r{i}", f"r{i}", lambda: "ok")
    TokenAnalytics(app, keys_file=keys[0], max_routes=10, metrics_public=True)
    app.add_url_rule("/late", "late", lambda: "ok")          # added after the middleware
    client = app.test_client()
    for path in [f"/r{i}" for i in range(30)] + ["/late"]:
        client.get(path, headers={"X-API-Key": keys[1]["alpha"]})
    text = client.get("/metrics").get_data(as_text=True)
    routes = {dict(l)["route"] for l in samples(text, "apitoken_requests_total")}
    assert routes == {f"/r{i}" for i in range(30)} | {"/late"}
    assert not samples(text, "apitoken_label_overflow_total")


def test_route_cap_for_undeclared_routes_leaves_known_routes_alone(keys):
    from api_token_exporter.web.server import create_app
    app = create_app(keys_file=keys[0], ingest_token="i" * 32, metrics_public=True, max_routes=10,
                     known_routes=["/known/<id>"])
    from werkzeug.test import Client
    client = Client(app)
    events = [{"token": "alpha", "route": f"/junk/{i}", "status": 200, "duration_ms": 1} for i in range(30)]
    events.append({"token": "alpha", "route": "/known/<id>", "status": 200, "duration_ms": 1})
    assert client.post("/v1/events", json=events, headers={"Authorization": "Bearer " + "i" * 32}).status_code == 200
    text = client.get("/metrics").get_data(as_text=True)
    routes = {dict(l)["route"] for l in samples(text, "apitoken_requests_total")}
    assert len(routes) == 12 and {"/known/<id>", "__overflow__"} <= routes
    assert sum(v for l, v in samples(text, "apitoken_label_overflow_total").items()
               if dict(l)["label"] == "route") == 20


def test_failing_clients_are_capped_for_good_and_keep_their_own_exact_series(tmp_path, keys):
    """The first max_clients failing addresses get their own series, exactly counted; later ones
    share __overflow__, and a restart on the same state directory does not open new room."""
    from api_token_exporter.core.metrics import Metrics
    from support import sample_total
    first = Metrics(directory=str(tmp_path), max_clients=3)
    for i, times in enumerate((6, 1, 2, 4, 5)):
        for _ in range(times):
            first.auth_failure("invalid", f"203.0.113.{i}")
    text = first.store.render().decode()
    assert {dict(l)["client"] for l in samples(text, "apitoken_auth_failures_by_client_total")} == \
        {"203.0.113.0", "203.0.113.1", "203.0.113.2", "__overflow__"}
    assert sample_total(text, "apitoken_auth_failures_by_client_total", client="203.0.113.0") == 6
    assert sample_total(text, "apitoken_auth_failures_by_client_total", client="__overflow__") == 9
    assert sample_total(text, "apitoken_label_overflow_total", label="client") == 9
    first.store.close()
    again = Metrics(directory=str(tmp_path), max_clients=3)
    again.auth_failure("missing", "198.51.100.7")               # new: no room left
    again.auth_failure("missing", "203.0.113.1")                # known: its own series goes on
    text = again.store.render().decode()
    assert sample_total(text, "apitoken_auth_failures_by_client_total", client="203.0.113.1") == 2
    assert sample_total(text, "apitoken_auth_failures_by_client_total", client="__overflow__") == 10
    assert "198.51.100.7" not in text


def test_the_middleware_counts_failures_by_the_client_address(client, keys):
    from support import sample_total
    for _ in range(3):
        client.get("/items", headers={"X-API-Key": "atk_" + secrets.token_urlsafe(24)},
                   environ_base={"REMOTE_ADDR": "192.0.2.44"})
    client.get("/items", headers={"X-API-Key": keys[1]["alpha"]}, environ_base={"REMOTE_ADDR": "192.0.2.45"})
    text = client.get("/metrics").get_data(as_text=True)
    assert sample_total(text, "apitoken_auth_failures_by_client_total", client="192.0.2.44") == 3
    assert 'client="192.0.2.45"' not in text                        # success creates no series


def test_behind_a_trusted_proxy_the_client_is_the_forwarded_address(keys):
    """A forged X-Forwarded-For entry from the client itself does not move the count."""
    from flask import Flask

    from api_token_exporter import TokenAnalytics
    from support import sample_total
    app = Flask("proxied")
    app.get("/items")(lambda: "ok")
    TokenAnalytics(app, keys_file=keys[0], metrics_public=True, trusted_proxies=["10.0.0.0/8"])
    client = app.test_client()
    forged = {"X-API-Key": "atk_" + secrets.token_urlsafe(24), "X-Forwarded-For": "1.2.3.4, 198.51.100.23"}
    for _ in range(2):
        client.get("/items", headers=forged, environ_base={"REMOTE_ADDR": "10.1.2.3"})   # via the proxy
    client.get("/items", headers=forged, environ_base={"REMOTE_ADDR": "203.0.113.80"})   # not a proxy
    text = client.get("/metrics").get_data(as_text=True)
    assert sample_total(text, "apitoken_auth_failures_by_client_total", client="198.51.100.23") == 2
    assert sample_total(text, "apitoken_auth_failures_by_client_total", client="203.0.113.80") == 1
    assert 'client="1.2.3.4"' not in text


def test_a_bad_trusted_proxy_is_named_at_start_up():
    import pytest

    from api_token_exporter.core.config import ConfigError, load_settings
    with pytest.raises(ConfigError, match="10.0.0.1/8"):
        load_settings(environ={"ATE_TRUSTED_PROXIES": "10.0.0.1/8"}, keys_file="k.yml").validate()
