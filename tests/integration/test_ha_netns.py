"""An active/backup pair in network namespaces (issue 19, docs/ha.md): two lbnats with the
session sync, keepalived (real VRRP, scripts/keepalived/) on both, three backends, clients
holding chat sessions and a 200 MB download. The master fails (SIGKILL of its lbnat and
keepalived, or its link taken down); the backup takes the VIP within three adverts, and every
established flow carries on, the download arriving byte-identical; new connections succeed.
The old master comes back, resyncs, and a switchover back to it loses no flow either.

     c1 198.18.0.11    c2 198.18.0.12     lb1 198.18.0.3              lb2 198.18.0.4
          |                 |               lbnat + keepalived          lbnat + keepalived
          |                 |               (+ VIP 198.18.0.2 on the master) |
  +-------c1----------------c2-------------lb1----- sync UDP 7001 ---------lb2------+
  |                                      br0                                         |
  +-------b1----------------b2--------------b3---------------------------------------+
     198.18.0.21       198.18.0.22      198.18.0.23   (chat :9000; b3 also the download :9001)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lbnat_lab.netns import LB_IP, REPO, Lab, host_ip, skip_reason
from tests.integration.conftest import (
    MB,
    Bed,
    Proc,
    console_script,
    random_file,
    require,
    sha256,
)
from tests.integration.transfer import TRANSFER_TIMEOUT, paced_source

pytestmark = pytest.mark.netns

NODES = ("lb1", "lb2")
PEER = {"lb1": "lb2", "lb2": "lb1"}
PRIORITY = {"lb1": 150, "lb2": 100}
BULK_VIP = 20001
BULK_PORT = 9001
SIZE = 200 * MB
PACE = 0.04  # seconds between MBs: the download lasts about 10 s, in flight across a failover
ADVERTS = 3  # keepalived takes over after 3 missed adverts of 1 s (plus skew under 1 s)
FAST = ("--health-interval", "0.3", "--health-timeout", "1")


@dataclasses.dataclass
class Node:
    name: str
    lbnat: Proc | None = None
    keepalived: Proc | None = None

    @property
    def ip(self) -> str:
        return host_ip(self.name)


class Pair:
    """The pair's processes on a lab of two LBs, and what the tests ask of them."""

    def __init__(self, bed: Bed) -> None:
        self.bed = bed
        self.lab = bed.lab
        self.nodes = {name: Node(name) for name in NODES}
        self.secret = bed.tmp / "sync.secret"
        self.secret.write_text(os.urandom(32).hex())
        self.lbnat_cmd = console_script("lbnat")
        # keepalived disables a script a user other than root could change (the file or a
        # directory above it): the notify script runs from a copy in a root-only directory
        self.scripts = bed.tmp / "scripts"
        self.scripts.mkdir(mode=0o700)
        self.notify = self.scripts / "lbnat-notify"
        shutil.copy(REPO / "scripts/keepalived/lbnat-notify", self.notify)
        self.notify.chmod(0o755)

    def socket(self, node: str) -> str:
        return str(self.bed.tmp / f"{node}.sock")

    def start_lbnat(self, node: str, *options: str) -> Proc:
        words: list[str] = []
        for b in ("b1", "b2", "b3"):
            words += [host_ip(b), "9000"]
        argv = [
            self.lbnat_cmd, "run", LB_IP, *words, "--port", "20000", "--interface", "eth0",
            "--config", str(self.bulk_config()), *FAST, *options,
            "--sync-listen", host_ip(node), "--sync-peer", host_ip(PEER[node]),
            "--sync-secret-file", str(self.secret), "--admin-socket", self.socket(node),
        ]  # fmt: skip
        proc = self.bed.start(node, *argv, name=f"{node} lbnat")
        self.bed.wait_ready(proc)
        self.nodes[node].lbnat = proc
        return proc

    def bulk_config(self) -> Path:
        path = self.bed.tmp / "bulk.json"
        if not path.exists():
            service = {
                "name": "bulk", "protocol": "tcp", "port": BULK_VIP,
                "health": {"enabled": False},
                "backends": [{"ip": host_ip("b3"), "port": BULK_PORT}],
            }  # fmt: skip
            path.write_text(json.dumps({"services": [service]}))
        return path

    def start_keepalived(self, node: str) -> Proc:
        conf = self.bed.tmp / f"{node}-keepalived.conf"
        made = self.lab.run(
            node, "bash", str(REPO / "scripts/keepalived/keepalived-conf.sh"),
            "--name", node, "--own", host_ip(node), "--peer", host_ip(PEER[node]),
            "--vip", LB_IP, "--priority", str(PRIORITY[node]), "--lbnat", self.lbnat_cmd,
            "--admin-socket", self.socket(node), "--notify", str(self.notify),
            "--notify-log", str(self.bed.tmp / f"{node}-notify.log"),
        )  # fmt: skip
        conf.write_text(made.stdout)
        keepalived = shutil.which("keepalived") or "/usr/sbin/keepalived"
        proc = self.bed.start(
            node, keepalived, "-n", "-l", "-D", "-G", "-P", "-f", str(conf),
            "-p", str(self.bed.tmp / f"{node}-keepalived.pid"),
            "-r", str(self.vrrp_pidfile(node)), name=f"{node} keepalived",
        )  # fmt: skip
        self.nodes[node].keepalived = proc
        return proc

    def vrrp_pidfile(self, node: str) -> Path:
        return self.bed.tmp / f"{node}-keepalived-vrrp.pid"

    def kill_node(self, node: str) -> None:
        """SIGKILL to lbnat and to keepalived, its parent and its VRRP child, by pid. The
        parent is stopped (SIGSTOP) first and killed last: killed first, its death would make
        the child stop cleanly (priority 0, the VIP removed: not a crash) before the child's
        own SIGKILL lands, and a running parent would respawn a killed child (demo-ha.sh's
        keepalived_kill does the same)."""
        n = self.nodes[node]
        pids = []
        parent = None if n.keepalived is None else n.keepalived.pid
        if parent is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(parent, signal.SIGSTOP)
            child = self.vrrp_pidfile(node).read_text().strip()
            if child.isdigit():
                pids.append(int(child))
        if n.lbnat is not None:
            pids.append(n.lbnat.pid)
        if parent is not None:
            pids.append(parent)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for proc in (n.keepalived, n.lbnat):
            if proc is not None:
                proc.wait()
        n.keepalived = n.lbnat = None

    def crash_leftovers(self, node: str) -> None:
        """What a crashed machine takes with it and killed processes leave: the VIP on its
        interface (a SIGKILLed keepalived removes nothing; a new one removes it at its start),
        and lbnat's tc program, a kernel object that would go on rewriting the offloaded flows'
        packets that still reach this node."""
        self.lab.run(node, "ip", "addr", "del", f"{LB_IP}/24", "dev", "eth0")
        self.lab.run(node, "tc", "qdisc", "del", "dev", "eth0", "clsact", check=False)

    def reap_vrrp_children(self) -> None:
        """A keepalived whose parent was SIGKILLed leaves its VRRP child: by pid, at the end."""
        for node in NODES:
            path = self.vrrp_pidfile(node)
            if path.exists() and (pid := path.read_text().strip()).isdigit():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)

    def vip_holder(self) -> set[str]:
        held = set()
        for node in NODES:
            shown = self.lab.run(node, "ip", "-4", "addr", "show", "dev", "eth0").stdout
            if f"inet {LB_IP}/" in shown:
                held.add(node)
        return held

    def wait_vip(self, node: str, timeout: float = 20.0) -> float:
        """Until the VIP is on `node` alone; when (time.monotonic())."""
        deadline = time.monotonic() + timeout
        while (held := self.vip_holder()) != {node}:
            assert time.monotonic() < deadline, f"the VIP is on {held or 'no node'}, not {node}"
            time.sleep(0.05)
        return time.monotonic()

    def ready(self, node: str) -> bool:
        done = self.lab.run(
            node, self.lbnat_cmd, "ha-check", "--admin-socket", self.socket(node), check=False
        )
        return done.returncode == 0

    def wait_ready(self, node: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready(node):
            assert time.monotonic() < deadline, f"{node}'s lbnat never became ready"
            time.sleep(0.2)

    def role(self, node: str) -> str:
        done = self.lab.run(
            node, self.lbnat_cmd, "status", "--json", "--admin-socket", self.socket(node)
        )
        return str(json.loads(done.stdout)["sync"]["role"])

    def wait_role(self, node: str, role: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while (now := self.role(node)) != role:
            assert time.monotonic() < deadline, f"{node} is {now}, not {role}"
            time.sleep(0.2)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    if (reason := skip_reason()) is not None:
        pytest.skip(reason)
    require("nft", "socat")
    if shutil.which("keepalived") is None and not Path("/usr/sbin/keepalived").exists():
        pytest.skip("needs keepalived (apt-get install keepalived)")
    # keepalived checks that no directory above a script is writable by others
    tmp_path.chmod(0o700)
    with Lab(lbs=2) as lab:
        bed = Bed(lab, tmp_path)
        the_pair = Pair(bed)
        try:
            yield the_pair
        finally:
            try:
                bed.close()
            finally:
                the_pair.reap_vrrp_children()


@dataclasses.dataclass
class Traffic:
    """Chat sessions and a download through the VIP, and the checks that they carried on."""

    pair: Pair
    chats: dict[str, Proc]
    sink: Proc
    source: Proc
    received: Path
    digest: str

    def chat_round(self, word: str) -> None:
        for name, client in self.chats.items():
            client.send_line(f"{word} {name}")
        for name, client in self.chats.items():
            client.expect(f"{word} {name}", timeout=30.0)

    def in_flight(self) -> None:
        """The download is under way: its flow crosses what comes next."""
        assert self.sink.popen.poll() is None, "the download ended before the failure"
        assert self.received.stat().st_size < SIZE

    def download_intact(self) -> None:
        assert self.sink.wait(TRANSFER_TIMEOUT) == 0, self.sink.err.tail()
        assert self.source.wait(TRANSFER_TIMEOUT) == 0, self.source.err.tail()
        assert sha256(self.received) == self.digest


def start_traffic(pair: Pair, scratch: Path) -> Traffic:
    bed = pair.bed
    data, received = scratch / "data.bin", scratch / "received.bin"
    digest = random_file(data, SIZE)
    source = paced_source(bed, "b3", BULK_PORT, data, PACE)
    chats = {f"k{i}": bed.chat_client("c1" if i % 2 else "c2", f"k{i}")[0] for i in range(6)}
    sink = bed.start(
        "c1", "socat", "-u", f"TCP:{LB_IP}:{BULK_VIP}", f"CREATE:{received}", name="sink"
    )
    deadline = time.monotonic() + 30
    while not (received.exists() and received.stat().st_size >= 8 * MB):
        assert time.monotonic() < deadline, "the download did not start"
        time.sleep(0.05)
    traffic = Traffic(pair, chats, sink, source, received, digest)
    traffic.chat_round("before")
    return traffic


def start_pair(pair: Pair, *options: str) -> None:
    for b in ("b1", "b2", "b3"):
        pair.bed.chat_server(b)
    for node in NODES:
        pair.start_lbnat(node, *options)
    for node in NODES:
        pair.wait_ready(node)
    for node in NODES:
        pair.start_keepalived(node)
    pair.wait_vip("lb1")
    pair.wait_role("lb1", "master")
    pair.wait_role("lb2", "backup")


def rows_of(pair: Pair, node: str) -> set[tuple[str, int]]:
    done = pair.lab.run(
        node, pair.lbnat_cmd, "sessions", "--json", "--admin-socket", pair.socket(node)
    )
    return {(r["client"], r["nat_port"]) for r in json.loads(done.stdout)}


def wait_synced(pair: Pair, source: str, to: str, timeout: float = 10.0) -> set[tuple[str, int]]:
    """Until `to` holds every row `source` holds (the standby copies); those rows."""
    deadline = time.monotonic() + timeout
    while not (want := rows_of(pair, source)) <= (have := rows_of(pair, to)):
        assert time.monotonic() < deadline, f"{to} lacks {want - have}"
        time.sleep(0.2)
    return want


def switch_back_and_check(pair: Pair, traffic: Traffic) -> None:
    """lb1 is back and ready: stop lb2's keepalived (it leaves with priority 0), lb1 takes the
    VIP, and every flow carries on through lb1."""
    lb2 = pair.nodes["lb2"].keepalived
    assert lb2 is not None
    pair.bed.stop(lb2)
    pair.nodes["lb2"].keepalived = None
    pair.wait_vip("lb1")
    traffic.chat_round("switched back")


VARIANTS: dict[str, tuple[str, ...]] = {
    "2w-tc": ("--workers", "2"),  # with the kernel fast path (offload auto: tc)
    "1w-tc": ("--workers", "1"),
    "1w-off": ("--workers", "1", "--offload", "off"),
}


@pytest.mark.parametrize("options", VARIANTS.values(), ids=VARIANTS)
def test_a_killed_master_s_flows_carry_on_through_the_backup_and_its_return(
    pair: Pair, scratch: Path, options: tuple[str, ...]
) -> None:
    start_pair(pair, *options)
    traffic = start_traffic(pair, scratch)
    synced = wait_synced(pair, "lb1", "lb2")
    assert len(synced) == 7, synced  # six chat sessions and the download

    killed = time.monotonic()
    pair.kill_node("lb1")
    traffic.in_flight()
    pair.crash_leftovers("lb1")
    moved = pair.wait_vip("lb2")
    failover = moved - killed
    print(f"failover: the VIP on lb2 {failover:.2f} s after lb1 was killed")
    assert failover < ADVERTS + 2, failover  # 3 adverts, skew, and polling on 2 busy cores
    traffic.chat_round("after the failover")
    new, server = pair.bed.chat_client("c2", "newcomer")
    assert server in {"b1", "b2", "b3"}
    new.send_line("hello")
    new.expect("hello")

    # lb1 comes back: ready only once it holds lb2's flows; keepalived keeps it backup
    pair.start_lbnat("lb1", *options)
    pair.wait_ready("lb1")
    pair.start_keepalived("lb1")
    pair.wait_role("lb1", "backup")
    assert pair.vip_holder() == {"lb2"}
    wait_synced(pair, "lb2", "lb1")
    traffic.chat_round("after the return")
    switch_back_and_check(pair, traffic)
    traffic.download_intact()
    new.send_line("still here")
    new.expect("still here")


def test_a_master_whose_link_goes_down_hands_its_flows_over_and_takes_them_back(
    pair: Pair, scratch: Path
) -> None:
    start_pair(pair)
    traffic = start_traffic(pair, scratch)
    wait_synced(pair, "lb1", "lb2")

    down = time.monotonic()
    pair.lab.run("lb1", "ip", "link", "set", "dev", "eth0", "down")
    traffic.in_flight()
    moved = pair.wait_vip("lb2")
    print(f"failover: the VIP on lb2 {moved - down:.2f} s after lb1's link went down")
    traffic.chat_round("after the link went down")

    pair.lab.run("lb1", "ip", "link", "set", "dev", "eth0", "up")
    pair.wait_role("lb1", "backup", timeout=30.0)
    pair.wait_ready("lb1")
    wait_synced(pair, "lb2", "lb1")
    switch_back_and_check(pair, traffic)
    traffic.download_intact()
    lbnat = pair.nodes["lb1"].lbnat
    assert lbnat is not None and lbnat.popen.poll() is None  # survived its link going down
