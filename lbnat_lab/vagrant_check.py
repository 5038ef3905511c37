"""`make lab-vagrant-check`: the Vagrant lab (vagrant/) brought up on libvirt and used as a new
user would, checked end to end, and torn down again, also when a step fails.

::

    client 198.18.0.11 ─┐                             ┌─ b1 198.18.0.21 chat :9000 web :80
    lb1 198.18.0.3 ─────┼── lab network 198.18.0.0/24 ┼─ b2 198.18.0.22 chat :9000 web :80
    lb2 198.18.0.4 ─────┘   libvirt network lbnat-lab └─ b3 198.18.0.23 chat :9000 web :80
                            (isolated, no forwarding)
    VIP 198.18.0.2 on the keepalived master (lb1 first); lbnat.service on lb1 and lb2, synced:
    198.18.0.2:20000 -> chat, 198.18.0.2:8080 -> web, round-robin
    every VM's eth0: Vagrant's management network lbnat-mgmt, 198.19.200.0/24 (ssh, apt)

1. What it needs (vagrant, vagrant-libvirt, libvirt's daemons, qemu, ...): it installs
   nothing, it says what is missing and the apt line (vagrant/README.md).
2. libvirt: the running libvirtd if `virsh -c qemu:///system` answers; else virtlogd and
   libvirtd of its own, started by hand and stopped again by pid at the end. The driver: kvm
   where libvirt offers it and /dev/kvm runs a guest for libvirt's qemu user (a
   one-instruction probe, in a child process as that user, with a timeout), else qemu
   (software emulation, CPU model Nehalem).
3. The box: LBNAT_BOX / --box when given; else the official debian/bookworm64 when it is
   there, else lbnat/bookworm-local when it is there, else the official one added from Vagrant
   Cloud, else (or with --local-box) lbnat/bookworm-local built by
   scripts/build-vagrant-box.sh (debootstrap), with --ca-bundle carried into it.
4. `vagrant up --provider=libvirt` in vagrant/ (the six VMs in parallel), its own
   VAGRANT_DOTFILE_PATH, the management network in 198.19.200.0/24; then until lbnat reports
   its six backends (chat and web on b1 b2 b3) alive.
5. As the README says: HTTP round-robin over b1 b2 b3 on the web VIP port (curl on the
   client); six chat clients test1..test6 on the client, (1,4) (2,5) (3,6) on one server each
   and each line reaching its group only; random lines echoed intact through the VIP;
   `sudo systemctl stop lbnat-chat` on b2: dead within the documented time (fall x interval +
   timeout), no new chat client reaches it while the web service keeps all three; `start`:
   alive again; `sudo lbnat status` on the LB. The many small commands go through
   `vagrant ssh-config` and ssh (each `vagrant ssh` costs seconds); the documented ones run as
   `vagrant ssh VM -c ...`.
6. Down, always: `vagrant destroy -f`, then whatever is left of what it made: domains, the
   libvirt networks (lbnat-mgmt, lbnat-lab) and networks its libvirtd autostarted, storage
   volumes (the box's image in the pool too) and a pool it made, the daemons it started and
   then (a running libvirtd owns them) ip_forward and the nftables tables and chains libvirt
   added. Its work directory (logs, console logs, Vagrant's state) goes too, unless a step
   failed: then the logs stay for a look.

Every command has a timeout. Prints a short transcript (the block in vagrant/README.md comes
from it: --readme rewrites that block). Needs root (libvirt's system daemon, the box build).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import ipaddress
import json
import mmap
import os
import pwd
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from lbnat_lab.compose_check import (
    HEALTH_FALL,
    HEALTH_INTERVAL,
    HEALTH_TIMEOUT,
    ChatClient,
    CheckFailed,
    Interrupted,
    Transcript,
    backend_health,
    check_chat,
    check_web,
    close_chats,
    interrupt_on_signals,
    nft_chains,
    nft_tables,
    open_chat,
    rewrite_readme,
    run,
    wait_until,
)
from lbnat_lab.netns import REPO

VAGRANT_DIR = REPO / "vagrant"
VAGRANT_README = VAGRANT_DIR / "README.md"
BUILD_BOX = REPO / "scripts" / "build-vagrant-box.sh"
OFFICIAL_BOX = "debian/bookworm64"
LOCAL_BOX = "lbnat/bookworm-local"
MGMT_NET = "198.19.200.0/24"  # benchmarking range, away from the compose check's 198.19.0-127
NETWORKS = ("lbnat-mgmt", "lbnat-lab")  # the Vagrantfile's libvirt networks
VMS = ("b1", "b2", "b3", "lb1", "lb2", "client")
LBS = {"lb1": "198.18.0.3", "lb2": "198.18.0.4"}  # the pair; lb1 is master first (priority)
LIBVIRT = "qemu:///system"
VIRTLOGD_SOCKET = Path("/run/libvirt/virtlogd-sock")
# what libvirt leaves of a domain or a network once they are gone: qemu's log, dnsmasq's files
LIBVIRT_FILES = (Path("/var/log/libvirt/qemu"), Path("/var/lib/libvirt/dnsmasq"))

# the lab's addresses (vagrant/Vagrantfile)
VIP = "198.18.0.2"
CHAT_PORT = 20000
WEB_PORT = 8080
BACKENDS = {"b1": "198.18.0.21", "b2": "198.18.0.22", "b3": "198.18.0.23"}
# docs/config.example.json's health settings, with room for software emulation
DEAD_WITHIN = HEALTH_FALL * HEALTH_INTERVAL + HEALTH_TIMEOUT + 15.0  # + a status poll over ssh
ALIVE_WITHIN = HEALTH_INTERVAL + HEALTH_TIMEOUT + 20.0  # + the chat server's start

WORK_DIR = Path("/var/tmp/lbnat-vagrant-check")  # the qemu user reaches it: console logs

README_BEGIN = "<!-- vagrant-check transcript: begin (make lab-vagrant-check ARGS=--readme) -->"
README_END = "<!-- vagrant-check transcript: end -->"

# what the check runs, and the Debian package that has it
NEEDED = {
    "vagrant": "vagrant",
    "virsh": "libvirt-clients",
    "libvirtd": "libvirt-daemon-system",
    "virtlogd": "libvirt-daemon-system",
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "dnsmasq": "dnsmasq-base",
    "iptables": "iptables",
    "nft": "nftables",
    "rsync": "rsync",
    "ssh": "openssh-client",
}
APT_LINE = (
    "apt-get install --no-install-recommends vagrant vagrant-libvirt libvirt-daemon-system "
    "libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 qemu-utils dnsmasq-base "
    "iptables nftables rsync openssh-client"
)


def missing_prerequisites() -> list[str]:
    """The Debian packages whose commands (or the vagrant-libvirt plugin) are missing."""
    missing = sorted({package for cmd, package in NEEDED.items() if shutil.which(cmd) is None})
    if shutil.which("vagrant") is not None:
        plugins = run(["vagrant", "plugin", "list"], timeout=120, check=False)
        if "vagrant-libvirt" not in plugins.stdout:
            missing.append("vagrant-libvirt")
    return missing


# --- KVM or software emulation ---------------------------------------------------------------

# <linux/kvm.h>, x86-64
KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_GET_VCPU_MMAP_SIZE = 0xAE04
KVM_CREATE_VCPU = 0xAE41
KVM_SET_USER_MEMORY_REGION = 0x4020AE46  # _IOW(0xAE, 0x46, struct kvm_userspace_memory_region)
KVM_RUN = 0xAE80
KVM_SET_REGS = 0x4090AE82  # _IOW(0xAE, 0x82, struct kvm_regs), 144 bytes
KVM_GET_SREGS = 0x8138AE83  # _IOR(0xAE, 0x83, struct kvm_sregs), 312 bytes
KVM_SET_SREGS = 0x4138AE84
KVM_EXIT_HLT = 5
GUEST_ADDRESS = 0x1000


def kvm_runs_a_guest() -> bool:
    """Whether /dev/kvm runs a guest: one page holding `hlt`, in real mode, one vCPU run;
    True when it exits with KVM_EXIT_HLT. (A /dev/kvm that opens may still refuse guests.)
    Call it in a child process (kvm_probe): a KVM_RUN that never returns must not hang the
    check."""
    fds: list[int] = []
    try:
        kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        fds.append(kvm)
        if fcntl.ioctl(kvm, KVM_GET_API_VERSION, 0) != 12:
            return False
        vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
        fds.append(vm)
        memory = mmap.mmap(-1, mmap.PAGESIZE)
        memory[0] = 0xF4  # hlt
        page = ctypes.c_char.from_buffer(memory)  # (holds the mapping while the guest runs)
        region = struct.pack("=IIQQQ", 0, 0, GUEST_ADDRESS, mmap.PAGESIZE, ctypes.addressof(page))
        fcntl.ioctl(vm, KVM_SET_USER_MEMORY_REGION, region)
        vcpu = fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)
        fds.append(vcpu)
        run_size = fcntl.ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0)
        run_area = mmap.mmap(vcpu, run_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        sregs = bytearray(312)
        fcntl.ioctl(vcpu, KVM_GET_SREGS, sregs, True)
        struct.pack_into("=Q", sregs, 0, 0)  # cs.base
        struct.pack_into("=H", sregs, 12, 0)  # cs.selector
        fcntl.ioctl(vcpu, KVM_SET_SREGS, bytes(sregs))
        regs = bytearray(144)
        struct.pack_into("=QQ", regs, 16 * 8, GUEST_ADDRESS, 0x2)  # rip, rflags
        fcntl.ioctl(vcpu, KVM_SET_REGS, bytes(regs))
        fcntl.ioctl(vcpu, KVM_RUN, 0)
        exit_reason: int = struct.unpack_from("=I", run_area, 8)[0]
        del page
        return exit_reason == KVM_EXIT_HLT
    except OSError:
        return False
    finally:
        for fd in reversed(fds):
            os.close(fd)


def qemu_user() -> tuple[int, int, list[int]] | None:
    """uid, gid and groups of the user libvirt runs qemu as: qemu.conf's `user`, else
    Debian's libvirt-qemu; None: not known (then the probe runs as root)."""
    name = "libvirt-qemu"
    with contextlib.suppress(OSError):
        conf = Path("/etc/libvirt/qemu.conf").read_text()
        match = re.search(r'^\s*user\s*=\s*"([^"]+)"', conf, re.MULTILINE)
        if match:
            name = match.group(1)
    try:
        entry = pwd.getpwuid(int(name[1:])) if name.startswith("+") else pwd.getpwnam(name)
    except (KeyError, ValueError):
        return None
    return entry.pw_uid, entry.pw_gid, os.getgrouplist(entry.pw_name, entry.pw_gid)


