#!/bin/bash
# SPDX-License-Identifier: MIT
#
# lbnat test lab: one L2 segment built from network namespaces and veth pairs.
#
#      ${P}-c1          ${P}-c2          ${P}-lb
#   198.18.0.11      198.18.0.12       198.18.0.2
#      eth0             eth0              eth0
#        |                |                 |
#  +-----c1---------------c2----------------lb-------------+
#  |                     br0                               |  ${P}-sw
#  +-----b1---------------b2----------------b3------ bN ---+  (the switch)
#        |                |                 |         |
#      eth0             eth0              eth0       eth0
#      ${P}-b1          ${P}-b2          ${P}-b3     ${P}-bN
#   198.18.0.21      198.18.0.22       198.18.0.23  198.18.0.(20+N)
#
# With LAB_LBS=2 (scripts/ha-lab.sh) the one lb becomes a pair, ${P}-lb1 198.18.0.3 and
# ${P}-lb2 198.18.0.4, on the same bridge; 198.18.0.2 is then the pair's VIP, which keepalived
# adds on the master (scripts/ha-lab.sh draws it).
#
# All addresses are in 198.18.0.0/24 (from the benchmarking range 198.18.0.0/15).
# Every host is a namespace of its own with lo and one veth "eth0"; the peer of each eth0
# lives in the switch namespace ${P}-sw (named after the host: c1, lb, b3, ...) and is
# enslaved to the bridge br0 there, so the root namespace is never touched.
# Offloads (TSO/GSO, checksum) are left at the veth defaults; IPv6 is disabled on the lab's
# interfaces so no DAD or router solicitations add noise to captures.
#
# Dual stack (LAB_IPV6=1): every host's eth0 (and lo) also gets IPv6, its address in the ULA
# prefix fd18::/64 with the IPv4 address's last number written after it (lb fd18::2, c1
# fd18::11, b3 fd18::23, lb1 fd18::3), added with nodad and with DAD, router advertisements
# and solicitations off, so the lab is up as fast as the IPv4-only one. Without it (the
# default) nothing changes: IPv6 stays off. The switch never has IPv6 (bridges forward
# IPv6 frames regardless); in the dual-stack lab br0 floods multicast (no MLD snooping), so
# neighbour discovery never depends on a querier.
#
# The routed client (add-router [MTU]): a router ${P}-r1 on br0 (198.18.0.254, fd18::254)
# and, behind it on a second bridge br1 whose links have MTU bytes (default 1280), the client
# ${P}-rc1 (198.18.1.11, fd18:1::11; the router's side 198.18.1.1, fd18:1::1). The LB hosts
# and the backends get their default route (both families) through the router: lbnat sends a
# frame for an address off its own segment to the default gateway. The client
# advertises the MSS of a 1500-byte path (route advmss 1460 / 1440, as behind a tunnel), so
# what comes back to it is cut down only by path-MTU discovery: the router's ICMP
# "fragmentation needed" / ICMPv6 "packet too big" to the sender.
#
#      ${P}-rc1  eth0 ── br1 (MTU 1280) ── eth1  ${P}-r1  eth0 ── br0 (the lab)
#
# Usage: lab.sh up | down | status | check | add-backend N | add-router [MTU]
#              | dr-backend N up|down [VIP]
#   dr-backend: backend bN holds the VIP (default 198.18.0.2) on lo with arp_ignore=1 and
#   arp_announce=2, or not (scripts/dr-backend.sh), for lbnat's direct routing (docs/dr.md).
#   P = ${LAB_PREFIX:-lbnat};  up creates ${LAB_BACKENDS:-3} backends and ${LAB_LBS:-1} LBs
#   (1: lb; 2: lb1 and lb2); LAB_IPV6=1: dual stack (the same for every command of a lab).
#   up and down are idempotent; down first kills (by pid) whatever still runs inside the
#   lab's namespaces, then deletes them.
#   status exits 0 when every host of the lab is up, 1 otherwise.
#   check pings every host from the (first) LB and from c1 (inside the namespaces only).

set -euo pipefail

