"""A full disk under the metric store: a real tmpfs of a few MiB where the test may mount one
(root), else ENOSPC injected into the store's writes. New series that cannot be written are
dropped and counted; none is ever invented, every series keeps its own slot after space comes
back, across restarts too, and a start on a full disk names the directory."""
import contextlib
import errno
import os
import subprocess
import sys

import pytest
import requests

from api_token_exporter.core.keystore import add_key
from api_token_exporter.core.store import Family, Store, read_index
from support import free_port, needs, samples, stop_process, wait_for_port

INGEST = "i" * 32


class Disk:
    """A small filesystem that can be filled up and freed again."""

    def __init__(self, path, real):
        self.path, self.real = str(path), real
        self.filler = os.path.join(self.path, "filler")
        self.injected = None

    def fill(self):
        if not self.real:
            self.injected = True
            return
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * 4096)
        finally:
            os.close(fd)

    def free(self):
        if self.real:
            os.remove(self.filler)
        self.injected = None


def try_mount(path, size="4m") -> bool:
    os.makedirs(path, exist_ok=True)
    return os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode == 0


@pytest.fixture
def disk(tmp_path, monkeypatch):
    path = tmp_path / "small"
    real = try_mount(path)
    d = Disk(path, real)
    if not real:                           # ENOSPC from the store's own writes while "full"
        def failing(call):
            def wrapper(*args, **kwargs):
                if d.injected:
                    raise OSError(errno.ENOSPC, "No space left on device")
                return call(*args, **kwargs)
            return wrapper
        monkeypatch.setattr(os, "pwrite", failing(os.pwrite))
        monkeypatch.setattr(os, "posix_fallocate", failing(os.posix_fallocate))
    yield d
    if real:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def real_disk(tmp_path):
    path = tmp_path / "small"
    if not try_mount(path):
        pytest.fail("this test mounts a 4 MiB tmpfs: run it as root (CI does)")
    yield Disk(path, True)
    subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_never_invents_series_and_each_keeps_its_own_slot(disk):
    family = Family("t_requests_total", "counter", "requests", ["route"])
    store = Store([Family("apitoken_store_dropped_series_total", "counter", "dropped", []), family],
                  directory=disk.path, capacity=4_000_000)

    def record(route, amount):
        with store.lock:
            store.add(family, store.slot(family, (route,)), amount)
    for i in range(10):
        record(f"/a/{i}", 1000 + i)
    disk.fill()
    for i in range(5000):                  # more than the index's last page can take
        record(f"/during/{i}", 1)
    for i in range(10):
        record(f"/a/{i}", 1)               # series that exist go on counting
    disk.free()
    for i in range(10):
        record(f"/after/{i}", 7)

    def check(values, dropped):
        during = {k: v for k, v in values.items() if k[0].startswith("/during/")}
        assert {k: v for k, v in values.items() if k[0].startswith("/a/")} == {(f"/a/{i}",): 1001 + i for i in range(10)}
        assert {k: v for k, v in values.items() if k[0].startswith("/after/")} == {(f"/after/{i}",): 7 for i in range(10)}
        assert set(during.values()) <= {1}                      # each written once, on its own slot
        assert len(values) == 20 + len(during) and len(during) + dropped == 5000 and dropped > 0
    check(store.values_by_key(family), store.dropped_series())
    entries, _ = read_index(store.path[:-5] + ".idx")
    slots = [slot for slot, _, _ in entries]
    assert len(slots) == len(set(slots)) and len(entries) == 1 + 20 + 5000 - store.dropped_series()
    dropped = store.dropped_series()
    store.close()
    again = Store(store.families, directory=disk.path)         # a restart folds into the archive
    check(again.values_by_key(family), again.dropped_series())
    assert again.dropped_series() == dropped
    again.close()


@needs("server")
def test_the_service_on_a_full_disk_counts_what_it_kept_exactly_across_a_restart(tmp_path, real_disk):
    keys_file = str(tmp_path / "keys.yml")
    add_key(keys_file, "alpha", rate_limits={"minute": 1_000_000})
    state = os.path.join(real_disk.path, "state")
    env = dict(os.environ, ATE_KEYS_FILE=keys_file, ATE_INGEST_TOKEN=INGEST, ATE_METRICS_PUBLIC="true",
               ATE_STATE_DIR=state)

    def serve(port):
        log = open(tmp_path / f"serve-{port}.log", "a")
        proc = subprocess.Popen([sys.executable, "-m", "api_token_exporter.cli", "serve", "--port", str(port)],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_for_port(port, proc, timeout=60)
        return proc

    def send(port, routes):
        events = [{"token": "alpha", "route": route, "method": "GET", "status": 200, "duration_ms": 3}
                  for route in routes]
        for i in range(0, len(events), 200):
            r = requests.post(f"http://127.0.0.1:{port}/v1/events", json=events[i:i + 200], timeout=30,
                              headers={"Authorization": f"Bearer {INGEST}"})
            assert r.status_code == 200, r.text
    port = free_port()
    proc = serve(port)
    try:
        send(port, ["/before"] * 5)
        real_disk.fill()
        during = [f"/during/{i}" for i in range(450)]
        send(port, during)
        health = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10).json()
        assert health["store"]["dropped_series"] > 0
        real_disk.free()
        send(port, ["/after"] * 3 + ["/before"] * 2)
    finally:
        stop_process(proc)
    proc = serve(port)
    try:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    finally:
        stop_process(proc)
    counts = {dict(labels)["route"]: value for labels, value in samples(text, "apitoken_requests_total").items()}
    assert counts["/before"] == 7 and counts["/after"] == 3
    kept = {route: value for route, value in counts.items() if route.startswith("/during/")}
    assert set(kept) <= set(during) and set(kept.values()) <= {1.0}      # nothing invented or shared
    assert set(counts) == {"/before", "/after"} | set(kept)


@needs("server")
def test_a_start_on_a_full_disk_names_the_directory(tmp_path, real_disk):
    keys_file = str(tmp_path / "keys.yml")
    add_key(keys_file, "alpha")
    state = os.path.join(real_disk.path, "state")
    os.makedirs(state)
    real_disk.fill()
    out = subprocess.run([sys.executable, "-m", "api_token_exporter.cli", "serve", "--port", str(free_port()),
                          "--keys-file", keys_file, "--state-dir", state], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert f"error: the metric store cannot start in {state}: No space left on device" in out.stderr
    assert "Traceback" not in out.stderr
