"""gunicorn settings for several workers sharing one set of metrics (multiprocess mode).

Use with ``gunicorn --config python:api_token_exporter.gunicorn_conf ...`` and
PROMETHEUS_MULTIPROC_DIR pointing at an empty directory private to this server.
"""
import glob
import os


def on_starting(server):
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        raise RuntimeError("PROMETHEUS_MULTIPROC_DIR must be set for several workers")
    os.makedirs(path, exist_ok=True)
    for stale in glob.glob(os.path.join(path, "*.db")):   # values of an earlier run
        os.unlink(stale)


def child_exit(server, worker):
    from prometheus_client import multiprocess
    multiprocess.mark_process_dead(worker.pid)
