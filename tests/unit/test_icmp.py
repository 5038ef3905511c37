"""ICMP errors about translated flows: a backend's port-unreachable (UDP) and a router's
fragmentation-needed (TCP) reach the client as if the VIP had answered about the client's own
packet; the quoted packet comes back exactly as the client sent it."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, TCPerror, UDPerror
from scapy.packet import Raw

from lbnat.backends import Backend
from lbnat.drops import DropReason
from lbnat.engine import DROP, FORWARD, Engine
from lbnat.packet import parse_icmp_error
from lbnat.service import Service

LB, CLIENT, B1, ROUTER = "198.18.0.2", "198.18.0.11", "198.18.0.21", "198.18.0.1"


def engine() -> Engine:
    return Engine(
        LB,
        [
            Service("dns", "udp", 53, backends=(Backend(B1, 5353),)),
            Service("web", "tcp", 80, backends=(Backend(B1, 8080),)),
        ],
    )


def send(e: Engine, packet: bytes) -> tuple[tuple[object, ...], bytes]:
    buf = bytearray(packet)
    action = e.handle(buf, 0, len(buf), False, 0.0)
    return action, bytes(buf)


def icmp_about(forwarded: bytes, src: str, code: int, quote: int = 576, mtu: int = 0) -> bytes:
    """The ICMP error the backend's (or a router's) kernel sends about `forwarded`."""
    icmp = ICMP(type=3, code=code, nexthopmtu=mtu) if mtu else ICMP(type=3, code=code)
    return bytes(IP(src=src, dst=LB) / icmp / Raw(forwarded[:quote]))


def checksums_ok(raw: bytes) -> bool:
    packet = IP(raw)
    claimed = (packet.chksum, packet[ICMP].chksum)
    del packet.chksum
    del packet[ICMP].chksum
    again = IP(bytes(packet))
    return (again.chksum, again[ICMP].chksum) == claimed


def test_port_unreachable_from_a_backend_reaches_the_client() -> None:
    e = engine()
    original = bytes(IP(src=CLIENT, dst=LB) / UDP(sport=40000, dport=53) / Raw(b"query"))
    action, forwarded = send(e, original)
    assert action[0] == FORWARD
    action, translated = send(e, icmp_about(forwarded, B1, code=3))
    assert action == (FORWARD, int.from_bytes(bytes(map(int, CLIENT.split("."))), "big"))
    packet = IP(translated)
    assert (packet.src, packet.dst) == (LB, CLIENT)
    assert (packet[ICMP].type, packet[ICMP].code) == (3, 3)
    assert checksums_ok(translated)
    quoted = packet[IPerror]
    assert (quoted.src, quoted.dst, quoted[UDPerror].sport, quoted[UDPerror].dport) == (
        CLIENT,
        LB,
        40000,
        53,
    )
    # The quote is the client's own datagram again, checksums included.
    assert translated[28:] == original
    assert e.icmp_translated == 1


def test_fragmentation_needed_from_a_router_for_a_tcp_flow() -> None:
    e = engine()
    original = bytes(
        IP(src=CLIENT, dst=LB, flags="DF") / TCP(sport=40001, dport=80, flags="S", seq=7)
    )
    _, forwarded = send(e, original)
    data = bytes(
        IP(src=CLIENT, dst=LB, flags="DF")
        / TCP(sport=40001, dport=80, flags="A", seq=8, ack=1)
        / Raw(b"x" * 1400)
    )
    _, forwarded = send(e, data)
    action, translated = send(e, icmp_about(forwarded, ROUTER, code=4, mtu=1280))
    assert action[0] == FORWARD
    packet = IP(translated)
    assert (packet.src, packet.dst, packet[ICMP].code, packet[ICMP].nexthopmtu) == (
        LB,
        CLIENT,
        4,
        1280,
    )
    assert checksums_ok(translated)
    assert translated[28:] == data[:576]  # the whole quote, TCP checksum restored too
    assert packet[TCPerror].dport == 80


def test_a_short_quote_keeps_what_it_has() -> None:
    """RFC 792's minimum quote: IP header + 8 bytes (no TCP checksum in it)."""
    e = engine()
    original = bytes(IP(src=CLIENT, dst=LB) / TCP(sport=40002, dport=80, flags="S"))
    _, forwarded = send(e, original)
    action, translated = send(e, icmp_about(forwarded, B1, code=1, quote=28))
    assert action[0] == FORWARD
    assert checksums_ok(translated)
    assert translated[28:] == original[:28]


def test_icmp_that_is_not_about_a_flow_is_dropped_and_counted() -> None:
    e = engine()
    echo = bytes(IP(src=B1, dst=LB) / ICMP(type=8) / Raw(b"ping"))
    assert send(e, echo)[0] == (DROP, DropReason.NOT_TCP_UDP)
    unknown = bytes(IP(src=LB, dst=B1) / UDP(sport=61000, dport=5353) / Raw(b"x"))
    assert send(e, icmp_about(unknown, B1, code=3))[0] == (DROP, DropReason.NO_SESSION)
    hosts_own = bytes(IP(src=LB, dst=B1) / UDP(sport=33000, dport=5353) / Raw(b"x"))
    assert send(e, icmp_about(hosts_own, B1, code=3))[0] == (DROP, DropReason.NOT_FOR_US)
    assert e.icmp_translated == 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_parse_icmp_error_never_raises(data: bytes) -> None:
    prefix = bytes(IP(src=B1, dst=LB, proto=1, len=20 + len(data)))[:20]
    for raw in (data, prefix + data):
        parse_icmp_error(raw, 0, len(raw))
