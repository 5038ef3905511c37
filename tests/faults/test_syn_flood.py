"""Fault: a SYN flood of spoofed sources (issue 16). Real clients keep getting through because
lbnat answers SYNs with cookies (lbnat.synproxy) once half-open rows pass the threshold, and
the flood costs no row, no NAT port and no memory that grows with it.

The flood comes from c2 (lbnat_lab.synflood, raw socket) with sources in 198.19.0.0/16, a
network inside the lab's 198.18.0.0/15 that no host owns. lbnat's cookie SYN-ACKs to them are
routed to c2 (a route in the lb namespace) and dropped there by an nft rule that counts them:
nothing leaves the lab.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from lbnat_lab.netns import LB_IP, host_ip
from tests.faults.conftest import scaled
from tests.integration.conftest import (
    BACKEND_PORT,
    NAT_PORTS,
    VIP_PORT,
    Bed,
    Proc,
    admin_json,
    require,
)

SPOOFED = "198.19.0.0/16"
THRESHOLD = 64  # half-open rows per worker before auto mode proxies
WORKERS = 2

# An echo backend (one thread per connection) and a client that connects every 100 ms,
# exchanges bytes and prints one JSON line per attempt; both bounded.
ECHO = """
import socket, sys, threading
server = socket.create_server((sys.argv[1], int(sys.argv[2])), backlog=4096)
print("listening", flush=True)
def serve(conn):
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)
while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""
CLIENT = """
import json, socket, sys, time
host, port, attempts = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ok = 0
for n in range(attempts):
    started = time.monotonic()
    message = f"hello {n} ".encode() * 50
    try:
        with socket.create_connection((host, port), timeout=10) as conn:
            conn.sendall(message)
            got = b""
            while len(got) < len(message):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                got += chunk
        result = "ok" if got == message else f"echo differs ({len(got)} bytes)"
    except OSError as error:
        result = f"failed: {error}"
    ok += result == "ok"
    print(json.dumps({"attempt": n, "result": result}), flush=True)
    time.sleep(max(0.0, 0.1 - (time.monotonic() - started)))
print(json.dumps({"attempts": attempts, "ok": ok}), flush=True)
"""


def admin_status(bed: Bed) -> dict[str, Any]:
    status: dict[str, Any] = admin_json(bed, "status")
    return status


def rss_kib(bed: Bed, pids: list[int]) -> int:
    """The resident memory of these processes (VmRSS, KiB), summed."""
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def lbnat_pids(bed: Bed, lbnat: Proc) -> list[int]:
    workers = admin_status(bed).get("workers", [])
    return [lbnat.pid, *(int(w["pid"]) for w in workers if w.get("pid"))]


def contain_the_replies(bed: Bed) -> None:
    """lbnat's SYN-ACKs to the spoofed sources go to c2 and die there (counted). lbnat sends
    off-link packets to the default gateway (dataplane/link.py), so c2 becomes the lb
    namespace's default route; c2 forwards nothing and drops them before routing."""
    bed.lab.run("lb", "ip", "route", "add", "default", "via", host_ip("c2"))
    bed.lab.run(
        "c2", "nft",
        "add table ip flood; "
        "add chain ip flood in { type filter hook prerouting priority -300; }; "
        f"add rule ip flood in ip daddr {SPOOFED} counter drop",
    )  # fmt: skip


def replies_dropped_in_c2(bed: Bed) -> int:
    return sum(bed.nft_counters("ip", "flood", host="c2").values())


def start_echo(bed: Bed) -> Proc:
    echo = bed.start("b1", sys.executable, "-c", ECHO, host_ip("b1"), str(BACKEND_PORT))
    echo.expect("listening")
    return echo


