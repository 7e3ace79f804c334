# The two commands a new user needs (see README):
#   make demo   run the demo API, its traffic generator and the exporter
#   make test   install what the tests need and run them all
PYTHON ?= python3

.PHONY: install test demo bench rules report dashboards

install:
	bash .ci/install

test: install
	$(PYTHON) -m pytest

demo:
	$(PYTHON) -m pip install -q --disable-pip-version-check -e .
	api-token-exporter demo

bench:
	$(PYTHON) benchmarks/bench_middleware.py --rounds 21
	$(PYTHON) benchmarks/bench_instructions.py
	$(PYTHON) benchmarks/bench_scrape.py
	$(PYTHON) benchmarks/bench_ratelimit.py
	$(PYTHON) benchmarks/bench_load.py

dashboards:
	api-token-exporter dashboards

rules:
	api-token-exporter rules
	promtool check rules prometheus/rules/*.yml
	promtool test rules prometheus/tests/*.yml

# the LLM token report: the last 30 days from Prometheus (PROMETHEUS_URL to change)
report:
	api-token-exporter report --days 30 --format table $(if $(PROMETHEUS_URL),--prometheus-url $(PROMETHEUS_URL))
