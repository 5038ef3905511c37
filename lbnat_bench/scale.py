"""lbnat's own scale: the engine's per-packet cost and the process's memory with N rows.

    python -m lbnat_bench.scale --rows 100000     # prints one JSON record

The table is filled synthetically through the real engine: N established flows from distinct
clients (SYN, SYN-ACK, ACK each). Then one more flow is opened and its data packets are timed in
both directions. Each size runs in a fresh process (the runner starts one per size), so the
resident set size (RSS) is that of the table alone plus the interpreter.

Each measured packet is copied into the receive buffer first (the engine rewrites in place);
that copy is timed alone and subtracted. Payload 1448 bytes, complete checksums (the costlier
path).

With `--checkpoint` the engine keeps its rows' records in a shared mapping as a worker does
(lbnat.checkpoint): the memory per session then includes each row's record and slot number.
"""

from __future__ import annotations

import argparse
import gc
import json
import mmap
import statistics
import sys
import time
import tracemalloc

from lbnat.backends import Backend
from lbnat.checkpoint import RowCheckpoint, checkpoint_bytes, restore
from lbnat.engine import FORWARD, Engine, ip_int
from lbnat.nat import forward_key
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


def fill(engine: Engine, rows: int, start: int = 0) -> None:
    """Open `rows` ESTABLISHED flows from distinct clients through the real engine (SYN,
    SYN-ACK, ACK each), numbered from `start`. Every row gets its own time value: the
    pessimistic case for memory, where no two rows share a last-seen float (the packet loop
    shares one per batch)."""
    base = ip_int("198.19.0.0")
    lb = ip_int(LB)
    table = engine.table
    for i in range(start, start + rows):
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
    if len(table) != start + rows or table.open_flows != start + rows:
        sys.exit(f"bench: only {len(table)} of {start + rows} rows were created")
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
    action: tuple[object, ...] = ()
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


def rss_bytes() -> int:
    """This process's resident set size, from /proc/self/status (VmRSS, in kB)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure(
    rows: int, batches: int = 30, trace: bool = False, checkpoint: bool = False
) -> dict[str, float]:
    """Fill a table with `rows` established flows, then time one more flow's packets.

    bytes_per_session is the RSS growth over the fill divided by the rows (what the operator
    pays, allocator slack included). One row per backend is opened before the baseline is
    taken, so each backend's fixed port-pool array is not counted as per-session memory.
    With `trace`, also the bytes Python allocated per session (tracemalloc: the objects alone,
    without allocator slack; the fill runs about 3 x slower)."""
    warm = min(rows, BACKENDS)
    gc.collect()
    engine = make_engine(cap=rows + 10)
    if checkpoint:
        shared = mmap.mmap(-1, checkpoint_bytes(rows + 10))
        restore(engine, RowCheckpoint(memoryview(shared)), 0.0)
    fill(engine, warm)
    gc.collect()
    before = rss_bytes()
    if trace:
        tracemalloc.start()
    fill(engine, rows - warm, start=warm)
    gc.collect()
    traced = tracemalloc.get_traced_memory()[0] if trace else 0
    tracemalloc.stop()
    gc.freeze()  # keep the cyclic GC from scanning the big table during timing
    after = rss_bytes()
    fwd, rev = establish(engine)
    fwd_us = per_packet_us(engine, fwd, batches)
    rev_us = per_packet_us(engine, rev, batches)
    figures = {
        "rows": float(rows),
        "us_per_packet_fwd": fwd_us,
        "us_per_packet_rev": rev_us,
        "us_per_packet": (fwd_us + rev_us) / 2,
        "rss_bytes": float(after),
        "bytes_per_session": (after - before) / (rows - warm) if rows > warm else 0.0,
    }
    if trace and rows > warm:
        figures["traced_bytes_per_session"] = traced / (rows - warm)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--batches", type=int, default=30, help="timed batches of 5,000 packets")
    parser.add_argument("--tracemalloc", action="store_true",
                        help="also count the bytes Python allocates per session (slower; RSS then "
                        "includes tracemalloc's own bookkeeping)")
    parser.add_argument("--checkpoint", action="store_true",
                        help="keep the rows' records in a shared mapping, as a worker does")
    args = parser.parse_args()
    if args.rows < 1 or args.batches < 1:
        parser.error("--rows and --batches must be at least 1")
    print(json.dumps(measure(args.rows, args.batches, args.tracemalloc, args.checkpoint)))


if __name__ == "__main__":
    main()
