"""Series stay bounded whatever clients send: invalid keys never become labels, raw paths share
one label, and every per-token family has a cap."""
import secrets

from conftest import samples


def series_count(text):
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


def test_10000_invalid_keys_and_20000_raw_paths_stay_bounded(client, keys):
    baseline = None
    alpha = keys[1]["alpha"]
    client.get("/items", headers={"X-API-Key": alpha})
    baseline = series_count(client.get("/metrics").get_data(as_text=True))
    for _ in range(10_000):
        client.get("/items", headers={"X-API-Key": "atk_" + secrets.token_urlsafe(24)})
    for i in range(20_000):
        client.get(f"/raw/path/{i}/{secrets.token_hex(4)}", headers={"X-API-Key": alpha})
    text = client.get("/metrics").get_data(as_text=True)
    tokens = {dict(l)["token"] for l in samples(text, "apitoken_requests_total")}
    routes = {dict(l)["route"] for l in samples(text, "apitoken_requests_total")}
    assert tokens == {"alpha", "__unauthenticated__"}
    assert routes == {"/items", "__unmatched__"}
    # a handful of new series (one token label, one route label), not thousands
    assert series_count(text) - baseline < 60


def test_route_cap_with_many_templates(keys):
    from flask import Flask
    from api_token_exporter import TokenAnalytics
    from conftest import BufferedClient
    app = Flask("many-routes")
    app.test_client_class = BufferedClient
    for i in range(30):
        app.add_url_rule(f"/r{i}", f"r{i}", lambda: "ok")
    TokenAnalytics(app, keys_file=keys[0], max_routes=10, metrics_public=True)
    client = app.test_client()
    for i in range(30):
        client.get(f"/r{i}", headers={"X-API-Key": keys[1]["alpha"]})
    text = client.get("/metrics").get_data(as_text=True)
    routes = {dict(l)["route"] for l in samples(text, "apitoken_requests_total")}
    assert len(routes) == 11 and "__overflow__" in routes
    assert sum(v for l, v in samples(text, "apitoken_label_overflow_total").items()
               if dict(l)["label"] == "route") == 20
