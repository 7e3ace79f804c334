"""docker-compose.yml and the Dockerfile, validated offline (no Docker engine here)."""
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from devstack.stack import ROOT
from support import needs

COMPOSE = os.path.join(ROOT, "docker-compose.yml")


@pytest.fixture(scope="module")
def compose():
    with open(COMPOSE) as fh:
        return yaml.safe_load(fh)


def test_compose_file_matches_the_compose_spec():
    binary = shutil.which("check-jsonschema", path=os.path.dirname(sys.executable)) or shutil.which("check-jsonschema")
    if not binary:
        pytest.fail("check-jsonschema is not installed: run .ci/install")
    result = subprocess.run([binary, "--builtin-schema", "vendor.compose-spec", COMPOSE],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_parses_it_as_docker_compose_does(tmp_path):
    """A real Compose implementation reads the file (`config` needs no engine): Debian's
    docker-compose, or the compose CLI plugin where one is installed. Both profiles, and with
    the user's own Slack secret file in place of the example."""
    plugin = shutil.which("docker") and subprocess.run(["docker", "compose", "version"],
                                                       capture_output=True).returncode == 0
    command = ["docker", "compose"] if plugin else [shutil.which("docker-compose") or "docker-compose"]
    if not plugin and not shutil.which("docker-compose"):
        pytest.fail("neither docker compose nor docker-compose is installed: run .ci/install")
    secret = tmp_path / "slack_api_url"
    secret.write_text("https://hooks.slack.invalid/services/T/B/X\n")
    for env, profile in (({}, []), ({}, ["--profile", "ha"]), ({"SLACK_API_URL_FILE": str(secret)}, [])):
        result = subprocess.run(command + ["-f", COMPOSE] + profile + ["config"], capture_output=True,
                                text=True, timeout=60, env={**os.environ, **env}, cwd=ROOT)
        assert result.returncode == 0, result.stderr
        config = yaml.safe_load(result.stdout)
        services = set(config["services"])
        assert {"exporter", "prometheus", "alertmanager", "grafana"} <= services
        assert {"redis", "api-replica-1", "api-replica-2"} <= services or not profile
        source = config["secrets"]["slack_api_url"]["file"]
        assert source == (str(secret) if env else os.path.join(ROOT, "alertmanager", "secrets", "slack_api_url.example"))


def test_the_whole_stack_is_there(compose):
    services = compose["services"]
    assert {"exporter", "demo-api", "prometheus", "alertmanager", "grafana", "mailsink",
            "webhook-sink"} <= set(services)
    assert services["exporter"]["build"]["dockerfile"] == "exporter/Dockerfile"


def test_images_are_pinned_and_every_service_has_a_health_check(compose):
    for name, service in compose["services"].items():
        image = service.get("image", "")
        assert re.search(r":v?\d+\.\d+(\.\d+)?", image) and not image.endswith(":latest"), (name, image)
        assert service.get("healthcheck", {}).get("test"), name
    from_line = open(os.path.join(ROOT, "exporter", "Dockerfile")).read().split("FROM ", 1)[1].split()[0]
    assert re.search(r":\d+\.\d+\.\d+", from_line), from_line


def test_versions_match_what_the_tests_run(compose):
    assert compose["services"]["prometheus"]["image"] == "prom/prometheus:v2.42.0"
    assert compose["services"]["alertmanager"]["image"] == "prom/alertmanager:v0.25.0"


def test_prometheus_keeps_a_year(compose):
    flags = " ".join(compose["services"]["prometheus"]["command"])
    days = int(re.search(r"--storage.tsdb.retention.time=(\d+)d", flags).group(1))
    assert days >= 366


def test_grafana_is_provisioned_and_open_for_viewing(compose):
    grafana = compose["services"]["grafana"]
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"] if v.startswith("./")}
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"
    assert mounts["/var/lib/grafana/dashboards"] == "./grafana/dashboards"
    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"].replace("/var/lib/grafana/dashboards", "grafana/dashboards")
    assert os.path.exists(os.path.join(ROOT, home))


def test_every_bind_mount_exists(compose):
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert os.path.exists(os.path.join(ROOT, source)), (name, source)


def test_ha_profile_has_redis_and_two_replicas_sharing_it(compose):
    services = compose["services"]
    ha = {n for n, s in services.items() if "ha" in s.get("profiles", [])}
    assert ha == {"redis", "api-replica-1", "api-replica-2", "prometheus-global", "prometheus-zone-a",
                  "prometheus-zone-b"}
    # each zone's Prometheus scrapes its replica and writes to the global store (the same
    # files tests/test_remote_write.py runs)
    for zone, replica in (("a", "api-replica-1"), ("b", "api-replica-2")):
        cfg = yaml.safe_load(open(os.path.join(ROOT, "prometheus", "zones", f"zone-{zone}.yml")))
        assert cfg["scrape_configs"][0]["static_configs"][0]["targets"] == [f"{replica}:8000"]
        assert cfg["remote_write"][0]["url"] == "http://prometheus-global:9090/api/v1/write"
        assert f"--config.file=/etc/prometheus/zones/zone-{zone}.yml" in services[f"prometheus-zone-{zone}"]["command"]
    assert "--web.enable-remote-write-receiver" in services["prometheus-global"]["command"]
    for replica in ("api-replica-1", "api-replica-2"):
        assert services[replica]["environment"]["ATE_STORAGE_URI"] == "redis://redis:6379/0"
    assert services["api-replica-1"]["ports"] != services["api-replica-2"]["ports"]


def test_hosts_in_the_configs_are_compose_services(compose):
    services = set(compose["services"])
    am = yaml.safe_load(open(os.path.join(ROOT, "alertmanager", "alertmanager.yml")))
    assert am["global"]["smtp_smarthost"].split(":")[0] in services
    prom = yaml.safe_load(open(os.path.join(ROOT, "prometheus", "prometheus.yml")))
    hosts = {t.split(":")[0] for job in prom["scrape_configs"] for sc in job.get("static_configs", [])
             for t in sc["targets"]} - {"localhost"}
    assert hosts <= services
    datasources = yaml.safe_load(open(os.path.join(ROOT, "grafana", "provisioning", "datasources", "datasources.yml")))
    for ds in datasources["datasources"]:
        assert ds["url"].split("//")[1].split(":")[0] in services


def test_dockerfile_copies_what_exists():
    text = open(os.path.join(ROOT, "exporter", "Dockerfile")).read()
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        for source in line.split()[:-1]:
            assert os.path.exists(os.path.join(ROOT, source)), source
    assert "USER " in text and "api-token-exporter" in text


def test_every_bind_mount_and_secret_file_exists_in_a_clean_checkout(compose):
    """A read-only mount of a file a fresh clone lacks fails at start-up; so does a secret."""
    tracked = set(subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                                 check=True).stdout.split())
    sources = []
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume.get("source", "")
            if source.startswith("."):
                sources.append((name, source))
    for name, secret in compose.get("secrets", {}).items():
        source = re.sub(r"\$\{[A-Z_]+:-([^}]+)\}", r"\1", secret["file"])
        sources.append((f"secret {name}", source))
    assert sources
    for where, source in sources:
        path = os.path.normpath(source)
        assert path in tracked or any(t.startswith(path + "/") for t in tracked), (where, source)


