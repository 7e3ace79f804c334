"""The exporter service (`api-token-exporter serve`): /metrics, /healthz, the ingest endpoint,
/admin/* and the analytics API, with no API of its own, always served by gunicorn (never a
development server). ``app_from_env()`` is the factory each worker loads."""
from __future__ import annotations

import sys
from typing import Optional

from .wsgi import TokenAnalytics


def create_app(**settings) -> TokenAnalytics:
    app = TokenAnalytics(None, **settings)
    if app.settings.digest_schedule != "off":      # scheduled usage digests (digest_schedule.py)
        from ..analytics.digest_schedule import start_scheduler
        app.digest_scheduler = start_scheduler(app.settings, app.keystore)
    return app


def app_from_env():
    """Settings from ATE_CONFIG and ATE_* variables (see docs/configuration.md)."""
    return create_app()


def run_gunicorn(factory: str, host: str, port: int, workers: int = 1, threads: int = 4,
                 timeout: Optional[int] = None) -> int:
    """Run ``factory`` ("module:callable()") under gunicorn in this process, which becomes its
    master: SIGTERM or SIGINT stops every worker and frees the port. Settings come from the
    environment (ATE_*), which the caller has set."""
    from ..core.config import optional_import
    optional_import("gunicorn", "server", "api-token-exporter serve")
    optional_import("uvicorn_worker", "server", "api-token-exporter serve")
    from gunicorn.app.base import BaseApplication
    from gunicorn.util import import_app

    from . import gunicorn_conf
    from .drain import DrainingArbiter

    class Server(BaseApplication):
        def load_config(self):
            options = {"bind": f"{host}:{port}", "workers": workers, "threads": threads,
                       "worker_class": gunicorn_conf.worker_class,
                       "on_starting": gunicorn_conf.on_starting, "post_fork": gunicorn_conf.post_fork,
                       "child_exit": gunicorn_conf.child_exit, "on_exit": gunicorn_conf.on_exit}
            if timeout:
                options["timeout"] = timeout
            for name, value in options.items():
                self.cfg.set(name, value)

        def load(self):
            return import_app(factory)

        def run(self):
            try:
                DrainingArbiter(self).run()
            except RuntimeError as exc:
                raise SystemExit(f"error: {exc}")

    try:
        Server().run()
    except SystemExit as exc:
        if isinstance(exc.code, str):           # a refusal from on_starting, already worded
            print(exc.code, file=sys.stderr)
            return 2
        return exc.code or 0
    return 0
