"""lbnat's worker processes in network namespaces: a worker that dies is restarted on its socket
and takes its flows back while the other workers keep forwarding; status and sessions cover
every worker; the simple
data path (`--io socket`) and the block ring (`--rx-ring blocks`) still carry bytes intact."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from lbnat_lab.netns import Lab, skip_reason
from tests.integration.conftest import BACKEND_PORT, Bed, Proc, admin_json, require

WORKERS = max(2, os.cpu_count() or 1)
FAST = ("--health-interval", "0.3", "--health-timeout", "1")


@pytest.fixture
def nbed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Bed]:
    """A lab whose lbnat runs N worker processes (the tests here are about workers)."""
    if (reason := skip_reason()) is not None:
        pytest.skip(reason)
    require("nft")
    monkeypatch.setenv("LBNAT_WORKERS", str(WORKERS))
    with Lab() as lab:
        testbed = Bed(lab, tmp_path)
        try:
            yield testbed
        finally:
            testbed.close()


def workers_of(bed: Bed) -> list[dict[str, object]]:
    status = admin_json(bed, "status")
    assert isinstance(status, dict)
    return status["workers"]  # type: ignore[no-any-return]


def test_a_killed_worker_is_restarted_with_its_flows_and_the_others_keep_forwarding(
    nbed: Bed,
) -> None:
    bed = nbed
    for b in ("b1", "b2", "b3"):
        bed.chat_server(b)
    lbnat = bed.lbnat(*FAST)
    workers = workers_of(bed)
    assert [w["index"] for w in workers] == list(range(WORKERS))
    assert all(w["alive"] and w["pid"] != lbnat.pid for w in workers)

    # Enough clients that every worker owns some: the rows say which.
    clients: dict[str, Proc] = {}
    for i in range(12):
        clients[f"k{i}"], _ = bed.chat_client("c1" if i % 2 else "c2", f"k{i}")
    rows = admin_json(bed, "sessions")
    assert isinstance(rows, list) and len(rows) == 12
    owners = {row["worker"] for row in rows}
    assert owners == set(range(WORKERS)), rows

    victim = workers[1]
    os.kill(int(str(victim["pid"])), signal.SIGKILL)
    line = lbnat.expect("worker 1 : pid ")
    assert f"pid {victim['pid']} exited" in line and "restarted as pid" in line, line
    victims = sum(1 for row in rows if row["worker"] == 1)
    assert f"its {victims} flows restored" in line, line

    # Clients of the other workers never noticed, and the killed worker's replacement took its
    # flows back from its checkpoint: every client still hears its own line.
    for name, client in clients.items():
        client.send_line(f"still here {name}")
    for name, client in clients.items():
        client.expect(f"still here {name}")

    # After the restart every worker takes new flows again, and status counts the restart.
    fresh = [bed.chat_client("c1", f"n{i}")[1] for i in range(6)]
    assert set(fresh) == {"b1", "b2", "b3"}
    after = workers_of(bed)
    assert after[1]["restarts"] == 1 and after[1]["alive"] and after[1]["pid"] != victim["pid"]
    assert after[0]["restarts"] == 0 and after[0]["pid"] == workers[0]["pid"]


@pytest.mark.parametrize(
    "io", [("--io", "socket"), ("--rx-ring", "blocks")], ids=["socket", "blocks"]
)
def test_other_data_paths_carry_a_bulk_transfer_intact(
    nbed: Bed, tmp_path: Path, io: tuple[str, str]
) -> None:
    bed = nbed
    data = tmp_path / "data.bin"
    data.write_bytes(os.urandom(8 << 20))
    received = tmp_path / "received.bin"
    server = bed.start(
        "b1", "socat", "-u", f"TCP-LISTEN:{BACKEND_PORT},reuseaddr", f"OPEN:{received},creat,trunc",
        name="sink",
    )  # fmt: skip
    bed.lab.wait_tcp_listening("b1", BACKEND_PORT)
    bed.lbnat("--no-health", *io, backends=("b1",))
    sent = bed.lab.run(
        "c1", "socat", "-u", f"OPEN:{data}", "TCP:198.18.0.2:20000", check=False, timeout=60,
    )  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    assert server.wait() == 0
    assert received.read_bytes() == data.read_bytes()