P="${LAB_PREFIX:-lbnat}"
NBACKENDS="${LAB_BACKENDS:-3}"
NLBS="${LAB_LBS:-1}"
IPV6="${LAB_IPV6:-0}"
SW="${P}-sw"
BR="br0"
NET="198.18.0"
PLEN=24
NET6="fd18:"  # fd18::X
PLEN6=64
ROUTED_BR="br1"
ROUTED_NET="198.18.1"
ROUTED_NET6="fd18:1:"  # fd18:1::X
ROUTED_MTU=1280
MAX_BACKENDS=99
# down gives whatever still runs in the lab 2 s after SIGTERM, then SIGKILLs it
KILL_WAIT=20

log() { echo "lab: $*"; }
die() { echo "lab: error: $*" >&2; exit 1; }

# require, valid_prefix, valid_count, ns_exists, make_ns, make_switch, plug, wait_link_up,
# kill_ns_pids, cmd_down (they use P, SW, PLEN, KILL_WAIT, log, die and lab_namespaces,
# defined here)
# shellcheck source=scripts/netns-lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/netns-lib.sh"

usage() {
	echo "usage: LAB_PREFIX=P LAB_BACKENDS=N LAB_LBS=1|2 LAB_IPV6=0|1 $0 up|down|status|check|add-backend N|add-router [MTU]|dr-backend N up|down [VIP]" >&2
	exit 2
}

valid_ipv6() {
	[[ "$IPV6" =~ ^[01]$ ]] || die "LAB_IPV6 '$IPV6' is not 0 or 1"
}

valid_lbs() {
	[[ "$NLBS" =~ ^[12]$ ]] || die "LAB_LBS '$NLBS' is not 1 or 2"
}

# The LB hosts: lb, or the pair lb1 lb2
lb_hosts() {
	if [ "$NLBS" = 1 ]; then echo lb; else echo lb1 lb2; fi
}

# host name (c1, lb, lb2, b3) -> address
host_ip() {
	case "$1" in
	lb) echo "$NET.2" ;;
	lb[12]) echo "$NET.$((2 + ${1#lb}))" ;;
	c[0-9]*) echo "$NET.$((10 + ${1#c}))" ;;
	b[0-9]*) echo "$NET.$((20 + ${1#b}))" ;;
	r1) echo "$NET.254" ;;
	rc1) echo "$ROUTED_NET.11" ;;
	*) die "unknown host '$1'" ;;
	esac
}

# host name -> IPv6 address (dual stack): the IPv4 address's last number after the prefix
host_ip6() {
	local v4
	v4="$(host_ip "$1")"
	case "$1" in
	rc1) echo "${ROUTED_NET6}:${v4##*.}" ;;
	*) echo "${NET6}:${v4##*.}" ;;
	esac
}

# the IPv6 address to plug in for a host: nothing unless dual stack
addr6_of() {
	if [ "$IPV6" = 1 ]; then host_ip6 "$1"; fi
}

# the bridge a host's eth0 is on
bridge_of() {
	case "$1" in
	rc1) echo "$ROUTED_BR" ;;
	*) echo "$BR" ;;
	esac
}

# Namespaces of this lab that exist now (exact prefix, so lbt1 never matches lbt12-*).
lab_namespaces() {
	ip netns list | awk '{print $1}' |
		grep -E -- "^${P//./\\.}-(sw|lb|lb[12]|c[0-9]+|b[0-9]+|r1|rc1)\$" || true
}

# Existing backend hosts (b1, b2, ...), sorted by number.
existing_backends() {
	lab_namespaces | sed -n "s/^${P//./\\.}-\(b[0-9]*\)\$/\1/p" | sort -t b -k 2 -n
}

expected_hosts() {
	local i h
	echo c1
	echo c2
	for h in $(lb_hosts); do echo "$h"; done
	for ((i = 1; i <= NBACKENDS; i++)); do echo "b$i"; done
	# backends added later with add-backend count as part of the lab too
	existing_backends
	# and so does the routed client with its router (add-router)
	lab_namespaces | sed -n "s/^${P//./\\.}-\(r1\|rc1\)\$/\1/p" | sort
}

