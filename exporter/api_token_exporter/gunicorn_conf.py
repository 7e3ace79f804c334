"""gunicorn settings for several workers sharing one set of metrics.

Use with ``gunicorn --config python:api_token_exporter.gunicorn_conf ...`` and
PROMETHEUS_MULTIPROC_DIR pointing at a directory private to this server. Each worker writes its
values to its own file there (store.py); a scrape answered by any worker sums them all. Files of
workers that exited stay, so their counts stay in the totals; the directory is emptied when the
server starts.
"""
import glob
import os


def on_starting(server):
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        raise RuntimeError("PROMETHEUS_MULTIPROC_DIR must be set for several workers")
    os.makedirs(path, exist_ok=True)
    for pattern in ("ate-*.data", "ate-*.idx"):        # values of an earlier run
        for stale in glob.glob(os.path.join(path, pattern)):
            os.unlink(stale)
