"""Scale-out with real lbnat instances (issue 20, docs/scale-out.md): each runs `lbnat run
<own address> ... --vip 198.18.100.1 --scheduler maglev` with the sync in mesh mode, and
ExaBGP with lbnat-bgp announcing the VIP to BIRD on the router, which spreads the flows over
the instances with ECMP (scripts/ecmp-lab.sh, lbnat_lab.ecmp).

     c1 198.18.2.11    c2 198.18.2.12       (chat clients, short connections, a download)
            |               |
  +---------+---- br1 ------+------ rt eth1 198.18.2.1 ----+
                                    rt (BIRD, AS 65000): ECMP route to 198.18.100.1
  +-- rt eth0 198.18.1.1 ---+------ br0 ------+------------+------ b1 b2 b3 -----+
                          lb1 .11          lb2 .12       lb3 .13      (chat :9000; b3 also
                each: lbnat --vip --sync-mode mesh + ExaBGP/lbnat-bgp     the download :9001)

What is checked on the data:
- 1,000 connections from many source ports spread over three instances, each a fair share,
  every one answered; the same client socket gets the same backend through any instance
  (maglev); then an instance's lbnat is SIGKILLed: its route leaves the router within the
  measured time, every new connection succeeds, and the only flows lost are its own;
- an instance added and another drained while a download and twelve chat sessions run: the
  router re-hashes flows between instances, the instance that gets a flow it does not own
  forwards it to its owner, and no flow breaks; the download arrives byte-identical;
- the same without the mesh sync (the measurement the forwarding answers): flows break.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lbnat_lab.ecmp import VIP, EcmpLab, checkout_lbnat_bgp, host_ip, missing_tools
from tests.integration.conftest import MB, Bed, Proc, console_script, random_file, require, sha256
from tests.integration.transfer import paced_source

pytestmark = pytest.mark.netns

INSTANCES = ("lb1", "lb2", "lb3")
VIP_PORT = 20000
CHAT = f"tcp:{VIP_PORT}"  # the command line's service
BULK_VIP = 20001
BULK_PORT = 9001
SIZE = 60 * MB
PACE = 0.4  # seconds between MBs: the download lasts about 25 s, across the add and the drain
FAST = ("--health-interval", "0.3", "--health-timeout", "1")
WITHDRAW_BOUND = 0.5 + 2.5  # lbnat-bgp's poll, with room for 2 busy cores


def hops(*instances: str) -> set[str]:
    return {host_ip(i) for i in instances}


class Fleet:
    """The lab's lbnat instances, their speakers, and what the tests ask of them."""

    def __init__(self, lab: EcmpLab, bed: Bed, tmp: Path) -> None:
        self.lab = lab
        self.bed = bed
        self.tmp = tmp
        self.lbnat: dict[str, Proc] = {}
        self.secret = tmp / "sync.secret"
        self.secret.write_text(os.urandom(32).hex())
        self.lbnat_cmd = console_script("lbnat")
        self.lbnat_bgp = checkout_lbnat_bgp(tmp)

    def socket(self, node: str) -> str:
        return str(self.tmp / f"{node}.sock")

    def bulk_config(self) -> Path:
        path = self.tmp / "bulk.json"
        if not path.exists():
            service = {
                "name": "bulk", "protocol": "tcp", "port": BULK_VIP, "scheduler": "maglev",
                "health": {"enabled": False},
                "backends": [{"ip": host_ip("b3"), "port": BULK_PORT}],
            }  # fmt: skip
            path.write_text(json.dumps({"services": [service]}))
        return path

    def start(self, node: str, mesh: bool = True) -> Proc:
        words: list[str] = []
        for b in ("b1", "b2", "b3"):
            words += [host_ip(b), "9000"]
        argv = [
            self.lbnat_cmd, "run", host_ip(node), *words, "--vip", VIP, "--port", str(VIP_PORT),
            "--scheduler", "maglev", "--interface", "eth0", "--workers", "1",
            "--config", str(self.bulk_config()), *FAST, "--admin-socket", self.socket(node),
        ]  # fmt: skip
        if mesh:
            argv += ["--sync-mode", "mesh", "--sync-listen", host_ip(node),
                     "--sync-secret-file", str(self.secret)]  # fmt: skip
            for peer in INSTANCES:
                if peer != node:
                    argv += ["--sync-peer", host_ip(peer)]
        proc = self.bed.start(node, *argv, name=f"{node} lbnat")
        line = proc.expect("srcIP : ")
        assert line == f"srcIP : {host_ip(node)}  VIP : {VIP}", line
        self.lbnat[node] = proc
        return proc

    def start_speaker(self, node: str) -> None:
        self.lab.start_exabgp(node, str(self.lbnat_bgp), self.socket(node))

    def status(self, node: str) -> dict[str, object]:
        done = self.lab.run(node, self.lbnat_cmd, "status", "--json", "--admin-socket",
                            self.socket(node))  # fmt: skip
        answer: dict[str, object] = json.loads(done.stdout)
        return answer

    def flows_opened(self, node: str) -> int:
        services = self.status(node)["services"]
        assert isinstance(services, list)
        return sum(int(b["flows"]) for s in services for b in s["backends"])

    def clients(self, node: str) -> set[str]:
        """The client sockets of the established chat rows `node` holds (its chat sessions,
        not the short connections' rows in TIME_WAIT)."""
        done = self.lab.run(node, self.lbnat_cmd, "sessions", "--json", "--admin-socket",
                            self.socket(node))  # fmt: skip
        rows = json.loads(done.stdout)
        return {r["client"] for r in rows if r["service"] == CHAT and r["state"] == "ESTABLISHED"}

    def wait_routes(self, what: str, expected: set[str], since: float, bound: float) -> float:
        return self.lab.measure_routes(what, expected, since, bound)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    if (reason := missing_tools()) is not None:
        pytest.skip(reason)
    require("socat")
    with EcmpLab(workdir=tmp_path) as lab:
        bed = Bed(lab, tmp_path)
        the_fleet = Fleet(lab, bed, tmp_path)
        try:
            yield the_fleet
        finally:
            for node in list(lab.exabgp):
                lab.stop_exabgp(node)
            bed.close()
            print(lab.logs())
            print("measured: " + ", ".join(f"{k} {v:.2f} s" for k, v in lab.measured.items()))