# expected_hosts without duplicates, in order
lab_hosts() {
	expected_hosts | awk '!seen[$0]++'
}

# make_host NAME: namespace ${P}-NAME, eth0 with its address (addresses, dual stack), peer
# NAME on the bridge
make_host() {
	local h="$1" ns="${P}-$1" addr
	addr="$(host_ip "$h")"
	make_ns "$ns"
	[ "$IPV6" = 0 ] || with_ipv6 "$ns" lo
	plug "$ns" eth0 "$h" "$(bridge_of "$h")" "$addr" "$(addr6_of "$h")"
}

# the switch's bridges; dual stack: no MLD snooping (multicast flooded, NDP never waits on
# a querier)
make_bridges() {
	local br
	make_switch "$@"
	if [ "$IPV6" = 1 ]; then
		for br in "$@"; do
			ip -n "$SW" link set "$br" type bridge mcast_snooping 0
		done
	fi
}

wait_up() {
	local h
	for h in $(lab_hosts); do
		wait_link_up "${P}-$h" eth0
	done
}

cmd_up() {
	local h
	make_bridges "$BR"
	for h in $(lab_hosts); do
		make_host "$h"
	done
	wait_up
	log "up: $(lab_namespaces | tr '\n' ' ')"
}

cmd_status() {
	local ok=0 h ns state addr addr6
	if ns_exists "$SW" && ip -n "$SW" link show "$BR" 2>/dev/null | grep 'state UP\|state UNKNOWN' >/dev/null; then
		printf '%-14s %-18s %s\n' "$SW" "bridge $BR" "up"
	else
		printf '%-14s %-18s %s\n' "$SW" "bridge $BR" "MISSING"
		ok=1
	fi
	for h in $(lab_hosts); do
		ns="${P}-$h"
		if ! ns_exists "$ns"; then
			printf '%-14s %-18s %s\n' "$ns" "-" "MISSING"
			ok=1
			continue
		fi
		addr="$(ip -n "$ns" -4 -o addr show dev eth0 2>/dev/null | awk '{print $4; exit}' || true)"
		addr6=""
		if [ "$IPV6" = 1 ]; then
			addr6="$(ip -n "$ns" -6 -o addr show dev eth0 scope global 2>/dev/null | awk '{print $4; exit}' || true)"
		fi
		state="down"
		if ip -n "$ns" link show eth0 2>/dev/null | grep 'state UP' >/dev/null &&
			[ "$addr" = "$(host_ip "$h")/$PLEN" ] &&
			{ [ "$IPV6" = 0 ] || [ "$addr6" = "$(host_ip6 "$h")/$PLEN6" ]; } &&
			ns_exists "$SW" && ip -n "$SW" link show "$h" 2>/dev/null | grep "master $(bridge_of "$h").*state UP" >/dev/null; then
			state="up"
		else
			ok=1
		fi
		printf '%-14s %-18s %s\n' "$ns" "${addr:--}${addr6:+ $addr6}" "$state"
	done
	if [ $ok -eq 0 ]; then
		log "status: up"
	else
		log "status: NOT up"
	fi
	return $ok
}

cmd_check() {
	local from h ret=0
	require_ping
	cmd_status >/dev/null || die "check: lab is not up (run: $0 up)"
	for from in $(lb_hosts | awk '{print $1}') c1; do
		for h in $(lab_hosts); do
			[ "$h" != "$from" ] || continue
			# c1 has no route to the routed segment (the LBs and backends have)
			[ "$from" != c1 ] || [ "$h" != rc1 ] || continue
			if ip netns exec "${P}-$from" ping -q -c 1 -W 2 "$(host_ip "$h")" >/dev/null 2>&1; then
				echo "PASS: ping $from -> $h ($(host_ip "$h"))"
			else
				echo "FAIL: ping $from -> $h ($(host_ip "$h"))"
				ret=1
			fi
			[ "$IPV6" = 1 ] || continue
			if ip netns exec "${P}-$from" ping -6 -q -c 1 -W 2 "$(host_ip6 "$h")" >/dev/null 2>&1; then
				echo "PASS: ping -6 $from -> $h ($(host_ip6 "$h"))"
			else
				echo "FAIL: ping -6 $from -> $h ($(host_ip6 "$h"))"
				ret=1
			fi
		done
	done
	return $ret
}

