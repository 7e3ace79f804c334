"""Run Prometheus and Alertmanager from local binaries with the committed config files.

Only what differs from docker compose is rewritten: scrape targets, the Alertmanager address,
notification hosts and, for tests, the timings. Everything binds to 127.0.0.1, with its own
storage directory; Alertmanager's gossip is switched off.
"""
from __future__ import annotations

import glob
import os
import random
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import requests
import yaml

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
PROMETHEUS_YML = os.path.join(ROOT, "prometheus", "prometheus.yml")
ALERTMANAGER_YML = os.path.join(ROOT, "alertmanager", "alertmanager.yml")


def in_checkout() -> bool:
    """True when this package runs from a clone of the repository (an editable install), where
    the Prometheus and Alertmanager configuration the demo and the tests use live."""
    return os.path.isfile(PROMETHEUS_YML) and os.path.isfile(ALERTMANAGER_YML)
# the calendar bars of the dashboards look ahead from each period's start (always on in 3.x)
PROMETHEUS_FEATURES = ["--enable-feature=promql-negative-offset"]
ALERTMANAGER_BINARIES = ("alertmanager", "prometheus-alertmanager")


PORT_SLICE = 2000
_handed_out: set = set()


def free_port() -> int:
    """A loopback port free now and likely still free when a server binds it seconds later:
    below the kernel's ephemeral range (32768 and up on Linux), where outgoing connections
    never land, in a slice of its own for each pytest-xdist worker, and never one handed out
    before by this process."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:]
    low = 20000 + (int(worker) % 6 if worker.isdigit() else 0) * PORT_SLICE
    if len(_handed_out) >= PORT_SLICE // 2:
        _handed_out.clear()
    start = random.randrange(PORT_SLICE)
    for i in range(PORT_SLICE):
        port = low + (start + i) % PORT_SLICE
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket() as s:               # the whole slice busy: any port the kernel gives
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_binary(*names: str) -> Optional[str]:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return None


def prometheus_config(targets: Dict[str, List[str]], alertmanager: Optional[str], rules_dir: str,
                      scrape_interval: str = "15s", evaluation_interval: str = "15s",
                      source: str = PROMETHEUS_YML) -> dict:
    with open(source, "r", encoding="utf-8") as fh:
        cfg = yaml.safe_load(fh)
    cfg["global"]["scrape_interval"] = scrape_interval
    cfg["global"]["evaluation_interval"] = evaluation_interval
    cfg["rule_files"] = [os.path.join(os.path.abspath(rules_dir), "*.yml")]
    if alertmanager:
        cfg["alerting"]["alertmanagers"] = [{"static_configs": [{"targets": [alertmanager]}]}]
    else:
        cfg.pop("alerting", None)
    jobs = []
    for job in cfg["scrape_configs"]:
        if job["job_name"] in targets:
            job["static_configs"] = [{"targets": targets[job["job_name"]]}]
            job.pop("dns_sd_configs", None)     # compose service discovery: not here
            job.pop("authorization", None)      # compose's secret: the local exporters need none
            jobs.append(job)
    cfg["scrape_configs"] = jobs
    return cfg


def alertmanager_config(smtp: Optional[str], webhook_base: str, slack_url_file: str,
                        group_wait: Optional[str] = None, group_interval: Optional[str] = None,
                        repeat_interval: Optional[str] = None,
                        source: str = ALERTMANAGER_YML, history_url: Optional[str] = None,
                        history_token_file: Optional[str] = None) -> dict:
    """alertmanager.yml for local hosts: webhooks to ``webhook_base``, the history receiver to
    the exporter at ``history_url`` with the token in ``history_token_file`` (without them, no
    history route)."""
    with open(source, "r", encoding="utf-8") as fh:
        cfg = yaml.safe_load(fh)
    if history_url:
        for receiver in cfg["receivers"]:
            if receiver["name"] == "history":
                hook = receiver["webhook_configs"][0]
                hook["url"] = history_url.rstrip("/") + "/api/v1/alerts/webhook"
                hook["http_config"]["authorization"]["credentials_file"] = os.path.abspath(history_token_file)
    else:
        cfg["receivers"] = [r for r in cfg["receivers"] if r["name"] != "history"]
        cfg["route"]["routes"] = [r for r in cfg["route"]["routes"] if r["receiver"] != "history"]
    g = cfg["global"]
    if smtp:
        g["smtp_smarthost"] = smtp
    g["slack_api_url_file"] = os.path.abspath(slack_url_file)
    cfg["templates"] = [os.path.join(os.path.dirname(os.path.abspath(source)), t)
                        for t in cfg.get("templates", [])]
    for receiver in cfg["receivers"]:
        for hook in receiver.get("webhook_configs", []) if receiver["name"] != "history" else []:
            path = hook["url"].split("://", 1)[1].split("/", 1)[1]
            hook["url"] = f"{webhook_base.rstrip('/')}/{path}"
        if not smtp:
            receiver.pop("email_configs", None)

    def retime(route):
        for key, value in (("group_wait", group_wait), ("group_interval", group_interval),
                           ("repeat_interval", repeat_interval)):
            if value is not None and (key in route or route is cfg["route"]):
                route[key] = value
        for child in route.get("routes", []):
            retime(child)

    retime(cfg["route"])
    return cfg


@dataclass
class Service:
    name: str
    url: str
    process: subprocess.Popen
    log_path: str
    extra: dict = field(default_factory=dict)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        if self.extra.get("remove"):
            shutil.rmtree(self.extra["remove"], ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, "r", encoding="utf-8", errors="replace") as fh:
                return "".join(fh.readlines()[-lines:])
        except OSError:
            return ""


def _wait_ready(service: Service, path: str, timeout: float) -> Service:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise RuntimeError(f"{service.name} exited with code {service.process.returncode}:\n"
                               f"{service.log_tail()}")
        try:
            if requests.get(service.url + path, timeout=1).status_code == 200:
                return service
        except requests.RequestException:
            pass
        time.sleep(0.2)
    service.stop()
    raise TimeoutError(f"{service.name} not ready after {timeout:.0f} s:\n{service.log_tail()}")


def _launch(name: str, binary: str, workdir: str, config: dict, port: int, flags, ready_path: str,
            timeout: float) -> Service:
    """Write ``config`` into ``workdir``, start ``binary`` on 127.0.0.1:``port``, wait until ready."""
    os.makedirs(workdir, exist_ok=True)
    cfg_path = os.path.join(workdir, f"{name}.yml")
    with open(cfg_path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(config, fh, sort_keys=False)
    log_path = os.path.join(workdir, f"{name}.log")
    with open(log_path, "a") as log:            # a restart keeps the earlier run's lines
        proc = subprocess.Popen([binary, f"--config.file={cfg_path}", f"--web.listen-address=127.0.0.1:{port}",
                                 *flags], stdout=log, stderr=subprocess.STDOUT)
    return _wait_ready(Service(name, f"http://127.0.0.1:{port}", proc, log_path), ready_path, timeout)


def start_prometheus(workdir: str, config: dict, port: Optional[int] = None,
                     retention: str = "15d", timeout: float = 30, flags: Sequence[str] = ()) -> Service:
    binary = find_binary("prometheus")
    if not binary:
        raise FileNotFoundError("prometheus is not installed (Debian: apt-get install prometheus)")
    return _launch("prometheus", binary, workdir, config, port or free_port(),
                   [f"--storage.tsdb.path={os.path.join(workdir, 'data')}",
                    f"--storage.tsdb.retention.time={retention}", "--rules.alert.resend-delay=1s",
                    "--web.enable-lifecycle", *PROMETHEUS_FEATURES, *flags], "/-/ready", timeout)


def start_alertmanager(workdir: str, config: dict, port: Optional[int] = None,
                       timeout: float = 30) -> Service:
    binary = find_binary(*ALERTMANAGER_BINARIES)
    if not binary:
        raise FileNotFoundError("alertmanager is not installed "
                                "(Debian: apt-get install prometheus-alertmanager)")
    port = port or free_port()
    return _launch("alertmanager", binary, workdir, config, port,
                   [f"--storage.path={os.path.join(workdir, 'data')}", "--cluster.listen-address=",
                    f"--web.external-url=http://127.0.0.1:{port}"], "/-/ready", timeout)


def postgres_binaries() -> Optional[str]:
    """The bin directory of Debian's newest PostgreSQL server, if one is installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"),
                   key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    return os.path.dirname(found[-1]) if found else None


