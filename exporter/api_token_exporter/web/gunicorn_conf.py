"""gunicorn settings for several workers sharing one set of metrics.

``api-token-exporter serve`` uses these hooks; with gunicorn itself use
``gunicorn --config python:api_token_exporter.web.gunicorn_conf 'api_token_exporter.web.server:app_from_env()'``.
Every worker writes its values to its own file in the store directory (store.py); a scrape
answered by any worker sums them all. The directory is the ``state_dir`` setting, where counts
survive restarts, or else a private temporary directory made when the server starts and removed
when it stops. Files of workers that exit are folded into the directory's archive, so their
counts stay in the totals and the directory does not grow.
"""
import contextlib
import ctypes
import os
import shutil
import signal
import sys
import tempfile

from api_token_exporter.core.config import load_settings
from api_token_exporter.core.keystore import KeyStore, KeyStoreError, last_good_copy
from api_token_exporter.core.metrics import catalogue
from api_token_exporter.core.store import check_directory, fold_dead_files_safely

worker_class = "api_token_exporter.web.worker.ServingWorker"     # slow clients hold sockets, not threads
_OWN_DIR = "_ATE_OWN_STATE_DIR"
PR_SET_PDEATHSIG = 1                        # prctl(2)


def on_starting(server):
    settings = load_settings()              # a bad setting stops the server here, named
    if settings.metrics_port is not None and server.cfg.workers > 1:
        raise SystemExit(
            f"error: metrics_port {settings.metrics_port} cannot be served by {server.cfg.workers} "
            "workers; scrape the metrics path on the server's own port instead (any worker "
            "answers with the sum of all of them), or run one worker")
    directory = settings.state_dir
    if not directory:
        directory = tempfile.mkdtemp(prefix="ate-store-")
        os.environ[_OWN_DIR] = directory
    os.environ["ATE_STATE_DIR"] = os.path.abspath(directory)   # the workers inherit it
    try:
        check_directory(directory)          # a full disk stops the start here, named
    except OSError as exc:
        on_exit(server)
        raise SystemExit(f"error: {exc.strerror}")
    # a key file that cannot be read stops it here, named, not as worker tracebacks; a good one
    # is this run's first last-good copy (a previous run's is no fallback for this start)
    copy = last_good_copy(directory)
    with contextlib.suppress(FileNotFoundError):
        os.remove(copy)
    try:
        KeyStore(settings.keys_file, allow_empty=settings.allow_empty_keys, last_good=copy)
    except KeyStoreError as exc:
        on_exit(server)
        raise SystemExit(f"error: {exc}")
    fold_dead_files_safely(directory, catalogue())


def post_fork(server, worker):
    """A worker ends when its master dies, even by kill -9: otherwise it keeps serving its
    keep-alive clients and holding the port, and a supervisor's immediate restart finds it in
    use. Linux kills the worker when its parent goes (SIGKILL: certain and at once; what it
    counted is in its store file already, folded in by the next start)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != server.pid:          # the master went between the fork and prctl
        os._exit(0)


def child_exit(server, worker):
    """A worker ended (stopped, recycled or crashed): fold its file into the archive."""
    fold_dead_files_safely(os.environ["ATE_STATE_DIR"], catalogue())


def on_exit(server):
    own = os.environ.pop(_OWN_DIR, None)
    if own:
        shutil.rmtree(own, ignore_errors=True)
