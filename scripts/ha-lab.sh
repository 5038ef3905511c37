#!/bin/bash
# SPDX-License-Identifier: MIT
#
# lbnat's HA lab: scripts/lab.sh with a pair of load balancers (LAB_LBS=2) instead of one.
#
#      ${P}-c1        ${P}-c2         ${P}-lb1                ${P}-lb2
#   198.18.0.11    198.18.0.12      198.18.0.3              198.18.0.4
#                                  (+198.18.0.2/24, the VIP, on keepalived's master)
#      eth0           eth0            eth0                    eth0
#        |              |               |  VRRP adverts and     |
#        |              |               |  lbnat's sync (UDP    |
#        |              |               |  7001), lb1 <-> lb2   |
#  +-----c1-------------c2-------------lb1---------------------lb2----+
#  |                   br0                                            |  ${P}-sw
#  +-----b1-------------b2--------------b3----------------------------+  (the switch)
#        |              |               |
#      eth0           eth0            eth0
#     ${P}-b1        ${P}-b2         ${P}-b3
#   198.18.0.21    198.18.0.22     198.18.0.23
#
# lab.sh builds it (the same bridge, veths and addresses; see its header). What this adds:
# in lb1 and lb2, net.ipv4.ip_nonlocal_bind=1, so that the backup's processes may bind the VIP
# it does not hold (keepalived adds it, with `dev eth0`, on the master only); and `vip`, which
# LB holds the VIP. Nothing runs in the lab after `up`: scripts/demo-ha.sh starts the chat
# servers, lbnat and keepalived (scripts/keepalived/).
#
# Usage: ha-lab.sh up | down | status | check | vip
#   P = ${LAB_PREFIX:-lbha} (not lab.sh's lbnat: both labs can exist side by side);
#   up creates ${LAB_BACKENDS:-3} backends. up and down are idempotent; down kills (by pid,
#   lab.sh) whatever still runs in the lab's namespaces, keepalived and lbnat too, then
#   deletes them.
#   status: lab.sh's, and where the VIP is; exit 0 when every host is up.
#   check: lab.sh's pings (from lb1 and c1).
#   vip: prints lb1, lb2 or none (exit 0), or "lb1 lb2" (exit 1: both hold it, split brain).

set -euo pipefail

# Kselftest framework requirement - SKIP code is 4.
ksft_skip=4

export LAB_PREFIX="${LAB_PREFIX:-lbha}"
export LAB_LBS=2
P="$LAB_PREFIX"
VIP=198.18.0.2
LAB_SH="$(dirname "$0")/lab.sh"

log() { echo "ha-lab: $*"; }

usage() {
	echo "usage: LAB_PREFIX=P LAB_BACKENDS=N $0 up|down|status|check|vip" >&2
	exit 2
}

require() {
	if [ "$(id -u)" -ne 0 ]; then
		echo "SKIP: ha-lab.sh needs root" >&2
		exit $ksft_skip
	fi
}

# holders: the LBs whose eth0 holds the VIP now, one per line
holders() {
	local lb
	for lb in lb1 lb2; do
		if ip -n "$P-$lb" -4 -o addr show dev eth0 2>/dev/null | grep -q " inet $VIP/"; then
			echo "$lb"
		fi
	done
}

cmd_up() {
	local lb
	"$LAB_SH" up
	for lb in lb1 lb2; do
		ip netns exec "$P-$lb" sysctl -qw net.ipv4.ip_nonlocal_bind=1
	done
	log "up: lb1 198.18.0.3, lb2 198.18.0.4, VIP $VIP unassigned (keepalived adds it)"
}

cmd_status() {
	local ok=0 who
	"$LAB_SH" status || ok=1
	who="$(holders | tr '\n' ' ')"
	printf '%-14s %-18s %s\n' "VIP" "$VIP" "on ${who:-nobody}"
	return $ok
}

cmd_vip() {
	local who
	who="$(holders | tr '\n' ' ')"
	who="${who% }"
	echo "${who:-none}"
	[[ "$who" != *" "* ]]
}

main() {
	[ $# -eq 1 ] || usage
	require
	case "$1" in
	up) cmd_up ;;
	down) "$LAB_SH" down ;;
	status) cmd_status ;;
	check) "$LAB_SH" check ;;
	vip) cmd_vip ;;
	*) usage ;;
	esac
}

main "$@"
