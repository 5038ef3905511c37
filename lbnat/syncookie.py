"""SYN cookies: the SYN-ACK's sequence number that lets lbnat keep no state for a SYN.

Under a SYN flood lbnat answers a SYN itself (lbnat.synproxy) and opens the backend side only
when the client's ACK comes back acknowledging `cookie + 1`: a spoofed source never sees the
cookie, so it never makes a row or takes a NAT port.

Layout of the 32-bit cookie (the kernel packs the same facts differently, net/ipv4/syncookies.c):

    bits 31..8   24 bits of a keyed hash (BLAKE2s, the secret as its key) of the client's
                 address and port, the VIP and port, the client's ISN, the time counter and
                 bits 7..0 below
    bits  7..6   the client's MSS, as an index into MSS_TABLE (the kernel's IPv4 msstab)
    bits  5..2   the client's window scale, 0..14; 15: not offered
    bit   1      the client offered SACK
    bit   0      the parity of the time counter the cookie was made in

The counter is `floor(now / 64)`: a cookie is accepted in the counter it was made in and in
the next one (64 to 128 seconds), the parity bit says which of the two to hash against, so a
check costs one hash. 24 bits are hash: a forged ACK (a random acknowledgement number) passes
with odds of 1 in 2**24 (16.7 million), the same order as the kernel's cookies (which spend
8 bits on the counter and 2 on the MSS). The low byte is covered by the hash, so it cannot be
altered without breaking the cookie.

Pure: time comes in as `now`, the secret comes in (the main process draws it once and hands it
to every worker, so each worker checks what another made, and a restarted worker still does).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

MSS_TABLE = (536, 1300, 1440, 1460)  # the kernel's msstab (net/ipv4/syncookies.c)
COUNTER_SECONDS = 64
HASH_BITS = 24
NO_WSCALE = 15
SECRET_BYTES = 16  # BLAKE2s takes keys up to 32 bytes

_INPUTS = struct.Struct("!IHIHIIB")  # client ip, port, vip, port, isn, counter, low byte


@dataclass(frozen=True, slots=True)
class CookieFacts:
    """What a cookie carries about the client's SYN (its options lbnat must pass on)."""

    mss: int
    wscale: int | None  # None: not offered
    sack: bool


def counter(now: float) -> int:
    return int(now // COUNTER_SECONDS)


def mss_index(mss: int | None) -> int:
    """The largest table entry not above the client's MSS (536, RFC 879, when absent)."""
    offered = 536 if mss is None else mss
    index = 0
    for i, value in enumerate(MSS_TABLE):
        if value <= offered:
            index = i
    return index


def _hash(secret: bytes, inputs: bytes) -> int:
    digest = hashlib.blake2s(inputs, key=secret, digest_size=4).digest()
    return int.from_bytes(digest, "big") >> (32 - HASH_BITS)


def make_cookie(
    secret: bytes,
    client_ip: int,
    client_port: int,
    vip: int,
    port: int,
    isn: int,
    now: float,
    facts: CookieFacts,
) -> int:
    """The cookie for a SYN from client_ip:client_port with ISN `isn` to vip:port."""
    wscale = NO_WSCALE if facts.wscale is None else min(facts.wscale, 14)
    count = counter(now)
    low = (mss_index(facts.mss) << 6) | (wscale << 2) | (int(facts.sack) << 1) | (count & 1)
    inputs = _INPUTS.pack(client_ip, client_port, vip, port, isn, count & 0xFFFFFFFF, low)
    return (_hash(secret, inputs) << 8) | low


def check_cookie(
    secret: bytes,
    client_ip: int,
    client_port: int,
    vip: int,
    port: int,
    isn: int,
    cookie: int,
    now: float,
) -> CookieFacts | None:
    """The facts of a cookie made for these inputs in this counter or the one before, or None.
    `cookie` is the client's acknowledgement number minus one, `isn` its sequence minus one."""
    low = cookie & 0xFF
    count = counter(now)
    if (count & 1) != (low & 1):
        count -= 1  # made in the previous counter (or forged: the hash will say)
    inputs = _INPUTS.pack(client_ip, client_port, vip, port, isn, count & 0xFFFFFFFF, low)
    if _hash(secret, inputs) != cookie >> 8:
        return None
    wscale = (low >> 2) & 0x0F
    return CookieFacts(MSS_TABLE[low >> 6], None if wscale == NO_WSCALE else wscale, bool(low & 2))


SYN_PROXY_MODES = ("auto", "on", "off")
DEFAULT_THRESHOLD = 256
DEFAULT_MSS = 1460  # an Ethernet link's MTU (1500) - 40
DEFAULT_WSCALE = 7  # what Linux picks with a 6 MB tcp_rmem (its default before 6.x kernels)


def kernel_wscale(receive_buffer_max: int) -> int:
    """The window scale Linux offers in its SYNs for this largest receive buffer (the larger
    of tcp_rmem's maximum and rmem_max): ilog2(space) - 15, within 0..14
    (tcp_select_initial_window). Backends with the same defaults pick the same."""
    return max(0, min(14, receive_buffer_max.bit_length() - 1 - 15))


@dataclass(frozen=True, slots=True)
class SynProxySettings:
    """How an engine meets SYNs (lbnat.synproxy): `mode` "off" never answers one itself,
    "on" answers every new SYN with a cookie, "auto" does once the engine holds more than
    `threshold` half-open rows (and stops when they are down to half that). `mss` and `wscale`
    are what lbnat's SYN-ACK announces; `secret` keys the cookies (every worker gets the same).
    """

    mode: str = "auto"
    threshold: int = DEFAULT_THRESHOLD
    mss: int = DEFAULT_MSS
    secret: bytes = b""
    wscale: int = DEFAULT_WSCALE

    def __post_init__(self) -> None:
        if self.mode not in SYN_PROXY_MODES:
            raise ValueError(f"syn proxy mode {self.mode!r} is not one of auto, on, off")
        if self.threshold < 1:
            raise ValueError("the syn proxy threshold must be at least 1")
        if not 536 <= self.mss <= 65495:
            raise ValueError(f"the syn proxy MSS {self.mss} is not in 536..65495")
        if not 0 <= self.wscale <= 14:
            raise ValueError(f"the syn proxy window scale {self.wscale} is not in 0..14")
        if len(self.secret) > 32:
            raise ValueError("a cookie secret is at most 32 bytes")
