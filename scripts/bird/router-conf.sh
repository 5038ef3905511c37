#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
#
# Write bird.conf (BIRD 2) for the router in front of lbnat's instances from router.conf.in
# (beside this script) to stdout, one BGP session per instance, and check it with `bird -p`
# when BIRD is installed.
#
#   router-conf.sh --router-id 198.18.1.1 --local 198.18.1.1 \
#       --instance lb1=198.18.1.11 --instance lb2=198.18.1.12 [options] > bird.conf
#
#   --router-id IP        BIRD's router id (the router's address)
#   --local IP            the router's address on the instances' segment (BGP's source)
#   --instance NAME=IP    an lbnat instance (its ExaBGP's address); repeat for each
#   --local-as N          the router's AS (65000)
#   --peer-as N           the instances' AS (65001)
#   --vip-prefix NET/LEN  the instances may announce /32s inside it, nothing else (198.18.100.0/24)
#   --hold-time N         seconds, 3-65535 (3)
#   --keepalive-time N    seconds, below the hold time (1)
#   --no-check            do not run `bird -p`
set -euo pipefail

me=router-conf
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
# shellcheck source=scripts/provision-common.sh
. "$repo/scripts/provision-common.sh"

usage() {
	sed -n '4,20p' "$0" | sed 's/^# \{0,1\}//'
}

router_id="" local_ip=""
instances=()
local_as=65000
peer_as=65001
vip_prefix=198.18.100.0/24
hold_time=3
keepalive_time=1
check=1
while [ $# -gt 0 ]; do
	case "$1" in
	--router-id | --local | --instance | --local-as | --peer-as | --vip-prefix | --hold-time | \
		--keepalive-time)
		[ $# -ge 2 ] || bad_usage "$1 needs a value"
		case "$1" in
		--router-id) router_id="$2" ;;
		--local) local_ip="$2" ;;
		--instance) instances+=("$2") ;;
		--local-as) local_as="$2" ;;
		--peer-as) peer_as="$2" ;;
		--vip-prefix) vip_prefix="$2" ;;
		--hold-time) hold_time="$2" ;;
		--keepalive-time) keepalive_time="$2" ;;
		esac
		shift 2
		;;
	--no-check) check=0; shift ;;
	-h | --help) usage; exit 0 ;;
	*) bad_usage "unknown argument '$1'" ;;
	esac
done
for opt in router_id local_ip; do
	[ -n "${!opt}" ] || bad_usage "--${opt/_ip/} is required"
	valid_ipv4 "${!opt}"
done
[ ${#instances[@]} -gt 0 ] || bad_usage "give at least one --instance NAME=IP"
for opt in local_as peer_as; do
	in_range "${!opt}" 1 4294967295 || bad_usage "--${opt/_/-} must be an AS number, 1-4294967295"
done
[[ "$vip_prefix" =~ ^[0-9.]+/[0-9]{1,2}$ ]] || bad_usage "--vip-prefix must be NET/LEN"
valid_ipv4 "${vip_prefix%/*}"
[ "${vip_prefix#*/}" -le 32 ] || bad_usage "--vip-prefix: a length of 0-32"
in_range "$hold_time" 3 65535 || bad_usage "--hold-time must be 3-65535 seconds"
if ! [[ "$keepalive_time" =~ ^[0-9]{1,5}$ ]] || [ "$keepalive_time" -lt 1 ] ||
	[ "$keepalive_time" -ge "$hold_time" ]; then
	bad_usage "--keepalive-time must be 1 or more and below the hold time"
fi

conf="$(fill_template "$here/router.conf.in" ROUTER_ID="$router_id" LOCAL_IP="$local_ip" \
	LOCAL_AS="$local_as" PEER_AS="$peer_as" VIP_PREFIX="$vip_prefix" HOLD_TIME="$hold_time" \
	KEEPALIVE_TIME="$keepalive_time")"
declare -A seen=()
for instance in "${instances[@]}"; do
	[[ "$instance" == *=* ]] || bad_usage "--instance '$instance' is not NAME=IP"
	name="${instance%%=*}" ip="${instance#*=}"
	# a BIRD protocol name: a letter first, then letters, digits and underscores
	[[ "$name" =~ ^[A-Za-z][A-Za-z0-9_]{0,31}$ ]] || bad_usage "--instance: '$name' is not a plain name"
	valid_ipv4 "$ip"
	[ "$ip" != "$local_ip" ] || bad_usage "--instance $name has the router's own address"
	if [ -n "${seen[$name]:-}" ] || [ -n "${seen[$ip]:-}" ]; then
		bad_usage "--instance $instance: its name or address given twice"
	fi
	seen[$name]=1 seen[$ip]=1
	conf+="$(printf '\n\nprotocol bgp %s from lbnat_instance {\n\tneighbor %s as %s;\n}' "$name" "$ip" "$peer_as")"
done
if [ "$check" = 1 ] && installed bird; then
	tmp="$(mktemp)"
	trap 'rm -f "$tmp"' EXIT
	printf '%s\n' "$conf" >"$tmp"
	check_conf bird -p -c "$tmp" || die "bird -p refuses the config written for router $router_id"
fi
printf '%s\n' "$conf"
