"""The installed package is complete without the checkout: a wheel built here, installed in a
fresh virtual environment in a temporary folder (no checkout on the path), renders the rules and
the dashboards from its packaged files, serves the alert API with its packaged thresholds, and
carries no dev stack."""
import json
import os
import re
import subprocess
import sys
import zipfile

import pytest
import requests
import yaml

from support import free_port, needs, require_binary, stop_process, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEV_STACK = ("demo", "fake_upstream", "sinks", "stack", "synthetic", "devstack")
HEAVY = ("requests", "sqlalchemy", "gunicorn", "devstack", "flask", "urllib3")


@pytest.fixture(scope="module")
@needs("slow")                  # pip builds the wheel and installs it with its dependencies
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "--disable-pip-version-check",
                    "-w", str(out), ROOT], check=True, timeout=600, capture_output=True)
    (path,) = out.glob("api_token_exporter-*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
    """A fresh virtual environment with the wheel and the extras `serve` and the alert API use;
    commands run in an empty folder, with nothing of the checkout on PYTHONPATH."""
    home = tmp_path_factory.mktemp("user")
    venv = home / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    f"{wheel}[server,alerts]"], check=True, timeout=900, capture_output=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("ATE_")}
    work = home / "work"
    work.mkdir()

    def run(*args, **kw):
        return subprocess.run(list(args), cwd=work, env=kw.pop("env", env), capture_output=True, text=True,
                              timeout=kw.pop("timeout", 120), **kw)
    return venv / "bin", work, env, run


def test_the_wheel_holds_the_package_data_and_no_dev_stack(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    modules = {n.rsplit("/", 1)[-1][:-3] for n in names if n.endswith(".py")}
    assert not modules & set(DEV_STACK), sorted(modules & set(DEV_STACK))
    assert not [n for n in names if n.startswith("devstack/")]
    for data in ("api_token_exporter/mixin/thresholds.yml", "api_token_exporter/mixin/runbooks.md",
                 "api_token_exporter/mixin/templates/apitoken.tmpl", "api_token_exporter/core/pricing.yml",
                 "api_token_exporter/core/llm-prices.json", "api_token_exporter/web/console/static/console.js",
                 "api_token_exporter/web/console/templates/layout.html"):
        assert data in names, data


def test_the_installed_package_is_not_the_checkout(installed):
    bin_dir, work, env, run = installed
    where = run(str(bin_dir / "python"), "-c", "import api_token_exporter; print(api_token_exporter.__file__)")
    assert where.returncode == 0, where.stderr
    assert where.stdout.startswith(str(bin_dir.parent)) and ROOT not in where.stdout
    assert run(str(bin_dir / "python"), "-c", "import devstack").returncode != 0


def test_help_imports_no_server_database_or_dev_stack(installed):
    bin_dir, _, _, run = installed
    assert run(str(bin_dir / "api-token-exporter"), "--help").returncode == 0
    probe = run(str(bin_dir / "python"), "-c", (
        "import sys\nfrom api_token_exporter.cli import build_parser\n"
        "try:\n    build_parser().parse_args(['--help'])\nexcept SystemExit:\n    pass\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r}))"))
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip().splitlines()[-1] == "[]"


def test_rules_from_my_thresholds_pass_promtool(installed):
    bin_dir, work, _, run = installed
    promtool = require_binary("promtool")
    packaged = run(str(bin_dir / "python"), "-c",
                   "from api_token_exporter.mixin.thresholds import PACKAGED_THRESHOLDS as p; print(p)")
    mine = yaml.safe_load(open(packaged.stdout.strip()))
    mine["latency"]["warning"] = 0.75                       # a user's own threshold
    (work / "mine.yml").write_text(yaml.safe_dump(mine))
    out = run(str(bin_dir / "api-token-exporter"), "rules", "--thresholds", "mine.yml", "--output-dir", "rules")
    assert out.returncode == 0, out.stderr
    files = sorted((work / "rules").glob("*.yml"))
    assert [f.name for f in files] == ["apitoken-alerts.yml", "apitoken-anomalies.yml", "apitoken-recording.yml"]
    check = subprocess.run([promtool, "check", "rules", *map(str, files)], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    alerts = yaml.safe_load((work / "rules" / "apitoken-alerts.yml").read_text())
    latency = [r for g in alerts["groups"] for r in g["rules"] if r.get("alert") == "ApiTokenHighLatency"]
    assert latency and any(re.search(r"> 0\.75\b", r["expr"]) for r in latency)

    bad = run(str(bin_dir / "api-token-exporter"), "rules", "--thresholds", "missing.yml", "--output-dir", "x")
    assert bad.returncode == 2 and "missing.yml" in bad.stderr


def test_dashboards_from_the_packaged_thresholds(installed):
    bin_dir, work, _, run = installed
    out = run(str(bin_dir / "api-token-exporter"), "dashboards", "--output-dir", "dashboards")
    assert out.returncode == 0, out.stderr
    boards = sorted((work / "dashboards").glob("*.json"))
    committed = sorted(p.name for p in __import__("pathlib").Path(ROOT, "grafana", "dashboards").glob("*.json"))
    assert [b.name for b in boards] == committed
    for board in boards:        # the packaged thresholds are the checkout's: the same dashboards
        assert json.loads(board.read_text()) == json.load(open(os.path.join(ROOT, "grafana", "dashboards", board.name)))


def test_serve_with_the_alert_api_boots_on_the_packaged_thresholds(installed, tmp_path):
    bin_dir, work, env, _ = installed
    port = free_port()
    admin = "a" * 32
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        [str(bin_dir / "api-token-exporter"), "serve", "--port", str(port), "--state-dir", str(tmp_path / "state")],
        cwd=work, stdout=log, stderr=subprocess.STDOUT,
        env=dict(env, ATE_ADMIN_TOKEN=admin, ATE_ALERTMANAGER_URL="http://127.0.0.1:1",
                 ATE_ALERT_SYNC_INTERVAL="0", ATE_ALLOW_EMPTY_KEYS="true"))
    try:
        def settings():
            try:
                r = requests.get(f"http://127.0.0.1:{port}/api/v1/alerts/settings",
                                 headers={"Authorization": f"Bearer {admin}"}, timeout=5)
            except requests.RequestException:
                assert proc.poll() is None, open(tmp_path / "serve.log").read()
                return None
            return [r]
        (r,) = wait_for("the alert API", settings, timeout=60)
        assert r.status_code == 200, r.text
        thresholds = r.json()["alert_thresholds"]
        packaged = yaml.safe_load(open(os.path.join(ROOT, "prometheus", "thresholds.yml")))
        assert thresholds["response_time"]["warning"] == packaged["latency"]["warning"]
    finally:
        stop_process(proc)
        log.close()
    assert "does not exist" not in open(tmp_path / "serve.log").read()
