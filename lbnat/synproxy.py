"""The SYN-cookie proxy: under a SYN flood lbnat answers SYNs itself and keeps no state for them.

    client                      lbnat                          backend
      SYN (isn, options)  ->    SYN-ACK (seq = cookie), no row, no port
      ACK (ack = cookie+1) ->   cookie checked: row (SYN_SENT), the ACK kept
                                SYN (seq = isn, the client's MSS/wscale/SACK)  ->
                                                           <-  SYN-ACK (seq = bisn)
                                offset = cookie - bisn; the kept ACK, translated ->
      <-  backend -> client: seq + offset        client -> backend: ack - offset, SACK - offset

A spoofed SYN never sees its cookie, so it costs a hash and a packet, never a row or a NAT
port (`syn_cookies_sent`). Rows of proxied flows are `ProxiedSession`s (a subclass with the
offsets); the engine's per-packet test is `row.__class__ is not Session`, so rows that were
not proxied pay one comparison and nothing else.

Checksums: adding a constant `d` to a 32-bit field changes the one's complement sum by `d`
folded, minus one when the addition wraps past 2**32 (2**32 = 1 modulo 0xffff). Both values are
precomputed per row (`seq_delta`, `ack_delta`); the wrap test is per packet. The delta is added
to the rewrite's precomputed transport delta, which `packet.rewrite` leaves out when the
checksum is partial (the field then holds the pseudo-header sum only: the kernel sums the
sequence numbers itself).

Options:
- MSS: the client's, rounded down to the cookie's table (536, 1300, 1440, 1460), is what the
  backend gets; lbnat's SYN-ACK announces its own (`SynProxySettings.mss`).
- SACK: echoed to the client and offered to the backend when the client offered it; the
  client's SACK blocks name the backend's sequence space and are translated.
- Window scale: the client's is passed to the backend (exact, 4 bits of the cookie). lbnat's
  SYN-ACK promises `SynProxySettings.wscale` (the daemon computes the one the LB's own kernel
  would pick); the backend chooses its own, which may differ, so the window
  of every backend -> client segment of such a row is rescaled (rounded down, capped at 65535),
  and if the backend offers none, the client's windows are scaled up for it.
- Timestamps: not offered on the cookie path (the kernel hides wscale and SACK in TSval when
  timestamps are on; lbnat puts them in the cookie instead). Lost on proxied flows: PAWS and
  RTT measurement by timestamps; the endpoints measure RTT without them.

Limits: the client's first segments after its ACK, before the backend has answered, are
dropped (`syn_proxy_pending`) and make lbnat send its SYN again: the client's retransmission
brings them. A client that sends nothing after its ACK waits for the backend's SYN-ACK; if
lbnat's SYN to the backend is lost, the row times out (SYN_SENT).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import cast

from lbnat.actions import DROP_ACTIONS, FORWARD, REPLIES, REPLY, Action
from lbnat.drops import DropReason
from lbnat.nat import ConnectionTracker, Ended, Session
from lbnat.packet import (
    ACK,
    ADDRESS,
    IP_ADDRESSES,
    IP_CHECKSUM,
    RST,
    SYN,
    TCP,
    checksum,
    fold,
    ipv4_header,
    rewrite,
    tcp_options,
    tcp_segment,
    tcp_window_scale,
    transport_checksum,
)
from lbnat.service import ServiceState
from lbnat.syncookie import CookieFacts, SynProxySettings, check_cookie, make_cookie

MASK32 = 0xFFFFFFFF
_WORD = struct.Struct("!I")
_U16 = struct.Struct("!H")



def rewrite_to_backend(
    buf: bytearray, start: int, l4: int, end: int, row: Session, extra: int, partial: bool
) -> None:
    """A client's TCP segment of a row whose sequence numbers lbnat shifts (SYN-proxied rows,
    PROXY protocol rows: lbnat.engine_pp) rewritten towards the backend, `extra` added to the
    port part of the checksum delta (what the shifts changed), and counted. (The plain NAT
    path does the same inline: there it runs for every packet, and a call costs.)"""
    deltas = row.deltas
    pool = row.pool
    rewrite(
        buf, start, l4, TCP, pool.fwd_addresses, row.fwd_ports,
        deltas >> 48, fold(((deltas >> 32) & 0xFFFF) + extra), partial,
    )  # fmt: skip
    pool.to_backend_packets += 1
    pool.to_backend_bytes += end - start
    row.service.packets += 1
    row.service.bytes += end - start

class ProxiedSession(Session):
    """A row whose handshake lbnat made itself: the sequence offset and what it needs until
    the backend has answered. Only these rows carry the extra slots."""

    __slots__ = (
        "ack_delta",
        "cookie",
        "kept",
        "offset",
        "seq_delta",
        "syn",
        "win_to_backend",
        "win_to_client",
    )

    def __init__(self) -> None:
        super().__init__()
        self.cookie = 0  # lbnat's ISN towards the client
        self.offset = -1  # backend seq + offset = client's view; -1 until the backend answers
        self.seq_delta = 0  # checksum delta of + offset (no wrap)
        self.ack_delta = 0  # checksum delta of - offset (no wrap)
        self.kept: bytes | None = None  # the client's ACK, sent on once the backend answers
        self.syn = b""  # lbnat's SYN to the backend, sent again if the client retries
        self.win_to_client = 0  # window shift of backend -> client segments (+ left, - right)
        self.win_to_backend = 0  # the same for client -> backend (a backend without wscale)


def syn_options(buf: bytearray | bytes, l4: int, end: int) -> tuple[int | None, bool]:
    """(MSS, SACK permitted) of a SYN at `l4`. Tolerates any option garbage."""
    mss, sack = None, False
    for kind, at, length in tcp_options(buf, l4, end):
        if kind == 2 and length == 4:
            mss = (buf[at + 2] << 8) | buf[at + 3]
        elif kind == 4 and length == 2:
            sack = True
    return mss, sack


def syn_segment(
    src: int, dst: int, sport: int, dport: int, seq: int, ack: int, flags: int, window: int,
    mss: int, wscale: int | None, sack: bool,
) -> bytes:  # fmt: skip
    """A SYN or SYN-ACK with MSS, SACK-permitted and window-scale options (no timestamps)."""
    options = struct.pack("!BBH", 2, 4, mss)
    if sack:
        options += b"\x01\x01\x04\x02"
    if wscale is not None:
        options += bytes((1, 3, 3, wscale))
    offset = (5 + len(options) // 4) << 4
    header = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, offset, flags, window, 0, 0)
    segment = bytearray(header + options)
    _U16.pack_into(segment, 16, transport_checksum(src, dst, TCP, segment))
    return ipv4_header(src, dst, TCP, len(segment)) + bytes(segment)


def offset_delta(offset: int) -> int:
    """The checksum delta of adding `offset` to a 32-bit field when the sum does not wrap."""
    return fold((offset >> 16) + (offset & 0xFFFF))


def shift_field(buf: bytearray, at: int, offset: int, delta: int) -> int:
    """Add `offset` to the 32-bit field at `at`; return its checksum delta (`delta`, less one
    when the sum wraps past 2**32: exact, unlike a delta fixed per row)."""
    (value,) = _WORD.unpack_from(buf, at)
    value += offset
    if value > MASK32:
        value &= MASK32
        delta += 0xFFFE  # -1 in one's complement
    _WORD.pack_into(buf, at, value)
    return delta


def rescale_window(buf: bytearray, l4: int, shift: int) -> int:
    """Rescale the window field (shift > 0: left, capped at 65535; < 0: right, rounded down);
    return its checksum delta."""
    at = l4 + 14
    old = (buf[at] << 8) | buf[at + 1]
    new = min(old << shift, 0xFFFF) if shift > 0 else old >> -shift
    buf[at] = new >> 8
    buf[at + 1] = new & 0xFF
    return (~old & 0xFFFF) + new


def translate_sack(buf: bytearray, l4: int, end: int, offset: int, delta: int) -> int:
    """Shift every edge of the SACK blocks in the options at `l4` by `offset`; return the
    checksum delta (0 without SACK blocks)."""
    total = 0
    for kind, at, length in tcp_options(buf, l4, end):
        if kind == 5:
            for edge in range(at + 2, at + length - 3, 4):
                total += shift_field(buf, edge, offset, delta)
    return total


class SynProxy:
    """The SYN proxy of one engine: when to answer SYNs with cookies, the cookies, and the
    packet path of proxied rows (`from_client`, `from_backend`). Counters per service are in
    `ServiceState.syn_cookies` (sent, validated, invalid)."""

    def __init__(
        self,
        settings: SynProxySettings,
        lb_ip: int,
        tracker: ConnectionTracker,
        flow_ended: Callable[[Ended, float], None],
        count_drop: Callable[[DropReason], None],
        open_flow: Callable[..., Session | Action],
        take_resets: Callable[[], tuple[tuple[bytes, int], ...]],
        vip: int | None = None,
    ) -> None:
        self.settings = settings
        self.mode = settings.mode
        self.lb_ip = lb_ip  # towards backends
        self.vip = lb_ip if vip is None else vip  # towards clients (Engine.vip)
        self.active = settings.mode == "on"
        self._tracker = tracker
        self._flow_ended = flow_ended
        self._count_drop = count_drop
        self._open_flow = open_flow  # Engine._open: schedules a flow, makes its row
        self._take_resets = take_resets  # Engine.take_resets: RSTs for the rows it evicted

    def proxies(self, half_open: int) -> bool:
        """Answer this new SYN with a cookie? In auto mode: from more than `threshold` half-open
        rows until no more than half of that (hysteresis: no flapping at the edge)."""
        mode = self.mode
        if mode == "auto":
            threshold = self.settings.threshold
            if half_open > threshold:
                self.active = True
            elif half_open <= threshold // 2:
                self.active = False
            return self.active
        return mode == "on"

    def _drop(self, service: ServiceState, reason: DropReason) -> Action:
        service.count_drop(reason)
        self._count_drop(reason)
        return DROP_ACTIONS[reason]

    # --- the client's handshake with lbnat ---------------------------------------------------

    def answer_syn(
        self, service: ServiceState, buf: bytearray, l4: int, end: int,
        client_ip: int, client_port: int, seq: int, now: float,
    ) -> Action:  # fmt: skip
        """The cookie SYN-ACK for a SYN that has no row."""
        mss, sack = syn_options(buf, l4, end)
        wscale = tcp_window_scale(buf, l4, end)
        facts = CookieFacts(536 if mss is None else mss, wscale, sack)
        cookie = make_cookie(
            self.settings.secret, client_ip, client_port, self.vip, service.port, seq, now, facts
        )
        synack = syn_segment(
            self.vip, client_ip, service.port, client_port, cookie, (seq + 1) & MASK32,
            SYN | ACK, 0xFFFF, self.settings.mss, None if wscale is None else self.settings.wscale,
            sack,
        )  # fmt: skip
        service.syn_cookies["sent"] += 1
        return (REPLY, synack, client_ip)

    def cookie_ack(
        self, service: ServiceState, buf: bytearray, start: int, l4: int, end: int,
        headers: tuple[int, ...], partial: bool, now: float,
    ) -> Action:  # fmt: skip
        """A pure ACK with no row: the client's half of a SYN-cookie handshake, or a stray."""
        _, _, src, _, sport, dport, _, seq, ack, win, _ = headers
        facts = self.check_ack(service, src, sport, seq, ack, now)
        if facts is None:
            return self._drop(service, DropReason.BAD_COOKIE)
        opened = self._open_flow(
            service, TCP, src, sport, SYN, (seq - 1) & MASK32, 0, buf, l4, l4, now,
            row_class=ProxiedSession,
        )  # fmt: skip
        if isinstance(opened, Session):
            action = self.start(
                cast(ProxiedSession, opened), facts, buf, start, end, l4, partial, seq, ack, win
            )
            resets = self._take_resets()
            if resets:  # the new row evicted half-open ones (maybe on its NAT port): RSTs first
                after = ((action[1], action[2]),) if action[0] == REPLY else ()
                return (REPLIES, 0, resets + after)
            return action
        if opened[0] == REPLY:  # no backend: the client, connected, needs our sequence
            return (REPLY, tcp_segment(self.vip, src, dport, sport, ack, 0, RST), src)
        return opened

    def check_ack(
        self, service: ServiceState, client_ip: int, client_port: int, seq: int, ack: int,
        now: float,
    ) -> CookieFacts | None:  # fmt: skip
        """The facts of the cookie a pure ACK with no row acknowledges, or None (counted)."""
        facts = check_cookie(
            self.settings.secret, client_ip, client_port, self.vip, service.port,
            (seq - 1) & MASK32, (ack - 1) & MASK32, now,
        )  # fmt: skip
        service.syn_cookies["validated" if facts is not None else "invalid"] += 1
        return facts

    def start(
        self, row: ProxiedSession, facts: CookieFacts, buf: bytearray, start: int, end: int,
        l4: int, partial: bool, seq: int, ack: int, window: int,
    ) -> Action:  # fmt: skip
        """A row made from a valid cookie: keep the client's ACK, send the SYN to the backend."""
        isn = (seq - 1) & MASK32
        row.cookie = (ack - 1) & MASK32
        self._tracker.start_tcp(row, isn, SYN, facts.wscale)
        row.kept = _copy(buf, start, l4, partial)
        scale = 0 if facts.wscale is None else facts.wscale
        backend = row.pool.backend
        row.syn = syn_segment(
            self.lb_ip, backend.ip_int, row.nat_port, backend.port, isn, 0, SYN,
            min(window << scale, 0xFFFF), facts.mss, facts.wscale, facts.sack,
        )  # fmt: skip
        return (REPLY, row.syn, backend.ip_int)

    # --- the packet path of proxied rows -----------------------------------------------------

    def from_client(
        self, row: ProxiedSession, service: ServiceState, buf: bytearray, start: int, l4: int,
        end: int, flags: int, seq: int, ack: int, win: int, partial: bool, now: float,
    ) -> Action:  # fmt: skip
        backend_ip = row.pool.backend.ip_int
        if row.offset < 0:  # the backend has not answered lbnat's SYN yet
            if flags & RST:
                ended = self._tracker.track_client(row, flags, seq, ack, win, now)
                if ended is None:
                    return self._drop(service, DropReason.SYN_PROXY_PENDING)
                self._flow_ended(ended, now)
                row.kept = None
                rst = tcp_segment(
                    self.lb_ip, backend_ip, row.nat_port, row.pool.backend.port, row.ack_s, 0, RST
                )
                return (REPLY, rst, backend_ip)
            if flags & SYN or row.ended:
                return self._drop(service, DropReason.SYN_PROXY_PENDING)
            # lbnat's SYN goes again (it may have been lost). The client's first data segment
            # (its request, most often, sent right behind its ACK) takes the kept ACK's place:
            # it acknowledges the same and is delivered without waiting for a retransmission.
            # Later segments are dropped: the client retransmits them.
            kept = row.kept
            if (
                kept is not None
                and seq == row.ack_s  # the client's ISN + 1: where the kept ACK starts
                and ack == (row.cookie + 1) & MASK32
                and _payload_length(buf, start) > _payload_length(kept, 0)
            ):
                row.kept = _copy(buf, start, l4, partial)
                return (REPLY, row.syn, backend_ip)
            service.count_drop(DropReason.SYN_PROXY_PENDING)
            self._count_drop(DropReason.SYN_PROXY_PENDING)
            return (REPLY, row.syn, backend_ip)
        if flags & SYN:
            return self._drop(service, DropReason.SYN_PROXY_PENDING)  # a stale duplicate
        ended = self._tracker.track_client(row, flags, seq, ack, win, now)
        extra = 0
        if flags & ACK:
            extra = shift_field(buf, l4 + 8, -row.offset & MASK32, row.ack_delta)
        if buf[l4 + 12] > 0x5F:  # options: SACK blocks name the backend's sequence numbers
            extra += translate_sack(buf, l4, end, -row.offset & MASK32, row.ack_delta)
        if row.win_to_backend:
            extra += rescale_window(buf, l4, row.win_to_backend)
        rewrite_to_backend(buf, start, l4, end, row, extra, partial)
        if ended is not None:
            self._flow_ended(ended, now)
        return (FORWARD, backend_ip)

    def from_backend(
        self, row: ProxiedSession, buf: bytearray, start: int, l4: int, end: int, flags: int,
        seq: int, ack: int, win: int, partial: bool, now: float,
    ) -> Action:  # fmt: skip
        service = row.service
        if row.offset < 0 or flags & SYN:
            return self._backend_handshake(row, service, buf, l4, end, flags, seq, ack, win, now)
        row.kept = None
        ended = self._tracker.track_server(row, flags, (seq + row.offset) & MASK32, ack, win, now)
        extra = shift_field(buf, l4 + 4, row.offset, row.seq_delta)
        if row.win_to_client:
            extra += rescale_window(buf, l4, row.win_to_client)
        deltas = row.deltas
        rewrite(
            buf, start, l4, TCP, row.rev_addresses, row.rev_ports,
            (deltas >> 16) & 0xFFFF, fold((deltas & 0xFFFF) + extra), partial,
        )  # fmt: skip
        pool = row.pool
        pool.to_client_packets += 1
        pool.to_client_bytes += end - start
        service.packets += 1
        service.bytes += end - start
        if ended is not None:
            self._flow_ended(ended, now)
        return (FORWARD, row.client_ip)

    def _backend_handshake(
        self, row: ProxiedSession, service: ServiceState, buf: bytearray, l4: int, end: int,
        flags: int, seq: int, ack: int, win: int, now: float,
    ) -> Action:  # fmt: skip
        backend = row.pool.backend
        if flags & RST:
            if row.offset >= 0:
                return self._drop(service, DropReason.SYN_PROXY_UNEXPECTED)
            # The backend refuses: the client believes it is connected, so it gets a RST with
            # the sequence number it expects from the VIP (cookie + 1).
            ended = self._tracker.track_server(row, flags, seq, ack, win, now)
            if ended is None:
                return self._drop(service, DropReason.SYN_PROXY_UNEXPECTED)
            self._flow_ended(ended, now)
            row.kept = None
            client_ip = row.client_ip
            rst = tcp_segment(
                self.vip, client_ip, service.port, row.client_port,
                (row.cookie + 1) & MASK32, 0, RST,
            )  # fmt: skip
            return (REPLY, rst, client_ip)
        if flags & (SYN | ACK) != SYN | ACK or ack != row.ack_s:
            return self._drop(service, DropReason.SYN_PROXY_UNEXPECTED)
        if row.ended:  # the client gave up (RST) before the backend answered
            rst = tcp_segment(self.lb_ip, backend.ip_int, row.nat_port, backend.port, ack, 0, RST)
            return (REPLY, rst, backend.ip_int)
        if row.offset < 0:
            self._join(row, buf, l4, end, seq, ack, win, now)
        if row.kept is None:
            return self._drop(service, DropReason.SYN_PROXY_UNEXPECTED)
        return (REPLY, row.kept, backend.ip_int)  # again, if the backend repeats its SYN-ACK

    def _join(
        self, row: ProxiedSession, buf: bytearray, l4: int, end: int, seq: int, ack: int,
        win: int, now: float,
    ) -> None:  # fmt: skip
        """The backend's SYN-ACK: the offset, the window shifts, the kept ACK translated."""
        offset = (row.cookie - seq) & MASK32
        row.offset = offset
        row.seq_delta = offset_delta(offset)
        row.ack_delta = offset_delta(-offset & MASK32)
        client_scale = row.wscale >> 4
        backend_scale = tcp_window_scale(buf, l4, end)
        if client_scale != 15:  # the client offered scaling, lbnat promised settings.wscale
            row.win_to_client = (backend_scale or 0) - self.settings.wscale
            if backend_scale is None:
                row.win_to_backend = client_scale
        tracker = self._tracker
        tracker.note_server_wscale(row, backend_scale)
        tracker.track_server(row, SYN | ACK, (seq + offset) & MASK32, ack, win, now)
        assert row.kept is not None
        kept = bytearray(row.kept)
        header = (kept[0] & 0x0F) << 2
        (client_ack,) = _WORD.unpack_from(kept, header + 8)
        (client_seq,) = _WORD.unpack_from(kept, header + 4)
        (client_win,) = _U16.unpack_from(kept, header + 14)
        tracker.track_client(row, ACK, client_seq, client_ack, client_win, now)
        kept[IP_ADDRESSES : IP_ADDRESSES + 8] = row.pool.fwd_addresses
        kept[header : header + 4] = row.fwd_ports
        _WORD.pack_into(kept, header + 8, (client_ack - offset) & MASK32)
        if row.win_to_backend:
            rescale_window(kept, header, row.win_to_backend)
        _U16.pack_into(kept, IP_CHECKSUM, 0)
        _U16.pack_into(kept, IP_CHECKSUM, checksum(kept[:header]))
        _U16.pack_into(kept, header + 16, 0)
        _U16.pack_into(kept, header + 16, _complete(kept, header))
        row.kept = bytes(kept)