def kvm_probe(ids: tuple[int, int, list[int]] | None, timeout: float = 20.0) -> bool:
    """kvm_runs_a_guest() in a child process as `ids` (libvirt's qemu user: /dev/kvm must be
    open to it), killed if it does not answer within `timeout`."""
    pid = os.fork()
    if pid == 0:  # the child: nothing but the probe, then _exit
        code = 1
        try:
            if ids is not None:
                os.setgroups(ids[2])
                os.setgid(ids[1])
                os.setuid(ids[0])
            code = 0 if kvm_runs_a_guest() else 1
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status) == 0
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return False


def libvirt_driver(choice: str) -> tuple[str, str]:
    """(driver, why): kvm or qemu. Auto: kvm when libvirt offers it and /dev/kvm runs a guest
    for libvirt's qemu user."""
    if choice in ("kvm", "qemu"):
        return choice, "as asked"
    emulation = "software emulation, CPU model Nehalem"
    if virsh("domcapabilities", "--virttype", "kvm", timeout=60).returncode != 0:
        return "qemu", f"libvirt offers no kvm here: {emulation}"
    ids = qemu_user()
    user = "root" if ids is None else pwd.getpwuid(ids[0]).pw_name
    if not kvm_probe(ids):
        return "qemu", f"/dev/kvm runs no guest for {user} (libvirt's qemu user): {emulation}"
    return "kvm", f"libvirt offers kvm and /dev/kvm runs a guest for {user}"


