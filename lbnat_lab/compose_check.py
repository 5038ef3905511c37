"""`make lab-compose-check`: the compose lab (scripts/compose/) brought up and used as a new user
would, checked end to end, and torn down again, also when a step fails.

::

    client 198.19.0.11 ─┐                              ┌─ b1 198.19.0.21 chat :9000 web :80
                        ├── network lab 198.19.0.0/24 ─┼─ b2 198.19.0.22 chat :9000 web :80
    lb 198.19.0.2 ──────┘   (project lbnatcheck)       └─ b3 198.19.0.23 chat :9000 web :80
    lbnat: 198.19.0.2:20000 -> chat, 198.19.0.2:8080 -> web, round-robin

1. A Docker engine: the one DOCKER_HOST (or the default socket) names, if it answers; else a
   dockerd of the check's own, with a private data root, exec root, pidfile and socket
   (/var/lib/lbnat-compose-check, /run/lbnat-compose-check*), its bridge and address pool in
   198.19.64.0/18 (benchmarking range). Docker sets the FORWARD policy to DROP and ip_forward
   to 1 and adds iptables chains: all of that is put back when it is stopped (by pid).
2. The image: FROM debian:bookworm-slim where it can be pulled; otherwise (or with
   --local-base / LBNAT_LOCAL_BASE=1) FROM lbnat-base:bookworm, built by
   scripts/build-base-image.sh (debootstrap + docker import), with --ca-bundle FILE carried
   into it when given (LBNAT_CA_BUNDLE).
3. `docker-compose up -d --build` (`docker compose` where Compose v2 is installed), then wait
   until lbnat reports all six backends alive.
4. Six chat clients test1..test6 in the client container: round-robin puts (1,4) (2,5) (3,6)
   on one server each, and each client's line reaches its group only; random lines come back
   intact; six HTTP requests to the web VIP port spread over b1 b2 b3; b2 stopped is dead
   within the documented time (fall x interval + timeout) and gets no requests, started again
   is alive again; `lbnat status` as the README runs it.
5. Down: containers and networks always; the dockerd it started, its bridge, its iptables
   chains and its runtime files always; the images it built and its data root only with
   --purge (kept, they make the next run fast).

Every command has a timeout. Prints a short transcript (the block in scripts/compose/README.md
comes from it: --readme rewrites that block). Needs root when it starts its own dockerd.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Protocol, TypeVar

from lbnat_lab.netns import REPO

T = TypeVar("T")

COMPOSE_FILE = REPO / "scripts" / "compose" / "docker-compose.yml"
COMPOSE_README = REPO / "scripts" / "compose" / "README.md"
BUILD_BASE_IMAGE = REPO / "scripts" / "build-base-image.sh"
PROJECT = "lbnatcheck"
OFFICIAL_BASE = "debian:bookworm-slim"
LOCAL_BASE = "lbnat-base:bookworm"
LAB_IMAGE = "lbnat-lab:latest"

# the lab's addresses (scripts/compose/docker-compose.yml)
VIP = "198.19.0.2"
CHAT_PORT = 20000
WEB_PORT = 8080
BACKENDS = {"b1": "198.19.0.21", "b2": "198.19.0.22", "b3": "198.19.0.23"}
# the health settings the lab runs with (docs/config.example.json's chat service)
HEALTH_INTERVAL = 5.0
HEALTH_TIMEOUT = 2.0
HEALTH_FALL = 3
DEAD_WITHIN = HEALTH_FALL * HEALTH_INTERVAL + HEALTH_TIMEOUT + 5.0  # + polling, a busy CI
ALIVE_WITHIN = HEALTH_INTERVAL + HEALTH_TIMEOUT + 8.0  # + the container's start

# the private engine
STATE_DIR = Path("/var/lib/lbnat-compose-check")
EXEC_ROOT = Path("/run/lbnat-compose-check")
PIDFILE = Path("/run/lbnat-compose-check.pid")
SOCKET = Path("/run/lbnat-compose-check.sock")
# dockerd makes these whatever its roots (plugin discovery; 20.10's trust key): removed if they
# were not there before
PLUGIN_DIRS = (Path("/run/docker/plugins"), Path("/run/docker"))
TRUST_KEY = Path("/etc/docker/key.json")
BRIDGE = "lbnatchk0"
BRIDGE_ADDRESS = "198.19.96.1/24"
ADDRESS_POOL = "base=198.19.64.0/19,size=24"

README_BEGIN = "<!-- compose-check transcript: begin (make lab-compose-check ARGS=--readme) -->"
README_END = "<!-- compose-check transcript: end -->"


class CheckFailed(Exception):
    """A step of the check did not hold: the message says which and what was seen."""


class Interrupted(Exception):
    """SIGTERM/SIGINT/SIGHUP: stop, and tear down on the way out."""


# --- running commands ------------------------------------------------------------------------


def run(
    argv: Sequence[str],
    timeout: float,
    env: dict[str, str] | None = None,
    check: bool = True,
    input_text: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """A command with a timeout; stdout and stderr captured. check: CheckFailed unless it
    exits 0."""
    try:
        result = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, env=env,
            input=input_text, stdin=None if input_text is not None else subprocess.DEVNULL,
        )  # fmt: skip
    except subprocess.TimeoutExpired as error:
        raise CheckFailed(f"{' '.join(argv)}: no result within {timeout:.0f} s") from error
    except FileNotFoundError as error:
        raise CheckFailed(f"{argv[0]}: not installed") from error
    if check and result.returncode != 0:
        output = (result.stdout + result.stderr)[-3000:]
        raise CheckFailed(f"{' '.join(argv)} exited {result.returncode}:\n{output}")
    return result


def wait_until(what: str, timeout: float, probe: Callable[[], T | None], every: float = 0.5) -> T:
    """probe() until it returns something other than None; CheckFailed after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None:
            return value
        if time.monotonic() >= deadline:
            raise CheckFailed(f"no {what} within {timeout:.0f} s")
        time.sleep(every)


