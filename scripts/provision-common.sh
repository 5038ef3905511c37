# shellcheck shell=bash
# SPDX-License-Identifier: MIT
# Helpers shared by scripts/provision-*.sh and the config generators scripts/bird/router-conf.sh,
# scripts/exabgp/exabgp-conf.sh and scripts/keepalived/keepalived-conf.sh (sourced, not run).
# The caller sets `me` (its name, for messages) before sourcing.

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

# in_range N MIN MAX: N is a plain number (at most as many digits as MAX) from MIN to MAX
in_range() {
	[[ "$1" =~ ^[0-9]{1,${#3}}$ ]] && [ "$1" -ge "$2" ] && [ "$1" -le "$3" ]
}

# valid_abs_path OPTION PATH: PATH is absolute and plain (it goes into a config unquoted)
valid_abs_path() {
	[[ "$2" == /* ]] || bad_usage "$1 must be an absolute path"
	[[ "$2" =~ ^[A-Za-z0-9_./+-]+$ ]] || bad_usage "$1: no spaces or quotes"
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

# fill_template FILE NAME=VALUE...: FILE with every @NAME@ replaced by its VALUE, to stdout;
# exits 1 if a placeholder is left (the template and its generator disagree)
fill_template() {
	local file="$1" subst=() pair conf
	shift
	for pair in "$@"; do subst+=(-e "s|@${pair%%=*}@|${pair#*=}|g"); done
	conf="$(sed "${subst[@]}" "$file")"
	if grep -q '@[A-Z_]*@' <<<"$conf"; then
		die "placeholders left: $(grep -o '@[A-Z_]*@' <<<"$conf" | sort -u | tr '\n' ' ')"
	fi
	printf '%s\n' "$conf"
}

# installed PROGRAM: PROGRAM is on PATH or in /usr/sbin or /sbin (where Debian puts bird,
# exabgp and keepalived; a user's PATH may lack them)
installed() {
	PATH="$PATH:/usr/sbin:/sbin" command -v "$1" >/dev/null 2>&1
}

# check_conf PROGRAM ARGS...: run a config check (PROGRAM from PATH, /usr/sbin or /sbin);
# quiet when it passes, else PROGRAM's output to stderr and status 1
check_conf() {
	local out
	if ! out="$(PATH="$PATH:/usr/sbin:/sbin" "$@" 2>&1)"; then
		echo "$out" >&2
		return 1
	fi
}
