"""What the row checkpoint (lbnat.checkpoint, issue 16) and the session sync (lbnat.standby,
issue 19) cost per flow, and what a restore costs per row.

    python -m lbnat_bench.flowcost --flows 20000 --rows 100000     # prints one JSON record

A flow's whole life goes through the real engine: SYN, SYN-ACK, ACK, one data packet each way,
FIN, FIN, the last ACK, then the expiry sweep that removes the row; once without a checkpoint
and once with one on a shared mapping (as a worker has), alternating, medians of the rounds.
Its record is written whole once (the open), then in part at each of its four state changes
(SYN_RECV, ESTABLISHED, FIN_WAIT, TIME_WAIT), and cleared once; the data packets write
nothing. With the sync on top, the journal also keeps the row at ESTABLISHED, FIN_WAIT and
TIME_WAIT and its END, drained every BATCH packets as the loop does, and its records are
encoded into signed datagrams as the main process does (HMAC-SHA256 included). Then `--rows`
established flows are
checkpointed and restored into a fresh engine (what a restarted worker does before its first
frame).
"""

from __future__ import annotations

import argparse
import gc
import json
import mmap
import statistics
import time

from lbnat.checkpoint import RowCheckpoint, checkpoint_bytes, restore
from lbnat.engine import Engine, ip_int
from lbnat.nat import Timeouts, forward_key
from lbnat.packet import ACK, FIN, SYN, TCP, tcp_segment
from lbnat.standby import Standby
from lbnat.syncwire import SyncSender
from lbnat_bench.scale import LB, fill, make_engine

TIMEOUTS = Timeouts(time_wait=1.0)
BATCH = 64  # packets between two drains of the sync journal (a ring block's worth)


def engine_for(flows: int) -> Engine:
    engine = make_engine(cap=flows + 10)
    engine.table.timeouts = TIMEOUTS
    engine.table.timeout_of = TIMEOUTS.by_state()
    for pool in engine.table.pools.values():
        pool.timeout_of = engine.table.timeout_of
    return engine


def shared_buffer(rows: int) -> memoryview:
    """A shared mapping with room for `rows` records (a worker maps a memfd the same way)."""
    return memoryview(mmap.mmap(-1, checkpoint_bytes(rows)))


def lives(engine: Engine, flows: int, start: int, now: float) -> float:
    """Seconds the engine spends on `flows` whole flow lives (the last sweep included). The
    packets are built outside the timed parts: first every SYN, then the rest of each flow
    (which needs the NAT port its row got)."""
    lb = ip_int(LB)
    base = ip_int("198.19.0.0")
    handle, table = engine.handle, engine.table
    clients = [(base + (i >> 14), 1024 + (i & 0x3FFF)) for i in range(start, start + flows)]
    syns = [bytearray(tcp_segment(c, lb, p, 80, 1000, 0, SYN, 64240)) for c, p in clients]
    standby = engine.standby
    sender = SyncSender(1, 1, b"bench-secret")
    datagrams = 0

    def drain() -> None:
        nonlocal datagrams
        if standby is not None and standby.journal.pending:
            datagrams += len(sender.updates(standby.journal.drain(now).records, now))

    t0 = time.perf_counter()
    for i, buf in enumerate(syns):
        handle(buf, 0, len(buf), False, now)
        if i % BATCH == 0:
            drain()
    elapsed = time.perf_counter() - t0
    rest: list[bytearray] = []
    for client, port in clients:
        row = table.forward[forward_key(TCP, client, port, 80)]
        backend, nat = row.backend.ip_int, row.nat_port
        rest += [
            bytearray(packet)
            for packet in (
                tcp_segment(backend, lb, 8080, nat, 5000, 1001, SYN | ACK, 64240),
                tcp_segment(client, lb, port, 80, 1001, 5001, ACK, 502),
                tcp_segment(client, lb, port, 80, 1001, 5001, ACK, 502, b"hello"),
                tcp_segment(backend, lb, 8080, nat, 5001, 1006, ACK, 502, b"world"),
                tcp_segment(client, lb, port, 80, 1006, 5006, ACK | FIN, 502),
                tcp_segment(backend, lb, 8080, nat, 5006, 1007, ACK | FIN, 502),
                tcp_segment(client, lb, port, 80, 1007, 5007, ACK, 502),
            )
        ]
    t0 = time.perf_counter()
    for i, buf in enumerate(rest):
        handle(buf, 0, len(buf), False, now)
        if i % BATCH == 0:
            drain()
    engine.tick(now + 10.0)
    drain()
    elapsed += time.perf_counter() - t0
    if len(table) or table.open_flows:
        raise SystemExit(f"bench: {len(table)} rows left after the sweep")
    engine.take_events()
    return elapsed


def per_flow_us(flows: int, rounds: int) -> dict[str, float]:
    plain, kept, synced = engine_for(flows), engine_for(flows), engine_for(flows)
    restore(kept, RowCheckpoint(shared_buffer(flows)), 0.0)
    restore(synced, RowCheckpoint(shared_buffer(flows)), 0.0)
    synced.standby = Standby(synced, 0)  # after the restore, as a worker does
    samples: dict[str, list[float]] = {"plain": [], "checkpoint": [], "sync": []}
    now = 0.0
    order = [("plain", plain), ("checkpoint", kept), ("sync", synced)]
    for r in range(rounds):
        for name, engine in order[r % 3 :] + order[: r % 3]:  # each goes first in turn
            gc.collect()
            samples[name].append(lives(engine, flows, r * flows, now) / flows * 1e6)
        now += 20.0
    plain_us = statistics.median(samples["plain"])
    kept_us = statistics.median(samples["checkpoint"])
    sync_us = statistics.median(samples["sync"])
    # The fastest rounds too: on a shared machine they are the ones least disturbed.
    plain_min, kept_min = min(samples["plain"]), min(samples["checkpoint"])
    return {
        "us_per_flow_plain": plain_us,
        "us_per_flow_checkpoint": kept_us,
        "us_per_flow_added": kept_us - plain_us,
        "us_per_flow_added_fastest": kept_min - plain_min,
        "us_per_flow_sync": sync_us,
        "us_per_flow_sync_added": sync_us - kept_us,  # over the checkpoint it tees into
        "us_per_flow_sync_added_fastest": min(samples["sync"]) - kept_min,
    }


def restore_us(rows: int) -> dict[str, float]:
    buffer = shared_buffer(rows)
    engine = make_engine(cap=rows + 10)
    restore(engine, RowCheckpoint(buffer), 0.0)
    fill(engine, rows)
    fresh = make_engine(cap=rows + 10)
    gc.collect()
    t0 = time.perf_counter()
    report = restore(fresh, RowCheckpoint(buffer), 1.0)
    elapsed = time.perf_counter() - t0
    if report.rows != rows:
        raise SystemExit(f"bench: restored {report.rows} of {rows} rows")
    return {
        "rows_restored": float(rows),
        "restore_s": elapsed,
        "us_per_row_restored": elapsed / rows * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", type=int, default=20_000, help="flow lives per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", type=int, default=100_000, help="rows to restore")
    args = parser.parse_args()
    if min(args.flows, args.rounds, args.rows) < 1:
        parser.error("--flows, --rounds and --rows must be at least 1")
    figures = per_flow_us(args.flows, args.rounds) | restore_us(args.rows)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
