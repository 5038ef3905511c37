"""Direct routing (`--mode dr`, docs/dr.md) end to end: b1 and b2 hold the VIP on lo
(scripts/dr-backend.sh) and answer the clients directly. The chat seed and HTTP through a DR
service; the replies bypass lbnat (the LB's eth0 sends far fewer bytes than the download
moves); both backends are used; a flow that the client ends leaves the table.

One lab and one lbnat for the module, once with one worker and once with two (PACKET_FANOUT),
with the kernel fast path (lbnat refuses to start without it, and the downloads' client ACKs
go through a DR row's identity entry there); root only."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lbnat_lab.netns import LB_IP, Lab, host_ip, skip_reason
from tests.integration.conftest import (
    Bed,
    Proc,
    admin_json,
    console_script,
    require,
)

pytestmark = pytest.mark.netns

CHAT_PORT = 9000  # a DR service's port is its backends' port
HTTP_PORT = 8000
BACKENDS = ("b1", "b2")
SIZE = 5 << 20  # the download that must not pass through the LB
OPENED_RE = re.compile(
    r"new client <[\d.]+,\d+> -> server (?P<bip>[\d.]+):(?P<bport>\d+) \(direct routing\)"
)
VIP = "198.18.0.100"  # apart from SRCIP (lbnat's own 198.18.0.2), which the backends must reach


@pytest.fixture(scope="module", params=["1", "2"], ids=["1w", "2w"])
def dr(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Bed, Proc, str]]:
    """The lab with b1 and b2 as DR backends of the chat (9000) and HTTP (8000) services,
    lbnat running them both; yields (bed, lbnat, sha256 of the 5 MB body)."""
    if (reason := skip_reason()) is not None:
        pytest.skip(reason)
    require("nft", "curl")
    tmp = tmp_path_factory.mktemp("dr")
    www = tmp / "www"
    www.mkdir()
    body = os.urandom(SIZE)
    (www / "big").write_bytes(body)
    config = tmp / "lbnat.json"
    services = [
        {"name": name, "port": port, "mode": "dr", "health": {"interval": 0.5},
         "backends": [{"ip": host_ip(b), "port": port} for b in BACKENDS]}
        for name, port in (("chat", CHAT_PORT), ("http", HTTP_PORT))
    ]  # fmt: skip
    config.write_text(
        json.dumps({"lb_ip": LB_IP, "vip": VIP, "timeouts": {"time_wait": 1}, "services": services})
    )
    with Lab(backends=2) as lab:
        bed = Bed(lab, tmp)
        try:
            lab.run("lb", "ip", "addr", "add", f"{VIP}/32", "dev", "eth0")  # the LB answers ARP
            for b in BACKENDS:
                lab.dr_backend(b, vip=VIP)
                bed.chat_server(b, CHAT_PORT)
                bed.start(
                    b, "python3", "-m", "http.server", str(HTTP_PORT), "--directory", str(www),
                    name=f"http {b}",
                )  # fmt: skip
                lab.wait_tcp_listening(b, HTTP_PORT)
            argv = [
                console_script("lbnat"), "run", "--config", str(config), "--offload", "tc",
                "--workers", request.param, "--admin-socket", str(tmp / "admin.sock"),
            ]  # fmt: skip
            lbnat = bed.start("lb", *argv, name="lbnat")
            lbnat.expect("srcIP : ")
            for b in BACKENDS:
                for port in (CHAT_PORT, HTTP_PORT):
                    lbnat.expect(f"IP : {host_ip(b)}, Port : {port} Server is", 15.0)
            yield bed, lbnat, hashlib.sha256(body).hexdigest()
        finally:
            try:
                for b in BACKENDS:
                    lab.dr_backend(b, up=False, vip=VIP)
            finally:
                bed.close()


def tx_bytes(bed: Bed, host: str = "lb") -> int:
    return int(bed.read_file(host, "/sys/class/net/eth0/statistics/tx_bytes"))


def sessions(bed: Bed) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = admin_json(bed, "sessions")
    return rows


def test_backends_hold_the_vip_on_lo_and_do_not_answer_arp_for_it(
    dr: tuple[Bed, Proc, str],
) -> None:
    bed, _, _ = dr
    for b in BACKENDS:
        assert f"inet {VIP}/32" in bed.lab.run(b, "ip", "-4", "-o", "addr", "show", "lo").stdout
        assert bed.read_file(b, "/proc/sys/net/ipv4/conf/all/arp_ignore") == "1"
        assert bed.read_file(b, "/proc/sys/net/ipv4/conf/all/arp_announce") == "2"
    # The clients' neighbour entry for the VIP is the LB's MAC, not a backend's.
    bed.lab.run("c1", "ping", "-c", "1", "-W", "2", VIP)
    neighbour = bed.lab.run("c1", "ip", "neigh", "show", VIP).stdout
    lb_mac = bed.read_file("lb", "/sys/class/net/eth0/address")
    assert lb_mac in neighbour, neighbour


def test_chat_through_a_dr_service_spreads_over_both_backends(dr: tuple[Bed, Proc, str]) -> None:
    bed, _, _ = dr
    a, server_a = bed.chat_client("c1", "alice", VIP, CHAT_PORT)
    b, server_b = bed.chat_client("c2", "bob", VIP, CHAT_PORT)
    assert {server_a, server_b} == set(BACKENDS)
    a.send_line("hello over dr")
    a.expect("[alice] hello over dr")
    status = admin_json(bed, "status")
    assert {s["name"]: s["mode"] for s in status["services"]} == {"chat": "dr", "http": "dr"}
    rows = [r for r in sessions(bed) if r["service"] == "chat"]
    assert len(rows) == 2 and {r["nat_port"] for r in rows} == {"-"}
    assert {r["state"] for r in rows} == {"ESTABLISHED"}
    for client in (a, b):
        client.send_line("q")
        assert client.wait() == 0


def test_http_replies_bypass_the_lb_and_a_finished_flow_leaves_the_table(
    dr: tuple[Bed, Proc, str],
) -> None:
    bed, lbnat, digest = dr
    before = tx_bytes(bed)
    for n, client in enumerate(("c1", "c2", "c1", "c2")):
        out = bed.tmp / f"big-{n}"
        bed.lab.run(
            client, "curl", "-sS", "--max-time", "20", "-o", str(out),
            f"http://{VIP}:{HTTP_PORT}/big",
        )  # fmt: skip
        assert hashlib.sha256(out.read_bytes()).hexdigest() == digest
    sent_by_lb = tx_bytes(bed) - before
    print(f"DR: 4 x {SIZE} bytes downloaded, the LB's eth0 sent {sent_by_lb} bytes")
    assert sent_by_lb < (1 << 20), f"the LB sent {sent_by_lb} bytes for 4 x 5 MB downloads"
    opened = [m for line in lbnat.out.snapshot() if (m := OPENED_RE.search(line))]
    used = {m["bip"] for m in opened if int(m["bport"]) == HTTP_PORT}
    assert len(opened) >= 4
    assert used == {host_ip(b) for b in BACKENDS}
    offload = admin_json(bed, "status")["offload"]
    assert offload["offloaded"] >= 1, offload  # DR rows in the kernel (lbnat.fastpath.dr_entry)
    # curl ends each flow with its FIN: the rows end, linger time_wait (1 s), then go.
    deadline = time.monotonic() + 10.0
    while any(r["service"] == "http" for r in sessions(bed)):
        assert time.monotonic() < deadline, sessions(bed)
        time.sleep(0.3)


def test_the_dr_backend_script_undoes_itself(dr: tuple[Bed, Proc, str]) -> None:
    bed, _, _ = dr
    script = str(Path(__file__).resolve().parents[2] / "scripts" / "dr-backend.sh")
    assert bed.lab.run("b1", "bash", script, "status", VIP, check=False).returncode == 0
    bed.lab.add_backend(3)
    try:
        ns = bed.lab.argv("b3", ["bash", script])
        subprocess.run([*ns, "up", VIP], check=True, timeout=10)
        assert subprocess.run([*ns, "status", VIP], timeout=10).returncode == 0
        subprocess.run([*ns, "down", VIP], check=True, timeout=10)
        assert subprocess.run([*ns, "status", VIP], timeout=10).returncode == 1
        assert bed.read_file("b3", "/proc/sys/net/ipv4/conf/all/arp_ignore") == "0"
    finally:
        subprocess.run([*bed.lab.argv("b3", ["bash", script]), "down", VIP], timeout=10)
