"""Bulk data through lbnat with TSO/GSO on, and the LB host's kernel kept quiet: no RST and no
ICMP unreachable for lbnat's flows, while the host's other services keep working."""

from __future__ import annotations

from pathlib import Path

import pytest

from lbnat_lab.netns import CLIENTS, LB_IP, host_ip
from tests.integration.conftest import (
    BACKEND_PORT,
    LBNAT_TABLE,
    MB,
    NEW_CLIENT_RE,
    VIP_PORT,
    Bed,
    random_file,
    require,
    sha256,
)
from tests.integration.transfer import download, upload

pytestmark = pytest.mark.netns

TRANSFER_TIMEOUT = 120.0  # bound of one transfer (a pure-Python data path on 2 busy cores)


def offloads(bed: Bed, host: str) -> dict[str, str]:
    """`ethtool -k eth0` in a namespace: feature -> "on"/"off" (with " [fixed]" cut)."""
    features: dict[str, str] = {}
    for line in bed.lab.run(host, "ethtool", "-k", "eth0").stdout.splitlines()[1:]:
        name, _, value = line.strip().partition(": ")
        features[name] = value.split()[0] if value else ""
    return features


def test_bulk_50mb_both_ways_with_tso(scratch: Path, bed: Bed) -> None:
    """50 MB client -> backend and 50 MB backend -> client arrive byte for byte, with the
    lab's veths segmenting in "hardware" (64 KB GSO super-packets reach lbnat)."""
    require("socat", "ethtool")
    for host in ("lb", "c1", "b1"):
        features = offloads(bed, host)
        assert features["tcp-segmentation-offload"] == "on", (host, features)
        assert features["generic-segmentation-offload"] == "on", (host, features)
    # No health probes: each socat below accepts exactly one connection.
    lbnat = bed.lbnat("--no-health", backends=("b1",))

    up_src, up_dst = scratch / "up.src", scratch / "up.dst"
    up_sum = random_file(up_src, 50 * MB)
    upload(bed, "c1", "b1", up_src, up_dst)
    assert up_dst.stat().st_size == 50 * MB
    assert sha256(up_dst) == up_sum
    flow = lbnat.out.expect_re(NEW_CLIENT_RE)
    assert (flow["ip"], flow["bip"]) == (CLIENTS["c1"], host_ip("b1"))
    lbnat.expect(f"client <{flow['ip']},{flow['port']}> terminated ")
    assert lbnat.expect("Current NAT table length : ") == "Current NAT table length : 0"

    down_src, down_dst = scratch / "down.src", scratch / "down.dst"
    down_sum = random_file(down_src, 50 * MB)
    download(bed, "c2", "b1", down_src, down_dst)
    assert down_dst.stat().st_size == 50 * MB
    assert sha256(down_dst) == down_sum
    flow = lbnat.out.expect_re(NEW_CLIENT_RE)
    assert (flow["ip"], flow["bip"]) == (CLIENTS["c2"], host_ip("b1"))
    lbnat.expect(f"client <{flow['ip']},{flow['port']}> terminated ")
    assert lbnat.expect("Current NAT table length : ") == "Current NAT table length : 0"
    assert lbnat.out.count(" terminated ") == 2


LBTEST_RULES = f"""
table ip lbtest {{
    chain out {{
        type filter hook output priority 0; policy accept;
        ip saddr {LB_IP} tcp sport {{ {VIP_PORT}, 61000-65535 }} tcp flags & rst == rst counter \
comment "rst from lbnat ports"
        tcp flags & rst == rst counter comment "any rst"
        icmp type destination-unreachable counter comment "icmp unreachable"
    }}
}}
"""


