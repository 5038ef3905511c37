"""IPv6 through lbnat in network namespaces (issue 21): v6->v6 (curl, socat TCP and UDP,
iperf3 -6), IPv4 and IPv6 side by side in one lbnat, an IPv6 client to IPv4 backends (NAT64:
the backend sees SRCIP), path-MTU discovery through lbnat for both (a router with a 1280-byte
link in front of the client), ICMPv6 port unreachable back to the client, and IPv6 clients in
`lbnat status` / `lbnat sessions`. And, first, the dual-stack lab itself without lbnat.

One dual-stack lab (`Lab(ipv6=True)` plus `Lab.add_router`) serves the whole module, to keep
it short: c1 c2 lb b1 b2 b3 on br0 (198.18.0.0/24 and fd18::/64), the router r1 and the routed
client rc1 (198.18.1.11, fd18:1::11) behind a 1280-byte link. Each test starts its own lbnat
(from a config file: SRCIP 198.18.0.2 and ip6 fd18::2) and servers; `Bed.close` stops them by
pid at the end of the test, whether it passed or not, and any nftables table left in the LB's
namespace is deleted; the lab goes at the end of the module. Each test runs twice: lbnat with
two workers (PACKET_FANOUT: an ICMP error must reach the worker of its flow) and the kernel
fast path (tc: lbnat refuses to start without it), and with one worker, every packet through
Python (two of conftest's four variants, to keep the module short). Every wait and transfer
is bounded.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lbnat_bench.report import parse_iperf_tcp
from lbnat_lab.netns import (
    CHAT,
    ECHO,
    LB_IP,
    LB_IP6,
    ROUTED_CLIENT,
    ROUTED_MTU,
    Lab,
    host_ip,
    host_ip6,
    skip_reason,
)
from tests.integration.conftest import (
    MB,
    NGINX_CONF,
    Bed,
    Proc,
    console_script,
    random_file,
    require,
    sha256,
    variant_id,
)
from tests.integration.transfer import sent_from

pytestmark = pytest.mark.netns

TOOLS = ("nft", "socat", "curl", "iperf3", "nginx", "ping")
BACKEND_PORT = 9000
TRANSFER_TIMEOUT = 60.0  # one transfer of a few MB through lbnat (2 busy cores)
PMTU_TIMEOUT = 45.0  # a download that stalls for want of path-MTU discovery ends here
READY_TIMEOUT = 20.0
NEW_CLIENT_RE = re.compile(r"new client <\[?(?P<ip>[0-9a-fA-F:.]+?)\]?,(?P<port>\d+)> -> server ")


# -- the lab and the bed -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def lab6() -> Iterator[Lab]:
    """One dual-stack lab with the routed client for the whole module."""
    if (reason := skip_reason()) is not None:
        pytest.skip(reason)
    require(*TOOLS)
    with Lab(ipv6=True) as lab:
        lab.add_router(ROUTED_MTU)
        yield lab


VARIANTS = [(2, "tc"), (1, "off")]  # (workers, offload), as conftest.VARIANTS


@pytest.fixture(params=VARIANTS, ids=variant_id)
def bed(
    request: pytest.FixtureRequest, lab6: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Bed]:
    """The module's lab with this test's processes, stopped by pid afterwards; any nftables
    table left in the LB's namespace (an lbnat that had to be killed) is deleted too."""
    workers, offload = request.param
    monkeypatch.setenv("LBNAT_WORKERS", str(workers))
    monkeypatch.setenv("LBNAT_OFFLOAD", offload)
    yield from _bed(lab6, tmp_path)


@pytest.fixture
def lab_bed(lab6: Lab, tmp_path: Path) -> Iterator[Bed]:
    """The same without lbnat (no variants): the lab's own test."""
    yield from _bed(lab6, tmp_path)


HOSTS = ("c1", "c2", "lb", "b1", "b2", "b3", "r1", ROUTED_CLIENT)


