"""The deployment scripts (issue #9) run for real, inside namespaces this test makes itself.

scripts/provision-backend.sh, provision-lb.sh and provision-client.sh are what the Vagrant VMs
and the compose lab run. There is no systemd in a network namespace, so they run in their
``--foreground`` mode here, and lbnat is started the way the systemd unit
(scripts/systemd/lbnat.service) would start it as far as privileges go: uid 0 with the unit's
capability bounding and ambient sets, its securebits and no_new_privs, through setpriv. The
test then checks real chat lines from client namespaces through lbnat to the chat servers the
backend script started, HTTP round-robin through the web VIP port to its web servers, the
admin socket named in the written config, the unit's reload path (check-config, then SIGHUP)
and a clean stop on SIGTERM (the backend script's too: both its servers go).

The lab's prefix starts with "lbprov" so it never meets another lab; every process is stopped
by pid and the namespaces are deleted whether the test passed or not.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest

from lbnat.privileges import CAPABILITY_BITS, effective_set
from lbnat_lab.netns import CHAT, LB_IP, REPO, Lab, host_ip, skip_reason
from tests.integration.conftest import (
    BACKEND_PORT,
    LBNAT_TABLE,
    RESERVED_PORTS,
    VIP_PORT,
    Bed,
    Proc,
    console_script,
    require,
)

SCRIPTS = REPO / "scripts"
UNIT = SCRIPTS / "systemd" / "lbnat.service"
BACKENDS = ("b1", "b2", "b3")
WEB_VIP_PORT = 8080  # provision-lb.sh's default
WEB_PORT = 80  # provision-backend.sh's default


def unit_service(path: Path = UNIT) -> dict[str, list[str]]:
    """The [Service] section of a unit file: key -> every value given (in order)."""
    section = ""
    values: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def unit_caps() -> list[str]:
    """The capabilities the unit grants (its ambient set, which must equal its bounding set)."""
    service = unit_service()
    ambient = " ".join(service["AmbientCapabilities"]).split()
    bounding = " ".join(service["CapabilityBoundingSet"]).split()
    assert sorted(ambient) == sorted(bounding), "the unit's ambient and bounding sets differ"
    return ambient


def setpriv_argv(caps: list[str]) -> list[str]:
    """setpriv giving a process what the unit gives lbnat: uid 0, only `caps` (bounding,
    inheritable and ambient), securebits noroot + noroot_locked, no_new_privs."""
    service = unit_service()
    assert service["User"] == ["root"]
    assert service["SecureBits"] == ["noroot noroot-locked"]
    assert service["NoNewPrivileges"] == ["yes"]
    names = ",".join("+" + c.removeprefix("CAP_").lower() for c in caps)
    return [
        "setpriv",
        f"--bounding-set=-all,{names}",
        f"--inh-caps=-all,{names}",
        f"--ambient-caps=-all,{names}",
        "--securebits=+noroot,+noroot_locked",
        "--no-new-privs",
    ]


def cap_eff(pid: int) -> int:
    mask = effective_set(Path(f"/proc/{pid}/status").read_text())
    assert mask is not None, f"no CapEff in /proc/{pid}/status"
    return mask


def all_in(wanted: set[str], lines: list[str]) -> bool | None:
    """For Output.wait_for: every wanted line is there, in any order."""
    return True if wanted <= set(lines) else None


def script(name: str, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPTS / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def prov(tmp_path: Path) -> Iterator[Bed]:
    """A lab "lbprovXXXX-*" (c1, c2, lb, b1..b3), gone afterwards with all its processes."""
    if (reason := skip_reason()) is not None:
        pytest.skip(reason)
    require("nft", "setpriv")
    with Lab(prefix=f"lbprov{secrets.token_hex(2)}") as lab:
        bed = Bed(lab, tmp_path)
        try:
            yield bed
        finally:
            bed.close()


def chat_client(bed: Bed, bin_dir: Path, host: str, name: str) -> tuple[Proc, str]:
    """The client the Vagrant client's `lbnat-chat` wrapper runs; (client, its server)."""
    proc = bed.start(
        host,
        "env", f"PYTHON={sys.executable}", str(bin_dir / "lbnat-chat"),
        "client", LB_IP, str(VIP_PORT), name,
        name=name, stdin=True,
    )  # fmt: skip
    greeting = proc.expect("* connected to ")
    return proc, greeting.split("* connected to ", 1)[1].strip()


