# lbnat: the two commands that matter are `make demo` and `make test` (see README.md).
PYTHON ?= python3
PYTEST ?= $(PYTHON) -m pytest

.PHONY: deps demo test lint unit netns bench-core bench clean-lab

deps:  ## Debian tools + the project with its test extras
	scripts/install-deps.sh

demo: deps  ## the netns lab: three chat servers, lbnat, six clients, the NAT table draining
	scripts/demo.sh

lint:
	ruff check .
	mypy

unit:
	$(PYTEST) -q tests/unit

netns:
	$(PYTEST) -q -ra tests/integration

test: lint  ## lint, unit tests and netns integration tests (root), in one pytest run
	$(PYTEST) -ra tests

bench-core:  ## engine cost per packet at 1 and 1,000,000 rows, memory per session
	$(PYTHON) scripts/bench_engine.py

bench:  ## iperf3 through direct, lbnat and HAProxy in the netns lab, same run
	scripts/bench_iperf.sh

clean-lab:  ## remove the demo lab if a run was interrupted
	LAB_PREFIX=lbnat scripts/lab.sh down