def _bed(lab: Lab, tmp: Path) -> Iterator[Bed]:
    """A Bed on the shared lab; afterwards the lab is as the next test expects it: the test's
    processes stopped by pid (Bed.close), then anything still running in the lab's namespaces
    (a worker of a killed lbnat) ended by pid, lbnat's nftables tables and tc hook gone."""
    testbed = Bed(lab, tmp)
    try:
        yield testbed
    finally:
        try:
            testbed.close()
        finally:
            leftovers(lab)


def leftovers(lab: Lab) -> None:
    for host in HOSTS:
        listed = subprocess.run(["ip", "netns", "pids", lab.ns(host)], capture_output=True,
                                text=True, timeout=10, check=False)  # fmt: skip
        for pid in map(int, listed.stdout.split()):  # only this lab's namespaces: ours
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for family, table in nft_tables(lab, host):
            lab.run(host, "nft", "delete", "table", family, table, check=False)
    lab.run("lb", "tc", "qdisc", "del", "dev", "eth0", "clsact", check=False)


def nft_tables(lab: Lab, host: str) -> list[tuple[str, str]]:
    listing = lab.run(host, "nft", "list", "tables", check=False).stdout
    return [(words[1], words[2]) for line in listing.splitlines()
            if len(words := line.split()) == 3 and words[0] == "table"]  # fmt: skip


# -- lbnat with a config file ------------------------------------------------------------------


def backend(host: str, port: int, v6: bool) -> dict[str, Any]:
    return {"ip": host_ip6(host) if v6 else host_ip(host), "port": port}


def service(
    name: str, proto: str, port: int, backends: list[dict[str, Any]], health: bool = False
) -> dict[str, Any]:
    checks: dict[str, Any] = {"interval": 0.3, "timeout": 0.3} if health else {"enabled": False}
    return {"name": name, "protocol": proto, "port": port, "health": checks,
            "backends": backends}  # fmt: skip


def start_lbnat(bed: Bed, services: list[dict[str, Any]]) -> Proc:
    """lbnat with SRCIP LB_IP and ip6 LB_IP6 (`--ip6` / config `ip6`), ready: the admin
    socket answers and every health-checked backend is alive."""
    config = bed.tmp / "lbnat6.json"
    config.write_text(json.dumps({
        "lb_ip": LB_IP, "ip6": LB_IP6, "admin_socket": str(bed.tmp / "admin.sock"),
        "services": services,
    }))  # fmt: skip
    proc = bed.start("lb", console_script("lbnat"), "run", "--config", str(config), name="lbnat")
    try:
        proc.expect("srcIP : ", READY_TIMEOUT)
    except (EOFError, TimeoutError) as exc:
        proc.err.join(2.0)
        raise AssertionError(f"lbnat did not start: {exc}\n{proc.describe()}") from None
    checked = sum(len(s["backends"]) for s in services if s["health"].get("enabled", True))
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        status = admin(bed, "status", check=False)
        if status is not None:
            alive = sum(b["health"] == "alive" for s in status["services"] for b in s["backends"])
            if alive >= checked:
                return proc
        assert proc.popen.poll() is None, f"lbnat exited at start\n{proc.describe()}"
        assert time.monotonic() < deadline, f"lbnat not ready: {status}\n{proc.describe()}"
        time.sleep(0.1)


def admin(bed: Bed, what: str, check: bool = True) -> Any:
    """`lbnat WHAT --json` on the test's admin socket, parsed (None if it fails, unchecked)."""
    done = bed.lab.run(
        "lb", console_script("lbnat"), what, "--json",
        "--admin-socket", str(bed.tmp / "admin.sock"), check=False,
    )  # fmt: skip
    if done.returncode != 0:
        assert not check, done.stderr
        return None
    return json.loads(done.stdout)