@pytest.mark.parametrize("mode", ["auto", "on", "off"])
def test_real_clients_get_through_a_syn_flood(fbed: Bed, mode: str) -> None:
    """auto and on: the SYN proxy. off: the table alone (lbnat.nat): the flood fills the
    backend's NAT ports with half-open rows, each new flow takes the oldest one's port (and
    resets it at the backend first), and under pressure half-open rows time out in 5 s."""
    bed = fbed
    flood_size = scaled(20_000, 100_000)
    rate = scaled(5_000, 10_000)  # SYNs a second: the flood lasts count / rate seconds
    attempts = flood_size // rate * 10 + 10  # one every 100 ms while it lasts, and a second more
    contain_the_replies(bed)
    start_echo(bed)
    lbnat = bed.lbnat(
        "--syn-proxy", mode, "--syn-proxy-threshold", str(THRESHOLD), "--workers", str(WORKERS),
        "--quiet", backends=("b1",),
    )  # fmt: skip
    pids = lbnat_pids(bed, lbnat)
    rss_before = rss_kib(bed, pids)

    flooder = bed.start(
        "c2", sys.executable, "-m", "lbnat_lab.synflood", "--count", str(flood_size),
        "--target", f"{LB_IP}:{VIP_PORT}", "--sources", SPOOFED, "--rate", str(rate),
        "--max-seconds", "120", name="synflood",
    )  # fmt: skip
    client = bed.start(
        "c1", sys.executable, "-c", CLIENT, LB_IP, str(VIP_PORT), str(attempts), name="client"
    )
    rss_peak = [rss_before]
    done = threading.Event()

    def watch_memory() -> None:
        while not done.wait(0.5):
            rss_peak[0] = max(rss_peak[0], rss_kib(bed, pids))

    watcher = threading.Thread(target=watch_memory, daemon=True)
    watcher.start()
    try:
        sent_line = flooder.expect("synflood: sent", timeout=150)
        summary = json.loads(client.expect('"attempts"', timeout=attempts * 12))
    finally:
        done.set()
        watcher.join(5)
    rss_after = rss_kib(bed, pids)
    status = admin_status(bed)
    web = status["services"][0]
    cookies = web["syn_cookies"]
    print(sent_line)
    print(
        f"mode {mode}: client {summary['ok']}/{summary['attempts']}; RSS KiB before "
        f"{rss_before} peak {rss_peak[0]} after {rss_after}; rows {status['rows']}; "
        f"cookies {cookies}; drops {status['drops']} {web['drops']}; "
        f"replies dropped in c2 {replies_dropped_in_c2(bed)}"
    )
    failures = [line for line in client.out.snapshot() if '"result"' in line and '"ok"' not in line]
    assert failures == [], failures
    assert summary == {"attempts": attempts, "ok": attempts}
    sent = int(sent_line.split()[2])
    assert sent == flood_size
    if mode == "off":
        table = status["table"]
        print(f"table: {table}")
        assert cookies["sent"] == 0
        # the backend's pool (4,536 NAT ports) filled up, and the flood's rows gave their
        # ports to newer ones instead of refusing the client
        assert table["ports_reclaimed"] > 0 and table["pressure_spells"] >= 1
        assert status["rows"] <= NAT_PORTS[1] - NAT_PORTS[0] + 1 + attempts
        assert "nat_ports_exhausted" not in web["drops"]
        assert rss_peak[0] - rss_before < 32 * 1024, "lbnat's memory grew with the flood"
        return
    # the flood made no rows: the client's flows (ended, lingering) and, in auto mode, the
    # half-open rows that came before the proxy took over
    assert status["rows"] <= attempts + WORKERS * (THRESHOLD + 1)
    assert cookies["sent"] >= sent // 2  # most SYNs answered with a cookie (some are lost)
    assert cookies["validated"] >= attempts if mode == "on" else cookies["validated"] >= 1
    # bounded: the engine keeps nothing per spoofed SYN; what grows is the data plane's cache of
    # Ethernet headers per destination, capped at 65,536 (about 8 MB for a /16 of sources)
    assert rss_peak[0] - rss_before < 16 * 1024, "lbnat's memory grew with the flood"
    assert replies_dropped_in_c2(bed) >= cookies["sent"] // 2  # they left lbnat, not the lab


# TCP_INFO's options byte and window scales (linux/tcp.h: tcpi_options, then the snd and rcv
# wscale nibbles), printed by each end as JSON.
TCP_INFO = """
def tcp_options(sock):
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return {"timestamps": bool(info[5] & 1), "sack": bool(info[5] & 2),
            "wscale": bool(info[5] & 4), "snd_wscale": info[6] & 15, "rcv_wscale": info[6] >> 4}
"""
HOLD_CLIENT = (
    "import json, socket, sys, time"
    + TCP_INFO
    + """
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10) as conn:
    conn.sendall(b"ping")
    assert conn.recv(16) == b"ping"
    print(json.dumps(tcp_options(conn)), flush=True)
    time.sleep(30)
"""
)
HOLD_BACKEND = (
    "import json, socket, sys, time"
    + TCP_INFO
    + """
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
conn, _ = server.accept()
conn.sendall(conn.recv(16))
print(json.dumps(tcp_options(conn)), flush=True)
time.sleep(30)
"""
)


def test_window_scaling_and_sack_survive_the_cookie_and_timestamps_do_not(fbed: Bed) -> None:
    bed = fbed
    backend = bed.start("b1", sys.executable, "-c", HOLD_BACKEND, host_ip("b1"), str(BACKEND_PORT))
    backend.expect("listening")
    bed.lbnat("--syn-proxy", "on", "--workers", "1", "--no-health", backends=("b1",))
    client = bed.start("c1", sys.executable, "-c", HOLD_CLIENT, LB_IP, str(VIP_PORT), name="holder")
    client_side = json.loads(client.expect("{"))
    backend_side = json.loads(backend.expect("{"))
    print("client", client_side, "backend", backend_side)
    no_timestamps = {"timestamps": False, "sack": True, "wscale": True}
    assert {k: client_side[k] for k in no_timestamps} == no_timestamps
    assert {k: backend_side[k] for k in no_timestamps} == no_timestamps
    # lbnat promised the client what the lab's kernel picks, which the backend picked too (no
    # rescaling); the client's own scale was passed on to the backend
    assert client_side["snd_wscale"] == backend_side["rcv_wscale"]
    assert backend_side["snd_wscale"] == client_side["rcv_wscale"]


def test_a_proxied_transfer_is_byte_identical(fbed: Bed) -> None:
    """A few MB through a proxied flow with Linux's defaults (SACK, window scaling,
    timestamps offered and not taken), both ways, checked by sha256."""
    require("socat")
    bed = fbed
    size = scaled(4, 50) * 1024 * 1024
    payload = bed.tmp / "payload"
    payload.write_bytes(hashlib.sha256(b"lbnat").digest() * (size // 32))
    want = hashlib.sha256(payload.read_bytes()).hexdigest()
    start_echo(bed)
    lbnat = bed.lbnat("--syn-proxy", "on", "--workers", "1", backends=("b1",))
    got = bed.tmp / "got"
    # socat sends the file and writes what the echo returns; shut down the write side at EOF
    result = bed.lab.run(
        "c1", "socat", "-b65536", "-t", "30",
        f"OPEN:{payload},rdonly!!CREATE:{got}", f"TCP:{LB_IP}:{VIP_PORT}",
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256(got.read_bytes()).hexdigest() == want
    status = admin_status(bed)
    assert status["services"][0]["syn_cookies"]["validated"] == 1
    bed.stop(lbnat)
