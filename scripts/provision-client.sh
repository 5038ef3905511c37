#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
#
# Provision a client: a `lbnat-chat` command that runs the lab's chat client (and server)
# from this checkout, and curl, so a person on the client can type
#     lbnat-chat client 198.18.0.2 20000 alice
#     curl http://198.18.0.2:8080/
# Used by the Vagrant client and by the netns provisioning test.
#
#   provision-client.sh [--bin-dir DIR]     (/usr/local/bin)
set -euo pipefail

me=provision-client
repo="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=scripts/provision-common.sh
. "$repo/scripts/provision-common.sh"

bin_dir=/usr/local/bin
while [ $# -gt 0 ]; do
	case "$1" in
	--bin-dir) [ $# -ge 2 ] || bad_usage "--bin-dir needs a value"; bin_dir="$2"; shift 2 ;;
	-h | --help) sed -n '4,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
	*) bad_usage "unknown argument '$1'" ;;
	esac
done
[[ "$bin_dir" == /* ]] || bad_usage "--bin-dir must be an absolute path"
[ -d "$bin_dir" ] || die "$bin_dir is not a directory"
command -v python3 >/dev/null 2>&1 || { need_root "it installs python3"; apt_install python3; }
# curl: for the labs' web service (curl http://LB_IP:8080/)
command -v curl >/dev/null 2>&1 || { need_root "it installs curl"; apt_install curl; }

cat >"$bin_dir/lbnat-chat.tmp" <<WRAPPER
#!/bin/sh
# written by scripts/provision-client.sh: the lab's chat app from $repo
PYTHONPATH="$repo\${PYTHONPATH:+:\$PYTHONPATH}" exec "\${PYTHON:-python3}" -m lbnat_lab.chat "\$@"
WRAPPER
chmod 0755 "$bin_dir/lbnat-chat.tmp"
mv "$bin_dir/lbnat-chat.tmp" "$bin_dir/lbnat-chat"
echo "$me: $bin_dir/lbnat-chat client LB_IP 20000 NAME"
