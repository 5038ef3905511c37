#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
#
# Scale-out in the netns lab (scripts/ecmp-lab.sh draws the topology; docs/scale-out.md):
# three lbnat instances share the VIP behind a router that spreads flows over them with ECMP,
# each announcing the VIP over BGP while its lbnat serves it.
#
#   c1, c2 ──► rt 198.18.2.1 (BIRD, AS 65000)      ┌─ lb1 198.18.1.11: lbnat --vip + ExaBGP/lbnat-bgp ─┐   ┌─ b1 chat :9000
#              route 198.18.100.1: ECMP over ──────┼─ lb2 198.18.1.12: lbnat --vip + ExaBGP/lbnat-bgp ─┼───┼─ b2 chat :9000
#              every instance announcing it         └─ lb3 198.18.1.13: lbnat --vip + ExaBGP/lbnat-bgp ─┘   └─ b3 chat :9000
#
# 1. the lab, three chat servers, BIRD on the router (scripts/bird/router-conf.sh);
# 2. lbnat on each instance: `lbnat run 198.18.1.1N <b1..b3> --vip 198.18.100.1 --scheduler
#    maglev` (maglev: every instance maps a flow to the same backend), its own admin socket,
#    and the session sync in mesh mode among the three (UDP 7001): each knows which instance
#    owns which flow, and forwards a packet the router sent it for another's flow to its owner;
# 3. ExaBGP on each instance (scripts/exabgp/exabgp-conf.sh) running lbnat-bgp, which asks
#    lbnat's bgp_status every 0.5 s: the router's route to the VIP gets three next hops (the
#    time from the speakers' start is measured);
# 4. short connections from c1 and c2 through the VIP: each instance's share (from its
#    `lbnat status --json`) and each backend's;
# 5. chat sessions held open, until lb2 owns at least two of them;
# 6. lb2 is drained (`lbnat drain-node`): the route shrinks to two next hops (measured), new
#    connections go to lb1 and lb3 alone, and every chat session still carries lines: the
#    router rehashed lb2's flows (and some of the others') to other instances, which forward
#    them to their owner; the sessions end, lb2 stops once its last flow has ended;
# 7. the timings.
# Every wait is bounded; everything started is stopped by pid and the lab taken down, also
# on Ctrl-C or error.
set -euo pipefail
cd "$(dirname "$0")/.."

export LAB_PREFIX="${LAB_PREFIX:-lbecmp}"
P="$LAB_PREFIX"
VIP=198.18.100.1
VIP_PORT=20000
ROUTER=198.18.1.1
NODES=(lb1 lb2 lb3)
DRAINED=lb2
CONNECTIONS="${DEMO_ECMP_CONNECTIONS:-30}" # from each client, before and after the drain
# extra `lbnat run` options (one worker each: three instances share this machine's cores)
read -r -a LBNAT_ARGS <<<"${DEMO_ECMP_LBNAT_ARGS:---workers 1}"
work=$(mktemp -d /tmp/lbnat-demo-ecmp.XXXXXX)
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
declare -A lbnat_pid=() exabgp_pid=()
bird_pid=""
SESSIONS_MAX=16
# the route's changes are timed: wait_until polls them every 20 ms
wait_poll=0.02

node_ip() { echo "198.18.1.$((10 + ${1#lb}))"; }
# indent PREFIX: stdin's lines, indented and prefixed
indent() { sed "s/^/  $1/"; }

cleanup() {
	set +e
	close_fds
	for node in "${NODES[@]}"; do
		stop_pid "${exabgp_pid[$node]:-}"
		stop_pid "${lbnat_pid[$node]:-}"
	done
	stop_pid "$bird_pid"
	# whatever is left in the namespaces (ExaBGP's lbnat-bgp, say) is killed by pid there
	cleanup_lab scripts/ecmp-lab.sh
}
trap cleanup EXIT
trap 'exit 130' INT TERM

need_root "sudo make demo-ecmp" "lbnat opens a packet socket, the lab makes namespaces"
BIRD="$(find_command bird)"
EXABGP="$(find_command exabgp)"
if [ -z "$BIRD" ] || [ -z "$EXABGP" ]; then
	die "needs bird and exabgp (Debian: apt-get install bird2 exabgp; make deps)"
