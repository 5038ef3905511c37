"""Which other instance owns a flow: the session sync's records kept as ownership, for
instances that share a VIP behind an ECMP router (`--sync-mode mesh`, docs/scale-out.md).

What this module may know: the sync's records (lbnat.syncwire) and the timeouts. It touches
no socket, thread or clock: `now` comes in. Each worker's engine holds one `FlowOwners`, fed
by `lbnat.standby.Standby` in mesh mode; the engine asks it about a packet that has no row.

Why: Linux ECMP is not resilient. When an instance joins or leaves, the router's hash moves
some established flows to another instance, which has no row for them. That instance knows
the flow's owner from the owner's sync records and forwards the packet to it unchanged, on
the segment they share (GLB's second chance, Beamer's daisy chaining): the owner's row, NAT
port and source address are the flow's, and the backend's replies still go to the owner.

    owner lb1 ── ROW/END/REFRESH ──► lb2's FlowOwners: client socket -> (lb1, NAT port, deadline)
    client ──► router ──(rehash)──► lb2: no row, lb1 owns it ──► frame to lb1 (TTL - 1) ──► lb1

The mesh is IPv4 (a shared VIP is IPv4; IPv6 clients reach an instance's own ip6): records
of IPv6 clients' rows are skipped and counted (`ipv6_skipped`), never kept.

A record lives as long as the owner's row would (its state's timeout from the owner's last
packet) plus `GRACE`, and each of the owner's records sets it again, as for standby rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lbnat.addresses import V4_MAX
from lbnat.nat import ENDED, Timeouts
from lbnat.standby import client_key
from lbnat.syncwire import RowKey, RowRefresh, RowUpdate

GRACE = 5.0  # lbnat.standby.GRACE: the owner's refresh arrives before the record goes
SWEEP_EVERY = 10.0  # seconds between sweeps of expired records (lookups check on their own)


@dataclass(slots=True)
class Owned:
    """One flow of another instance: who, its NAT port there (names the row), until when."""

    owner: int  # the owner's sync address as a number (syncwire's sender id)
    nat_port: int
    timeout: float  # of the row's state there
    deadline: float
    live: bool = True  # not TIME_WAIT or CLOSE: packets are forwarded to live flows only


class FlowOwners:
    """The flows other instances own, by client socket (lbnat.nat.forward_key)."""

    def __init__(self, timeouts: Timeouts | None = None) -> None:
        self.timeout_of = (timeouts or Timeouts()).by_state()
        self.flows: dict[int, Owned] = {}
        self.stale: dict[int, set[int]] = {}  # owner -> keys a running resync has not confirmed
        self.forwarded = 0  # packets sent on to their owner
        self.ipv6_skipped = 0  # records of IPv6 clients' rows (the mesh is IPv4): not kept
        self._next_sweep = 0.0

    def owner_of(self, key: int, now: float) -> int | None:
        """The instance that owns this client socket's flow, or None (unknown, or expired)."""
        owned = self.flows.get(key)
        if owned is None:
            return None
        if owned.deadline < now:
            del self.flows[key]
            return None
        # An ended flow's socket is free for the client's next flow (a SYN-proxy cookie ACK, a
        # new SYN elsewhere): that one is not the owner's. Its last ACK is not worth a risk.
        return owned.owner if owned.live else None

    def pass_on(self, buf: bytearray, start: int) -> bool:
        """Ready the IPv4 packet at `start` for its owner: unchanged but for its TTL, which
        goes down as a router's would (RFC 1624's update of the header checksum, as the
        kernel's ip_decrease_ttl), so two instances that disagree about an owner cannot
        bounce a packet between them for ever. False: its TTL ran out (drop it)."""
        ttl = buf[start + 8]
        if ttl <= 1:
            return False
        buf[start + 8] = ttl - 1
        check = ((buf[start + 10] << 8) | buf[start + 11]) + 0x0100
        check = (check + (check >= 0xFFFF)) & 0xFFFF
        buf[start + 10] = check >> 8
        buf[start + 11] = check & 0xFF
        self.forwarded += 1
        return True

    # --- the owners' records ----------------------------------------------------------------

    def install(self, owner: int, rows: Sequence[RowUpdate], now: float) -> None:
        stale = self.stale.get(owner)
        for update in rows:
            r = update.row
            if r.client_ip > V4_MAX:
                self.ipv6_skipped += 1
                continue
            key = client_key(r)
            live = r.state not in ENDED
            known = self.flows.get(key)
            if not live and known is not None and known.live and known.owner != owner:
                continue  # an old flow's end (a late bulk) never hides a newer flow elsewhere
            timeout = self.timeout_of[r.state]
            self.flows[key] = Owned(owner, r.nat_port, timeout,
                                    now - update.idle + timeout + GRACE, live)  # fmt: skip
            if stale is not None:
                stale.discard(key)

    def end(self, owner: int, keys: Sequence[RowKey]) -> None:
        for k in keys:
            if k.client_ip > V4_MAX:
                self.ipv6_skipped += 1
                continue
            key = client_key(k)
            owned = self.flows.get(key)
            if owned is not None and owned.owner == owner and owned.nat_port == k.nat_port:
                del self.flows[key]

    def refresh(self, owner: int, refreshes: Sequence[RowRefresh], now: float) -> None:
        for refresh in refreshes:
            if refresh.key.client_ip > V4_MAX:
                self.ipv6_skipped += 1
                continue
            key = client_key(refresh.key)
            owned = self.flows.get(key)
            if owned is not None and (owned.owner, owned.nat_port) == (owner, refresh.key.nat_port):
                owned.deadline = now - refresh.idle + owned.timeout + GRACE
                stale = self.stale.get(owner)
                if stale is not None:
                    stale.discard(key)

    def mark_stale(self, owner: int) -> None:
        """A resync from `owner` begins: its records not in the bulk are gone there."""
        self.stale[owner] = {key for key, owned in self.flows.items() if owned.owner == owner}

    def resync_complete(self, owner: int) -> int:
        """Remove `owner`'s records its resync did not confirm; how many went."""
        swept = 0
        for key in self.stale.pop(owner, set()):
            owned = self.flows.get(key)
            if owned is not None and owned.owner == owner:
                del self.flows[key]
                swept += 1
        return swept

    def expire(self, now: float) -> int:
        """Every SWEEP_EVERY seconds, remove the records past their deadline; how many went."""
        if now < self._next_sweep:
            return 0
        self._next_sweep = now + SWEEP_EVERY
        gone = [key for key, owned in self.flows.items() if owned.deadline < now]
        for key in gone:
            del self.flows[key]
        return len(gone)

    def by_owner(self) -> dict[int, int]:
        """Records per owner (status)."""
        counts: dict[int, int] = {}
        for owned in self.flows.values():
            counts[owned.owner] = counts.get(owned.owner, 0) + 1
        return counts