def test_provisioned_lab_carries_chat_through_lbnat(prov: Bed) -> None:
    bed = prov
    lbnat = console_script("lbnat")
    config = bed.tmp / "etc" / "lbnat" / "config.json"
    admin = bed.tmp / "run" / "lbnat.sock"
    caps = unit_caps()

    # backends: the chat servers, started by the backend script
    servers = {}
    for b in BACKENDS:
        servers[b] = bed.start(
            b,
            "env", f"PYTHON={sys.executable}", "bash", str(SCRIPTS / "provision-backend.sh"),
            "--foreground", "--name", b, "--port", str(BACKEND_PORT),
            name=f"provision-backend {b}",
        )  # fmt: skip
    for b in BACKENDS:
        bed.lab.wait_tcp_listening(b, BACKEND_PORT)
        bed.lab.wait_tcp_listening(b, WEB_PORT)
        # two servers, one stdout: their first lines come in either order
        started = {
            f"chat server {b} listening on 0.0.0.0:{BACKEND_PORT}",
            f"web server {b} listening on 0.0.0.0:{WEB_PORT}",
        }
        servers[b].out.wait_for(partial(all_in, started), repr(started))

    # the LB: config written by the LB script, lbnat exec'd by it with the unit's privileges
    argv = [
        *setpriv_argv(caps),
        "env", f"LBNAT={lbnat}", f"PYTHON={sys.executable}",
        "bash", str(SCRIPTS / "provision-lb.sh"), "--foreground", "--no-install",
        "--lb-ip", LB_IP, "--config", str(config), "--admin-socket", str(admin),
    ]  # fmt: skip
    for b in BACKENDS:
        argv += ["--backend", f"{host_ip(b)}:{BACKEND_PORT}"]
    lb = bed.start("lb", *argv, name="provision-lb")
    lb.expect(f"provision-lb: wrote {config}")
    lb.expect(f"provision-lb: and {LB_IP}:{WEB_VIP_PORT} -> the same backends' port {WEB_PORT}")
    bed.wait_ready(lb, BACKENDS)

    written = json.loads(config.read_text())
    assert stat.S_IMODE(config.stat().st_mode) == 0o600  # like the unit's /etc/lbnat/config.json
    assert written["lb_ip"] == LB_IP
    assert written["admin_socket"] == str(admin)
    assert "control" not in written  # the example's placeholder secret is not deployed
    chat, web = written["services"]
    assert (chat["name"], chat["protocol"], chat["port"]) == ("chat", "tcp", VIP_PORT)
    assert [(x["ip"], x["port"]) for x in chat["backends"]] == [
        (host_ip(b), BACKEND_PORT) for b in BACKENDS
    ]
    assert (web["name"], web["protocol"], web["port"]) == ("web", "tcp", WEB_VIP_PORT)
    assert [(x["ip"], x["port"]) for x in web["backends"]] == [
        (host_ip(b), WEB_PORT) for b in BACKENDS
    ]

    # lbnat (the script exec'd it: same pid) runs as uid 0 with exactly the unit's capabilities
    assert os.stat(f"/proc/{lb.pid}").st_uid == 0
    assert "lbnat" in Path(f"/proc/{lb.pid}/cmdline").read_bytes().decode(errors="replace")
    assert cap_eff(lb.pid) == sum(1 << CAPABILITY_BITS[c] for c in caps)
    # ... and with them installed its kernel guard (the nft child) and reserved its NAT ports
    assert LBNAT_TABLE in bed.nft_tables()
    assert "61000-65535" in bed.read_file("lb", RESERVED_PORTS)

    # clients: the wrapper the client script installs
    bin_dir = bed.tmp / "bin"
    bin_dir.mkdir()
    made = script("provision-client.sh", "--bin-dir", str(bin_dir))
    assert made.returncode == 0, made.stderr
    clients: dict[str, Proc] = {}
    landed: dict[str, str] = {}
    for i, name in enumerate(("alice", "bob", "carol", "dave")):
        clients[name], landed[name] = chat_client(bed, bin_dir, ("c1", "c2")[i % 2], name)
    # round-robin over the three backends the config lists, then b1 again
    assert [landed[n] for n in ("alice", "bob", "carol", "dave")] == ["b1", "b2", "b3", "b1"]

    # real bytes: alice's line reaches dave (same server) and nobody else
    line = "hello through lbnat " + secrets.token_hex(8)
    clients["alice"].send_line(line)
    clients["dave"].expect(f"[alice] {line}")
    clients["alice"].expect(f"[alice] {line}")
    # the backend sees the LB's address (source NAT), twice: alice and dave
    for _ in range(2):
        servers["b1"].expect(f"connected client : {LB_IP}:")
    clients["bob"].send_line("ping from bob")
    clients["bob"].expect("[bob] ping from bob")
    for other in ("bob", "carol"):
        assert not any(line in x for x in clients[other].out.snapshot())

    # the admin socket named in the written config answers (as `sudo lbnat status` on the VM)
    status = bed.lab.run("lb", lbnat, "status", "--json", "--admin-socket", str(admin))
    reply = json.loads(status.stdout)
    assert [s["name"] for s in reply["services"]] == ["chat", "web"]
    for service in reply["services"]:
        assert sorted((b["ip"], b["health"]) for b in service["backends"]) == [
            (host_ip(b), "alive") for b in BACKENDS
        ]

    # the web service: each request a new flow, round-robin over the backends' web servers,
    # which see the LB's address (source NAT)
    pages = []
    for n in range(6):
        fetched = bed.lab.run(
            ("c1", "c2")[n % 2],
            "curl", "-sS", "--max-time", "10", "-D", "-", f"http://{LB_IP}:{WEB_VIP_PORT}/",
        )  # fmt: skip
        pages.append(fetched.stdout)
    for page, b in zip(pages, BACKENDS * 2, strict=True):
        assert page.startswith("HTTP/1.") and " 200 " in page.splitlines()[0], page
        # (text mode: curl's CRLFs read as newlines)
        assert f"\nX-Backend: {b}\n" in page and page.endswith(f"\n\nbackend {b}\n"), page
    for b in BACKENDS:
        for _ in range(2):
            servers[b].expect(f"web {b} : GET / from {LB_IP}:")

    # the unit's ExecReload: check-config, then SIGHUP; b3 leaves, sessions stay
    chat["backends"] = chat["backends"][:2]
    config.write_text(json.dumps(written, indent=2))
    checked = bed.lab.run("lb", lbnat, "check-config", str(config))
    assert "ok" in checked.stdout
    lb.signal(signal.SIGHUP)
    lb.expect("reload : applied")
    erin, server = chat_client(bed, bin_dir, "c1", "erin")
    assert server in ("b1", "b2")
    clients["carol"].send_line("still here after the reload")
    clients["carol"].expect("[carol] still here after the reload")  # carol's b3 flow stayed

    # systemctl stop: SIGTERM; lbnat removes its table and its reservation, even with only
    # these capabilities
    for proc in (*clients.values(), erin):
        proc.send_line("q")
        proc.wait()
    assert bed.stop(lb) == 0
    assert LBNAT_TABLE not in bed.nft_tables()
    assert "61000" not in bed.read_file("lb", RESERVED_PORTS)
    assert not admin.exists()

    # a backend script stopped by pid takes both its servers with it
    assert bed.stop(servers["b3"]) == 0
    stopped = {"chat server b3 stopped", "web server b3 stopped"}
    servers["b3"].out.wait_for(partial(all_in, stopped), repr(stopped))
    listening = bed.lab.run("b3", "ss", "-Hltn").stdout
    assert f":{BACKEND_PORT} " not in listening and f":{WEB_PORT} " not in listening, listening