def test_lb_kernel_sends_no_rst_and_other_services_work(scratch: Path, bed: Bed) -> None:
    """With lbnat's guard, the LB host's kernel never answers lbnat's packets: our own nft
    counters on the host's output see no RST (and no ICMP unreachable) during chat and bulk
    traffic; a chat server of the LB host itself and the host's own outgoing connections work
    alongside (the guard is scoped to the VIP port and the NAT ports)."""
    require("socat")
    bed.lab.run("lb", "nft", "-f", "-", input=LBTEST_RULES)
    servers = {b: bed.chat_server(b) for b in ("b1", "b2", "b3")}
    # No health probes here: a probe connects and closes without reading the chat greeting,
    # which makes the prober's kernel send a RST -- legitimate, but it would blur "any rst".
    lbnat = bed.lbnat("--no-health")

    # Another service of the LB host, used from c1 while lbnat runs.
    bed.chat_server("lb", port=9999, name="lbhost")
    local, server = bed.chat_client("c1", "local", ip=LB_IP, port=9999)
    assert server == "lbhost"
    local.send_line("the host still serves")
    local.expect("[local] the host still serves")
    # The LB host's own connection out to a backend, directly (not through lbnat).
    direct, server = bed.chat_client("lb", "direct", ip=host_ip("b1"), port=BACKEND_PORT)
    assert server == "b1"

    # Chat through lbnat: 6 clients, lines relayed, everyone quits politely.
    clients = []
    for i in range(1, 7):
        client, server = bed.chat_client("c1" if i % 2 else "c2", f"t{i}")
        assert server == ("b1", "b2", "b3")[(i - 1) % 3]
        clients.append(client)
    for i, client in enumerate(clients, start=1):
        client.send_line(f"line {i}")
        clients[(i + 2) % 6].expect(f"[t{i}] line {i}")  # the other client of that backend
    direct.expect("[t1] line 1")  # the host's own client shares b1 with t1 and t4
    direct.expect("[t4] line 4")
    for client in clients:
        client.send_line("q")
        assert client.wait() == 0
    lbnat.expect("Current NAT table length : 0")
    direct.send_line("q")
    assert direct.wait() == 0

    # Bulk through lbnat: the chat servers make way for socat sinks, one 8 MB file each.
    for b in ("b1", "b2", "b3"):
        bed.stop(servers[b])
    sent: dict[str, str] = {}
    sinks = {}
    for b in ("b1", "b2", "b3"):
        sinks[b] = bed.start(
            b, "socat", "-u", f"TCP-LISTEN:{BACKEND_PORT},reuseaddr",
            f"CREATE:{scratch / f'bulk.{b}'}", name=f"socat sink {b}",
        )  # fmt: skip
        bed.lab.wait_tcp_listening(b, BACKEND_PORT)
    for n, host in enumerate(("c1", "c2", "c1")):
        src = scratch / f"bulk.src{n}"
        sent[random_file(src, 8 * MB)] = src.name
        bed.lab.run(
            host, "socat", "-u", f"OPEN:{src}", f"TCP:{LB_IP}:{VIP_PORT}", timeout=TRANSFER_TIMEOUT
        )
    for sink in sinks.values():
        assert sink.wait(TRANSFER_TIMEOUT) == 0, sink.err.tail()
    received = sorted(sha256(scratch / f"bulk.{b}") for b in ("b1", "b2", "b3"))
    assert received == sorted(sent)
    lbnat.expect("Current NAT table length : 0")
    assert lbnat.out.count(" terminated ") == 9

    # The host's own service and connection still work after all that.
    local.send_line("and still after")
    local.expect("[local] and still after")
    local.send_line("q")
    assert local.wait() == 0
    bed.chat_server("b1", port=9001, name="b1-again")
    direct, server = bed.chat_client("lb", "direct-again", ip=host_ip("b1"), port=9001)
    assert server == "b1-again"
    direct.send_line("q")
    assert direct.wait() == 0

    ours = bed.nft_counters("ip", "lbtest")
    assert ours == {"rst from lbnat ports": 0, "any rst": 0, "icmp unreachable": 0}, ours
    guard = bed.nft_counters("ip", LBNAT_TABLE)
    assert guard["kernel RSTs"] == 0, guard
    assert guard["lbnat owns these"] > 0, guard  # the packets did reach the host's stack
    assert bed.stop(lbnat) == 0
    assert LBNAT_TABLE not in bed.nft_tables()


def test_tcp_probes_make_the_lb_host_send_no_rst(bed: Bed) -> None:
    """A tcp probe connects, half-closes and reads what the server sent (the chat greeting) before
    it closes: several rounds of probes leave the LB host's RST counter at zero, and the chat
    servers log only orderly closes."""
    bed.lab.run("lb", "nft", "-f", "-", input=LBTEST_RULES)
    servers = {b: bed.chat_server(b) for b in ("b1", "b2", "b3")}
    lbnat = bed.lbnat("--health-check", "tcp", "--health-interval", "0.2", "--log-transitions")
    for server in servers.values():
        for _ in range(5):  # five probe rounds seen by every backend
            server.expect("closed client : ")
    assert lbnat.out.count("Server is dead") == 0
    ours = bed.nft_counters("ip", "lbtest")
    assert ours["any rst"] == 0, ours
    assert bed.stop(lbnat) == 0
