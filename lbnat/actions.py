"""What the engine decides for a packet: a plain tuple, so a verdict costs no object.

    (FORWARD, next_hop)          send buf[start:end] as rewritten, to IPv4 address next_hop (int)
    (REPLY, packet, next_hop)    send this new IPv4 packet instead (a packet lbnat makes itself)
    (DROP, reason)               send nothing; the reason has been counted
    (SEND_FIRST, next_hop, ((packet, next_hop), ...))
                                 send these new packets, then forward buf[start:end] as FORWARD
                                 does (lbnat.engine: a RST for an evicted half-open row first)
    (REPLIES, 0, ((packet, next_hop), ...))
                                 send these new packets in order, and not this one (the SYN
                                 proxy's SYN to a backend after the RSTs of evicted rows)
    (TRANSLATED, next_hop, new_start)
                                 this packet changed family in place (NAT64, lbnat.packet6): its
                                 new IP header starts at new_start, up to 20 bytes before the
                                 old start (the data plane keeps that headroom), and it still
                                 ends at end; send it as FORWARD does, its virtio_net_hdr's
                                 offsets and GSO type moved with it (docs/ipv6.md)

Next hops are lbnat.addresses ints: an IPv6 one (bit 128 set) goes out in an 0x86DD frame.

(A module of its own so that lbnat.engine and lbnat.synproxy share it without a cycle.)
"""

from __future__ import annotations

from typing import Any

from lbnat.drops import DropReason

FORWARD = 1
REPLY = 2
DROP = 3
SEND_FIRST = 4
REPLIES = 5
TRANSLATED = 6

Action = tuple[Any, ...]  # (FORWARD, int) | (REPLY, bytes, int) | (DROP, int) | see above

DROP_ACTIONS: dict[DropReason, Action] = {reason: (DROP, int(reason)) for reason in DropReason}
