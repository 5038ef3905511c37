"""Admin-socket clients that get stuck: one connects and sends nothing, one asks for a big
`sessions` reply (3,000 UDP rows) and never reads it. Meanwhile `lbnat status` is answered and
lbnat forwards; both stuck clients are dropped after the idle bound and logged in one line."""

from __future__ import annotations

import json

import pytest

from lbnat.control.server import IDLE_TIMEOUT
from lbnat_lab.netns import ECHO, LB_IP
from tests.faults.admin import no_traceback, wait_until
from tests.integration.conftest import BACKEND_PORT, VIP_PORT, Bed, admin_json

pytestmark = pytest.mark.netns

TOOLS = ("python3", "-m", "tests.faults.tools")
ROWS = 3000  # rows of the sessions reply (~200 bytes each: more than a socket buffer takes);
# one backend has 4,536 NAT ports (61000-65535), so the echo flows below still find one


def echo(fbed: Bed, text: str) -> str:
    out = fbed.lab.run("c2", *TOOLS, "udp-echo", LB_IP, str(VIP_PORT), "--text", text).stdout
    answer: str = json.loads(out)["answer"]
    return answer


def test_stuck_admin_clients_are_dropped_and_block_nothing(fbed: Bed) -> None:
    fbed.start("b1", *ECHO, "--port", str(BACKEND_PORT), "--name", "b1", name="echo b1")
    fbed.lab.wait_listening("b1", BACKEND_PORT, udp=True)
    lbnat = fbed.lbnat("--proto", "udp", "--no-health", "--workers", "2", backends=("b1",))
    fbed.lab.run("c1", *TOOLS, "udp-flows", LB_IP, str(VIP_PORT), "--count", str(ROWS))
    wait_until(f"{ROWS} rows", lambda: admin_json(fbed, "status")["rows"] >= ROWS)

    stuck = fbed.start(
        "lb", *TOOLS, "stuck-admin", str(fbed.tmp / "admin.sock"), "--wait",
        str(IDLE_TIMEOUT + 3), name="stuck",
    )  # fmt: skip
    stuck.expect('"stuck"')
    # While they hang on: status is answered (each on a thread of its own), lbnat forwards.
    for n in range(3):
        assert admin_json(fbed, "status")["rows"] >= ROWS
        assert echo(fbed, f"ping {n}") == f"[b1] ping {n}"
    result = json.loads(stuck.expect('"stuck-result"', timeout=IDLE_TIMEOUT + 15))
    assert result["silent"] == {"closed": True, "bytes": 0, "whole": False}
    assert result["unread"]["closed"] is True and result["unread"]["whole"] is False  # cut off
    log = lbnat.out.snapshot()
    assert (
        sum(f"refused a request from admin: no request within {IDLE_TIMEOUT:g} s" in x for x in log)
        == 1
    )
    assert (
        sum(
            f"refused a request from admin: did not read its reply within {IDLE_TIMEOUT:g} s" in x
            for x in log
        )
        == 1
    )
    assert echo(fbed, "after") == "[b1] after"
    assert lbnat.popen.poll() is None
    assert no_traceback(log, lbnat.err.snapshot())
