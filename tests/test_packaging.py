"""What an install carries: the middleware needs PyYAML and Flask only; every optional feature
says which extra installs it; the exposition format matches prometheus_client without it."""
import os
import re
import subprocess
import sys
import textwrap
import tomllib

from hypothesis import given, strategies as st
from prometheus_client.utils import floatToGoString

from devstack import cli as devstack_cli, stack
from api_token_exporter.core.store import float_to_go_string

ROOT = stack.ROOT
OPTIONAL = ("redis", "requests", "gunicorn", "prometheus_client", "aiosmtpd", "iptocc", "maxminddb")

WITHOUT_EXTRAS = textwrap.dedent("""
    import importlib.abc, sys
    class Missing(importlib.abc.MetaPathFinder):          # as if only the core were installed
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in %r:
                raise ImportError(f"No module named {name!r}")
    sys.meta_path.insert(0, Missing())

    from werkzeug.test import Client
    from api_token_exporter import TokenAnalytics
    from api_token_exporter.core.keystore import add_key

    key = add_key(sys.argv[1], "svc")
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]
    client = Client(TokenAnalytics(app, keys_file=sys.argv[1], routes=["/items/<id>"], metrics_public=True))
    for headers, code in (({"X-API-Key": key}, 200), ({}, 401)):
        r = client.get("/items/7", headers=headers)
        assert r.status_code == code and r.get_data()             # read to its end, as a server does
        r.close()
    text = client.get("/metrics").get_data(as_text=True)
    line = [l for l in text.splitlines() if l.startswith('apitoken_requests_total{') and 'token="svc"' in l]
    print(line[0])
    for settings, extra in (({"storage_uri": "redis://127.0.0.1:1"}, "[redis]"),
                            ({"prometheus_url": "http://127.0.0.1:1", "admin_token": "a" * 32}, "[analytics]")):
        try:
            TokenAnalytics(app, keys_file=sys.argv[1], **settings)
        except ValueError as exc:              # ConfigError, or the limiter's ValueError naming it
            assert extra in str(exc), exc
            print("refused:", exc)
        else:
            raise SystemExit(f"{settings} started without its extra")
    assert not {m for m in sys.modules if m.split(".")[0] in %r}
""") % (OPTIONAL, OPTIONAL)


def test_the_middleware_runs_with_the_core_dependencies_only(tmp_path):
    out = subprocess.run([sys.executable, "-c", WITHOUT_EXTRAS, str(tmp_path / "keys.yml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert 'route="/items/<id>"' in out.stdout and out.stdout.split()[1] == "1.0"
    assert out.stdout.count("refused: ") == 2 and "pip install 'api-token-exporter[redis]'" in out.stdout


def test_dependencies_and_extras():
    project = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]
    assert sorted(d.split(">")[0] for d in project["dependencies"]) == ["flask", "pyyaml"]
    extras = project["optional-dependencies"]
    assert {"redis", "server", "analytics", "demo", "history", "geo", "alerts", "test"} <= set(extras)
    assert extras["server"] == ["gunicorn>=21", "uvicorn>=0.29", "uvicorn-worker>=0.2"] and extras["redis"] == ["redis>=4.5"]
    assert sorted(d.split(">")[0] for d in extras["geo"]) == ["iptocc", "maxminddb"]
    assert sorted(d.split(">")[0].split("[")[0] for d in extras["alerts"]) == ["psycopg", "requests", "sqlalchemy"]
    self_extra = next(d for d in extras["test"] if d.startswith("api-token-exporter["))
    assert {"redis", "server", "analytics", "demo", "history", "geo", "alerts", "asgi"} <= \
        set(self_extra[len("api-token-exporter["):-1].split(","))


@given(st.floats(allow_nan=True, allow_infinity=True) | st.integers(-10**20, 10**20).map(float))
def test_sample_values_are_written_as_prometheus_client_writes_them(value):
    assert float_to_go_string(value) == floatToGoString(value)


def test_the_demo_says_it_needs_a_checkout(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(stack, "PROMETHEUS_YML", str(tmp_path / "missing.yml"))
    assert devstack_cli.main(["demo", "--data-dir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "run it from a checkout" in err and "make demo" in err
    assert not (tmp_path / "d").exists()


def test_the_image_installs_what_its_services_run():
    dockerfile = open(os.path.join(ROOT, "exporter", "Dockerfile")).read()
    line = next(l for l in dockerfile.splitlines() if "pip install" in l)
    for extra in ("server", "analytics", "redis", "demo"):     # serve, analytics, the ha profile, sinks
        assert extra in line, line
    # the demo and the sink are the dev stack, which the wheel does not carry: the image copies it
    # beside the package and puts it on the path
    import yaml
    compose = yaml.safe_load(open(os.path.join(ROOT, "docker-compose.yml")))
    dev = [name for name, service in compose["services"].items()
           if "devstack" in " ".join(map(str, service.get("command") or []))]
    assert {"demo-api", "webhook-sink"} <= set(dev)
    assert "COPY devstack ./devstack" in dockerfile and re.search(r"ENV PYTHONPATH=/app\b", dockerfile)
    assert re.search(r"^WORKDIR /app$", dockerfile, re.M)


def test_the_console_files_are_package_data():
    """Every file the console serves is installed with the package (pyproject's package-data)."""
    import fnmatch
    patterns = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["tool"]["setuptools"][
        "package-data"]["api_token_exporter.web.console"]
    console = os.path.join(ROOT, "exporter", "api_token_exporter", "web", "console")
    files = [os.path.relpath(os.path.join(d, f), console) for d, _, names in os.walk(console) for f in names
             if "__pycache__" not in d and not f.endswith(".py")]
    assert files and [f for f in files if not any(fnmatch.fnmatch(f, p) for p in patterns)] == []