# --- libvirt ---------------------------------------------------------------------------------


def virsh(*args: str, timeout: float = 60, check: bool = False) -> subprocess.CompletedProcess[str]:
    return run(["virsh", "-c", LIBVIRT, *args], timeout=timeout, check=check)


def virsh_names(*args: str) -> set[str]:
    result = virsh(*args)
    if result.returncode != 0:
        return set()
    return {line.strip() for line in result.stdout.splitlines() if line.strip()}


def libvirt_answers() -> bool:
    try:
        return virsh("version", timeout=20).returncode == 0
    except CheckFailed:
        return False


@dataclass
class LibvirtState:
    """What libvirt and the host had before the check, to remove only what it made."""

    domains: set[str] = field(default_factory=set)
    networks: set[str] = field(default_factory=set)
    active_networks: set[str] = field(default_factory=set)
    pools: set[str] = field(default_factory=set)
    volumes: dict[str, set[str]] = field(default_factory=dict)
    files: set[Path] = field(default_factory=set)

    @classmethod
    def now(cls) -> LibvirtState:
        pools = virsh_names("pool-list", "--all", "--name")
        return cls(
            domains=virsh_names("list", "--all", "--name"),
            networks=virsh_names("net-list", "--all", "--name"),
            active_networks=virsh_names("net-list", "--name"),
            pools=pools,
            volumes={pool: volume_names(pool) for pool in pools},
            files=libvirt_files(),
        )


def libvirt_files() -> set[Path]:
    return {path for folder in LIBVIRT_FILES for path in folder.glob("*")}


def volume_names(pool: str) -> set[str]:
    return parse_volume_list(virsh("vol-list", pool).stdout)


def parse_volume_list(listing: str) -> set[str]:
    """The volume names in `virsh vol-list POOL`: a header, a rule, `NAME PATH` lines."""
    lines = listing.splitlines()
    return {line.split()[0] for line in lines[2:] if line.split()}


