"""The scale-out lab of scripts/ecmp-lab.sh as a Python object (issue 20, docs/scale-out.md):
lbnat instances lb1..lbN behind a router rt that spreads the VIP's flows over them with ECMP,
learning the VIP over BGP (BIRD on the router, ExaBGP with lbnat-bgp on each instance).

`EcmpLab` is `lbnat_lab.netns.Lab` on that script: the same `run`/`popen` in a host's
namespace, processes stopped by pid at `close`, then ``ecmp-lab.sh down``. It adds what the
BGP side needs: BIRD on the router and ExaBGP on an instance started and stopped by pid (their
configs written by the generators in scripts/bird/ and scripts/exabgp/), the router's next
hops for the VIP (`routes`), a bounded wait for a set of next hops that returns how long it
took (`wait_routes`), and an instance's BGP blackholed with nftables (`blackhole`)::

    with EcmpLab(workdir=tmp_path) as lab:
        lab.start_bird()
        for n in (1, 2, 3):
            lab.start_exabgp(f"lb{n}", lbnat_bgp="/usr/local/bin/lbnat-bgp")
        lab.wait_routes({"198.18.1.11", "198.18.1.12", "198.18.1.13"}, timeout=20)

Hosts: rt (198.18.1.1 on eth0, 198.18.2.1 on eth1), c1 c2 (198.18.2.1N), lb1..lb9
(198.18.1.1N, the VIP on lo), b1..b9 (198.18.1.2N).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lbnat_lab.netns import REPO, Lab, LabError, checkout_env, skip_reason

ECMP_LAB_SH = REPO / "scripts" / "ecmp-lab.sh"
ROUTER_CONF_SH = REPO / "scripts" / "bird" / "router-conf.sh"
EXABGP_CONF_SH = REPO / "scripts" / "exabgp" / "exabgp-conf.sh"
EXABGP_ENV = REPO / "scripts" / "exabgp" / "exabgp.env"

VIP = "198.18.100.1"
VIP_PREFIX = "198.18.100.0/24"
ROUTER_IP = "198.18.1.1"
ROUTER_CLIENT_IP = "198.18.2.1"
LOCAL_AS = 65001
ROUTER_AS = 65000
BLACKHOLE_TABLE = "lbnat_bgp_blackhole"
SBIN = "/usr/sbin:/sbin"
GREETING = "* connected to "  # the chat server's first line (lbnat_lab.chat)

_HOST_RE = re.compile(r"^(rt|c[1-9]|lb[1-9]|b[1-9])$")


def host_ip(host: str) -> str:
    """Address of a host of the scale-out lab (its eth0's; the router's on the LB segment)."""
    if not _HOST_RE.match(host):
        raise ValueError(f"{host!r} is not a host of the ECMP lab (rt, c1, lb1, b1, ...)")
    if host == "rt":
        return ROUTER_IP
    if host[0] == "c":
        return f"198.18.2.{10 + int(host[1:])}"
    if host.startswith("lb"):
        return f"198.18.1.{10 + int(host[2:])}"
    return f"198.18.1.{20 + int(host[1:])}"


def sbin_env(**extra: str) -> dict[str, str]:
    """`checkout_env` with /usr/sbin on PATH (bird, exabgp and nft live there)."""
    env = checkout_env(**extra)
    env["PATH"] = f"{env.get('PATH', '')}:{SBIN}"
    return env


def next_hops(route_json: str) -> set[str]:
    """The gateways of `ip -j route show VIP`'s routes: one route with `nexthops` when BIRD
    merged several (ECMP), a `gateway` of its own when one instance announces."""
    hops: set[str] = set()
    for route in json.loads(route_json or "[]"):
        for hop in route.get("nexthops", [route]):
            if "gateway" in hop:
                hops.add(str(hop["gateway"]))
    return hops


class EcmpLab(Lab):
    """One scale-out lab: namespaces up on construction, everything gone after `close`.
    `workdir` holds the BIRD and ExaBGP configs, control socket and logs."""

    def __init__(
        self, workdir: Path, instances: int = 3, backends: int = 3, prefix: str | None = None
    ) -> None:
        self.instances = instances
        self.workdir = workdir
        self.bird: subprocess.Popen[bytes] | None = None
        self.measured: dict[str, float] = {}  # what -> seconds (measure_routes)
        self.exabgp: dict[str, subprocess.Popen[bytes]] = {}
        workdir.mkdir(parents=True, exist_ok=True)
        super().__init__(backends=backends, prefix=prefix or f"lbe{secrets.token_hex(3)}")

    # -- the lab itself ------------------------------------------------------------------------

    script_path = ECMP_LAB_SH

    def script_env(self) -> dict[str, str]:
        return {"LAB_PREFIX": self.prefix, "LAB_INSTANCES": str(self.instances),
                "LAB_BACKENDS": str(self.backends)}  # fmt: skip

    def add_instance(self, n: int) -> str:
        """Create instance lbN (198.18.1.(10+N), the VIP on lo) in the running lab."""
        self.script("add-instance", str(n))
        return f"lb{n}"

    def remove_instance(self, n: int) -> None:
        """Kill what runs in lbN (by pid, the script) and delete it."""
        self.exabgp.pop(f"lb{n}", None)
        self.script("remove-instance", str(n))

    @staticmethod
    def ip(host: str) -> str:
        return host_ip(host)

    def run(self, host: str, *argv: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        kw.setdefault("env", sbin_env())
        return super().run(host, *argv, **kw)

    # -- BIRD on the router --------------------------------------------------------------------

    @property
    def bird_socket(self) -> Path:
        return self.workdir / "bird.ctl"

    def start_bird(self, instances: int = 9) -> subprocess.Popen[bytes]:
        """BIRD on rt with a BGP session for lb1..lb`instances` (sessions to instances that do
        not exist just stay down: one config serves instances added later), in the foreground
        with a control socket of its own; log in workdir/bird.log."""
        argv = [
            "bash", str(ROUTER_CONF_SH), "--router-id", ROUTER_IP, "--local", ROUTER_IP,
            "--vip-prefix", VIP_PREFIX,
        ]  # fmt: skip
        for n in range(1, instances + 1):
            argv += ["--instance", f"lb{n}={host_ip(f'lb{n}')}"]
        conf = self.workdir / "bird.conf"
        conf.write_text(self._generate(argv))
        log = (self.workdir / "bird.log").open("ab")
        self.bird = self.popen(
            "rt", "bird", "-f", "-c", str(conf), "-s", str(self.bird_socket),
            "-P", str(self.workdir / "bird.pid"), stdout=log, stderr=subprocess.STDOUT,
            env=sbin_env(),
        )  # fmt: skip
        log.close()
        return self.bird

    def stop_bird(self) -> None:
        """SIGTERM BIRD (SIGKILL after 5 s): its sessions close, the kernel route goes."""
        if self.bird is not None:
            self.stop(self.bird)
            self.bird = None

    def birdc(self, *command: str) -> str:
        """A birdc command on the router's BIRD (its own socket); its output."""
        return self.run("rt", "birdc", "-s", str(self.bird_socket), *command).stdout

    # -- ExaBGP on an instance -----------------------------------------------------------------

    def start_exabgp(
        self, instance: str, lbnat_bgp: str, admin_socket: str, vip: str | None = None
    ) -> subprocess.Popen[bytes]:
        """ExaBGP in `instance`'s namespace peering with the router, running `lbnat_bgp` (an
        absolute path) as its process against `admin_socket`; log in workdir/<instance>-exabgp.log
        (ExaBGP's lines and lbnat-bgp's, which share its stderr)."""
        argv = [
            "bash", str(EXABGP_CONF_SH), "--name", instance, "--own", host_ip(instance),
            "--router", ROUTER_IP, "--local-as", str(LOCAL_AS), "--peer-as", str(ROUTER_AS),
            "--lbnat-bgp", lbnat_bgp, "--admin-socket", admin_socket,
        ]  # fmt: skip
        if vip is not None:
            argv += ["--vip", vip]
        conf = self.workdir / f"{instance}-exabgp.conf"
        conf.write_text(self._generate(argv))
        log = (self.workdir / f"{instance}-exabgp.log").open("ab")
        proc = self.popen(
            instance, "exabgp", "--env", str(EXABGP_ENV), str(conf),
            stdout=log, stderr=subprocess.STDOUT, cwd=str(self.workdir), env=sbin_env(),
        )  # fmt: skip
        log.close()
        self.exabgp[instance] = proc
        return proc

    def speaker_pids(self, instance: str) -> list[int]:
        """ExaBGP's pid on `instance` and its children's (lbnat-bgp), parent first."""
        proc = self.exabgp.get(instance)
        if proc is None or proc.poll() is not None:
            return []
        pids = [proc.pid]
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text()
            pids += [int(pid) for pid in children.split()]
        return pids

    def kill_speaker(self, instance: str) -> list[int]:
        """SIGKILL ExaBGP and lbnat-bgp on `instance` at once, by pid (a crashed speaker: no
        withdraw, no NOTIFICATION; the kernel closes its TCP session); the pids killed."""
        pids = self.speaker_pids(instance)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc = self.exabgp.pop(instance, None)
        if proc is not None:
            proc.wait(5)
        return pids

    def stop_exabgp(self, instance: str) -> None:
        """SIGTERM ExaBGP (it stops its process and closes the session), SIGKILL after 5 s."""
        proc = self.exabgp.pop(instance, None)
        if proc is not None:
            self.stop(proc)

    def exabgp_log(self, instance: str) -> str:
        path = self.workdir / f"{instance}-exabgp.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # -- the router's view ---------------------------------------------------------------------

    def routes(self, vip: str = VIP) -> set[str]:
        """The router's next hops for `vip` (empty: no route)."""
        done = self.run("rt", "ip", "-4", "-j", "route", "show", vip)
        return next_hops(done.stdout)

    def wait_routes(
        self, expected: set[str], timeout: float = 20.0, since: float | None = None
    ) -> float:
        """Poll (every 20 ms) until the router's next hops for the VIP are `expected`; the
        seconds from `since` (a time.monotonic(); default: this call). TimeoutError with what
        the router has after `timeout`."""
        start = time.monotonic() if since is None else since
        deadline = time.monotonic() + timeout
        while (now := self.routes()) != expected:
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"the router's next hops for {VIP} are {sorted(now) or 'none'}, not "
                    f"{sorted(expected) or 'none'}, after {timeout}s"
                )
            time.sleep(0.02)
        return time.monotonic() - start

    def measure_routes(self, what: str, expected: set[str], since: float, bound: float) -> float:
        """wait_routes, printed, kept in `measured` and held to `bound` seconds (an
        AssertionError with the daemons' logs otherwise): the tests' measurements."""
        try:
            took = self.wait_routes(expected, timeout=bound + 5, since=since)
        except TimeoutError as error:
            raise AssertionError(f"{what}: {error}\n{self.logs()}") from None
        print(f"{what}: {took:.2f} s")
        self.measured[what] = took
        assert took < bound, f"{what} took {took:.2f} s (bound {bound} s)"
        return took

    def logs(self) -> str:
        """The tails of BIRD's log and every running speaker's."""
        bird = self.workdir / "bird.log"
        text = bird.read_text(errors="replace") if bird.exists() else ""
        parts = [f"--- bird.log\n{text[-3000:]}"]
        for instance in sorted(self.exabgp):
            parts.append(f"--- {instance}\n{self.exabgp_log(instance)[-3000:]}")
        return "\n".join(parts)

    # -- faults --------------------------------------------------------------------------------

    def blackhole(self, instance: str) -> None:
        """Drop `instance`'s BGP both ways (TCP port 179, in and out) with an nftables table of
        its own: a hung machine, whose session neither closes nor talks."""
        rules = (
            f"table inet {BLACKHOLE_TABLE} {{\n"
            "  chain input { type filter hook input priority -10; tcp sport 179 drop; "
            "tcp dport 179 drop; }\n"
            "  chain output { type filter hook output priority -10; tcp sport 179 drop; "
            "tcp dport 179 drop; }\n"
            "}\n"
        )
        self.run(instance, "nft", "-f", "-", input=rules)

    def unblackhole(self, instance: str) -> None:
        self.run(instance, "nft", "delete", "table", "inet", BLACKHOLE_TABLE, check=False)

    def __enter__(self) -> EcmpLab:
        return self

    # -- helpers -------------------------------------------------------------------------------

    def _generate(self, argv: list[str]) -> str:
        """A config from one of the generators (which check it with their daemon)."""
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=60, env=sbin_env(),
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        if done.returncode != 0:
            raise LabError(f"{' '.join(argv[:2])} failed ({done.returncode}):\n{done.stderr}")
        return done.stdout


