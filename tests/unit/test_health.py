"""Health checking: the syn probe's packets (pure), the checker's rounds with fake probes, and
every probe kind against real servers inside a private network namespace."""

from __future__ import annotations

import http.server
import ipaddress
import socket
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
from scapy.layers.inet import IP, TCP
from scapy.packet import Raw

from lbnat.backends import Backend, Health
from lbnat.health import (
    HealthCheck,
    HealthChecker,
    HealthPolicy,
    ProbeResult,
    ProbeSettings,
    make_probe,
)
from lbnat.health.checker import Report
from lbnat.health.hello import HelloProbe
from lbnat.health.http import HttpProbe
from lbnat.health.syn import (
    SynProbe,
    classify,
    classify_segment,
    reply_filter,
    reply_filter6,
    syn_segment,
)
from lbnat.health.tcp import TcpProbe
from lbnat.health.udp import UdpProbe
from tests.unit.cbpf import run_bpf
from tests.unit.conftest import HOST

LB = int(ipaddress.IPv4Address("198.18.0.2"))
B1 = int(ipaddress.IPv4Address("198.18.0.21"))

# --- the syn probe's packets ----------------------------------------------------------------


def test_syn_segment_is_a_valid_syn() -> None:
    segment = syn_segment(LB, B1, 40000, 9000, 0xDEADBEEF)
    packet = IP(src="198.18.0.2", dst="198.18.0.21", proto=6) / TCP(segment)
    tcp = packet[TCP]
    assert (tcp.sport, tcp.dport, tcp.seq, tcp.flags) == (40000, 9000, 0xDEADBEEF, "S")
    assert ("MSS", 1460) in tcp.options
    claimed = tcp.chksum
    del tcp.chksum
    assert IP(bytes(packet))[TCP].chksum == claimed


def answer(
    flags: str, ack: int, sport: int = 9000, dport: int = 40000, src: str = "198.18.0.21"
) -> bytes:
    return bytes(
        IP(src=src, dst="198.18.0.2") / TCP(sport=sport, dport=dport, flags=flags, seq=7, ack=ack)
    )


@pytest.mark.parametrize(
    ("description", "packet", "verdict"),
    [
        ("SYN-ACK acking ISN + 1", answer("SA", 1001), ProbeResult(True, "syn-ack")),
        ("RST+ACK acking ISN + 1", answer("RA", 1001), ProbeResult(False, "connection refused")),
        ("SYN-ACK acking something else", answer("SA", 5), None),
        ("a plain ACK", answer("A", 1001), None),
        ("from another port", answer("SA", 1001, sport=9001), None),
        ("to another local port", answer("SA", 1001, dport=40001), None),
        ("from another host", answer("SA", 1001, src="198.18.0.22"), None),
        ("garbage", b"\x45\x00\x00", None),
    ],
)
def test_classify_answers(description: str, packet: bytes, verdict: ProbeResult | None) -> None:
    assert classify(packet, B1, 9000, 40000, 1000) == verdict, description


def test_reply_filter_passes_only_the_answer() -> None:
    program = reply_filter(B1, 9000, 40000)
    assert run_bpf(program, answer("SA", 1)) > 0
    assert run_bpf(program, answer("SA", 1, sport=9001)) == 0
    assert run_bpf(program, answer("SA", 1, dport=40001)) == 0
    assert run_bpf(program, answer("SA", 1, src="198.18.0.22")) == 0
    with_options = bytes(
        IP(src="198.18.0.21", dst="198.18.0.2", options=b"\x01\x01\x01\x00")
        / TCP(sport=9000, dport=40000, flags="SA")
        / Raw(b"x")
    )
    assert run_bpf(program, with_options) > 0


# --- make_probe ---------------------------------------------------------------------------------


