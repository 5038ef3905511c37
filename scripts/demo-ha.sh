#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
#
# The HA pair in the netns lab (scripts/ha-lab.sh draws the topology): keepalived moves the
# VIP, the flows carry on.
#
#   c1: test1 test3 transfer ─┐        ┌─ lb1 198.18.0.3: lbnat + keepalived ─┐     ┌─ b1 chat :9000
#                             ├─ br0 ──┤   VIP 198.18.0.2:20000 on the master ├─────┼─ b2 chat :9000
#   c2: test2 test4 ──────────┘        └─ lb2 198.18.0.4: lbnat + keepalived ─┘     └─ b3 chat :9000
#                                          (VRRP adverts and lbnat's sync, UDP 7001, between them)
#
# 1. the HA lab, three chat servers, lbnat on lb1 and lb2 with session sync
#    (--sync-listen/--sync-peer/--sync-secret-file), each ready (`lbnat ha-check`), then
#    keepalived on both (scripts/keepalived/: lb1 priority 150 becomes master, nopreempt);
# 2. clients through the VIP: four chat sessions (test1 and test3 on b1, test2 and test4 on b2)
#    and a long transfer alone on b3 (lbnat_lab.echo_transfer: random text echoed back by the
#    chat server, every byte checked);
# 3. lb1 crashes: SIGKILL to its lbnat and to its keepalived (both processes); the failover
#    time is measured: from the kill to the VIP on lb2, and to the transfer's first byte
#    through lb2. Every chat session still carries lines, a new client connects;
# 4. lb1 comes back: lbnat first, ready once its resync from lb2 completed, then keepalived,
#    which stays BACKUP (nopreempt): no VIP move, no flow lost;
# 5. a planned switchover back (lb2's keepalived stopped: it says priority 0): lb1, whose table
#    came from the resync, carries every flow; the transfer ends byte-identical.
# Each step prints the new log lines of both nodes (lbnat, keepalived's state changes, the
# notify script), prefixed lb1: and lb2:. Every wait is bounded; everything started is stopped
# by pid and the lab taken down, also on Ctrl-C or error.
set -euo pipefail
cd "$(dirname "$0")/.."

export LAB_PREFIX="${LAB_PREFIX:-lbha}"
P="$LAB_PREFIX"
VIP=198.18.0.2
VIP_PORT=20000
declare -A OWN=([lb1]=198.18.0.3 [lb2]=198.18.0.4)
declare -A PEER=([lb1]=198.18.0.4 [lb2]=198.18.0.3)
declare -A PRIORITY=([lb1]=150 [lb2]=100)
TRANSFER_SECONDS="${DEMO_HA_TRANSFER_SECONDS:-60}"
TRANSFER_RATE="${DEMO_HA_TRANSFER_RATE:-400000}"
# extra `lbnat run` options (one worker each: two load balancers share this machine's cores)
read -r -a LBNAT_ARGS <<<"${DEMO_HA_LBNAT_ARGS:---workers 1}"
work=$(mktemp -d /tmp/lbnat-demo-ha.XXXXXX)
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
declare -A lbnat_pid=() keepalived_pid=()
transfer_pid=""

# keepalived_kill NODE SIGNAL [nowait]: the parent and its VRRP child (SIGKILL to the parent
# alone makes the child stop cleanly, priority 0: not a crash); the parent is stopped first so
# that it cannot respawn the child in between. Then waits for it, unless told not to
# (keepalived_reap does).
keepalived_kill() {
	local node="$1" signal="$2" parent="${keepalived_pid[$1]:-}" child
	[ -n "$parent" ] || return 0
	child="$(cat "$work/$node-keepalived-vrrp.pid" 2>/dev/null || true)"
	if [ "$signal" = KILL ]; then
		kill -STOP "$parent" 2>/dev/null || true
		[ -z "$child" ] || kill -KILL "$child" 2>/dev/null || true
	fi
	kill "-$signal" "$parent" 2>/dev/null || true
	[ "${3:-}" = nowait ] || keepalived_reap "$node"
}

keepalived_reap() {
	local parent="${keepalived_pid[$1]:-}"
	[ -n "$parent" ] || return 0
	wait "$parent" 2>/dev/null || true
	keepalived_pid[$1]=""
}

lbnat_kill() {
	stop_pid "${lbnat_pid[$1]:-}" "$2"
	lbnat_pid[$1]=""
}

