#!/bin/bash
# SPDX-License-Identifier: MIT
#
# lbnat's scale-out lab (issue 20, docs/scale-out.md): N lbnat instances behind a router that
# spreads the VIP's flows over them with ECMP; each instance announces the VIP over BGP.
#
#      ${P}-c1          ${P}-c2
#   198.18.2.11      198.18.2.12        (default route via 198.18.2.1)
#      eth0             eth0
#        |                |
#  +-----c1---------------c2----------rt1---+
#  |           br1: clients 198.18.2.0/24   |
#  |                                        |  ${P}-sw (the switch: two bridges)
#  |           br0: LBs 198.18.1.0/24       |
#  +-----rt0------lb1------lb2------lb3-----b1------b2------b3---+
#         |        |        |        |       |       |       |
#       eth0      eth0     eth0     eth0    eth0    eth0    eth0
#      ${P}-rt  ${P}-lb1 ${P}-lb2 ${P}-lb3 ${P}-b1 ${P}-b2 ${P}-b3
#  198.18.1.1  .1.11    .1.12    .1.13    .1.21   .1.22   .1.23
#  + eth1 198.18.2.1 (rt1 on br1)
#              lo: VIP 198.18.100.1/32 on every lbN
#
# The router ${P}-rt forwards between the segments (ip_forward=1) and learns the VIP from the
# instances over BGP (BIRD, scripts/bird/; each instance runs ExaBGP, scripts/exabgp/): its
# route to 198.18.100.1 has one next hop per announcing instance, and the kernel picks one per
# flow by the 5-tuple's hash (fib_multipath_hash_policy=1). The instances hold the VIP on lo,
# where the kernel neither answers ARP for it (arp_ignore=1) nor uses it as an ARP source
# (arp_announce=2): packets for the VIP reach an instance only because the router routes them
# there. Backends and instances route everything else through the router.
#
# All addresses are in 198.18.0.0/15 (the benchmarking range). Every host is a namespace with
# lo and veths; the peer of each veth lives in ${P}-sw (named after the host: c1, lb2, b3,
# rt0, rt1) on its bridge, so the root namespace is never touched. IPv6 is off on the lab's
# interfaces (no DAD or router solicitations in captures). Nothing runs after `up`:
# scripts/demo-ecmp.sh and tests/integration/test_bgp_netns.py start BIRD, ExaBGP and lbnat.
#
# Usage: ecmp-lab.sh up | down | status | check | add-instance N | remove-instance N
#   P = ${LAB_PREFIX:-lbecmp}; up creates instances lb1..lb${LAB_INSTANCES:-3} and backends
#   b1..b${LAB_BACKENDS:-3} (1-9 of each).
#   up and down are idempotent; down first kills (by pid) whatever still runs inside the
#   lab's namespaces (BIRD, ExaBGP, lbnat), then deletes them.
#   add-instance N: instance lbN (198.18.1.(10+N)) into a lab that is up, e.g. while flows
#   run; remove-instance N: kills what runs in lbN (by pid) and deletes it.
#   status exits 0 when every host of the lab is up, 1 otherwise; it also shows the router's
#   route to the VIP.
#   check pings within the lab: the router from c1, every host from the router, every backend
#   from every instance, an instance from c1 through the router.

set -euo pipefail

P="${LAB_PREFIX:-lbecmp}"
NINSTANCES="${LAB_INSTANCES:-3}"
NBACKENDS="${LAB_BACKENDS:-3}"
SW="${P}-sw"
LB_NET="198.18.1"
CLIENT_NET="198.18.2"
VIP=198.18.100.1
PLEN=24
MAX_HOSTS=9
# what runs in this lab (BIRD, ExaBGP, lbnat) gets 3 s after SIGTERM at down, not lab.sh's 2
KILL_WAIT=30

log() { echo "ecmp-lab: $*"; }
die() { echo "ecmp-lab: error: $*" >&2; exit 1; }

# require, valid_prefix, valid_count, ns_exists, make_ns, make_switch, plug, wait_link_up,
# kill_ns_pids, cmd_down (they use P, SW, PLEN, KILL_WAIT, log, die and lab_namespaces,
# defined here)
# shellcheck source=scripts/netns-lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/netns-lib.sh"

usage() {
	echo "usage: LAB_PREFIX=P LAB_INSTANCES=N LAB_BACKENDS=N $0 up|down|status|check|add-instance N|remove-instance N" >&2
	exit 2
}

