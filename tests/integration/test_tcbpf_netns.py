"""The fast path's tc attachment (lbnat.dataplane.tcbpf) on a veth in a namespace of its own:
the filter appears with our handle and priority, detach takes it away with the clsact qdisc
only if we created it, a filter left by a killed process is replaced or removed by
detach_stale, and a device that vanished is not an error. The program's packet rewriting is
tests/unit/test_tcbpf.py's (BPF_PROG_TEST_RUN).

Each test makes a namespace (addresses from 198.18.0.0/15) with a veth pair, runs
tests/integration/tcbpftool.py in it with `nsenter --net=` (pid-tracked), and kills those
processes and deletes the namespace afterwards, whatever happened.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from lbnat.dataplane import tcbpf
from lbnat_lab.netns import REPO, checkout_env, terminate

pytestmark = pytest.mark.netns

ADDRESS = "198.19.171.1/30"
PEER = "198.19.171.2/30"
WAIT = 20.0  # bounded waits for a tool's answer (2 busy cores)


@dataclass
class Namespace:
    name: str
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.name, *argv],
            capture_output=True,
            text=True,
            timeout=WAIT,
            check=check,
        )

    def tool(self, *argv: str) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.name}", sys.executable, "-m",
                "tests.integration.tcbpftool", *argv]  # fmt: skip

    def hold(self, device: str = "v0") -> Holder:
        """A process that holds the program attached to `device`."""
        proc = subprocess.Popen(
            self.tool("hold", device),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=checkout_env(),
        )
        self.procs.append(proc)
        holder = Holder(proc)
        holder.answer("ifindex")
        return holder

    def stale(self, device: str = "v0") -> bool:
        done = subprocess.run(
            self.tool("stale", device),
            capture_output=True,
            text=True,
            cwd=REPO,
            env=checkout_env(),
            timeout=WAIT,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        removed = json.loads(done.stdout)["removed"]
        assert isinstance(removed, bool)
        return removed

    def filters(self, device: str = "v0") -> list[str]:
        shown = self.run("tc", "filter", "show", "dev", device, "ingress").stdout
        return [line for line in shown.splitlines() if "handle" in line]

    def ours(self, device: str = "v0") -> list[str]:
        return [
            line
            for line in self.filters(device)
            if "pref 177 " in line and "handle 0x1b " in line and "lbnat_fastpath" in line
        ]

    def has_clsact(self, device: str = "v0") -> bool:
        return "qdisc clsact" in self.run("tc", "qdisc", "show", "dev", device).stdout


@dataclass
class Holder:
    proc: subprocess.Popen[str]

    def answer(self, key: str) -> Any:
        assert self.proc.stdout is not None
        # Bounded: the tool writes each answer as one flushed line.
        ready, _, _ = select.select([self.proc.stdout], [], [], WAIT)
        if not ready:
            raise AssertionError(f"tcbpftool gave no {key!r} within {WAIT}s")
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise AssertionError(f"tcbpftool ended without {key!r}: {err}")
        message = json.loads(line)
        assert key in message, message
        return message[key]

    def command(self, text: str, key: str) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        return self.answer(key)

    def finish(self) -> None:
        """End of input: the tool closes the program and exits."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        assert self.proc.wait(WAIT) == 0, self.proc.stderr.read() if self.proc.stderr else ""

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(WAIT)


