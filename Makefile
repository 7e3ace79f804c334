# The two commands a new user needs (see README):
#   make demo   run the demo API, its traffic generator and the exporter
#   make test   install what the tests need and run them all
PYTHON ?= python3

.PHONY: install test demo bench rules

install:
	bash .ci/install

test: install
	$(PYTHON) -m pytest

demo:
	$(PYTHON) -m pip install -q --disable-pip-version-check -e .
	api-token-exporter demo

bench:
	$(PYTHON) benchmarks/bench_middleware.py

rules:
	api-token-exporter rules
	promtool check rules prometheus/rules/*.yml
	promtool test rules prometheus/tests/*.yml