def endpoint(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """Parse "198.18.0.11:40000", "[fd18::11]:40000" or "fd18::11:40000": (address, port)."""
    host, _, port = text.rpartition(":")
    return ipaddress.ip_address(host.strip("[]")), int(port)


def same_ip(text: str, expected: str) -> bool:
    return ipaddress.ip_address(text.strip("[]")) == ipaddress.ip_address(expected)


# -- servers and clients -----------------------------------------------------------------------


def sink(bed: Bed, host: str, port: int, v6: bool, dst: Path) -> Proc:
    """socat on `host`: one connection's bytes into `dst`; -d -d logs the peer's address."""
    listen = f"TCP6-LISTEN:{port},reuseaddr,ipv6only=1" if v6 else f"TCP4-LISTEN:{port},reuseaddr"
    proc = bed.start(host, "socat", "-d", "-d", "-u", listen, f"CREATE:{dst}",
                     name=f"socat sink {host}:{port}")  # fmt: skip
    bed.lab.wait_tcp_listening(host, port)
    return proc


def source(bed: Bed, host: str, port: int, v6: bool, src: Path) -> Proc:
    """socat on `host`: `src` to one connection."""
    listen = f"TCP6-LISTEN:{port},reuseaddr,ipv6only=1" if v6 else f"TCP4-LISTEN:{port},reuseaddr"
    proc = bed.start(host, "socat", "-d", "-d", "-u", f"OPEN:{src}", listen,
                     name=f"socat source {host}:{port}")  # fmt: skip
    bed.lab.wait_tcp_listening(host, port)
    return proc


def vip(v6: bool, port: int) -> str:
    """socat's address of the VIP: TCP6:[fd18::2]:PORT or TCP4:198.18.0.2:PORT."""
    return f"TCP6:[{LB_IP6}]:{port}" if v6 else f"TCP4:{LB_IP}:{port}"


def send_file(bed: Bed, client: str, target: str, src: Path, name: str) -> Proc:
    return bed.start(client, "socat", "-u", f"OPEN:{src}", target, name=name)


def fetch_file(bed: Bed, client: str, target: str, dst: Path, name: str) -> Proc:
    return bed.start(client, "socat", "-u", target, f"CREATE:{dst}", name=name)


def finished(proc: Proc, timeout: float = TRANSFER_TIMEOUT) -> None:
    code = proc.wait(timeout)
    assert code == 0, proc.describe()


def peer_of(proc: Proc) -> str:
    """The peer address socat -d -d logged on accepting ("accepting connection from AF=2
    198.18.0.2:61001" / "AF=10 [fd18::2]:61001")."""
    line = proc.err.expect("accepting connection from")
    match = re.search(r"from AF=\d+ \[?([0-9a-fA-F:.]+?)\]?:\d+ ", line)
    assert match is not None, line
    return match.group(1)


def echo_server(bed: Bed, host: str, port: int, v6: bool) -> Proc:
    listen = "::" if v6 else "0.0.0.0"
    proc = bed.start(host, *ECHO, "--host", listen, "--port", str(port), "--name", host,
                     "--log-peers", name=f"udp echo {host}")  # fmt: skip
    proc.expect("listening")
    return proc


def udptool(bed: Bed, host: str, *argv: str) -> Any:
    result = bed.lab.run(host, sys.executable, "-m", "tests.integration.udptool", *argv,
                         timeout=90)  # fmt: skip
    return json.loads(result.stdout)


def nginx6(bed: Bed, host: str, blob: Path) -> Path:
    """nginx listening on the backend's IPv6 address only, serving index.html (its name) and
    blob (random bytes); its directory (access.log)."""
    d = bed.tmp / f"nginx-{host}"
    (d / "www").mkdir(parents=True)
    (d / "tmp").mkdir()
    (d / "www" / "index.html").write_text(f"backend {host}\n")
    (d / "www" / "blob").write_bytes(blob.read_bytes())
    conf = d / "nginx.conf"
    conf.write_text(NGINX_CONF.format(d=d, ip=f"[{host_ip6(host)}]"))
    bed.start(host, "nginx", "-p", str(d), "-e", str(d / "error.log"), "-c", str(conf),
              "-g", "daemon off;", name=f"nginx {host}")  # fmt: skip
    bed.lab.wait_tcp_listening(host, 80)
    return d


def curl(bed: Bed, client: str, url: str, out: Path | None = None) -> str:
    argv = ["curl", "-6", "-sS", "--max-time", "20", url]
    if out is not None:
        argv += ["-o", str(out)]
    return bed.lab.run(client, *argv, timeout=30).stdout


# -- the lab without lbnat ---------------------------------------------------------------------


def test_dual_stack_lab_carries_ipv6_directly(lab_bed: Bed, scratch: Path) -> None:
    """The lab itself, no lbnat: every host has its IPv6 address at once (nodad), curl, socat
    TCP and UDP and iperf3 -6 from a client straight to a backend, and path-MTU discovery
    from a backend to the routed client for both families (the router's ICMPv6 packet too
    big / ICMP fragmentation needed reaches the backend and the download completes)."""
    bed = lab_bed
    lab = bed.lab
    for host in ("c1", "c2", "lb", "b1", "b2", "b3", "r1", ROUTED_CLIENT):
        shown = lab.run(host, "ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope",
                        "global").stdout  # fmt: skip
        assert f"{host_ip6(host)}/64" in shown and "tentative" not in shown, shown
    lab.run("c1", "ping", "-6", "-c", "1", "-W", "2", host_ip6("b1"))
    lab.run(ROUTED_CLIENT, "ping", "-6", "-c", "1", "-W", "2", LB_IP6)

    blob = scratch / "blob"
    digest = random_file(blob, MB)
    nginx6(bed, "b1", blob)
    curl(bed, "c1", f"http://[{host_ip6('b1')}]/blob", scratch / "got")
    assert sha256(scratch / "got") == digest

    up = sink(bed, "b2", BACKEND_PORT, True, scratch / "up")
    finished(send_file(bed, "c2", f"TCP6:[{host_ip6('b2')}]:{BACKEND_PORT}", blob, "upload"))
    finished(up)
    assert sha256(scratch / "up") == digest
    assert same_ip(peer_of(up), host_ip6("c2"))

    echo_server(bed, "b3", BACKEND_PORT, True)
    counts = udptool(bed, "c1", "flood", host_ip6("b3"), str(BACKEND_PORT), "--count", "500")
    assert counts == {"sent": 500, "received": 500, "altered": 0, "lost": 0}

    iperf = bed.start("b2", "iperf3", "-s", "-p", "5201", "-1", name="iperf3 server")
    lab.wait_tcp_listening("b2", 5201)
    text = lab.run("c1", "iperf3", "-6", "-c", host_ip6("b2"), "-p", "5201", "-t", "1", "-J",
                   timeout=30).stdout  # fmt: skip
    assert parse_iperf_tcp(text)["bytes"] > 0
    finished(iperf)

    for v6, address in ((True, host_ip6("b1")), (False, host_ip("b1"))):
        flush_pmtu(bed, "b1")
        data = source(bed, "b1", 9100, v6, blob)
        target = f"TCP6:[{address}]:9100" if v6 else f"TCP4:{address}:9100"
        finished(fetch_file(bed, ROUTED_CLIENT, target, scratch / "down", "pmtu download"),
                 PMTU_TIMEOUT)  # fmt: skip
        finished(data)
        assert sha256(scratch / "down") == digest
        client = host_ip6(ROUTED_CLIENT) if v6 else host_ip(ROUTED_CLIENT)
        assert learned_mtu(bed, "b1", client) == ROUTED_MTU


def flush_pmtu(bed: Bed, host: str) -> None:
    """Forget the path MTUs `host` learned (from an earlier test of the module)."""
    bed.lab.run(host, "ip", "-6", "route", "flush", "cache", check=False)
    bed.lab.run(host, "ip", "-4", "route", "flush", "cache", check=False)


def learned_mtu(bed: Bed, host: str, destination: str) -> int | None:
    """The path MTU `host` learned towards `destination` (ip route get ... mtu N), or None."""
    shown = bed.lab.run(host, "ip", "route", "get", destination).stdout
    match = re.search(r"\bmtu (\d+)", shown)
    return None if match is None else int(match.group(1))


# -- v6 -> v6 ----------------------------------------------------------------------------------


def test_v6_to_v6_curl_socat_udp_iperf3(bed: Bed, scratch: Path) -> None:
    """IPv6 clients through lbnat's IPv6 address to IPv6 backends: curl round-robin over two
    nginx with a body of known hash (nginx sees lbnat's IPv6 address), a 4 MB socat upload
    (most of it through the kernel's IPv6 fast path in the tc variant), UDP datagrams echoed
    unaltered, and a bounded iperf3 -6 run."""
    blob = scratch / "blob"
    digest = random_file(blob, MB)
    dirs = {b: nginx6(bed, b, blob) for b in ("b1", "b2")}
    up = sink(bed, "b3", BACKEND_PORT, True, scratch / "up")
    echo_server(bed, "b3", BACKEND_PORT, True)
    iperf = bed.start("b1", "iperf3", "-s", "-p", "5201", "-1", name="iperf3 server")
    bed.lab.wait_tcp_listening("b1", 5201)
    start_lbnat(bed, [
        service("web6", "tcp", 80, [backend(b, 80, True) for b in ("b1", "b2")]),
        service("sink6", "tcp", 7000, [backend("b3", BACKEND_PORT, True)]),
        service("echo6", "udp", 7000, [backend("b3", BACKEND_PORT, True)]),
        service("iperf6", "tcp", 5201, [backend("b1", 5201, True)]),
    ])  # fmt: skip

    pages = [curl(bed, "c1" if n % 2 == 0 else "c2", f"http://[{LB_IP6}]/index.html")
             for n in range(4)]  # fmt: skip
    assert pages == [f"backend {b}\n" for b in ("b1", "b2", "b1", "b2")]
    for n in range(2):
        got = scratch / f"blob{n}"
        curl(bed, "c1", f"http://[{LB_IP6}]/blob", got)
        assert sha256(got) == digest
    for d in dirs.values():
        requests = (d / "access.log").read_text().splitlines()
        assert len(requests) == 3, requests
        assert all(line.startswith(f"{LB_IP6} ") and " 200 " in line for line in requests), requests

    # paced (its first MB, a pause, the rest): with the kernel fast path, the flow is handed
    # to the kernel's IPv6 map on the way and the rest rides it
    upload = scratch / "upload"
    up_digest = random_file(upload, 4 * MB)
    sender = bed.start("c2", "socat", "-u", sent_from(upload, paced=True), vip(True, 7000),
                       name="paced upload")  # fmt: skip
    finished(sender)
    finished(up)
    assert sha256(scratch / "up") == up_digest
    assert same_ip(peer_of(up), LB_IP6)
    if os.environ["LBNAT_OFFLOAD"] == "tc":
        offload = admin(bed, "status")["offload"]
        assert offload["offloaded"] >= 1 and offload["bytes"] > 2 * MB, offload

    counts = udptool(bed, "c1", "flood", LB_IP6, "7000", "--count", "2000", "--limit", "30")
    assert counts == {"sent": 2000, "received": 2000, "altered": 0, "lost": 0}
    said = bed.lab.run("c2", "socat", "-T", "3", "-", f"UDP6:[{LB_IP6}]:7000",
                       input="hello over UDP6\n").stdout  # fmt: skip
    assert said == "[b3] hello over UDP6\n"

    text = bed.lab.run("c2", "iperf3", "-6", "-c", LB_IP6, "-p", "5201", "-t", "2", "-J",
                       timeout=40).stdout  # fmt: skip
    figures = parse_iperf_tcp(text)
    assert figures["bytes"] > MB, figures
    finished(iperf)


# -- IPv4 and IPv6 side by side -----------------------------------------------------------------


def test_v4_v6_and_nat64_side_by_side(bed: Bed, scratch: Path) -> None:
    """One lbnat, SRCIP and ip6: a service of IPv4 backends used at the same time by an IPv4
    client (NAT44) and an IPv6 client (NAT64), and a service of IPv6 backends; each client
    uploads 2 MB and downloads 2 MB, all six transfers at once, every byte checked; the
    IPv4 backend sees SRCIP for both of its clients, the IPv6 backend sees ip6."""
    up_data = scratch / "up.bin"
    down_data = scratch / "down.bin"
    up_digest = random_file(up_data, 2 * MB)
    down_digest = random_file(down_data, 2 * MB)
    # mixed: tcp 7000 (uploads) and 7001 (downloads), IPv4 backends b1 (c1 over IPv4) and b2
    # (c2 over IPv6, NAT64), round-robin in the order the clients connect; v6only: tcp 7002
    # and 7003, IPv6 backend b3
    sinks = {b: sink(bed, b, BACKEND_PORT, b == "b3", scratch / f"at-{b}") for b in
             ("b1", "b2", "b3")}  # fmt: skip
    sources = {b: source(bed, b, BACKEND_PORT + 1, b == "b3", down_data) for b in
               ("b1", "b2", "b3")}  # fmt: skip
    start_lbnat(bed, [
        service("up4", "tcp", 7000, [backend(b, BACKEND_PORT, False) for b in ("b1", "b2")]),
        service("down4", "tcp", 7001, [backend(b, BACKEND_PORT + 1, False) for b in ("b1", "b2")]),
        service("up6", "tcp", 7002, [backend("b3", BACKEND_PORT, True)]),
        service("down6", "tcp", 7003, [backend("b3", BACKEND_PORT + 1, True)]),
    ])  # fmt: skip
    # the clients connect in order (b1 then b2), then all six transfers run at once
    transfers = [
        send_file(bed, "c1", vip(False, 7000), up_data, "c1 v4 upload"),
        fetch_file(bed, "c1", vip(False, 7001), scratch / "c1-v4", "c1 v4 download"),
    ]
    for proc in (sinks["b1"], sources["b1"]):  # b1 has c1's two flows before c2 connects
        peer_of(proc)
    transfers += [
        send_file(bed, "c2", vip(True, 7000), up_data, "c2 nat64 upload"),
        fetch_file(bed, "c2", vip(True, 7001), scratch / "c2-nat64", "c2 nat64 download"),
        send_file(bed, "c1", vip(True, 7002), up_data, "c1 v6 upload"),
        fetch_file(bed, "c1", vip(True, 7003), scratch / "c1-v6", "c1 v6 download"),
    ]
    for proc in transfers:
        finished(proc)
    for proc in (*sinks.values(), *sources.values()):
        finished(proc)
    for b in ("b1", "b2", "b3"):
        assert sha256(scratch / f"at-{b}") == up_digest, b
    for name in ("c1-v4", "c2-nat64", "c1-v6"):
        assert sha256(scratch / name) == down_digest, name
    # the backends' view: SRCIP for the IPv4 service's both clients, ip6 for the IPv6 one
    for b in ("b1", "b2"):
        for proc in (sinks[b], sources[b]):
            proc.err.cursor = 0
            assert peer_of(proc) == LB_IP, proc.describe()
    assert same_ip(peer_of(sinks["b3"]), LB_IP6)
    assert same_ip(peer_of(sources["b3"]), LB_IP6)


# -- v6 -> v4 (NAT64) ---------------------------------------------------------------------------


def test_nat64_backend_sees_srcip_bytes_both_ways_and_udp(bed: Bed, scratch: Path) -> None:
    """An IPv6 client to a service of IPv4 backends: the backend's peer is SRCIP (IPv4); 1 MB
    up and 1 MB down byte-identical; UDP datagrams echoed unaltered, from SRCIP as well."""
    data = scratch / "data"
    digest = random_file(data, MB)
    up = sink(bed, "b1", BACKEND_PORT, False, scratch / "up")
    down = source(bed, "b2", BACKEND_PORT, False, data)
    echo = echo_server(bed, "b1", BACKEND_PORT, False)
    lbnat = start_lbnat(bed, [
        service("up", "tcp", 7000, [backend("b1", BACKEND_PORT, False)]),
        service("down", "tcp", 7001, [backend("b2", BACKEND_PORT, False)]),
        service("echo", "udp", 7000, [backend("b1", BACKEND_PORT, False)]),
    ])  # fmt: skip

    finished(send_file(bed, "c1", vip(True, 7000), data, "nat64 upload"))
    finished(up)
    assert sha256(scratch / "up") == digest
    assert peer_of(up) == LB_IP
    finished(fetch_file(bed, "c1", vip(True, 7001), scratch / "down", "nat64 download"))
    finished(down)
    assert sha256(scratch / "down") == digest
    assert peer_of(down) == LB_IP
    opened = lbnat.out.expect_re(NEW_CLIENT_RE)  # the flow's line names the IPv6 client
    assert same_ip(opened["ip"], host_ip6("c1")), opened.group(0)

    counts = udptool(bed, "c2", "flood", LB_IP6, "7000", "--count", "2000", "--limit", "30")
    assert counts == {"sent": 2000, "received": 2000, "altered": 0, "lost": 0}
    peer = echo.expect("first datagram from")
    assert peer.split(" from ")[1].rsplit(":", 1)[0] == LB_IP, peer


# -- path MTU -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["v6", "nat64"])
def test_path_mtu_discovery_through_lbnat(bed: Bed, scratch: Path, family: str) -> None:
    """The routed client rc1 sits behind a 1280-byte link and announces a 1500-byte path's
    MSS. A 4 MB download from the backend through lbnat completes only if the router's ICMPv6
    packet too big (to lbnat's ip6, about a packet lbnat sent to the client) is translated to
    the backend: as ICMPv6 packet too big (v6 backend) or ICMP fragmentation needed (IPv4
    backend, NAT64). The backend's learned path MTU to lbnat shows it arrived."""
    v6 = family == "v6"
    data = scratch / "data"
    digest = random_file(data, 4 * MB)
    flush_pmtu(bed, "b1")
    assert learned_mtu(bed, "b1", LB_IP6 if v6 else LB_IP) is None  # nothing learned yet
    down = source(bed, "b1", BACKEND_PORT, v6, data)
    start_lbnat(bed, [service("down", "tcp", 7000, [backend("b1", BACKEND_PORT, v6)])])
    got = scratch / "got"
    finished(fetch_file(bed, ROUTED_CLIENT, vip(True, 7000), got, "download through r1"),
             PMTU_TIMEOUT)  # fmt: skip
    finished(down)
    assert sha256(got) == digest
    # IPv6: the router's MTU itself; IPv4 (NAT64): 20 bytes less (RFC 7915 5.2: the IPv6
    # header's size over IPv4's; 8 more if a translator leaves room for a fragment header)
    learned = learned_mtu(bed, "b1", LB_IP6 if v6 else LB_IP)
    if v6:
        assert learned == ROUTED_MTU
    else:
        assert learned is not None and ROUTED_MTU - 28 <= learned <= ROUTED_MTU - 20, learned


# -- ICMPv6 from the backend's side ---------------------------------------------------------------


@pytest.mark.parametrize("family", ["v6", "nat64"])
def test_port_unreachable_reaches_the_ipv6_client(bed: Bed, family: str) -> None:
    """A datagram to a backend port nothing listens on: the backend's ICMPv6 (or, NAT64,
    ICMPv4) port unreachable comes back to the IPv6 client as ICMPv6 port unreachable, and
    its connected socket reports ECONNREFUSED."""
    v6 = family == "v6"
    server = echo_server(bed, "b1", BACKEND_PORT, v6)
    start_lbnat(bed, [service("echo", "udp", 7053, [backend("b1", BACKEND_PORT, v6)])])
    first = udptool(bed, "c1", "once", LB_IP6, "7053", "--source-port", "40200")
    assert first == {"answer": "[b1] hello"}
    bed.stop(server)
    again = udptool(bed, "c1", "once", LB_IP6, "7053", "--source-port", "40200")
    assert again == {"error": "refused"}


# -- status and sessions --------------------------------------------------------------------------


def test_status_and_sessions_show_ipv6_clients(bed: Bed) -> None:
    """The chat seed over IPv6: an IPv6 client to IPv6 chat servers and an IPv6 client to IPv4
    ones (NAT64), health-checked; `lbnat sessions` (JSON and text) shows the IPv6 clients with
    their backends, `lbnat status` lbnat's IPv6 address and the IPv6 backends alive."""
    for b in ("b1", "b2"):
        bed.start(b, *CHAT, "server", "--family", "6", "--port", str(BACKEND_PORT), "--name", b,
                  name=f"chat server {b} (IPv6)")  # fmt: skip
    bed.start("b3", *CHAT, "server", "--port", str(BACKEND_PORT), "--name", "b3",
              name="chat server b3 (IPv4)")  # fmt: skip
    for b in ("b1", "b2", "b3"):
        bed.lab.wait_tcp_listening(b, BACKEND_PORT)
    start_lbnat(bed, [
        service("chat6", "tcp", 20000, [backend(b, BACKEND_PORT, True) for b in ("b1", "b2")],
                health=True),
        service("chat64", "tcp", 20001, [backend("b3", BACKEND_PORT, False)], health=True),
    ])  # fmt: skip

    def sessions() -> list[tuple[str, str, str, str]]:
        rows = admin(bed, "sessions")
        return sorted((str(endpoint(r["client"])[0]), r["service"],
                       str(endpoint(r["backend"])[0]), r["state"]) for r in rows)  # fmt: skip

    clients = {}
    for name, host, port, landed in (("alice", "c1", 20000, "b1"), ("bob", "c2", 20000, "b2"),
                                     ("carol", "c2", 20001, "b3")):  # fmt: skip
        proc = bed.start(host, *CHAT, "client", LB_IP6, str(port), name, name=name, stdin=True)
        assert proc.expect("* connected to ") == f"* connected to {landed}"
        clients[name] = proc
        if name == "bob":  # v6 -> v6 first, on its own (a broken NAT64 does not hide it)
            assert sessions() == [
                (host_ip6("c1"), "chat6", host_ip6("b1"), "ESTABLISHED"),
                (host_ip6("c2"), "chat6", host_ip6("b2"), "ESTABLISHED"),
            ]
            text = bed.lab.run("lb", console_script("lbnat"), "sessions",
                               "--admin-socket", str(bed.tmp / "admin.sock")).stdout  # fmt: skip
            assert host_ip6("c1") in text and host_ip6("c2") in text, text
            status = admin(bed, "status")
            assert LB_IP6 in json.dumps(status), status  # lbnat's IPv6 address is shown
            backends = {(b["ip"], b["port"]): b for s in status["services"]
                        for b in s["backends"]}  # fmt: skip
            for b in ("b1", "b2"):
                assert backends[(host_ip6(b), BACKEND_PORT)]["health"] == "alive", backends
            assert backends[(host_ip("b3"), BACKEND_PORT)]["health"] == "alive", backends
    clients["carol"].send_line("hello over NAT64")
    clients["carol"].expect("[carol] hello over NAT64")
    assert sessions() == [
        (host_ip6("c1"), "chat6", host_ip6("b1"), "ESTABLISHED"),
        (host_ip6("c2"), "chat6", host_ip6("b2"), "ESTABLISHED"),
        (host_ip6("c2"), "chat64", host_ip("b3"), "ESTABLISHED"),
    ]
    for proc in clients.values():
        proc.send_line("q")
        assert proc.wait() == 0
