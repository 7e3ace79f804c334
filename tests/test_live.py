"""The live view: the request feed across threads and processes (core/live.py), what a viewer is
shown and may see, the stream's bounds (web/live.py), and the stream as `serve` sends it from
its event loop. The page in Chromium is in test_console.py."""
import json
import multiprocessing
import os
import signal
import threading
import time

import pytest
import requests

from api_token_exporter.core.live import SLOTS, LiveView, RequestFeed, remove_dead_rings
from support import INGEST, console_csrf, console_sign_in, needs, start_serve


BASE = time.time() - 100          # the requests' times: recent, as rings are removed by age


@pytest.fixture(autouse=True)
def recent_base():
    """BASE as of each test, not of the module's import: a test that runs minutes after the
    collection (several test processes) would write requests old enough for a sibling
    process's new ring to remove the rings of children that already ended."""
    global BASE
    BASE = time.time() - 100


def written(feed, n, token="alpha", start=0, route="/items", code=200):
    for i in range(start, start + n):
        feed.record(BASE + i, token, "GET", route, code, i / 1000)


def test_every_request_of_every_thread_is_read_once():
    feed = RequestFeed()
    reader = feed.reader()
    seen, lost = [], 0
    done = threading.Event()

    def read_meanwhile():
        nonlocal lost
        while not done.is_set():
            got, missed = reader.read()
            seen.extend(got)
            lost += missed

    threads = [threading.Thread(target=written, args=(feed, 400, f"t{n}", n * 1000)) for n in range(8)]
    watcher = threading.Thread(target=read_meanwhile)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    watcher.join()
    got, missed = reader.read()
    seen.extend(got)
    assert lost + missed == 0
    assert sorted((r.token, r.duration) for r in seen) == sorted(
        (f"t{n}", i / 1000) for n in range(8) for i in range(n * 1000, n * 1000 + 400))


def _child_writes(directory, token, n):
    feed = RequestFeed(directory)
    written(feed, n, token)


def test_the_requests_of_other_processes_are_read_from_the_directory(tmp_path):
    feed = RequestFeed(str(tmp_path))
    reader = feed.reader()
    written(feed, 5, "parent")
    fork = multiprocessing.get_context("fork")
    children = [fork.Process(target=_child_writes, args=(str(tmp_path), f"child{n}", 300)) for n in range(3)]
    for child in children:
        child.start()
    for child in children:
        child.join()
        assert child.exitcode == 0
    got, lost = reader.read()
    assert lost == 0
    counts = {}
    for r in got:
        counts[r.token] = counts.get(r.token, 0) + 1
    assert counts == {"parent": 5, "child0": 300, "child1": 300, "child2": 300}
    assert [r.time for r in got] == sorted(r.time for r in got)
    # the children are gone: their rings are read for two minutes after their last request, then
    # the next process to start removes them; this process's stays
    # (empty ones at once: each child also had a ring for the feed it inherited)
    remove_dead_rings(str(tmp_path), now=BASE + 299 + 120)
    assert len(list(tmp_path.glob("live-*.ring"))) == 4
    assert {r.token for r in feed.latest(1000)} == {"parent", "child0", "child1", "child2"}
    assert remove_dead_rings(str(tmp_path), now=BASE + 300 + 120) == 3
    assert [p.name for p in tmp_path.glob("live-*.ring")] == [os.path.basename(feed.path)]


def test_a_forked_child_writes_its_own_ring(tmp_path):
    feed = RequestFeed(str(tmp_path))
    parent_ring = feed.path
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:                                          # the child: a ring of its own
        try:
            written(feed, 3, "child")
            os.write(write_end, (feed.path or "").encode())
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    child_ring = os.read(read_end, 4096).decode()
    assert child_ring and child_ring != parent_ring
    assert [r.token for r in feed.latest(10)] == ["child"] * 3


def test_a_reader_that_falls_behind_counts_what_it_lost():
    feed = RequestFeed()
    reader = feed.reader()
    written(feed, SLOTS + 100)
    got, lost = reader.read()
    assert lost == 100 and len(got) == SLOTS
    assert got[0].duration == 100 / 1000 and got[-1].duration == (SLOTS + 99) / 1000
    assert feed.latest(3) == got[-3:]


def test_records_keep_what_they_can_and_say_what_they_cut():
    feed = RequestFeed()
    long_route = "/é" * 100
    feed.record(5.0, None, "PROPFIND", long_route, 404, 0.5)
    feed.record(6.0, "x" * 64, "GET", "/", 70000, 0.1)          # no status that large: not shown
    [r] = feed.latest(5)
    assert r.token is None and r.method == "PROPFIND" and r.code == 404
    assert r.route.endswith("…") and long_route.startswith(r.route[:-1]) and len(r.route.encode()) <= 155


def describe(token):
    return (f"name-{token}", f"masked-{token}", None) if token else (None, "(none)", None)


