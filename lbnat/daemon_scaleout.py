"""The daemon's part behind an ECMP router (docs/scale-out.md): what its BGP speaker should
announce (`bgp_status`, asked by lbnat-bgp every half second), draining the whole node
(`lbnat drain-node`), and a stop that withdraws the VIP first.

A part of `Daemon` (lbnat.daemon) kept apart, as `Questions` and `SyncGlue` are: the admin
server's threads call `scaleout_request`, the signal handler `withdraw_then_stop`. The rules
themselves are pure, in lbnat.scaleout.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from typing import Any

from lbnat.config import Config
from lbnat.control.protocol import Request, ack
from lbnat.daemon_questions import Questions
from lbnat.dataplane.link import Link
from lbnat.linkwatch import LinkState
from lbnat.scaleout import WITHDRAW_WAIT, Announcement, NodeView, Phase, announcement

__all__ = ["ScaleOut", "mesh_misfit"]

ASKED_RECENTLY = 5.0  # seconds: a speaker that asked this recently is still polling
DRAIN_POLL = 1.0  # seconds between looks at the open flows while the node drains


def mesh_misfit(config: Config, link: Link) -> str | None:
    """Why the mesh sync cannot work on `link`, or None: a packet goes to its owner's sync
    address on the segment the instances share; an address elsewhere would send it to the
    gateway, the router, which would hash it back to an instance, and so on."""
    sync = config.sync
    if sync is None or sync.mode != "mesh":
        return None
    for host, _ in (sync.listen, 0), *sync.peers:
        if ipaddress.IPv4Address(host) not in link.network:
            return (f"the mesh sync's address {host} is not on {link.interface}'s subnet "
                    f"{link.network}: instances forward moved flows to each other's sync "
                    "address on the segment they share")  # fmt: skip
    return None


class ScaleOut(Questions):
    """The announcement, the node's drain and the withdrawing stop (the attributes are the
    Daemon's; the open flows come from Questions.ask)."""

    _phase = Phase.SERVING
    _phase_lock = threading.Lock()  # one per process: one daemon
    _announced: bool | None = None  # the last answer given to a speaker
    _asked_at = float("-inf")  # when a speaker last asked (monotonic)

    @property
    def vip(self) -> str:
        """Where clients connect: --vip, else SRCIP."""
        c = self.control.config
        return c.vip or c.lb_ip or "?"

    def node_view(self) -> NodeView:
        plane, watch, link = self.plane, self.link_watch, self.link
        with self._lock:
            backends = self.control.backends()
        sync = self.sync
        return NodeView(
            running=plane is not None,
            phase=self._phase,
            interface="?" if link is None else link.interface,
            link_up=watch is None or watch.state is LinkState.UP,
            eligible={name: sum(b.eligible for b in group) for name, group in backends.items()},
            sync_ready=None if sync is None or sync.settings.mode != "mesh" else sync.ready,
            pair_role=None if sync is None or sync.settings.mode != "pair" else sync.role.value,
        )

    def status_of(self, counters: dict[str, Any]) -> dict[str, object]:
        """Questions' status, and with a VIP apart (--vip) whether it should be announced."""
        status = super().status_of(counters)
        if self.control.config.vip is not None:
            answer = announcement(self.node_view())
            status["bgp"] = {"announce": answer.announce, "why": answer.why,
                             "phase": self._phase.value}  # fmt: skip
        return status

    def scaleout_request(self, request: Request) -> tuple[bytes, str | None]:
        """`bgp_status` (the speaker's question) or `drain_node`: the reply, and why a nack."""
        if request.op == "drain_node":
            return ack(op="drain_node", **self.drain_node()), None
        answer = announcement(self.node_view())
        self._asked_at = time.monotonic()
        self._note(answer)
        return ack(op="bgp_status", announce=answer.announce, vip=self.vip, why=answer.why,
                   phase=self._phase.value), None  # fmt: skip

    def _note(self, answer: Announcement) -> None:
        """One line when the answer changes: the route follows it within half a second."""
        if answer.announce is self._announced:
            return
        self._announced = answer.announce
        verb = "announce" if answer.announce else "withdraw"
        self.log(f"bgp: {verb} {self.vip}/32 ({answer.why})", "bgp_" + verb, vip=self.vip,
                 why=answer.why)  # fmt: skip

    # --- draining the node and stopping --------------------------------------------------------

    def drain_node(self) -> dict[str, object]:
        """Withdraw the VIP, serve the open flows until they end (or the drain timeout), then
        stop. The flows the router now sends to other instances come back here through them
        (lbnat.owners). Asked twice, the drain under way goes on."""
        flows = self.open_flows()
        timeout = self.control.config.drain_timeout
        with self._phase_lock:  # two drain-node at once start one drain
            starts = self._phase is Phase.SERVING
            if starts:
                self._phase = Phase.DRAINING
        if starts:
            self.log(f"draining the node: {self.vip} is withdrawn; lbnat stops when its last "
                     f"{flows} flows have ended (at most {timeout:g} s)", "node_drain",
                     flows=flows, timeout=timeout)  # fmt: skip
            threading.Thread(
                target=self._drain, args=(time.monotonic() + timeout,), name="lbnat-drain-node",
                daemon=True,
            ).start()  # fmt: skip
        return {"phase": self._phase.value, "flows": flows, "timeout": timeout}

    def _drain(self, deadline: float) -> None:
        time.sleep(WITHDRAW_WAIT)  # the withdraw reaches the router before anything stops
        while True:
            flows = self.open_flows()
            if flows == 0:
                why = "its last flow has ended"
                break
            if time.monotonic() >= deadline:
                why = f"the drain timeout passed with {flows} flows still open"
                break
            time.sleep(DRAIN_POLL)
        self.log(f"node drained: {why}; stopping", "node_drained")
        plane = self.plane
        if plane is not None:
            plane.stop()

    def withdraw_then_stop(self) -> bool:
        """At SIGTERM (in the signal handler): when a speaker announces the VIP, withdraw first
        and stop WITHDRAW_WAIT later (True); otherwise, or at a second signal, stop at once
        (False). The log line and the wait are a thread's: a handler that wrote to the log
        could land inside the main thread's own write (a reentrant call)."""
        plane = self.plane
        recent = time.monotonic() - self._asked_at < ASKED_RECENTLY
        if plane is None or self._phase is Phase.STOPPING or not recent:
            return False
        self._phase = Phase.STOPPING  # (a drain under way stops with it: plane.stop twice is fine)

        def withdraw_and_stop() -> None:
            self.log(f"stopping: {self.vip} is withdrawn first; the data plane stops in "
                     f"{WITHDRAW_WAIT:g} s (a second signal stops it now)", "stop_withdraw",
                     level=logging.INFO)  # fmt: skip
            time.sleep(WITHDRAW_WAIT)
            plane.stop()

        threading.Thread(target=withdraw_and_stop, name="lbnat-withdraw", daemon=True).start()
        return True
