#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
#
# Provision keepalived for one node of an lbnat HA pair: install it, install the notify
# script, write its config (scripts/keepalived/keepalived-conf.sh), run it. Used by the Vagrant
# LBs lb1 and lb2 (systemd, after provision-lb.sh with --sync-own/--sync-peer) and by the
# netns provisioning test (--foreground: there is no systemd in a namespace).
#
#   provision-keepalived.sh --name NAME --own IP --peer IP --vip IP --priority N [options]
#
#   --name NAME           router_id (lb1)
#   --own IP              this node's address (VRRP adverts' source, lbnat's --sync-own)
#   --peer IP             the other node's address
#   --vip IP              the VIP keepalived adds on the master (lbnat's SRCIP, --lb-ip)
#   --priority N          1-254: the higher one is master when both start together
#   --interface DEV       where the VIP goes (the one holding --own, found here: eth1 on a
#                         Vagrant VM); --vip-prefix N: the VIP's prefix, the segment's (24)
#   --admin-socket PATH   lbnat's admin socket (/run/lbnat/lbnat.sock)
#   --lbnat PATH          the lbnat command keepalived's scripts run (/usr/local/bin/lbnat)
#   --conf FILE           the config to write (/etc/keepalived/keepalived.conf)
#   --notify-script PATH  where the notify script is installed (/usr/local/sbin/lbnat-notify):
#                         keepalived runs only scripts that root owns in root's directories,
#                         and the checkout (/vagrant) is the vagrant user's
#   --no-install          keepalived is installed already
#   --systemd             (the default) keepalived.service, VRRP only, after lbnat.service;
#                         (re)started
#   --foreground          exec keepalived in this process (VRRP only, logs on stdout; stop it
#                         by pid), with pid files beside --conf
#
# keepalived stays in FAULT, and never takes the VIP, until `lbnat-ha check` answers that
# lbnat is ready (synced with its peer, or alone): start lbnat first or not, either works.
set -euo pipefail

me=provision-keepalived
repo="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=scripts/provision-common.sh
. "$repo/scripts/provision-common.sh"

usage() {
	sed -n '4,31p' "$0" | sed 's/^# \{0,1\}//'
}

gen_args=()
own=""
interface=""
conf=/etc/keepalived/keepalived.conf
notify_script=/usr/local/sbin/lbnat-notify
lbnat=/usr/local/bin/lbnat
install=1
mode=systemd
while [ $# -gt 0 ]; do
	case "$1" in
	--name | --own | --peer | --vip | --priority | --interface | --vip-prefix | --admin-socket)
		[ $# -ge 2 ] || bad_usage "$1 needs a value"
		case "$1" in
		--own) own="$2" ;;
		--interface) interface="$2" ;;
		esac
		gen_args+=("$1" "$2")
		shift 2
		;;
	--lbnat | --conf | --notify-script)
		[ $# -ge 2 ] || bad_usage "$1 needs a value"
		case "$1" in
		--lbnat) lbnat="$2" ;;
		--conf) conf="$2" ;;
		--notify-script) notify_script="$2" ;;
		esac
		shift 2
		;;
	--no-install) install=0; shift ;;
	--systemd) mode=systemd; shift ;;
	--foreground) mode=foreground; shift ;;
	-h | --help) usage; exit 0 ;;
	*) bad_usage "unknown argument '$1'" ;;
	esac