def start_fleet(fleet: Fleet, nodes: tuple[str, ...], mesh: bool = True) -> None:
    for b in ("b1", "b2", "b3"):
        fleet.bed.chat_server(b)
    fleet.lab.start_bird()
    for node in nodes:
        fleet.start(node, mesh)
    start = time.monotonic()
    for node in nodes:
        fleet.start_speaker(node)
    fleet.wait_routes(f"announced by {len(nodes)} instances", hops(*nodes), start, 20.0)


def connect(fleet: Fleet, client: str, count: int) -> dict[str, int]:
    """`count` short connections from `client` to the chat service: where they landed."""
    done = fleet.lab.run(client, sys.executable, "-m", "lbnat_lab.ecmp", "connect", VIP,
                         str(VIP_PORT), str(count), check=False, timeout=300)  # fmt: skip
    landed = dict.fromkeys(("b1", "b2", "b3", "failed"), 0)
    words = done.stdout.split()
    for name, n in zip(words[::2], words[1::2], strict=True):
        landed[name] = int(n)
    return landed


def test_connections_spread_over_the_instances_and_a_killed_one_loses_only_its_flows(
    fleet: Fleet,
) -> None:
    start_fleet(fleet, INSTANCES)
    chats = {f"k{i}": fleet.bed.chat_client("c1" if i % 2 else "c2", f"k{i}", VIP)[0]
             for i in range(9)}  # fmt: skip
    before = {node: fleet.flows_opened(node) for node in INSTANCES}
    landed = {client: connect(fleet, client, 500) for client in ("c1", "c2")}
    shares = {node: fleet.flows_opened(node) - before[node] for node in INSTANCES}
    print(f"1,000 connections: per instance {shares}, per backend {landed}")
    assert all(each["failed"] == 0 for each in landed.values()), landed
    assert sum(shares.values()) == 1000, shares
    assert all(share >= 200 for share in shares.values()), shares  # a fair third is 333

    # lb3's lbnat dies: its speaker finds no lbnat and withdraws; its own chat flows are lost
    # (their rows died with it), every other flow and every new connection goes on
    own = {node: fleet.clients(node) for node in INSTANCES}
    lost = len(own["lb3"])
    killed = time.monotonic()
    os.kill(fleet.lbnat["lb3"].pid, signal.SIGKILL)
    fleet.lbnat["lb3"].wait()
    fleet.lab.run("lb3", "tc", "qdisc", "del", "dev", "eth0", "clsact", check=False)
    fleet.wait_routes("an instance's lbnat killed: its route withdrawn", hops("lb1", "lb2"),
                      killed, WITHDRAW_BOUND)  # fmt: skip
    after = {client: connect(fleet, client, 100) for client in ("c1", "c2")}
    assert all(each["failed"] == 0 for each in after.values()), after
    broken = chat_round(chats, "after the kill", timeout=5.0)
    print(f"chat sessions: {len(chats)}, lb3 held {lost}, broken {len(broken)}")
    assert len(broken) == lost, (broken, own)


