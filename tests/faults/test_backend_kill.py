"""SIGKILL of a backend's server in the middle of an upload through the VIP: the backend's
kernel resets the connection (unread data at close), lbnat passes the RST on to the client, the
row is closed and goes, the health checker marks the backend dead, and the other backends keep
getting (and serving) new flows."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from lbnat_lab.netns import CLIENTS, LB_IP
from tests.faults.admin import backends, no_traceback, wait_until
from tests.faults.tools import is_prefix_of_stream
from tests.integration.conftest import BACKEND_PORT, VIP_PORT, Bed, admin_json, require

pytestmark = pytest.mark.netns

FAST = ("--health-interval", "0.2", "--health-timeout", "1")
TOOLS = ("python3", "-m", "tests.faults.tools")
RATE = 4 << 20  # bytes/s of the upload: slow enough to be caught mid-transfer
KILL_AT = 1 << 20  # bytes the backend has written before the kill


def test_a_backend_killed_mid_transfer(fbed: Bed, tmp_path: Path) -> None:
    require("socat")
    received = tmp_path / "received"
    sink = fbed.start(
        "b1", "socat", "-u", f"TCP-LISTEN:{BACKEND_PORT},reuseaddr", f"CREATE:{received}",
        name="socat sink b1",
    )  # fmt: skip
    fbed.lab.wait_tcp_listening("b1", BACKEND_PORT)
    fbed.chat_server("b2")
    lbnat = fbed.lbnat(*FAST, "--workers", "2", backends=("b1", "b2"))
    sender = fbed.start(
        "c1", *TOOLS, "send", LB_IP, str(VIP_PORT), "--bytes", str(1 << 30), "--rate", str(RATE),
        "--seed", "7", "--limit", "60", name="sender",
    )  # fmt: skip
    local = json.loads(sender.expect('"connected"'))["local"]
    client = f"{CLIENTS['c1']}:{local}"
    wait_until("1 MB at the backend", lambda: received.exists() and
               received.stat().st_size >= KILL_AT)  # fmt: skip
    [row] = [r for r in admin_json(fbed, "sessions") if r["client"] == client]
    assert row["state"] == "ESTABLISHED" and row["backend"] == f"198.18.0.21:{BACKEND_PORT}"

    sink.signal(signal.SIGKILL)
    assert sink.wait() == -signal.SIGKILL
    done = json.loads(sender.expect('"done"', timeout=30))
    assert done["error"] in ("ConnectionResetError", "BrokenPipeError"), done
    ok, size = is_prefix_of_stream(received, seed=7)
    assert ok and size >= KILL_AT  # what arrived before the kill is intact

    # The row is closed at once (CLOSE, lingering `timeouts.close`) or already gone.
    rows = [r for r in admin_json(fbed, "sessions") if r["client"] == client]
    assert rows == [] or rows[0]["state"] == "CLOSE", rows
    lbnat.expect(f"client <{CLIENTS['c1']},{local}> terminated ", timeout=30)
    lbnat.expect(f"IP : 198.18.0.21, Port : {BACKEND_PORT} Server is dead", timeout=30)
    # New flows go to the live backend, and it serves them.
    for name in ("after1", "after2"):
        chat, server = fbed.chat_client("c2", name)
        assert server == "b2"
        chat.send_line("still here")
        chat.expect(f"[{name}] still here")
    health = {ip: b["health"] for ip, b in backends(fbed).items()}
    assert health == {"198.18.0.21": "dead", "198.18.0.22": "alive"}
    assert no_traceback(lbnat.err.snapshot(), lbnat.out.snapshot())
