"""Abuse of the registration channel while a good backend registers: 200 idle connections held
open, garbage, an over-long line, an unsigned request, a forged MAC, a tampered message and a
replayed (captured) good request. The good `register` is answered within 1 s and the backend
appears in status; each bad request gets a clear refusal and one log line; the idle
connections are dropped after the server's idle bound."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lbnat.control.server import IDLE_TIMEOUT
from lbnat_lab.netns import LB_IP, host_ip
from tests.faults.admin import backends, no_traceback
from tests.integration.conftest import BACKEND_PORT, Bed

pytestmark = pytest.mark.netns

TOOLS = ("python3", "-m", "tests.faults.tools")
CONTROL_PORT = 7000
SERVICE = "tcp:20000"
IDLE = 200

EXPECTED = {  # case -> a piece of the refusal
    "garbage": "not valid UTF-8",
    "not an object": "must be a JSON object",
    "over-long": "at most 4096 bytes",
    "unsigned": "missing",
    "forged mac": "mac: does not match",
    "tampered": "mac: does not match",
    "replay": "nonce: already used",
}


def test_control_channel_abuse_while_a_good_backend_registers(fbed: Bed, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("fault suite secret\n")
    secret.chmod(0o600)
    fbed.chat_server("b1")
    lbnat = fbed.lbnat(
        "--health-interval", "0.2", "--health-timeout", "1", "--workers", "2",
        "--control", f"{LB_IP}:{CONTROL_PORT}", "--secret-file", str(secret),
        "--allow", "198.18.0.0/24", backends=("b1",),
    )  # fmt: skip
    b4 = fbed.lab.add_backend(4)
    fbed.chat_server(b4)
    abuser = fbed.start(
        "c2", *TOOLS, "abuse", LB_IP, str(CONTROL_PORT), "--secret-file", str(secret),
        "--idle", str(IDLE), "--hold", str(IDLE_TIMEOUT + 5), "--service", SERVICE,
        name="abuser",
    )  # fmt: skip
    assert json.loads(abuser.expect('"idle"', timeout=30))["open"] == IDLE
    good = fbed.lab.run(
        b4, *TOOLS, "register", LB_IP, str(CONTROL_PORT), "--secret-file", str(secret),
        "--service", SERVICE, "--ip", host_ip(b4), "--backend-port", str(BACKEND_PORT),
    )  # fmt: skip
    answer = json.loads(good.stdout)
    print(f"good register answered in {answer['seconds']} s with {IDLE} idle connections open")
    reply = json.loads(answer["reply"])  # an error (no answer within 1 s) is no JSON
    assert reply["ok"] is True and reply["state"] == "waiting for a good probe", reply
    lbnat.expect(f"IP : {host_ip(b4)}, Port : {BACKEND_PORT} Server is alive")
    assert backends(fbed)[host_ip(b4)]["health"] == "alive"

    replies = {}
    for _ in range(len(EXPECTED) + 1):
        event = json.loads(abuser.expect('"reply"'))
        replies[event["case"]] = json.loads(event["reply"])
    assert replies["good"]["ok"] is True
    for case, piece in EXPECTED.items():
        assert replies[case]["ok"] is False and piece in replies[case]["error"], (case, replies)
    held = json.loads(abuser.expect('"held"', timeout=IDLE_TIMEOUT + 30))
    assert held == {"event": "held", "closed": IDLE, "of": IDLE}  # idle ones dropped
    # One log line per refusal, none for the good ones. (The abuser may see the last idle
    # connection closed a moment before lbnat has logged it: wait for the lines, bounded.)
    silent = f"refused a request from 198.18.0.12: no request within {IDLE_TIMEOUT:g} s"

    def all_silent_logged(lines: list[str]) -> bool | None:
        return True if sum(silent in x for x in lines) >= IDLE else None

    lbnat.out.wait_for(all_silent_logged, f"{IDLE} idle connections logged")
    refused = [line for line in lbnat.out.snapshot() if "control : refused" in line]
    assert len([x for x in refused if "198.18.0.12" in x]) >= len(EXPECTED), refused
    assert not any(host_ip(b4) in x for x in refused)
    assert sum(silent in x for x in refused) == IDLE
    assert lbnat.popen.poll() is None
    assert no_traceback(lbnat.out.snapshot(), lbnat.err.snapshot())