# host name (rt, c1, lb2, b3) -> address on its eth0
host_ip() {
	case "$1" in
	rt) echo "$LB_NET.1" ;;
	c[0-9]) echo "$CLIENT_NET.$((10 + ${1#c}))" ;;
	lb[0-9]) echo "$LB_NET.$((10 + ${1#lb}))" ;;
	b[0-9]) echo "$LB_NET.$((20 + ${1#b}))" ;;
	*) die "unknown host '$1'" ;;
	esac
}

# host name -> the bridge its eth0 is on
host_bridge() {
	case "$1" in
	c[0-9]) echo br1 ;;
	*) echo br0 ;;
	esac
}

# Namespaces of this lab that exist now (exact prefix, so lbe1 never matches lbe12-*).
lab_namespaces() {
	ip netns list | awk '{print $1}' |
		grep -E -- "^${P//./\\.}-(sw|rt|c[0-9]|lb[0-9]|b[0-9])\$" || true
}

# Existing instance hosts (lb1, lb2, ...), sorted by number.
existing_instances() {
	lab_namespaces | sed -n "s/^${P//./\\.}-\(lb[0-9]\)\$/\1/p" | sort
}

# the hosts with one interface, eth0: clients, instances (the configured ones and any added
# later), backends; without duplicates
lab_hosts() {
	local i
	{
		echo c1
		echo c2
		for ((i = 1; i <= NINSTANCES; i++)); do echo "lb$i"; done
		existing_instances
		for ((i = 1; i <= NBACKENDS; i++)); do echo "b$i"; done
	} | awk '!seen[$0]++'
}

make_router() {
	local ns="${P}-rt" dev
	make_ns "$ns"
	plug "$ns" eth0 rt0 br0 "$LB_NET.1"
	plug "$ns" eth1 rt1 br1 "$CLIENT_NET.1"
	# fib_multipath_hash_policy 1: a multipath route picks its next hop by the hash of the
	# 5-tuple (0, the default, hashes the addresses alone: every flow of one client would go
	# to one instance). rp_filter 0: an instance answers a flow from the VIP after the router
	# has withdrawn its route (a draining instance finishing its flows); strict reverse-path
	# filtering would drop those packets
	ip netns exec "$ns" sysctl -qw net.ipv4.ip_forward=1 net.ipv4.fib_multipath_hash_policy=1 \
		net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0 >/dev/null
	for dev in eth0 eth1; do
		ip netns exec "$ns" sysctl -qw "net.ipv4.conf.$dev.rp_filter=0" >/dev/null
	done
}

# make_host NAME: namespace ${P}-NAME, eth0 with its address on its bridge, a default route
# through the router; an instance also gets the VIP on lo
make_host() {
	local h="$1" ns="${P}-$1" gw
	make_ns "$ns"
	plug "$ns" eth0 "$h" "$(host_bridge "$h")" "$(host_ip "$h")"
	if [ "$(host_bridge "$h")" = br1 ]; then gw="$CLIENT_NET.1"; else gw="$LB_NET.1"; fi
	ip -n "$ns" route replace default via "$gw" dev eth0
	if [[ "$h" == lb[0-9] ]]; then
		ip -n "$ns" addr replace "$VIP/32" dev lo
		# arp_ignore 1: answer ARP only for addresses of the interface asked (not the VIP on
		# lo: the router must reach an instance by its own address, the next hop BGP gave);
		# arp_announce 2: never use the VIP as the source of an ARP request
		ip netns exec "$ns" sysctl -qw net.ipv4.conf.all.arp_ignore=1 \
			net.ipv4.conf.all.arp_announce=2 net.ipv4.conf.eth0.arp_ignore=1 \
			net.ipv4.conf.eth0.arp_announce=2 >/dev/null
	fi
}

wait_up() {
	local ns dev
	for ns in $(lab_namespaces | grep -v -- "-sw\$" || true); do
		for dev in eth0 eth1; do
			ip -n "$ns" link show "$dev" >/dev/null 2>&1 || continue
			wait_link_up "$ns" "$dev"
		done
	done
}

cmd_up() {
	local h
	make_switch br0 br1
	make_router
	for h in $(lab_hosts); do
		make_host "$h"
	done
	wait_up
	log "up: $(lab_namespaces | tr '\n' ' ')"
}

# vip_route: the router's route to the VIP, one line ("none" when it has none)
vip_route() {
	local route
	route="$(ip -n "${P}-rt" -4 route show "$VIP" 2>/dev/null | tr -s ' \n' ' ' || true)"
	echo "${route:-none}"
}

