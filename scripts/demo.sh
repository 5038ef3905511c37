#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
#
# The C++ guideline's demo, in network namespaces (scripts/lab.sh draws the topology):
#
#   c1: test1 test3 test5 ─┐                       ┌─ b1 chat server :9000
#                          ├─ br0 ── lb: lbnat ────┼─ b2 chat server :9000
#   c2: test2 test4 test6 ─┘    198.18.0.2:20000   └─ b3 chat server :9000
#
# 1. bring the lab up, start three chat servers and `loadbalancerLobin` in the LB namespace;
# 2. connect six chat clients test1..test6 in order; round-robin puts (1,4) (2,5) (3,6) on the
#    same server, and each client's line reaches only the clients of its server;
# 3. show the NAT table (kill -USR1), quit the clients one by one and watch
#    "Current NAT table length" drain to 0; tear everything down (also on Ctrl-C or error).
set -euo pipefail
cd "$(dirname "$0")/.."

export LAB_PREFIX="${LAB_PREFIX:-lbnat}"
P="$LAB_PREFIX"
LB_IP=198.18.0.2
VIP_PORT=20000
work=$(mktemp -d /tmp/lbnat-demo.XXXXXX)
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
lbnat_pid=""

cleanup() {
	set +e
	for fd in "${fds[@]:-}"; do [ -n "$fd" ] && exec {fd}>&-; done 2>/dev/null
	[ -n "$lbnat_pid" ] && kill -TERM "$lbnat_pid" 2>/dev/null && wait "$lbnat_pid" 2>/dev/null
	stop_pids
	scripts/lab.sh down >/dev/null
	rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ "$(id -u)" -ne 0 ]; then
	echo "demo: run as root (sudo make demo): lbnat opens a packet socket" >&2
	exit 1
fi

say "lab up"
scripts/lab.sh up
scripts/lab.sh status

say "three chat servers on b1 b2 b3, port 9000"
start_chat_servers

say "sudo loadbalancerLobin $LB_IP 198.18.0.21 9000 198.18.0.22 9000 198.18.0.23 9000"
ip netns exec "$P-lb" loadbalancerLobin $LB_IP 198.18.0.21 9000 198.18.0.22 9000 198.18.0.23 9000 \
	>"$work/lbnat.log" 2>&1 &
lbnat_pid=$!
wait_for "$work/lbnat.log" "Server is alive" 15
sed 's/^/  [lbnat] /' "$work/lbnat.log"

say "six clients connect in order"
fds=()
for i in 1 2 3 4 5 6; do
	host=c$(((i - 1) % 2 + 1))
	mkfifo "$work/test$i.in"
	ip netns exec "$P-$host" python3 -m lbnat_lab.chat client $LB_IP $VIP_PORT "test$i" \
		<"$work/test$i.in" >"$work/test$i.out" 2>&1 &
	pids+=("$!")
	exec {fd}>"$work/test$i.in"
	fds+=("$fd")
	wait_for "$work/test$i.out" "connected to" 10
	printf '  test%s (from %s) -> %s\n' "$i" "$host" "$(head -n 1 "$work/test$i.out")"
done

say "who landed where"
for b in 1 2 3; do
	members=$(grep -l "connected to b$b" "$work"/test*.out | xargs -n1 basename | sed 's/.out//' | tr '\n' ' ')
	printf '  b%s: %s\n' "$b" "$members"
done

say "each client says hello; lines reach only the clients of the same server"
for i in 1 2 3 4 5 6; do
	echo "hello from test$i" >&"${fds[$((i - 1))]}"
	sleep 0.2
done
sleep 0.5
for i in 1 2 3 4 5 6; do
	printf '  test%s saw: %s\n' "$i" "$(grep '^\[' "$work/test$i.out" | tr '\n' ' ')"
done

say "the NAT table (kill -USR1 lbnat)"
kill -USR1 "$lbnat_pid"
wait_for "$work/lbnat.log" "NAT table :" 5
sleep 0.3
sed -n '/NAT table :/,$p' "$work/lbnat.log" | grep -E "NAT table|client " | grep -v terminated | sed 's/^/  [lbnat] /'

say "clients quit one by one; the table drains"
for i in 1 2 3 4 5 6; do
	echo q >&"${fds[$((i - 1))]}"
	wait_for "$work/lbnat.log" "Current NAT table length : $((6 - i))" 10
	grep -E "terminated|Current NAT table length : $((6 - i))$" "$work/lbnat.log" | tail -n 2 | sed 's/^/  [lbnat] /'
done

say "done: tearing the lab down"
