"""Backends as the data plane sees them: immutable records published as snapshots.

The health checker and the control channel never mutate a backend the packet loop is using;
they build a new tuple of `Backend` records and hand it over whole (see docs/architecture.md,
"Threads and why"). That is why `Backend` is frozen: a snapshot is safe to read without a lock.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field, replace

from lbnat.addresses import V6

BackendKey = tuple[str, int]
"""A backend's identity: (address as text, port); an IPv6 address in RFC 5952 form (lower case,
compressed), so one backend has one key however it was written."""


class Health(enum.Enum):
    """The health checker's verdict. BAD still takes new flows, as in the C++ original."""

    ALIVE = "alive"
    BAD = "bad"
    DEAD = "dead"


@dataclass(frozen=True, slots=True)
class Backend:
    ip: str
    port: int
    weight: int = 1
    name: str = ""
    health: Health = Health.ALIVE
    draining: bool = False
    # Packed forms, derived once, so the packet path never parses text.
    ip_int: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        address = ipaddress.ip_address(self.ip)  # raises ValueError on bad input
        if not 0 < self.port < 65536:
            raise ValueError(f"{self.port} is not a valid port")
        if self.weight < 0:
            raise ValueError(f"weight {self.weight} is negative")
        if address.version == 6:
            object.__setattr__(self, "ip", str(address))
            object.__setattr__(self, "ip_int", V6 | int(address))
        else:
            object.__setattr__(self, "ip_int", int(address))
        if not self.name:
            name = f"[{self.ip}]:{self.port}" if address.version == 6 else f"{self.ip}:{self.port}"
            object.__setattr__(self, "name", name)

    @property
    def key(self) -> BackendKey:
        return (self.ip, self.port)

    @property
    def eligible(self) -> bool:
        """May this backend be given a new flow?"""
        return self.health is not Health.DEAD and not self.draining and self.weight > 0

    def with_health(self, health: Health) -> Backend:
        return replace(self, health=health)

    def with_draining(self, draining: bool = True) -> Backend:
        return replace(self, draining=draining)