KA_ARGS = ["--name", "lb1", "--peer", "198.18.0.4", "--own", "198.18.0.3", "--vip", "198.18.0.2",
           "--priority", "150"]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "args", "message"),
    [
        ("provision-backend.sh", [], "--name is required"),
        ("provision-backend.sh", ["--name", "b 1"], "is not a plain name"),
        ("provision-backend.sh", ["--name", "b1", "--port", "70000"], "is not a port"),
        ("provision-backend.sh", ["--name", "b1", "--bogus"], "unknown argument '--bogus'"),
        ("provision-backend.sh", ["--name", "b1", "--web-port", "9000"],
         "--web-port must differ from --port"),
        ("provision-backend.sh", ["--name", "b1", "--web-port", "x"], "'x' is not a port"),
        ("provision-lb.sh", ["--backend", "198.18.0.21:9000"], "--lb-ip is required"),
        ("provision-lb.sh", ["--lb-ip", "198.18.0.2"], "at least one --backend"),
        ("provision-lb.sh", ["--lb-ip", "198.18.0.256", "--backend", "198.18.0.21:9000"],
         "'198.18.0.256' is not an IPv4 address"),
        ("provision-lb.sh", ["--lb-ip", "198.18.0.2", "--backend", "198.18.0.21"],
         "is not IP:PORT"),
        ("provision-lb.sh", ["--lb-ip", "198.18.0.2", "--backend", "198.18.0.21:0"],
         "'0' is not a port"),
        ("provision-lb.sh", ["--lb-ip", "198.18.0.2", "--backend", "198.18.0.21:9000",
                             "--config", "etc/config.json"], "must be an absolute path"),
        ("provision-lb.sh", ["--lb-ip"], "--lb-ip needs a value"),
        ("provision-lb.sh", ["--lb-ip", "198.18.0.2", "--backend", "198.18.0.21:9000",
                             "--web-vip-port", "20000"], "--web-vip-port must differ"),
        ("provision-lb.sh", ["--lb-ip", "198.18.0.2", "--backend", "198.18.0.21:9000",
                             "--web-port", "0"], "'0' is not a port"),
        ("provision-client.sh", ["--bin-dir", "bin"], "must be an absolute path"),
        ("provision-lb.sh", ["--lb-ip", "198.18.0.2", "--backend", "198.18.0.21:9000",
                             "--sync-peer", "198.18.0.4"], "go together"),
        ("provision-lb.sh", ["--lb-ip", "198.18.0.3", "--backend", "198.18.0.21:9000",
                             "--sync-own", "198.18.0.3", "--sync-peer", "198.18.0.4",
                             "--sync-secret-file", "/dev/null"], "neither node's own address"),
        ("provision-lb.sh", ["--lb-ip", "198.18.0.2", "--backend", "198.18.0.21:9000",
                             "--sync-own", "198.18.0.3", "--sync-peer", "198.18.0.4",
                             "--sync-secret-file", "/nonexistent"], "cannot read the secret"),
        ("provision-keepalived.sh", KA_ARGS[:-2], "--priority must be 1-254"),
        ("provision-keepalived.sh", [*KA_ARGS[:-1], "255"], "--priority must be 1-254"),
        ("provision-keepalived.sh", [*KA_ARGS[:3], "198.18.0.3", *KA_ARGS[4:]],
         "--own and --peer must differ"),
        ("provision-keepalived.sh", [*KA_ARGS, "--conf", "k.conf"], "is not an absolute path"),
        ("provision-keepalived.sh", [*KA_ARGS, "--bogus"], "unknown argument '--bogus'"),
    ],
)  # fmt: skip
def test_scripts_refuse_bad_input(name: str, args: list[str], message: str) -> None:
    result = script(name, *args)
    assert result.returncode == 2, result
    assert message in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    "argv",
    [
        ["provision-backend.sh", "--name", "b1"],
        ["provision-lb.sh", "--lb-ip", "198.18.0.2", "--backend", "198.18.0.21:9000"],
    ],
)
def test_scripts_without_systemd_say_what_to_do(argv: list[str]) -> None:
    """--systemd (the default) where systemd is not init: a clear error, nothing installed.
    The script runs in a mount namespace of its own with an empty /run, so this holds (and
    touches nothing) even on a host where systemd runs."""
    if os.geteuid() != 0:
        pytest.skip("needs root (a mount namespace)")
    require("unshare")
    inner = 'mount -t tmpfs lbprov-run /run && exec bash "$0" "$@"'
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", inner,
         str(SCRIPTS / argv[0]), *argv[1:]],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 1, result
    assert "systemd is not running here; use --foreground" in result.stderr


