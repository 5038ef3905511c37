"""The interface lbnat works on, as the main process sees it: up, down, or gone for good.

A link flap costs no flow (docs/architecture.md, "Link flaps"): the packet sockets and their
rings stay bound through it, and every packet loop survives the errors the kernel gives
meanwhile. What is left to do is to say so, once per transition and not once per worker:
`LinkWatch` turns the states the daemon reads every upkeep (lbnat.dataplane.link.LinkProbe)
into transitions, which the daemon logs (lbnat.eventlog.link_line). An interface that is gone
(deleted, its namespace torn down) does not come back: lbnat's sockets are bound to its index,
so the daemon stops. Pure: the states and the time come in.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class LinkState(enum.Enum):
    UP = "up"  # administratively up and operational (IFF_UP and IFF_RUNNING)
    DOWN = "down"  # set down, or no carrier: frames neither arrive nor leave
    GONE = "gone"  # no interface has its index any more: it will not come back


@dataclass(frozen=True, slots=True)
class LinkChange:
    state: LinkState
    previous: LinkState
    seconds: float  # how long the previous state lasted


class LinkWatch:
    """The last state seen and since when; `observe` returns a change, or None."""

    def __init__(self, now: float, state: LinkState = LinkState.UP) -> None:
        self.state = state
        self.since = now

    def observe(self, state: LinkState, now: float) -> LinkChange | None:
        if state is self.state or self.state is LinkState.GONE:  # gone is for good
            return None
        change = LinkChange(state, self.state, now - self.since)
        self.state, self.since = state, now
        return change