def start_postgres(workdir: str, port: Optional[int] = None, timeout: float = 60) -> Service:
    """A throwaway PostgreSQL server on 127.0.0.1 (trust authentication, user postgres); its URL
    is ``postgresql+psycopg://postgres@127.0.0.1:PORT/postgres``. As root it runs as the
    ``postgres`` user, which the server requires."""
    bindir = postgres_binaries()
    if not bindir:
        raise FileNotFoundError("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    port = port or free_port()
    os.makedirs(workdir, exist_ok=True)
    log_path = os.path.join(workdir, "postgres.log")
    as_user: List[str] = []
    if os.geteuid() == 0:
        # the server user must reach its directory: not under a root-only test directory
        import pwd
        import tempfile
        owner = pwd.getpwnam("postgres")
        workdir = tempfile.mkdtemp(prefix="ate-postgres-")
        os.chown(workdir, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data = os.path.join(workdir, "pgdata")
    try:
        initdb = subprocess.run(as_user + [os.path.join(bindir, "initdb"), "-D", data, "-U", "postgres", "-A",
                                           "trust", "--no-sync", "-E", "UTF8"], capture_output=True, text=True,
                                timeout=120)
        if initdb.returncode != 0:
            raise RuntimeError(f"initdb failed: {initdb.stderr.strip()[-500:]}")
        with open(log_path, "ab") as log:
            process = subprocess.Popen(as_user + [os.path.join(bindir, "postgres"), "-D", data, "-p", str(port),
                                                  "-c", "listen_addresses=127.0.0.1",
                                                  "-c", f"unix_socket_directories={workdir}", "-c", "fsync=off"],
                                       stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    except BaseException:
        if as_user:
            shutil.rmtree(workdir, ignore_errors=True)
        raise
    service = Service("postgres", f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres", process, log_path,
                      extra={"remove": workdir if as_user else None})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = service.log_tail()
            service.stop()
            raise RuntimeError(f"postgres exited with code {process.returncode}:\n{tail}")
        ready = subprocess.run([os.path.join(bindir, "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)])
        if ready.returncode == 0:
            return service
        time.sleep(0.2)
    service.stop()
    raise TimeoutError(f"postgres not ready after {timeout:.0f} s:\n{service.log_tail()}")