def _copy(buf: bytearray, start: int, l4: int, partial: bool) -> bytes:
    """The IPv4 packet at `start` as a packet of its own (kept until the backend answers)."""
    total = (buf[start + 2] << 8) | buf[start + 3]  # not the frame's end: it may be padded
    kept = bytearray(buf[start : start + total])
    if partial:  # it will leave as a packet lbnat made: complete its checksum
        _U16.pack_into(kept, l4 - start + 16, 0)
        _U16.pack_into(kept, l4 - start + 16, _complete(kept, l4 - start))
    return bytes(kept)


def _payload_length(packet: bytes | bytearray, start: int) -> int:
    """The TCP payload length of the (parsed, valid) IPv4 packet at `start`."""
    ihl = (packet[start] & 0x0F) << 2
    offset = (packet[start + ihl + 12] >> 4) << 2
    return ((packet[start + 2] << 8) | packet[start + 3]) - ihl - offset


def _complete(packet: bytearray, l4: int) -> int:
    """The full TCP checksum of an IPv4 packet whose checksum field holds zero."""
    (src,) = ADDRESS.unpack_from(packet, IP_ADDRESSES)
    (dst,) = ADDRESS.unpack_from(packet, IP_ADDRESSES + 4)
    return transport_checksum(src, dst, TCP, packet[l4:])