fi
# ExaBGP runs lbnat-bgp by an absolute path: the one beside this python's lbnat, else a
# wrapper running this checkout's (an lbnat installed before lbnat-bgp existed has none)
find_lbnat
EXABGP_ENV="$PWD/scripts/exabgp/exabgp.env"
LBNAT_BGP="${LBNAT_BGP:-$(dirname "$LBNAT")/lbnat-bgp}"
if [ ! -x "$LBNAT_BGP" ]; then
	LBNAT_BGP="$work/lbnat-bgp"
	printf '#!/bin/sh\nPYTHONPATH=%s exec %s -m lbnat.bgptool "$@"\n' "$PWD" \
		"$(python3 -c 'import sys; print(sys.executable)')" >"$LBNAT_BGP"
	chmod 0755 "$LBNAT_BGP"
fi

# next_hops: the router's next hops for the VIP, sorted, one line ("" when it has no route)
next_hops() {
	ip -n "$P-rt" -j route show "$VIP" | python3 -c 'import json, sys
hops = {h["gateway"] for r in json.load(sys.stdin) for h in r.get("nexthops", [r]) if "gateway" in h}
print(" ".join(sorted(hops)))'
}
hops_are() { [ "$(next_hops)" = "$*" ]; }

# flows NODE: the flows lbnat on NODE has opened since its start (every service's); nothing
# when it does not answer (stopped)
flows() {
	local json
	json="$(ip netns exec "$P-$1" "$LBNAT" status --json --admin-socket "$work/$1.sock" 2>/dev/null)" ||
		return 0
	python3 -c 'import json, sys; print(sum(s["flows"] for s in json.loads(sys.argv[1])["services"]))' "$json"
}

# connections LABEL: CONNECTIONS short connections from c1 and from c2; each instance's share
connections() {
	local node c out after
	declare -A before=()
	for node in "${NODES[@]}"; do before[$node]="$(flows "$node")"; done
	for c in c1 c2; do
		out="$(ip netns exec "$P-$c" python3 -m lbnat_lab.ecmp connect "$VIP" "$VIP_PORT" "$CONNECTIONS")" ||
			die "$c: connections failed: $out"
		echo "  $CONNECTIONS connections from $c landed on: $out"
	done
	printf '  %s, new flows per instance:' "$1"
	for node in "${NODES[@]}"; do
		after="$(flows "$node")"
		if [ -n "$after" ] && [ -n "${before[$node]}" ]; then
			printf ' %s %s' "$node" "$((after - before[$node]))"
		else
			printf ' %s (stopped)' "$node"
		fi
	done
	echo
}

start_lbnat() {
	local node="$1" other peers=()
	for other in "${NODES[@]}"; do
		[ "$other" = "$node" ] || peers+=(--sync-peer "$(node_ip "$other")")
	done
	ip netns exec "$P-$node" "$LBNAT" run "$(node_ip "$node")" \
		198.18.1.21 9000 198.18.1.22 9000 198.18.1.23 9000 --vip "$VIP" --port "$VIP_PORT" \
		--interface eth0 --scheduler maglev --admin-socket "$work/$node.sock" \
		--sync-mode mesh --sync-listen "$(node_ip "$node")" "${peers[@]}" \
		--sync-secret-file "$work/sync.secret" \
		--health-interval 1 --log-transitions "${LBNAT_ARGS[@]}" >"$work/$node-lbnat.log" 2>&1 &
	lbnat_pid[$node]=$!
}

# open_flows NODE: the flows lbnat on NODE serves now (0 when it does not answer)
open_flows() {
	local json
	json="$(ip netns exec "$P-$1" "$LBNAT" status --json --admin-socket "$work/$1.sock" 2>/dev/null)" ||
		{ echo 0; return 0; }
	python3 -c 'import json, sys; print(json.loads(sys.argv[1])["open_flows"])' "$json"
}

