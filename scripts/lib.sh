# shellcheck shell=bash
# Shared by scripts/demo.sh, scripts/demo-ha.sh and the benchmarks: processes started in the
# background are remembered by pid and stopped by pid (SIGTERM, then wait), never by name.

pids=()

# stop_pids: SIGTERM every remembered process, then wait for each.
stop_pids() {
	local pid
	for pid in "${pids[@]:-}"; do [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null; done
	for pid in "${pids[@]:-}"; do [ -n "$pid" ] && wait "$pid" 2>/dev/null; done
	pids=()
}

# cleanup_lab: for `trap cleanup_lab EXIT` in a script that brought the lab up and keeps its
# files in $work: stop its processes, take the lab down, remove $work.
cleanup_lab() {
	set +e
	stop_pids
	scripts/lab.sh down >/dev/null
	rm -rf "${work:?}"
}

# say TEXT: a demo step's heading
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

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