cleanup() {
	set +e
	close_fds
	stop_pid "$transfer_pid"
	for node in lb1 lb2; do
		keepalived_kill "$node" TERM
		lbnat_kill "$node" TERM
	done
	cleanup_lab scripts/ha-lab.sh
}
trap cleanup EXIT
trap 'exit 130' INT TERM

need_root "sudo make demo-ha" "lbnat opens a packet socket, keepalived adds the VIP"
KEEPALIVED="$(find_command keepalived)"
[ -n "$KEEPALIVED" ] || die "needs keepalived (Debian: apt-get install keepalived; make deps)"
# keepalived runs `lbnat ha-check` and the notify script with its environment (PYTHONPATH
# included) but wants an absolute path, root's: the lbnat beside this python, else on PATH
find_lbnat

vip_on() { [ "$(scripts/ha-lab.sh vip 2>/dev/null)" = "$1" ]; }
ready() { ip netns exec "$P-$1" "$LBNAT" ha-check --admin-socket "$work/$1.sock"; }
# sync_status NODE: one line, the "sync" object of `lbnat status --json`
sync_status() {
	local json
	if json="$(ip netns exec "$P-$1" "$LBNAT" status --json --admin-socket "$work/$1.sock" 2>&1)"; then
		printf '  %s: sync %s\n' "$1" "$(python3 -c 'import json, sys
print(json.dumps(json.loads(sys.argv[1]).get("sync")))' "$json" 2>&1 | tail -n 1)"
	else
		printf '  %s: sync ? (%s)\n' "$1" "$(echo "$json" | tail -n 1)"
	fi
}

# show_logs: the lines both nodes logged since the last call, prefixed with the node: lbnat's
# (but its repeated "Server is alive"), keepalived's state changes and script results, the
# notify script's
declare -A shown=()
show_logs() {
	local node file n
	for node in lb1 lb2; do
		for file in "$work/$node-lbnat.log" "$work/$node-keepalived.log" "$work/$node-notify.log"; do
			[ -f "$file" ] || continue
			n="$(wc -l <"$file")"
			if [ "$n" -gt "${shown[$file]:-0}" ]; then
				tail -n "+$((${shown[$file]:-0} + 1))" "$file" | head -n "$((n - ${shown[$file]:-0}))" |
					if [[ "$file" == *-keepalived.log ]]; then
						grep -E 'Entering|advertisement timeout|setting VIPs|removing VIPs|priority 0|chk_lbnat|Starting Keepalived|Stopped' |
							sed -E 's/^[A-Z][a-z]{2} [A-Z][a-z]{2} +[0-9]+ ([0-9:]+) [0-9]{4}: /\1 keepalived: /' || true
					elif [ -n "${shown[$file]:-}" ]; then
						grep -v 'Server is alive$' || true
					else
						cat
					fi | sed "s/^/  $node: /"
			fi
			shown[$file]="$n"
		done
	done
}

start_lbnat() {
	local node="$1"
	ip netns exec "$P-$node" "$LBNAT" run "$VIP" 198.18.0.21 9000 198.18.0.22 9000 198.18.0.23 9000 \
		--port "$VIP_PORT" --interface eth0 --admin-socket "$work/$node.sock" \
		--sync-listen "${OWN[$node]}" --sync-peer "${PEER[$node]}" \
		--sync-secret-file "$work/sync.secret" "${LBNAT_ARGS[@]}" >>"$work/$node-lbnat.log" 2>&1 &
	lbnat_pid[$node]=$!
}

start_keepalived() {
	local node="$1"
	# -P: VRRP only; -n -l -G: in the foreground, logging to stdout (no syslog in the lab);
	# pid files of its own (two keepalived on one machine)
	ip netns exec "$P-$node" "$KEEPALIVED" -n -l -D -G -P -f "$work/$node-keepalived.conf" \
		-p "$work/$node-keepalived.pid" -r "$work/$node-keepalived-vrrp.pid" \
		>>"$work/$node-keepalived.log" 2>&1 &
	keepalived_pid[$node]=$!
}

# heard I PEER WORD: test I's line WORD came back to it and reached test PEER
heard() {
	grep -qF "[test$1] $3 from test$1" "$work/test$1.out" &&
		grep -qF "[test$1] $3 from test$1" "$work/test$2.out"
}

