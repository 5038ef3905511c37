#!/bin/bash
# SPDX-License-Identifier: MIT
#
# dr-backend.sh: make this host a backend of an lbnat direct-routing service (mode dr,
# docs/dr.md), or undo it. Run it on the backend (in the lab: inside its namespace, e.g.
# `ip netns exec lbnat-b1 scripts/dr-backend.sh up 198.18.0.2`, or `lab.sh dr-backend N up`).
#
#   dr-backend.sh up VIP      the VIP on lo (/32), and ARP settings so that this host never
#                             answers ARP for the VIP nor announces it: only the LB does
#   dr-backend.sh down VIP    the VIP off lo, the ARP settings back to the kernel's defaults
#   dr-backend.sh status VIP  exits 0 when the VIP is on lo and both settings are set
#
# arp_ignore=1: answer ARP only for addresses on the interface the request came in on (the
#   VIP is on lo, so a request for it on eth0 goes unanswered; the LB answers it).
# arp_announce=2: ARP requests this host sends use its own interface's address as the
#   source, never the VIP (a reply sourced from the VIP must not teach the segment that the
#   VIP lives here).
# Both are set for "all" (the kernel takes the larger of all and the interface's value), so
# every interface of the host is covered. IPv4 only, as is lbnat's DR mode.
#
# The service on the backend must listen on the VIP's port (or on 0.0.0.0, which also takes
# lbnat's health probes to the backend's own address): a direct-routed packet arrives with
# destination VIP:port unchanged. The backend's route back to the clients must not go
# through lbnat (in the lab: the clients are on the same segment).

set -euo pipefail

usage() {
	echo "usage: $0 up|down|status VIP" >&2
	exit 2
}

[ $# -eq 2 ] || usage
ACTION="$1"
VIP="$2"
[[ "$VIP" =~ ^([0-9]{1,3}\.){3}[0-9]{1,3}$ ]] || { echo "$0: $VIP is not an IPv4 address" >&2; exit 2; }

has_vip() { ip -4 -o addr show dev lo | grep -qw "inet $VIP/32"; }

case "$ACTION" in
up)
	sysctl -qw net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2
	has_vip || ip addr add "$VIP/32" dev lo
	ip link set lo up
	;;
down)
	if has_vip; then ip addr del "$VIP/32" dev lo; fi
	sysctl -qw net.ipv4.conf.all.arp_ignore=0 net.ipv4.conf.all.arp_announce=0
	;;
status)
	has_vip || exit 1
	[ "$(sysctl -n net.ipv4.conf.all.arp_ignore)" = 1 ] || exit 1
	[ "$(sysctl -n net.ipv4.conf.all.arp_announce)" = 2 ] || exit 1
	;;
*) usage ;;
esac
