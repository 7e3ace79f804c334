"""The dev stack: the demo API and its traffic, a fake upstream for the proxy, notification
sinks, a local Prometheus and Alertmanager runner and synthetic history. Used by `make demo`
(``python -m devstack demo``), the tests and the benchmarks from a checkout; not in the wheel."""
