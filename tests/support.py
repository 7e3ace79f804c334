"""What the tests share besides fixtures: free ports, waiting for a condition, starting and
stopping a process, running the CLI, reading exposition text, a small Flask app, and
``needs(...)``, which declares the servers a fixture or a test starts (conftest.py turns that
into the test's markers: ``make test-fast`` leaves those tests out).

A test that needs a binary that is not installed fails with the install hint; it never skips.
"""
from __future__ import annotations

import contextlib
import http.client
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from typing import Dict

import pytest
import requests
from flask import Flask, jsonify
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from api_token_exporter import TokenAnalytics
from devstack.stack import free_port  # noqa: F401  (one implementation, the dev stack's)

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

INGEST = "i" * 32                  # the ingest token of services a test starts with running_cli

# what a test may need beyond this process, as markers: needs_redis, needs_prometheus, ...
NEEDS = ("redis", "prometheus", "alertmanager", "postgres", "server", "browser", "slow")


def needs(*what: str):
    """Declare what a fixture or a test starts: ``@needs("prometheus", "alertmanager")`` under
    ``@pytest.fixture``, or above a test. Every test that uses the fixture, directly or through
    another fixture, gets the ``needs_*`` markers."""
    unknown = set(what) - set(NEEDS)
    if unknown:
        raise ValueError(f"needs: unknown {sorted(unknown)} (one of {', '.join(NEEDS)})")

    def mark(func):
        func.needs = tuple(sorted(set(getattr(func, "needs", ())) | set(what)))
        if func.__name__.startswith("test"):        # a fixture takes no marks: conftest reads .needs
            for name in what:
                func = getattr(pytest.mark, f"needs_{name}")(func)
        return func
    return mark


def serve_wsgi(app):
    """``app`` on a free loopback port, in threads; returns (its URL, a function that stops it at
    once: the server looks for the stop every 50 ms, not the default half second)."""
    import threading
    from werkzeug.serving import make_server
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop():
        server.shutdown()
        server.server_close()
    return f"http://127.0.0.1:{server.server_port}", stop


def run_cli(*args, env=None, timeout=120, module="api_token_exporter.cli", **kw) -> subprocess.CompletedProcess:
    """``api-token-exporter ARGS`` (or another ``python -m`` module, such as devstack) in a
    subprocess, its output captured as text."""
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, **kw)


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


@contextlib.contextmanager
def running_cli(command, tmp_path, extra_env=(), **settings):
    """`api-token-exporter COMMAND` on a free port with ATE_* ``settings``; yields the port
    once it listens, stops it afterwards (its output: server-PORT.log in ``tmp_path``)."""
    port = free_port()
    env = dict(os.environ, **dict(extra_env), **{f"ATE_{k.upper()}": str(v) for k, v in settings.items()})
    log = open(tmp_path / f"server-{port}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "api_token_exporter.cli", *command, "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, proc, timeout=60)
        yield port
    finally:
        stop_process(proc)
        log.close()


def start_serve(tmp_path, *args, env=None, port=None):
    """`api-token-exporter serve ARGS` in its own session, answering /healthz: (process, port)."""
    port = port or free_port()
    log = open(tmp_path / f"serve-{port}-{time.monotonic_ns()}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "api_token_exporter.cli", "serve", "--port", str(port), *args], stdout=log,
                            stderr=subprocess.STDOUT, env=dict(os.environ, **(env or {})),
                            start_new_session=True)
    wait_for_port(port, proc)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                break
        except requests.RequestException:
            time.sleep(0.1)
    return proc, port


def console_sign_in(client, credential):
    """Sign a Flask test client in to the console."""
    return client.post("/ui/login", data={"credential": credential})


def console_csrf(client, page="tokens") -> str:
    """The CSRF token of a signed-in test client's console session."""
    html = client.get(f"/ui/{page}").get_data(as_text=True)
    return re.search(r'<meta name="ate-csrf" content="([^"]+)">', html).group(1)


def timed_requests(port, plan, threads=4):
    """Each (method, path, headers, body) on its own connection, from ``threads`` threads:
    [(status, seconds)] in plan order."""
    results = [None] * len(plan)

    def worker(offset):
        for i in range(offset, len(plan), threads):
            method, path, headers, body = plan[i]
            started = time.monotonic()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                conn.request(method, path, body=body, headers=headers)
                response = conn.getresponse()
                response.read()
                results[i] = (response.status, time.monotonic() - started)
            except OSError as exc:
                results[i] = (type(exc).__name__, time.monotonic() - started)
            finally:
                conn.close()
    pool = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return results
