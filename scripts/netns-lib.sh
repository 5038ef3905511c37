# shellcheck shell=bash
# SPDX-License-Identifier: MIT
#
# The namespace-lab helpers shared by scripts/lab.sh and scripts/ecmp-lab.sh (sourced, not
# run): the root and iproute2 checks, the LAB_PREFIX check, the namespaces, the switch's
# bridges and the veths plugged into them, and `down`. Each lab keeps its own topology
# (addresses, hosts, routes), usage, status and check; see its header.
#
# A lab script defines, before it calls any of these:
#   P               its prefix (LAB_PREFIX): every namespace is ${P}-something
#   SW              the switch namespace, ${P}-sw, which holds the bridges and the veths' peers
#   PLEN            the prefix length of every address plugged in
#   PLEN6           (optional, 64) the same for the IPv6 addresses of a dual-stack lab
#   KILL_WAIT       tenths of a second kill_ns_pids gives processes after SIGTERM
#   log MESSAGE     and die MESSAGE (exit 1), prefixed with the lab's name
#   lab_namespaces  the lab's namespaces that exist now, one per line

# Kselftest framework requirement - SKIP code is 4.
ksft_skip=4

# require: root and the ip tool, else SKIP (exit 4: a test harness without them skips)
require() {
	if [ "$(id -u)" -ne 0 ]; then
		echo "SKIP: ${0##*/} needs root" >&2
		exit $ksft_skip
	fi
	if ! command -v ip >/dev/null 2>&1; then
		echo "SKIP: could not run without the ip tool (iproute2)" >&2
		exit $ksft_skip
	fi
}

# require_ping: `check` pings; without ping it SKIPs
require_ping() {
	if ! command -v ping >/dev/null 2>&1; then
		echo "SKIP: check needs ping (iputils-ping)" >&2
		exit $ksft_skip
	fi
}

valid_prefix() {
	# Namespace names become file names under /run/netns; keep them plain and short.
	[[ "$P" =~ ^[A-Za-z0-9_.]{1,16}$ ]] || die "bad LAB_PREFIX '$P' (1-16 of [A-Za-z0-9_.])"
}

# valid_count WHAT N MAX: N is a host number 1..MAX (WHAT: backend, instance; for the message)
valid_count() {
	if ! [[ "$2" =~ ^[0-9]+$ ]] || [ "$2" -lt 1 ] || [ "$2" -gt "$3" ]; then
		die "$1 number '$2' out of range 1..$3"
	fi
}

ns_exists() {
	ip netns list | awk '{print $1}' | grep -x -- "$1" >/dev/null
}

no_ipv6() {
	# $1 namespace, $2.. interfaces; quiet no-op where the kernel has no IPv6
	local ns="$1" dev
	shift
	[ -d /proc/sys/net/ipv6 ] || return 0
	for dev in "$@"; do
		ip netns exec "$ns" sysctl -qw "net.ipv6.conf.$dev.disable_ipv6=1" >/dev/null 2>&1 || true
	done
}

make_ns() {
	local ns="$1"
	if ! ns_exists "$ns"; then
		ip netns add "$ns"
	fi
	ip -n "$ns" link set lo up
	# new interfaces in this namespace start without IPv6
	no_ipv6 "$ns" default all
}

# make_switch BRIDGE...: the switch namespace $SW with these bridges, up
make_switch() {
	local br
	make_ns "$SW"
	for br in "$@"; do
		if ! ip -n "$SW" link show "$br" >/dev/null 2>&1; then
			# STP off (the default): ports forward at once, no listening/learning delay
			ip -n "$SW" link add "$br" type bridge stp_state 0
		fi
		no_ipv6 "$SW" "$br"
		ip -n "$SW" link set "$br" up
	done
	# with br_netfilter loaded, bridged IPv4 would also traverse this namespace's
	# netfilter hooks; a switch should just switch
	ip netns exec "$SW" sysctl -qw net.bridge.bridge-nf-call-iptables=0 \
		net.bridge.bridge-nf-call-ip6tables=0 net.bridge.bridge-nf-call-arptables=0 \
		>/dev/null 2>&1 || true
}

