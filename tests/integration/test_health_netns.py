"""Health checking in network namespaces: each probe kind against real servers, the
alive -> bad -> dead sequence, revival, what happens to a dead backend's flows (--on-dead), and
clients refused at once when every backend is dead.

Probe intervals are short here (0.2 s) so a test sees several rounds quickly; the probe timeout
stays at 1 s so a loaded machine does not fail healthy backends. Nothing asserts on how long
anything took.
"""

from __future__ import annotations

import sys

import pytest

from lbnat_lab.netns import ECHO, LB_IP, host_ip
from tests.integration.conftest import (
    BACKEND_PORT,
    NEW_CLIENT_RE,
    VIP_PORT,
    Bed,
    Proc,
    require,
    start_nginx,
)

pytestmark = pytest.mark.netns

FAST = ("--health-interval", "0.2", "--health-timeout", "1")


def healthy(lbnat: Proc, backend: str, port: int = BACKEND_PORT) -> bool:
    """Never dead, and alive at its latest report. (A single slow answer on a loaded machine
    may make a healthy backend "bad" for a round: that is the state machine doing its job.)"""
    states = reports(lbnat, backend, port)
    return bool(states) and "dead" not in states and states[-1] == "alive"


def reports(lbnat: Proc, backend: str, port: int = BACKEND_PORT) -> list[str]:
    """The states lbnat reported for one backend, in order ("alive", "bad", "dead")."""
    prefix = f"IP : {host_ip(backend)}, Port : {port} Server is "
    return [line[len(prefix) :] for line in lbnat.out.snapshot() if line.startswith(prefix)]


def wait_report(lbnat: Proc, backend: str, state: str, port: int = BACKEND_PORT) -> None:
    lbnat.expect(f"IP : {host_ip(backend)}, Port : {port} Server is {state}")


def block_new_connections(bed: Bed, backend: str, port: int = BACKEND_PORT) -> None:
    """Drop SYNs to the backend's port in its own namespace: probes fail, while connections
    already established keep working (a backend that hangs for new work)."""
    rules = (
        "table ip hang {\n chain input {\n  type filter hook input priority 0;\n"
        f"  tcp dport {port} tcp flags & (syn | ack) == syn drop\n }}\n}}\n"
    )
    bed.lab.run(backend, "nft", "-f", "-", input=rules)


def test_syn_probes_leave_the_backend_application_untouched(bed: Bed) -> None:
    """The default TCP probe is half-open: several rounds of "alive", and the chat servers
    accept no connection at all; a real client through lbnat is accepted as usual."""
    servers = {b: bed.chat_server(b) for b in ("b1", "b2", "b3")}
    lbnat = bed.lbnat(*FAST)
    for backend in servers:
        for _ in range(5):
            wait_report(lbnat, backend, "alive")
        assert healthy(lbnat, backend), reports(lbnat, backend)
    for server in servers.values():
        assert not any("connected client" in line for line in server.out.snapshot())
    client, landed = bed.chat_client("c1", "alice")
    assert landed == "b1"
    servers["b1"].expect("connected client : ")  # a real connection is seen
    client.send_line("q")
    assert client.wait() == 0


def test_dead_after_fall_failures_and_alive_again(bed: Bed) -> None:
    """A killed backend is "bad", "bad", then "dead" (exactly --fall 3 failed probes); new
    clients avoid it; restarted, it is alive again after one good probe and gets new flows."""
    servers = {b: bed.chat_server(b) for b in ("b1", "b2", "b3")}
    lbnat = bed.lbnat(*FAST)
    wait_report(lbnat, "b2", "alive")
    before_kill = len(reports(lbnat, "b2"))
    assert bed.stop(servers["b2"]) == 0
    wait_report(lbnat, "b2", "dead")
    states = reports(lbnat, "b2")[before_kill:]
    first_failure = next(i for i, state in enumerate(states) if state != "alive")
    assert states[first_failure : first_failure + 3] == ["bad", "bad", "dead"], states

    landed = [bed.chat_client(host, f"new{i}")[1] for i, host in enumerate(["c1", "c2"] * 2)]
    assert "b2" not in landed and set(landed) == {"b1", "b3"}, landed

    bed.chat_server("b2")
    wait_report(lbnat, "b2", "alive")
    landed = [bed.chat_client("c1", f"back{i}")[1] for i in range(3)]
    assert sorted(landed) == ["b1", "b2", "b3"], landed


