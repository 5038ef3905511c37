"""Transfers the fault cases share: random files moved with socat through lbnat's VIP, and
their sha256 (a transfer "arrives" when the digests match)."""

from __future__ import annotations

from pathlib import Path

from lbnat_lab.netns import LB_IP
from tests.integration.conftest import BACKEND_PORT, VIP_PORT, Bed

TRANSFER_TIMEOUT = 300.0  # bound of one transfer under loss (pure-Python LB, 2 busy cores)


def upload(bed: Bed, client: str, backend: str, src: Path, dst: Path) -> None:
    """`src` from `client` through the VIP into `dst` on `backend` (socat, one connection)."""
    sink = bed.start(
        backend, "socat", "-u", f"TCP-LISTEN:{BACKEND_PORT},reuseaddr", f"CREATE:{dst}",
        name=f"socat sink {backend}",
    )  # fmt: skip
    bed.lab.wait_tcp_listening(backend, BACKEND_PORT)
    bed.lab.run(
        client, "socat", "-u", f"OPEN:{src}", f"TCP:{LB_IP}:{VIP_PORT}", timeout=TRANSFER_TIMEOUT
    )
    assert sink.wait(TRANSFER_TIMEOUT) == 0, sink.err.tail()


def download(bed: Bed, client: str, backend: str, src: Path, dst: Path) -> None:
    """`src` from `backend` through the VIP into `dst` on `client` (socat, one connection)."""
    source = bed.start(
        backend, "socat", "-u", f"OPEN:{src}", f"TCP-LISTEN:{BACKEND_PORT},reuseaddr",
        name=f"socat source {backend}",
    )  # fmt: skip
    bed.lab.wait_tcp_listening(backend, BACKEND_PORT)
    bed.lab.run(
        client, "socat", "-u", f"TCP:{LB_IP}:{VIP_PORT}", f"CREATE:{dst}",
        timeout=TRANSFER_TIMEOUT,
    )  # fmt: skip
    assert source.wait(TRANSFER_TIMEOUT) == 0, source.err.tail()
