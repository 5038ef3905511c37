"""The lab helper itself (lbnat_lab.netns.Lab), without lbnat: the chat server and clients and
the UDP echo server straight to a backend, processes stopped by pid, namespaces gone after
close, and a failing lab.sh reported as a LabError."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from lbnat_lab.netns import BACKENDS, CHAT, ECHO, Lab, LabError, skip_reason

pytestmark = pytest.mark.netns

PORT = 9000


def namespaces(prefix: str) -> list[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    return [line.split()[0] for line in listing.stdout.splitlines()
            if line.startswith(f"{prefix}-")]  # fmt: skip


@pytest.fixture
def lab() -> Iterator[Lab]:
    if (reason := skip_reason()) is not None:
        pytest.skip(reason)
    with Lab(backends=1) as lab:
        yield lab


def say(client: subprocess.Popen[bytes], line: bytes) -> None:
    assert client.stdin is not None
    client.stdin.write(line)
    client.stdin.flush()


def test_chat_through_the_lab_then_everything_is_gone(lab: Lab) -> None:
    hosts = ("b1", "c1", "c2", "lb", "sw")  # one backend, and the switch
    assert sorted(namespaces(lab.prefix)) == [f"{lab.prefix}-{host}" for host in hosts]
    server = lab.popen("b1", *CHAT, "server", "--port", str(PORT), "--name", "b1")
    lab.wait_tcp_listening("b1", PORT)
    alice = lab.popen("c1", *CHAT, "client", BACKENDS["b1"], str(PORT), "alice",
                      stdin=subprocess.PIPE)  # fmt: skip
    bob = lab.popen("c2", *CHAT, "client", BACKENDS["b1"], str(PORT), "bob",
                    stdin=subprocess.PIPE)  # fmt: skip
    for client in (alice, bob):
        assert lab.expect(client, "* connected to") == "* connected to b1"
    lab.expect(server, "(total 2)")
    say(alice, b"hello from c1\n")
    for client in (alice, bob):
        assert lab.expect(client, "hello from c1") == "[alice] hello from c1"
    say(alice, b"q\n")
    assert alice.wait(10) == 0
    lab.expect(server, "(total 1)")
    assert server.poll() is None and bob.poll() is None  # still running: close() ends them
    lab.close()
    assert server.returncode is not None and bob.returncode is not None
    assert namespaces(lab.prefix) == []
    with pytest.raises(RuntimeError):
        lab.popen("c1", "true")


def test_udp_echo_and_wait_listening(lab: Lab) -> None:
    echo = lab.popen("b1", *ECHO, "--port", str(PORT), "--name", "b1")
    lab.wait_listening("b1", PORT, udp=True)
    code = (
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5); "
        f"s.sendto(b'ping', ('{BACKENDS['b1']}', {PORT})); print(s.recv(100).decode())"
    )
    assert lab.run("c1", "python3", "-c", code).stdout == "[b1] ping\n"
    with pytest.raises(TimeoutError, match="nothing listens on tcp port 9001"):
        lab.wait_tcp_listening("b1", PORT + 1, timeout=0.3)

    polls: list[None] = []
    with pytest.raises(LookupError):

        def give_up() -> None:
            polls.append(None)
            raise LookupError("stop waiting")

        lab.wait_listening("b1", PORT + 1, timeout=30, between_polls=give_up)
    assert len(polls) == 1
    assert lab.stop(echo) == 0  # SIGTERM: the echo server stops cleanly


def test_a_failing_lab_script_is_a_lab_error(lab: Lab) -> None:
    with pytest.raises(LabError, match=r"lab\.sh no-such-command failed"):
        lab.script("no-such-command")
