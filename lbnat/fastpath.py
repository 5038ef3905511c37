"""The kernel fast path, engine side: which rows the tc program rewrites, and with what.

What this module may know: a row (`lbnat.nat.Session`), its state and its precomputed rewrites;
the layout of the kernel map's entries (the contract with `lbnat/bpf/fastpath.bpf.c`); the
time, as an argument. It touches no socket, file or syscall: the map it fills is injected
(`KernelMap`: `lbnat.dataplane.tcbpf.FlowMap` in the data plane, `SimulatedMap` in tests), as
katran's control plane is given its BPF adapter.

The engine stays the single source of truth; the kernel only repeats, per packet, a rewrite the
engine computed:

- a TCP row enters the kernel once it has been ESTABLISHED for OFFLOAD_AFTER (a UDP row once
  it has been UDP_REPLIED that long), at the engine's next tick: a short flow (an HTTP
  request with `Connection: close`, a DNS query) ends before and costs no syscall at all; a long
  one spends its first tenth of a second or so in Python. Its two entries (client -> VIP,
  backend -> NAT port) carry the address and port bytes and the checksum deltas
  `Engine.handle` writes for that row (`Session.fwd_ports`, `rev_addresses`, `rev_ports`,
  `deltas`) and the Ethernet header the data plane would use;
- SYN, FIN and RST segments never match in the kernel: they come up to `Engine.handle` as
  before, whose tracker first takes the kernel's last ACK and window of each side (`refresh`),
  then judges the segment with them (the in-window RST check needs them);
- a row that leaves those states (a FIN, an in-window RST, eviction, removal, a dead backend's
  reset, expiry) leaves the kernel (`withdraw`), its kernel counters folded into its pool and
  service first;
- idle expiry: a due row in the kernel first takes the kernel's last-seen time (`refresh`);
- SYN-proxied rows (`lbnat.synproxy.ProxiedSession`) stay in Python: every packet of theirs
  has its sequence numbers shifted by a row's own offset and its window rescaled.
- PROXY protocol rows (`lbnat.proxyproto.ProxyProtoSession`, IPv4) enter once their header is
  acknowledged (`settle` waits for that): the shift L goes in VALUE's last byte (`SHIFT_AT`),
  L for the client's entry (sequence + L), 0x80 | L for the backend's (ACK - L); the program
  passes up a backend segment with options other than timestamps (SACK blocks) or without
  ACK (docs/proxy-protocol.md).

IPv6 (issue 21): a row whose client and backend are both IPv6 (`rev_addresses` and
`pool.fwd_addresses` 32 bytes each) goes into the second map, `lbnat_flows6`, with KEY6 and
VALUE6 entries of the same meaning; the FastPath is given that map as `kernel6` (without it,
IPv6 rows stay in Python). A NAT64 row (`lbnat.nat.Nat64Session`: an IPv6 client, an IPv4
backend) never enters the kernel: the program does not translate headers. Two checks keep it
out: only rows of the class `Session` itself are offloaded (as for the SYN proxy's rows), and
only rows whose two address blocks have the same length (`family`).

Direct routing (issue 24, lbnat.direct): an IPv4 `DrSession` established (a UDP one replied,
as it is from its start) for OFFLOAD_AFTER enters the kernel as ONE entry, `dr_entry`: client
-> VIP rewritten to the same addresses and ports with zero deltas (an identity rewrite: the
program changes nothing but the Ethernet header, the backend's MAC, and redirects the frame).
It has no reverse entry: its replies never pass lbnat. The program needs no change for it.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable
from typing import Final, Protocol

from lbnat import addresses
from lbnat.nat import DrSession, Session, State
from lbnat.packet import ADDRESS, fold
from lbnat.proxyproto import ProxyProtoSession

KEY = struct.Struct("!IIHHB3x")
"""An entry's key: the packet as it arrives at the LB (saddr, daddr, sport, dport, proto)."""

VALUE = struct.Struct("<8s4sHH12sIQQQIHBx")
"""An entry's value (64 bytes; C's natural alignment gives the same offsets): addresses and
ports to write, the checksum deltas of the address change and of the port change, destination
and source MAC, the egress ifindex; then what the kernel writes: packets, bytes, last-seen
(CLOCK_MONOTONIC ns), and for TCP the last ACK number and raw window, and whether it has one."""

KEY6 = struct.Struct("!16s16sHHB3x")
"""An IPv6 entry's key (40 bytes): as KEY, with the addresses as their 16 bytes."""

