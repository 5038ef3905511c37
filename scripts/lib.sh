# shellcheck shell=bash
# Shared by scripts/demo.sh, scripts/demo-ha.sh and scripts/demo-ecmp.sh (sourced from the
# checkout's top, with $work, the demo's directory, set first): processes started in the
# background are remembered by pid and stopped by pid (SIGTERM, then wait), never by name.

pids=()
# the chat clients' stdins (fifos held open by the demo), closed by close_fds
fds=()

# die MESSAGE: the demo's error, named after it ("demo-ha: MESSAGE"), exit 1
die() {
	local me="${0##*/}"
	echo "${me%.sh}: $*" >&2
	exit 1
}

# need_root HOW WHY: exit 1 unless root, saying "run as root (HOW): WHY"
need_root() {
	[ "$(id -u)" -eq 0 ] || die "run as root ($1): $2"
}

# find_command NAME: its path, also looking in /usr/sbin and /sbin (Debian puts bird,
# exabgp and keepalived there; a user's PATH may lack them); nothing when it is missing
find_command() {
	PATH="$PATH:/usr/sbin:/sbin" command -v "$1" || true
}

# find_lbnat: sets LBNAT to the lbnat command by an absolute path ($LBNAT when set, else the
# one beside this python, else the one on PATH), or exits; puts this checkout first on
# PYTHONPATH for what the demo runs
find_lbnat() {
	LBNAT="${LBNAT:-$(dirname "$(python3 -c 'import sys; print(sys.executable)')")/lbnat}"
	[ -x "$LBNAT" ] || LBNAT="$(command -v lbnat || true)"
	[ -x "$LBNAT" ] || die "no lbnat command (make deps)"
	export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
}

# stop_pid PID [SIGNAL]: send SIGNAL (TERM) to one process and wait for it; no PID, nothing
stop_pid() {
	[ -n "$1" ] || return 0
	kill "-${2:-TERM}" "$1" 2>/dev/null || true
	wait "$1" 2>/dev/null || true
}

# stop_pids: SIGTERM every remembered process, then wait for each.
stop_pids() {
	local pid
	for pid in "${pids[@]:-}"; do [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null; done
	for pid in "${pids[@]:-}"; do [ -n "$pid" ] && wait "$pid" 2>/dev/null; done
	pids=()
}

# close_fds: close every descriptor in fds (a chat client whose stdin closes ends)
close_fds() {
	local fd
	for fd in "${fds[@]:-}"; do
		if [ -n "$fd" ]; then exec {fd}>&-; fi
	done 2>/dev/null
	fds=()
}

# cleanup_lab [LAB_SCRIPT]: the end of a demo's `trap ... EXIT` cleanup, once it has stopped
# the processes it keeps apart: stop the remembered ones, take the lab down (scripts/lab.sh,
# or LAB_SCRIPT's: whatever is left in its namespaces is killed there by pid), remove $work.
cleanup_lab() {
	set +e
	stop_pids
	"${1:-scripts/lab.sh}" down >/dev/null
	rm -rf "${work:?}"
}

# say TEXT: a demo step's heading
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

now() { date +%s.%N; }
# seconds FROM TO: TO - FROM, two decimals
seconds() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$1" "$2"; }

# how often wait_until polls, in seconds (a demo timing what it waits for may poll faster)
wait_poll=0.05

# wait_until SECONDS WHAT COMMAND...: until COMMAND succeeds (polled every $wait_poll s); else
# exit 1 naming WHAT
wait_until() {
	local deadline=$((SECONDS + $1)) what="$2"
	shift 2
	until "$@" >/dev/null 2>&1; do
		[ "$SECONDS" -lt "$deadline" ] || die "timed out waiting for $what"
		sleep "$wait_poll"
	done
}

# wait_for FILE PATTERN SECONDS: until a line of FILE matches; else the file's last lines and
# exit 1.
wait_for() {
	local deadline=$((SECONDS + $3))
	until grep -q -- "$2" "$1" 2>/dev/null; do
		if [ "$SECONDS" -ge "$deadline" ]; then
			echo "${0##*/}: timed out waiting for '$2' in $1" >&2
			tail -n 40 "$1" >&2 || true
			exit 1
		fi
		sleep 0.1
	done
}

# start_chat_client I HOST ADDRESS PORT: chat session testI from lab $P's HOST to ADDRESS:PORT,
# its output in $work/testI.out, its stdin the fifo $work/testI.in held open in fds (a line
# written there is said; close_fds ends the session), remembered by pid; returns once it is
# connected.
start_chat_client() {
	local i="$1" fd
	mkfifo "$work/test$i.in"
	ip netns exec "$P-$2" python3 -m lbnat_lab.chat client "$3" "$4" "test$i" \
		<"$work/test$i.in" >"$work/test$i.out" 2>&1 &
	pids+=("$!")
	exec {fd}>"$work/test$i.in"
	fds+=("$fd")
	wait_for "$work/test$i.out" "connected to" 10
}

# start_chat_servers: a chat server on b1 b2 b3 of lab $P, port 9000, run by the script the
# Vagrant backends run (--systemd there; --foreground execs the server), logs in $work/bN.log,
# remembered by pid; returns once each listens.
start_chat_servers() {
	local b
	for b in 1 2 3; do
		ip netns exec "$P-b$b" scripts/provision-backend.sh --foreground --name "b$b" \
			--port 9000 >"$work/b$b.log" 2>&1 &
		pids+=("$!")
	done
	for b in 1 2 3; do wait_for "$work/b$b.log" "listening" 10; done
}
