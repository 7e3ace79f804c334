"""Fixtures: keys, apps, clients, and real servers (redis-server, gunicorn) on 127.0.0.1; the
helpers are in support.py.

Markers come from the fixtures: a fixture that starts a server says so with ``@needs(...)``
(support.py), and every test that uses it, directly or through another fixture, gets the
``needs_*`` marker. ``make test-fast`` runs the tests with none of them, and refuses, naming
the test, any server such a test starts all the same: a forgotten ``needs`` fails there.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import requests

from support import (CHECKOUT, KEY_SPECS, NEEDS, build_app, free_port, needs, require_binary, stop_process,
                     wait_for_port)
from api_token_exporter import TokenAnalytics
from api_token_exporter.core.keystore import add_key, load_keys, save_keys

# the dev stack (devstack/, beside the package, not installed) for the servers tests start too
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (CHECKOUT, os.environ.get("PYTHONPATH")) if p)

FAST = os.environ.get("ATE_FAST_TESTS") == "1"
# what make test-fast refuses to start: servers and browsers (promtool and amtool are commands)
SERVER_PROGRAMS = {"redis-server": "redis", "prometheus": "prometheus", "alertmanager": "alertmanager",
                   "prometheus-alertmanager": "alertmanager", "postgres": "postgres", "initdb": "postgres",
                   "pg_ctl": "postgres", "chromium": "browser", "chromedriver": "browser"}
SERVER_MODULES = {"gunicorn": "server", "uvicorn": "server"}


def pytest_configure(config):
    for name in NEEDS:
        config.addinivalue_line("markers", f"needs_{name}: the test starts {name} (declared with support.needs)")
    if FAST:
        _refuse_undeclared_servers()


def pytest_collection_modifyitems(config, items):
    for item in items:
        declared = set()
        for defs in getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {}).values():
            for fixturedef in defs:
                declared |= set(getattr(fixturedef.func, "needs", ()))
        for name in sorted(declared):
            item.add_marker(getattr(pytest.mark, f"needs_{name}"))


def _server_in(args) -> str:
    """What server a command line starts, if any."""
    argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
    argv = [os.fsdecode(a) for a in argv]
    if not argv:
        return ""
    for arg in argv:                        # also behind runuser, setsid, env ...
        if not arg.startswith("-") and os.path.basename(arg) in SERVER_PROGRAMS:
            return os.path.basename(arg)
    if "-m" in argv[:3]:
        module = argv[argv.index("-m") + 1] if argv.index("-m") + 1 < len(argv) else ""
        if module in SERVER_MODULES or module == "devstack" and "demo" in argv:
            return module
        if module == "api_token_exporter.cli" and {"serve", "proxy"} & set(argv):
            return "api-token-exporter " + next(a for a in argv if a in ("serve", "proxy"))
    return ""


_running = ["collection"]          # the test being run, for the refusal's message


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _running[0] = item.nodeid
    yield


def _refuse_undeclared_servers():
    """make test-fast: a test that starts a server without declaring it fails, named (fixtures
    of any scope included: the check is on every process start of the run)."""
    original = subprocess.Popen.__init__

    def guarded(self, args, *a, **kw):
        server = _server_in(args)
        if server:
            raise AssertionError(f"{_running[0]} starts {server} but does not declare it: put "
                                 "@needs(...) (tests/support.py) on the fixture that starts it, or on the test")
        original(self, args, *a, **kw)
    subprocess.Popen.__init__ = guarded


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
@needs("redis")
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


@pytest.fixture(scope="session")
@needs("postgres")
def postgres_server(tmp_path_factory):
    """One real PostgreSQL cluster for the run; tests get a database each (``new_database``)."""
    from devstack.stack import start_postgres
    pg = start_postgres(str(tmp_path_factory.mktemp("pg")))
    try:
        yield pg.url
    finally:
        pg.stop()


@pytest.fixture
def new_database(postgres_server):
    """The URL of a new, empty database on the run's PostgreSQL: nothing shared between tests."""
    import uuid
    import sqlalchemy as sa
    name = "t" + uuid.uuid4().hex[:12]
    admin = sa.create_engine(postgres_server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    admin.dispose()
    return postgres_server.rsplit("/", 1)[0] + "/" + name


@pytest.fixture
def redis_uri(redis_server):
    import redis
    redis.Redis.from_url(redis_server).flushdb()
    return redis_server


@pytest.fixture
@needs("server")
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
