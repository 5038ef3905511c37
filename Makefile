# lbnat: the two commands that matter are `make demo` and `make test` (see README.md).
PYTHON ?= python3
PYTEST ?= $(PYTHON) -m pytest

.PHONY: deps bpf demo demo6 demo-ha demo-ecmp test lint unit netns faults soak bench-core bench bench-quick screenshots dashboard config-reference clean-lab lab-compose-check lab-vagrant-check

deps:  ## Debian tools + the project with its test extras (+ the eBPF fast path's object)
	scripts/install-deps.sh
	scripts/build-bpf.sh

bpf:  ## the tc eBPF fast path: lbnat/bpf/fastpath.bpf.c -> fastpath.bpf.o (clang, libbpf-dev)
	scripts/build-bpf.sh

demo: deps  ## the netns lab: three chat servers, lbnat, six clients, the NAT table draining
	scripts/demo.sh

demo6: deps  ## the chat demo over IPv6 in the dual-stack netns lab: IPv6 clients, IPv6 backends, and NAT64 to an IPv4 one
	scripts/demo6.sh

demo-ha: deps  ## the HA pair in the netns lab: keepalived moves the VIP, the flows carry on
	scripts/demo-ha.sh

demo-ecmp: deps  ## scale-out in the netns lab: 3 lbnat instances behind an ECMP router (BGP: ExaBGP, BIRD)
	scripts/demo-ecmp.sh

lint:
	ruff check .
	mypy

unit:
	$(PYTEST) -q tests/unit

netns:
	$(PYTEST) -q -ra tests/integration

test: lint bpf  ## lint, unit tests and netns integration tests (root), in one pytest run
	$(PYTEST) -ra tests

faults:  ## the fault suite at full size (root; netns): flaps, kills, loss, floods; docs/reliability.md
	LBNAT_FAULTS=full $(PYTEST) -ra tests/faults

soak:  ## 10 minutes of mixed traffic through lbnat, RSS sampled every 10 s (root; netns)
	$(PYTHON) -m lbnat_lab.soak --minutes 10

bench-core:  ## engine only: cost per packet and memory per session with 1,000,000 rows
	$(PYTHON) -m lbnat_bench.scale --rows 1000000 --tracemalloc

bench: deps  ## direct, lbnat (4 variants), HAProxy, nginx stream, nftables side by side, the IPv6 rows (direct, lbnat, HAProxy, NAT64), then 1-3 lbnat instances behind ECMP (~18 min); docs/benchmarks/
	$(PYTHON) -m lbnat_bench $(BENCH_ARGS)

bench-quick: deps  ## the same, one short repetition (about two minutes), into /tmp/lbnat-bench
	$(PYTHON) -m lbnat_bench --quick --out /tmp/lbnat-bench

screenshots: deps  ## the README's PNGs from real runs in a netns lab (about 15 s); docs/screenshots/
	$(PYTHON) scripts/screenshots.py --out docs/screenshots

dashboard:  ## the Grafana dashboard's panels drawn from a real Prometheus over a lab run (~2 min); docs/screenshots/dashboard.png
	$(PYTHON) -m lbnat_lab.dashboard --out docs/screenshots/dashboard.png

config-reference:  ## rewrite the README's configuration reference from lbnat/config.schema.json
	$(PYTHON) scripts/schema_doc.py --write

clean-lab:  ## remove the demo labs if a run was interrupted
	LAB_PREFIX=lbnat scripts/lab.sh down
	LAB_PREFIX=lbnat6 scripts/lab.sh down
	LAB_PREFIX=lbha scripts/ha-lab.sh down
	LAB_PREFIX=lbecmp scripts/ecmp-lab.sh down

lab-compose-check:  ## the compose lab end to end (root; starts a private dockerd if none answers)
	$(PYTHON) -m lbnat_lab.compose_check $(ARGS)

lab-vagrant-check:  ## the Vagrant lab on libvirt end to end (root; about 26 min under emulation here)
	$(PYTHON) -m lbnat_lab.vagrant_check $(ARGS)
