#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
#
# Provision one backend: the lab's chat server (python3 -m lbnat_lab.chat server) on a port,
# and its web server (python3 -m lbnat_lab.web: a page naming the backend) on another.
# Used by the Vagrant backends (as systemd services), by the netns demo and tests and the
# compose lab (in the foreground, where there is no systemd).
#
#   provision-backend.sh --name b1 [--port 9000] [--web-port 80] [--systemd | --foreground]
#
#   --web-port N   the web server's port (80); 0: no web server
#   --systemd      (the default) install lbnat-chat.service and lbnat-web.service (each run
#                  as a DynamicUser, from this checkout), start them and wait until they
#                  listen; needs root and systemd.
#   --foreground   run the servers in this process: the chat server alone is exec'd (its pid
#                  is this script's); with the web server too, this script waits for both and
#                  stops both on SIGTERM/SIGINT or when either ends. Start it with `&` and
#                  stop it by pid. Prints nothing of its own.
#
# The servers run from the checkout this script is in (PYTHONPATH), so a backend needs only
# python3; $PYTHON picks another interpreter.
set -euo pipefail

me=provision-backend
repo="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=scripts/provision-common.sh
. "$repo/scripts/provision-common.sh"

usage() {
	sed -n '4,21p' "$0" | sed 's/^# \{0,1\}//'
}

name=""
port=9000
web_port=80
mode=systemd
while [ $# -gt 0 ]; do
	case "$1" in
	--name) [ $# -ge 2 ] || bad_usage "--name needs a value"; name="$2"; shift 2 ;;
	--port) [ $# -ge 2 ] || bad_usage "--port needs a value"; port="$2"; shift 2 ;;
	--web-port) [ $# -ge 2 ] || bad_usage "--web-port needs a value"; web_port="$2"; shift 2 ;;
	--systemd) mode=systemd; shift ;;
	--foreground) mode=foreground; shift ;;
	-h | --help) usage; exit 0 ;;
	*) bad_usage "unknown argument '$1'" ;;
	esac
done
[ -n "$name" ] || bad_usage "--name is required (the server's name, e.g. b1)"
valid_name "$name"
valid_port "$port"
if [ "$web_port" != 0 ]; then
	valid_port "$web_port"
	[ "$web_port" != "$port" ] || bad_usage "--web-port must differ from --port"
fi

python="${PYTHON:-python3}"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

if [ "$mode" = foreground ]; then
	command -v "$python" >/dev/null 2>&1 || die "no $python here"
	if [ "$web_port" = 0 ]; then
		exec "$python" -m lbnat_lab.chat server --port "$port" --name "$name"
	fi
	"$python" -m lbnat_lab.chat server --port "$port" --name "$name" &
	chat_pid=$!
	"$python" -m lbnat_lab.web --port "$web_port" --name "$name" &
	web_pid=$!
	# stop both by pid: on a signal to this script, or when one of them ends
	stop_servers() {
		kill -TERM "$chat_pid" "$web_pid" 2>/dev/null || true
		wait "$chat_pid" "$web_pid" 2>/dev/null || true
	}
	trap 'stop_servers; exit 0' TERM INT
	status=0
	wait -n "$chat_pid" "$web_pid" || status=$?
	stop_servers
	exit "$status"
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
web_unit=/etc/systemd/system/lbnat-web.service
if [ "$web_port" != 0 ]; then
	cat >"$web_unit" <<UNIT
# written by scripts/provision-backend.sh
[Unit]
Description=lbnat lab web server $name on port $web_port
Wants=network-online.target
After=network-online.target

[Service]
Type=exec
DynamicUser=yes
Environment=PYTHONPATH=$repo PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
ExecStart=/usr/bin/python3 -m lbnat_lab.web --port $web_port --name $name
Restart=on-failure
RestartSec=2
# a port below 1024, and nothing else
AmbientCapabilities=CAP_NET_BIND_SERVICE
CapabilityBoundingSet=CAP_NET_BIND_SERVICE
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=read-only
PrivateTmp=yes
PrivateDevices=yes
RestrictAddressFamilies=AF_INET AF_UNIX

[Install]
WantedBy=multi-user.target
UNIT
elif [ -e "$web_unit" ]; then
	systemctl disable --now lbnat-web.service >/dev/null 2>&1 || true
	rm -f "$web_unit"
fi
systemctl daemon-reload
systemctl enable lbnat-chat.service >/dev/null 2>&1
systemctl restart lbnat-chat.service
if ! wait_listening "$port" 15; then
	journalctl -u lbnat-chat.service -n 20 --no-pager >&2 || true
	die "lbnat-chat.service does not listen on port $port"
fi
echo "$me: chat server $name listens on port $port (systemctl status lbnat-chat)"
if [ "$web_port" != 0 ]; then
	systemctl enable lbnat-web.service >/dev/null 2>&1
	systemctl restart lbnat-web.service
	if ! wait_listening "$web_port" 15; then
		journalctl -u lbnat-web.service -n 20 --no-pager >&2 || true
		die "lbnat-web.service does not listen on port $web_port"
	fi
	echo "$me: web server $name listens on port $web_port (systemctl status lbnat-web)"
fi
