"""Rate limits in a real Redis Cluster (3 primaries, 3 replicas from Debian's redis-server and
`redis-cli --cluster create` on loopback): the one-round-trip script per token, several app
instances behind round-robin holding a limit exactly, and a primary killed mid-traffic."""
import subprocess
import threading
import time

import pytest
import requests
from werkzeug.serving import make_server

from api_token_exporter.core.ratelimit import RateLimiter, StorageUnavailable
from devstack.stack import find_binary, free_port, prometheus_config, start_prometheus
from support import build_app, needs, require_binary, sample_total, stop_process, wait_for, wait_for_port

pytestmark = pytest.mark.integration
NODE_TIMEOUT_MS = 1500


def cluster_ports(n):
    """Distinct free ports whose cluster bus ports (+10000) are free too."""
    import random
    import socket
    found = []
    while len(found) < n:
        port = random.randint(20000, 29999)
        if port in found:
            continue
        try:
            for p in (port, port + 10000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", p))
        except OSError:
            continue
        found.append(port)
    return found


class Cluster:
    def __init__(self, workdir):
        self.server, self.cli = require_binary("redis-server"), require_binary("redis-cli")
        self.ports = cluster_ports(6)
        self.procs = {}
        self.workdir = workdir
        for port in self.ports:
            self.start_node(port)
        result = subprocess.run([self.cli, "--cluster", "create", *[f"127.0.0.1:{p}" for p in self.ports],
                                 "--cluster-replicas", "1", "--cluster-yes"], capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        wait_for("the cluster", lambda: all(self.info(p).get("cluster_state") == "ok" for p in self.ports),
                 timeout=60)
        self.uri = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports[:3])

    def start_node(self, port):
        node_dir = self.workdir / str(port)
        node_dir.mkdir(exist_ok=True)
        self.procs[port] = subprocess.Popen(
            [self.server, "--bind", "127.0.0.1", "--port", str(port), "--cluster-enabled", "yes",
             "--cluster-config-file", str(node_dir / "nodes.conf"), "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
             "--save", "", "--appendonly", "no", "--dir", str(node_dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(port, self.procs[port])

    def redis_cli(self, port, *args):
        return subprocess.run([self.cli, "-p", str(port), *args], capture_output=True, text=True, timeout=10).stdout

    def info(self, port):
        return dict(line.strip().split(":", 1) for line in self.redis_cli(port, "cluster", "info").splitlines()
                    if ":" in line)

    def primary_of(self, key):
        alive = next(p for p in self.ports if self.procs[p].poll() is None)
        slot = int(self.redis_cli(alive, "cluster", "keyslot", key).strip())
        for line in self.redis_cli(alive, "cluster", "nodes").splitlines():
            fields = line.split()
            if "master" in fields[2] and "fail" not in fields[2]:
                for part in fields[8:]:
                    low, _, high = part.partition("-")
                    if low.isdigit() and int(low) <= slot <= int(high or low):
                        return int(fields[1].split("@")[0].rsplit(":", 1)[1])
        return None                                  # its primary failed, no replica promoted yet

    def stop(self):
        for proc in self.procs.values():
            stop_process(proc)


@pytest.fixture(scope="module")
@needs("redis")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    yield c
    c.stop()


def test_every_token_is_limited_in_one_round_trip_wherever_its_slot_is(cluster):
    a, b = RateLimiter(cluster.uri, timeout=1.0), RateLimiter(cluster.uri, timeout=1.0)
    tokens = [f"tok{i}" for i in range(40)]          # spread over the three primaries
    assert len({cluster.primary_of(f"ate:rl:{{{t}}}:minute") for t in tokens}) == 3
    limits = {"minute": 5, "hour": 8}
    now = time.time()
    for token in tokens:
        answers = [(a if i % 2 else b).hit(token, limits, now) for i in range(7)]
        assert [d.allowed for d in answers] == [True] * 5 + [False] * 2
        assert [d.windows[0].remaining for d in answers[:5]] == [4, 3, 2, 1, 0]
        # the hour window is charged only for the requests the minute let through
        assert answers[-1].windows[1].remaining == 3


def test_three_instances_behind_round_robin_hold_the_minute_limit_exactly(cluster, keys, tmp_path):
    if not find_binary("prometheus"):
        pytest.fail("prometheus is not installed: run .ci/install")
    keys_file, raw = keys[0], keys[1]
    servers, urls = [], []
    prom = None
    try:
        for _ in range(3):
            app = build_app(keys_file, storage_uri=cluster.uri, storage_timeout=1.0,
                            rate_limits={"minute": 50, "hour": 1000, "day": 10000}, metrics_public=True)
            port = free_port()
            server = make_server("127.0.0.1", port, app, threaded=True)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            servers.append(server)
            urls.append(f"http://127.0.0.1:{port}")
        prom = start_prometheus(str(tmp_path / "prom"), prometheus_config(
            {"api-token-exporter": [u.split("://")[1] for u in urls]}, None, str(tmp_path / "no-rules"),
            scrape_interval="1s", evaluation_interval="1s"))
        key = raw["alpha"]
        codes = []
        lock = threading.Lock()

        def client(offset):
            for i in range(20):
                r = requests.get(urls[(offset + i) % 3] + "/items", headers={"X-API-Key": key}, timeout=10)
                with lock:
                    codes.append(r.status_code)
        threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert codes.count(200) == 50 and codes.count(429) == 30, sorted(codes)
        # Prometheus's sum over the three instances is every request sent
        def total():
            result = requests.get(prom.url + "/api/v1/query", timeout=10, params={
                "query": 'sum(apitoken_requests_total{token="alpha"})'}).json()["data"]["result"]
            return float(result[0]["value"][1]) if result else 0
        wait_for("the sum over instances", lambda: total() == 80, timeout=60)
        assert sum(sample_total(requests.get(u + "/metrics", timeout=10).text, "apitoken_requests_total",
                                token="alpha") for u in urls) == 80
    finally:
        if prom is not None:
            prom.stop()
        for server in servers:
            server.shutdown()


def test_the_asyncio_client_shares_the_cluster_counts(cluster):
    """The ASGI middleware's path (redis.asyncio's cluster client, the same script and keys)
    and the sync one charge the same windows, on every primary."""
    import asyncio
    sync, other = RateLimiter(cluster.uri, timeout=1.0), RateLimiter(cluster.uri, timeout=1.0)
    tokens = [f"async{i}" for i in range(24)]
    assert len({cluster.primary_of(f"ate:rl:{{{t}}}:minute") for t in tokens}) == 3
    plan = sync.plan({"minute": 5, "hour": 8})

    async def main():
        now = time.time()
        out = []
        for token in tokens:
            out.append([(await other.hit_plan_async(token, plan, now)) if i % 2 else sync.hit_plan(token, plan, now)
                        for i in range(7)])
        await other.aclose()
        return out
    for answers in asyncio.run(main()):
        assert [d.allowed for d in answers] == [True] * 5 + [False] * 2
        assert [d.windows[0].remaining for d in answers[:5]] == [4, 3, 2, 1, 0]


def test_a_primary_killed_mid_traffic(cluster):       # last: it leaves the cluster one node short
    """While its replica takes over, that primary's tokens get the failure mode (here
    ``closed``: a clear refusal, never a crash); then they are limited again, counting on from
    the replica's copy of their windows."""
    limiter = RateLimiter(cluster.uri, timeout=0.5, failure_mode="closed")
    token = "victim"
    victim = cluster.primary_of(f"ate:rl:{{{token}}}:minute")
    limits = {"hour": 10_000_000}                 # never reached: every answer is a count
    for _ in range(100):
        limiter.hit(token, limits)
    time.sleep(0.5)                                   # replication is asynchronous
    outcomes = {"allowed": 0, "refused": 0, "unavailable": 0}
    errors = []
    stop = threading.Event()

    slowest = [0.0]

    def traffic():
        while not stop.is_set():
            started = time.monotonic()
            try:
                outcomes["allowed" if limiter.hit(token, limits).allowed else "refused"] += 1
                time.sleep(0.002)
            except StorageUnavailable:
                outcomes["unavailable"] += 1
                time.sleep(0.05)
            except Exception as exc:                 # anything else is a bug
                errors.append(repr(exc))
            finally:
                slowest[0] = max(slowest[0], time.monotonic() - started - 0.05)
    thread = threading.Thread(target=traffic)
    thread.start()
    time.sleep(0.5)
    killed = time.monotonic()
    stop_process(cluster.procs[victim])              # the primary dies
    try:
        wait_for("the replica promoted", lambda: cluster.primary_of(f"ate:rl:{{{token}}}:minute") not in (victim, None),
                 timeout=60)
        before = dict(outcomes)
        wait_for("limits answered again", lambda: outcomes["allowed"] > before["allowed"] + 20, timeout=60)
        print(f"failover: {time.monotonic() - killed:.1f} s from the kill to answers again; "
              f"{outcomes['unavailable']} calls answered by the failure mode meanwhile; the slowest "
              f"call took {slowest[0]:.2f} s")
    finally:
        stop.set()
        thread.join(timeout=30)
    assert errors == [] and outcomes["unavailable"] > 0 and outcomes["refused"] == 0
    # the failure mode answered while the slot had no primary: no call waited in the client's own
    # retries through the failover (0 such answers when it did; the slowest call is printed above)
    # the window kept counting from the replica: the 100 hits before the kill (replicated)
    # were not lost, only, at most, those of the last moments before it
    decision = limiter.hit(token, limits)
    assert decision.windows[0].remaining <= 10_000_000 - 100 - (outcomes["allowed"] - before["allowed"])
