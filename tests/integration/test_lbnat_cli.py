"""lbnat's command line in a namespace: bad input ends in exit code 2 with one line on stderr
and nothing left behind; SIGTERM and SIGINT end it cleanly and undo what it did to the host."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from lbnat_lab.netns import LB_IP, host_ip
from tests.integration.conftest import (
    BACKEND_PORT,
    LBNAT_TABLE,
    NAT_PORTS,
    RESERVED_PORTS,
    VIP_PORT,
    Bed,
    console_script,
    require,
    variant_id,
)

pytestmark = pytest.mark.netns

B1 = host_ip("b1")
B2 = host_ip("b2")
ROOT_RESERVED = Path(RESERVED_PORTS)  # read from the test process: the root namespace


def run_lbnat(bed: Bed, *args: str) -> subprocess.CompletedProcess[str]:
    """`lbnat run ARGS` in the lb namespace, to completion (bounded), whatever its exit code."""
    return bed.lab.run("lb", console_script("lbnat"), "run", *args, check=False)


def assert_refused(bed: Bed, result: subprocess.CompletedProcess[str], *words: str) -> str:
    """Exit code 2, exactly one line on stderr (naming `words`), no start, nothing left."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("lbnat: "), lines
    for word in words:
        assert word in lines[0], lines
    assert "srcIP" not in result.stdout
    assert LBNAT_TABLE not in bed.nft_tables()
    return lines[0]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        pytest.param((f"{LB_IP[:-1]}99", B1, "9000"), ("198.18.0.99",), id="srcip-on-no-interface"),
        pytest.param((LB_IP, B1, "9000", B2), ("odd number",), id="odd-ip-port-words"),
        pytest.param((LB_IP, B1, "9000", "--port", "70000"), ("70000", "range"), id="vip-70000"),
        pytest.param((LB_IP, B1, "0"), ("0", "range"), id="backend-port-0"),
        pytest.param((LB_IP, B1, "65536"), ("65536", "range"), id="backend-port-65536"),
        pytest.param((LB_IP, "198.18.0.300", "9000"), ("198.18.0.300",), id="bad-backend-ip"),
    ],
)
def test_bad_command_lines_exit_2(bed: Bed, args: tuple[str, ...], words: tuple[str, ...]) -> None:
    before = bed.read_file("lb", RESERVED_PORTS)
    assert_refused(bed, run_lbnat(bed, *args), *words)
    assert bed.read_file("lb", RESERVED_PORTS) == before


def test_vip_port_used_by_another_program(bed: Bed) -> None:
    require("socat")
    squatter = bed.start(
        "lb", "socat", "-u", f"TCP-LISTEN:{VIP_PORT},bind={LB_IP},reuseaddr", "OPEN:/dev/null",
        name="socat on the VIP port",
    )  # fmt: skip
    bed.lab.wait_tcp_listening("lb", VIP_PORT)
    before = bed.read_file("lb", RESERVED_PORTS)
    assert_refused(bed, run_lbnat(bed, LB_IP, B1, "9000"), str(VIP_PORT), "already used")
    assert bed.read_file("lb", RESERVED_PORTS) == before
    assert squatter.popen.poll() is None  # lbnat left the other program alone


NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")


def as_nobody(bed: Bed, caps: tuple[str, ...] = ()) -> tuple[str, ...]:
    """setpriv arguments running a command as user nobody holding only `caps` (ambient, so
    that lbnat's nft child and its workers hold them too). Python may sit where nobody cannot
    read it (under /root, as with pyenv): then nobody also gets CAP_DAC_READ_SEARCH (read any
    file), which is still no root. Skips if nobody cannot run lbnat at all."""
    require("setpriv")
    lbnat = console_script("lbnat")
    for extra in ((), ("dac_read_search",)):
        names = ",".join("+" + c for c in (*caps, *extra))
        prefix = (*NOBODY, f"--inh-caps={names}", f"--ambient-caps={names}") if names else NOBODY
        probe = bed.lab.run("lb", *prefix, lbnat, "--help", check=False)
        if probe.returncode == 0:
            return prefix
    pytest.skip(f"user nobody cannot run lbnat here: {probe.stderr.strip()[-300:]}")


def test_not_root_exit_2(bed: Bed) -> None:
    """As user nobody without capabilities: refused with a message naming what is missing."""
    result = bed.lab.run("lb", *as_nobody(bed), console_script("lbnat"), "run", LB_IP, B1, "9000",
                         check=False)  # fmt: skip
    assert_refused(bed, result, "lacks CAP_NET_RAW, CAP_NET_ADMIN")


def test_nobody_with_net_raw_and_net_admin_balances(bed: Bed) -> None:
    """Root is not needed, two capabilities are: user nobody holding CAP_NET_RAW and
    CAP_NET_ADMIN starts lbnat, installs its guard, reserves its NAT ports, carries a chat
    flow, and undoes it all on SIGTERM (the systemd unit's setup, minus uid 0)."""
    require("nft")
    for b in ("b1", "b2"):
        bed.chat_server(b)
    before = bed.read_file("lb", RESERVED_PORTS)
    sockets = Path(tempfile.mkdtemp(prefix="lbnat-nobody-"))  # /tmp: nobody can reach it
    try:
        os.chown(sockets, 65534, 65534)
        # the kernel fast path (LBNAT_OFFLOAD=tc in this variant) needs CAP_BPF too
        caps = ("net_raw", "net_admin", *(("bpf",) if offload_asked() == "tc" else ()))
        argv = [
            *as_nobody(bed, caps), console_script("lbnat"), "run",
            LB_IP, B1, str(BACKEND_PORT), B2, str(BACKEND_PORT),
            "--admin-socket", str(sockets / "admin.sock"),
        ]  # fmt: skip
        lb = bed.start("lb", *argv, name="lbnat as nobody")
        bed.wait_ready(lb, ("b1", "b2"))
        assert os.stat(f"/proc/{lb.pid}").st_uid == 65534
        assert LBNAT_TABLE in bed.nft_tables()
        assert f"{NAT_PORTS[0]}-{NAT_PORTS[1]}" in bed.read_file("lb", RESERVED_PORTS)
        alice, server = bed.chat_client("c1", "alice")
        assert server == "b1"
        alice.send_line("hello through nobody")
        alice.expect("[alice] hello through nobody")
        assert bed.stop(lb) == 0
        assert LBNAT_TABLE not in bed.nft_tables()
        assert bed.read_file("lb", RESERVED_PORTS) == before
    finally:
        shutil.rmtree(sockets, ignore_errors=True)