@dataclass
class Daemons:
    """virtlogd and libvirtd of the check's own (when none answers), stopped by pid."""

    say: Callable[[str], None]
    logs: Path
    procs: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    def start(self) -> None:
        if os.geteuid() != 0:
            raise CheckFailed("libvirt's system daemon does not answer, and starting it needs root")
        if socket_answers(VIRTLOGD_SOCKET):
            self.say("libvirt: virtlogd is running already")
        else:
            self._start("virtlogd", lambda: socket_answers(VIRTLOGD_SOCKET))
        self._start("libvirtd", libvirt_answers)
        started = ", ".join(f"{name} pid {proc.pid}" for name, proc in self.procs)
        self.say(f"libvirt: started {started} (none was running)")

    def _start(self, name: str, answers: Callable[[], bool]) -> None:
        log = (self.logs / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            [name], stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
        log.close()
        self.procs.append((name, proc))

        def up() -> bool | None:
            if proc.poll() is not None:
                raise CheckFailed(f"{name} exited {proc.returncode}; see {self.logs}/{name}.log")
            return True if answers() else None

        wait_until(f"answer from the {name} it started", 60, up)

    def stop(self) -> None:
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=15)
            self.say(f"down: {name} pid {proc.pid} stopped")
        self.procs.clear()


def socket_answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


# --- the box ---------------------------------------------------------------------------------


def libvirt_boxes() -> set[str]:
    """The boxes `vagrant box list` has for libvirt."""
    return parse_box_list(run(["vagrant", "box", "list"], timeout=120, check=False).stdout)


def parse_box_list(listing: str) -> set[str]:
    """The libvirt boxes in `vagrant box list`'s lines, `NAME (PROVIDER, VERSION)`."""
    boxes = set()
    for line in listing.splitlines():
        match = re.match(r"^(\S+)\s+\(libvirt,", line)
        if match:
            boxes.add(match.group(1))
    return boxes


def choose_box(args: argparse.Namespace, say: Callable[[str], None]) -> tuple[str, bool]:
    """The box to bring the lab up from, and whether this run built it."""
    present = libvirt_boxes()
    if args.box:
        if args.box not in present:
            raise CheckFailed(f"no libvirt box {args.box} in `vagrant box list`")
        say(f"box: {args.box} (given)")
        return args.box, False
    if not args.local_box and OFFICIAL_BOX in present:
        say(f"box: {OFFICIAL_BOX} (present)")
        return OFFICIAL_BOX, False
    if LOCAL_BOX in present:
        say(f"box: {LOCAL_BOX} (present, from scripts/build-vagrant-box.sh)")
        return LOCAL_BOX, False
    if not args.local_box:
        added = run(["vagrant", "box", "add", "--provider", "libvirt", OFFICIAL_BOX],
                    timeout=900, check=False)  # fmt: skip
        if added.returncode == 0:
            say(f"box: {OFFICIAL_BOX} (added from Vagrant Cloud)")
            return OFFICIAL_BOX, False
        reason = ((added.stderr or added.stdout).strip().splitlines() or ["?"])[-1]
        say(f"box: cannot add {OFFICIAL_BOX} ({reason[:100]}); a local box instead")
    argv = ["bash", str(BUILD_BOX), "--name", LOCAL_BOX]
    if args.ca_bundle:
        argv += ["--ca-bundle", args.ca_bundle]
    started = time.monotonic()
    run(argv, timeout=2400)
    carried = f", carrying {args.ca_bundle}" if args.ca_bundle else ""
    say(f"box: {LOCAL_BOX} built by scripts/build-vagrant-box.sh (debootstrap) in "
        f"{time.monotonic() - started:.0f} s{carried}")  # fmt: skip
    return LOCAL_BOX, True


# --- the lab ---------------------------------------------------------------------------------


