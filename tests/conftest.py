"""Small fixtures: keys, apps, clients, and real servers (redis-server, gunicorn) on 127.0.0.1.

A test that needs a binary that is not installed fails with the install hint; it never skips.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from typing import Dict

import pytest
import requests
from flask import Flask, jsonify
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from api_token_exporter import TokenAnalytics

# the dev stack (devstack/, beside the package, not installed) for the servers tests start too
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (CHECKOUT, os.environ.get("PYTHONPATH")) if p)
from api_token_exporter.core.keystore import add_key, load_keys, save_keys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if not path:
        pytest.fail(f"{name} is not installed: run .ci/install (apt-get install {name})")
    return path


def wait_for(what, check, timeout=90, interval=0.5):
    """Until check() returns something true (returned); else fail naming what and the last answer."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}; last answer: {last!r}")


def wait_for_port(port: int, proc: subprocess.Popen = None, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited early with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def samples(text: str, name: str) -> Dict[tuple, float]:
    """{sorted label items: value} for every sample called ``name`` in exposition text."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def sample_total(text: str, metric: str, **match) -> float:
    return sum(v for labels, v in samples(text, metric).items()
               if all(dict(labels).get(k) == val for k, val in match.items()))


KEY_SPECS = {
    "alpha": dict(name="Alpha app", tenant="acme"),
    "beta": dict(name="Beta app", tenant="globex", rate_limits={"minute": 3}),
    "gamma": dict(name="Gamma batch", tenant="acme", rate_limits={"minute": 1000, "hour": 4}),
    "delta": dict(name="Delta day", tenant="acme", rate_limits={"minute": 1000, "hour": 1000, "day": 2}),
    "revoked": dict(name="Revoked", tenant="acme"),
    "old": dict(name="Expired", tenant="acme", expires_at="2020-01-01T00:00:00Z"),
}


@pytest.fixture
def keys(tmp_path):
    """A key file with the KEY_SPECS keys; returns (path, {id: raw key})."""
    path = str(tmp_path / "keys.yml")
    raw = {token_id: add_key(path, token_id, **spec) for token_id, spec in KEY_SPECS.items()}
    entries = load_keys(path)
    for entry in entries:
        if entry.id == "revoked":
            entry.active = False
    save_keys(path, entries)
    return path, raw


class BufferedClient(FlaskClient):
    """Reads each body and closes it, as a WSGI server does (metrics are recorded on close)."""

    def open(self, *args, **kwargs):
        kwargs.setdefault("buffered", True)
        return super().open(*args, **kwargs)


def build_app(keys_file: str, **settings) -> Flask:
    app = Flask("test-app")
    app.test_client_class = BufferedClient

    @app.get("/items")
    def items():
        return jsonify(items=[1, 2, 3])

    @app.get("/items/<int:item_id>")
    def item(item_id):
        if item_id >= 100:
            return jsonify(detail="Not found"), 404
        return jsonify(id=item_id)

    @app.get("/boom")
    def boom():
        raise RuntimeError("handler failed")

    @app.get("/healthz")
    def health():
        return jsonify(ok=True)

    settings.setdefault("metrics_public", True)   # tests scrape the app; test_metrics_endpoint checks the default
    TokenAnalytics(app, keys_file=keys_file, **settings)
    return app


@pytest.fixture
def make_app(keys):
    def factory(**settings):
        return build_app(keys[0], **settings)
    return factory


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def analytics(app) -> TokenAnalytics:
    return app.extensions["api_token_exporter"]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server on a free loopback port; yields its URI."""
    binary = require_binary("redis-server")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop_process(proc)


@pytest.fixture
def redis_uri(redis_server):
    import redis
    redis.Redis.from_url(redis_server).flushdb()
    return redis_server


@pytest.fixture
def gunicorn_app(tmp_path):
    """Start a WSGI factory under gunicorn with N workers and multiprocess metrics."""
    procs = []

    def start(factory: str, workers: int = 4, threads: int = 1, **env_settings) -> str:
        port = free_port()
        mp_dir = tmp_path / f"mp-{port}"
        mp_dir.mkdir()
        env = dict(os.environ, ATE_STATE_DIR=str(mp_dir))
        env.update({f"ATE_{k.upper()}": str(v) for k, v in env_settings.items()})
        log = open(tmp_path / f"gunicorn-{port}.log", "w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--workers", str(workers), "--threads", str(threads), "--bind",
             f"127.0.0.1:{port}", "--config", "python:api_token_exporter.web.gunicorn_conf", factory],
            env=env, stdout=log, stderr=subprocess.STDOUT)
        procs.append(proc)
        wait_for_port(port, proc)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20          # all workers booted and answering
        while time.monotonic() < deadline:
            try:
                if requests.get(url + "/metrics", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.2)
        return url

    yield start
    for proc in procs:
        stop_process(proc)
