"""Fixtures and helpers for the network-namespace tests of lbnat (tests/integration/test_*.py).

Every test gets a fresh lab (`Lab`, ~1-2 s to build) through the `bed` fixture: namespaces
``<prefix>-{c1,c2,lb,b1,b2,b3,sw}`` on one bridge, addresses in 198.18.0.0/24. All processes are
started through `Lab.popen` (pid-tracked) and stopped by pid, then the namespaces are deleted,
whether the test passed or not. Every wait is bounded; nothing asserts on durations.

A process's stdout and stderr are read by one thread each into `Output`, which keeps every line
(a test can look back at the whole log) and lets a test wait, bounded, for a line.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import pytest

from lbnat_lab.netns import CHAT, LB_IP, Lab, host_ip, skip_reason, terminate

T = TypeVar("T")

VIP_PORT = 20000
BACKEND_PORT = 9000
NAT_PORTS = (61000, 65535)  # lbnat's default --nat-ports
LBNAT_TABLE = "lbnat_" + LB_IP.replace(".", "_")
RESERVED_PORTS = "/proc/sys/net/ipv4/ip_local_reserved_ports"
STOP_TIMEOUT = 5.0  # SIGTERM, then SIGKILL after this
WAIT = 10.0  # default bound of a wait for a line (generous: 2 busy cores)

GREETING = "* connected to "
NEW_CLIENT_RE = re.compile(
    r"new client <(?P<ip>[\d.]+),(?P<port>\d+)> -> server (?P<bip>[\d.]+):(?P<bport>\d+) "
    r"\(NAT port (?P<nat>\d+)\)"
)
ROW_RE = re.compile(
    r"^\s+(?P<proto>tcp|udp) client (?P<ip>[\d.]+):(?P<port>\d+) <-> server "
    r"(?P<bip>[\d.]+):(?P<bport>\d+) NAT port (?P<nat>\d+) (?P<state>\w+) age (?P<age>[\d.]+)s$"
)
TABLE_RE = re.compile(r"NAT table : (?P<rows>\d+) rows, (?P<open>\d+) open")


def require(*tools: str) -> None:
    """Skip the test (with the reason) unless every tool is on PATH."""
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"needs the {tool!r} tool")


def console_script(name: str) -> str:
    """Absolute path of one of lbnat's console scripts, the one next to this interpreter
    first (so tests run the code of the interpreter running them); skip if there is none."""
    beside = Path(sys.executable).with_name(name)
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"the {name!r} console script is not installed (pip install -e .)")
    return found


# -- process output ----------------------------------------------------------------------------


class Output:
    """Every line one pipe gave, read by a daemon thread; bounded waits on it.

    `expect` works like `Lab.expect` (a cursor moves past each line it returns), but nothing is
    thrown away: `lines` holds the whole output, for assertions on the log as a whole."""

    def __init__(self, stream: IO[bytes], name: str) -> None:
        self.name = name
        self.lines: list[str] = []
        self.closed = False
        self.cursor = 0
        self._cond = threading.Condition()
        self._thread = threading.Thread(
            target=self._pump, args=(stream,), name=f"output-{name}", daemon=True
        )
        self._thread.start()

    def _pump(self, stream: IO[bytes]) -> None:
        try:
            for raw in iter(stream.readline, b""):
                line = raw.decode(errors="replace").rstrip("\r\n")
                with self._cond:
                    self.lines.append(line)
                    self._cond.notify_all()
        except (OSError, ValueError):  # the stream was closed under us at teardown
            pass
        finally:
            with self._cond:
                self.closed = True
                self._cond.notify_all()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def snapshot(self) -> list[str]:
        with self._cond:
            return list(self.lines)

    def tail(self, n: int = 25) -> str:
        return "\n".join(self.snapshot()[-n:])

    def wait_for(
        self, predicate: Callable[[list[str]], T | None], what: str, timeout: float = WAIT
    ) -> T:
        """Wait until `predicate(lines)` returns something other than None, and return it.
        Raises TimeoutError, or EOFError when the pipe closed without it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                result = predicate(self.lines)
                if result is not None:
                    return result
                if self.closed:
                    raise EOFError(f"{self.name}: output ended before {what}\n{self.tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"{self.name}: no {what} within {timeout}s; last lines:\n{self.tail()}"
                    )
                self._cond.wait(left)

    def expect(self, needle: str, timeout: float = WAIT) -> str:
        """The next line (from the cursor) that contains `needle`; the cursor moves past it."""

        def find(lines: list[str]) -> str | None:
            for index in range(self.cursor, len(lines)):
                if needle in lines[index]:
                    self.cursor = index + 1
                    return lines[index]
            return None

        return self.wait_for(find, repr(needle), timeout)

    def expect_re(self, pattern: re.Pattern[str], timeout: float = WAIT) -> re.Match[str]:
        """Like `expect`, for the next line in which `pattern` is found."""

        def find(lines: list[str]) -> re.Match[str] | None:
            for index in range(self.cursor, len(lines)):
                match = pattern.search(lines[index])
                if match is not None:
                    self.cursor = index + 1
                    return match
            return None

        return self.wait_for(find, f"line matching {pattern.pattern!r}", timeout)

    def count(self, needle: str) -> int:
        return sum(needle in line for line in self.snapshot())