@dataclass
class VagrantLab:
    """The six VMs, driven with vagrant in vagrant/ and ssh through `vagrant ssh-config`."""

    env: dict[str, str]
    work: Path
    say: Callable[[str], None]
    vip: str = VIP
    clients: list[ChatClient] = field(default_factory=list)
    started_up: bool = False

    @property
    def ssh_config(self) -> Path:
        return self.work / "ssh_config"

    def vagrant(self, *args: str, timeout: float, check: bool = True) -> str:
        argv = ["vagrant", *args]
        try:
            result = subprocess.run(
                argv, cwd=VAGRANT_DIR, env=self.env, capture_output=True, text=True,
                timeout=timeout, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        except subprocess.TimeoutExpired as error:
            raise CheckFailed(f"{' '.join(argv)}: no result within {timeout:.0f} s") from error
        if check and result.returncode != 0:
            output = (result.stdout + result.stderr)[-3000:]
            raise CheckFailed(f"{' '.join(argv)} exited {result.returncode}:\n{output}")
        return result.stdout.replace("\r\n", "\n")

    def up(self, timeout: float) -> None:
        """`vagrant up --provider=libvirt`, its output into the log, milestones said."""
        log_path = self.work / "vagrant-up.log"
        self.started_up = True
        proc = subprocess.Popen(
            ["vagrant", "up", "--provider=libvirt"], cwd=VAGRANT_DIR, env=self.env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        assert proc.stdout is not None
        pump = threading.Thread(target=self._milestones, args=(proc.stdout, log_path))
        pump.start()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as error:
            stop_group(proc)
            raise CheckFailed(f"vagrant up: not done within {timeout:.0f} s; {log_path}, "
                              f"{self.work}/console") from error  # fmt: skip
        except BaseException:  # interrupted: vagrant destroy cannot run while up does
            stop_group(proc)
            raise
        finally:
            pump.join(timeout=30)
        if proc.returncode != 0:
            tail = log_path.read_text(errors="replace").splitlines()[-25:]
            raise CheckFailed(f"vagrant up exited {proc.returncode}:\n" + "\n".join(tail)
                              + console_tails(self.work / "console"))  # fmt: skip

    def _milestones(self, stream: IO[bytes], log_path: Path) -> None:
        booted = re.compile(r"^==> (\S+): (Machine booted and ready!|Running provisioner: .*)$")
        said = re.compile(r"^\s+(\S+): (provision-\S+: .*)$")
        with log_path.open("w") as log:
            for raw in iter(stream.readline, b""):
                line = raw.decode(errors="replace").rstrip()
                log.write(line + "\n")
                log.flush()
                match = booted.match(line) or said.match(line)
                if match:
                    self.say(f"up: {match.group(1)}: {match.group(2)}")

    def write_ssh_config(self) -> None:
        self.ssh_config.write_text(self.vagrant("ssh-config", timeout=180))

    def ssh_argv(self, host: str, command: str) -> list[str]:
        return ["ssh", "-F", str(self.ssh_config), "-T", "-o", "BatchMode=yes",
                "-o", "ConnectTimeout=15", "-o", "ServerAliveInterval=10", host,
                command]  # fmt: skip

    def ssh(self, host: str, command: str, timeout: float = 60) -> str:
        return run(self.ssh_argv(host, command), timeout=timeout).stdout

    def status(self, lb: str = "lb1") -> dict[str, object]:
        status: dict[str, object] = json.loads(self.ssh(lb, "sudo lbnat status --json"))
        return status

    def holds_vip(self, lb: str) -> bool:
        return f" inet {VIP}/" in self.ssh(lb, "ip -4 -o addr show")

    def health(self) -> dict[tuple[str, str], str]:
        return backend_health(self.status())

    def web_get(self, count: int) -> list[str]:
        """`count` requests to the web VIP from the client, one connection each."""
        url = f"http://{self.vip}:{WEB_PORT}/"
        loop = f"for i in $(seq {count}); do curl -sS --max-time 5 {url}; done"
        body = self.ssh("client", loop, timeout=30 + 6 * count)
        served = re.findall(r"^backend (b\d)$", body, re.MULTILINE)
        if len(served) != count:
            raise CheckFailed(f"the web VIP answered {body!r}, not {count} backend pages")
        return served

    def chat_client(self, name: str) -> ChatClient:
        command = f"lbnat-chat client {self.vip} {CHAT_PORT} {name}"
        proc = subprocess.Popen(
            self.ssh_argv("client", command), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        chat = open_chat(name, proc, timeout=30)
        self.clients.append(chat)
        return chat

    def close_clients(self) -> None:
        close_chats(self.clients)


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process group a child leads (started with start_new_session), then
    SIGKILL."""
    for signum, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 15)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def console_tails(console: Path) -> str:
    text = ""
    for log in sorted(console.glob("*.log")):
        lines = log.read_text(errors="replace").splitlines()[-8:]
        text += f"\n--- {log.name} (serial console, last lines):\n" + "\n".join(lines)
    return text


# --- the checks ------------------------------------------------------------------------------


def check_health(lab: VagrantLab) -> None:
    """lbnat-chat stopped on b2 as the README says: chat b2 dead within the documented time,
    new chat clients go to b1 and b3, the web service keeps all three; started: alive."""
    stop = "sudo systemctl stop lbnat-chat"
    lab.vagrant("ssh", "b2", "-c", stop, timeout=120)
    stopped = time.monotonic()
    lab.say(f"$ vagrant ssh b2 -c '{stop}'")

    def b2_is(state: str) -> Callable[[], bool | None]:
        def probe() -> bool | None:
            return True if lab.health()[("chat", "b2")] == state else None

        return probe

    wait_until("dead chat b2 in lbnat status", DEAD_WITHIN, b2_is("dead"), every=1.0)
    lab.say(f"health: chat b2 dead {time.monotonic() - stopped:.1f} s after the stop returned "
            f"(documented: {HEALTH_FALL} failed probes {HEALTH_INTERVAL:.0f} s apart, "
            f"{HEALTH_TIMEOUT:.0f} s timeout)")  # fmt: skip
    chats = [lab.chat_client(f"late{i}") for i in (1, 2)]
    landed = [c.server for c in chats]
    lab.close_clients()
    if "b2" in landed:
        raise CheckFailed(f"a new chat client reached the dead b2: {landed}")
    served = check_web(lab, set(BACKENDS), 3)
    lab.say(f"health: new chat clients on {' '.join(landed)}; web still on {' '.join(served)}")

    start = "sudo systemctl start lbnat-chat"
    lab.vagrant("ssh", "b2", "-c", start, timeout=120)
    started = time.monotonic()
    lab.say(f"$ vagrant ssh b2 -c '{start}'")
    wait_until("alive chat b2 in lbnat status", ALIVE_WITHIN, b2_is("alive"), every=1.0)
    lab.say(f"health: chat b2 alive {time.monotonic() - started:.1f} s after the start returned")


def check_pair(lab: VagrantLab) -> None:
    """The HA pair as provisioned: the VIP on lb1 only (keepalived's master: the higher
    priority), and each lbnat's sync role and readiness (`lbnat status --json`'s "sync")."""

    def settled() -> bool | None:
        return True if lab.holds_vip("lb1") and not lab.holds_vip("lb2") else None

    wait_until(f"{VIP} on lb1 only", 60, settled, every=2.0)
    roles = {}
    for lb in LBS:
        sync = lab.status(lb).get("sync")
        if not isinstance(sync, dict) or sync.get("ready") is not True:
            raise CheckFailed(f"{lb}: lbnat's sync is not ready: {sync!r}")
        roles[lb] = sync.get("role")
    if roles != {"lb1": "master", "lb2": "backup"}:
        raise CheckFailed(f"the pair's roles are {roles}, not lb1 master and lb2 backup")
    say_roles = ", ".join(f"{lb} {role}" for lb, role in roles.items())
    lab.say(f"pair: {VIP} on lb1 only; lbnat's sync ready on both ({say_roles})")


# --- the whole check -------------------------------------------------------------------------


def check(args: argparse.Namespace, say: Callable[[str], None], work: Path) -> None:
    daemons: Daemons | None = None
    before: LibvirtState | None = None
    host: HostState | None = None
    lab: VagrantLab | None = None
    try:
        if os.geteuid() != 0:
            raise CheckFailed("run it as root (libvirt's system daemon, the box build)")
        missing = missing_prerequisites()
        if missing:
            raise CheckFailed(f"missing: {' '.join(missing)}\n  Debian 12: {APT_LINE}")
        if libvirt_answers():
            say(f"libvirt: using the running libvirtd ({LIBVIRT})")
        else:
            host = HostState.now()
            daemons = Daemons(say, work)
            daemons.start()
        before = LibvirtState.now()
        clash = {f"vagrant_{vm}" for vm in VMS} & before.domains
        if clash:
            raise CheckFailed(f"a Vagrant lab is there already ({' '.join(sorted(clash))}): "
                              "`vagrant destroy -f` in vagrant/ first")  # fmt: skip
        driver, why = libvirt_driver(args.driver)
        say(f"libvirt: driver {driver} ({why})")
        box, _built = choose_box(args, say)

        console = work / "console"
        console.mkdir(mode=0o755, exist_ok=True)
        env = dict(
            os.environ,
            VAGRANT_DOTFILE_PATH=str(work / "dot"),
            VAGRANT_CHECKPOINT_DISABLE="1",
            VAGRANT_DEFAULT_PROVIDER="libvirt",
            LBNAT_BOX=box,
            LBNAT_LIBVIRT_DRIVER=driver,
            LBNAT_LIBVIRT_MGMT_NET=args.mgmt_net,
            LBNAT_LIBVIRT_CONSOLE_DIR=str(console),
        )
        lab = VagrantLab(env, work, say)
        started = time.monotonic()
        say(f"$ cd vagrant; LBNAT_BOX={box} LBNAT_LIBVIRT_DRIVER={driver} "
            f"LBNAT_LIBVIRT_MGMT_NET={args.mgmt_net} vagrant up --provider=libvirt")  # fmt: skip
        lab.up(args.up_timeout)
        say(f"up: six VMs up and provisioned in {time.monotonic() - started:.0f} s")
        lab.write_ssh_config()

        def all_alive() -> bool | None:
            with contextlib.suppress(CheckFailed, KeyError, ValueError):
                health = lab.health()
                if len(health) == 6 and set(health.values()) == {"alive"}:
                    return True
            return None

        wait_until("six alive backends in lbnat status", 120, all_alive, every=2.0)
        say("lab: lbnat up on lb1, chat and web backends b1 b2 b3 alive")
        check_pair(lab)

        served = check_web(lab, set(BACKENDS), 6)
        if served[:3] != served[3:]:
            raise CheckFailed(f"HTTP requests were not round-robin: {served}")
        say(f"web: 6 requests (curl on the client) to {VIP}:{WEB_PORT} served by "
            f"{' '.join(served)}")  # fmt: skip
        check_chat(lab)
        check_health(lab)

        documented = "sudo lbnat status"
        out = lab.vagrant("ssh", "lb1", "-c", documented, timeout=120)
        say(f"$ vagrant ssh lb1 -c '{documented}'")
        say(out.rstrip())
    finally:
        teardown(lab, daemons, before, host, say)


@dataclass
class HostState:
    """The host's settings libvirt changes when it starts a NAT network."""

    ip_forward: str
    tables: set[str]
    chains: set[tuple[str, str, str]]

    @classmethod
    def now(cls) -> HostState:
        return cls(
            ip_forward=Path("/proc/sys/net/ipv4/ip_forward").read_text().strip(),
            tables=nft_tables(),
            chains=nft_chains(),
        )

    def restore(self, say: Callable[[str], None]) -> None:
        """What libvirt added to the ruleset, and nothing of anyone else's: tables it made
        (holding only built-in chains and its LIBVIRT_* chains); its rules in tables that were
        there before, then its chains; ip_forward as it was."""
        chains = nft_chains()
        for table in sorted(nft_tables() - self.tables):
            family, name = table.removeprefix("table ").split()[:2]
            own = {c for f, t, c in chains if (f, t) == (family, name)}
            if all(c in BUILTIN_CHAINS or c.startswith("LIBVIRT_") for c in own):
                run(["nft", "delete", "table", family, name], timeout=15, check=False)
        for family, tool in (("ip", "iptables"), ("ip6", "ip6tables")):
            for table in ("filter", "nat", "mangle"):
                if f"table {family} {table}" in self.tables:
                    remove_libvirt_rules(tool, table)
        new_chains = sorted(
            (family, table, chain)
            for family, table, chain in nft_chains() - self.chains
            if chain.startswith("LIBVIRT_")
            or (chain in BUILTIN_CHAINS and chain_is_empty(family, table, chain))
        )
        for verb in ("flush", "delete"):  # no chain is deleted while another jumps to it
            for family, table, chain in new_chains:
                run(["nft", verb, "chain", family, table, chain], timeout=15, check=False)
        path = Path("/proc/sys/net/ipv4/ip_forward")
        if path.read_text().strip() != self.ip_forward:
            path.write_text(self.ip_forward + "\n")
        say(f"down: ip_forward {self.ip_forward} and the nftables ruleset as they were")


BUILTIN_CHAINS = {"INPUT", "OUTPUT", "FORWARD", "PREROUTING", "POSTROUTING"}


def chain_is_empty(family: str, table: str, chain: str) -> bool:
    """No rule in the chain (a base chain libvirt's iptables made in a table that was there)."""
    listing = run(["nft", "list", "chain", family, table, chain], timeout=15, check=False)
    words = {"table", "chain", "type", "}", "#"}
    lines = [line.strip() for line in listing.stdout.splitlines() if line.strip()]
    return listing.returncode == 0 and all(line.split()[0] in words for line in lines)


def remove_libvirt_rules(tool: str, table: str) -> None:
    """libvirt's rules in the built-in chains of a table that existed before: the jumps to
    its LIBVIRT_* chains (the chains themselves go after)."""
    listing = run([tool, "-t", table, "-S"], timeout=15, check=False).stdout.splitlines()
    for line in listing:
        words = line.split()
        if words[:1] == ["-A"] and not words[1].startswith("LIBVIRT_") and "LIBVIRT_" in line:
            run([tool, "-t", table, "-D", *words[1:]], timeout=15, check=False)


def teardown(
    lab: VagrantLab | None,
    daemons: Daemons | None,
    before: LibvirtState | None,
    host: HostState | None,
    say: Callable[[str], None],
) -> None:
    """Everything the check made, also after a failure; each step on its own, a step that
    fails does not keep the next from running. The host's ruleset and ip_forward are put back
    only when the check started libvirtd (a running one owns its chains)."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)

    def step(what: str, action: Callable[[], None]) -> None:
        try:
            action()
        except (CheckFailed, OSError, ValueError) as error:
            say(f"down: {what} FAILED: {str(error)[-400:]}")

    if lab is not None:
        step("closing the chat clients", lab.close_clients)
        if lab.started_up:
            step("vagrant destroy -f", lambda: destroy(lab, say))
    if before is not None:
        step("removing what libvirt kept", lambda: remove_libvirt_leftovers(before, say))
    if daemons is not None:
        step("stopping the daemons", daemons.stop)
        if host is not None:
            step("restoring the host", lambda: host.restore(say))


def destroy(lab: VagrantLab, say: Callable[[str], None]) -> None:
    started = time.monotonic()
    lab.vagrant("destroy", "-f", timeout=600)
    say(f"down: vagrant destroy -f: {time.monotonic() - started:.0f} s")


def remove_libvirt_leftovers(before: LibvirtState, say: Callable[[str], None]) -> None:
    now = LibvirtState.now()
    for domain in sorted(now.domains - before.domains):
        virsh("destroy", domain)
        virsh("undefine", domain, "--remove-all-storage", timeout=120)
        say(f"down: domain {domain} removed")
    removed = []
    for network in sorted(now.networks - before.networks):
        virsh("net-destroy", network)
        virsh("net-undefine", network)
        removed.append(network)
    for network in sorted(now.active_networks - before.active_networks - set(removed)):
        virsh("net-destroy", network)  # defined before, started by this run (autostart)
        removed.append(f"{network} (stopped)")
    volumes = []
    for pool, names in now.volumes.items():
        for volume in sorted(names - before.volumes.get(pool, set())):
            virsh("vol-delete", "--pool", pool, volume, timeout=120)
            volumes.append(volume)
    pools = sorted(now.pools - before.pools)
    for pool in pools:
        virsh("pool-destroy", pool)
        virsh("pool-undefine", pool)
    # after the networks: a network's dnsmasq files go when it does
    for path in sorted(libvirt_files() - before.files):
        with contextlib.suppress(OSError):
            path.unlink()
    say(
        f"down: libvirt networks {' '.join(removed) or '(none left)'}; volumes "
        f"{' '.join(volumes) or '(none left)'}; pools {' '.join(pools) or '(none made)'}"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="lab-vagrant-check", description="the Vagrant lab, end to end (see the module doc)"
    )
    parser.add_argument(
        "--box", default=os.environ.get("LBNAT_BOX") or None,
        help="the libvirt box to use, already added (LBNAT_BOX)",
    )  # fmt: skip
    parser.add_argument(
        "--local-box", action="store_true",
        default=os.environ.get("LBNAT_LOCAL_BOX", "") == "1",
        help=f"use {LOCAL_BOX} (built by scripts/build-vagrant-box.sh if absent) without "
        f"trying {OFFICIAL_BOX} (LBNAT_LOCAL_BOX=1)",
    )  # fmt: skip
    parser.add_argument(
        "--ca-bundle", default=os.environ.get("LBNAT_CA_BUNDLE") or None,
        help="carry this CA bundle into a locally built box (LBNAT_CA_BUNDLE)",
    )  # fmt: skip
    parser.add_argument(
        "--driver", choices=("auto", "kvm", "qemu"),
        default=os.environ.get("LBNAT_LIBVIRT_DRIVER") or "auto",
        help="libvirt's driver: kvm, qemu (software emulation) or auto: kvm where /dev/kvm "
        "runs a guest (LBNAT_LIBVIRT_DRIVER)",
    )  # fmt: skip
    parser.add_argument(
        "--mgmt-net", default=MGMT_NET, type=management_network,
        help=f"Vagrant's management network ({MGMT_NET})",
    )  # fmt: skip
    parser.add_argument(
        "--up-timeout", type=float, default=1800.0,
        help="seconds for `vagrant up` (1800: five VMs under software emulation took ~24 min)",
    )  # fmt: skip
    parser.add_argument(
        "--readme", action="store_true", help=f"rewrite the transcript block of {VAGRANT_README}"
    )
    return parser.parse_args(argv)


def management_network(text: str) -> str:
    try:
        network = ipaddress.IPv4Network(text, strict=True)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: {error}") from error
    if network.prefixlen > 29:
        raise argparse.ArgumentTypeError(f"{text}: too small for six VMs")
    return str(network)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    transcript = Transcript()
    interrupt_on_signals()
    shutil.rmtree(WORK_DIR, ignore_errors=True)
    WORK_DIR.mkdir(mode=0o755, parents=True)
    os.chmod(WORK_DIR, 0o755)
    try:
        check(args, transcript.say, WORK_DIR)
    except (CheckFailed, Interrupted) as error:
        print(f"lab-vagrant-check: FAILED: {error}", file=sys.stderr, flush=True)
        print(f"lab-vagrant-check: logs kept in {WORK_DIR}", file=sys.stderr, flush=True)
        return 1 if isinstance(error, CheckFailed) else 130
    shutil.rmtree(WORK_DIR, ignore_errors=True)
    transcript.say(f"lab-vagrant-check: passed in {time.monotonic() - transcript.started:.0f} s")
    if args.readme:
        rewrite_readme(VAGRANT_README, README_BEGIN, README_END, transcript.lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
