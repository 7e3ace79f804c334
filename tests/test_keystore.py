import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from api_token_exporter.core.keystore import (KeyStore, KeyStoreError, add_key, hash_key, load_keys,
                                              mask_key, save_keys)
from support import needs, run_cli, wait_for


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

    with open(path, "w") as fh:
        fh.write("keys: [this is: not: valid")
    # no request meanwhile: only the watcher reloads
    wait_for("the watcher to notice the broken file", lambda: exporter.core.keystore.last_error, timeout=10,
             interval=0.05)
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


LATIN1_KEYS = "keys:\n- id: mueller\n  name: Shop\n  description: M\u00fcller GmbH\n  key_sha256: '{}'\n"


def test_a_key_file_that_is_not_utf8_is_named_with_its_line(tmp_path):
    path = tmp_path / "keys.yml"
    path.write_bytes(LATIN1_KEYS.format("0" * 64).encode("latin-1"))
    with pytest.raises(KeyStoreError, match=r"not UTF-8 \(byte 0xfc on line 4\): save it as UTF-8"):
        load_keys(str(path))
    listed = run_cli("keys", "list", "--file", str(path))
    assert listed.returncode == 2 and "Traceback" not in listed.stderr
    assert listed.stderr.strip() == f"error: {path}: the key file is not UTF-8 (byte 0xfc on line 4): save it as UTF-8"


@needs("server")
def test_serve_names_a_key_file_that_is_not_utf8_and_keeps_the_last_good_keys(tmp_path):
    """At start-up the service stops with the reason; running, it keeps the keys it has,
    reports degraded health and the key-file gauge, and logs no traceback."""
    import requests
    from support import free_port, stop_process, wait_for, wait_for_port
    bad = tmp_path / "bad.yml"
    bad.write_bytes(LATIN1_KEYS.format("0" * 64).encode("latin-1"))
    env = dict(os.environ, ATE_KEYS_FILE=str(bad), ATE_INGEST_TOKEN="in", ATE_METRICS_PUBLIC="true")
    started = run_cli("serve", "--port", free_port(), "--workers", "2", env=env, timeout=60)
    assert started.returncode != 0 and "Traceback" not in started.stdout + started.stderr
    assert f"{bad}: the key file is not UTF-8 (byte 0xfc on line 4)" in started.stderr, started.stderr[-2000:]

    keys_file = tmp_path / "keys.yml"
    add_key(str(keys_file), "alpha")
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "api_token_exporter.cli", "serve", "--port", str(port),
                                 "--workers", "2"], env=dict(env, ATE_KEYS_FILE=str(keys_file)),
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, proc, timeout=60)
        url = f"http://127.0.0.1:{port}"
        workers = wait_for("two workers up", lambda: len(subprocess.run(
            ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()) == 2 and subprocess.run(
            ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split(), timeout=60)
        wait_for("both workers answering", lambda: all(
            requests.get(url + "/healthz", timeout=10).json()["status"] == "ok" for _ in range(6)), timeout=60)
        keys_file.write_bytes(LATIN1_KEYS.format("0" * 64).encode("latin-1"))
        health = wait_for("degraded health", lambda: [h for h in [requests.get(url + "/healthz", timeout=10).json()]
                                                      if h["status"] == "degraded"], timeout=20)[0]
        assert health["keys"] == 1 and "not UTF-8 (byte 0xfc on line 4)" in health["key_file_error"]
        assert str(keys_file) in health["key_file_error"]
        metrics = requests.get(url + "/metrics", timeout=10).text
        assert "apitoken_key_file_healthy 0" in metrics
        # a worker that dies now is replaced by one that boots with the broken file: it serves
        # the last good version, and the server goes on (a failed boot would stop it all)
        os.kill(int(workers[0]), signal.SIGKILL)
        replaced = wait_for("a new worker", lambda: (lambda pids: len(pids) == 2 and workers[0] not in pids and pids)(
            subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()), timeout=60)
        for _ in range(10):              # both workers answer: the new one with the last good keys
            health = requests.get(url + "/healthz", timeout=10).json()
            assert health["status"] == "degraded" and health["keys"] == 1, health
        assert proc.poll() is None and set(replaced) != set(workers)
    except Exception as exc:             # what the server said is the first thing to read
        raise AssertionError(f"{exc}\n--- serve log ---\n{log.read_text()[-3000:]}") from exc
    finally:
        stop_process(proc)
    text = log.read_text()
    assert "Traceback" not in text and "not UTF-8" in text, text[-3000:]
