"""The network-namespace lab of scripts/lab.sh as a Python object: the one lab helper of the
integration tests (tests/integration/conftest.py), the benchmark (lbnat_bench.run) and the
screenshots (scripts/screenshots.py).

It drives the checkout's ``scripts/lab.sh`` (found beside this package, `LAB_SH`), so it works
from a checkout only; `skip_reason` says so when the script is missing. Typical fixture::

    @pytest.fixture
    def lab() -> Iterator[Lab]:
        if (reason := skip_reason()) is not None:
            pytest.skip(reason)
        with Lab() as lab:
            yield lab

    def test_chat_direct(lab: Lab) -> None:
        lab.popen("b1", *CHAT, "server", "--port", "9000", "--name", "b1")
        lab.wait_tcp_listening("b1", 9000)
        client = lab.popen("c1", *CHAT, "client", BACKENDS["b1"], "9000", "alice",
                           stdin=subprocess.PIPE)
        lab.expect(client, "* connected to b1")

Every host is a namespace named ``<prefix>-<host>`` (hosts: c1, c2, lb, b1, b2, ...); the
prefix is unique per Lab so parallel runs never meet. ``Lab(ipv6=True)`` is the dual-stack lab
(lab.sh's LAB_IPV6=1): every host also has an IPv6 address, `host_ip6` (lb fd18::2, c1
fd18::11, b1 fd18::21). `Lab.add_router` adds the router r1 and the client rc1 behind a narrow
link (path MTU). `Lab.dr_backend` makes a backend hold the VIP for direct routing
(scripts/dr-backend.sh). `close` (or leaving the ``with``) ends
every process the Lab started, by pid (SIGTERM, then SIGKILL), then runs ``lab.sh down``.

tests/integration/test_lab_netns.py checks it with a chat server and two clients.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

REPO = Path(__file__).resolve().parents[1]
"""The checkout this package sits in (its scripts/lab.sh is the lab)."""
LAB_SH = REPO / "scripts" / "lab.sh"

PLEN = 24
LB_IP = "198.18.0.2"
CLIENTS: dict[str, str] = {"c1": "198.18.0.11", "c2": "198.18.0.12"}
BACKENDS: dict[str, str] = {f"b{n}": f"198.18.0.{20 + n}" for n in range(1, 5)}
"""b1..b4; `lab.sh up` makes the first LAB_BACKENDS (3) of them, `Lab.add_backend` more."""
LB_PAIR: dict[str, str] = {"lb1": "198.18.0.3", "lb2": "198.18.0.4"}
"""With `Lab(lbs=2)` (lab.sh's LAB_LBS=2, scripts/ha-lab.sh) these replace lb; LB_IP is then the
pair's VIP, which keepalived adds on the master."""
HOSTS: dict[str, str] = {"lb": LB_IP, **LB_PAIR, **CLIENTS, **BACKENDS}

PLEN6 = 64
PREFIX6 = "fd18::"
"""The dual-stack lab's IPv6 prefix (ULA): a host's address is this with the last number of its
IPv4 address written after it, 198.18.0.21 -> fd18::21."""
LB_IP6 = "fd18::2"
CLIENTS6: dict[str, str] = {"c1": "fd18::11", "c2": "fd18::12"}
BACKENDS6: dict[str, str] = {f"b{n}": f"fd18::{20 + n}" for n in range(1, 5)}
ROUTER_IP = "198.18.0.254"
ROUTER_IP6 = "fd18::254"
ROUTED_CLIENT = "rc1"
"""`Lab.add_router`: the client behind the router r1, on 198.18.1.0/24 and fd18:1::/64, whose
link has the narrow MTU; the LB hosts and the backends have their default routes through r1
(lbnat's next hop for an address off its segment is the default gateway)."""
ROUTED_CLIENT_IP = "198.18.1.11"
ROUTED_CLIENT_IP6 = "fd18:1::11"
ROUTED_MTU = 1280

CHAT: tuple[str, ...] = (sys.executable, "-m", "lbnat_lab.chat")
"""argv prefix of the chat server/client, to run with `Lab.run` / `Lab.popen`."""
ECHO: tuple[str, ...] = (sys.executable, "-m", "lbnat_lab.udpecho")
"""argv prefix of the UDP echo server."""

_HOST_RE = re.compile(r"^(lb|lb[12]|c[1-9][0-9]?|b[1-9][0-9]?|r1|rc1)$")
SCRIPT_TIMEOUT = 120.0
RUN_TIMEOUT = 30.0
TERMINATE_TIMEOUT = 5.0


def host_ip(host: str) -> str:
    """Address of a lab host: lb, lb1 and lb2 (the pair), cN (198.18.0.10+N) or bN
    (198.18.0.20+N); after `Lab.add_router`, r1 (198.18.0.254) and rc1 (198.18.1.11)."""
    if not _HOST_RE.match(host):
        raise ValueError(f"{host!r} is not a lab host (lb, lb1, lb2, c1, c2, b1, b2, ...)")
    if host == "lb":
        return LB_IP
    if host in LB_PAIR:
        return LB_PAIR[host]
    if host == "r1":
        return ROUTER_IP
    if host == ROUTED_CLIENT:
        return ROUTED_CLIENT_IP
    base = 10 if host[0] == "c" else 20
    return f"198.18.0.{base + int(host[1:])}"


def host_ip6(host: str) -> str:
    """IPv6 address of a host of the dual-stack lab (`Lab(ipv6=True)`): fd18:: and the last
    number of its IPv4 address (lb fd18::2, c1 fd18::11, b1 fd18::21, r1 fd18::254); rc1,
    behind the router, fd18:1::11."""
    if host == ROUTED_CLIENT:
        return ROUTED_CLIENT_IP6
    return PREFIX6 + host_ip(host).rsplit(".", 1)[1]


def skip_reason() -> str | None:
    """Why netns tests cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "ss", "bash"):
        if shutil.which(tool) is None:
            return f"needs the {tool!r} tool"
    if not LAB_SH.exists():
        return f"{LAB_SH} is missing"
    return None


class LabError(RuntimeError):
    """scripts/lab.sh failed; the message has its output."""


def checkout_env(**extra: str) -> dict[str, str]:
    """This process's environment with the checkout first on PYTHONPATH, plus `extra`."""
    env = dict(os.environ)
    # chat and the daemon are run from the source tree, without installing
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def terminate(procs: Sequence[subprocess.Popen[Any]], timeout: float = TERMINATE_TIMEOUT) -> None:
    """Stop processes by pid: SIGTERM to every live one at once (a chat client takes up to
    0.5 s to notice), then SIGKILL to any still running `timeout` seconds later."""
    live = [p for p in procs if p.poll() is None]
    for proc in live:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in live:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


class Lab:
    """One lab: namespaces up on construction, everything gone after `close`."""

    def __init__(
        self, backends: int = 3, prefix: str | None = None, lbs: int = 1, ipv6: bool = False
    ) -> None:
        """`lbs`: 1, one LB "lb" (198.18.0.2); 2, the HA pair "lb1" and "lb2" (LB_PAIR).
        `ipv6`: dual stack, every host with its `host_ip6` too (IPv6 stays off otherwise)."""
        self.prefix = prefix or f"lbt{secrets.token_hex(3)}"
        self.lbs = lbs
        self.ipv6 = ipv6
        # Each lab's lbnat gets its own admin socket (labs may run side by side on one host).
        self.admin_socket = f"/run/lbnat/{self.prefix}.sock"
        self.backends = backends
        self._procs: list[subprocess.Popen[Any]] = []
        self._buffers: dict[int, bytearray] = {}
        self._closed = False
        atexit.register(self.close)  # a forgotten close still cleans up at exit
        try:
            self.script("up")
        except BaseException:
            self.close()
            raise

    # -- the lab itself ------------------------------------------------------------------------

    script_path = LAB_SH  # the script that builds this kind of lab (EcmpLab: ecmp-lab.sh)

    def script_env(self) -> dict[str, str]:
        """The script's settings for this lab."""
        return {"LAB_PREFIX": self.prefix, "LAB_BACKENDS": str(self.backends),
                "LAB_LBS": str(self.lbs), "LAB_IPV6": "1" if self.ipv6 else "0"}  # fmt: skip

    def script(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run the lab's script (``scripts/lab.sh ARGS``) for this lab's prefix; raise with
        its output on error (but for status)."""
        result = subprocess.run(
            ["bash", str(self.script_path), *args],
            env=checkout_env(**self.script_env()),
            capture_output=True,
            text=True,
            timeout=SCRIPT_TIMEOUT,
        )
        if result.returncode != 0 and args[0] != "status":
            raise LabError(
                f"{self.script_path.name} {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}"
            )
        return result

    def is_up(self) -> bool:
        return self.script("status").returncode == 0

    def add_backend(self, n: int) -> str:
        """Create backend bN (198.18.0.(20+N)) if missing, return its host name."""
        self.script("add-backend", str(n))
        return f"b{n}"

    def add_router(self, mtu: int = ROUTED_MTU) -> str:
        """Create the router r1 and the client rc1 behind it, on a link of `mtu` bytes
        (lab.sh add-router: the LB hosts and the backends route to rc1 through r1, their
        default gateway, and rc1
        announces the MSS of a 1500-byte path, so only path-MTU discovery fits the segments
        sent to it); return the client's host name."""
        self.script("add-router", str(mtu))
        return ROUTED_CLIENT

    def dr_backend(self, host: str, up: bool = True, vip: str = LB_IP) -> None:
        """Make backend `host` (bN) a direct-routing backend of `vip` (lbnat's mode dr,
        docs/dr.md): the VIP on its lo with arp_ignore=1 and arp_announce=2, or (`up`
        False) undo it; scripts/dr-backend.sh, through lab.sh dr-backend."""
        if not re.fullmatch(r"b[1-9][0-9]?", host):
            raise ValueError(f"{host!r} is not a backend (b1, b2, ...)")
        self.script("dr-backend", host[1:], "up" if up else "down", vip)

    def ns(self, host: str) -> str:
        """Namespace name of a lab host ("c1" -> "<prefix>-c1")."""
        self.ip(host)  # validates the name (this kind of lab's hosts)
        return f"{self.prefix}-{host}"

    @staticmethod
    def ip(host: str) -> str:
        return host_ip(host)

    def ip6(self, host: str) -> str:
        if not self.ipv6:
            raise ValueError(f"lab {self.prefix} is IPv4 only (Lab(ipv6=True) for dual stack)")
        return host_ip6(host)

    # -- commands inside the namespaces --------------------------------------------------------

    def argv(self, host: str, argv: Sequence[str]) -> list[str]:
        """`argv` as run in `host`'s namespace."""
        if not argv:
            raise ValueError("no command given")
        return ["ip", "netns", "exec", self.ns(host), *map(str, argv)]

    def run(self, host: str, *argv: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run a command in `host`'s namespace and wait for it (check, capture, text, timeout
        by default; any subprocess.run keyword overrides)."""
        options: dict[str, Any] = {
            "check": True,
            "capture_output": True,
            "text": True,
            "timeout": RUN_TIMEOUT,
            "env": checkout_env(LBNAT_ADMIN_SOCKET=self.admin_socket),
        }
        options.update(kw)
        result: subprocess.CompletedProcess[str] = subprocess.run(self.argv(host, argv), **options)
        return result

    def popen(self, host: str, *argv: str, **kw: Any) -> subprocess.Popen[bytes]:
        """Start a command in `host`'s namespace in the background and remember it, so that
        `close` ends it. Defaults: stdin from /dev/null, stdout and stderr piped (bytes).
        ``ip netns exec`` execs the command, so the Popen's pid is the command's own."""
        if self._closed:
            raise RuntimeError("lab is closed")
        options: dict[str, Any] = {
            "stdin": subprocess.DEVNULL,
            "stdout": subprocess.PIPE,
            "stderr": subprocess.PIPE,
            "env": checkout_env(LBNAT_ADMIN_SOCKET=self.admin_socket),
        }
        options.update(kw)
        proc: subprocess.Popen[bytes] = subprocess.Popen(self.argv(host, argv), **options)
        self._procs.append(proc)
        return proc

    def wait_listening(
        self,
        host: str,
        port: int,
        *,
        udp: bool = False,
        timeout: float = 10.0,
        between_polls: Callable[[], None] | None = None,
    ) -> None:
        """Poll ``ss -l`` in `host`'s namespace until something listens on `port` (TCP, or UDP
        if `udp`). `between_polls` runs after each miss: it may raise to stop waiting early
        (the benchmark checks that its servers are still running)."""
        deadline = time.monotonic() + timeout
        proto = "udp" if udp else "tcp"
        argv = self.argv(host, ["ss", "-Hlnu" if udp else "-Hltn", f"sport = :{port}"])
        while True:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
            if result.returncode == 0 and result.stdout.strip():
                return
            if between_polls is not None:
                between_polls()
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"nothing listens on {proto} port {port} in {self.ns(host)} after {timeout}s"
                )
            time.sleep(0.05)

    def wait_tcp_listening(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.wait_listening(host, port, timeout=timeout)

    def expect(self, proc: subprocess.Popen[Any], needle: str, timeout: float = 10.0) -> str:
        """Read `proc`'s stdout (started with stdout=PIPE) until a line containing `needle`
        arrives; return that line (without its newline). Lines before it are consumed.
        Raises TimeoutError, or EOFError if the process closes its stdout first."""
        stream: IO[Any] | None = proc.stdout
        if stream is None:
            raise ValueError("process was not started with stdout=PIPE")
        fd = stream.fileno()
        buf = self._buffers.setdefault(fd, bytearray())
        deadline = time.monotonic() + timeout
        wanted = needle.encode()
        while True:
            while (nl := buf.find(b"\n")) >= 0:
                line = bytes(buf[:nl])
                del buf[: nl + 1]
                if wanted in line:
                    return line.decode(errors="replace")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"{needle!r} not seen within {timeout}s (pending {bytes(buf)!r})"
                )
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                data = os.read(fd, 65536)
                if not data:
                    raise EOFError(f"stdout closed before {needle!r} (pending {bytes(buf)!r})")
                buf += data

    # -- teardown ------------------------------------------------------------------------------

    def stop(self, proc: subprocess.Popen[Any], timeout: float = TERMINATE_TIMEOUT) -> int:
        """SIGTERM one process, SIGKILL it after `timeout`; return its exit code."""
        terminate([proc], timeout)
        return proc.returncode

    def _stop_all(self) -> None:
        terminate(self._procs, TERMINATE_TIMEOUT)
        for proc in self._procs:
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        self._procs.clear()
        self._buffers.clear()

    def close(self) -> None:
        """End every process this Lab started, then take the namespaces down. Idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        try:
            self._stop_all()
        finally:
            self.script("down")

    def __enter__(self) -> Lab:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