# port_up HOST-NAMESPACE DEV PORT BRIDGE ADDR: prints the state line, returns 1 if not up
port_up() {
	local ns="$1" dev="$2" port="$3" br="$4" want="$5" addr state="down"
	addr="$(ip -n "$ns" -4 -o addr show dev "$dev" 2>/dev/null | awk '{print $4; exit}' || true)"
	if ip -n "$ns" link show "$dev" 2>/dev/null | grep 'state UP' >/dev/null &&
		[ "$addr" = "$want/$PLEN" ] &&
		ip -n "$SW" link show "$port" 2>/dev/null | grep "master $br.*state UP" >/dev/null; then
		state="up"
	fi
	printf '%-14s %-5s %-18s %s\n' "$ns" "$dev" "${addr:--}" "$state"
	[ "$state" = up ]
}

cmd_status() {
	local ok=0 h ns br
	for br in br0 br1; do
		if ns_exists "$SW" && ip -n "$SW" link show "$br" 2>/dev/null | grep 'state UP\|state UNKNOWN' >/dev/null; then
			printf '%-14s %-5s %-18s %s\n' "$SW" "$br" "bridge" "up"
		else
			printf '%-14s %-5s %-18s %s\n' "$SW" "$br" "bridge" "MISSING"
			ok=1
		fi
	done
	if ns_exists "${P}-rt"; then
		port_up "${P}-rt" eth0 rt0 br0 "$LB_NET.1" || ok=1
		port_up "${P}-rt" eth1 rt1 br1 "$CLIENT_NET.1" || ok=1
	else
		printf '%-14s %-5s %-18s %s\n' "${P}-rt" "-" "-" "MISSING"
		ok=1
	fi
	for h in $(lab_hosts); do
		ns="${P}-$h"
		if ! ns_exists "$ns"; then
			printf '%-14s %-5s %-18s %s\n' "$ns" "-" "-" "MISSING"
			ok=1
			continue
		fi
		port_up "$ns" eth0 "$h" "$(host_bridge "$h")" "$(host_ip "$h")" || ok=1
		if [[ "$h" == lb[0-9] ]] && ! ip -n "$ns" -4 -o addr show dev lo | grep -q " $VIP/32 "; then
			printf '%-14s %-5s %-18s %s\n' "$ns" lo "$VIP/32" "MISSING"
			ok=1
		fi
	done
	if ns_exists "${P}-rt"; then
		printf '%-14s %s\n' "VIP route" "$(vip_route)"
	fi
	if [ $ok -eq 0 ]; then
		log "status: up"
	else
		log "status: NOT up"
	fi
	return $ok
}

# ping_from FROM TO-ADDRESS LABEL
ping_from() {
	if ip netns exec "${P}-$1" ping -q -c 1 -W 2 "$2" >/dev/null 2>&1; then
		echo "PASS: ping $1 -> $3 ($2)"
	else
		echo "FAIL: ping $1 -> $3 ($2)"
		return 1
	fi
}

cmd_check() {
	local h b ret=0
	require_ping
	cmd_status >/dev/null || die "check: lab is not up (run: $0 up)"
	ping_from c1 "$CLIENT_NET.1" rt || ret=1
	for h in $(lab_hosts); do
		ping_from rt "$(host_ip "$h")" "$h" || ret=1
	done
	for h in $(existing_instances); do
		for b in $(lab_hosts | grep '^b'); do
			ping_from "$h" "$(host_ip "$b")" "$b" || ret=1
		done
	done
	# routed: the client segment to an instance's own address and back
	ping_from c1 "$(host_ip lb1)" "lb1 (routed)" || ret=1
	return $ret
}

cmd_add_instance() {
	local n="$1"
	valid_count instance "$n" $MAX_HOSTS
	if ! ns_exists "$SW" || ! ns_exists "${P}-rt"; then
		die "add-instance: lab $P is not up"
	fi
	make_host "lb$n"
	wait_up
	log "added ${P}-lb$n $(host_ip "lb$n") (VIP $VIP on lo)"
}

cmd_remove_instance() {
	local n="$1" ns
	valid_count instance "$n" $MAX_HOSTS
	ns="${P}-lb$n"
	if ns_exists "$ns"; then
		kill_ns_pids "$ns"
		ip netns del "$ns"
	fi
	# its switch-side peer went with its namespace's veth
	log "removed $ns"
}

main() {
	[ $# -ge 1 ] || usage
	require
	valid_prefix
	valid_count instance "$NINSTANCES" $MAX_HOSTS
	valid_count backend "$NBACKENDS" $MAX_HOSTS
	case "$1" in
	up) cmd_up ;;
	down) cmd_down ;;
	status) cmd_status ;;
	check) cmd_check ;;
	add-instance | remove-instance)
		[ $# -eq 2 ] || usage
		"cmd_${1/-/_}" "$2"
		;;
	*) usage ;;
	esac
}

main "$@"
