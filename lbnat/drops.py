"""Why a packet was dropped. Every drop is counted under one of these names (`lbnat status`)."""

from __future__ import annotations

import enum


class DropReason(enum.IntEnum):
    # Malformed or unsupported input, decided by lbnat.packet.parse.
    TRUNCATED = 1
    NOT_IPV4 = 2
    BAD_IHL = 3
    BAD_TOTAL_LENGTH = 4
    FRAGMENT = 5  # any IP fragment: ports are missing or the datagram is incomplete
    NOT_TCP_UDP = 6
    BAD_TCP_OFFSET = 7
    BAD_TCP_FLAGS = 8  # no flag at all, SYN+FIN, SYN+RST
    BAD_UDP_LENGTH = 9
    # Decided by the engine.
    NOT_FOR_US = 20  # not to the LB address, or to a port lbnat does not own
    NO_SESSION = 21  # a non-SYN segment (or a reply) that matches no row
    NO_BACKEND = 22  # no eligible backend for a new flow (TCP: answered with a RST)
    NAT_PORTS_EXHAUSTED = 23
    TABLE_FULL = 24
    NO_NEXT_HOP = 25  # data plane: the next hop's MAC is not known yet
    SEND_FAILED = 26  # data plane: the kernel refused the frame
    RING_TRUNCATED = 27  # data plane: too big for a ring slot and no whole copy was queued
    # Decided by the SYN proxy (lbnat.synproxy).
    BAD_COOKIE = 30  # an ACK that matches no row and acknowledges no valid SYN cookie
    SYN_PROXY_PENDING = 31  # a client segment while lbnat's SYN to the backend is unanswered
    SYN_PROXY_UNEXPECTED = 32  # a backend segment of a proxied row before its SYN-ACK
    LINK_DOWN = 28  # data plane: the interface was down or gone when the frame was to leave
    # Decided by the flow owners of instances behind an ECMP router (lbnat.owners).
    OWNER_LOOP = 40  # a packet for another instance's flow whose TTL ran out between instances
    # IPv6 (lbnat.packet6, lbnat.engine6).
    BAD_IPV6 = 50  # a payload length of 0 (jumbogram) or an extension header chain too long
    NO_NAT46 = 51  # an IPv4 client of a service whose backends are IPv6 (not translated)
    PACKET_TOO_BIG = 52  # grew past the MTU in translation: an ICMP error went to its sender
    BAD_ICMP = 53  # an ICMP error whose quote's lengths cannot be turned (lbnat.engine_icmp)

    @property
    def label(self) -> str:
        return self.name.lower()