VALUE6 = struct.Struct("<32s4sHH12sIQQQIHBx")
"""An IPv6 entry's value (88 bytes): as VALUE, with 32 bytes of addresses (src16, dst16); the
deltas are those of the row's `deltas`, over the 32 bytes (the pseudo-header's part alone:
IPv6 has no header checksum)."""

SHIFT_AT = 63  # VALUE's last byte: a PROXY protocol row's shift (L, or 0x80 | L: the ACK's)

KERNEL_PART = struct.Struct("<QQQIHB")
KERNEL_PART_AT = 32  # offset of the kernel-written part in VALUE
KERNEL_PART_AT6 = 56  # in VALUE6
_KERNEL_TAIL = 32  # the kernel-written part and its pad end both values
assert VALUE.size - KERNEL_PART_AT == VALUE6.size - KERNEL_PART_AT6 == _KERNEL_TAIL

OFFLOADED = (State.ESTABLISHED, State.UDP_REPLIED)

OFFLOAD_AFTER = 0.05
"""Seconds a row stays established (replied) in Python before it enters the kernel. Putting a
row in and taking it out costs about 30 us of syscalls (two updates, lookups, two deletes): more
than a short connection's whole Python path saves, so only flows that last get it (measured with
`make bench`: offloading at once made new connections/s 14 % slower than no offload at all)."""


class KernelMap(Protocol):
    """A flow map (lbnat.dataplane.tcbpf.FlowMap); keys and values are KEY and VALUE bytes
    (KEY6 and VALUE6 in the IPv6 map)."""

    def put(self, key: bytes, value: bytes) -> bool:
        """Insert or replace; False when the map is full."""
        ...

    def get(self, key: bytes) -> bytes | None: ...

    def delete(self, key: bytes) -> None: ...


def port_delta(ip_delta: int, l4_delta: int) -> int:
    """The delta of the port change alone: the transport delta less the address part (ones'
    complement subtraction). The kernel adds the address part with BPF_F_PSEUDO_HDR (kept for
    a partial checksum) and this without it (skipped for a partial one), as packet.rewrite."""
    return fold(l4_delta + (~ip_delta & 0xFFFF))


Entry = tuple[bytes, bytes]  # (KEY bytes, VALUE bytes)


def family(row: Session) -> int:
    """4 or 6 when the row's client and backend are of that one family (its two address blocks,
    `rev_addresses` and `pool.fwd_addresses`, 8 or 32 bytes each); 0 for a row across the
    families (NAT64: 32 and 8), which has no kernel entries."""
    size = len(row.rev_addresses)
    if size != len(row.pool.fwd_addresses):
        return 0
    return 4 if size == 8 else 6 if size == 32 else 0


def _shifted(row: Session) -> bool:
    """A PROXY protocol row of IPv4 (lbnat.proxyproto): the program shifts its numbers."""
    return row.__class__ is ProxyProtoSession and len(row.rev_addresses) == 8


def flow_entries(
    row: Session, ethernet: Callable[[int], bytes | None], ifindex: int
) -> tuple[Entry, Entry] | None:
    """The row's two kernel entries, client -> VIP then backend -> NAT port (KEY/VALUE for an
    IPv4 row, KEY6/VALUE6 for an IPv6 one); None while the Ethernet header of either next hop
    is unknown. `ethernet(ip)` returns the 14-byte header the data plane writes for a frame to
    `ip` (lbnat.dataplane.link.Neighbours.header_for; an IPv6 int for an IPv6 row's hops).
    ValueError for a row across the families (`family` 0: NAT64)."""
    kind = family(row)
    if kind != 4:
        if kind == 6:
            return _flow_entries6(row, ethernet, ifindex)
        raise ValueError("a row across the families (NAT64) has no kernel entries")
    pool = row.pool
    backend = pool.backend
    client_ip = ADDRESS.unpack(row.rev_addresses[4:])[0]
    vip = ADDRESS.unpack(row.rev_addresses[:4])[0]
    lb_ip = ADDRESS.unpack(pool.fwd_addresses[:4])[0]
    to_backend = ethernet(backend.ip_int)
    to_client = ethernet(client_ip)
    if to_backend is None or to_client is None:
        return None
    proto = row.proto
    deltas = row.deltas
    fwd_ip, fwd_l4 = deltas >> 48, (deltas >> 32) & 0xFFFF
    rev_ip, rev_l4 = (deltas >> 16) & 0xFFFF, deltas & 0xFFFF
    forward = (
        KEY.pack(client_ip, vip, row.client_port, row.service_port, proto),
        VALUE.pack(
            pool.fwd_addresses, row.fwd_ports, fwd_ip, port_delta(fwd_ip, fwd_l4),
            to_backend[:12], ifindex, 0, 0, 0, 0, 0, 0,
        ),
    )  # fmt: skip
    reverse = (
        KEY.pack(backend.ip_int, lb_ip, backend.port, row.nat_port, proto),
        VALUE.pack(
            row.rev_addresses, row.rev_ports, rev_ip, port_delta(rev_ip, rev_l4),
            to_client[:12], ifindex, 0, 0, 0, 0, 0, 0,
        ),
    )  # fmt: skip
    if row.__class__ is ProxyProtoSession:  # its sequence shift, in VALUE's last byte
        length = len(row.pp_header)
        forward = (forward[0], forward[1][:SHIFT_AT] + bytes((length,)))
        reverse = (reverse[0], reverse[1][:SHIFT_AT] + bytes((0x80 | length,)))
    return forward, reverse


