"""Consistent choices across instances behind ECMP (docs/scale-out.md): with `--scheduler
maglev`, instances with their own SRCIPs, given the same backends in any order, send every
client socket to the same backend, so a flow the router's hash moves (a UDP flow, a new flow of
a client with affinity) lands where it would have anyway. When a backend leaves, only its own
flows move, and to the same new backend everywhere."""

from __future__ import annotations

import random

from scapy.layers.inet import IP

from lbnat.backends import Backend, Health
from lbnat.engine import FORWARD, Engine, ip_text
from lbnat.service import Service
from tests.unit.fixtures import tcp, udp, wire

VIP = "198.18.100.1"
BACKENDS = tuple(Backend(f"198.18.1.{20 + i}", 9000) for i in range(1, 6))


def instance(own: str, order: int, affinity: float = 0.0) -> Engine:
    backends = list(BACKENDS)
    random.Random(order).shuffle(backends)  # config order differs per instance
    return Engine(
        own,
        [
            Service("web", "tcp", 80, "maglev", affinity, tuple(backends)),
            Service("dns", "udp", 53, "maglev", affinity, tuple(backends)),
        ],
        vip=VIP,
    )


def backend_of(engine: Engine, packet: object) -> str:
    buf = wire(packet)  # type: ignore[arg-type]
    action = engine.handle(buf, 0, len(buf), False, 0.0)
    assert action[0] == FORWARD, action
    return str(IP(bytes(buf)).dst)


def clients(count: int) -> list[tuple[str, int]]:
    rng = random.Random(20)
    return [(f"198.18.{rng.randrange(2, 4)}.{rng.randrange(1, 255)}", rng.randrange(1024, 65536))
            for _ in range(count)]  # fmt: skip


def test_every_instance_sends_a_client_socket_to_the_same_backend() -> None:
    fleet = [instance(f"198.18.1.1{n}", n) for n in (1, 2, 3)]
    for ip, port in clients(1000):
        picks = {backend_of(e, tcp(ip, VIP, port, 80, "S", 1)) for e in fleet}
        assert len(picks) == 1, (ip, port, picks)
        picks = {backend_of(e, udp(ip, VIP, port, 53, b"q")) for e in fleet}
        assert len(picks) == 1, (ip, port, picks)


def test_a_backend_leaving_moves_its_flows_and_few_others_alike_everywhere() -> None:
    lb1, lb2, lb3 = (instance(f"198.18.1.1{n}", n) for n in (1, 2, 3))
    sockets = clients(2000)
    before = {c: backend_of(lb1, udp(c[0], VIP, c[1], 53)) for c in sockets}
    gone = BACKENDS[2]
    for engine in (lb2, lb3):  # two instances that never saw these flows
        engine.set_backends("dns", [b.with_health(Health.DEAD) if b == gone else b
                                    for b in BACKENDS])  # fmt: skip
    moved = 0
    for (ip, port), old in before.items():
        new = backend_of(lb2, udp(ip, VIP, port, 53))
        assert backend_of(lb3, udp(ip, VIP, port, 53)) == new
        if old == gone.ip:
            assert new != gone.ip
        elif new != old:
            moved += 1
    # Maglev's minimal disruption (NSDI 2016, 5.3): a few flows of the others move too
    assert moved < 0.05 * len(sockets), moved


def test_with_affinity_a_clients_new_flows_pick_one_backend_through_any_instance() -> None:
    fleet = [instance(f"198.18.1.1{n}", n, affinity=60.0) for n in (1, 2, 3)]
    for ip, _ in clients(300):
        picks = {backend_of(e, tcp(ip, VIP, port, 80, "S", 1))
                 for e in fleet for port in (40000, 40001, 51000)}  # fmt: skip
        assert len(picks) == 1, (ip, picks)
    assert len({ip_text(b.ip_int) for b in BACKENDS}) == 5
