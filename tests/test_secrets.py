"""A raw API key never appears in /metrics, logs, responses or errors."""
import logging

from api_token_exporter.web.server import create_app
from api_token_exporter.core.keystore import mask_key


def test_no_raw_key_anywhere(make_app, keys, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    client = make_app(admin_token="admin-secret").test_client()
    seen = []
    for raw in keys[1].values():
        for path in ("/items", "/items/5", "/nowhere"):
            r = client.get(path, headers={"X-API-Key": raw})
            seen.append(r.get_data(as_text=True) + str(dict(r.headers)))
    invalid = "atk_this_is_someone_elses_real_key_0123456789"
    seen.append(client.get("/items", headers={"X-API-Key": invalid}).get_data(as_text=True))
    for path in ("/metrics", "/admin/stats", "/admin/token-details"):
        seen.append(client.get(path, headers={"Authorization": "Bearer admin-secret"}).get_data(as_text=True))
    seen.append(client.get("/metrics", headers={"Accept": "application/openmetrics-text"}).get_data(as_text=True))
    captured = capsys.readouterr()
    haystack = "\n".join(seen) + caplog.text + captured.out + captured.err
    for raw in list(keys[1].values()) + [invalid]:
        assert raw not in haystack
        assert raw[4:20] not in haystack     # not even a long fragment
    assert mask_key(keys[1]["alpha"]) in haystack     # masked form is what admins see


def test_ingest_errors_never_echo_an_api_key(keys):
    from werkzeug.test import Client
    client = Client(create_app(keys_file=keys[0], ingest_token="t"))
    secret = "atk_ingest_posted_secret_ABCDEFGHIJKLMNOP"
    r = client.post("/v1/events", json={"events": [{"api_key": secret, "route": "/a", "status": 200,
                                                     "duration_seconds": 1}]},
                    headers={"Authorization": "Bearer t"})
    assert secret not in r.get_data(as_text=True)
    assert secret not in client.get("/metrics").get_data(as_text=True)
