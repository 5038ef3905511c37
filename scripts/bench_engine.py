#!/usr/bin/env python3
"""Engine cost per packet of an established TCP flow, with 1 and with N rows in the table, and
memory per session at N rows (tracemalloc). A benchmark, not a test: it prints figures.

    python3 scripts/bench_engine.py [--rows 1000000] [--json FILE]

Each measured packet is copied into the receive buffer first (the engine rewrites in place);
that copy is timed alone and subtracted. Both directions are measured: client -> backend and
backend -> client, a 1448-byte payload each, complete checksums (the costlier path).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
import tracemalloc

from lbnat.backends import Backend
from lbnat.engine import FORWARD, Engine, ip_int
from lbnat.nat import State, forward_key
from lbnat.packet import ACK, SYN, TCP, tcp_segment
from lbnat.service import Service

LB = "198.18.0.2"
BACKENDS = 20  # (backend, NAT port) must be unique: 1M rows need > 15 backends of 64k ports
NAT_PORTS = (1024, 65535)
PAYLOAD = bytes(range(256)) * 5 + bytes(168)  # 1448 bytes


def make_engine(cap: int) -> Engine:
    backends = tuple(Backend(f"198.18.1.{i + 1}", 8080) for i in range(BACKENDS))
    return Engine(LB, [Service("bench", "tcp", 80, backends=backends)], NAT_PORTS, table_cap=cap)


def syn(client_ip: int, client_port: int) -> bytearray:
    return bytearray(tcp_segment(client_ip, ip_int(LB), client_port, 80, 1000, 0, SYN, 64240))


def fill(engine: Engine, rows: int) -> None:
    """Open `rows` ESTABLISHED flows from distinct clients through the real engine (SYN,
    SYN-ACK, ACK each). Every row gets its own time value: the pessimistic case for memory,
    where no two rows share a last-seen float (the packet loop shares one per batch)."""
    base = ip_int("198.19.0.0")
    lb = ip_int(LB)
    table = engine.table
    for i in range(rows):
        now = i * 1e-6
        client, port = base + (i >> 14), 1024 + (i & 0x3FFF)
        packet = syn(client, port)
        engine.handle(packet, 0, len(packet), False, now)
        row = table.forward[forward_key(TCP, client, port, 80)]
        backend = row.backend
        packet = bytearray(
            tcp_segment(backend.ip_int, lb, 8080, row.nat_port, 5000 + i, 1001, SYN | ACK, 64240)
        )
        engine.handle(packet, 0, len(packet), False, now)
        packet = bytearray(tcp_segment(client, lb, port, 80, 1001, 5001 + i, ACK, 502))
        engine.handle(packet, 0, len(packet), False, now)
    if len(table) != rows or table.open_flows != rows:
        sys.exit(f"bench: only {len(table)} of {rows} rows were created")
    engine.take_events()


def establish(engine: Engine) -> tuple[bytes, bytes]:
    """Hand-shake one flow; return a client data packet and a backend data packet for it."""
    client, lb = ip_int("198.18.0.11"), ip_int(LB)
    packet = syn(client, 40000)
    engine.handle(packet, 0, len(packet), False, 0.0)
    row = engine.table.forward[forward_key(TCP, client, 40000, 80)]
    backend, nat_port = row.backend, row.nat_port
    synack = bytearray(
        tcp_segment(backend.ip_int, lb, 8080, nat_port, 5000, 1001, SYN | ACK, 64240)
    )
    engine.handle(synack, 0, len(synack), False, 0.0)
    ack = bytearray(tcp_segment(client, lb, 40000, 80, 1001, 5001, ACK, 502))
    engine.handle(ack, 0, len(ack), False, 0.0)
    to_backend = tcp_segment(client, lb, 40000, 80, 1001, 5001, ACK, 502, PAYLOAD)
    to_client = tcp_segment(backend.ip_int, lb, 8080, nat_port, 5001, 2449, ACK, 502, PAYLOAD)
    return to_backend, to_client


def per_packet_us(engine: Engine, packet: bytes, batches: int = 30, size: int = 5000) -> float:
    """Median over batches of (handle + copy) - copy, in microseconds per packet."""
    handle = engine.handle
    n = len(packet)
    buf = bytearray(n)
    samples = []
    for _ in range(batches):
        t0 = time.perf_counter_ns()
        for _ in range(size):
            buf[:] = packet
        t1 = time.perf_counter_ns()
        for _ in range(size):
            buf[:] = packet
            action = handle(buf, 0, n, False, 1.0)
        t2 = time.perf_counter_ns()
        if action[0] != FORWARD:
            sys.exit(f"bench: the measured packet was not forwarded: {action}")
        samples.append(((t2 - t1) - (t1 - t0)) / size / 1000)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    results: dict[str, object] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "rows": args.rows,
    }
    gc.freeze()  # keep the cyclic GC from scanning the big table during timing

    small = make_engine(cap=args.rows + 10)
    fwd, rev = establish(small)
    results["us_per_packet_1_row"] = {
        "client_to_backend": per_packet_us(small, fwd),
        "backend_to_client": per_packet_us(small, rev),
    }
    del small
    gc.collect()

    tracemalloc.start()
    big = make_engine(cap=args.rows + 10)
    baseline = tracemalloc.get_traced_memory()[0]
    fill(big, args.rows - 1)
    used = tracemalloc.get_traced_memory()[0] - baseline
    tracemalloc.stop()
    results["bytes_per_session"] = used / (args.rows - 1)
    gc.collect()
    gc.freeze()
    fwd, rev = establish(big)
    results[f"us_per_packet_{args.rows}_rows"] = {
        "client_to_backend": per_packet_us(big, fwd),
        "backend_to_client": per_packet_us(big, rev),
    }
    results["table_rows"] = len(big.table)
    results["established_rows"] = sum(
        1 for r in big.table.forward.values() if r.state is State.ESTABLISHED
    )

    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    one = results["us_per_packet_1_row"]
    many = results[f"us_per_packet_{args.rows}_rows"]
    assert isinstance(one, dict) and isinstance(many, dict)
    print(
        f"\nper packet (median us)  1 row: {one['client_to_backend']:.2f} / "
        f"{one['backend_to_client']:.2f}"
        f"   {args.rows} rows: {many['client_to_backend']:.2f} / {many['backend_to_client']:.2f}"
        f"   (client->backend / backend->client)\n"
        f"memory per session: {results['bytes_per_session']:.0f} bytes"
    )


if __name__ == "__main__":
    main()
