"""When an instance behind the ECMP router announces the VIP (lbnat.scaleout): only while it
can serve it, and withdrawn before it stops serving. First match wins, as the module's table
says."""

from __future__ import annotations

import dataclasses

import pytest

from lbnat.scaleout import NodeView, Phase, announcement

SERVING = NodeView(
    running=True, phase=Phase.SERVING, interface="eth0", link_up=True,
    eligible={"web": 3, "dns": 0}, sync_ready=True,
)  # fmt: skip

CASES = [
    ({}, True, "1 of 2 services have eligible backends"),
    ({"sync_ready": None}, True, "1 of 2 services"),  # no mesh sync: nothing to wait for
    ({"running": False}, False, "the data plane is not running"),
    ({"phase": Phase.STOPPING}, False, "lbnat is stopping"),
    ({"phase": Phase.DRAINING}, False, "the node is draining"),
    ({"link_up": False}, False, "interface eth0 is not up"),
    ({"sync_ready": False}, False, "does not hold the other instances' flows yet"),
    ({"eligible": {"web": 0, "dns": 0}}, False, "no service has an eligible backend"),
    ({"eligible": {}}, False, "no service has an eligible backend"),
    ({"running": False, "phase": Phase.DRAINING}, False, "not running"),  # the first rule wins
    ({"phase": Phase.DRAINING, "link_up": False}, False, "draining"),
    ({"pair_role": "master", "sync_ready": None}, True, "1 of 2 services"),
    ({"pair_role": "backup", "sync_ready": None}, False, "this node is its pair's backup"),
    ({"pair_role": "unknown", "sync_ready": None}, False, "its pair's unknown"),
]


@pytest.mark.parametrize(("changes", "announce", "why"), CASES)
def test_announcement(changes: dict[str, object], announce: bool, why: str) -> None:
    answer = announcement(dataclasses.replace(SERVING, **changes))  # type: ignore[arg-type]
    assert answer.announce is announce
    assert why in answer.why