def offload_asked() -> str:
    return os.environ.get("LBNAT_OFFLOAD", "auto")


@pytest.mark.parametrize("bed", [(1, "tc")], indirect=True, ids=variant_id)
def test_nobody_without_cap_bpf_runs_the_python_path_and_says_so(bed: Bed) -> None:
    """--offload auto as nobody with CAP_NET_RAW and CAP_NET_ADMIN only: the program cannot
    be loaded, lbnat says why in its data-plane line and balances on the Python path; --offload
    tc refuses to start, naming what is missing."""
    bed.chat_server("b1")
    sockets = Path(tempfile.mkdtemp(prefix="lbnat-nobody-"))
    try:
        os.chown(sockets, 65534, 65534)
        nobody = as_nobody(bed, ("net_raw", "net_admin"))
        base = [console_script("lbnat"), "run", LB_IP, B1, str(BACKEND_PORT),
                "--admin-socket", str(sockets / "admin.sock")]  # fmt: skip
        refused = bed.lab.run("lb", *nobody, *base, "--offload", "tc", check=False)
        assert refused.returncode != 0
        assert "--offload tc: " in refused.stderr and "CAP_BPF" in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr
        lb = bed.start("lb", *nobody, *base, "--offload", "auto", name="lbnat as nobody")
        bed.wait_ready(lb, ("b1",))
        line = lb.expect("data plane : ")
        assert "no offload (" in line and "CAP_BPF" in line, line
        alice, server = bed.chat_client("c1", "alice")
        assert server == "b1"
        alice.send_line("hello on the python path")
        alice.expect("[alice] hello on the python path")
        assert bed.stop(lb) == 0
    finally:
        shutil.rmtree(sockets, ignore_errors=True)


@pytest.mark.parametrize(
    ("signum", "seed"),
    [
        pytest.param(signal.SIGTERM, "40000-40010", id="SIGTERM-reserved-ports-set"),
        pytest.param(signal.SIGINT, "", id="SIGINT-reserved-ports-empty"),
    ],
)
def test_signal_stops_cleanly(bed: Bed, signum: signal.Signals, seed: str) -> None:
    """Exit 0, "lbnat stopped", its nft table gone, ip_local_reserved_ports as it was (set to
    `seed` first, in the lab's namespace: the sysctl is per network namespace)."""
    root_before = ROOT_RESERVED.read_text().strip()
    if seed:
        bed.lab.run("lb", "sysctl", "-qw", f"net.ipv4.ip_local_reserved_ports={seed}")
        if ROOT_RESERVED.read_text().strip() != root_before:  # not per namespace: put it back
            ROOT_RESERVED.write_text(root_before + "\n")
            pytest.fail("ip_local_reserved_ports is not per network namespace on this kernel")
    assert bed.read_file("lb", RESERVED_PORTS) == seed

    bed.chat_server("b1")
    lbnat = bed.lbnat("--health-interval", "0.5", backends=("b1",))
    assert LBNAT_TABLE in bed.nft_tables()
    nat_range = f"{NAT_PORTS[0]}-{NAT_PORTS[1]}"
    reserved = bed.read_file("lb", RESERVED_PORTS)
    assert reserved == (f"{seed},{nat_range}" if seed else nat_range), reserved
    assert ROOT_RESERVED.read_text().strip() == root_before
    _, server = bed.chat_client("c1", "alice")  # a flow still open at the signal
    assert server == "b1"

    lbnat.signal(signum)
    assert lbnat.wait() == 0
    assert lbnat.out.snapshot()[-1] == "lbnat stopped"
    assert lbnat.err.snapshot() == []
    assert LBNAT_TABLE not in bed.nft_tables()
    assert bed.read_file("lb", RESERVED_PORTS) == seed
    assert ROOT_RESERVED.read_text().strip() == root_before


@pytest.mark.netns
def test_restart_after_a_crash_restores_the_hosts_reservations(bed: Bed) -> None:
    """SIGKILL leaves the nft table and the reserved NAT range behind; the next lbnat replaces
    the table and, at its clean exit, restores the host's own reservations, not the crashed
    run's."""
    bed.lab.run("lb", "sysctl", "-qw", "net.ipv4.ip_local_reserved_ports=8080")
    bed.chat_server("b1")
    crashed = bed.lbnat("--no-health", backends=("b1",))
    crashed.signal(signal.SIGKILL)
    crashed.wait()
    assert LBNAT_TABLE in bed.nft_tables()  # the crash left its table ...
    assert bed.read_file("lb", RESERVED_PORTS) == "8080,61000-65535"  # ... and its reservation

    again = bed.lbnat("--no-health", backends=("b1",))
    _, server = bed.chat_client("c1", "alice")  # the replaced table works: flows go through
    assert server == "b1"
    again.signal(signal.SIGTERM)
    assert again.wait() == 0
    assert LBNAT_TABLE not in bed.nft_tables()
    assert bed.read_file("lb", RESERVED_PORTS) == "8080"