def missing_tools() -> str | None:
    """Why the ECMP lab cannot run here (not root, no netns, no BIRD or ExaBGP), or None."""
    if (reason := skip_reason()) is not None:
        return reason
    for tool in ("bird", "birdc", "exabgp", "nft"):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            return f"needs {tool} (apt-get install bird2 exabgp nftables)"
    return None


def checkout_lbnat_bgp(directory: Path) -> Path:
    """An executable `lbnat-bgp` in `directory` that runs this checkout's lbnat.bgptool (the
    console script may be another checkout's, or missing until `pip install -e .`): ExaBGP
    runs its process by absolute path."""
    path = directory / "lbnat-bgp"
    path.write_text(f"#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -m lbnat.bgptool \"$@\"\n")
    path.chmod(0o755)
    return path


def short_connections(ip: str, port: int, count: int, timeout: float = 5.0) -> dict[str, int]:
    """`count` connections to a chat service one after another, each closed once its greeting
    (``* connected to bN``) arrived: the backends they landed on, counted ("failed": none)."""
    landed: dict[str, int] = {}
    for _ in range(count):
        name = "failed"
        with contextlib.suppress(OSError), socket.create_connection((ip, port), timeout) as sock:
            greeting = sock.makefile("rb").readline().decode(errors="replace").strip()
            if greeting.startswith(GREETING):
                name = greeting[len(GREETING) :]
        landed[name] = landed.get(name, 0) + 1
    return landed


def main(argv: list[str] | None = None) -> int:
    """`python -m lbnat_lab.ecmp connect IP PORT COUNT` (run in a client's namespace by
    scripts/demo-ecmp.sh): short connections, one line of where they landed; exit 1 if any
    failed."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 4 or args[0] != "connect" or not (args[2] + args[3]).isdigit():
        print("usage: python -m lbnat_lab.ecmp connect IP PORT COUNT", file=sys.stderr)
        return 2
    landed = short_connections(args[1], int(args[2]), int(args[3]))
    print(" ".join(f"{name} {n}" for name, n in sorted(landed.items())))
    return 1 if "failed" in landed else 0


if __name__ == "__main__":
    sys.exit(main())
