"""A hitless restart in network namespaces (issue 19): lbnat run --state-file, SIGTERM, and a
new lbnat with the same file carries every flow on: chat sessions both ways, and a paced
transfer in flight that arrives byte-identical. A state file that does not fit is refused with
one line and lbnat starts empty."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from lbnat_lab.netns import LB_IP, host_ip
from tests.integration.conftest import (
    LBNAT_TABLE,
    MB,
    NAT_PORTS,
    RESERVED_PORTS,
    Bed,
    Proc,
    admin_json,
    console_script,
    random_file,
    require,
    sha256,
    variant_id,
)
from tests.integration.transfer import TRANSFER_TIMEOUT, paced_source

pytestmark = pytest.mark.netns

FAST = ("--health-interval", "0.3", "--health-timeout", "1")
BULK_VIP = 20001
BULK_PORT = 9001
SIZE = 32 * MB
# 1 MB every 0.15 s: the transfer lasts about 5 s, so it is in flight across the restart
PACE = 0.15


def bulk_config(path: Path) -> Path:
    """A second service beside the chat service the command line gives: VIP 20001 to b1:9001
    (no health checks: the paced source accepts one connection), for the transfer."""
    config = path / "bulk.json"
    service = {
        "name": "bulk",
        "protocol": "tcp",
        "port": BULK_VIP,
        "health": {"enabled": False},
        "backends": [{"ip": host_ip("b1"), "port": BULK_PORT}],
    }
    config.write_text(json.dumps({"services": [service]}))
    return config


def wait_for_size(path: Path, size: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.stat().st_size >= size):
        assert time.monotonic() < deadline, f"{path} did not reach {size} bytes in {timeout}s"
        time.sleep(0.05)


def rows_of(bed: Bed) -> set[tuple[str, str, str, int]]:
    """`lbnat sessions`: (service, client, backend, NAT port) of every row."""
    rows = admin_json(bed, "sessions")
    assert isinstance(rows, list)
    return {(r["service"], r["client"], r["backend"], r["nat_port"]) for r in rows}


def stop_keeping_the_guard(bed: Bed, lbnat: Proc, state: Path) -> str:
    """SIGTERM: lbnat exits 0 with its one line, the guard and the reserved ports stay."""
    lbnat.signal(signal.SIGTERM)
    assert lbnat.wait() == 0, lbnat.describe()
    line = lbnat.out.expect("state saved: ")
    assert line.endswith(f" rows in {state}; guard kept for the next lbnat"), line
    assert LBNAT_TABLE in bed.nft_tables()
    reserved = bed.read_file("lb", RESERVED_PORTS)
    assert f"{NAT_PORTS[0]}-{NAT_PORTS[1]}" in reserved, reserved
    return line


def wait_in_kernel(bed: Bed, clients: set[str], timeout: float = 10.0) -> None:
    """Until the rows of `clients` are in the kernel's map again (`lbnat sessions`' path):
    restored established rows re-enter it as any row does."""
    deadline = time.monotonic() + timeout
    while True:
        paths = {r["client"]: r["path"] for r in admin_json(bed, "sessions")}
        if all(paths.get(client) == "kernel" for client in clients):
            return
        assert time.monotonic() < deadline, f"not back in the kernel: {paths}"
        time.sleep(0.2)


def tc_filters(bed: Bed) -> int:
    shown = bed.lab.run("lb", "tc", "filter", "show", "dev", "eth0", "ingress").stdout
    return sum("lbnat_fastpath" in line for line in shown.splitlines())


def test_a_restarted_lbnat_carries_every_flow_on(
    bed: Bed, scratch: Path, request: pytest.FixtureRequest
) -> None:
    require("socat")
    offload = request.node.callspec.params["bed"][1]
    state = bed.tmp / "state.json"
    options = (*FAST, "--config", str(bulk_config(bed.tmp)), "--state-file", str(state))
    for b in ("b1", "b2", "b3"):
        bed.chat_server(b)
    data, received = scratch / "data.bin", scratch / "received.bin"
    digest = random_file(data, SIZE)
    source = paced_source(bed, "b1", BULK_PORT, data, PACE)

    first = bed.lbnat(*options)
    clients = {f"k{i}": bed.chat_client("c1" if i % 2 else "c2", f"k{i}")[0] for i in range(6)}
    sink = bed.start(
        "c1", "socat", "-u", f"TCP:{LB_IP}:{BULK_VIP}", f"CREATE:{received}", name="sink"
    )
    wait_for_size(received, 4 * MB)  # in flight (and, with tc, in the kernel by now)
    before = rows_of(bed)
    assert len(before) == 7, before  # six chat sessions and the transfer

    line = stop_keeping_the_guard(bed, first, state)
    assert line.startswith("state saved: 7 rows"), line
    if offload == "tc":
        assert tc_filters(bed) == 1  # left attached: offloaded flows go on meanwhile
    assert sink.popen.poll() is None, "the transfer ended before the restart"
    assert bed.nft_counters("ip", LBNAT_TABLE).get("kernel RSTs", 0) == 0

    second = bed.lbnat(*options)
    restored = second.expect("restored ")
    assert restored == f"restored 7 rows from {state} (saved at its stop)", restored
    assert rows_of(bed) == before
    if offload == "tc":
        assert tc_filters(bed) == 1  # the new program replaced the old one
        wait_in_kernel(bed, {row[1] for row in before if row[0] == "tcp:20000"})

    for name, client in clients.items():
        client.send_line(f"after the restart {name}")
    for name, client in clients.items():
        client.expect(f"after the restart {name}")
    assert sink.wait(TRANSFER_TIMEOUT) == 0, sink.err.tail()
    assert source.wait(TRANSFER_TIMEOUT) == 0, source.err.tail()
    assert sha256(received) == digest
    # the host's kernel never answered one of those flows' packets with a RST
    assert bed.nft_counters("ip", LBNAT_TABLE).get("kernel RSTs", 0) == 0
    assert "state_refused" not in "".join(second.out.snapshot())


@pytest.mark.parametrize("bed", [(2, "off")], indirect=True, ids=variant_id)
def test_a_state_file_of_another_worker_count_is_refused_with_one_line(bed: Bed) -> None:
    state = bed.tmp / "state.json"
    for b in ("b1", "b2", "b3"):
        bed.chat_server(b)
    first = bed.lbnat(*FAST, "--state-file", str(state))
    for i in range(3):
        bed.chat_client("c1", f"k{i}")
    assert len(rows_of(bed)) == 3
    line = stop_keeping_the_guard(bed, first, state)
    assert line.startswith("state saved: 3 rows"), line

    second = bed.lbnat(*FAST, "--state-file", str(state), "--workers", "1")
    # logged before the srcIP line (the state file is read before anything else)
    refused = next(x for x in second.out.snapshot() if x.startswith("state file : "))
    assert refused == (
        f"state file : {state} not used (it was written by 2 workers, this lbnat has 1 (a "
        "row's NAT port decides its worker)); starting with empty tables"
    ), refused
    assert rows_of(bed) == set()
    _, server = bed.chat_client("c2", "fresh")  # and it balances
    assert server in {"b1", "b2", "b3"}
    assert second.out.count("state file : ") == 1
    assert second.out.count("restored ") == 0
    assert all("Traceback" not in x for x in second.err.snapshot())


@pytest.mark.parametrize("bed", [(1, "tc")], indirect=True, ids=variant_id)
def test_cleanup_removes_what_a_stopped_lbnat_left(bed: Bed) -> None:
    state = bed.tmp / "state.json"
    bed.chat_server("b1")
    first = bed.lbnat("--no-health", "--state-file", str(state), backends=("b1",))
    bed.chat_client("c1", "k0")  # a flow through: its loop runs (and handles SIGTERM)
    line = stop_keeping_the_guard(bed, first, state)
    assert line.startswith("state saved: 1 rows"), line
    assert tc_filters(bed) == 1
    done = bed.lab.run("lb", console_script("lbnat"), "cleanup", "--state-file", str(state))
    assert "removed the nftables guard" in done.stdout, done.stdout
    assert LBNAT_TABLE not in bed.nft_tables()
    reserved = bed.read_file("lb", RESERVED_PORTS)
    assert f"{NAT_PORTS[0]}-{NAT_PORTS[1]}" not in reserved, reserved
    assert tc_filters(bed) == 0
    assert not state.exists() and not Path(f"{state}.rows-0").exists()


@pytest.mark.parametrize("bed", [(2, "tc")], indirect=True, ids=variant_id)
def test_the_rows_of_a_killed_lbnat_are_restored_too(bed: Bed) -> None:
    """SIGKILL: nothing runs at exit, and nothing needs to: the records are written as rows
    open, and the guard and the filter are where a clean stop leaves them."""
    state = bed.tmp / "state.json"
    for b in ("b1", "b2", "b3"):
        bed.chat_server(b)
    first = bed.lbnat(*FAST, "--state-file", str(state))
    workers = [int(w["pid"]) for w in admin_json(bed, "status")["workers"]]
    clients = {f"k{i}": bed.chat_client("c1" if i % 2 else "c2", f"k{i}")[0] for i in range(4)}
    before = rows_of(bed)
    assert len(before) == 4
    first.signal(signal.SIGKILL)
    first.wait()
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in workers):  # they see the main one gone
        assert time.monotonic() < deadline, "workers outlived their main process"
        time.sleep(0.05)
    assert LBNAT_TABLE in bed.nft_tables() and tc_filters(bed) == 1

    second = bed.lbnat(*FAST, "--state-file", str(state))
    restored = second.expect("restored ")
    assert restored == f"restored 4 rows from {state} (left by an lbnat that did not stop)"
    assert rows_of(bed) == before
    for name, client in clients.items():
        client.send_line(f"after the kill {name}")
    for name, client in clients.items():
        client.expect(f"after the kill {name}")


@pytest.mark.parametrize("bed", [(1, "off")], indirect=True, ids=variant_id)
def test_a_start_that_fails_after_taking_rows_over_leaves_them_for_the_next_try(
    bed: Bed,
) -> None:
    require("socat")
    state = bed.tmp / "state.json"
    bed.chat_server("b1")
    first = bed.lbnat("--no-health", "--state-file", str(state), backends=("b1",))
    client, _ = bed.chat_client("c1", "k0")
    stop_keeping_the_guard(bed, first, state)

    # the metrics port is taken: this lbnat has restored the row when it fails
    bed.start("lb", "socat", "TCP-LISTEN:9120,bind=127.0.0.1,reuseaddr", "STDOUT", name="taken")
    bed.lab.wait_tcp_listening("lb", 9120)
    argv = [console_script("lbnat"), "run", LB_IP, host_ip("b1"), "9000", "--no-health"]
    admin = ("--admin-socket", str(bed.tmp / "admin.sock"))
    failed = bed.start(
        "lb", *argv, *admin, "--state-file", str(state), "--metrics", "127.0.0.1:9120",
        name="failing lbnat",
    )  # fmt: skip
    assert failed.wait() == 2, failed.describe()
    assert not any("Traceback" in x for x in failed.err.snapshot()), failed.describe()
    failed.out.expect(f"state saved: 1 rows in {state}; guard kept for the next lbnat")
    assert LBNAT_TABLE in bed.nft_tables()

    second = bed.lbnat("--no-health", "--state-file", str(state), backends=("b1",))
    second.expect(f"restored 1 rows from {state} (saved at its stop)")
    client.send_line("after a failed start")
    client.expect("after a failed start")
