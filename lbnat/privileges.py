"""Which Linux capabilities lbnat needs, and whether this process holds them.

lbnat needs two, not root as such:
- CAP_NET_RAW for the AF_PACKET sockets, the half-open SYN health probe and the ICMP probe;
- CAP_NET_ADMIN for the nftables table (the `nft` child inherits it through the ambient set),
  SO_RCVBUFFORCE/SO_SNDBUFFORCE, PACKET_FANOUT and net.ipv4.ip_local_reserved_ports (the
  kernel lets a holder of CAP_NET_ADMIN write the net.* sysctls of its namespace as root can).

The kernel fast path (`--offload`, lbnat.dataplane.offload) wants CAP_BPF as well; without it
`auto` runs the Python path and says why. So root works, and so does any user that holds
both, such as the systemd unit's service (scripts/systemd/lbnat.service,
AmbientCapabilities=). The check reads the effective set from
/proc/self/status rather than trying an operation, so the error can name what is missing.
"""

from __future__ import annotations

# include/uapi/linux/capability.h
CAPABILITY_BITS = {
    "CAP_NET_BIND_SERVICE": 10,
    "CAP_NET_ADMIN": 12,
    "CAP_NET_RAW": 13,
    "CAP_BPF": 39,  # not required: the kernel fast path's (--offload), which says when it lacks it
}
REQUIRED = ("CAP_NET_RAW", "CAP_NET_ADMIN")


def effective_set(status_text: str) -> int | None:
    """The CapEff mask from the text of /proc/<pid>/status; None if absent or unreadable."""
    for line in status_text.splitlines():
        key, _, value = line.partition(":")
        if key == "CapEff":
            try:
                return int(value.strip(), 16)
            except ValueError:
                return None
    return None


def missing(status_text: str, required: tuple[str, ...] = REQUIRED) -> list[str]:
    """The capabilities in `required` that the process whose status this is does not hold
    (all of them when the status names no effective set)."""
    mask = effective_set(status_text)
    if mask is None:
        return list(required)
    return [name for name in required if not mask >> CAPABILITY_BITS[name] & 1]


def missing_here() -> list[str]:
    """`missing()` for this process."""
    try:
        with open("/proc/self/status") as f:
            return missing(f.read())
    except OSError:
        return list(REQUIRED)
