"""A reload storm: SIGHUP every 100 ms while an upload runs through the VIP, the config file
flipping between two versions (a backend added and removed, the scheduler changed) before each
signal. The upload arrives whole and intact, lbnat lives and logs no traceback, and once the
storm is over the services are exactly as the file last said."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from lbnat_lab.netns import LB_IP, host_ip
from tests.faults.admin import backends, no_traceback, wait_until
from tests.faults.conftest import scaled
from tests.faults.tools import is_prefix_of_stream
from tests.integration.conftest import (
    BACKEND_PORT,
    VIP_PORT,
    Bed,
    admin_json,
    console_script,
    require,
)

pytestmark = pytest.mark.netns

STORM_SECONDS = scaled(3, 10)
PERIOD = 0.1  # seconds between two SIGHUPs
RATE = 4 << 20  # bytes/s of the upload
TOOLS = ("python3", "-m", "tests.faults.tools")


def write_config(path: Path, names: list[str], scheduler: str) -> None:
    """The config, atomically (a reload never reads half a file)."""
    service = {
        "name": "chat",
        "protocol": "tcp",
        "port": VIP_PORT,
        "scheduler": scheduler,
        "health": {"interval": 0.2, "timeout": 1},
        "backends": [{"ip": host_ip(b), "port": BACKEND_PORT} for b in names],
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"lb_ip": LB_IP, "services": [service]}))
    os.replace(tmp, path)


def test_a_reload_storm_during_a_transfer(fbed: Bed, tmp_path: Path) -> None:
    require("socat")
    received = tmp_path / "received"
    fbed.start(
        "b1", "socat", "-u", f"TCP-LISTEN:{BACKEND_PORT},reuseaddr", f"CREATE:{received}",
        name="socat sink b1",
    )  # fmt: skip
    fbed.lab.wait_tcp_listening("b1", BACKEND_PORT)
    for b in ("b2", "b3"):
        fbed.chat_server(b)
    config = tmp_path / "lbnat.json"
    versions = ((["b1", "b2"], "rr"), (["b1", "b2", "b3"], "lc"))
    write_config(config, *versions[0])
    lbnat = fbed.start(
        "lb", console_script("lbnat"), "run", "--config", str(config), "--workers", "2",
        "--admin-socket", str(fbed.tmp / "admin.sock"), name="lbnat",
    )  # fmt: skip
    fbed.wait_ready(lbnat, ("b1", "b2"))

    total = RATE * (STORM_SECONDS + 1)
    sender = fbed.start(
        "c1", *TOOLS, "send", LB_IP, str(VIP_PORT), "--bytes", str(total), "--rate", str(RATE),
        "--seed", "3", "--limit", "120", name="sender",
    )  # fmt: skip
    sender.expect('"connected"')
    signals = 0
    deadline = time.monotonic() + STORM_SECONDS
    while time.monotonic() < deadline:
        write_config(config, *versions[(signals + 1) % 2])
        lbnat.signal(signal.SIGHUP)
        signals += 1
        time.sleep(PERIOD)
    final_names, final_scheduler = versions[(signals) % 2]
    done = json.loads(sender.expect('"done"', timeout=120))
    assert done == {"event": "done", "sent": total, "error": ""}
    ok, size = is_prefix_of_stream(received, seed=3)
    assert ok and size == total

    # lbnat lives, each signal was answered by a reload line, and no traceback.
    assert lbnat.popen.poll() is None
    applied, rejected = lbnat.out.count("reload : applied"), lbnat.out.count("reload : rejected")
    print(f"{signals} SIGHUPs in {STORM_SECONDS} s: {applied} applied, {rejected} rejected")
    assert applied >= signals // 2 and rejected == 0
    assert no_traceback(lbnat.out.snapshot(), lbnat.err.snapshot())
    # The services as the file last said (a removed backend drains away; bounded wait).
    last = [host_ip(b) for b in final_names]
    wait_until("the last config in force", lambda: sorted(backends(fbed)) == sorted(last))
    [service] = admin_json(fbed, "status")["services"]
    assert (service["name"], service["scheduler"]) == ("chat", final_scheduler)
    assert not any(b["draining"] for b in service["backends"])
    # ... and it forwards: new chat flows land on the chat servers (b1's socat is gone) and
    # are served.
    wait_until("b1 dead", lambda: backends(fbed)[host_ip("b1")]["health"] == "dead")
    chat, server = fbed.chat_client("c2", "after")
    assert server in ("b2", "b3")
    chat.send_line("after the storm")
    chat.expect("[after] after the storm")