def test_alertmanager_and_prometheus_have_external_urls_and_the_slack_secret(compose):
    services = compose["services"]
    assert any(a.startswith("--web.external-url=") for a in services["prometheus"]["command"])
    assert any(a.startswith("--web.external-url=") for a in services["alertmanager"]["command"])
    assert services["alertmanager"]["secrets"] == ["slack_api_url", "alert_webhook_token"]
    config = yaml.safe_load(open(os.path.join(ROOT, "alertmanager", "alertmanager.yml")))
    assert config["global"]["slack_api_url_file"] == "/run/secrets/slack_api_url"


def test_the_exporters_metrics_need_the_token_prometheus_is_given(compose):
    """/metrics lists every token and tenant: published on all interfaces, it asks for the token
    that compose gives the exporter and Prometheus as one secret."""
    services = compose["services"]
    assert services["exporter"]["environment"]["ATE_METRICS_BEARER_TOKEN_FILE"] == "/run/secrets/metrics_token"
    assert "metrics_token" in services["exporter"]["secrets"] and "metrics_token" in services["prometheus"]["secrets"]
    assert compose["secrets"]["metrics_token"]["file"].endswith("./prometheus/secrets/metrics_token.example}")
    job = _exporter_job()
    assert job["authorization"] == {"type": "Bearer", "credentials_file": "/run/secrets/metrics_token"}
    assert "exporter:9464" in job["static_configs"][0]["targets"]


def _exporter_job():
    with open(os.path.join(ROOT, "prometheus", "prometheus.yml")) as fh:
        return next(j for j in yaml.safe_load(fh)["scrape_configs"] if j["job_name"] == "api-token-exporter")


@needs("prometheus", "server")
def test_as_composed_the_exporter_answers_prometheus_and_no_one_else(tmp_path):
    """`serve` with the compose secret's default file, and a real Prometheus with the committed
    job (its targets on this machine): scraped, while a request without the token gets 401."""
    import requests
    from api_token_exporter.core.keystore import add_key
    from devstack.stack import free_port, start_prometheus
    from support import stop_process, wait_for, wait_for_port
    example = os.path.join(ROOT, "prometheus", "secrets", "metrics_token.example")
    keys_file = tmp_path / "keys.yml"
    add_key(str(keys_file), "alpha")
    port = free_port()
    env = dict(os.environ, ATE_KEYS_FILE=str(keys_file), ATE_METRICS_BEARER_TOKEN_FILE=example)
    proc = subprocess.Popen([sys.executable, "-m", "api_token_exporter.cli", "serve", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    prom = None
    try:
        wait_for_port(port, proc, timeout=60)
        url = f"http://127.0.0.1:{port}/metrics"
        refused = requests.get(url, timeout=10)
        assert refused.status_code == 401 and "alpha" not in refused.text
        assert requests.get(url, timeout=10, headers={"Authorization": "Bearer wrong"}).status_code == 401
        token = open(example).read().strip()
        assert requests.get(url, timeout=10, headers={"Authorization": f"Bearer {token}"}).status_code == 200
        job = dict(_exporter_job(), static_configs=[{"targets": [f"127.0.0.1:{port}"]}],
                   authorization={"type": "Bearer", "credentials_file": example})
        job.pop("dns_sd_configs", None)
        prom = start_prometheus(str(tmp_path / "prom"), {"global": {"scrape_interval": "1s"}, "scrape_configs": [job]})
        wait_for("the exporter scraped", lambda: [r for r in requests.get(prom.url + "/api/v1/query", timeout=10, params={
            "query": 'up{job="api-token-exporter"} == 1'}).json()["data"]["result"]], timeout=30)
    finally:
        if prom is not None:
            prom.stop()
        stop_process(proc)