def chat_round(chats: dict[str, Proc], word: str, timeout: float = 20.0) -> set[str]:
    """Each session says a line; the names of those whose line did not come back."""
    for name, client in chats.items():
        with contextlib.suppress(OSError):
            client.send_line(f"{word} {name}")
    broken = set()
    deadline = time.monotonic() + timeout
    for name, client in chats.items():
        try:
            client.expect(f"{word} {name}", timeout=max(0.5, deadline - time.monotonic()))
        except (TimeoutError, EOFError):
            broken.add(name)
    return broken


@pytest.mark.parametrize("mesh", [True, False], ids=["mesh", "no-sync"])
def test_adding_and_draining_an_instance_breaks_no_flow(fleet: Fleet, scratch: Path,
                                                        mesh: bool) -> None:  # fmt: skip
    start_fleet(fleet, ("lb1", "lb2"), mesh)
    data, received = scratch / "data.bin", scratch / "received.bin"
    digest = random_file(data, SIZE)
    paced_source(fleet.bed, "b3", BULK_PORT, data, PACE)
    sink = fleet.bed.start("c1", "socat", "-u", f"TCP:{VIP}:{BULK_VIP}", f"CREATE:{received}",
                           name="sink")  # fmt: skip
    chats = {f"k{i}": fleet.bed.chat_client("c1" if i % 2 else "c2", f"k{i}", VIP)[0]
             for i in range(12)}  # fmt: skip
    assert chat_round(chats, "before") == set()
    broken: set[str] = set()

    added = time.monotonic()
    fleet.start("lb3", mesh)
    fleet.start_speaker("lb3")
    fleet.wait_routes("an instance added: in the route", hops(*INSTANCES), added, 20.0)
    broken |= chat_round(chats, "after the add", timeout=20.0 if mesh else 5.0)

    drained = time.monotonic()
    fleet.lab.run("lb2", fleet.lbnat_cmd, "drain-node", "--admin-socket", fleet.socket("lb2"))
    fleet.wait_routes("an instance drained: out of the route", hops("lb1", "lb3"), drained,
                      WITHDRAW_BOUND)  # fmt: skip
    broken |= chat_round(chats, "after the drain", timeout=20.0 if mesh else 5.0)
    try:  # an intact download ends about SIZE * PACE after its start; a broken one hangs
        download_ok = sink.wait(SIZE // MB * PACE + 60) == 0 and sha256(received) == digest
    except AssertionError:  # Proc.wait: still running
        download_ok = False
    lb2 = fleet.lbnat["lb2"]
    print(f"{'mesh' if mesh else 'no sync'}: {len(broken)} of {len(chats)} chat sessions "
          f"broke, the download {'arrived intact' if download_ok else 'broke'}")  # fmt: skip
    if not mesh:
        # the measurement the forwarding answers: flows moved to an instance without their row
        assert broken or not download_ok
        return
    assert broken == set()
    assert download_ok
    # the drained instance stops once its last flow has ended
    assert lb2.popen.poll() is None, "lb2 stopped while its flows were open"
    for client in chats.values():
        fleet.bed.stop(client)
    assert lb2.wait(60) == 0, lb2.err.tail()
    assert any("node drained: its last flow has ended" in line for line in lb2.out.snapshot())
