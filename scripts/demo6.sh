#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
#
# The chat demo over IPv6 (issue 21), in the dual-stack netns lab (LAB_IPV6=1 scripts/lab.sh:
# every host also on fd18::/64):
#
#                                lb: lbnat, SRCIP 198.18.0.2, ip6 fd18::2
#   c1 fd18::11  alice (IPv6) ─┐  [fd18::2]:20000 ─────────────┬─ b1 [fd18::21]:9000  (IPv6)
#   c2 fd18::12  bob   (IPv6) ─┤                               └─ b2 [fd18::22]:9000  (IPv6)
#   c1 fd18::11  carol (IPv6) ─┤  [fd18::2]:20001    NAT64 ──┬─ b3 198.18.0.23:9000 (IPv4)
#   c2 198.18.0.12 dave (IPv4) ┘  198.18.0.2:20001   NAT44 ──┘
#
# 1. the dual-stack lab up; chat servers on b1 and b2 (IPv6 only) and b3 (IPv4 only);
# 2. lbnat with two services, each offered on SRCIP and on ip6: "chat6" (IPv6 backends) and
#    "chat64" (an IPv4 backend: an IPv6 client reaches it through NAT64, an IPv4 one as ever);
# 3. alice and bob (IPv6) land on b1 and b2; carol (IPv6, NAT64) and dave (IPv4) share b3's
#    chat, and b3 sees both as 198.18.0.2: it never knows carol came over IPv6;
# 4. `lbnat sessions` shows the IPv6 clients; the clients quit, the table drains; everything
#    is torn down (also on Ctrl-C or error).
set -euo pipefail
cd "$(dirname "$0")/.."

export LAB_PREFIX="${LAB_PREFIX:-lbnat6}" LAB_IPV6=1
P="$LAB_PREFIX"
LB_IP=198.18.0.2
LB_IP6=fd18::2
work=$(mktemp -d /tmp/lbnat-demo6.XXXXXX)
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
lbnat_pid=""

cleanup() {
	set +e
	close_fds
	stop_pid "$lbnat_pid"
	cleanup_lab scripts/lab.sh
}
trap cleanup EXIT
trap 'exit 130' INT TERM

need_root "sudo make demo6" "lbnat opens a packet socket"
find_lbnat

say "dual-stack lab up (LAB_IPV6=1: fd18::/64 beside 198.18.0.0/24)"
scripts/lab.sh up
scripts/lab.sh status

say "chat servers: b1 and b2 on IPv6 only, b3 on IPv4 only, port 9000"
for b in 1 2 3; do
	family=6
	[ "$b" != 3 ] || family=4
	ip netns exec "$P-b$b" python3 -m lbnat_lab.chat server --family "$family" --port 9000 \
		--name "b$b" >"$work/b$b.log" 2>&1 &
	pids+=("$!")
done
for b in 1 2 3; do
	wait_for "$work/b$b.log" "listening" 10
	sed 's/^/  [b'"$b"'] /' "$work/b$b.log"
done

cat >"$work/lbnat.json" <<EOF
{
  "lb_ip": "$LB_IP",
  "ip6": "$LB_IP6",
  "admin_socket": "$work/lbnat.sock",
  "services": [
    {"name": "chat6", "protocol": "tcp", "port": 20000, "health": {"interval": 1},
     "backends": [{"ip": "fd18::21", "port": 9000}, {"ip": "fd18::22", "port": 9000}]},
    {"name": "chat64", "protocol": "tcp", "port": 20001, "health": {"interval": 1},
     "backends": [{"ip": "198.18.0.23", "port": 9000}]}
  ]
}
EOF
say "lbnat: SRCIP $LB_IP, ip6 $LB_IP6; chat6 -> IPv6 backends, chat64 -> an IPv4 backend"
sed 's/^/  /' "$work/lbnat.json"
ip netns exec "$P-lb" "$LBNAT" run --config "$work/lbnat.json" >"$work/lbnat.log" 2>&1 &
lbnat_pid=$!
alive() {
	[ "$(ip netns exec "$P-lb" "$LBNAT" status --json --admin-socket "$work/lbnat.sock" 2>/dev/null |
		grep -c '"health": "alive"')" -ge 3 ]
}
for ((i = 0; ; i++)); do  # 20 s at most
	kill -0 "$lbnat_pid" 2>/dev/null || die "lbnat exited: $(tail -n 5 "$work/lbnat.log")"
	! alive || break
	[ "$i" -lt 100 ] || die "lbnat's three backends not alive within 20 s: $(tail -n 5 "$work/lbnat.log")"
	sleep 0.2