@pytest.fixture
def netns() -> Iterator[Namespace]:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, BPF)")
    for tool in ("ip", "tc", "nsenter"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs the {tool!r} tool")
    if not tcbpf.object_path().is_file():
        pytest.skip(f"{tcbpf.object_path()} is missing: run `make bpf`")
    space = Namespace(f"lbtc{os.getpid()}{secrets.token_hex(2)}")
    subprocess.run(["ip", "netns", "add", space.name], check=True)
    try:
        ip = ["ip", "-n", space.name]
        subprocess.run([*ip, "link", "add", "v0", "type", "veth", "peer", "name", "v1"], check=True)
        subprocess.run([*ip, "addr", "add", ADDRESS, "dev", "v0"], check=True)
        subprocess.run([*ip, "addr", "add", PEER, "dev", "v1"], check=True)
        for device in ("lo", "v0", "v1"):
            subprocess.run([*ip, "link", "set", device, "up"], check=True)
        yield space
    finally:
        terminate(space.procs)
        subprocess.run(["ip", "netns", "del", space.name], check=False)


def test_attach_adds_our_filter_and_detach_takes_it_and_our_clsact_away(netns: Namespace) -> None:
    assert not netns.has_clsact()
    holder = netns.hold()
    assert netns.has_clsact()
    [line] = netns.ours()
    assert "direct-action" in line, line
    assert holder.command("detach", "detached") is True
    assert netns.filters() == [] and not netns.has_clsact()
    assert holder.command("detach", "detached") is True  # idempotent
    assert holder.command("attach", "attached") is True
    assert len(netns.ours()) == 1
    holder.finish()  # close() detaches
    assert netns.filters() == [] and not netns.has_clsact()


def test_someone_else_s_clsact_and_filters_stay(netns: Namespace) -> None:
    netns.run("tc", "qdisc", "add", "dev", "v0", "clsact")
    obj = str(tcbpf.object_path())
    netns.run("tc", "filter", "add", "dev", "v0", "ingress", "pref", "10", "handle", "0x7",
              "bpf", "da", "obj", obj, "sec", "tc")  # fmt: skip
    holder = netns.hold()
    assert len(netns.ours()) == 1 and len(netns.filters()) == 2
    assert holder.command("detach", "detached") is True
    assert netns.has_clsact()
    [other] = netns.filters()
    assert "pref 10 " in other and "handle 0x7 " in other, other
    holder.finish()
    assert netns.has_clsact() and len(netns.filters()) == 1


def test_a_killed_holder_s_filter_is_replaced_by_the_next_attach(netns: Namespace) -> None:
    first = netns.hold()
    [before] = netns.ours()
    first.kill()
    assert netns.ours() == [before]  # tc holds the program: it outlives the process
    second = netns.hold()
    [after] = netns.ours()
    assert after != before  # another program id, same handle and priority
    second.finish()
    assert netns.ours() == []


def bpftool(*argv: str) -> Any:
    done = subprocess.run(["bpftool", "--json", *argv], capture_output=True, text=True,
                          timeout=WAIT, check=False)  # fmt: skip
    return json.loads(done.stdout) if done.returncode == 0 else None


def test_a_left_filter_keeps_both_maps_until_it_is_removed(netns: Namespace) -> None:
    """What a hitless restart relies on (Handover.leave releases the object, the filter stays)
    and `lbnat cleanup` undoes (detach_stale): the program holds the IPv4 and the IPv6 flow
    maps, which live as long as the filter and go with it."""
    if shutil.which("bpftool") is None:
        pytest.skip("needs bpftool")
    holder = netns.hold()
    holder.kill()
    [line] = netns.ours()
    prog_id = int(line.split(" id ")[1].split()[0])
    shown = bpftool("prog", "show", "id", str(prog_id))
    assert shown is not None, f"no program {prog_id}"
    map_ids = shown["map_ids"]
    names = sorted(bpftool("map", "show", "id", str(i))["name"] for i in map_ids)
    assert names == ["lbnat_flows", "lbnat_flows6"]
    assert netns.stale() is True
    deadline = time.monotonic() + WAIT  # the kernel frees them after an RCU grace period
    while any(bpftool("map", "show", "id", str(i)) is not None for i in map_ids):
        assert time.monotonic() < deadline, f"maps {map_ids} outlived the filter"
        time.sleep(0.1)


def test_detach_stale_removes_a_leftover_filter(netns: Namespace) -> None:
    assert netns.stale() is False  # no clsact at all
    holder = netns.hold()
    holder.kill()
    assert len(netns.ours()) == 1
    assert netns.stale() is True
    assert netns.ours() == []
    assert netns.stale() is False


def test_detach_after_the_device_vanished_is_not_an_error(netns: Namespace) -> None:
    holder = netns.hold()
    netns.run("ip", "link", "del", "v0")
    assert holder.command("detach", "detached") is True
    holder.finish()
