"""The kernel fast path in the netns lab, with real clients and servers:

    c1, c2 ──┐                         ┌── b1 (socat sink/source, capture.py on eth0)
             ├── sw (bridge) ── lb ────┤
             │     lbnat --offload tc: tc ingress program on lb's eth0 + packet sockets
             └─────────────────────────┴── b2, b3

- bulk TCP both ways arrives byte for byte while the kernel carries almost all of it (GRO/GSO
  super-packets rewritten as one), and the rows leave the kernel when the flows end;
- every frame the backend receives has right checksums, partial ones (completed as the
  backend's kernel would) and complete ones alike, GSO super-packets included; and the Python
  path's frames, captured the same way, too;
- UDP enters the kernel once replied and its datagrams arrive;
- a killed lbnat's filter is replaced by the next one, and a stopped lbnat leaves none.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from lbnat_lab.netns import LB_IP
from tests.integration.conftest import (
    BACKEND_PORT,
    MB,
    VIP_PORT,
    WORKER_COUNTS,
    Bed,
    admin_json,
    random_file,
    require,
    sha256,
    variant_id,
)
from tests.integration.transfer import download, upload

# These tests are about the kernel path: they run it with one worker and with N.
pytestmark = [
    pytest.mark.netns,
    pytest.mark.parametrize(
        "bed", [(n, "tc") for n in WORKER_COUNTS], indirect=True, ids=variant_id
    ),
]

REPO = Path(__file__).resolve().parents[2]


def tc_filters(bed: Bed) -> str:
    return bed.lab.run("lb", "tc", "filter", "show", "dev", "eth0", "ingress").stdout


def our_filters(bed: Bed) -> int:
    """lbnat's filters on the LB's eth0 (one line each in `tc filter show`)."""
    return sum("lbnat_fastpath" in line for line in tc_filters(bed).splitlines())


def offload_status(bed: Bed) -> dict[str, int]:
    status = admin_json(bed, "status")
    offload: dict[str, int] = status["offload"]
    return offload


def test_bulk_both_ways_rides_the_kernel(scratch: Path, bed: Bed) -> None:
    require("socat")
    lbnat = bed.lbnat("--no-health", backends=("b1",))
    assert "lbnat_fastpath" in tc_filters(bed)
    lbnat.expect("data plane : ")
    up_src, up_dst = scratch / "up.src", scratch / "up.dst"
    up_sum = random_file(up_src, 20 * MB)
    upload(bed, "c1", "b1", up_src, up_dst, paced=True)
    assert sha256(up_dst) == up_sum

    down_src, down_dst = scratch / "down.src", scratch / "down.dst"
    down_sum = random_file(down_src, 20 * MB)
    download(bed, "c2", "b1", down_src, down_dst, paced=True)
    assert sha256(down_dst) == down_sum
    lbnat.expect("Current NAT table length : 0")

    offload = offload_status(bed)
    assert offload["offloaded"] == 2 and offload["withdrawn"] == 2 and offload["rows"] == 0
    # the kernel carried the 38 MB after each flow's first MB (the Python path: handshakes,
    # FINs, that first MB)
    assert offload["bytes"] > 36 * MB, offload
    service = admin_json(bed, "status")["services"][0]
    assert service["bytes"] >= offload["bytes"]  # the service's counters include the kernel's
    assert bed.stop(lbnat) == 0
    assert "lbnat_fastpath" not in tc_filters(bed)


def capture(bed: Bed, host: str, source: str, seconds: float) -> subprocess.Popen[bytes]:
    ready = bed.tmp / f"capture-{host}.ready"
    proc = bed.lab.popen(
        host, sys.executable, "-m", "tests.integration.capture", "--source", source,
        "--seconds", str(seconds), "--limit", "3000", "--ready", str(ready),
        cwd=str(REPO), stdout=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while not ready.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert ready.exists(), "the capture did not start"
    return proc


def captured(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=60)
    summary: dict[str, Any] = json.loads(out)
    return summary


def test_every_frame_the_backend_gets_has_right_checksums(scratch: Path, bed: Bed) -> None:
    """8 MB, the first through the Python path, the rest through the kernel's: the backend's
    eth0 sees partial checksums (the client's TSO) and GSO super-packets from both, every one
    of which completes to a right checksum."""
    require("socat")
    lbnat = bed.lbnat("--no-health", backends=("b1",))
    src, dst = scratch / "src", scratch / "dst"
    digest = random_file(src, 8 * MB)
    cap = capture(bed, "b1", LB_IP, seconds=30)
    upload(bed, "c1", "b1", src, dst, paced=True)
    time.sleep(0.3)  # the last frames into the capture's socket
    cap.send_signal(signal.SIGTERM)
    summary = captured(cap)
    assert sha256(dst) == digest
    assert summary["bad"] == [], summary
    assert summary["frames"] > 20 and summary["partial"] > 0, summary
    assert summary["gso"] > 0, summary  # super-packets crossed the kernel path whole
    assert offload_status(bed)["offloaded"] == 1
    assert bed.stop(lbnat) == 0


def test_udp_enters_the_kernel_once_replied(bed: Bed) -> None:
    require("socat")
    bed.start("b1", "socat", f"UDP-RECVFROM:{BACKEND_PORT},fork", "EXEC:cat", name="udp echo b1")
    lbnat = bed.lbnat("--no-health", "--proto", "udp", backends=("b1",))
    script = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.settimeout(2)\n"
        f"s.bind(('',40123)); s.connect(('{LB_IP}',{VIP_PORT}))\n"
        "import time\n"
        "got=0\n"
        "for i in range(300):\n"
        "    if i == 100: time.sleep(0.5)\n"  # replied past OFFLOAD_AFTER: a tick hands it over
        "    s.send(b'datagram %d' % i)\n"
        "    try:\n"
        "        got += s.recv(100) == b'datagram %d' % i\n"
        "    except OSError: pass\n"
        "print(got)\n"
    )
    done = bed.lab.run("c1", sys.executable, "-c", script, timeout=60)
    assert int(done.stdout) >= 295, done.stdout
    offload = offload_status(bed)
    assert offload["rows"] == 1 and offload["packets"] >= 380, offload  # the last 200, both ways
    sessions = admin_json(bed, "sessions")
    assert [row["path"] for row in sessions] == ["kernel"]
    assert bed.stop(lbnat) == 0


def test_a_killed_lbnats_filter_is_replaced_and_a_stopped_one_leaves_none(bed: Bed) -> None:
    bed.chat_server("b1")
    first = bed.lbnat(backends=("b1",))
    assert our_filters(bed) == 1
    first.signal(signal.SIGKILL)
    first.wait()
    assert our_filters(bed) == 1  # left behind, still attached
    second = bed.lbnat(backends=("b1",))
    assert our_filters(bed) == 1  # replaced, not added
    client, server = bed.chat_client("c1", "after")
    assert server == "b1"
    client.send_line("hello")
    client.expect("[after] hello")
    client.send_line("q")
    assert client.wait() == 0
    assert bed.stop(second) == 0
    assert "lbnat_fastpath" not in tc_filters(bed)
