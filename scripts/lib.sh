# shellcheck shell=bash
# Shared by scripts/demo.sh and the benchmarks: processes started in the background are
# remembered by pid and stopped by pid (SIGTERM, then wait), never by name.

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
