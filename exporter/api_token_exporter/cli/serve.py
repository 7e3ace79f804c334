"""`api-token-exporter serve`: the exporter service under gunicorn."""
from __future__ import annotations

import os
import sys

from .common import settings_env


def register(sub) -> None:
    serve = sub.add_parser("serve", help="run the exporter service (/metrics, ingest, admin)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=9464)
    serve.add_argument("--workers", type=int, default=1, help="gunicorn worker processes (default 1)")
    serve.add_argument("--threads", type=int, default=8,
                       help="threads per worker that run the app (default 8); requests are read on an event loop")
    serve.add_argument("--state-dir", help="keep counters here so they survive restarts ($ATE_STATE_DIR)")
    serve.add_argument("--config", help="YAML settings file (see docs/configuration.md)")
    serve.add_argument("--keys-file")
    serve.add_argument("--storage-uri", help="rate-limit storage: memory:// or redis://host:port/db")
    serve.set_defaults(func=run)


def run(args) -> int:
    from ..core.config import ConfigError, load_settings
    from ..web.server import run_gunicorn
    os.environ.update(settings_env(args))
    try:
        settings = load_settings()
        if settings.metrics_port is not None and args.workers > 1:
            raise ConfigError(f"metrics_port {settings.metrics_port} cannot be served by {args.workers} "
                              "workers; scrape the metrics path on --port instead (any worker answers "
                              "with the sum of all of them), or run one worker")
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"api-token-exporter on http://{args.host}:{args.port}  "
          f"(/metrics, /healthz{', /v1/events' if settings.ingest_token else ''}"
          f"{', /admin/stats' if settings.admin_token else ''}); {args.workers} worker(s), "
          f"{args.threads} thread(s) each; counters "
          f"{'kept in ' + settings.state_dir if settings.state_dir else 'start at 0 (no state_dir)'}",
          file=sys.stderr, flush=True)
    return run_gunicorn("api_token_exporter.web.server:app_from_env()", args.host, args.port,
                        args.workers, args.threads)