# mkclient I HOST: chat session testI from HOST through the VIP, its stdin a fifo held open
mkclient() { start_chat_client "$1" "$2" "$VIP" "$VIP_PORT"; }

# chat_round WORD: every session says a line; each must hear its own line back (the chat
# server relays to every client of its own) within 10 s. Fails unless all did.
chat_round() {
	local word="$1" i ok=0 deadline=$((SECONDS + 10))
	for ((i = 1; i <= ${#fds[@]}; i++)); do
		echo "$word" >&"${fds[$((i - 1))]}"
	done
	for ((i = 1; i <= ${#fds[@]}; i++)); do
		until grep -qF "[test$i] $word" "$work/test$i.out" || [ "$SECONDS" -ge "$deadline" ]; do
			sleep 0.1
		done
		if grep -qF "[test$i] $word" "$work/test$i.out"; then
			ok=$((ok + 1))
		else
			echo "  test$i: '$word' did not come back" >&2
		fi
	done
	echo "  chat: '$word' carried by $ok of ${#fds[@]} sessions"
	[ "$ok" -eq "${#fds[@]}" ]
}

# per_instance: "lb1 N lb2 N lb3 N", each instance's open flows
per_instance() {
	local node
	for node in "${NODES[@]}"; do printf '%s %s ' "$node" "$(open_flows "$node")"; done
}

start_exabgp() {
	local node="$1"
	scripts/exabgp/exabgp-conf.sh --name "$node" --own "$(node_ip "$node")" --router "$ROUTER" \
		--lbnat-bgp "$LBNAT_BGP" --admin-socket "$work/$node.sock" >"$work/$node-exabgp.conf"
	# from $work: ExaBGP looks for its CLI pipes, and finds none, in its working directory
	(cd "$work" && exec ip netns exec "$P-$node" "$EXABGP" --env "$EXABGP_ENV" \
		"$work/$node-exabgp.conf") >"$work/$node-exabgp.log" 2>&1 &
	exabgp_pid[$node]=$!
}

say "ECMP lab up (prefix $P)"
scripts/ecmp-lab.sh up
scripts/ecmp-lab.sh status

say "three chat servers on b1 b2 b3, port 9000"
start_chat_servers

say "BIRD on the router: a BGP session per instance, ECMP (merge paths)"
args=()
for node in "${NODES[@]}"; do args+=(--instance "$node=$(node_ip "$node")"); done
scripts/bird/router-conf.sh --router-id "$ROUTER" --local "$ROUTER" "${args[@]}" >"$work/bird.conf"
ip netns exec "$P-rt" "$BIRD" -f -c "$work/bird.conf" -s "$work/bird.ctl" -P "$work/bird.pid" \
	>"$work/bird.log" 2>&1 &
bird_pid=$!
wait_until 10 "BIRD's control socket" test -S "$work/bird.ctl"
echo "  bird -c bird.conf (AS 65000, hold time 3 s, keepalive 1 s; sessions to ${NODES[*]})"

say "lbnat on each instance: its own SRCIP, the shared VIP $VIP"
echo "  lbnat run 198.18.1.1N 198.18.1.21 9000 198.18.1.22 9000 198.18.1.23 9000 --vip $VIP"
echo "    --port $VIP_PORT --interface eth0 --scheduler maglev ${LBNAT_ARGS[*]}"
echo "    --sync-mode mesh --sync-listen OWN --sync-peer OTHER --sync-peer OTHER --sync-secret-file FILE"
(umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$work/sync.secret")
for node in "${NODES[@]}"; do start_lbnat "$node"; done
for node in "${NODES[@]}"; do wait_for "$work/$node-lbnat.log" "Server is alive" 30; done
# lbnat-bgp --once: what ExaBGP would be told now (exit 0: announce). An instance asks for
# the VIP once it can serve: a backend alive, and the mesh sync holding the others' flows
for node in "${NODES[@]}"; do
	deadline=$((SECONDS + 30))
	until answer="$(ip netns exec "$P-$node" "$LBNAT_BGP" --admin-socket "$work/$node.sock" --once 2>&1)"; do
		if [ "$SECONDS" -ge "$deadline" ]; then
			indent "$node: " <<<"$answer" >&2
			die "$node's lbnat did not ask for its VIP within 30 s (an lbnat without bgp_status refuses it)"
		fi
		sleep 0.2
	done
	indent "$node: " <<<"$answer" | tail -n 1
done

say "ExaBGP on each instance: lbnat-bgp announces the VIP while lbnat serves it"
started=$(now)
for node in "${NODES[@]}"; do start_exabgp "$node"; done
all_hops="$(for node in "${NODES[@]}"; do node_ip "$node"; done | sort | tr '\n' ' ')"
all_hops="${all_hops% }"
wait_until 30 "the router's route over ${NODES[*]}" hops_are "$all_hops"
learned=$(now)
echo "  the router's route has 3 next hops $(seconds "$started" "$learned") s after the speakers started:"
ip -n "$P-rt" route show "$VIP" | sed 's/^/    /'
grep -h "lbnat-bgp:" "$work"/lb*-exabgp.log | sed 's/^/  /'

say "short connections through the VIP, spread by the router's 5-tuple hash"
connections "spread over three"

say "chat sessions held open, until $DRAINED owns two of them"
n=0
while [ "$(open_flows "$DRAINED")" -lt 2 ] && [ "$n" -lt "$SESSIONS_MAX" ]; do
	n=$((n + 1))
	if [ $((n % 2)) = 1 ]; then mkclient "$n" c1; else mkclient "$n" c2; fi
	sleep 0.2 # the row reaches the status (and the mesh) within a batch
done
echo "  $n sessions; open flows per instance: $(per_instance)"
chat_round hello

say "$DRAINED is drained: its VIP withdrawn, then lbnat stops once its flows are done"
drained=$(now)
echo "  lbnat drain-node (on $DRAINED)"
ip netns exec "$P-$DRAINED" "$LBNAT" drain-node --admin-socket "$work/$DRAINED.sock" | indent ""
rest="$(for node in "${NODES[@]}"; do [ "$node" = "$DRAINED" ] || node_ip "$node"; done | sort | tr '\n' ' ')"
rest="${rest% }"
wait_until 15 "the route without $DRAINED" hops_are "$rest"
withdrawn=$(now)
echo "  the route lost $DRAINED $(seconds "$drained" "$withdrawn") s after the drain began:"
ip -n "$P-rt" route show "$VIP" | sed 's/^/    /'
grep -h "lbnat-bgp:" "$work/$DRAINED-exabgp.log" | tail -n 1 | sed 's/^/  /'
connections "after the drain"
chat_round "after the drain"
echo "  open flows per instance: $(per_instance)"
for ((i = 1; i <= ${#fds[@]}; i++)); do echo q >&"${fds[$((i - 1))]}"; done
echo "  the chat sessions end"
# a drained lbnat stops once its flows have ended (bounded here: SIGTERM after 30 s)
deadline=$((SECONDS + 30))
while kill -0 "${lbnat_pid[$DRAINED]}" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do
	sleep 0.1
done
if kill -0 "${lbnat_pid[$DRAINED]}" 2>/dev/null; then
	echo "  $DRAINED's lbnat still runs 30 s after its sessions ended: SIGTERM"
	kill -TERM "${lbnat_pid[$DRAINED]}"
fi
wait "${lbnat_pid[$DRAINED]}" 2>/dev/null || true
lbnat_pid[$DRAINED]=""
echo "  $DRAINED's lbnat exited $(seconds "$drained" "$(now)") s after the drain began; its last lines:"
tail -n 3 "$work/$DRAINED-lbnat.log" | sed 's/^/    /'

say "result"
echo "  BGP: the router's route over 3 instances $(seconds "$started" "$learned") s after the speakers started"
echo "  drain: $DRAINED out of the route $(seconds "$drained" "$withdrawn") s after \`lbnat drain-node\` was run" \
	"(the CLI's start, lbnat-bgp's poll every 0.5 s, one UPDATE)"
echo "  chat sessions carried through the drain: ${#fds[@]} of ${#fds[@]}"