class Transcript:
    """What the check prints: one line per step, with the seconds since the start."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.lines: list[str] = []

    def say(self, text: str) -> None:
        for line in text.splitlines() or [""]:
            stamped = f"[{time.monotonic() - self.started:6.1f}s] {line}"
            self.lines.append(stamped)
            print(stamped, flush=True)


# --- the engine ------------------------------------------------------------------------------


def engine_answers(env: dict[str, str]) -> bool:
    try:
        result = subprocess.run(
            ["docker", "version", "--format", "{{.Server.Version}}"],
            capture_output=True, text=True, timeout=15, env=env, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except (subprocess.TimeoutExpired, FileNotFoundError):
        return False
    return result.returncode == 0 and result.stdout.strip() != ""


def forward_policy() -> str | None:
    """The iptables FORWARD chain's policy (ACCEPT, DROP), None without iptables."""
    try:
        result = run(["iptables", "-S", "FORWARD"], timeout=15, check=False)
    except CheckFailed:
        return None
    match = re.search(r"^-P FORWARD (\w+)$", result.stdout, re.MULTILINE)
    return match.group(1) if match else None


def nft_tables() -> set[str]:
    result = run(["nft", "list", "tables"], timeout=15, check=False)
    return {line.strip() for line in result.stdout.splitlines() if line.startswith("table ")}


def nft_chains() -> set[tuple[str, str, str]]:
    """Every (family, table, chain) of the ruleset."""
    return parse_nft_chains(run(["nft", "list", "chains"], timeout=15, check=False).stdout)


def parse_nft_chains(listing: str) -> set[tuple[str, str, str]]:
    """(family, table, chain) for every chain of an `nft list chains` listing."""
    chains: set[tuple[str, str, str]] = set()
    table: list[str] = []
    for line in listing.splitlines():
        words = line.split()
        if words[:1] == ["table"] and len(words) >= 3:
            table = words[1:3]
        elif words[:1] == ["chain"] and len(words) >= 2 and len(table) == 2:
            chains.add((table[0], table[1], words[1]))
    return chains


