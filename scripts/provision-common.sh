# shellcheck shell=bash
# SPDX-License-Identifier: MIT
# Helpers shared by scripts/provision-{lb,backend,client}.sh (sourced, not run). The caller
# sets `me` (its name, for messages) before sourcing.

die() {
	echo "${me:-provision}: error: $*" >&2
	exit 1
}

# bad_usage MESSAGE: a mistake on the command line (exit 2, like lbnat's own mistakes)
bad_usage() {
	echo "${me:-provision}: $*" >&2
	echo "try: $0 --help" >&2
	exit 2
}

need_root() {
	[ "$(id -u)" -eq 0 ] || die "run as root ($1)"
}

valid_port() {
	if ! [[ "$1" =~ ^[0-9]{1,5}$ ]] || [ "$1" -lt 1 ] || [ "$1" -gt 65535 ]; then
		bad_usage "'$1' is not a port (1-65535)"
	fi
}

valid_ipv4() {
	local IFS=. part
	[[ "$1" =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] ||
		bad_usage "'$1' is not an IPv4 address"
	for part in $1; do
		[ "$((10#$part))" -le 255 ] || bad_usage "'$1' is not an IPv4 address"
	done
}

valid_name() {
	[[ "$1" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$ ]] ||
		bad_usage "'$1' is not a plain name (1-32 of [A-Za-z0-9_.-])"
}

# has_systemd: systemd is this machine's init (there is none inside a netns lab or a container)
has_systemd() {
	[ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1
}

# apt_install PACKAGE...: install the Debian packages that are missing (needs root)
apt_install() {
	local missing=() p
	for p in "$@"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
	done
	[ ${#missing[@]} -eq 0 ] && return 0
	command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get to install them"
	echo "${me:-provision}: apt-get install ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -q >/dev/null
	apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
}

# wait_listening PORT SECONDS: until something listens on TCP PORT here (ss from iproute2)
wait_listening() {
	local port="$1" i
	for ((i = 0; i < $2 * 10; i++)); do
		[ -n "$(ss -Hltn "sport = :$port" 2>/dev/null)" ] && return 0
		sleep 0.1
	done
	return 1
}

# iface_of IP: the interface holding IPv4 address IP here (nothing when none does)
iface_of() {
	ip -o -4 addr show 2>/dev/null | awk -v ip="$1" '{ split($4, a, "/"); if (a[1] == ip) { print $2; exit } }'
}
