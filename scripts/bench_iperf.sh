#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
#
# Bulk TCP throughput (iperf3, TSO/GSO on) in the netns lab, three paths in the same run,
# alternating, REPS times each; prints medians and ratios. A benchmark: it asserts nothing.
#
#   c1 ──► 198.18.0.21:5201                      direct
#   c1 ──► 198.18.0.2:20000 (lbnat)   ──► b1:5201
#   c1 ──► 198.18.0.2:20001 (HAProxy, mode tcp, nbthread = cores) ──► b1:5201
#
# Usage: scripts/bench_iperf.sh [SECONDS per run, default 5] [REPS, default 3] [JSON out file]
set -euo pipefail
cd "$(dirname "$0")/.."

SECS="${1:-5}"
REPS="${2:-3}"
OUT="${3:-}"
export LAB_PREFIX="${LAB_PREFIX:-lbb$$}"
P="$LAB_PREFIX"
work=$(mktemp -d /tmp/lbnat-bench.XXXXXX)
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

trap cleanup_lab EXIT
trap 'exit 130' INT TERM

[ "$(id -u)" -eq 0 ] || { echo "bench: run as root" >&2; exit 1; }
for tool in iperf3 haproxy ethtool; do
	command -v "$tool" >/dev/null || { echo "bench: $tool is missing (make deps)" >&2; exit 1; }
done

scripts/lab.sh up >/dev/null
ip netns exec "$P-b1" iperf3 -s -p 5201 >"$work/iperf3.log" 2>&1 &
pids+=("$!")

# --no-health: iperf3's server takes a health probe's connect for a test client and then
# refuses the real test ("the server is busy"); HAProxy runs without checks here too.
ip netns exec "$P-lb" lbnat run 198.18.0.2 198.18.0.21 5201 --port 20000 --quiet --no-health \
	>"$work/lbnat.log" 2>&1 &
pids+=("$!")

cat >"$work/haproxy.cfg" <<EOF
global
    nbthread $(nproc)

defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend bench
    bind 198.18.0.2:20001
    default_backend b1
backend b1
    server b1 198.18.0.21:5201
EOF
ip netns exec "$P-lb" haproxy -db -f "$work/haproxy.cfg" >"$work/haproxy.log" 2>&1 &
pids+=("$!")

for _ in $(seq 50); do
	ip netns exec "$P-lb" ss -ltn | grep ":20001" >/dev/null && grep -q "srcIP" "$work/lbnat.log" && break
	sleep 0.1
done
sleep 1

tso=$(ip netns exec "$P-lb" ethtool -k eth0 | awk -F': ' '/tcp-segmentation-offload/ {print $2}')
echo "bench: iperf3 ${SECS}s x ${REPS} per path; LB eth0 TSO: $tso; kernel $(uname -r); $(nproc) cores"

run() {  # run NAME HOST PORT: one iperf3 run (one retry), prints Gbit/s (receiver side)
	local try
	for try in 1 2; do
		if ip netns exec "$P-c1" iperf3 -c "$2" -p "$3" -t "$SECS" -J >"$work/$1.json" 2>&1 &&
			python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["end"]["sum_received"]["bits_per_second"]/1e9)' \
				"$work/$1.json" 2>/dev/null; then
			return 0
		fi
		sleep 1
	done
	echo "bench: iperf3 through $1 failed:" >&2
	cat "$work/$1.json" "$work/haproxy.log" >&2
	exit 1
}

declare -A results
for rep in $(seq "$REPS"); do
	for path in direct lbnat haproxy; do
		case $path in
		direct) gbps=$(run direct 198.18.0.21 5201) ;;
		lbnat) gbps=$(run lbnat 198.18.0.2 20000) ;;
		haproxy) gbps=$(run haproxy 198.18.0.2 20001) ;;
		esac
		printf '  rep %s %-8s %6.2f Gbit/s\n' "$rep" "$path" "$gbps"
		results[$path]="${results[$path]:-} $gbps"
	done
done

python3 - "$OUT" "${results[direct]}" "${results[lbnat]}" "${results[haproxy]}" "$tso" <<'EOF'
import json, platform, statistics, sys
out, direct, lbnat, haproxy, tso = sys.argv[1:6]
runs = {name: [float(x) for x in values.split()] for name, values in
        (("direct", direct), ("lbnat", lbnat), ("haproxy", haproxy))}
med = {name: statistics.median(v) for name, v in runs.items()}
print(f"\n| path    | median Gbit/s | x direct | x HAProxy |")
print(f"|---------|--------------:|---------:|----------:|")
for name in ("direct", "lbnat", "haproxy"):
    print(f"| {name:7} | {med[name]:13.2f} | {med[name]/med['direct']:8.2f} | {med[name]/med['haproxy']:9.2f} |")
if out:
    with open(out, "w") as f:
        json.dump({"runs_gbps": runs, "median_gbps": med, "tso": tso,
                   "kernel": platform.release(), "python": platform.python_version()}, f, indent=2)
EOF
