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
# Usage: lab.sh up | down | status | check | add-backend N
#   P = ${LAB_PREFIX:-lbnat};  up creates ${LAB_BACKENDS:-3} backends and ${LAB_LBS:-1} LBs
#   (1: lb; 2: lb1 and lb2).
#   up and down are idempotent; down first kills (by pid) whatever still runs inside the
#   lab's namespaces, then deletes them.
#   status exits 0 when every host of the lab is up, 1 otherwise.
#   check pings every host from the (first) LB and from c1 (inside the namespaces only).

set -euo pipefail

P="${LAB_PREFIX:-lbnat}"
NBACKENDS="${LAB_BACKENDS:-3}"
NLBS="${LAB_LBS:-1}"
SW="${P}-sw"
BR="br0"
NET="198.18.0"
PLEN=24
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
	echo "usage: LAB_PREFIX=P LAB_BACKENDS=N LAB_LBS=1|2 $0 up|down|status|check|add-backend N" >&2
	exit 2
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
	*) die "unknown host '$1'" ;;
	esac
}

# Namespaces of this lab that exist now (exact prefix, so lbt1 never matches lbt12-*).
lab_namespaces() {
	ip netns list | awk '{print $1}' |
		grep -E -- "^${P//./\\.}-(sw|lb|lb[12]|c[0-9]+|b[0-9]+)\$" || true
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
}

# expected_hosts without duplicates, in order
lab_hosts() {
	expected_hosts | awk '!seen[$0]++'
}

# make_host NAME: namespace ${P}-NAME, eth0 with its address, peer NAME on the bridge
make_host() {
	local h="$1" ns="${P}-$1" addr
	addr="$(host_ip "$h")"
	make_ns "$ns"
	plug "$ns" eth0 "$h" "$BR" "$addr"
}

wait_up() {
	local h
	for h in $(lab_hosts); do
		wait_link_up "${P}-$h" eth0
	done
}

cmd_up() {
	local h
	make_switch "$BR"
	for h in $(lab_hosts); do
		make_host "$h"
	done
	wait_up
	log "up: $(lab_namespaces | tr '\n' ' ')"
}

cmd_status() {
	local ok=0 h ns state addr
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
		state="down"
		if ip -n "$ns" link show eth0 2>/dev/null | grep 'state UP' >/dev/null &&
			[ "$addr" = "$(host_ip "$h")/$PLEN" ] &&
			ns_exists "$SW" && ip -n "$SW" link show "$h" 2>/dev/null | grep "master $BR.*state UP" >/dev/null; then
			state="up"
		else
			ok=1
		fi
		printf '%-14s %-18s %s\n' "$ns" "${addr:--}" "$state"
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
			if ip netns exec "${P}-$from" ping -q -c 1 -W 2 "$(host_ip "$h")" >/dev/null 2>&1; then
				echo "PASS: ping $from -> $h ($(host_ip "$h"))"
			else
				echo "FAIL: ping $from -> $h ($(host_ip "$h"))"
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
	make_switch "$BR"
	make_host "b$n"
	log "added ${P}-b$n $(host_ip "b$n")"
}

main() {
	[ $# -ge 1 ] || usage
	require
	valid_prefix
	valid_count backend "$NBACKENDS" $MAX_BACKENDS
	valid_lbs
	case "$1" in
	up) cmd_up ;;
	down) cmd_down ;;
	status) cmd_status ;;
	check) cmd_check ;;
	add-backend)
		[ $# -eq 2 ] || usage
		cmd_add_backend "$2"
		;;
	*) usage ;;
	esac
}

main "$@"