# with_ipv6 NS DEV...: IPv6 on these interfaces of NS (lo included, if named), without DAD
# (accept_dad=0: the link-local address is usable at once too), router advertisements or
# solicitations, so a dual-stack lab is as quick and as quiet as an IPv4-only one
with_ipv6() {
	local ns="$1" dev
	shift
	[ -d /proc/sys/net/ipv6 ] || die "IPv6 asked for, but the kernel has none"
	for dev in "$@"; do
		ip netns exec "$ns" sysctl -qw "net.ipv6.conf.$dev.accept_dad=0" \
			"net.ipv6.conf.$dev.accept_ra=0" "net.ipv6.conf.$dev.router_solicitations=0" \
			"net.ipv6.conf.$dev.disable_ipv6=0" >/dev/null
	done
}

# plug NS DEV PORT BRIDGE ADDR [ADDR6]: veth DEV in namespace NS with ADDR/PLEN (and, given,
# ADDR6/PLEN6, nodad: dual stack; IPv6 stays off otherwise), its peer PORT on BRIDGE in the
# switch
plug() {
	local ns="$1" dev="$2" port="$3" br="$4" addr="$5" addr6="${6:-}"
	if ! ip -n "$ns" link show "$dev" >/dev/null 2>&1; then
		# a stale switch-side peer (its host end is gone) would block the name
		ip -n "$SW" link del "$port" >/dev/null 2>&1 || true
		ip -n "$SW" link add "$port" type veth peer name "$dev" netns "$ns"
	fi
	no_ipv6 "$ns" "$dev"
	no_ipv6 "$SW" "$port"
	ip -n "$SW" link set "$port" master "$br"
	ip -n "$SW" link set "$port" up
	ip -n "$ns" addr replace "$addr/$PLEN" dev "$dev"
	if [ -n "$addr6" ]; then
		with_ipv6 "$ns" "$dev"
		ip -n "$ns" -6 addr replace "$addr6/${PLEN6:-64}" dev "$dev" nodad
	fi
	ip -n "$ns" link set "$dev" up
}

# wait_link_up NS DEV: veth carrier comes up asynchronously; give it a moment (5 s at most,
# quietly: status reports a link that stayed down)
wait_link_up() {
	local i
	for ((i = 0; i < 50; i++)); do
		if ip -n "$1" link show "$2" 2>/dev/null | grep 'state UP' >/dev/null; then
			return 0
		fi
		sleep 0.1
	done
}

# kill_ns_pids NS: SIGTERM whatever runs in NS (by pid), SIGKILL what is left after KILL_WAIT
# tenths of a second
kill_ns_pids() {
	local ns="$1" pids pid i
	pids="$(ip netns pids "$ns" 2>/dev/null || true)"
	[ -n "$pids" ] || return 0
	for pid in $pids; do
		log "killing pid $pid left in $ns"
		kill -TERM "$pid" 2>/dev/null || true
	done
	for ((i = 0; i < KILL_WAIT; i++)); do
		[ -n "$(ip netns pids "$ns" 2>/dev/null || true)" ] || return 0
		sleep 0.1
	done
	for pid in $(ip netns pids "$ns" 2>/dev/null || true); do
		kill -KILL "$pid" 2>/dev/null || true
	done
}

cmd_down() {
	local ns
	for ns in $(lab_namespaces); do
		kill_ns_pids "$ns"
	done
	# hosts first, the switch last: deleting a host namespace destroys its veth pair
	for ns in $(lab_namespaces | grep -v -- "-sw\$" || true) $(lab_namespaces | grep -- "-sw\$" || true); do
		ip netns del "$ns" 2>/dev/null || true
	done
	if [ -n "$(lab_namespaces)" ]; then
		die "down: namespaces left: $(lab_namespaces | tr '\n' ' ')"
	fi
	log "down: prefix $P clean"
}
