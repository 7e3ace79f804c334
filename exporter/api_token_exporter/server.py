"""The exporter service (`api-token-exporter serve`): /metrics, /healthz, the ingest endpoint
and /admin/*, with no API of its own. ``app_from_env()`` is the factory gunicorn loads."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

from .middleware import TokenAnalytics


def create_app(**settings) -> TokenAnalytics:
    return TokenAnalytics(None, **settings)


def app_from_env():
    """Settings from ATE_CONFIG and ATE_* variables (see docs/configuration.md)."""
    return create_app()


def run_gunicorn(factory: str, host: str, port: int, workers: int, env_overrides: dict) -> int:
    """Run ``factory`` under gunicorn, every worker writing its metrics to a shared directory.

    The directory (PROMETHEUS_MULTIPROC_DIR) is set in gunicorn's environment, emptied on start
    by gunicorn_conf and, when this function made it, removed on exit.
    """
    env = dict(os.environ)
    env.update({k: str(v) for k, v in env_overrides.items() if v is not None})
    own_dir = None
    if not env.get("PROMETHEUS_MULTIPROC_DIR"):
        own_dir = tempfile.mkdtemp(prefix="ate-metrics-")
        env["PROMETHEUS_MULTIPROC_DIR"] = own_dir
    cmd = [sys.executable, "-m", "gunicorn", "--workers", str(workers),
           "--bind", f"{host}:{port}", "--config", "python:api_token_exporter.gunicorn_conf",
           factory]
    try:
        return subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        return 130
    finally:
        if own_dir:
            shutil.rmtree(own_dir, ignore_errors=True)