def _flow_entries6(
    row: Session, ethernet: Callable[[int], bytes | None], ifindex: int
) -> tuple[Entry, Entry] | None:
    """flow_entries of an IPv6 row: the same entries with KEY6 and VALUE6."""
    pool = row.pool
    backend = pool.backend
    vip, client = row.rev_addresses[:16], row.rev_addresses[16:]
    lb, backend_address = pool.fwd_addresses[:16], pool.fwd_addresses[16:]
    to_backend = ethernet(addresses.from_packed(backend_address))
    to_client = ethernet(addresses.from_packed(client))
    if to_backend is None or to_client is None:
        return None
    proto = row.proto
    deltas = row.deltas
    fwd_ip, fwd_l4 = deltas >> 48, (deltas >> 32) & 0xFFFF
    rev_ip, rev_l4 = (deltas >> 16) & 0xFFFF, deltas & 0xFFFF
    forward = (
        KEY6.pack(client, vip, row.client_port, row.service_port, proto),
        VALUE6.pack(
            pool.fwd_addresses, row.fwd_ports, fwd_ip, port_delta(fwd_ip, fwd_l4),
            to_backend[:12], ifindex, 0, 0, 0, 0, 0, 0,
        ),
    )  # fmt: skip
    reverse = (
        KEY6.pack(backend_address, lb, backend.port, row.nat_port, proto),
        VALUE6.pack(
            row.rev_addresses, row.rev_ports, rev_ip, port_delta(rev_ip, rev_l4),
            to_client[:12], ifindex, 0, 0, 0, 0, 0, 0,
        ),
    )  # fmt: skip
    return forward, reverse


def dr_entry(row: Session, ethernet: Callable[[int], bytes | None], ifindex: int) -> Entry | None:
    """A direct-routed IPv4 row's one kernel entry: its client's packets as they arrive,
    written back unchanged (zero deltas), to the backend's MAC; None while that is unknown."""
    to_backend = ethernet(row.pool.backend.ip_int)
    if to_backend is None:
        return None
    as_sent, ports = row.as_client_sends()  # (client, VIP), (client port, service port)
    client_ip, vip = ADDRESS.unpack(as_sent[:4])[0], ADDRESS.unpack(as_sent[4:])[0]
    key = KEY.pack(client_ip, vip, row.client_port, row.service_port, row.proto)
    value = VALUE.pack(as_sent, ports, 0, 0, to_backend[:12], ifindex, 0, 0, 0, 0, 0, 0)
    return key, value


class _InKernel:
    """A row in the kernel: the map it is in (IPv4's or IPv6's) and where the kernel's part of
    its values starts, its two keys and, per entry, the kernel's packets and bytes already
    folded into the row's pool and service (the kernel's counters only grow while it lives)."""

    __slots__ = ("at", "forward", "fwd_counts", "kernel", "rev_counts", "reverse")

    def __init__(self, kernel: KernelMap, at: int, forward: bytes, reverse: bytes) -> None:
        self.kernel = kernel
        self.at = at
        self.forward = forward
        self.reverse = reverse
        self.fwd_counts = [0, 0]  # packets, bytes
        self.rev_counts = [0, 0]