done
for path in "$conf" "$notify_script" "$lbnat"; do
	[[ "$path" == /* ]] || bad_usage "'$path' is not an absolute path"
done
# the arguments checked now (usage mistakes: exit 2), before anything is installed
"$repo/scripts/keepalived/keepalived-conf.sh" "${gen_args[@]}" --lbnat "$lbnat" \
	--notify "$notify_script" --no-check >/dev/null
need_root "keepalived adds and removes the VIP"
if [ "$mode" = systemd ]; then
	has_systemd || die "systemd is not running here; use --foreground (netns lab, containers)"
fi

# --- install ---------------------------------------------------------------------------------
if [ "$install" = 1 ]; then
	# Debian's keepalived starts itself on install (with no config it would just idle); it
	# must not run before its config is written: policy-rc.d 101 for the install only
	if ! dpkg-query -W -f='${Status}' keepalived 2>/dev/null | grep -q "install ok installed"; then
		printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
		chmod 0755 /usr/sbin/policy-rc.d
		trap 'rm -f /usr/sbin/policy-rc.d' EXIT
		apt_install keepalived
		rm -f /usr/sbin/policy-rc.d
		trap - EXIT
	fi
fi
keepalived="$(PATH="$PATH:/usr/sbin:/sbin" command -v keepalived || true)"
[ -n "$keepalived" ] || die "no keepalived (apt-get install keepalived, or drop --no-install)"
[ -x "$lbnat" ] || die "no lbnat at $lbnat (provision-lb.sh first, or --lbnat PATH)"
if [ -z "$interface" ]; then
	interface="$(iface_of "$own")"
	[ -n "$interface" ] || die "no interface here holds --own $own (or give --interface)"
	gen_args+=(--interface "$interface")
fi

# --- notify script and config ----------------------------------------------------------------
install -D -m 0755 "$repo/scripts/keepalived/lbnat-notify" "$notify_script"
mkdir -p "$(dirname "$conf")"
tmp="$(mktemp "$conf.XXXXXX")"
trap 'rm -f "$tmp"' EXIT
# (the generator checks the result with `keepalived -t`)
"$repo/scripts/keepalived/keepalived-conf.sh" "${gen_args[@]}" --lbnat "$lbnat" \
	--notify "$notify_script" >"$tmp" || die "no keepalived config written"
chmod 0644 "$tmp"
mv "$tmp" "$conf"
trap - EXIT
echo "$me: wrote $conf (router_id $(awk '$1 == "router_id" { print $2; exit }' "$conf")," \
	"priority $(awk '$1 == "priority" { print $2; exit }' "$conf"))"

# --- run -------------------------------------------------------------------------------------
if [ "$mode" = foreground ]; then
	# -P VRRP only, -n in the foreground, -l -G logs on stdout and not to syslog, pid files
	# of its own (two keepalived may run on one machine, in two namespaces)
	exec "$keepalived" -n -l -D -G -P -f "$conf" -p "$conf.pid" -r "$conf.vrrp.pid"
fi

# Debian's keepalived.service runs `keepalived --dont-fork $DAEMON_ARGS`, DAEMON_ARGS from
# /etc/default/keepalived: VRRP only (no IPVS checker). The drop-in orders it after lbnat (at
# boot lbnat is up first; chk_lbnat would hold keepalived in FAULT until it is anyway), and
# restarts it when it dies: Debian's unit has no Restart=, and a killed keepalived leaves the
# VIP on the interface (this host would go on answering ARP for it) until the next one starts
# and removes it.
sed -i 's/^DAEMON_ARGS=.*/DAEMON_ARGS="--vrrp"/' /etc/default/keepalived 2>/dev/null ||
	echo 'DAEMON_ARGS="--vrrp"' >/etc/default/keepalived
mkdir -p /etc/systemd/system/keepalived.service.d
cat >/etc/systemd/system/keepalived.service.d/lbnat.conf <<'UNIT'
# written by scripts/provision-keepalived.sh: keepalived owns lbnat's VIP
[Unit]
After=lbnat.service
Wants=lbnat.service

[Service]
Restart=on-failure
RestartSec=1
UNIT
systemctl daemon-reload
systemctl enable keepalived.service >/dev/null 2>&1
if ! systemctl restart keepalived.service || ! systemctl is-active --quiet keepalived.service; then
	journalctl -u keepalived.service -n 30 --no-pager >&2 || true
	die "keepalived.service did not start (journalctl -u keepalived)"
fi
echo "$me: keepalived.service is running (journalctl -u keepalived; ip -4 addr show)"
