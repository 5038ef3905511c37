#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
#
# Provision one backend: the lab's chat server (python3 -m lbnat_lab.chat server) on a port.
# Used by the Vagrant backends (as a systemd service), by the netns demo and tests and the
# compose lab (in the foreground, where there is no systemd).
#
#   provision-backend.sh --name b1 [--port 9000] [--systemd | --foreground]
#
#   --systemd      (the default) install lbnat-chat.service (run as a DynamicUser, from this
#                  checkout), start it and wait until it listens; needs root and systemd.
#   --foreground   exec the chat server in this process (its pid is this script's pid:
#                  start it with `&` and stop it by pid). Prints nothing of its own.
#
# The chat server runs from the checkout this script is in (PYTHONPATH), so a backend needs
# only python3; $PYTHON picks another interpreter.
set -euo pipefail

me=provision-backend
repo="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=scripts/provision-common.sh
. "$repo/scripts/provision-common.sh"

usage() {
	sed -n '4,16p' "$0" | sed 's/^# \{0,1\}//'
}

name=""
port=9000
mode=systemd
while [ $# -gt 0 ]; do
	case "$1" in
	--name) [ $# -ge 2 ] || bad_usage "--name needs a value"; name="$2"; shift 2 ;;
	--port) [ $# -ge 2 ] || bad_usage "--port needs a value"; port="$2"; shift 2 ;;
	--systemd) mode=systemd; shift ;;
	--foreground) mode=foreground; shift ;;
	-h | --help) usage; exit 0 ;;
	*) bad_usage "unknown argument '$1'" ;;
	esac
done
[ -n "$name" ] || bad_usage "--name is required (the server's name, e.g. b1)"
valid_name "$name"
valid_port "$port"

python="${PYTHON:-python3}"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

if [ "$mode" = foreground ]; then
	command -v "$python" >/dev/null 2>&1 || die "no $python here"
	exec "$python" -m lbnat_lab.chat server --port "$port" --name "$name"
fi

need_root "it installs a systemd service"
has_systemd || die "systemd is not running here; use --foreground (netns lab, containers)"
apt_install python3 iproute2
unit=/etc/systemd/system/lbnat-chat.service
cat >"$unit" <<UNIT
# written by scripts/provision-backend.sh
[Unit]
Description=lbnat lab chat server $name on port $port
Wants=network-online.target
After=network-online.target

[Service]
Type=exec
DynamicUser=yes
Environment=PYTHONPATH=$repo PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
ExecStart=/usr/bin/python3 -m lbnat_lab.chat server --port $port --name $name
Restart=on-failure
RestartSec=2
CapabilityBoundingSet=
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=read-only
PrivateTmp=yes
PrivateDevices=yes
RestrictAddressFamilies=AF_INET AF_UNIX

[Install]
WantedBy=multi-user.target
UNIT
systemctl daemon-reload
systemctl enable lbnat-chat.service >/dev/null 2>&1
systemctl restart lbnat-chat.service
if ! wait_listening "$port" 15; then
	journalctl -u lbnat-chat.service -n 20 --no-pager >&2 || true
	die "lbnat-chat.service does not listen on port $port"
fi
echo "$me: chat server $name listens on port $port (systemctl status lbnat-chat)"
