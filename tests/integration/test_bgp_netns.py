"""The BGP side of scale-out (issue 20, docs/scale-out.md) in the ECMP lab
(scripts/ecmp-lab.sh, lbnat_lab.ecmp): BIRD on the router, ExaBGP on every instance running
lbnat-bgp (this checkout's) against a stand-in admin socket that answers bgp_status as a file
says (tests/integration/bgp_status_stub.py: no data plane is needed to test the routing).

     c1 198.18.2.11    c2 198.18.2.12
            |               |
  +---------+---- br1 ------+------ rt eth1 198.18.2.1 ----+
                                    rt (BIRD, AS 65000): ECMP route to 198.18.100.1
  +-- rt eth0 198.18.1.1 ---+------ br0 ------+------------+------ b1 b2 b3 -----+
                          lb1 .11          lb2 .12       lb3 .13      (lb4 .14, added)
                    each: ExaBGP (AS 65001) + lbnat-bgp + the stub; VIP 198.18.100.1/32 on lo

What the router's route to the VIP does, measured (printed; asserted within bounds that leave
room for 2 busy cores):
- learned from 3 instances: 3 next hops;
- lbnat says no (draining): that instance leaves the route within lbnat-bgp's 0.5 s poll plus
  an UPDATE; it says yes again: back;
- lbnat cannot be asked (its socket gone; a hung lbnat that never answers): withdrawn;
- the speaker killed (SIGKILL to ExaBGP and lbnat-bgp, by pid): the kernel closes the TCP
  session, the router drops the routes at once; restarted: back;
- the instance's BGP blackholed (nftables drops TCP 179 both ways: a hung machine): the
  router's hold timer (3 s) expires; the drop lifted: back;
- an instance added to the lab (and its speaker started) joins the route; removed, it leaves;
- with two real lbnats (`--vip`) instead of the stand-in: the route over both, a chat session
  through it; every backend dead: both say no and the route goes; alive: back; SIGTERM to one
  lbnat: its next hop withdrawn while it still runs (it says no, then stops 2 s later).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lbnat_lab.ecmp import VIP, EcmpLab, checkout_lbnat_bgp, host_ip, missing_tools
from tests.integration.conftest import (
    BACKEND_PORT,
    VIP_PORT,
    Bed,
    Proc,
    console_script,
)

pytestmark = pytest.mark.netns

POLL = 0.5  # lbnat-bgp's default --interval
HOLD = 3.0  # the router's and ExaBGP's hold time
SLACK = 2.5  # polling, process start-up and scheduling on 2 busy cores


def hops(*instances: str) -> set[str]:
    return {host_ip(i) for i in instances}


class Bgp:
    """The lab, a stub lbnat per instance (its state file), and the speakers."""

    def __init__(self, lab: EcmpLab, tmp: Path) -> None:
        self.lab = lab
        self.tmp = tmp
        self.stubs: dict[str, subprocess.Popen[bytes]] = {}
        self.lbnat_bgp = checkout_lbnat_bgp(tmp)

    def socket(self, instance: str) -> str:
        return str(self.tmp / f"{instance}.sock")

    def say(self, instance: str, state: str) -> None:
        """What instance's stub lbnat answers from now on: yes, no or hang."""
        path = self.tmp / f"{instance}.state"
        path.with_suffix(".tmp").write_text(state)
        path.with_suffix(".tmp").rename(path)

    def start_stub(self, instance: str, state: str = "yes") -> None:
        self.say(instance, state)
        proc = self.lab.popen(
            instance, sys.executable, "-m", "tests.integration.bgp_status_stub",
            self.socket(instance), str(self.tmp / f"{instance}.state"),
        )  # fmt: skip
        self.stubs[instance] = proc
        deadline = time.monotonic() + 10
        while not Path(self.socket(instance)).exists():
            assert proc.poll() is None, f"the stub on {instance} exited"
            assert time.monotonic() < deadline, f"the stub on {instance} never listened"
            time.sleep(0.02)

    def stop_stub(self, instance: str) -> None:
        self.lab.stop(self.stubs.pop(instance))
        Path(self.socket(instance)).unlink(missing_ok=True)

    def start_speaker(self, instance: str, admin_socket: str | None = None) -> None:
        self.lab.start_exabgp(instance, str(self.lbnat_bgp), admin_socket or self.socket(instance))

    def measure(self, what: str, expected: set[str], since: float, bound: float) -> float:
        return self.lab.measure_routes(what, expected, since, bound)

    def logs(self) -> str:
        return self.lab.logs()


