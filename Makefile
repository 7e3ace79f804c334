# The two commands a new user needs (see README):
#   make demo   run the demo API, its traffic generator and the exporter
#   make test   install what the tests need and run them all
#
# Both work in a project virtual environment (.venv), made with Debian's own /usr/bin/python3
# where there is one (it refuses `pip install` outside a venv, PEP 668) or any python3 else.
PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || command -v python3)
VENV ?= .venv
VPY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install test test-fast demo bench bench-memory rules report dashboards analytics-migrate analytics-seed analytics-report prices

install:
	PYTHON=$(PYTHON) VENV=$(VENV) bash .ci/install

# two workers, a test file each (its module fixtures start once): most of a test's time is
# spent waiting for Prometheus, Alertmanager or a browser, not computing
test: install
	$(VPY) -m pytest -n 2 --dist loadfile --durations=25

# every test that starts no server and no browser (their fixtures declare it: tests/support.py
# needs); one that starts one all the same fails, named. Under a minute.
FAST_TESTS := not (needs_redis or needs_prometheus or needs_alertmanager or needs_postgres or needs_server or needs_browser or needs_slow)
test-fast: install
	ATE_FAST_TESTS=1 $(VPY) -m pytest -q -n 2 -m "$(FAST_TESTS)"

demo:
	PYTHON=$(PYTHON) VENV=$(VENV) PACKAGE_ONLY=1 bash .ci/install
	$(VPY) -m devstack demo

bench:
	$(VPY) benchmarks/bench_middleware.py --rounds 21
	$(VPY) benchmarks/bench_asgi.py --rounds 21
	$(VPY) benchmarks/bench_instructions.py
	$(VPY) benchmarks/bench_scrape.py
	$(VPY) benchmarks/bench_ratelimit.py
	$(VPY) benchmarks/bench_load.py
	$(VPY) benchmarks/bench_throughput.py
	$(VPY) benchmarks/bench_import.py
	$(VPY) benchmarks/bench_geo.py
	$(VPY) benchmarks/bench_proxy.py
	$(VPY) benchmarks/bench_slow_clients.py

# Prometheus series and memory of the per-token metrics (benchmarks/bench_series_memory.py), the
# revision OLD (a temporary git worktree) against the working tree; minutes, so not in bench or
# test, about 70 minutes at the rules' shipped intervals: [OLD=c980e1f] [TOKENS=10000] [LLM_MODELS=0|2]
# [ARGS="..." instead of the default: --history, a day of the recorded series and the raw
# counters at the rules' offsets backfilled; --settle-timeout 900, as the former layout's rules
# take minutes to evaluate once over that history]
bench-memory:
	@tmp=$$(mktemp -d) && trap 'git worktree remove --force "$$tmp/old" >/dev/null 2>&1; rm -rf "$$tmp"; git worktree prune' EXIT && \
	trap 'exit 130' INT TERM && \
	git worktree add --detach -q "$$tmp/old" $(or $(OLD),c980e1f) && \
	$(VPY) benchmarks/bench_series_memory.py --compare "$$tmp/old" . --tokens $(or $(TOKENS),10000) \
		--llm-models $(or $(LLM_MODELS),0) $(or $(ARGS),--history --settle-timeout 900)

dashboards:
	api-token-exporter dashboards

rules:
	api-token-exporter rules
	cp docs/runbooks.md exporter/api_token_exporter/mixin/runbooks.md   # served at the exporter's /runbooks
	cp prometheus/thresholds.yml exporter/api_token_exporter/mixin/thresholds.yml   # the packaged defaults
	cp alertmanager/templates/apitoken.tmpl exporter/api_token_exporter/mixin/templates/
	promtool check rules prometheus/rules/*.yml
	promtool test rules prometheus/tests/*.yml

# the LLM token report: the last 30 days from Prometheus (PROMETHEUS_URL to change)
report:
	api-token-exporter report --days 30 --format table $(if $(PROMETHEUS_URL),--prometheus-url $(PROMETHEUS_URL))

# past usage into Prometheus (docs/history.md): SOURCE=usage.csv|DB URL [TABLE=api_usage] [UNTIL=...]
analytics-migrate:
	@test -n "$(SOURCE)" || { echo "usage: make analytics-migrate SOURCE=usage.csv [TABLE=api_usage] [UNTIL=2026-11-01T00:00:00Z] [PROMETHEUS_DATA=dir]"; exit 2; }
	api-token-exporter import $(SOURCE) $(if $(TABLE),--table $(TABLE)) $(if $(UNTIL),--until $(UNTIL)) $(if $(PROMETHEUS_DATA),--prometheus-data $(PROMETHEUS_DATA))

# synthetic history for the demo's keys (make demo does it by itself): [DAYS=30] [PROMETHEUS_DATA=dir] [PROMETHEUS_URL=url]
analytics-seed:
	$(VPY) -m devstack backfill --days $(or $(DAYS),30) $(if $(PROMETHEUS_DATA),--prometheus-data $(PROMETHEUS_DATA)) $(if $(PROMETHEUS_URL),--prometheus-url $(PROMETHEUS_URL))

analytics-report: report

# refresh the shipped LLM price snapshot from LiteLLM's price map: FROM=litellm-X.whl or .json
# (pip download litellm --no-deps -d /tmp/litellm); the diff shows what was repriced
prices:
	@test -n "$(FROM)" || { echo "usage: make prices FROM=litellm-1.110.2-...whl|model_prices_and_context_window.json"; exit 2; }
	$(VPY) -m api_token_exporter.cli prices update --from $(FROM) --output exporter/api_token_exporter/core/llm-prices.json