@dataclass
class PrivateEngine:
    """A dockerd of the check's own, and what it changed on the host, to put back."""

    say: Callable[[str], None]
    proc: subprocess.Popen[bytes] | None = None
    ip_forward: str = ""
    policy: str | None = None
    tables_before: set[str] = field(default_factory=set)
    chains_before: set[tuple[str, str, str]] = field(default_factory=set)
    bridge_made: bool = False
    dirs_made: list[Path] = field(default_factory=list)
    key_made: bool = False

    @property
    def env(self) -> dict[str, str]:
        return dict(os.environ, DOCKER_HOST=f"unix://{SOCKET}")

    def start(self) -> None:
        if os.geteuid() != 0:
            raise CheckFailed("no Docker engine answers, and starting one needs root")
        if shutil.which("dockerd") is None:
            raise CheckFailed("no Docker engine answers and no dockerd (apt-get install docker.io)")
        if PIDFILE.exists():
            raise CheckFailed(
                f"{PIDFILE} exists: another check's dockerd may be running (if not, remove it)"
            )
        self.ip_forward = Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()
        self.policy = forward_policy()
        self.tables_before = nft_tables()
        self.chains_before = nft_chains()
        self.dirs_made = [d for d in PLUGIN_DIRS if not d.exists()]
        self.key_made = not TRUST_KEY.exists()
        # a bridge of its own (not docker0, which a stopped system Docker may own)
        if not Path(f"/sys/class/net/{BRIDGE}").exists():
            run(["ip", "link", "add", BRIDGE, "type", "bridge"], timeout=15)
            self.bridge_made = True
            run(["ip", "addr", "add", BRIDGE_ADDRESS, "dev", BRIDGE], timeout=15)
            run(["ip", "link", "set", BRIDGE, "up"], timeout=15)
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        log = (STATE_DIR / "dockerd.log").open("ab")
        self.proc = subprocess.Popen(
            ["dockerd",
             "--data-root", str(STATE_DIR / "docker"),
             "--exec-root", str(EXEC_ROOT),
             "--pidfile", str(PIDFILE),
             "--host", f"unix://{SOCKET}",
             "--bridge", BRIDGE,
             "--default-address-pool", ADDRESS_POOL],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
        log.close()
        self.say(f"engine: started dockerd pid {self.proc.pid} (data root {STATE_DIR}/docker, "
                 f"socket {SOCKET}, bridge {BRIDGE} {BRIDGE_ADDRESS})")  # fmt: skip

        def up() -> bool | None:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise CheckFailed(
                    f"dockerd exited {self.proc.returncode}; see {STATE_DIR / 'dockerd.log'}"
                )
            return True if engine_answers(self.env) else None

        wait_until("answer from the dockerd it started", 60, up)

    def stop(self) -> None:
        """Stop dockerd by pid and put back what it changed. Safe after a partial start."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=45)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
            self.say(f"engine: dockerd pid {self.proc.pid} stopped")
        if self.proc is not None:
            self._restore_host()
        for path in (PIDFILE, SOCKET):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        shutil.rmtree(EXEC_ROOT, ignore_errors=True)
        for directory in self.dirs_made:  # only if empty: someone else's plugin stays
            with contextlib.suppress(OSError):
                directory.rmdir()
        self.dirs_made = []
        if self.key_made:
            with contextlib.suppress(FileNotFoundError):
                TRUST_KEY.unlink()
            self.key_made = False
        if self.bridge_made:
            run(["ip", "link", "del", BRIDGE], timeout=15, check=False)
            self.bridge_made = False
        self.proc = None

    def _restore_host(self) -> None:
        # what dockerd added to the ruleset: whole tables it created; in tables that were
        # there before, its rules in the chains that were there too, then the chains it made
        for table in sorted(nft_tables() - self.tables_before):
            family_and_name = table.removeprefix("table ").split()
            run(["nft", "delete", "table", *family_and_name], timeout=15, check=False)
        for table in ("filter", "nat"):
            if f"table ip {table}" in self.tables_before:
                remove_docker_rules(table)
        new_chains = sorted(nft_chains() - self.chains_before)
        for verb in ("flush", "delete"):  # no chain is deleted while another jumps to it
            for family, table, chain in new_chains:
                run(["nft", verb, "chain", family, table, chain], timeout=15, check=False)
        # (a table deleted above took its policy with it; `iptables -P` would make it again)
        if self.policy is not None and "table ip filter" in self.tables_before:
            run(["iptables", "-P", "FORWARD", self.policy], timeout=15, check=False)
        if self.ip_forward:
            Path("/proc/sys/net/ipv4/ip_forward").write_text(self.ip_forward + "\n")
        self.say(f"engine: FORWARD policy {self.policy}, ip_forward {self.ip_forward} "
                 "restored; Docker's iptables chains removed")  # fmt: skip


def remove_docker_rules(table: str) -> None:
    """Docker's rules in the chains of an iptables table that existed before it started:
    every rule that jumps to a DOCKER chain or names its bridges (its own chains go after)."""
    listing = run(["iptables", "-t", table, "-S"], timeout=15, check=False).stdout
    for rule in docker_rules(listing):
        run(["iptables", "-t", table, "-D", *rule], timeout=15, check=False)


def docker_rules(listing: str) -> list[list[str]]:
    """From an `iptables -S` listing, the rules Docker added to chains not its own (chain name
    first, as `iptables -D` takes them): jumps to its chains, rules naming its bridges."""
    rules = []
    for line in listing.splitlines():
        words = line.split()
        if words[:1] != ["-A"] or len(words) < 2 or words[1].startswith("DOCKER"):
            continue
        if "DOCKER" in line or BRIDGE in words or any(w.startswith("br-") for w in words):
            rules.append(words[1:])
    return rules


# --- the lab ---------------------------------------------------------------------------------


def compose_command(env: dict[str, str]) -> list[str]:
    """`docker compose` (v2) where it is installed, else Debian 12's `docker-compose`."""
    with contextlib.suppress(CheckFailed):
        if run(["docker", "compose", "version"], timeout=30, env=env, check=False).returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose") is not None:
        return ["docker-compose"]
    raise CheckFailed(
        "no `docker compose` and no `docker-compose` (apt-get install docker-compose)"
    )


class Lines:
    """Every line a pipe gives, read by a daemon thread; bounded waits on them."""

    def __init__(self, stream: IO[bytes], name: str) -> None:
        self.name = name
        self.lines: list[str] = []
        self.closed = False
        self._cond = threading.Condition()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: IO[bytes]) -> None:
        try:
            for raw in iter(stream.readline, b""):
                with self._cond:
                    self.lines.append(raw.decode(errors="replace").rstrip("\r\n"))
                    self._cond.notify_all()
        except (OSError, ValueError):
            pass
        finally:
            with self._cond:
                self.closed = True
                self._cond.notify_all()

    def expect(self, needle: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if needle in line:
                        return line
                left = deadline - time.monotonic()
                if self.closed or left <= 0:
                    tail = "\n".join(self.lines[-10:])
                    raise CheckFailed(f"{self.name}: no {needle[:80]!r} within {timeout:.0f} s; "
                                      f"it printed:\n{tail}")  # fmt: skip
                self._cond.wait(left)

    def snapshot(self) -> list[str]:
        with self._cond:
            return list(self.lines)


@dataclass
class ChatClient:
    name: str
    proc: subprocess.Popen[bytes]
    out: Lines
    server: str = ""

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def quit(self) -> None:
        with contextlib.suppress(OSError):
            self.send("q")
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


@dataclass
class Lab:
    """The compose project, driven with the compose command the machine has."""

    compose: list[str]
    env: dict[str, str]
    say: Callable[[str], None]
    vip: str = VIP
    clients: list[ChatClient] = field(default_factory=list)
    _containers: dict[str, str] = field(default_factory=dict)

    def cmd(self, *args: str) -> list[str]:
        return [*self.compose, "-p", PROJECT, "-f", str(COMPOSE_FILE), *args]

    def container(self, service: str) -> str:
        """The service's container id (asked once: a stop and start keep the container)."""
        if service not in self._containers:
            cid = run(self.cmd("ps", "-q", service), timeout=60, env=self.env).stdout.strip()
            if not cid:
                raise CheckFailed(f"no container for service {service}")
            self._containers[service] = cid
        return self._containers[service]

    def status(self) -> dict[str, object]:
        """`lbnat status --json` in the LB container (the admin socket)."""
        reply = run(["docker", "exec", self.container("lb"), "lbnat", "status", "--json"],
                    timeout=20, env=self.env)  # fmt: skip
        status: dict[str, object] = json.loads(reply.stdout)
        return status

    def health(self) -> dict[tuple[str, str], str]:
        return backend_health(self.status())

    def web_get(self, count: int) -> list[str]:
        """Which backend served each of `count` requests from the client container."""
        return [self.curl() for _ in range(count)]

    def curl(self) -> str:
        url = f"http://{self.vip}:{WEB_PORT}/"
        client = self.container("client")
        command = ["docker", "exec", client, "curl", "-sS", "--max-time", "5", url]
        body = run(command, timeout=20, env=self.env).stdout
        match = re.fullmatch(r"backend (b\d)\n", body)
        if match is None:
            raise CheckFailed(f"the web VIP answered {body!r}, not a backend's page")
        return match.group(1)

    def chat_client(self, name: str) -> ChatClient:
        proc = subprocess.Popen(
            ["docker", "exec", "-i", self.container("client"), "lbnat-chat", "client", self.vip,
             str(CHAT_PORT), name],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=self.env,
        )  # fmt: skip
        chat = open_chat(name, proc)
        self.clients.append(chat)
        return chat

    def close_clients(self) -> None:
        close_chats(self.clients)


def open_chat(name: str, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> ChatClient:
    """A chat client started as `proc`, once the server has greeted it (which backend)."""
    assert proc.stdout is not None
    chat = ChatClient(name, proc, Lines(proc.stdout, name))
    greeting = chat.out.expect("* connected to ", timeout=timeout)
    chat.server = greeting.split("* connected to ", 1)[1].strip()
    return chat


def close_chats(clients: list[ChatClient]) -> None:
    for chat in clients:
        if chat.proc.poll() is None:
            chat.quit()
    clients.clear()


def backend_health(status: dict[str, object]) -> dict[tuple[str, str], str]:
    """(service, backend name) -> alive/bad/dead, from `lbnat status --json`."""
    health: dict[tuple[str, str], str] = {}
    services = status["services"]
    assert isinstance(services, list)
    for service in services:
        for backend in service["backends"]:
            health[(service["name"], backend["name"])] = backend["health"]
    return health


class ChatLab(Protocol):
    """What check_chat and check_web need of a lab, whatever runs it."""

    vip: str

    def say(self, text: str) -> None: ...

    def chat_client(self, name: str) -> ChatClient: ...

    def close_clients(self) -> None: ...

    def web_get(self, count: int) -> list[str]: ...


def check_web(lab: ChatLab, expect: set[str], count: int) -> list[str]:
    served = lab.web_get(count)
    if set(served) != expect:
        raise CheckFailed(
            f"HTTP through {lab.vip}:{WEB_PORT} reached {served}, not {sorted(expect)}"
        )
    return served


def check_chat(lab: ChatLab) -> None:
    """Six clients; (1,4) (2,5) (3,6) share a server; each line reaches its group only; random
    lines of every length up to the chat's limit come back intact."""
    chats = [lab.chat_client(f"test{i}") for i in range(1, 7)]
    landed = [c.server for c in chats]
    lab.say(f"chat: test1..test6 landed on {' '.join(landed)}")
    if landed[:3] != landed[3:] or len(set(landed[:3])) != 3 or not set(landed) <= set(BACKENDS):
        raise CheckFailed(f"round-robin did not group (1,4) (2,5) (3,6): {landed}")
    for i, chat in enumerate(chats, start=1):
        chat.send(f"hello from test{i}")
    for i in range(1, 7):
        peer = i + 3 if i <= 3 else i - 3
        for receiver in (i, peer):
            chats[receiver - 1].out.expect(f"[test{i}] hello from test{i}", timeout=30)
    # a server relays to all its clients at once: a stray line would be there by now
    for i, chat in enumerate(chats, start=1):
        group = {i, i + 3 if i <= 3 else i - 3}
        lines = chat.out.snapshot()
        heard = {j for j in range(1, 7) if f"[test{j}] hello from test{j}" in lines}
        if heard != group:
            raise CheckFailed(f"test{i} heard the lines of {sorted(heard)}, not {sorted(group)}")
    lab.say("chat: each line reached its own group only: (1,4) (2,5) (3,6)")

    sent = 0
    for length in (1, 100, 1000, 4000):
        data = secrets.token_urlsafe(length)[:length]
        chats[0].send(data)
        for chat in (chats[0], chats[3]):
            chat.out.expect(f"[test1] {data}", timeout=30)
        sent += length
    lab.say(f"chat: {sent} random characters in 4 lines echoed intact through "
            f"{lab.vip}:{CHAT_PORT}")  # fmt: skip
    lab.close_clients()


def check_health(lab: Lab) -> None:
    """b2 stopped: dead (chat and web) within the documented time, no HTTP requests; started
    again: alive, and served again."""
    run(lab.cmd("stop", "-t", "5", "b2"), timeout=60, env=lab.env)
    stopped = time.monotonic()

    def b2_dead() -> bool | None:
        health = lab.health()
        return True if health[("chat", "b2")] == health[("web", "b2")] == "dead" else None

    wait_until("dead b2 in lbnat status", DEAD_WITHIN, b2_dead)
    lab.say(f"health: b2 stopped; dead after {time.monotonic() - stopped:.1f} s "
            f"(documented: {HEALTH_FALL} failed probes {HEALTH_INTERVAL:.0f} s apart)")  # fmt: skip
    served = check_web(lab, {"b1", "b3"}, 4)
    lab.say(f"web: with b2 dead: {' '.join(served)}")

    run(lab.cmd("start", "b2"), timeout=60, env=lab.env)
    started = time.monotonic()

    def b2_alive() -> bool | None:
        health = lab.health()
        return True if health[("chat", "b2")] == health[("web", "b2")] == "alive" else None

    wait_until("alive b2 in lbnat status", ALIVE_WITHIN, b2_alive)
    lab.say(f"health: b2 started; alive after {time.monotonic() - started:.1f} s")
    served = check_web(lab, set(BACKENDS), 3)
    lab.say(f"web: {' '.join(served)}")


# --- the whole check -------------------------------------------------------------------------


def image_exists(image: str, env: dict[str, str]) -> bool:
    inspect = ["docker", "image", "inspect", image]
    return run(inspect, timeout=30, env=env, check=False).returncode == 0


def base_image(
    env: dict[str, str], local: bool, ca_bundle: str | None, say: Callable[[str], None]
) -> tuple[str, bool]:
    """The image to build FROM, and whether this run built it."""
    if not local:
        if image_exists(OFFICIAL_BASE, env):
            say(f"image: base {OFFICIAL_BASE} (present)")
            return OFFICIAL_BASE, False
        pulled = run(["docker", "pull", OFFICIAL_BASE], timeout=300, env=env, check=False)
        if pulled.returncode == 0:
            say(f"image: base {OFFICIAL_BASE} (pulled)")
            return OFFICIAL_BASE, False
        reason = (pulled.stderr.strip().splitlines() or ["?"])[-1]
        say(f"image: cannot pull {OFFICIAL_BASE} ({reason[:100]}); a local base instead")
    if image_exists(LOCAL_BASE, env):
        say(f"image: base {LOCAL_BASE} (present, from scripts/build-base-image.sh)")
        return LOCAL_BASE, False
    argv = ["bash", str(BUILD_BASE_IMAGE), "--tag", LOCAL_BASE]
    if ca_bundle:
        argv += ["--ca-bundle", ca_bundle]
    started = time.monotonic()
    run(argv, timeout=1200, env=env)
    carried = f", carrying {ca_bundle}" if ca_bundle else ""
    say(f"image: base {LOCAL_BASE} built by scripts/build-base-image.sh (debootstrap) in "
        f"{time.monotonic() - started:.0f} s{carried}")  # fmt: skip
    return LOCAL_BASE, True


def check(args: argparse.Namespace, say: Callable[[str], None]) -> None:
    env = dict(os.environ)
    engine: PrivateEngine | None = None
    lab: Lab | None = None
    built: list[str] = []
    try:
        if engine_answers(env):
            say(f"engine: using the running one ({env.get('DOCKER_HOST', 'default socket')})")
        else:
            engine = PrivateEngine(say)
            engine.start()
            env = engine.env
        compose = compose_command(env)
        version = run([*compose, "version", "--short"], timeout=30, env=env, check=False)
        say(f"compose: {' '.join(compose)} {version.stdout.strip()}")
        base, built_base = base_image(env, args.local_base, args.ca_bundle, say)
        if built_base:
            built.append(base)
        env = dict(env, LBNAT_BASE_IMAGE=base)
        lab = Lab(compose, env, say)

        had_lab_image = image_exists(LAB_IMAGE, env)
        started = time.monotonic()
        run(lab.cmd("up", "-d", "--build"), timeout=1200, env=env)
        if not had_lab_image:
            built.append(LAB_IMAGE)
        say(f"lab: {' '.join(compose)} -f scripts/compose/docker-compose.yml up -d --build: "
            f"{time.monotonic() - started:.0f} s")  # fmt: skip

        def all_alive() -> bool | None:
            with contextlib.suppress(CheckFailed, KeyError, ValueError):
                health = lab.health()
                if len(health) == 6 and set(health.values()) == {"alive"}:
                    return True
            return None

        wait_until("six alive backends in lbnat status", 60, all_alive)
        say("lab: lbnat up, chat and web backends b1 b2 b3 alive")

        served = check_web(lab, set(BACKENDS), 6)
        if served[:3] != served[3:]:
            raise CheckFailed(f"HTTP requests were not round-robin: {served}")
        say(f"web: 6 requests to {VIP}:{WEB_PORT} served by {' '.join(served)}")
        check_chat(lab)
        check_health(lab)

        status = run(lab.cmd("exec", "-T", "lb", "lbnat", "status"), timeout=60, env=env)
        say(f"$ {' '.join(compose)} -f scripts/compose/docker-compose.yml exec lb lbnat status")
        say(status.stdout.rstrip())
    finally:
        teardown(lab, engine, env, built, args.purge, say)


def teardown(
    lab: Lab | None,
    engine: PrivateEngine | None,
    env: dict[str, str],
    built: list[str],
    purge: bool,
    say: Callable[[str], None],
) -> None:
    """Everything the check made, also after a failure; each step on its own."""
    # no signal may cut the teardown short (a second Ctrl-C would leave the engine running)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    if lab is not None:
        lab.close_clients()
        down = run(lab.cmd("down", "--volumes", "--remove-orphans", "--timeout", "5"),
                   timeout=180, env=env, check=False)  # fmt: skip
        say("down: containers and network removed" if down.returncode == 0
            else f"down: FAILED: {down.stderr.strip()[-500:]}")  # fmt: skip
    if purge and engine is None:  # a private engine's images go with its data root
        for image in built:
            run(["docker", "image", "rm", "-f", image], timeout=60, env=env, check=False)
        if built:
            say(f"down: images it built removed: {' '.join(built)}")
    if engine is not None:
        engine.stop()
        if purge:
            shutil.rmtree(STATE_DIR, ignore_errors=True)
            say(f"down: {STATE_DIR} removed")
        else:
            say(f"down: images kept in {STATE_DIR} for the next run (--purge removes them)")


def rewrite_readme(readme: Path, begin_marker: str, end_marker: str, lines: list[str]) -> None:
    """Put a check's transcript between the README's markers (the labs' output blocks)."""
    text = readme.read_text()
    begin, end = text.find(begin_marker), text.find(end_marker)
    if begin < 0 or end < begin:
        raise CheckFailed(f"{readme} has no transcript markers")
    block = "\n".join([begin_marker, "```text", *lines, "```", ""])
    readme.write_text(text[:begin] + block + text[end:])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="lab-compose-check", description="the compose lab, end to end (see the module doc)"
    )
    parser.add_argument(
        "--local-base",
        action="store_true",
        default=os.environ.get("LBNAT_LOCAL_BASE", "") == "1",
        help=f"build FROM {LOCAL_BASE} (scripts/build-base-image.sh) without trying to pull "
        f"{OFFICIAL_BASE} (LBNAT_LOCAL_BASE=1)",
    )
    parser.add_argument(
        "--ca-bundle",
        default=os.environ.get("LBNAT_CA_BUNDLE") or None,
        help="carry this CA bundle into a locally built base image (LBNAT_CA_BUNDLE)",
    )
    parser.add_argument(
        "--purge",
        action="store_true",
        help="also remove the images it built and its dockerd's data root",
    )
    parser.add_argument(
        "--readme", action="store_true", help=f"rewrite the transcript block of {COMPOSE_README}"
    )
    return parser.parse_args(argv)


def interrupt_on_signals() -> None:
    """SIGINT, SIGTERM and SIGHUP raise Interrupted, so the check's teardown runs."""

    def interrupted(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(signal.Signals(signum).name)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupted)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    transcript = Transcript()
    interrupt_on_signals()
    try:
        check(args, transcript.say)
    except (CheckFailed, Interrupted) as error:
        print(f"lab-compose-check: FAILED: {error}", file=sys.stderr, flush=True)
        return 1 if isinstance(error, CheckFailed) else 130
    transcript.say(f"lab-compose-check: passed in {time.monotonic() - transcript.started:.0f} s")
    if args.readme:
        rewrite_readme(COMPOSE_README, README_BEGIN, README_END, transcript.lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
