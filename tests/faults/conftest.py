"""The fault suite: lbnat in a netns lab while the world misbehaves (issue 16).

Every case makes one fault (a link flap, a SIGKILL, packet loss, a flood, garbage on the control
channel), asserts on the bytes that arrive and on lbnat's log and status, and cleans up by itself
(the lab's namespaces, nftables tables and processes go with the `Lab`, by pid).

Two sizes: `make test` runs the short form (CI); `make faults` sets LBNAT_FAULTS=full, which
runs the same cases at the sizes docs/reliability.md quotes (50 MB transfers, 100,000-SYN
floods, ...). `scaled(short, full)` picks the figure of the current form. Every loop, flood and
fault is bounded in count and time either way.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from lbnat_lab.netns import Lab, skip_reason
from tests.integration.conftest import Bed, require

T = TypeVar("T")

FULL = os.environ.get("LBNAT_FAULTS") == "full"
"""`make faults`: the full sizes; otherwise (make test, CI) the short form."""


def scaled(short: T, full: T) -> T:
    """The figure of this run's form: `full` under `make faults`, else `short`."""
    return full if FULL else short


@pytest.fixture
def fbed(tmp_path: Path) -> Iterator[Bed]:
    """A fresh lab (lb, c1, c2, b1..b3) and the processes of one fault case."""
    if (reason := skip_reason()) is not None:
        pytest.skip(reason)
    require("nft")
    with Lab() as lab:
        testbed = Bed(lab, tmp_path)
        try:
            yield testbed
        finally:
            testbed.close()
