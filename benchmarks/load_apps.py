"""WSGI factories for bench_load.py: the same route bare and behind the middleware."""
from flask import Flask, jsonify


def _app() -> Flask:
    app = Flask("load")

    @app.get("/api/v1/items/<int:item_id>")
    def item(item_id):
        return jsonify(id=item_id, name=f"item {item_id}")

    return app


def bare():
    return _app()


def instrumented():
    from api_token_exporter import TokenAnalytics    # settings from ATE_* variables
    app = _app()
    TokenAnalytics(app, metrics_public=True)
    return app


def pfe():
    """prometheus-flask-exporter as its documentation sets it up under gunicorn with several
    workers (multiprocess mode: PROMETHEUS_MULTIPROC_DIR)."""
    from prometheus_flask_exporter.multiprocess import GunicornPrometheusMetrics
    app = _app()
    GunicornPrometheusMetrics(app)
    return app