cmd_add_backend() {
	local n="$1"
	valid_count backend "$n" $MAX_BACKENDS
	ns_exists "$SW" || die "add-backend: lab $P is not up (no $SW)"
	make_bridges "$BR"
	make_host "b$n"
	log "added ${P}-b$n $(host_ip "b$n")"
}

# add-router [MTU]: the router r1 and the routed client rc1 behind it, on br1 whose links
# all have MTU bytes; the LBs' and the backends' default routes through r1
cmd_add_router() {
	local mtu="${1:-$ROUTED_MTU}" ns="${P}-r1" h dev
	if ! [[ "$mtu" =~ ^[0-9]+$ ]] || [ "$mtu" -lt 1280 ] || [ "$mtu" -gt 1500 ]; then
		die "add-router: MTU '$mtu' out of range 1280..1500"
	fi
	ns_exists "$SW" || die "add-router: lab $P is not up (no $SW)"
	make_bridges "$BR" "$ROUTED_BR"
	make_host r1
	plug "$ns" eth1 r1b "$ROUTED_BR" "$ROUTED_NET.1" \
		"$(if [ "$IPV6" = 1 ]; then echo "${ROUTED_NET6}:1"; fi)"
	ip netns exec "$ns" sysctl -qw net.ipv4.ip_forward=1 >/dev/null
	[ "$IPV6" = 0 ] || ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.forwarding=1 >/dev/null
	make_host rc1
	for dev in r1b rc1 "$ROUTED_BR"; do ip -n "$SW" link set "$dev" mtu "$mtu"; done
	ip -n "$ns" link set eth1 mtu "$mtu"
	ip -n "${P}-rc1" link set eth0 mtu "$mtu"
	# the client announces a 1500-byte path's MSS: only path-MTU discovery makes the far
	# side's segments fit
	ip -n "${P}-rc1" route replace default via "$ROUTED_NET.1" advmss 1460
	if [ "$IPV6" = 1 ]; then
		ip -n "${P}-rc1" -6 route replace default via "${ROUTED_NET6}:1" advmss 1440
	fi
	for h in $(lb_hosts) $(existing_backends); do
		ns_exists "${P}-$h" || continue
		ip -n "${P}-$h" route replace default via "$(host_ip r1)"
		if [ "$IPV6" = 1 ]; then
			ip -n "${P}-$h" -6 route replace default via "$(host_ip6 r1)"
		fi
	done
	wait_link_up "$ns" eth1
	wait_link_up "${P}-rc1" eth0
	log "added router ${P}-r1 and client ${P}-rc1 $(host_ip rc1)$(if [ "$IPV6" = 1 ]; then echo " $(host_ip6 rc1)"; fi) behind it (MTU $mtu)"
}

main() {
	[ $# -ge 1 ] || usage
	require
	valid_prefix
	valid_count backend "$NBACKENDS" $MAX_BACKENDS
	valid_lbs
	valid_ipv6
	case "$1" in
	up) cmd_up ;;
	down) cmd_down ;;
	status) cmd_status ;;
	check) cmd_check ;;
	add-backend)
		[ $# -eq 2 ] || usage
		cmd_add_backend "$2"
		;;
	add-router)
		[ $# -le 2 ] || usage
		cmd_add_router "${2:-}"
		;;
	dr-backend)
		# dr-backend N up|down [VIP]: backend bN as a direct-routing backend (scripts/dr-backend.sh)
		if [ $# -lt 3 ] || [ $# -gt 4 ]; then usage; fi
		valid_count backend "$2" $MAX_BACKENDS
		ip netns exec "$P-b$2" bash "$(dirname "$0")/dr-backend.sh" "$3" "${4:-198.18.0.2}"
		;;
	*) usage ;;
	esac
}

main "$@"
