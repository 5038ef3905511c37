"""Packet loss on both sides of the LB (nftables `numgen random` drop rules in the client's and
the backend's namespaces, in and out; there is no netem here): a transfer each way arrives byte
for byte, and lbnat ends the flows as usual."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from lbnat_lab.faults import packet_loss
from tests.faults.conftest import scaled
from tests.integration.conftest import MB, Bed, random_file, require, sha256
from tests.integration.transfer import download, upload

pytestmark = pytest.mark.netns

SIZE = scaled(10 * MB, 50 * MB)


@pytest.mark.parametrize("percent", [1, 5])
def test_a_transfer_survives_packet_loss_both_ways(scratch: Path, fbed: Bed, percent: int) -> None:
    require("socat")
    # No health probes: each socat accepts exactly one connection (and the loss would make
    # probes fail now and then, which is beside the point here).
    lbnat = fbed.lbnat("--no-health", "--workers", "2", backends=("b1",))
    up_src, up_dst = scratch / "up.src", scratch / "up.dst"
    down_src, down_dst = scratch / "down.src", scratch / "down.dst"
    up_sum, down_sum = random_file(up_src, SIZE), random_file(down_src, SIZE)
    started = time.monotonic()
    with packet_loss(fbed.lab, ("c1", "b1"), percent) as dropped:
        upload(fbed, "c1", "b1", up_src, up_dst)
        download(fbed, "c1", "b1", down_src, down_dst)
    print(f"{percent} % loss: 2 x {SIZE // MB} MB in {time.monotonic() - started:.1f} s, "
          f"dropped {dropped}")  # fmt: skip
    assert up_dst.stat().st_size == SIZE and sha256(up_dst) == up_sum
    assert down_dst.stat().st_size == SIZE and sha256(down_dst) == down_sum
    assert dropped["c1"] > 0 and dropped["b1"] > 0, dropped  # the loss really happened
    assert "lbnat_loss" not in fbed.nft_tables("c1") + fbed.nft_tables("b1")  # cleaned up
    # the flows' last FINs may still be on their way (retransmitted after a loss): bounded
    ended = lbnat.out.wait_for(
        lambda lines: sum(" terminated " in x for x in lines) >= 2 or None, "both flows' ends", 30
    )
    assert ended and lbnat.out.count(" terminated ") == 2
    assert "Traceback" not in "\n".join(lbnat.err.snapshot())