@pytest.fixture
def bgp(tmp_path: Path) -> Iterator[Bgp]:
    if (reason := missing_tools()) is not None:
        pytest.skip(reason)
    with EcmpLab(workdir=tmp_path) as lab:
        the_bgp = Bgp(lab, tmp_path)
        try:
            yield the_bgp
        finally:
            print(lab.logs())
            print("measured: " + ", ".join(f"{k} {v:.2f} s" for k, v in lab.measured.items()))


def start_all(bgp: Bgp, instances: tuple[str, ...] = ("lb1", "lb2", "lb3")) -> None:
    bgp.lab.start_bird()
    for instance in instances:
        bgp.start_stub(instance)
        bgp.start_speaker(instance)
    start = time.monotonic()
    bgp.measure("learned from 3 instances", hops(*instances), start, 20.0)


def test_the_router_s_ecmp_route_follows_each_instance_s_health_and_failures(bgp: Bgp) -> None:
    lab = bgp.lab
    start_all(bgp)
    shown = lab.run("rt", "ip", "route", "show", VIP).stdout
    assert shown.count("nexthop via") == 3 and "proto bird" in shown, shown

    # lbnat says no (draining the node), then yes again
    t = time.monotonic()
    bgp.say("lb2", "no")
    bgp.measure("withdrawn: lbnat says no", hops("lb1", "lb3"), t, POLL + SLACK)
    t = time.monotonic()
    bgp.say("lb2", "yes")
    bgp.measure("announced again: lbnat says yes", hops("lb1", "lb2", "lb3"), t, POLL + SLACK)
    assert "withdraw 198.18.100.1/32: draining the node" in lab.exabgp_log("lb2")

    # lbnat gone (its socket with it), then back
    t = time.monotonic()
    bgp.stop_stub("lb2")
    bgp.measure("withdrawn: lbnat gone", hops("lb1", "lb3"), t, POLL + SLACK)
    assert "is lbnat running?" in lab.exabgp_log("lb2")
    bgp.start_stub("lb2")
    bgp.measure("announced again: lbnat back", hops("lb1", "lb2", "lb3"), time.monotonic(), 5)

    # a hung lbnat: lbnat-bgp's ask times out (1 s)
    t = time.monotonic()
    bgp.say("lb2", "hang")
    bgp.measure("withdrawn: lbnat hung", hops("lb1", "lb3"), t, POLL + 1.0 + SLACK)
    assert "did not answer within 1 s" in lab.exabgp_log("lb2")
    bgp.say("lb2", "yes")
    bgp.measure("announced again: lbnat answers", hops("lb1", "lb2", "lb3"), time.monotonic(), 5)

    # the speaker crashes: SIGKILL to ExaBGP and lbnat-bgp; the kernel closes the session
    t = time.monotonic()
    killed = lab.kill_speaker("lb3")
    assert len(killed) == 2, killed  # ExaBGP and its process, lbnat-bgp
    bgp.measure("withdrawn: speaker killed", hops("lb1", "lb2"), t, SLACK)
    t = time.monotonic()
    bgp.start_speaker("lb3")
    # BIRD takes a failed session back after its error wait (1 s, doubling while it fails)
    bgp.measure("announced again: speaker restarted", hops("lb1", "lb2", "lb3"), t, 10.0)

    # a hung machine: its BGP dropped both ways; the router's hold timer expires
    t = time.monotonic()
    lab.blackhole("lb1")
    took = bgp.measure("withdrawn: BGP blackholed", hops("lb2", "lb3"), t, HOLD + SLACK)
    assert took > HOLD - 1.0 - 0.3, took  # the last keepalive came at most 1 s before the drop
    assert "lb1: Error: Hold timer expired" in (bgp.tmp / "bird.log").read_text()
    t = time.monotonic()
    lab.unblackhole("lb1")
    bgp.measure("announced again: blackhole lifted", hops("lb1", "lb2", "lb3"), t, 20.0)