def test_a_viewer_sees_its_tokens_only_with_counts_per_second_and_quantiles():
    feed = RequestFeed()
    view = LiveView(feed, history=60, window=10, rows=50, min_interval=0)
    now = 2_000_000.0
    admin, tenant = view.viewer(None, now), view.viewer(["alpha"], now)
    for i in range(100):                                  # alpha: 1..100 ms, the last 10 s, every 5th a 500
        feed.record(now - 10 + i / 10, "alpha", "GET", "/a", 500 if i % 5 == 0 else 200, (i + 1) / 1000)
    for i in range(30):
        feed.record(now - 30 + i, "beta", "POST", "/b", 200, 0.2)
    feed.record(now - 1, None, "GET", "/a", 401, 0.001)
    view.update(now)
    mine, everything = view.message(tenant, now, describe), view.message(admin, now, describe)
    assert [t["token"] for t in mine["tokens"]] == ["alpha"]
    [alpha] = mine["tokens"]
    assert (alpha["requests"], alpha["errors"], alpha["per_second"]) == (100, 20, 10.0)
    assert (alpha["p50_ms"], alpha["p95_ms"]) == (50.0, 95.0)            # nearest rank of 1..100 ms
    assert {r["token"] for r in mine["requests"]} == {"alpha"} and len(mine["requests"]) == 50
    assert mine["not_shown"] == 50
    assert mine["requests"][0]["time"] >= mine["requests"][-1]["time"]   # newest first
    assert sum(mine["seconds"]["requests"]) == 100 and sum(mine["seconds"]["errors"]) == 20
    assert mine["seconds"]["start"] == int(now) - 60 and len(mine["seconds"]["requests"]) == 60
    assert sum(everything["seconds"]["requests"]) == 131
    assert {t["token"] for t in everything["tokens"]} == {"alpha", "beta", None}
    # what was shown is not shown again
    feed.record(now + 0.5, "alpha", "GET", "/a", 200, 0.01)
    view.update(now + 1)
    again = view.message(tenant, now + 1, describe)
    assert [r["time"] for r in again["requests"]] == [now + 0.5] and again["not_shown"] == 0


def test_recent_requests_of_admin_stats_cover_every_process_sharing_the_directory(tmp_path, keys):
    from support import build_app
    one = build_app(keys[0], state_dir=str(tmp_path / "state"), admin_token="a" * 20).test_client()
    two = build_app(keys[0], state_dir=str(tmp_path / "state"), admin_token="a" * 20).test_client()
    one.get("/items", headers={"X-API-Key": keys[1]["alpha"]})
    two.get("/items/7", headers={"X-API-Key": keys[1]["beta"]})
    recent = one.get("/admin/stats", headers={"Authorization": "Bearer " + "a" * 20}).json["recent_requests"]
    assert [(r["endpoint"], r["status"]) for r in recent][:2] == [("/items/<int:item_id>", 200), ("/items", 200)]
    assert all(keys[1]["alpha"] not in r["token"] for r in recent)        # masked, never the key


def frames(response, count, timeout=15, until=lambda out: False):
    """The next ``count`` Server-Sent Events of a streamed answer (fewer once ``until(them)``):
    [(event, data)]."""
    if not hasattr(response, "sse"):           # one reader per answer, kept between calls
        response.sse = (response.iter_content(chunk_size=None) if hasattr(response, "iter_content")
                        else iter(response.response), [b""])
    chunks, buffer = response.sse
    out = []
    deadline = time.monotonic() + timeout
    while not (len(out) >= count or until(out) or time.monotonic() > deadline):
        while b"\n\n" not in buffer[0]:
            chunk = next(chunks, None)
            if chunk is None:
                return out
            buffer[0] += chunk
        block, buffer[0] = buffer[0].split(b"\n\n", 1)
        fields = dict(line.split(": ", 1) for line in block.decode().split("\n") if ": " in line)
        if "data" in fields:
            out.append((fields.get("event", "message"), json.loads(fields["data"])))
    return out


def shown_rows(response, count, ticks=15):
    """The first ``count`` requests a stream shows (within ``ticks`` ticks), each with the time of
    the tick that pushed it."""
    rows = []
    for event, doc in frames(response, ticks, until=lambda out: sum(len(d.get("requests", ())) for _, d in out) >= count):
        rows += [(r, doc["time"]) for r in doc.get("requests", ())]
    return rows


def test_live_views_are_bounded_per_process_and_free_their_place_however_they_end(make_app):
    client = make_app(admin_token="a" * 20, console_live_viewers=2).test_client()
    admin = {"Authorization": "Bearer " + "a" * 20}
    first = client.get("/admin/live", headers=admin, buffered=False)
    second = client.get("/admin/live", headers=admin, buffered=False)
    assert first.status_code == second.status_code == 200
    assert first.headers["Content-Type"].startswith("text/event-stream")
    assert first.headers["Cache-Control"] == "no-store"
    [(event, tick)] = frames(first, 1)
    assert event == "tick" and tick["window_seconds"] == 10
    third = client.get("/admin/live", headers=admin, buffered=False)
    assert third.status_code == 503 and third.headers["Retry-After"] == "5"
    assert "console_live_viewers" in third.json["detail"]
    second.close()                                      # never read: its place is free all the same
    fourth = client.get("/admin/live", headers=admin, buffered=False)
    assert fourth.status_code == 200
    first.close()
    fourth.close()
    assert client.get("/admin/live").status_code == 401


