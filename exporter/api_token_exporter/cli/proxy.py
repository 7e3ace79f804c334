"""`api-token-exporter proxy`: the proxy with its pool of upstream credentials, under gunicorn."""
from __future__ import annotations

import os
import sys

from .common import settings_env


def register(sub) -> None:
    proxy = sub.add_parser("proxy", help="a proxy in front of an upstream API with a pool of upstream credentials",
                           description="Clients call the upstream through this proxy with their API keys of this "
                                       "project (auth, rate limits, metrics as the middleware); the proxy sends one "
                                       "of the pool's upstream credentials instead, moving to the next when one runs "
                                       "low, and watches each (docs/proxy.md).")
    proxy.add_argument("--upstream-pool-file", "--pool", dest="pool",
                       help="the pool file: upstream credentials (upstream_pool_file)")
    proxy.add_argument("--upstream-url", "--upstream", dest="upstream",
                       help="the upstream's base URL, over the pool file's (upstream_url)")
    proxy.add_argument("--host", default="127.0.0.1")
    proxy.add_argument("--port", type=int, default=8088)
    proxy.add_argument("--workers", type=int, default=2, help="gunicorn worker processes (default 2)")
    proxy.add_argument("--threads", type=int, default=16,
                       help="threads per worker (default 16): a streamed answer holds one for its length")
    proxy.add_argument("--state-dir", help="keep counters here so they survive restarts ($ATE_STATE_DIR)")
    proxy.add_argument("--config", help="YAML settings file (see docs/configuration.md)")
    proxy.add_argument("--keys-file", help="the API keys of the proxy's clients")
    proxy.add_argument("--storage-uri", help="rate-limit storage: memory:// or redis://host:port/db")
    proxy.set_defaults(func=run)


def run(args) -> int:
    from ..core.config import ConfigError, load_settings
    from ..proxy.pool import load_pool
    from ..web.server import run_gunicorn
    env = settings_env(args)
    if args.pool:
        env["ATE_UPSTREAM_POOL_FILE"] = os.path.abspath(args.pool)
    if args.upstream:
        env["ATE_UPSTREAM_URL"] = args.upstream
    os.environ.update(env)
    try:
        settings = load_settings()
        if not settings.upstream_pool_file:
            raise ConfigError("the proxy needs a pool file: --upstream-pool-file FILE (upstream_pool_file, ATE_UPSTREAM_POOL_FILE)")
        pool = load_pool(settings.upstream_pool_file, upstream=settings.upstream_url)   # errors now, named
        if settings.metrics_port is not None and args.workers > 1:
            raise ConfigError(f"metrics_port cannot be served by {args.workers} workers; scrape the metrics path "
                              "on --port instead, or run one worker")
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"api-token-exporter proxy on http://{args.host}:{args.port} -> {pool.upstream} with "
          f"{len(pool.credentials)} credential(s) ({', '.join(c.id for c in pool.credentials)}); "
          f"{args.workers} worker(s), {args.threads} thread(s) each", file=sys.stderr, flush=True)
    # a streamed answer may take as long as the upstream's read timeout between chunks
    return run_gunicorn("api_token_exporter.proxy.app:app_from_env()", args.host, args.port, args.workers,
                        max(2, args.threads), timeout=int(settings.upstream_read_timeout) + 30)