def test_an_instance_added_joins_the_route_and_leaves_it_when_removed(bgp: Bgp) -> None:
    lab = bgp.lab
    start_all(bgp)
    lab.add_instance(4)
    bgp.start_stub("lb4")
    t = time.monotonic()
    bgp.start_speaker("lb4")
    bgp.measure("joined: instance added", hops("lb1", "lb2", "lb3", "lb4"), t, 10.0)
    # removed: the script kills what runs there by pid (SIGTERM: ExaBGP closes its session
    # with a NOTIFICATION) and deletes the namespace
    bgp.stubs.pop("lb4")
    t = time.monotonic()
    lab.remove_instance(4)
    bgp.measure("left: instance removed", hops("lb1", "lb2", "lb3"), t, SLACK)
    assert not Path(f"/run/netns/{lab.prefix}-lb4").exists()


# -- with lbnat itself -------------------------------------------------------------------------


def test_lbnat_s_own_answer_moves_the_route(bgp: Bgp) -> None:
    """Two real lbnats (--vip) on lb1 and lb2: the router learns the VIP from both and a chat
    session goes through it; every backend dead makes both say no (the route goes), alive
    again yes; SIGTERM to lb2's lbnat withdraws its next hop before lbnat has stopped."""
    lab = bgp.lab
    bed = Bed(lab, bgp.tmp)
    try:
        servers = {b: bed.chat_server(b) for b in ("b1", "b2", "b3")}
        lbnats = {node: start_lbnat(bed, node) for node in ("lb1", "lb2")}
        lab.start_bird()
        for node in lbnats:
            bgp.start_speaker(node, admin_socket=lbnat_socket(bed, node))
        bgp.measure("learned from 2 lbnats", hops("lb1", "lb2"), time.monotonic(), 20.0)
        client, server = bed.chat_client("c1", "alice", ip=VIP)
        assert server in servers
        client.send_line("hello")
        client.expect("[alice] hello")

        t = time.monotonic()
        for proc in servers.values():
            bed.stop(proc)
        # dead after 3 failed probes of 0.3 s, then a poll
        bgp.measure("withdrawn: every backend dead", set(), t, 3 * 0.3 + 0.5 + POLL + SLACK)
        t = time.monotonic()
        servers = {b: bed.chat_server(b) for b in ("b1", "b2", "b3")}
        bgp.measure("announced again: backends alive", hops("lb1", "lb2"), t, 0.3 + POLL + SLACK)

        t = time.monotonic()
        lbnats["lb2"].signal(signal.SIGTERM)
        bgp.measure("withdrawn: lbnat stopping (SIGTERM)", hops("lb1"), t, POLL + SLACK)
        assert lbnats["lb2"].popen.poll() is None, "lb2's lbnat stopped before its withdraw"
        assert lbnats["lb2"].wait(15.0) == 0
        assert "withdraw 198.18.100.1/32" in lab.exabgp_log("lb2")
    finally:
        bed.close()


def lbnat_socket(bed: Bed, node: str) -> str:
    return str(bed.tmp / f"{node}-lbnat.sock")


def start_lbnat(bed: Bed, node: str) -> Proc:
    """`lbnat run <node's address> b1..b3 --vip VIP` on `node`, its first health reports seen."""
    words: list[str] = []
    for b in ("b1", "b2", "b3"):
        words += [host_ip(b), str(BACKEND_PORT)]
    proc = bed.start(
        node, console_script("lbnat"), "run", host_ip(node), *words, "--vip", VIP,
        "--port", str(VIP_PORT), "--interface", "eth0", "--workers", "1",
        "--scheduler", "maglev", "--health-interval", "0.3", "--health-timeout", "0.5",
        "--admin-socket", lbnat_socket(bed, node), name=f"{node} lbnat",
    )  # fmt: skip
    proc.expect("Server is alive", timeout=20.0)
    return proc