class FastPath:
    """Which rows the kernel rewrites (`rows`), and their entries kept in step with the engine.
    Set as `SessionTable.kernel`: the table calls `changed`/`removed` on every change of state
    and removal, `refresh` before expiring a row; the tracker calls `refresh` before judging a
    FIN, RST or SYN of an established row. IPv4 rows go into `kernel`, IPv6 rows into
    `kernel6` (None: they stay in Python); rows across the families never go in."""

    def __init__(
        self,
        kernel: KernelMap,
        ethernet: Callable[[int], bytes | None],
        ifindex: int,
        kernel6: KernelMap | None = None,
    ) -> None:
        self.kernel = kernel
        self.kernel6 = kernel6
        self.ethernet = ethernet
        self.ifindex = ifindex
        self.rows: dict[Session, _InKernel] = {}
        # Rows that became established (replied), with when, oldest first; `settle` takes
        # those that still are after OFFLOAD_AFTER into the kernel.
        self.waiting: deque[tuple[float, Session]] = deque()
        self._refreshed: Session | None = None  # the row `refresh` read last (see withdraw)
        self.offloaded = 0  # rows handed to the kernel, ever
        self.withdrawn = 0
        self.refused = 0  # rows that stayed in Python: map full, or a next hop not yet resolved
        self.packets = 0  # what the kernel rewrote, folded so far
        self.bytes = 0

    def __contains__(self, row: object) -> bool:
        return row in self.rows

    def changed(self, row: Session) -> None:
        """The row's state changed (`row.seen` is when): it waits for the kernel, or leaves it.
        Only rows of the class Session itself (not a SYN-proxied row, not a NAT64 row) whose
        family has a map wait."""
        if row.state in OFFLOADED and (
            row.__class__ is Session or row.__class__ is DrSession or _shifted(row)
        ):
            if row not in self.rows and self._takes(row):
                self.waiting.append((row.seen, row))
        elif row in self.rows:
            self.withdraw(row)

    def settle(self, now: float) -> None:
        """Hand the kernel the rows established (replied) for OFFLOAD_AFTER that still are: the
        table calls this on every expiry sweep (the engine's tick)."""
        waiting = self.waiting
        since = now - OFFLOAD_AFTER
        later: list[tuple[float, Session]] = []
        while waiting and waiting[0][0] <= since:
            _, row = waiting.popleft()
            if row.bucket >= 0 and row.state in OFFLOADED and row not in self.rows:
                if row.__class__ is ProxyProtoSession and row.pp_state != 2:
                    later.append((now, row))  # its header is not acknowledged yet: wait more
                    continue
                self._offload(row)
        waiting.extend(later)

    def removed(self, row: Session) -> None:
        if row in self.rows:
            self.withdraw(row)

    def _takes(self, row: Session) -> bool:
        """Whether the row's family has a map here (IPv4: always; IPv6: with kernel6)."""
        kind = family(row)
        return kind == 4 or (kind == 6 and self.kernel6 is not None)

    def _offload(self, row: Session) -> None:
        kernel, at = self.kernel, KERNEL_PART_AT
        if row.__class__ is DrSession:
            self._offload_dr(row)
            return
        if len(row.rev_addresses) != 8:
            if self.kernel6 is None or family(row) != 6:
                return
            kernel, at = self.kernel6, KERNEL_PART_AT6
        entries = flow_entries(row, self.ethernet, self.ifindex)
        if entries is None:
            self.refused += 1
            return
        (fwd_key, fwd_value), (rev_key, rev_value) = entries
        if not kernel.put(fwd_key, fwd_value):
            self.refused += 1
            return
        if not kernel.put(rev_key, rev_value):
            kernel.delete(fwd_key)
            self.refused += 1
            return
        self.rows[row] = _InKernel(kernel, at, fwd_key, rev_key)
        self.offloaded += 1

    def _offload_dr(self, row: Session) -> None:
        """A direct-routed row's one entry (`dr_entry`); IPv4 only, as DR is."""
        entry = None if family(row) != 4 else dr_entry(row, self.ethernet, self.ifindex)
        if entry is None or not self.kernel.put(*entry):
            self.refused += 1
            return
        self.rows[row] = _InKernel(self.kernel, KERNEL_PART_AT, entry[0], b"")
        self.offloaded += 1

    def withdraw(self, row: Session) -> None:
        """Take the row's entries out of the kernel, its last counts folded in first."""
        entry = self.rows.get(row)
        if entry is None:
            return
        if self._refreshed is not row:  # the tracker or the sweep has just read it: once will do
            self.refresh(row)
        self._refreshed = None
        entry.kernel.delete(entry.forward)
        if entry.reverse:  # (a direct-routed row has none)
            entry.kernel.delete(entry.reverse)
        del self.rows[row]
        self.withdrawn += 1

    def refresh(self, row: Session) -> None:
        """Bring what the kernel saw of the row into it: its packets and bytes (into the pool's
        and the service's counters), its last-seen time, and each side's last ACK and window
        when the kernel has carried a segment of that side since the last refresh."""
        entry = self.rows.get(row)
        if entry is None:
            return
        self._refreshed = row
        acked = self._fold(row, entry, entry.forward, entry.fwd_counts, False)
        if acked is not None:
            row.ack_c, row.win_c = acked
        if not entry.reverse:  # a direct-routed row: its replies never pass lbnat
            return
        acked = self._fold(row, entry, entry.reverse, entry.rev_counts, True)
        if acked is not None:
            row.ack_s, row.win_s = acked

    def _fold(
        self, row: Session, entry: _InKernel, key: bytes, counts: list[int], to_client: bool
    ) -> tuple[int, int] | None:
        """Fold one entry's new packets and bytes into the row (the reverse entry's go to the
        client); the ACK and window of the side's last segment if the kernel carried one
        since the last fold."""
        value = entry.kernel.get(key)
        if value is None:
            return None
        packets, octets, seen_ns, ack, window, acked = KERNEL_PART.unpack_from(value, entry.at)
        if packets <= counts[0]:
            return None
        self._count(row, packets - counts[0], octets - counts[1], seen_ns, to_client)
        counts[0], counts[1] = packets, octets
        return (ack, window) if acked else None

    def _count(
        self, row: Session, packets: int, octets: int, seen_ns: int, to_client: bool
    ) -> None:
        pool, service = row.pool, row.service
        if to_client:
            pool.to_client_packets += packets
            pool.to_client_bytes += octets
        else:
            pool.to_backend_packets += packets
            pool.to_backend_bytes += octets
        service.packets += packets
        service.bytes += octets
        self.packets += packets
        self.bytes += octets
        seen = seen_ns / 1e9
        if seen > row.seen:
            row.seen = seen

    def sync(self) -> None:
        """Refresh every row in the kernel (before counters are reported): two lookups a row."""
        for row in list(self.rows):
            self.refresh(row)
        self._refreshed = None

    NAMES: Final = ("rows", "offloaded", "withdrawn", "refused", "packets", "bytes")
    ZEROS: Final = dict.fromkeys(NAMES, 0)

    def counters(self) -> dict[str, int]:
        return {
            "rows": len(self.rows),
            "offloaded": self.offloaded,
            "withdrawn": self.withdrawn,
            "refused": self.refused,
            "packets": self.packets,
            "bytes": self.bytes,
        }


