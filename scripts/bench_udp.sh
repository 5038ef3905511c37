#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
#
# UDP packets per second and loss (iperf3 -u, 64-byte payloads) in the netns lab, three paths
# in the same run at each offered rate: direct, lbnat, and nginx's stream module (UDP). A
# benchmark: it asserts nothing. iperf3's control connection is TCP on the same port, so lbnat
# runs a TCP and a UDP service on 5201 and nginx listens on both too.
#
#   c1 ──► 198.18.0.21:5201                        direct
#   c1 ──► 198.18.0.2:5201  (lbnat, tcp + udp)  ──► b1:5201
#   c1 ──► 198.18.0.2:5202  (nginx stream, tcp + udp) ──► b1:5201
#
# Usage: scripts/bench_udp.sh [SECONDS per run, default 4] [RATES in packets/s, default
#        "20000 50000 100000 200000"] [JSON out file]
set -euo pipefail
cd "$(dirname "$0")/.."

SECS="${1:-4}"
RATES="${2:-20000 50000 100000 200000}"
OUT="${3:-}"
PAYLOAD=64
export LAB_PREFIX="${LAB_PREFIX:-lbu$$}"
P="$LAB_PREFIX"
work=$(mktemp -d /tmp/lbnat-bench-udp.XXXXXX)
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

trap cleanup_lab EXIT
trap 'exit 130' INT TERM

[ "$(id -u)" -eq 0 ] || { echo "bench: run as root" >&2; exit 1; }
for tool in iperf3 nginx; do
	command -v "$tool" >/dev/null || { echo "bench: $tool is missing (make deps)" >&2; exit 1; }
done
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || { echo "bench: nginx stream module missing (make deps)" >&2; exit 1; }

scripts/lab.sh up >/dev/null
ip netns exec "$P-b1" iperf3 -s -p 5201 >"$work/iperf3.log" 2>&1 &
pids+=("$!")

cat >"$work/lbnat.json" <<EOF2
{"lb_ip": "198.18.0.2", "log": {"quiet": true},
 "services": [
  {"name": "tcp", "protocol": "tcp", "port": 5201, "health": {"enabled": false},
   "backends": [{"ip": "198.18.0.21", "port": 5201}]},
  {"name": "udp", "protocol": "udp", "port": 5201, "health": {"enabled": false},
   "backends": [{"ip": "198.18.0.21", "port": 5201}]}]}
EOF2
ip netns exec "$P-lb" lbnat run --config "$work/lbnat.json" --admin-socket "$work/admin.sock" \
	>"$work/lbnat.log" 2>&1 &
pids+=("$!")

mkdir -p "$work/nginx"
cat >"$work/nginx/nginx.conf" <<EOF2
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
user root;
worker_processes $(nproc);
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log;
events { worker_connections 4096; }
stream {
    server { listen 198.18.0.2:5202; proxy_pass 198.18.0.21:5201; }
    server { listen 198.18.0.2:5202 udp reuseport; proxy_pass 198.18.0.21:5201; proxy_timeout 10s; }
}
EOF2
ip netns exec "$P-lb" nginx -p "$work/nginx" -e "$work/nginx/error.log" -c "$work/nginx/nginx.conf" \
	-g 'daemon off;' >"$work/nginx.out" 2>&1 &
pids+=("$!")

for _ in $(seq 50); do
	ip netns exec "$P-lb" ss -ltn | grep ":5202" >/dev/null && grep -q "srcIP" "$work/lbnat.log" && break
	sleep 0.1
done
sleep 0.5
echo "bench: iperf3 -u ${SECS}s, ${PAYLOAD}-byte payloads, rates: $RATES packets/s; kernel $(uname -r); $(nproc) cores"

run() {  # run NAME HOST PORT RATE: one iperf3 UDP run (one retry), prints "pps lost_percent"
	local try bits=$(($4 * PAYLOAD * 8))
	for try in 1 2; do
		if ip netns exec "$P-c1" iperf3 -c "$2" -p "$3" -u -l "$PAYLOAD" -b "$bits" -t "$SECS" -J \
			>"$work/$1.json" 2>&1 &&
			python3 -c '
import json, sys
end = json.load(open(sys.argv[1]))["end"]["sum"]
print(end["packets"] / end["seconds"] * (1 - end["lost_percent"] / 100), end["lost_percent"])' \
				"$work/$1.json" 2>/dev/null; then
			return 0
		fi
		sleep 1
	done
	echo "bench: iperf3 through $1 failed:" >&2
	cat "$work/$1.json" >&2
	exit 1
}

results="$work/results.txt"
: >"$results"
for rate in $RATES; do
	for path in direct lbnat nginx; do
		case $path in
		direct) r=$(run direct 198.18.0.21 5201 "$rate") ;;
		lbnat) r=$(run lbnat 198.18.0.2 5201 "$rate") ;;
		nginx) r=$(run nginx 198.18.0.2 5202 "$rate") ;;
		esac
		echo "$rate $path $r" >>"$results"
		printf '  offered %7s pps  %-6s  delivered %9.0f pps  loss %6.2f %%\n' "$rate" "$path" $r
	done
done

python3 - "$results" "$OUT" <<'EOF2'
import json, platform, sys
rows = [line.split() for line in open(sys.argv[1])]
table = {}
for rate, path, pps, loss in rows:
    table.setdefault(int(rate), {})[path] = {"pps": float(pps), "loss_percent": float(loss)}
print("\n| offered pps | direct pps (loss) | lbnat pps (loss) | nginx stream pps (loss) |")
print("|---:|---:|---:|---:|")
for rate, paths in sorted(table.items()):
    cells = [f"{paths[p]['pps']:.0f} ({paths[p]['loss_percent']:.2f} %)" for p in ("direct", "lbnat", "nginx")]
    print(f"| {rate} | " + " | ".join(cells) + " |")
if sys.argv[2]:
    with open(sys.argv[2], "w") as f:
        json.dump({"payload_bytes": 64, "results": table, "kernel": platform.release()}, f, indent=2)
EOF2