done
ip netns exec "$P-lb" "$LBNAT" status --admin-socket "$work/lbnat.sock" | sed 's/^/  /'

say "clients: alice and bob over IPv6 to [$LB_IP6]:20000, carol over IPv6 and dave over IPv4 to port 20001"
names=(alice bob carol dave)
# client I HOST ADDRESS PORT: chat client names[I-1] from HOST to ADDRESS:PORT, its output in
# $work/clientI.out, its stdin the fifo $work/clientI.in held open in fds[I-1]
client() {
	local i="$1" fd
	mkfifo "$work/client$i.in"
	ip netns exec "$P-$2" python3 -m lbnat_lab.chat client "$3" "$4" "${names[$((i - 1))]}" \
		<"$work/client$i.in" >"$work/client$i.out" 2>&1 &
	pids+=("$!")
	exec {fd}>"$work/client$i.in"
	fds+=("$fd")
	wait_for "$work/client$i.out" "connected to" 10
}
client 1 c1 "$LB_IP6" 20000
client 2 c2 "$LB_IP6" 20000
client 3 c1 "$LB_IP6" 20001
client 4 c2 "$LB_IP" 20001
how=("c1 over IPv6" "c2 over IPv6" "c1 over IPv6, NAT64" "c2 over IPv4")
for i in 1 2 3 4; do
	printf '  %-5s (%s) -> %s\n' "${names[$((i - 1))]}" "${how[$((i - 1))]}" "$(head -n 1 "$work/client$i.out")"
done

say "what lbnat logged: the clients' own addresses"
grep "new client" "$work/lbnat.log" | sed 's/^/  [lbnat] /'

say "what b3 sees: both its clients come from $LB_IP (carol's IPv6 is lbnat's business)"
wait_for "$work/b3.log" "(total 2)" 5
grep "connected client" "$work/b3.log" | sed 's/^/  [b3] /'

say "carol (IPv6) and dave (IPv4) chat on b3; alice's line stays on b1"
echo "hello from carol, over IPv6" >&"${fds[2]}"
wait_for "$work/client4.out" "hello from carol" 5
echo "hi carol, dave here on IPv4" >&"${fds[3]}"
wait_for "$work/client3.out" "dave here" 5
echo "alice on b1" >&"${fds[0]}"
wait_for "$work/client1.out" "alice on b1" 5
sleep 0.3
for i in 1 2 3 4; do
	printf '  %-5s saw: %s\n' "${names[$((i - 1))]}" "$(grep '^\[' "$work/client$i.out" | tr '\n' ' ')"
done

say "lbnat sessions"
ip netns exec "$P-lb" "$LBNAT" sessions --admin-socket "$work/lbnat.sock" | sed 's/^/  /'

say "clients quit one by one; the table drains"
for i in 1 2 3 4; do
	echo q >&"${fds[$((i - 1))]}"
	wait_for "$work/lbnat.log" "Current NAT table length : $((4 - i))" 10
	grep -E "terminated|Current NAT table length : $((4 - i))$" "$work/lbnat.log" | tail -n 2 | sed 's/^/  [lbnat] /'
done

say "done: tearing the lab down"
