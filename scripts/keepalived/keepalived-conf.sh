#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
#
# Write keepalived.conf for one node of an lbnat pair from keepalived.conf.in (beside this
# script) to stdout, and check it with `keepalived -t` when keepalived is installed.
#
#   keepalived-conf.sh --name lb1 --own 198.18.0.3 --peer 198.18.0.4 --vip 198.18.0.2 \
#       --priority 150 [options] > /etc/keepalived/keepalived.conf
#
#   --name NAME           router_id, for the logs (lb1)
#   --own IP              this node's address on the interface (the adverts' source)
#   --peer IP             the other node's address (the adverts go there: unicast)
#   --vip IP              the virtual IP keepalived adds on the master (lbnat's SRCIP)
#   --vip-prefix N        its prefix length: the segment's, as the node's own address (24)
#   --priority N          1-254; the higher one is master when both start together
#   --interface DEV       where the VIP goes and the adverts go out (eth0)
#   --vrid N              virtual_router_id, 1-255, the same on both nodes (51)
#   --lbnat PATH          the lbnat command; the scripts run lbnat-ha beside it (/usr/local/bin/lbnat)
#   --admin-socket PATH   lbnat's admin socket (/run/lbnat/lbnat.sock)
#   --notify PATH         the notify script (this directory's lbnat-notify)
#   --notify-log FILE     the notify script logs there instead of syslog + stderr
#   --no-check            do not run `keepalived -t` (which needs --lbnat and --notify to exist)
#
# keepalived's script security refuses scripts that a non-root user could change: --lbnat
# and --notify must be root's, in directories only root can write. `keepalived -t` also
# fails when a script is missing (keepalived would silently drop the chk_lbnat gate).
set -euo pipefail

me=keepalived-conf
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
# shellcheck source=scripts/provision-common.sh
. "$repo/scripts/provision-common.sh"

usage() {
	sed -n '4,26p' "$0" | sed 's/^# \{0,1\}//'
}

name="" own="" peer="" vip="" priority=""
vip_prefix=24
interface=eth0
vrid=51
lbnat=/usr/local/bin/lbnat
admin_socket=/run/lbnat/lbnat.sock
notify="$here/lbnat-notify"
notify_log=""
check=1
while [ $# -gt 0 ]; do
	case "$1" in
	--name | --own | --peer | --vip | --vip-prefix | --priority | --interface | --vrid | --lbnat | \
		--admin-socket | --notify | --notify-log)
		[ $# -ge 2 ] || bad_usage "$1 needs a value"
		case "$1" in
		--name) name="$2" ;;
		--own) own="$2" ;;
		--peer) peer="$2" ;;
		--vip) vip="$2" ;;
		--vip-prefix) vip_prefix="$2" ;;
		--priority) priority="$2" ;;
		--interface) interface="$2" ;;
		--vrid) vrid="$2" ;;
		--lbnat) lbnat="$2" ;;
		--admin-socket) admin_socket="$2" ;;
		--notify) notify="$2" ;;
		--notify-log) notify_log="$2" ;;
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
for opt in own peer vip; do
	[ -n "${!opt}" ] || bad_usage "--$opt is required"
	valid_ipv4 "${!opt}"
done
[ "$own" != "$peer" ] || bad_usage "--own and --peer must differ"
if [ "$vip" = "$own" ] || [ "$vip" = "$peer" ]; then
	bad_usage "--vip must be neither node's own address"
fi
in_range "$priority" 1 254 || bad_usage "--priority must be 1-254"
in_range "$vip_prefix" 1 32 || bad_usage "--vip-prefix must be 1-32"
in_range "$vrid" 1 255 || bad_usage "--vrid must be 1-255"
[[ "$interface" =~ ^[A-Za-z0-9_.-]{1,15}$ ]] || bad_usage "'$interface' is not an interface name"
valid_abs_path --lbnat "$lbnat"
valid_abs_path --admin-socket "$admin_socket"
valid_abs_path --notify "$notify"
if [ -n "$notify_log" ]; then
	[[ "$notify_log" =~ ^/[A-Za-z0-9_./+-]+$ ]] || bad_usage "--notify-log must be a plain absolute path"
	notify_log=" --log $notify_log"
fi

conf="$(fill_template "$here/keepalived.conf.in" ROUTER_ID="$name" OWN="$own" PEER="$peer" \
	VIP="$vip" VIP_PREFIX="$vip_prefix" PRIORITY="$priority" INTERFACE="$interface" VRID="$vrid" \
	LBNAT="$lbnat" ADMIN_SOCKET="$admin_socket" NOTIFY="$notify" NOTIFY_LOG="$notify_log")"
if [ "$check" = 1 ] && installed keepalived; then
	tmp="$(mktemp)"
	trap 'rm -f "$tmp"' EXIT
	printf '%s\n' "$conf" >"$tmp"
	check_conf keepalived -t -f "$tmp" || die "keepalived -t refuses the config written for $name"
fi
printf '%s\n' "$conf"
