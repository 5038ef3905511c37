"""A worker SIGKILLed in mid-flow (issue 16): lbnat restarts it on its socket, the new worker
takes the dead one's flows back from its checkpoint before it reads a frame, and every open
chat flow carries on, on both workers; a flow that had ended, or ended while the worker was
dead, stays ended. A restart of lbnat itself restores nothing."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests.faults.conftest import scaled
from tests.integration.conftest import NEW_CLIENT_RE, WAIT, Bed, Proc, admin_json

FLOWS = scaled(24, 48)  # chat flows that must all carry on
LEAVERS = 2  # flows of the victim that end: one before the kill, one while it is dead
FAST = ("--health-interval", "0.3", "--health-timeout", "1")
ENDED = ("TIME_WAIT", "CLOSE")


def sessions(bed: Bed) -> dict[str, dict[str, object]]:
    """`lbnat sessions`, by client ip:port."""
    rows = admin_json(bed, "sessions")
    assert isinstance(rows, list)
    return {str(row["client"]): row for row in rows}


def status(bed: Bed) -> dict[str, object]:
    reply = admin_json(bed, "status")
    assert isinstance(reply, dict)
    return reply


def wait_dead(pid: int) -> None:
    """Until `pid` has exited (gone, or a zombie lbnat has not reaped yet): bounded."""

    def dead() -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] in "ZX"
        except FileNotFoundError:
            return True

    for _ in range(int(WAIT / 0.05)):
        if dead():
            return
        time.sleep(0.05)
    assert dead(), f"worker pid {pid} still runs after SIGKILL"


def test_a_killed_worker_takes_its_flows_back(fbed: Bed) -> None:
    bed = fbed
    for b in ("b1", "b2", "b3"):
        bed.chat_server(b)
    lbnat = bed.lbnat("--workers", "2", *FAST)

    # Every client's socket, from lbnat's "new client" line (clients start one at a time).
    clients: dict[str, tuple[Proc, str]] = {}
    for i in range(FLOWS + LEAVERS):
        proc, _ = bed.chat_client("c1" if i % 2 else "c2", f"k{i}")
        opened = lbnat.out.expect_re(NEW_CLIENT_RE)
        clients[f"k{i}"] = (proc, f"{opened['ip']}:{opened['port']}")
    rows = sessions(bed)
    owner = {name: int(str(rows[address]["worker"])) for name, (_, address) in clients.items()}
    counts = [sum(1 for w in owner.values() if w == index) for index in (0, 1)]
    victim = 0 if counts[0] >= counts[1] else 1
    leavers = [name for name in clients if owner[name] == victim][-LEAVERS:]
    staying = [name for name in clients if name not in leavers]
    assert len(staying) == FLOWS
    assert {owner[name] for name in staying} == {0, 1}, owner  # both workers own some

    # One of the victim's flows ends before the kill: its row lingers, ended.
    before, during = (clients[name] for name in leavers)
    before[0].send_line("q")
    assert before[0].wait() == 0
    ip, port = before[1].split(":")
    lbnat.expect(f"client <{ip},{port}> terminated")
    open_on_victim = sum(1 for name in clients if owner[name] == victim) - 1

    workers = status(bed)["workers"]
    assert isinstance(workers, list)
    pid = int(workers[victim]["pid"])
    os.kill(pid, signal.SIGKILL)
    wait_dead(pid)
    # The other ends while the victim is dead: its FIN waits in the kept socket's ring.
    during[0].send_line("q")
    line = lbnat.expect(f"worker {victim} : pid {pid} exited")
    assert "(code -9)" in line and f"its {open_on_victim} flows restored" in line, line
    assert "dropped" not in line, line

    # Every flow carries on: each client hears its own line back through lbnat.
    for name in staying:
        clients[name][0].send_line(f"after the kill {name}")
    for name in staying:
        clients[name][0].expect(f"after the kill {name}")
    assert during[0].wait() == 0
    ip, port = during[1].split(":")
    lbnat.expect(f"client <{ip},{port}> terminated")

    # The ended flows stay ended; the open ones are the staying ones, on both workers.
    rows = sessions(bed)
    for name in leavers:
        row = rows.get(clients[name][1])
        assert row is None or row["state"] in ENDED, row
    for name in staying:
        row = rows[clients[name][1]]
        assert row["state"] == "ESTABLISHED" and row["worker"] == owner[name], row
    after = status(bed)
    assert after["open_flows"] == FLOWS, after
    restarted = after["workers"]
    assert isinstance(restarted, list)
    assert restarted[victim]["restarts"] == 1 and restarted[victim]["pid"] != pid
    assert restarted[1 - victim]["restarts"] == 0

    # A restart of lbnat itself starts with empty tables: the checkpoints died with it.
    assert bed.stop(lbnat) == 0
    bed.lbnat("--workers", "2", *FAST)
    assert sessions(bed) == {}
