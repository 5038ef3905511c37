"""lbnat's packet sockets when their link goes down, comes back and goes away (issue 16), in
the lab's lb namespace: the facts the data plane's handling rests on (docs/architecture.md,
"Link flaps"), checked on lbnat's own sockets, rings and loops (tests/integration/linktool.py).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator

import pytest

from lbnat_lab.netns import Lab, skip_reason


@pytest.fixture
def lab() -> Iterator[Lab]:
    if (reason := skip_reason()) is not None:
        pytest.skip(reason)
    with Lab() as lab:
        yield lab


def linktool(lab: Lab, *argv: str) -> dict[str, object]:
    done = lab.run("lb", sys.executable, "-m", "tests.integration.linktool", *argv, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert isinstance(result, dict)
    return result


@pytest.mark.parametrize("io", ["rings", "blocks", "socket"])
def test_a_loop_survives_its_link_going_down_and_away(lab: Lab, io: str) -> None:
    seen = linktool(lab, "loop", io)
    # Down: the socket is readable once (sk_err, ENETDOWN), the loop notes it and reads on;
    # every send is refused with ENETDOWN and counted, the ring's marked slots taken back.
    assert seen["readable_when_down"] and not seen["readable_after"], seen
    assert seen["send_when_down"] == "ENETDOWN", seen
    if io != "socket":
        assert seen["tx_marked_after_flush"] == 0, seen
    assert seen["send_when_up"] == "ok", seen
    # Gone: ENETDOWN once more on the read, ENXIO on every send.
    assert seen["readable_when_gone"] and seen["send_when_gone"] == "ENXIO", seen
    assert seen["link_errors"] == 2, seen
    assert seen["drops"] == {"link_down": 2 if io == "socket" else 4}, seen


@pytest.mark.parametrize("workers", [2, 3])
def test_the_fanout_group_keeps_its_order_through_a_flap(lab: Lab, workers: int) -> None:
    """On NETDEV_DOWN the kernel unlinks every member of the group; on NETDEV_UP it links them
    again in the order of the namespace's packet-socket list, which is the order they were
    created in. lbnat creates and joins its sockets in the same order, so worker i still gets
    slice i: the replies of every worker's flows keep reaching it."""
    seen = linktool(lab, "fanout", str(workers), lab.ns("c1"))
    assert seen["before"] == list(range(workers)), seen
    assert seen["after"] == seen["before"], seen