def test_make_probe_defaults_and_mismatches() -> None:
    assert make_probe(ProbeSettings(), "tcp").kind == "syn"
    assert make_probe(ProbeSettings(), "udp").kind == "udp"
    for kind in ("tcp", "hello", "http"):
        assert make_probe(ProbeSettings(kind=kind), "tcp").kind == kind
        with pytest.raises(ValueError, match="cannot probe a udp service"):
            make_probe(ProbeSettings(kind=kind), "udp")
    with pytest.raises(ValueError, match="cannot probe a tcp service"):
        make_probe(ProbeSettings(kind="udp"), "tcp")
    with pytest.raises(ValueError, match="pattern"):
        make_probe(ProbeSettings(kind="hello", expect="(unclosed"), "tcp")
    with pytest.raises(ValueError, match="must start with /"):
        make_probe(ProbeSettings(kind="http", http_path="health"), "tcp")


# --- the checker, with fake probes ----------------------------------------------------------------


@dataclass
class ScriptedProbe:
    """Answers from a script per backend port: True/False per call, last answer repeated."""

    script: Mapping[int, Sequence[bool]]
    kind: str = "fake"
    calls: dict[int, int] = field(default_factory=dict)

    def check(self, ip: str, port: int, timeout: float) -> ProbeResult:
        n = self.calls.get(port, 0)
        self.calls[port] = n + 1
        answers = self.script[port]
        return ProbeResult(answers[min(n, len(answers) - 1)], "scripted")


def test_checker_rounds_report_and_publish() -> None:
    a, b = Backend("198.18.0.21", 1), Backend("198.18.0.22", 2)
    probe = ScriptedProbe({1: [True], 2: [True, False, False, False, True]})
    published: list[tuple[str, tuple[Backend, ...]]] = []
    reports: list[Report] = []
    checker = HealthChecker(
        {"web": HealthCheck(HealthPolicy(interval=1, timeout=1), probe)},
        lambda: {"web": (a, b)},
        lambda name, snapshot: published.append((name, snapshot)),
        reports.append,
    )
    with ThreadPoolExecutor(2) as pool:
        for _ in range(5):
            checker.round(pool, ["web"])
    healths_of_b = [r.health for r in reports if r.backend == b]
    assert healths_of_b == [Health.ALIVE, Health.BAD, Health.BAD, Health.DEAD, Health.ALIVE]
    changed_of_b = [r.changed for r in reports if r.backend == b]
    assert changed_of_b == [True, True, False, True, True]  # the first verdict is news
    assert [r.changed for r in reports if r.backend == a] == [True, False, False, False, False]
    assert [snapshot[1].health for _, snapshot in published] == healths_of_b
    assert all(name == "web" and snapshot[0].health is Health.ALIVE for name, snapshot in published)


def test_checker_judges_nothing_while_lbnats_own_link_is_down() -> None:
    """Held (the daemon saw its interface go down): no round is judged, none published; a round
    during which the link went down or came back is thrown away too."""
    a = Backend("198.18.0.21", 1)
    reports: list[Report] = []
    checker: HealthChecker

    def flap_while_probing(ip: str, port: int, timeout: float) -> ProbeResult:
        checker.hold()
        return ProbeResult(False, "link down")

    probe = ScriptedProbe({1: [False]})
    checker = HealthChecker(
        {"web": HealthCheck(HealthPolicy(fall=1), probe)},
        lambda: {"web": (a,)},
        lambda name, snapshot: None,
        reports.append,
    )
    with ThreadPoolExecutor(2) as pool:
        checker.hold()
        checker.round(pool, ["web"])
        assert reports == [] and probe.calls == {}  # not even probed
        checker.resume()
        probe.check = flap_while_probing  # type: ignore[method-assign]
        checker.round(pool, ["web"])
        assert reports == []  # probed, but the link went down meanwhile
        checker.resume()
        probe.check = ScriptedProbe({1: [True]}).check  # type: ignore[method-assign]
        checker.round(pool, ["web"])
    assert [(r.health, r.changed) for r in reports] == [(Health.ALIVE, True)]


def test_checker_keeps_verdicts_per_service() -> None:
    """The same backend in two services is judged per service (each with its own probe)."""
    shared = Backend("198.18.0.21", 1)
    up, down = ScriptedProbe({1: [True]}), ScriptedProbe({1: [False]})
    published: dict[str, Health] = {}
    checker = HealthChecker(
        {
            "up": HealthCheck(HealthPolicy(fall=1), up),
            "down": HealthCheck(HealthPolicy(fall=1), down),
        },
        lambda: {"up": (shared,), "down": (shared,)},
        lambda name, snapshot: published.__setitem__(name, snapshot[0].health),
        lambda report: None,
    )
    with ThreadPoolExecutor(2) as pool:
        checker.round(pool, ["up", "down"])
    assert published == {"up": Health.ALIVE, "down": Health.DEAD}


