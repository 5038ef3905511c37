#!/usr/bin/env bash
# Install what lbnat, its lab, its tests and its benchmarks need on a fresh Debian machine:
# the Debian tools (nft, ip, ping, ethtool, iperf3, socat, curl, nginx, haproxy, tcpdump, wrk, tmux,
# cairo and the DejaVu fonts for the screenshots, clang + libbpf-dev + bpftool for the tc eBPF fast
# path that `make bpf` builds, prometheus + promtool for the metrics test, keepalived for the HA pair, bird2 and exabgp
# for scale-out behind an ECMP router) and the project itself with its test and docs
# extras. (Debian's own python3 refuses `pip install` outside a venv, PEP 668: there, make a venv
# first, `python3 -m venv /opt/lbnat && . /opt/lbnat/bin/activate`, as provision-lb.sh does.) Idempotent; skips apt when every tool is present.
set -euo pipefail
cd "$(dirname "$0")/.."

# keepalived: VRRP for the HA pair (scripts/keepalived/, make demo-ha); policy-rc.d below keeps
# its packaged service from starting
# bird2 + exabgp: BGP for scale-out behind an ECMP router (BIRD the router, ExaBGP each
# instance's speaker; scripts/bird/, scripts/exabgp/, make demo-ecmp); policy-rc.d below keeps
# their packaged services from starting (the package enables exabgp.service)
packages=(nftables iproute2 iputils-ping ethtool iperf3 socat curl nginx-light libnginx-mod-stream haproxy tcpdump procps wrk tmux libcairo2 fonts-dejavu-core clang libbpf-dev bpftool prometheus keepalived bird2 exabgp)
tools=(nft ip ping ethtool iperf3 socat curl nginx haproxy tcpdump ps wrk tmux clang bpftool prometheus promtool keepalived bird exabgp)

missing=0
for tool in "${tools[@]}"; do
	command -v "$tool" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$tool" >/dev/null 2>&1 || missing=1
done
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || missing=1  # nginx's stream proxy (benchmarks)
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf ] || missing=1  # the screenshots' font
PATH="$PATH:/usr/sbin:/sbin" ldconfig -p 2>/dev/null | grep -q libcairo.so.2 || missing=1  # cairosvg
[ -e /usr/include/bpf/bpf_helpers.h ] || missing=1  # libbpf-dev: build-bpf.sh's headers
PATH="$PATH:/usr/sbin:/sbin" ldconfig -p 2>/dev/null | grep -q libbpf.so.1 || missing=1  # lbnat.dataplane.tcbpf loads it
if [ "$missing" = 1 ] || [ "${LBNAT_FORCE_APT:-0}" = 1 ]; then
	if [ "$(id -u)" -ne 0 ]; then
		echo "install-deps: run as root (apt-get needs it)" >&2
		exit 1
	fi
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -q
	# policy-rc.d 101: do not start nginx/haproxy/keepalived/bird/exabgp as host services; the lab
	# starts its own.
	printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
	apt-get install -y -q --no-install-recommends "${packages[@]}"
	rm -f /usr/sbin/policy-rc.d
fi

python3 -m pip install -q -e '.[test,docs]'
