"""Transfers the netns and fault cases share: random files moved with socat through lbnat's
VIP, and their sha256 (a transfer "arrives" when the digests match)."""

from __future__ import annotations

from pathlib import Path

from lbnat_lab.netns import LB_IP
from tests.integration.conftest import BACKEND_PORT, MB, VIP_PORT, Bed, Proc

TRANSFER_TIMEOUT = 300.0  # bound of one transfer under loss (pure-Python LB, 2 busy cores)


def sent_from(src: Path, paced: bool) -> str:
    """The sending socat's address: the file at full speed, or paced: its first MB, a pause,
    then the rest, so that the flow is established well past lbnat.fastpath.OFFLOAD_AFTER and
    the rest rides the kernel (a file sent at full speed may be over before the engine's next
    tick hands the row to the kernel)."""
    if not paced:
        return f"OPEN:{src}"
    return f"SYSTEM:head -c {MB} {src}; sleep 0.5; tail -c +{MB + 1} {src}"


def upload(
    bed: Bed, client: str, backend: str, src: Path, dst: Path, paced: bool = False
) -> None:
    """`src` from `client` through the VIP into `dst` on `backend` (socat, one connection)."""
    sink = bed.start(
        backend, "socat", "-u", f"TCP-LISTEN:{BACKEND_PORT},reuseaddr", f"CREATE:{dst}",
        name=f"socat sink {backend}",
    )  # fmt: skip
    bed.lab.wait_tcp_listening(backend, BACKEND_PORT)
    bed.lab.run(
        client, "socat", "-u", sent_from(src, paced), f"TCP:{LB_IP}:{VIP_PORT}",
        timeout=TRANSFER_TIMEOUT,
    )  # fmt: skip
    assert sink.wait(TRANSFER_TIMEOUT) == 0, sink.err.tail()


def download(
    bed: Bed, client: str, backend: str, src: Path, dst: Path, paced: bool = False
) -> None:
    """`src` from `backend` through the VIP into `dst` on `client` (socat, one connection)."""
    source = bed.start(
        backend, "socat", "-u", sent_from(src, paced), f"TCP-LISTEN:{BACKEND_PORT},reuseaddr",
        name=f"socat source {backend}",
    )  # fmt: skip
    bed.lab.wait_tcp_listening(backend, BACKEND_PORT)
    bed.lab.run(
        client, "socat", "-u", f"TCP:{LB_IP}:{VIP_PORT}", f"CREATE:{dst}",
        timeout=TRANSFER_TIMEOUT,
    )  # fmt: skip
    assert source.wait(TRANSFER_TIMEOUT) == 0, source.err.tail()


def paced_source(bed: Bed, host: str, port: int, data: Path, pace: float) -> Proc:
    """socat on `host`:`port` serving `data` (a whole number of MB) to one connection, one MB
    every `pace` seconds: a transfer in flight across whatever the test does meanwhile."""
    size = data.stat().st_size
    pacer = (
        f"for i in $(seq 0 {size // MB - 1}); do dd if={data} bs={MB} skip=$i count=1 "
        f"status=none; sleep {pace}; done"
    )
    source = bed.start(
        host, "socat", "-u", f"SYSTEM:{pacer}", f"TCP-LISTEN:{port},reuseaddr",
        name="paced source",
    )  # fmt: skip
    bed.lab.wait_tcp_listening(host, port)
    return source