# --- every probe kind against real servers (private network namespace) ---------------------------


@contextmanager
def tcp_server(handler: str) -> Iterator[int]:
    """A TCP server on HOST: "echo" echoes lines, "nope" answers "nope", "greet" greets and
    reads; yields its port."""
    listener = socket.create_server((HOST, 0))
    port = listener.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(2)
                try:
                    if handler == "greet":
                        conn.sendall(b"* hello\n")
                    data = conn.recv(4096)
                    if handler == "echo":
                        conn.sendall(data)
                    elif handler == "nope":
                        conn.sendall(b"nope\n")
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        stop.set()
        thread.join(2)
        listener.close()


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.usefixtures("private_netns")
def test_tcp_probe() -> None:
    with tcp_server("greet") as port:
        assert TcpProbe().check(HOST, port, 1.0).ok
    result = TcpProbe().check(HOST, free_port(), 1.0)
    assert result == ProbeResult(False, "connection refused")


@pytest.mark.usefixtures("private_netns")
def test_syn_probe() -> None:
    with tcp_server("greet") as port:
        assert SynProbe().check(HOST, port, 1.0) == ProbeResult(True, "syn-ack")
    assert SynProbe().check(HOST, free_port(), 1.0) == ProbeResult(False, "connection refused")


@pytest.mark.usefixtures("private_netns")
def test_hello_probe() -> None:
    with tcp_server("echo") as port:
        assert HelloProbe().check(HOST, port, 1.0).ok
    with tcp_server("nope") as port:
        assert not HelloProbe().check(HOST, port, 1.0).ok
        assert HelloProbe(expect="^no").check(HOST, port, 1.0).ok
    with tcp_server("greet") as port:  # greets, then reads and closes without an answer
        assert not HelloProbe().check(HOST, port, 1.0).ok


@pytest.mark.usefixtures("private_netns")
def test_udp_probe() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind((HOST, 0))
        port = server.getsockname()[1]

        received: list[bytes] = []

        def answer_once(reply: bytes) -> threading.Thread:
            def serve() -> None:
                server.settimeout(2)
                data, peer = server.recvfrom(2048)
                received.append(data)
                server.sendto(reply, peer)

            thread = threading.Thread(target=serve, daemon=True)
            thread.start()
            return thread

        answer_once(b"OK\n")
        assert UdpProbe().check(HOST, port, 1.0).ok
        answer_once(b"busy\n")
        assert UdpProbe().check(HOST, port, 1.0) == ProbeResult(False, "unexpected reply")
        assert received == [b"HealthCheck", b"HealthCheck"]
    assert UdpProbe().check(HOST, free_port(socket.SOCK_DGRAM), 1.0) == ProbeResult(
        False, "port unreachable"
    )


