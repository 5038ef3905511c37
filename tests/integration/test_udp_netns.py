"""UDP load balancing in network namespaces: round-robin over UDP echo backends that answer
with their own name, a client kept on one backend, idle expiry, ICMP port-unreachable back to
the client, 10,000 datagrams per client unaltered, and TCP and UDP services side by side."""

from __future__ import annotations

import json
import sys
import time

import pytest

from lbnat_lab.netns import ECHO, LB_IP, host_ip
from tests.integration.conftest import BACKEND_PORT, Bed, Proc, console_script

pytestmark = pytest.mark.netns

UDP_PORT = 20053


def echo_server(bed: Bed, host: str, port: int = BACKEND_PORT) -> Proc:
    proc = bed.start(host, *ECHO, "--port", str(port), "--name", host, name=f"udp echo {host}")
    proc.expect("listening")
    return proc


def udptool(bed: Bed, host: str, *argv: str) -> object:
    result = bed.lab.run(
        host, sys.executable, "-m", "tests.integration.udptool", *argv, timeout=120
    )
    return json.loads(result.stdout)


def udp_lbnat(bed: Bed, *options: str, backends: tuple[str, ...] = ("b1", "b2", "b3")) -> Proc:
    return bed.lbnat("--proto", "udp", "--port", str(UDP_PORT), *options, backends=backends)


def test_udp_clients_spread_round_robin_and_stay(bed: Bed) -> None:
    for b in ("b1", "b2", "b3"):
        echo_server(bed, b)
    udp_lbnat(bed, "--health-interval", "0.5")
    seen = udptool(bed, "c1", "clients", LB_IP, str(UDP_PORT), "--clients", "6", "--count", "5")
    assert isinstance(seen, dict)
    names = list(seen.values())
    assert all(len(set(replies)) == 1 for replies in names), names  # each stays on its backend
    assert [replies[0] for replies in names] == ["b1", "b2", "b3", "b1", "b2", "b3"]


def test_idle_udp_flows_expire_and_are_scheduled_anew(bed: Bed) -> None:
    for b in ("b1", "b2"):
        echo_server(bed, b)
    lbnat = udp_lbnat(
        bed,
        "--no-health",
        "--udp-timeout",
        "1",
        "--udp-replied-timeout",
        "1",
        backends=("b1", "b2"),
    )
    first = udptool(bed, "c1", "once", LB_IP, str(UDP_PORT), "--source-port", "40123")
    assert first == {"answer": "[b1] hello"}
    lbnat.expect("client <198.18.0.11,40123> terminated ")  # by the idle timeout
    assert lbnat.expect("Current NAT table length : ") == "Current NAT table length : 0"
    again = udptool(bed, "c1", "once", LB_IP, str(UDP_PORT), "--source-port", "40123")
    assert again == {"answer": "[b2] hello"}


def test_port_unreachable_from_a_stopped_backend_reaches_the_client(bed: Bed) -> None:
    server = echo_server(bed, "b1")
    udp_lbnat(bed, "--no-health", backends=("b1",))
    assert udptool(bed, "c1", "once", LB_IP, str(UDP_PORT), "--source-port", "40200") == {
        "answer": "[b1] hello"
    }
    bed.stop(server)
    # The same flow: b1's kernel answers with an ICMP port-unreachable, lbnat translates it,
    # and the client's connected socket reports ECONNREFUSED.
    refused = udptool(bed, "c1", "once", LB_IP, str(UDP_PORT), "--source-port", "40200")
    assert refused == {"error": "refused"}


UNREACHABLE_COUNTER = """
table ip lbtest {
    chain out {
        type filter hook output priority 0; policy accept;
        icmp type destination-unreachable counter comment "icmp unreachable"
    }
}
"""


def test_ten_thousand_datagrams_per_client_arrive_unaltered(bed: Bed) -> None:
    """...and the LB host's kernel never answers the VIP port with a port-unreachable (the
    guard drops lbnat's UDP before the kernel's UDP stack sees it)."""
    bed.lab.run("lb", "nft", "-f", "-", input=UNREACHABLE_COUNTER)
    for b in ("b1", "b2"):
        echo_server(bed, b)
    udp_lbnat(bed, "--health-interval", "1", "--quiet", backends=("b1", "b2"))
    for client in ("c1", "c2"):
        counts = udptool(bed, client, "flood", LB_IP, str(UDP_PORT), "--count", "10000")
        assert counts == {"sent": 10000, "received": 10000, "altered": 0, "lost": 0}, counts
    assert bed.nft_counters("ip", "lbtest") == {"icmp unreachable": 0}


def test_tcp_and_udp_services_side_by_side(bed: Bed) -> None:
    for b in ("b1", "b2"):
        bed.chat_server(b)
        echo_server(bed, b)
    config = bed.tmp / "two.json"
    backends = [{"ip": host_ip(b), "port": BACKEND_PORT} for b in ("b1", "b2")]
    health = {"interval": 0.5, "timeout": 0.3}
    config.write_text(
        json.dumps(
            {
                "lb_ip": LB_IP,
                "services": [
                    {
                        "name": "chat",
                        "protocol": "tcp",
                        "port": 20000,
                        "health": health,
                        "backends": backends,
                    },
                    {
                        "name": "echo",
                        "protocol": "udp",
                        "port": UDP_PORT,
                        "health": health,
                        "backends": backends,
                    },
                ],
            }
        )
    )
    lbnat = bed.start(
        "lb", console_script("lbnat"), "run", "--config", str(config),
        "--admin-socket", str(bed.tmp / "admin.sock"), name="lbnat",
    )  # fmt: skip
    lbnat.expect("srcIP : ")
    deadline = time.monotonic() + 10
    while lbnat.out.count("Server is alive") < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    chat, landed = bed.chat_client("c1", "tcpclient")
    assert landed == "b1"
    seen = udptool(bed, "c2", "clients", LB_IP, str(UDP_PORT), "--clients", "2", "--count", "3")
    assert isinstance(seen, dict)
    assert [replies for replies in seen.values()] == [["b1"] * 3, ["b2"] * 3]
    chat.send_line("over tcp")
    chat.expect("[tcpclient] over tcp")