def test_unit_file_verifies(tmp_path: Path) -> None:
    """systemd-analyze verify in a throw-away root (the unit's binaries are not installed on
    this machine, and verify checks that they exist): no warning at all."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("needs systemd-analyze (Debian package systemd)")
    service = unit_service()
    assert service["ExecStart"] == [
        "/opt/lbnat/bin/lbnat run --config /etc/lbnat/config.json "
        "--state-file /run/lbnat/state.json"
    ]
    # a hitless restart: the state file survives restarts; a stop cleans up (handover.py)
    assert service["RuntimeDirectoryPreserve"] == ["yes"]
    assert "lbnat cleanup --state-file /run/lbnat/state.json" in service["ExecStopPost"][0]
    assert service["ExecReload"][-1] == "/bin/kill -HUP $MAINPID"
    assert service["RuntimeDirectory"] == ["lbnat"]
    assert service["Restart"] == ["on-failure"]
    # readiness and watchdog (lbnat.sdnotify; test_sdnotify_netns.py plays systemd's part)
    assert service["Type"] == ["notify"] and service["NotifyAccess"] == ["main"]
    assert service["WatchdogSec"] == ["30s"]
    assert "AF_UNIX" in " ".join(service["RestrictAddressFamilies"]).split()  # the notify socket
    assert {"CAP_NET_RAW", "CAP_NET_ADMIN"} <= set(unit_caps()) <= set(CAPABILITY_BITS)
    root = tmp_path / "root"
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    for exe in ("/opt/lbnat/bin/lbnat", "/bin/kill", "/bin/sh"):
        path = root / exe.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
    (root / "etc/lbnat").mkdir(parents=True)
    (root / "etc/lbnat/config.json").write_text("{}\n")
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc/systemd/system/lbnat.service")
    result = subprocess.run(
        [analyze, "verify", f"--root={root}", "lbnat.service"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == "", result.stderr


# -- the HA pair's keepalived (issue 19) --------------------------------------------------------

PAIR = {"lb1": ("198.18.0.4", 150), "lb2": ("198.18.0.3", 100)}  # peer, VRRP priority


def vip_holders(bed: Bed) -> list[str]:
    return [
        lb for lb in PAIR
        if f" inet {LB_IP}/" in bed.lab.run(lb, "ip", "-4", "-o", "addr", "show", "eth0").stdout
    ]  # fmt: skip


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Bed]:
    """A lab "lbprovXXXX-*" with the HA pair lb1 and lb2 (lab.sh LAB_LBS=2), gone afterwards
    with all its processes."""
    if (reason := skip_reason()) is not None:
        pytest.skip(reason)
    require("keepalived")
    with Lab(prefix=f"lbprov{secrets.token_hex(2)}", lbs=2) as lab:
        bed = Bed(lab, tmp_path)
        try:
            yield bed
        finally:
            bed.close()


def test_provisioned_keepalived_keeps_the_vip_from_an_lbnat_not_ready(pair: Bed) -> None:
    """provision-keepalived.sh (what the Vagrant LBs run after provision-lb.sh) in lb1 and lb2:
    the notify script installed root's and 0755 (keepalived runs no script another user could
    change), the config written and accepted by `keepalived -t`, keepalived run from it. With no
    lbnat running, `lbnat ha-check` fails on both: both stay in FAULT and neither takes the VIP,
    longer than a backup waits for a master (3 adverts + skew): a node whose lbnat is not ready
    never becomes master. (With lbnat's sync running, lb1 would be master: make demo-ha.)"""
    bed = pair
    lbnat = console_script("lbnat")
    procs: dict[str, Proc] = {}
    for lb, (peer, priority) in PAIR.items():
        conf = bed.tmp / lb / "keepalived.conf"
        notify = bed.tmp / "sbin" / "lbnat-notify"
        procs[lb] = bed.start(
            lb,
            "bash", str(SCRIPTS / "provision-keepalived.sh"), "--foreground", "--no-install",
            "--name", lb, "--own", host_ip(lb), "--peer", peer, "--vip", LB_IP,
            "--priority", str(priority), "--lbnat", lbnat,
            "--admin-socket", str(bed.tmp / f"{lb}.sock"),
            "--conf", str(conf), "--notify-script", str(notify),
            name=f"provision-keepalived {lb}",
        )  # fmt: skip
        procs[lb].expect(
            f"provision-keepalived: wrote {conf} (router_id {lb}, priority {priority})"
        )
        written = conf.read_text()
        for line in (
            f"unicast_src_ip {host_ip(lb)}", f"\t\t{peer}\n", "nopreempt", "advert_int 1",
            "init_fail", "enable_script_security", f"{LB_IP}/24 dev eth0",
            f'script "{lbnat}-ha check --admin-socket {bed.tmp / lb}.sock"',
            f'notify "{notify} --lbnat {lbnat} --admin-socket {bed.tmp / lb}.sock"',
        ):  # fmt: skip
            assert line in written, (line, written)
        mode = notify.stat()
        assert mode.st_uid == 0 and stat.S_IMODE(mode.st_mode) == 0o755
    for lb in PAIR:  # (keepalived -l logs on stderr; init_fail: it starts in FAULT)
        procs[lb].err.expect_re(re.compile(r"VRRP_Script\(chk_lbnat\) (failed|timed_out)"))
    time.sleep(5.0)  # > 3 x advert_int + skew: a backup hearing no master would have taken over
    assert vip_holders(bed) == []
    for lb in PAIR:
        assert procs[lb].err.count("Entering MASTER STATE") == 0
        assert procs[lb].err.count("Entering BACKUP STATE") == 0
        assert procs[lb].err.count("Unsafe permissions") == 0  # (it would disable the script)
        assert bed.stop(procs[lb]) == 0


def wait_until(what: str, timeout: float, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.2)


def test_provisioned_pair_serves_through_the_vip(pair: Bed) -> None:
    """What the Vagrant LBs run, in lb1 and lb2: provision-lb.sh with --sync-own/--sync-peer/
    --sync-secret-file (the secret copied beside the config, 0600; lbnat started without the
    VIP on its interface), then provision-keepalived.sh. Both lbnats become ready (each
    resynced from the other), keepalived puts the VIP on lb1 only (priority 150, both started
    together), and a chat line goes through the VIP to a backend and back."""
    bed = pair
    lbnat = console_script("lbnat")
    secret = bed.tmp / "sync.secret"
    secret.write_text(secrets.token_hex(32) + "\n")
    for b in BACKENDS:
        bed.start(
            b, "env", f"PYTHON={sys.executable}", "bash", str(SCRIPTS / "provision-backend.sh"),
            "--foreground", "--name", b, "--port", str(BACKEND_PORT),
            name=f"provision-backend {b}",
        )  # fmt: skip
    for b in BACKENDS:
        bed.lab.wait_tcp_listening(b, BACKEND_PORT)
    lbs: dict[str, Proc] = {}
    for lb, (peer, _) in PAIR.items():
        config = bed.tmp / lb / "config.json"
        argv = [
            "env", f"LBNAT={lbnat}", f"PYTHON={sys.executable}",
            "bash", str(SCRIPTS / "provision-lb.sh"), "--foreground", "--no-install",
            "--lb-ip", LB_IP, "--config", str(config),
            "--admin-socket", str(bed.tmp / f"{lb}.sock"),
            "--sync-own", host_ip(lb), "--sync-peer", peer, "--sync-secret-file", str(secret),
        ]  # fmt: skip
        for b in BACKENDS:
            argv += ["--backend", f"{host_ip(b)}:{BACKEND_PORT}"]
        lbs[lb] = bed.start(lb, *argv, name=f"provision-lb {lb}")
        lbs[lb].expect(f"provision-lb: session sync {host_ip(lb)} <-> {peer} (UDP 7001)")
        copied = bed.tmp / lb / "sync.secret"
        assert copied.read_text() == secret.read_text()
        assert stat.S_IMODE(copied.stat().st_mode) == 0o600
    for lb in PAIR:

        def ready(lb: str = lb) -> bool:
            check = [lbnat, "ha-check", "--admin-socket", str(bed.tmp / f"{lb}.sock")]
            return bed.lab.run(lb, *check, check=False).returncode == 0

        wait_until(f"ready lbnat in {lb} (lbnat ha-check)", 30, ready)
    for lb, (peer, priority) in PAIR.items():
        keepalived = bed.start(
            lb,
            "bash", str(SCRIPTS / "provision-keepalived.sh"), "--foreground", "--no-install",
            "--name", lb, "--own", host_ip(lb), "--peer", peer, "--vip", LB_IP,
            "--priority", str(priority), "--lbnat", lbnat,
            "--admin-socket", str(bed.tmp / f"{lb}.sock"),
            "--conf", str(bed.tmp / lb / "keepalived.conf"),
            "--notify-script", str(bed.tmp / "sbin" / "lbnat-notify"),
            name=f"provision-keepalived {lb}",
        )  # fmt: skip
        keepalived.expect("provision-keepalived: wrote ")
    wait_until(f"{LB_IP} on lb1 only", 20, lambda: vip_holders(bed) == ["lb1"])
    client = bed.start(
        "c1", *CHAT, "client", LB_IP, str(VIP_PORT), "alice", name="alice", stdin=True
    )
    client.expect("* connected to b")
    client.send_line("through the pair")
    client.expect("[alice] through the pair")
    status = json.loads(
        bed.lab.run(
            "lb1", lbnat, "status", "--json", "--admin-socket", str(bed.tmp / "lb1.sock")
        ).stdout
    )
    assert status["sync"]["ready"] is True, status["sync"]
