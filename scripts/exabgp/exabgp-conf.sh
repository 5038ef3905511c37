#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
#
# Write exabgp.conf for one lbnat instance behind an ECMP router from exabgp.conf.in (beside
# this script) to stdout, and check it with `exabgp --test` when ExaBGP is installed.
#
#   exabgp-conf.sh --name lb1 --own 198.18.1.11 --router 198.18.1.1 [options] > exabgp.conf
#
#   --name NAME           the neighbor's description, for the logs (lb1)
#   --own IP              this instance's address: BGP's local-address and router-id
#   --router IP           the router's address (the BGP neighbor)
#   --local-as N          this instance's AS (65001; every instance the same)
#   --peer-as N           the router's AS (65000)
#   --hold-time N         seconds, 0 or 3-65535 (3: the router drops a silent instance in 3 s)
#   --lbnat-bgp PATH      the process ExaBGP runs (/usr/local/bin/lbnat-bgp)
#   --admin-socket PATH   lbnat's admin socket (/run/lbnat/lbnat.sock)
#   --vip IP              pin the VIP: lbnat-bgp announces it only when lbnat names it too
#   --no-check            do not run `exabgp --test`
#
# Run ExaBGP with exabgp.env (beside this script): exabgp --env .../exabgp.env exabgp.conf
set -euo pipefail

me=exabgp-conf
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
# shellcheck source=scripts/provision-common.sh
. "$repo/scripts/provision-common.sh"

usage() {
	sed -n '4,21p' "$0" | sed 's/^# \{0,1\}//'
}

name="" own="" router="" vip=""
local_as=65001
peer_as=65000
hold_time=3
lbnat_bgp=/usr/local/bin/lbnat-bgp
admin_socket=/run/lbnat/lbnat.sock
check=1
while [ $# -gt 0 ]; do
	case "$1" in
	--name | --own | --router | --local-as | --peer-as | --hold-time | --lbnat-bgp | \
		--admin-socket | --vip)
		[ $# -ge 2 ] || bad_usage "$1 needs a value"
		case "$1" in
		--name) name="$2" ;;
		--own) own="$2" ;;
		--router) router="$2" ;;
		--local-as) local_as="$2" ;;
		--peer-as) peer_as="$2" ;;
		--hold-time) hold_time="$2" ;;
		--lbnat-bgp) lbnat_bgp="$2" ;;
		--admin-socket) admin_socket="$2" ;;
		--vip) vip="$2" ;;
		esac
		shift 2
		;;
	--no-check) check=0; shift ;;
	-h | --help) usage; exit 0 ;;
	*) bad_usage "unknown argument '$1'" ;;
	esac
done
[ -n "$name" ] || bad_usage "--name is required"
valid_name "$name"
for opt in own router; do
	[ -n "${!opt}" ] || bad_usage "--$opt is required"
	valid_ipv4 "${!opt}"
done
[ "$own" != "$router" ] || bad_usage "--own and --router must differ"
vip_option=""
if [ -n "$vip" ]; then
	valid_ipv4 "$vip"
	vip_option=" --vip $vip"
fi
for opt in local_as peer_as; do
	in_range "${!opt}" 1 4294967295 || bad_usage "--${opt/_/-} must be an AS number, 1-4294967295"
done
if ! [[ "$hold_time" =~ ^[0-9]{1,5}$ ]] || [ "$hold_time" -gt 65535 ] ||
	{ [ "$hold_time" -ne 0 ] && [ "$hold_time" -lt 3 ]; }; then
	bad_usage "--hold-time must be 0 or 3-65535 seconds (RFC 4271)"
fi
valid_abs_path --lbnat-bgp "$lbnat_bgp"
valid_abs_path --admin-socket "$admin_socket"

conf="$(fill_template "$here/exabgp.conf.in" NAME="$name" OWN="$own" ROUTER="$router" \
	LOCAL_AS="$local_as" PEER_AS="$peer_as" HOLD_TIME="$hold_time" LBNAT_BGP="$lbnat_bgp" \
	ADMIN_SOCKET="$admin_socket" VIP_OPTION="$vip_option")"
if [ "$check" = 1 ] && installed exabgp; then
	tmp="$(mktemp -d)"
	trap 'rm -rf "$tmp"' EXIT
	printf '%s\n' "$conf" >"$tmp/exabgp.conf"
	# --test parses the file and exits (1 on a mistake); from an empty directory, with this
	# environment, so that it looks for no CLI pipes
	(cd "$tmp" && check_conf exabgp --env "$here/exabgp.env" --test "$tmp/exabgp.conf") ||
		die "exabgp --test refuses the config written for $name"
fi
printf '%s\n' "$conf"