class SimulatedMap:
    """A kernel map in memory (IPv4's or IPv6's: the values say which), with the program's
    bookkeeping done by `carry` (what the tc program writes for each packet it rewrites): the
    engine's tests run the fast path's decisions without BPF, as katran's tests run against
    its simulator."""

    def __init__(self, capacity: int = 1 << 16) -> None:
        self.capacity = capacity
        self.entries: dict[bytes, bytes] = {}

    def put(self, key: bytes, value: bytes) -> bool:
        if key not in self.entries and len(self.entries) >= self.capacity:
            return False
        self.entries[key] = value
        return True

    def get(self, key: bytes) -> bytes | None:
        return self.entries.get(key)

    def delete(self, key: bytes) -> None:
        self.entries.pop(key, None)

    def carry(self, key: bytes, length: int, now_ns: int, ack: int | None, window: int) -> bool:
        """Account one packet of `length` IP bytes as the program does; False on a miss."""
        value = self.entries.get(key)
        if value is None:
            return False
        at = len(value) - _KERNEL_TAIL  # KERNEL_PART_AT, or KERNEL_PART_AT6 in a VALUE6
        packets, octets, _seen, old_ack, old_window, acked = KERNEL_PART.unpack_from(value, at)
        if ack is not None:
            old_ack, old_window, acked = ack, window, 1
        written = KERNEL_PART.pack(packets + 1, octets + length, now_ns, old_ack, old_window, acked)
        tail = value[at + KERNEL_PART.size :]
        self.entries[key] = value[:at] + written + tail
        return True