# chat_round WORD: every chat client says a line; it must reach the client itself and its peer
# on the same server (test1+test3 on b1, test2+test4 on b2) within 10 s. Fails unless all 4 did.
chat_round() {
	local word="$1" i peer ok=0 deadline=$((SECONDS + 10))
	for i in 1 2 3 4; do
		echo "$word from test$i" >&"${fds[$((i - 1))]}"
	done
	for i in 1 2 3 4; do
		peer=$(((i + 1) % 4 + 1))
		until heard "$i" "$peer" "$word" || [ "$SECONDS" -ge "$deadline" ]; do sleep 0.1; done
		if heard "$i" "$peer" "$word"; then
			ok=$((ok + 1))
		else
			echo "  test$i: '$word' did not reach test$i and test$peer" >&2
		fi
	done
	echo "  chat: '$word' carried by $ok of 4 sessions"
	[ "$ok" -eq 4 ]
}

say "HA lab up (prefix $P)"
scripts/ha-lab.sh up
scripts/ha-lab.sh status

say "three chat servers on b1 b2 b3, port 9000"
start_chat_servers

say "lbnat on lb1 and lb2, session sync between them (UDP 7001)"
(umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$work/sync.secret")
echo "  lbnat run $VIP 198.18.0.21 9000 198.18.0.22 9000 198.18.0.23 9000 --port $VIP_PORT"
echo "    --interface eth0 --sync-listen OWN --sync-peer PEER --sync-secret-file FILE ${LBNAT_ARGS[*]}"
for node in lb1 lb2; do start_lbnat "$node"; done
for node in lb1 lb2; do wait_until 30 "$node's lbnat to be ready (lbnat ha-check)" ready "$node"; done
show_logs

say "keepalived on lb1 (priority 150) and lb2 (100): one VRRP instance, VIP $VIP"
# keepalived disables a script that a user other than root could change (the file or a
# directory above it): the notify script is run from a copy in this root-only directory
install -m 0755 scripts/keepalived/lbnat-notify "$work/lbnat-notify"
for node in lb1 lb2; do
	scripts/keepalived/keepalived-conf.sh --name "$node" --own "${OWN[$node]}" \
		--peer "${PEER[$node]}" --vip "$VIP" --priority "${PRIORITY[$node]}" \
		--lbnat "$LBNAT" --admin-socket "$work/$node.sock" --notify "$work/lbnat-notify" \
		--notify-log "$work/$node-notify.log" >"$work/$node-keepalived.conf"
	start_keepalived "$node"
done
wait_until 15 "the VIP on lb1" vip_on lb1
for node in lb1 lb2; do
	if grep -E 'Unsafe permissions|insecure' "$work/$node-keepalived.log"; then
		die "keepalived disabled a script (a directory above $LBNAT is not root's alone?)"
	fi
done
scripts/ha-lab.sh status | tail -n 1
show_logs

say "clients through the VIP: four chat sessions and a long transfer"
# mkclient I HOST: chat session testI from HOST through the VIP (its stdin a fifo held open),
# and the server it landed on
mkclient() {
	start_chat_client "$1" "$2" "$VIP" "$VIP_PORT"
	printf '  test%s (from %s) -> %s\n' "$1" "$2" "$(head -n 1 "$work/test$1.out")"
}
mkclient 1 c1
mkclient 2 c2
# the third flow goes to b3 (round-robin): the transfer, alone there
ip netns exec "$P-c1" python3 -m lbnat_lab.echo_transfer "$VIP" "$VIP_PORT" \
	--rate "$TRANSFER_RATE" --seconds "$TRANSFER_SECONDS" --timeout "$((TRANSFER_SECONDS + 60))" \
	>"$work/transfer.out" 2>&1 &
transfer_pid=$!
wait_for "$work/transfer.out" "connected to" 10
printf '  transfer (from c1) -> %s\n' "$(head -n 1 "$work/transfer.out")"
grep -q "connected to b3" "$work/transfer.out" || die "the transfer is not alone on b3"
mkclient 3 c1
mkclient 4 c2
chat_round hello
sleep 2 # the rows are synced (10 ms batches) and established well past the fast path's 50 ms
for node in lb1 lb2; do sync_status "$node"; done
show_logs

say "lb1 crashes: SIGKILL to its lbnat and its keepalived"
killed=$(now)
lines_at_kill="$(wc -l <"$work/transfer.out")"
lbnat_kill lb1 KILL
keepalived_kill lb1 KILL
# A SIGKILLed keepalived removes nothing: the VIP stays on lb1's eth0 and its kernel would go on
# answering ARP for it. A crashed machine answers nothing, so take it off as the crash would
# (on a live machine, keepalived's restart removes it: "removing VIPs" below).
ip -n "$P-lb1" addr del "$VIP/24" dev eth0 2>/dev/null || true
# And lbnat's tc program is a kernel object: it would go on rewriting the offloaded flows'
# packets that still reach lb1 (from a neighbour that has not yet taken keepalived's
# gratuitous ARP). A crashed machine forwards nothing: take it off too.
tc -n "$P-lb1" qdisc del dev eth0 clsact 2>/dev/null || true
wait_until 15 "the VIP on lb2" vip_on lb2
moved=$(now)
echo "  failover: the VIP on lb2 $(seconds "$killed" "$moved") s after the kill" \
	"($(date -d "@$killed" +%T.%3N) -> $(date -d "@$moved" +%T.%3N); VRRP: 3 adverts of 1 s + skew)"
# the transfer goes on: the end of its stall, or (none over 0.5 s) progress lines after the kill
deadline=$((SECONDS + 20))
until grep -q "flowing again" "$work/transfer.out" || [ "$SECONDS" -ge "$deadline" ]; do
	sleep 0.1
done
if ! grep -q "flowing again" "$work/transfer.out" &&
	[ "$(wc -l <"$work/transfer.out")" -le "$((lines_at_kill + 1))" ]; then
	die "the transfer did not go on after the failover"
fi
if grep -q "flowing again" "$work/transfer.out"; then
	flowing="$(grep "flowing again" "$work/transfer.out" | tail -n 1 | awk '{print $NF}')"
	echo "  failover: the transfer's first byte through lb2 $(seconds "$killed" "$flowing") s after the kill" \
		"(TCP's own retransmission timer, doubled while the VIP was nowhere, decides when after the move)"
	grep "stalled" "$work/transfer.out" | sed 's/^/  /'
else
	# lb1's tc program outlives its lbnat (a kernel object): offloaded packets that still
	# reach lb1 (a neighbour that has not yet taken keepalived's gratuitous ARP) are rewritten
	# there, the rest by lb2. A crashed machine forwards nothing: then the stall shows.
	echo "  failover: the transfer never stalled over 0.5 s: packets still reaching lb1 were" \
		"forwarded by its kernel fast path, which outlives lbnat, the rest by lb2"
	flowing="$killed"
fi
chat_round "after the failover"
mkclient 5 c2
echo q >&"${fds[4]}"
show_logs

say "lb1 comes back: lbnat (ready after its resync from lb2), then keepalived"
restarted=$(now)
start_lbnat lb1
wait_until 60 "lb1's lbnat to be ready (resync from lb2)" ready lb1
echo "  lb1: ready $(seconds "$restarted" "$(now)") s after its start"
sync_status lb1
start_keepalived lb1
wait_for "$work/lb1-notify.log" "BACKUP" 15
sleep 4 # longer than a master-down interval: lb1 would have taken the VIP by now if it could
vip_on lb2 || die "the VIP left lb2 on lb1's return: $(scripts/ha-lab.sh vip)"
echo "  the VIP stays on lb2 (nopreempt): lb1's return moves no flow"
chat_round "after lb1's return"
show_logs

say "planned switchover back to lb1: lb2's keepalived stops (it sends priority 0)"
switched=$(now)
keepalived_kill lb2 TERM nowait
wait_until 15 "the VIP on lb1" vip_on lb1
moved_back=$(now)
echo "  switchover: the VIP on lb1 $(seconds "$switched" "$moved_back") s after the stop" \
	"($(date -d "@$switched" +%T.%3N) -> $(date -d "@$moved_back" +%T.%3N))"
keepalived_reap lb2
chat_round "after the switchover"
start_keepalived lb2
wait_for "$work/lb2-notify.log" "BACKUP" 15
show_logs

say "the transfer ends"
if wait "$transfer_pid"; then transferred=1; else transferred=0; fi
transfer_pid=""
tail -n 1 "$work/transfer.out" | sed 's/^/  /'
for i in 1 2 3 4; do echo q >&"${fds[$((i - 1))]}"; done
show_logs

say "result"
echo "  failover (lb1 SIGKILLed): VIP on lb2 after $(seconds "$killed" "$moved") s, transfer flowing after $(seconds "$killed" "$flowing") s"
echo "  established flows carried through the failover, lb1's return and the switchover: $((4 + transferred)) of 5 (4 chat sessions, 1 transfer)"
[ "$transferred" = 1 ] || die "the transfer did not arrive intact"
