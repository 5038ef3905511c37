#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
#
# Provision the load balancer: install lbnat, write its config, run it.
# Used by the Vagrant LB (systemd), the netns provisioning test and the compose lab
# (--foreground: there is no systemd in a namespace or a container).
#
#   provision-lb.sh --lb-ip IP --backend IP:PORT [--backend IP:PORT ...] [options]
#
#   --lb-ip IP            the virtual IP clients connect to (SRCIP): the LB's own address, or
#                         with --sync-peer the pair's VIP, which keepalived adds on the master
#   --backend IP:PORT     a chat backend (at least one; repeat)
#   --vip-port N          the chat service's virtual port (20000)
#   --web-vip-port N      the web service's virtual port (8080): HTTP to the same backends'
#                         web servers (provision-backend.sh --web-port); 0: no web service
#   --web-port N          the backends' web server port (80)
#   --config FILE         the config to write (/etc/lbnat/config.json, the unit's)
#   --admin-socket PATH   the admin socket in that config (/run/lbnat/lbnat.sock)
#   --venv DIR            install into this venv (/opt/lbnat: the unit runs /opt/lbnat/bin/lbnat)
#   --sync-own IP         one node of an HA pair (issue 19, docs/sync-protocol.md): this node's
#   --sync-peer IP        own address and its peer's; lbnat runs with --sync-listen OWN
#   --sync-secret-file F  --sync-peer PEER --sync-secret-file /etc/lbnat/sync.secret (F copied
#                         there, 0600) and may start before the VIP is on its interface
#                         (--interface: the one holding OWN, found here); then
#                         provision-keepalived.sh runs keepalived, which owns the VIP
#   --no-install          lbnat is installed already (lbnat on PATH, or $LBNAT)
#   --systemd             (the default) install scripts/systemd/lbnat.service, (re)start it
#   --foreground          exec `lbnat run --config FILE` in this process (stop it by pid)
#
# The config is docs/config.example.json with SRCIP, the admin socket, its TCP service "chat"
# (VIP port -> the backends) and a TCP service "web" like it (web VIP port -> the backends' web
# port); its UDP example service and its control channel (whose secret is a placeholder) are
# left out. Install: what lbnat needs to run and nothing else (no test or benchmark tools):
# Debian's python3, click, netifaces, jsonschema, setuptools and nftables, a venv that sees
# them, this checkout pip-installed into it without PyPI (--no-deps --no-build-isolation), and
# /usr/local/bin/lbnat linking to the venv's, so that `sudo lbnat status` finds it.
set -euo pipefail

me=provision-lb
repo="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=scripts/provision-common.sh
. "$repo/scripts/provision-common.sh"

usage() {
	sed -n '4,36p' "$0" | sed 's/^# \{0,1\}//'
}

