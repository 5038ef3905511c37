"""Whether this instance should announce the VIP to the router (docs/scale-out.md).

What this module may know: a view of the instance (its data plane, its phase, its interface,
its services' eligible backends, its sync's readiness). No socket, thread or clock. The
daemon (lbnat.daemon_scaleout) builds the view; `lbnat-bgp` (lbnat.bgptool), ExaBGP's process,
asks for the answer every half second and announces or withdraws the VIP's route.

The rules, first match wins: a VIP is announced only by an instance that can serve it, and
withdrawn before it stops serving, so the router's ECMP never sends a flow into a hole.

    data plane not running           withdraw
    stopping (SIGTERM)               withdraw  (then lbnat waits WITHDRAW_WAIT before it stops)
    draining (lbnat drain-node)      withdraw  (its own flows still served until they end)
    interface not up                 withdraw
    half of an HA pair, not master   withdraw  (keepalived's master alone serves the pair's flows)
    mesh sync not ready              withdraw  (it must know the other instances' flows first,
                                                or the flows the router moves here would break)
    no service has a backend         withdraw  (another instance may still reach some)
    otherwise                        announce
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

WITHDRAW_WAIT = 2.0
"""Seconds between a stop's withdraw and the data plane's stop: lbnat-bgp's poll (0.5 s) and
the BGP UPDATE to the router (milliseconds), with room; the packets in flight meanwhile are
still served."""


class Phase(enum.Enum):
    SERVING = "serving"
    DRAINING = "draining"  # lbnat drain-node: withdrawn, stopping when its flows have ended
    STOPPING = "stopping"  # SIGTERM: withdrawn, stopping after WITHDRAW_WAIT


@dataclass(frozen=True, slots=True)
class NodeView:
    running: bool  # the data plane forwards
    phase: Phase
    interface: str
    link_up: bool
    eligible: Mapping[str, int]  # service -> backends that may take a new flow
    sync_ready: bool | None  # the mesh sync holds its peers' flows; None: no mesh sync
    pair_role: str | None = None  # keepalived's word when this node is half of an HA pair


@dataclass(frozen=True, slots=True)
class Announcement:
    announce: bool
    why: str  # one line for the logs of lbnat, lbnat-bgp and ExaBGP


def announcement(view: NodeView) -> Announcement:
    if not view.running:
        return Announcement(False, "the data plane is not running")
    if view.phase is Phase.STOPPING:
        return Announcement(False, "lbnat is stopping")
    if view.phase is Phase.DRAINING:
        return Announcement(False, "the node is draining (lbnat drain-node)")
    if not view.link_up:
        return Announcement(False, f"interface {view.interface} is not up")
    if view.pair_role is not None and view.pair_role != "master":
        return Announcement(False, f"this node is its pair's {view.pair_role} (keepalived)")
    if view.sync_ready is False:
        return Announcement(False, "the mesh sync does not hold the other instances' flows yet")
    serving = sorted(name for name, count in view.eligible.items() if count > 0)
    if not serving:
        return Announcement(False, "no service has an eligible backend")
    return Announcement(
        True, f"{len(serving)} of {len(view.eligible)} services have eligible backends"
    )
