"""Reordering on both sides of the LB (no netem here: an HTB qdisc whose slow class holds back
a random share of each side's outgoing TCP packets, see lbnat_lab.faults): the receivers see
segments out of order, and a transfer each way still arrives byte for byte."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from lbnat_lab.faults import out_of_order, reordering
from tests.faults.admin import no_traceback
from tests.faults.conftest import scaled
from tests.integration.conftest import MB, Bed, random_file, require, sha256
from tests.integration.transfer import download, upload

pytestmark = pytest.mark.netns

SIZE = scaled(10 * MB, 50 * MB)
PERCENT = 10  # of each side's TCP packets held back


def test_a_transfer_survives_reordering_both_ways(scratch: Path, fbed: Bed) -> None:
    require("socat", "tc", "nstat")
    lbnat = fbed.lbnat("--no-health", "--workers", "2", backends=("b1",))
    up_src, up_dst = scratch / "up.src", scratch / "up.dst"
    down_src, down_dst = scratch / "down.src", scratch / "down.dst"
    up_sum, down_sum = random_file(up_src, SIZE), random_file(down_src, SIZE)
    before = {host: out_of_order(fbed.lab, host) for host in ("c1", "b1")}
    started = time.monotonic()
    with reordering(fbed.lab, ("c1", "b1"), PERCENT) as held:
        upload(fbed, "c1", "b1", up_src, up_dst)
        download(fbed, "c1", "b1", down_src, down_dst)
    ooo = {host: out_of_order(fbed.lab, host) - before[host] for host in ("c1", "b1")}
    print(f"reordering {PERCENT} %: 2 x {SIZE // MB} MB in {time.monotonic() - started:.1f} s, "
          f"held back {held}, out-of-order segments queued {ooo}")  # fmt: skip
    assert up_dst.stat().st_size == SIZE and sha256(up_dst) == up_sum
    assert down_dst.stat().st_size == SIZE and sha256(down_dst) == down_sum
    assert held["c1"] > 0 and held["b1"] > 0, held
    assert ooo["c1"] > 0 and ooo["b1"] > 0, ooo  # the receivers did see reordering
    # the flows' last FINs may still be on their way (retransmitted after a loss): bounded
    ended = lbnat.out.wait_for(
        lambda lines: sum(" terminated " in x for x in lines) >= 2 or None, "both flows' ends", 30
    )
    assert ended and lbnat.out.count(" terminated ") == 2
    assert no_traceback(lbnat.out.snapshot(), lbnat.err.snapshot())