@pytest.mark.parametrize("on_dead", ["keep", "reset"])
def test_flows_of_a_dead_backend_follow_on_dead(bed: Bed, on_dead: str) -> None:
    """b2 stops taking new connections (its SYNs are dropped) but its established chat goes
    on. --on-dead keep: the chat keeps working. --on-dead reset: lbnat sends a RST to both
    ends, the client and the server both see the connection die, and the row is gone."""
    servers = {b: bed.chat_server(b) for b in ("b1", "b2")}
    lbnat = bed.lbnat(*FAST, "--on-dead", on_dead, backends=("b1", "b2"))
    bed.chat_client("c1", "one")  # b1
    client, landed = bed.chat_client("c2", "two")
    assert landed == "b2"
    servers["b2"].expect("connected client : ")
    block_new_connections(bed, "b2")
    wait_report(lbnat, "b2", "dead")
    if on_dead == "keep":
        client.send_line("still here")
        client.expect("[two] still here")
        dump = bed.dump_table(lbnat)
        b2 = (host_ip("b2"), BACKEND_PORT)
        assert any(row.backend == b2 and row.state == "ESTABLISHED" for row in dump.entries)
    else:
        lbnat.expect("terminated")
        assert client.wait() == 1  # the chat client ends when its connection dies ...
        assert "Connection reset by peer" in client.err.tail()  # ... with a reset
        servers["b2"].expect("closed client : ")  # the backend's side was reset too
        dump = bed.dump_table(lbnat)
        assert all(row.backend[0] != host_ip("b2") for row in dump.entries), dump


def test_all_backends_dead_refuses_at_once(bed: Bed) -> None:
    """With every backend dead, a new client's connect fails with "connection refused" (lbnat
    answers the SYN with a RST) well within its 1 s timeout, and lbnat says why."""
    servers = [bed.chat_server(b) for b in ("b1", "b2")]
    lbnat = bed.lbnat(*FAST, backends=("b1", "b2"))
    for server in servers:
        bed.stop(server)
    for _ in range(2):  # the second report: the loop has surely applied the first one's snapshot
        wait_report(lbnat, "b1", "dead")
        wait_report(lbnat, "b2", "dead")
    code = (
        "import socket, sys\n"
        "try:\n"
        f"    socket.create_connection(({LB_IP!r}, {VIP_PORT}), timeout=1.0)\n"
        "except ConnectionRefusedError:\n"
        "    print('refused')\n"
        "except OSError as error:\n"
        "    print(type(error).__name__, error)\n"
    )
    result = bed.lab.run("c1", sys.executable, "-c", code)
    assert result.stdout.strip() == "refused"
    lbnat.expect("no backend available for client <")


def test_hello_probe(bed: Bed) -> None:
    """hello: b1 echoes lines (it answers "HealthCheck"), b2 answers something else."""
    require("socat")
    bed.start("b1", "socat", f"TCP-LISTEN:{BACKEND_PORT},reuseaddr,fork", "PIPE", name="echo b1")
    bed.start(
        "b2", "socat", f"TCP-LISTEN:{BACKEND_PORT},reuseaddr,fork", "SYSTEM:echo nope",
        name="nope b2",
    )  # fmt: skip
    for backend in ("b1", "b2"):
        bed.lab.wait_tcp_listening(backend, BACKEND_PORT)
    lbnat = bed.lbnat(*FAST, "--health-check", "hello", backends=("b1", "b2"))
    wait_report(lbnat, "b2", "dead")
    assert healthy(lbnat, "b1"), reports(lbnat, "b1")
    assert "alive" not in reports(lbnat, "b2")


def test_udp_probe(bed: Bed) -> None:
    """udp: b1 answers "OK"; b2 has no UDP server, so its ICMP port-unreachable fails every
    probe at once."""
    echo = bed.start(
        "b1", *ECHO, "--port", str(BACKEND_PORT), "--name", "b1",
        name="udp echo b1",
    )  # fmt: skip
    echo.expect("listening")
    lbnat = bed.lbnat(*FAST, "--proto", "udp", backends=("b1", "b2"))
    wait_report(lbnat, "b2", "dead")
    for _ in range(3):
        wait_report(lbnat, "b1", "alive")
    assert healthy(lbnat, "b1"), reports(lbnat, "b1")


def test_http_probe(bed: Bed) -> None:
    """http: GET /index.html expecting 200; b1 serves it, b2's nginx has no such file (404)."""
    require("nginx")
    start_nginx(bed, "b1")
    www = start_nginx(bed, "b2") / "www" / "index.html"
    www.unlink()
    lbnat = bed.lbnat(
        *FAST, "--health-check", "http", "--http-path", "/index.html",
        backends=("b1", "b2"), port=80,
    )  # fmt: skip
    wait_report(lbnat, "b2", "dead", port=80)
    assert healthy(lbnat, "b1", port=80), reports(lbnat, "b1", port=80)
    flow_lines = [line for line in lbnat.out.snapshot() if NEW_CLIENT_RE.search(line)]
    assert flow_lines == []  # probes are not flows through lbnat