def test_a_tenants_live_view_shows_its_tenants_requests_only(make_app, keys):
    app = make_app(admin_token="a" * 20)
    client = app.test_client()
    console_sign_in(client, keys[1]["alpha"])                # tenant acme (alpha, gamma, ...), not beta
    live = client.get("/admin/live", headers={"X-CSRF-Token": console_csrf(client)}, buffered=False)
    assert live.status_code == 200
    other = app.test_client()
    for key in ("alpha", "beta", "gamma"):
        other.get("/items", headers={"X-API-Key": keys[1][key]})
    other.get("/items")                                    # no key
    seen = [r for event, doc in frames(live, 3) if event == "tick" for r in doc["requests"]]
    live.close()
    assert [r["token"] for r in seen] == ["gamma", "alpha"]              # newest first
    assert keys[1]["alpha"] not in json.dumps(seen)


@needs("server")
def test_serve_streams_live_views_from_its_event_loop_across_workers(tmp_path, keys):
    """Streams hold no thread (more of them than --threads while the service answers), every
    event posted to any worker reaches every stream, and SIGTERM ends them."""
    env = {"ATE_INGEST_TOKEN": INGEST, "ATE_ADMIN_TOKEN": "a" * 20, "ATE_CONSOLE_LIVE_VIEWERS": "8"}
    proc, port = start_serve(tmp_path, "--workers", "2", "--threads", "2", "--keys-file", keys[0], env=env)
    url = f"http://127.0.0.1:{port}"
    admin = {"Authorization": "Bearer " + "a" * 20}
    try:
        streams = [requests.get(url + "/admin/live", headers=admin, stream=True, timeout=30) for _ in range(6)]
        assert [s.status_code for s in streams] == [200] * 6
        for s in streams:
            assert frames(s, 1)[0][0] == "tick"
        # six streams on two workers of two threads: the threads are free to answer
        for batch in range(4):
            events = [{"token": "alpha", "route": f"/batch/{batch}", "status": 200 + i, "duration_seconds": 0.01}
                      for i in range(5)]
            r = requests.post(url + "/v1/events", json={"events": events}, timeout=5,
                              headers={"Authorization": f"Bearer {INGEST}"})
            assert r.json()["accepted"] == 5
        delays = []
        for s in streams:                                 # every event, whichever worker took it
            got = shown_rows(s, 20)
            assert sorted((r["endpoint"], r["status"]) for r, _ in got) == sorted(
                (f"/batch/{b}", 200 + i) for b in range(4) for i in range(5))
            delays += [shown_at - r["time"] for r, shown_at in got]
        # how soon is a figure for the note, not an assertion (no test asserts wall time): the
        # browser test checks each request is on the page within two of the stream's ticks
        print(f"pushed {max(delays):.2f} s after the request at most")
        proc.send_signal(signal.SIGTERM)
        ends = [next((doc for event, doc in frames(s, 5) if event == "end"), None) for s in streams]
        assert ends == [{"reason": "server stopping"}] * 6
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_asgi_middleware_streams_live_views_from_its_loop(keys):
    """Under uvicorn the ASGI middleware's endpoints send the stream from the event loop; a
    client that leaves frees its place (one viewer allowed here)."""
    import asyncio
    import contextlib
    import httpx
    import uvicorn
    from asgi_app import create_app
    from support import free_port
    port = free_port()
    app = create_app(keys_file=keys[0], admin_token="a" * 20, console_live_viewers=1)
    admin = {"Authorization": "Bearer " + "a" * 20}

    async def main():
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        serving = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
                statuses = []
                for _ in range(2):                         # the second after the first one left
                    for _ in range(50):                    # the server sees it leave within 0.1 s
                        live = await client.send(client.build_request("GET", "/admin/live", headers=admin),
                                                 stream=True)
                        if live.status_code == 200:
                            break
                        await live.aclose()
                        await asyncio.sleep(0.1)
                    async with contextlib.aclosing(live):
                        statuses.append(live.status_code)
                        chunks = live.aiter_raw()
                        assert b"event: tick" in await asyncio.wait_for(chunks.__anext__(), 5)
                        statuses.append((await client.get("/admin/live", headers=admin)).status_code)
                        await client.get("/api/v1/items", headers={"X-API-Key": keys[1]["alpha"]})
                        text = b""
                        while b"/api/v1/items" not in text:
                            text += await asyncio.wait_for(chunks.__anext__(), 5)
                return statuses
        finally:
            server.should_exit = True
            await serving
    assert asyncio.run(main()) == [200, 503, 200, 503]