@dataclass
class Proc:
    """A process started in one of the lab's namespaces, with its output being read."""

    name: str
    host: str
    popen: subprocess.Popen[bytes]
    out: Output
    err: Output

    @property
    def pid(self) -> int:
        return self.popen.pid

    def expect(self, needle: str, timeout: float = WAIT) -> str:
        return self.out.expect(needle, timeout)

    def send_line(self, text: str) -> None:
        stdin = self.popen.stdin
        assert stdin is not None, f"{self.name} was started without a stdin pipe"
        stdin.write(text.encode() + b"\n")
        stdin.flush()

    def signal(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def wait(self, timeout: float = WAIT) -> int:
        """Wait (bounded) for the process to exit by itself; its exit code."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} (pid {self.pid}) still runs after {timeout}s\n"
                f"stdout:\n{self.out.tail()}\nstderr:\n{self.err.tail()}"
            ) from None

    def describe(self) -> str:
        return (
            f"--- {self.name} in {self.host} (pid {self.pid}, exit {self.popen.returncode})\n"
            f"stdout:\n{self.out.tail(40)}\nstderr:\n{self.err.tail(10)}"
        )


@dataclass(frozen=True)
class Row:
    """One row of a `kill -USR1` NAT table dump."""

    proto: str
    client: tuple[str, int]
    backend: tuple[str, int]
    nat_port: int
    state: str


@dataclass(frozen=True)
class TableDump:
    rows: int
    open: int
    entries: tuple[Row, ...]

    def row_of(self, client: tuple[str, int]) -> Row | None:
        for row in self.entries:
            if row.client == client:
                return row
        return None


# -- the test bed ------------------------------------------------------------------------------


class Bed:
    """A lab plus the processes of one test, and the helpers the tests share."""

    def __init__(self, lab: Lab, tmp: Path) -> None:
        self.lab = lab
        self.tmp = tmp
        self.procs: list[Proc] = []

    # processes

    def start(self, host: str, *argv: str, name: str | None = None, stdin: bool = False) -> Proc:
        popen = self.lab.popen(host, *argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL)
        label = name or f"{host}:{Path(argv[0]).name}"
        assert popen.stdout is not None and popen.stderr is not None
        proc = Proc(
            label,
            host,
            popen,
            Output(popen.stdout, f"{label} stdout"),
            Output(popen.stderr, f"{label} stderr"),
        )
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> int:
        """SIGTERM by pid (SIGKILL after a bound); the exit code."""
        return self.lab.stop(proc.popen)

    def close(self) -> None:
        """Stop every process of this test by pid (SIGTERM to all, then SIGKILL to any still
        running after STOP_TIMEOUT); show their output (pytest prints it for failed tests)."""
        try:
            terminate([p.popen for p in reversed(self.procs)], STOP_TIMEOUT)
        finally:
            for proc in self.procs:
                proc.out.join(2.0)
                proc.err.join(2.0)
                print(proc.describe())

    # chat

    def chat_server(self, host: str, port: int = BACKEND_PORT, name: str | None = None) -> Proc:
        label = name or host
        proc = self.start(
            host, *CHAT, "server", "--port", str(port), "--name", label, name=f"chat server {label}"
        )
        self.lab.wait_tcp_listening(host, port)
        return proc

    def chat_client(
        self, host: str, name: str, ip: str = LB_IP, port: int = VIP_PORT
    ) -> tuple[Proc, str]:
        """Start a chat client and wait for its greeting; (client, name of the server)."""
        proc = self.start(host, *CHAT, "client", ip, str(port), name, name=name, stdin=True)
        greeting = proc.expect(GREETING)
        return proc, greeting.split(GREETING, 1)[1].strip()

    # lbnat

    def lbnat(
        self,
        *options: str,
        backends: Sequence[str] = ("b1", "b2", "b3"),
        port: int = BACKEND_PORT,
    ) -> Proc:
        """`lbnat run LB_IP <backend> <port> ... OPTIONS` in the lb namespace, ready: its
        "srcIP" line seen and, if health checks are on, one report for every backend."""
        words: list[str] = []
        for backend in backends:
            words += [host_ip(backend), str(port)]
        if "--admin-socket" not in options:  # one per test: tests may run side by side
            options = (*options, "--admin-socket", str(self.tmp / "admin.sock"))
        argv = [console_script("lbnat"), "run", LB_IP, *words, *options]
        proc = self.start("lb", *argv, name="lbnat")
        self.wait_ready(proc, backends if "--no-health" not in options else (), port)
        return proc

    def wait_ready(
        self, proc: Proc, backends: Sequence[str] = (), port: int = BACKEND_PORT
    ) -> None:
        """lbnat's "srcIP" line, then (health checks on) one report line for each backend."""
        line = proc.expect("srcIP : ")
        assert line == f"srcIP : {LB_IP}", line
        for backend in backends:
            report = f"IP : {host_ip(backend)}, Port : {port} Server is"

            def reported(lines: list[str], report: str = report) -> bool | None:
                return True if any(report in x for x in lines) else None

            proc.out.wait_for(reported, f"a first health report of {backend}")

    def dump_table(self, lbnat: Proc, timeout: float = WAIT) -> TableDump:
        """`kill -USR1` lbnat and parse the table it prints."""
        lbnat.signal(signal.SIGUSR1)
        header = lbnat.out.expect_re(TABLE_RE, timeout)
        rows = int(header["rows"])
        entries: list[Row] = []
        # The dump runs on the packet loop's thread: only health lines can come in between.
        for _ in range(rows):
            match = lbnat.out.expect_re(ROW_RE, timeout)
            entries.append(
                Row(
                    match["proto"],
                    (match["ip"], int(match["port"])),
                    (match["bip"], int(match["bport"])),
                    int(match["nat"]),
                    match["state"],
                )
            )
        return TableDump(rows, int(header["open"]), tuple(entries))

    # nftables and sysctls in a namespace

    def nft_tables(self, host: str = "lb") -> list[str]:
        return self.lab.run(host, "nft", "list", "tables").stdout.split()

    def nft_counters(self, family: str, table: str, host: str = "lb") -> dict[str, int]:
        """Packets counted by the rules of an nft table, summed per rule comment."""
        listing = json.loads(self.lab.run(host, "nft", "-j", "list", "table", family, table).stdout)
        counters: dict[str, int] = {}
        for item in listing["nftables"]:
            rule = item.get("rule")
            if rule is None:
                continue
            label = str(rule.get("comment", f"handle {rule['handle']}"))
            for expr in rule["expr"]:
                if "counter" in expr:
                    counters[label] = counters.get(label, 0) + int(expr["counter"]["packets"])
        return counters

    def read_file(self, host: str, path: str) -> str:
        """A file as seen from inside a namespace (for per-namespace /proc/sys values)."""
        return self.lab.run(host, "cat", path).stdout.strip()


NGINX_CONF = """\
user root;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    default_type text/plain;
    keepalive_timeout 0;
    server {{
        listen {ip}:80;
        root {d}/www;
    }}
}}
"""


def start_nginx(bed: Bed, backend: str) -> Path:
    """Debian's nginx in a backend namespace, everything under tmp_path; its directory."""
    d = bed.tmp / f"nginx-{backend}"
    (d / "www").mkdir(parents=True)
    (d / "tmp").mkdir()
    (d / "www" / "index.html").write_text(f"backend {backend}\n")
    conf = d / "nginx.conf"
    conf.write_text(NGINX_CONF.format(d=d, ip=host_ip(backend)))
    bed.start(
        backend,
        "nginx", "-p", str(d), "-e", str(d / "error.log"), "-c", str(conf), "-g", "daemon off;",
        name=f"nginx {backend}",
    )  # fmt: skip
    bed.lab.wait_tcp_listening(backend, 80)
    return d


# Every test that uses a bed runs four times: lbnat with one worker (the packet loop in the main
# process) and with N worker processes behind PACKET_FANOUT (N = the cores, at least 2), each
# with the kernel fast path (tc: lbnat refuses to start without it, so a run here proves it
# ran) and without it (off: every packet through Python).
WORKER_COUNTS = (1, max(2, os.cpu_count() or 1))
OFFLOAD_MODES = ("tc", "off")
VARIANTS = [(workers, offload) for offload in OFFLOAD_MODES for workers in WORKER_COUNTS]


def variant_id(variant: tuple[int, str]) -> str:
    return f"{variant[0]}w-{variant[1]}"


@pytest.fixture(params=VARIANTS, ids=variant_id)
def bed(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Bed]:
    """A fresh lab (c1, c2, lb, b1..b3) for one test; everything gone afterwards."""
    if (reason := skip_reason()) is not None:
        pytest.skip(reason)
    workers, offload = request.param
    # read by lbnat and loadbalancerLobin; with a config file too
    monkeypatch.setenv("LBNAT_WORKERS", str(workers))
    monkeypatch.setenv("LBNAT_OFFLOAD", offload)
    require("nft")
    with Lab() as lab:
        testbed = Bed(lab, tmp_path)
        try:
            yield testbed
        finally:
            testbed.close()


def admin_json(bed: Bed, what: str) -> Any:
    """`lbnat WHAT --json` (status, sessions) on the test's admin socket, parsed."""
    done = bed.lab.run(
        "lb", console_script("lbnat"), what, "--json",
        "--admin-socket", str(bed.tmp / "admin.sock"), check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


MB = 1 << 20

def random_file(path: Path, size: int) -> str:
    """Write `size` random bytes (a whole number of MB) to `path`; their sha256."""
    digest = hashlib.sha256()
    with path.open("wb") as f:
        for _ in range(size // MB):
            chunk = os.urandom(MB)
            digest.update(chunk)
            f.write(chunk)
    return digest.hexdigest()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(MB):
            digest.update(chunk)
    return digest.hexdigest()