@pytest.mark.usefixtures("private_netns")
def test_http_probe() -> None:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status = 200 if self.path == "/health" else 404
            body = b"ok\n" if status == 200 else b"no\n"
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer((HOST, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.1,), daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        assert HttpProbe("/health").check(HOST, port, 1.0) == ProbeResult(True, "status 200")
        assert HttpProbe("/").check(HOST, port, 1.0) == ProbeResult(False, "status 404")
        assert HttpProbe("/", status=404).check(HOST, port, 1.0).ok
    finally:
        server.shutdown()
        server.server_close()
    assert not HttpProbe("/").check(HOST, free_port(), 1.0).ok


class CountingEvent(threading.Event):
    def __init__(self) -> None:
        super().__init__()
        self.waits = 0

    def wait(self, timeout: float | None = None) -> bool:
        self.waits += 1
        return super().wait(timeout)


def test_checker_with_nothing_to_probe_sleeps() -> None:
    """No checks (--no-health): the thread must block, not spin (a spinning thread starves the
    packet loop of the GIL; it once cut UDP forwarding to a tenth). New checks wake it."""
    wake = CountingEvent()
    probe = ScriptedProbe({1: [True]})
    published: list[str] = []
    checker = HealthChecker(
        {}, lambda: {"web": (Backend("198.18.0.21", 1),)}, lambda n, s: published.append(n),
        lambda report: None, _wake=wake,
    )  # fmt: skip
    checker.start()
    try:
        threading.Event().wait(0.3)
        assert wake.waits <= 2, wake.waits
        checker.set_checks({"web": HealthCheck(HealthPolicy(interval=10, timeout=1), probe)})
        for _ in range(50):
            if published:
                break
            threading.Event().wait(0.05)
        assert published == ["web"]  # woken at once, probed, published
    finally:
        checker.stop()


# --- IPv6 backends (issue 21) -------------------------------------------------------------------

HOST6 = "::1"  # lo's IPv6 address in the private namespace (the probes do not refuse loopback)


def segment(flags: str, ack: int, sport: int = 9000, dport: int = 40000) -> bytes:
    """A TCP segment without an IP header, as an AF_INET6 raw socket reads it."""
    return bytes(TCP(sport=sport, dport=dport, flags=flags, seq=5, ack=ack))


@pytest.mark.parametrize(
    ("description", "data", "verdict"),
    [
        ("SYN-ACK acking ISN + 1", segment("SA", 1001), ProbeResult(True, "syn-ack")),
        ("RST+ACK acking ISN + 1", segment("RA", 1001), ProbeResult(False, "connection refused")),
        ("SYN-ACK acking something else", segment("SA", 5), None),
        ("a plain ACK", segment("A", 1001), None),
        ("from another port", segment("SA", 1001, sport=9001), None),
        ("to another local port", segment("SA", 1001, dport=40001), None),
        ("garbage", b"\x23\x28", None),
        ("empty", b"", None),
    ],
)
def test_classify_segment_answers(
    description: str, data: bytes, verdict: ProbeResult | None
) -> None:
    assert classify_segment(data, 9000, 40000, 1000) == verdict, description


def test_reply_filter6_passes_only_the_answer() -> None:
    program = reply_filter6(9000, 40000)
    assert run_bpf(program, segment("SA", 1)) > 0
    assert run_bpf(program, segment("SA", 1, sport=9001)) == 0
    assert run_bpf(program, segment("SA", 1, dport=40001)) == 0


@contextmanager
def listener6(kind: int = socket.SOCK_STREAM) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET6, kind)
    try:
        sock.bind((HOST6, 0))
        if kind == socket.SOCK_STREAM:
            sock.listen()
        yield sock
    finally:
        sock.close()


def free_port6(kind: int = socket.SOCK_STREAM) -> int:
    with listener6(kind) as sock:
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.usefixtures("private_netns")
def test_every_probe_kind_reaches_an_ipv6_backend() -> None:
    with listener6() as server:
        port = server.getsockname()[1]
        assert SynProbe().check(HOST6, port, 1.0) == ProbeResult(True, "syn-ack")
        assert TcpProbe().check(HOST6, port, 1.0).ok
    closed = free_port6()
    assert SynProbe().check(HOST6, closed, 1.0) == ProbeResult(False, "connection refused")
    assert TcpProbe().check(HOST6, closed, 1.0) == ProbeResult(False, "connection refused")
    with listener6(socket.SOCK_DGRAM) as server:

        def serve() -> None:
            server.settimeout(2)
            _, peer = server.recvfrom(2048)
            server.sendto(b"OK", peer)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        assert UdpProbe().check(HOST6, server.getsockname()[1], 1.0).ok
        thread.join(2)
    hosts: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hosts.append(self.headers["Host"])
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    class Server6(http.server.ThreadingHTTPServer):
        address_family = socket.AF_INET6

    server6 = Server6((HOST6, 0), Handler)
    thread = threading.Thread(target=server6.serve_forever, args=(0.1,), daemon=True)
    thread.start()
    try:
        port = server6.server_address[1]
        assert HttpProbe("/").check(HOST6, port, 1.0) == ProbeResult(True, "status 200")
    finally:
        server6.shutdown()
        server6.server_close()
    assert hosts == [f"[::1]:{port}"]
