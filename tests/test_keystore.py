import os
import time

import pytest
import yaml

from api_token_exporter.core.keystore import (KeyStore, KeyStoreError, add_key, hash_key, load_keys,
                                              mask_key, save_keys)
from support import run_cli


def test_cli_add_prints_secret_once_and_file_holds_only_its_hash(tmp_path):
    keys_file = str(tmp_path / "keys.yml")
    added = run_cli("keys", "add", "svc-a", "--file", keys_file, "--name", "Service A",
                    "--tenant", "acme", "--minute", "5", "--daily-budget", "2.5")
    assert added.returncode == 0, added.stderr
    secret = added.stdout.strip()
    assert secret.startswith("atk_") and len(secret) > 30
    text = open(keys_file).read()
    assert secret not in text
    assert hash_key(secret) in text
    entry = yaml.safe_load(text)["keys"][0]
    assert entry["rate_limits"] == {"minute": 5}
    assert entry["budget_usd"] == {"daily": 2.5}
    assert entry["masked"] == mask_key(secret)

    listed = run_cli("keys", "list", "--file", keys_file)
    assert listed.returncode == 0
    assert "svc-a" in listed.stdout and "Service A" in listed.stdout
    assert secret not in listed.stdout + listed.stderr
    assert "5/-/-" in listed.stdout

    revoked = run_cli("keys", "revoke", "svc-a", "--file", keys_file)
    assert revoked.returncode == 0 and "inactive" in revoked.stdout
    assert load_keys(keys_file)[0].active is False


def test_cli_refuses_duplicates_and_bad_ids(tmp_path):
    keys_file = str(tmp_path / "keys.yml")
    assert run_cli("keys", "add", "dup", "--file", keys_file).returncode == 0
    again = run_cli("keys", "add", "dup", "--file", keys_file)
    assert again.returncode == 2 and "exists already" in again.stderr
    bad = run_cli("keys", "add", "has space", "--file", keys_file)
    assert bad.returncode == 2 and "must be 1-64 characters" in bad.stderr
    missing = run_cli("keys", "revoke", "nobody", "--file", keys_file)
    assert missing.returncode == 2 and "no key with id 'nobody'" in missing.stderr


def test_store_picks_up_changes_without_restart(tmp_path):
    keys_file = str(tmp_path / "keys.yml")
    first = add_key(keys_file, "one")
    store = KeyStore(keys_file, check_interval=0)
    assert store.lookup(first).id == "one"
    second = add_key(keys_file, "two")
    assert store.lookup(second).id == "two"
    entries = load_keys(keys_file)
    entries[0].active = False
    save_keys(keys_file, entries)
    assert store.lookup(first).active is False


def test_broken_file_keeps_the_last_good_keys(tmp_path):
    keys_file = str(tmp_path / "keys.yml")
    raw = add_key(keys_file, "one")
    store = KeyStore(keys_file, check_interval=0)
    time.sleep(0.01)
    with open(keys_file, "w") as fh:
        fh.write("keys: [ {id: one, hash: nothex} ]\n")
    assert store.lookup(raw).id == "one"
    assert "hash must be" in store.last_error


def test_first_load_of_a_broken_file_is_a_clear_error(tmp_path):
    keys_file = tmp_path / "keys.yml"
    keys_file.write_text("keys:\n  - id: x\n    hash: sha256:abc\n")
    with pytest.raises(KeyStoreError, match=r"keys\[0\] \(x\): hash must be"):
        KeyStore(str(keys_file))


def test_mask_never_reveals_the_middle():
    raw = "atk_" + "A" * 10 + "SECRETPART" + "B" * 10 + "wxyz"
    masked = mask_key(raw)
    assert masked.startswith("atk_AAAA") and masked.endswith("wxyz")
    assert "SECRETPART" not in masked


def test_keys_file_is_private(tmp_path):
    keys_file = str(tmp_path / "keys.yml")
    add_key(keys_file, "one")
    assert os.stat(keys_file).st_mode & 0o077 == 0


def test_a_broken_then_emptied_key_file_turns_health_degraded_without_traffic(keys):
    """Noticed by the watcher within ~2 s, with no request at all; the last good keys stay."""
    import time
    from werkzeug.test import Client
    from api_token_exporter.web.server import create_app
    path, raw = keys
    exporter = create_app(keys_file=path, ingest_token="in")
    client = Client(exporter)
    assert client.get("/healthz").json["status"] == "ok"

    def health_after_change(content):
        with open(path, "w") as fh:
            fh.write(content)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            body = exporter.core.keystore.last_error       # no request: only the watcher reloads
            if body:
                return time.monotonic() - (deadline - 5)
            time.sleep(0.05)
        raise AssertionError("the broken key file was not noticed")

    took = health_after_change("keys: [this is: not: valid")
    assert took < 2.5
    health = client.get("/healthz").json
    assert health["status"] == "degraded" and health["keys"] == 6 and "keys.yml" in health["key_file_error"]
    assert exporter.core.keystore.lookup(raw["alpha"]).id == "alpha"        # last good keys served
    text = client.get("/metrics").text
    assert "apitoken_key_file_healthy 0.0" in text and "apitoken_keys_loaded 6.0" in text
    assert "apitoken_key_file_reload_errors_total 1.0" in text

    with open(path, "w") as fh:
        fh.write("keys: []\n")
    deadline = time.monotonic() + 5
    while "no keys" not in (exporter.core.keystore.last_error or "") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "has no keys" in client.get("/healthz").json["key_file_error"]
    assert "apitoken_key_file_reload_errors_total 2.0" in client.get("/metrics").text
    exporter.core.keystore.stop_watching()


def test_a_missing_or_empty_key_file_stops_start_up_unless_allowed(tmp_path):
    from api_token_exporter.core.keystore import KeyStore, KeyStoreError
    missing = str(tmp_path / "nothing.yml")
    with pytest.raises(KeyStoreError, match="does not exist"):
        KeyStore(missing)
    empty = tmp_path / "empty.yml"
    empty.write_text("keys: []\n")
    with pytest.raises(KeyStoreError, match="has no keys"):
        KeyStore(str(empty))
    assert len(KeyStore(missing, allow_empty=True)) == 0
    assert KeyStore(str(empty), allow_empty=True).healthy