lb_ip=""
backends=()
vip_port=20000
web_vip_port=8080
web_port=80
config=/etc/lbnat/config.json
admin_socket=/run/lbnat/lbnat.sock
venv=/opt/lbnat
install=1
mode=systemd
sync_own=""
sync_peer=""
sync_secret=""
secret_dest=/etc/lbnat/sync.secret
while [ $# -gt 0 ]; do
	case "$1" in
	--lb-ip | --backend | --vip-port | --web-vip-port | --web-port | --config | --admin-socket | --venv | \
		--sync-own | --sync-peer | --sync-secret-file)
		[ $# -ge 2 ] || bad_usage "$1 needs a value"
		case "$1" in
		--lb-ip) lb_ip="$2" ;;
		--backend) backends+=("$2") ;;
		--vip-port) vip_port="$2" ;;
		--web-vip-port) web_vip_port="$2" ;;
		--web-port) web_port="$2" ;;
		--config) config="$2" ;;
		--admin-socket) admin_socket="$2" ;;
		--venv) venv="$2" ;;
		--sync-own) sync_own="$2" ;;
		--sync-peer) sync_peer="$2" ;;
		--sync-secret-file) sync_secret="$2" ;;
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
[ -n "$lb_ip" ] || bad_usage "--lb-ip is required"
valid_ipv4 "$lb_ip"
[ ${#backends[@]} -gt 0 ] || bad_usage "give at least one --backend IP:PORT"
for b in "${backends[@]}"; do
	[[ "$b" == *:* ]] || bad_usage "backend '$b' is not IP:PORT"
	valid_ipv4 "${b%:*}"
	valid_port "${b##*:}"
done
valid_port "$vip_port"
if [ "$web_vip_port" != 0 ]; then
	valid_port "$web_vip_port"
	valid_port "$web_port"
	[ "$web_vip_port" != "$vip_port" ] || bad_usage "--web-vip-port must differ from --vip-port"
fi
[[ "$config" == /* ]] || bad_usage "--config must be an absolute path"
[[ "$admin_socket" == /* ]] || bad_usage "--admin-socket must be an absolute path"
[[ "$venv" == /* ]] || bad_usage "--venv must be an absolute path"
sync_args=()
if [ -n "$sync_own$sync_peer$sync_secret" ]; then
	if [ -z "$sync_own" ] || [ -z "$sync_peer" ] || [ -z "$sync_secret" ]; then
		bad_usage "--sync-own, --sync-peer and --sync-secret-file go together"
	fi
	valid_ipv4 "$sync_own"
	valid_ipv4 "$sync_peer"
	[ "$sync_own" != "$sync_peer" ] || bad_usage "--sync-own and --sync-peer must differ"
	if [ "$lb_ip" = "$sync_own" ] || [ "$lb_ip" = "$sync_peer" ]; then
		bad_usage "--lb-ip is the pair's VIP: neither node's own address"
	fi
	[ -r "$sync_secret" ] || bad_usage "cannot read the secret file '$sync_secret'"
	# beside the config, whose directory (and name) the secret follows
	secret_dest="$(dirname "$config")/sync.secret"
	sync_args=(--sync-listen "$sync_own" --sync-peer "$sync_peer" --sync-secret-file "$secret_dest")
fi
need_root "lbnat opens a packet socket and installs an nftables table"
if [ "$mode" = systemd ]; then
	has_systemd || die "systemd is not running here; use --foreground (netns lab, containers)"
fi

# --- install ---------------------------------------------------------------------------------
if [ "$install" = 1 ]; then
	# Debian's click, netifaces, jsonschema, prometheus-client and rich (netifaces has no wheel
	# for Python 3.11 and would need a compiler); the venv sees them through
	# --system-site-packages, and Debian's setuptools builds lbnat, so nothing comes from PyPI.
	apt_install python3 python3-venv python3-setuptools python3-wheel python3-click \
		python3-netifaces python3-jsonschema python3-prometheus-client python3-rich \
		nftables iproute2
	[ -x "$venv/bin/python3" ] || /usr/bin/python3 -m venv --system-site-packages "$venv"
	echo "$me: pip install $repo into $venv"
	"$venv/bin/pip" install -q --no-deps --no-build-isolation --no-cache-dir "$repo" ||
		die "pip install into $venv failed"
	lbnat="$venv/bin/lbnat"
	# sudo's secure_path has /usr/local/bin: `sudo lbnat status` as the docs say
	ln -sfn "$lbnat" /usr/local/bin/lbnat
	# and keepalived's hooks beside it (scripts/keepalived/: "$lbnat-ha check", "... role")
	ln -sfn "$lbnat-ha" /usr/local/bin/lbnat-ha
else
	lbnat="${LBNAT:-$(command -v lbnat || true)}"
fi
if [ -z "$lbnat" ] || ! [ -x "$lbnat" ]; then
	die "no lbnat command (install it, or drop --no-install)"
fi

# --- config ----------------------------------------------------------------------------------
mkdir -p "$(dirname "$config")"
tmp="$(mktemp "$config.XXXXXX")"
trap 'rm -f "$tmp"' EXIT
"${PYTHON:-python3}" - "$repo/docs/config.example.json" "$lb_ip" "$vip_port" "$web_vip_port" \
	"$web_port" "$admin_socket" "${backends[@]}" >"$tmp" <<'PY'
import copy
import json
import sys

example, lb_ip, vip_port, web_vip_port, web_port, admin_socket, *backends = sys.argv[1:]
with open(example) as f:
    config = json.load(f)
chat = next(s for s in config["services"] if s["name"] == "chat")
chat["port"] = int(vip_port)
chat["backends"] = [
    {"ip": b.rsplit(":", 1)[0], "port": int(b.rsplit(":", 1)[1]), "weight": 1, "name": f"b{n}"}
    for n, b in enumerate(backends, 1)
]
services = [chat]
if web_vip_port != "0":
    web = copy.deepcopy(chat)
    web.update(name="web", port=int(web_vip_port))
    for backend in web["backends"]:
        backend["port"] = int(web_port)
    services.append(web)
config.pop("control", None)
config.update(lb_ip=lb_ip, admin_socket=admin_socket, services=services)
json.dump(config, sys.stdout, indent=2)
print()
PY
chmod 0600 "$tmp"
"$lbnat" check-config "$tmp" >/dev/null || die "the config written for $lb_ip does not validate"
mv "$tmp" "$config"
trap - EXIT
echo "$me: wrote $config: $lb_ip:$vip_port -> ${backends[*]}"
if [ ${#sync_args[@]} -gt 0 ]; then
	# the VIP is not on an interface until keepalived adds it: lbnat is told which one (the
	# lab network's, e.g. eth1 on a Vagrant VM, whose eth0 is Vagrant's own)
	iface="$(iface_of "$sync_own")"
	[ -n "$iface" ] || die "no interface here holds --sync-own $sync_own"
	sync_args+=(--interface "$iface")
	if ! [ "$sync_secret" -ef "$secret_dest" ]; then
		install -m 0600 "$sync_secret" "$secret_dest"
	fi
	echo "$me: session sync $sync_own <-> $sync_peer (UDP 7001) on $iface, secret $secret_dest"
fi
if [ "$web_vip_port" != 0 ]; then
	echo "$me: and $lb_ip:$web_vip_port -> the same backends' port $web_port (web)"
fi

# --- run -------------------------------------------------------------------------------------
if [ "$mode" = foreground ]; then
	exec "$lbnat" run --config "$config" "${sync_args[@]}"
fi

unit=/etc/systemd/system/lbnat.service
# the unit runs /opt/lbnat/bin/lbnat and reads /etc/lbnat/config.json; point it elsewhere
# when told to
# (and with --sync-*, the sync options at the end of ExecStart)
sed -e "s|/opt/lbnat/bin/lbnat|$lbnat|g" -e "s|/etc/lbnat/config.json|$config|g" \
	-e "/^ExecStart=/s|\$| ${sync_args[*]}|" -e "/^ExecStart=/s| *\$||" \
	"$repo/scripts/systemd/lbnat.service" >"$unit"
chmod 0644 "$unit"
systemctl daemon-reload
systemctl enable lbnat.service >/dev/null 2>&1
# Type=notify: restart returns once lbnat says READY=1 (forwarding, its admin socket up), or
# fails when it exits first (or says nothing within the start timeout)
if ! systemctl restart lbnat.service || ! systemctl is-active --quiet lbnat.service ||
	! [ -S "$admin_socket" ]; then
	journalctl -u lbnat.service -n 30 --no-pager >&2 || true
	die "lbnat.service did not start (journalctl -u lbnat)"
fi
echo "$me: lbnat.service is running (systemctl status lbnat; journalctl -u lbnat)"
