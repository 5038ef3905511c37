"""Registration, draining, the admin socket and reload, in network namespaces: backends that
register themselves get traffic after their first good probe, unregistering drains, clients
never move, a reload keeps every session, and refused registrations change nothing."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from lbnat_lab.netns import LB_IP, host_ip
from tests.integration.conftest import BACKEND_PORT, Bed, Proc, console_script

pytestmark = pytest.mark.netns

SERVICE = "tcp:20000"  # the name of the service `lbnat run` makes from its command line
CONTROL = f"{LB_IP}:7000"
FAST = ("--health-interval", "0.2", "--health-timeout", "1")


def secret_file(bed: Bed, text: str = "lab secret") -> Path:
    path = bed.tmp / f"secret-{len(text)}"
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


def control_options(bed: Bed, allow: str = "198.18.0.0/24") -> tuple[str, ...]:
    return ("--control", CONTROL, "--secret-file", str(secret_file(bed)), "--allow", allow)


def lbnat_cmd(bed: Bed, host: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """An `lbnat` command run in a lab host (exit code not checked)."""
    return bed.lab.run(host, console_script("lbnat"), *argv, check=False)


def register(
    bed: Bed, host: str, op: str = "register", secret: Path | None = None, *extra: str
) -> subprocess.CompletedProcess[str]:
    ip = host_ip(host)
    key = secret or secret_file(bed)
    return lbnat_cmd(
        bed, host, op, "--lb", CONTROL, "--service", SERVICE, ip, str(BACKEND_PORT),
        "--secret-file", str(key), *extra,
    )  # fmt: skip


def admin(bed: Bed, *argv: str) -> subprocess.CompletedProcess[str]:
    return lbnat_cmd(bed, "lb", *argv, "--admin-socket", str(bed.tmp / "admin.sock"))


def landed_on(bed: Bed, names: list[str]) -> list[str]:
    return [bed.chat_client("c1", name)[1] for name in names]


def wait_alive(lbnat: Proc, backend: str) -> None:
    lbnat.expect(f"IP : {host_ip(backend)}, Port : {BACKEND_PORT} Server is alive")


def test_a_registered_backend_gets_flows_after_its_first_good_probe(bed: Bed) -> None:
    bed.chat_server("b1")
    lbnat = bed.lbnat(*FAST, *control_options(bed), backends=("b1",))
    b4 = bed.lab.add_backend(4)
    result = register(bed, b4)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f"register: {host_ip(b4)}:{BACKEND_PORT} in service {SERVICE}: waiting for a good probe"
    )
    lbnat.expect(f"register : backend {host_ip(b4)}:{BACKEND_PORT} joins service {SERVICE}")
    # Nothing listens on b4 yet: its probes fail, it stays dead and gets no flow.
    lbnat.expect(f"IP : {host_ip(b4)}, Port : {BACKEND_PORT} Server is dead")
    assert landed_on(bed, ["a1", "a2"]) == ["b1", "b1"]
    bed.chat_server(b4)
    wait_alive(lbnat, b4)
    assert sorted(landed_on(bed, ["a3", "a4"])) == ["b1", "b4"]


def test_unregister_drains_the_backend(bed: Bed) -> None:
    """An open chat keeps working, new clients avoid the backend, and it is removed once the
    chat closes."""
    for b in ("b1", "b2"):
        bed.chat_server(b)
    lbnat = bed.lbnat(*FAST, *control_options(bed), backends=("b1", "b2"))
    first, _ = bed.chat_client("c1", "first")  # b1
    kept, landed = bed.chat_client("c2", "kept")
    assert landed == "b2"
    result = register(bed, "b2", "unregister")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(": draining")
    assert landed_on(bed, ["n1", "n2", "n3"]) == ["b1", "b1", "b1"]
    kept.send_line("still talking")
    kept.expect("[kept] still talking")
    status = json.loads(admin(bed, "status", "--json").stdout)
    b2 = next(b for b in status["services"][0]["backends"] if b["ip"] == host_ip("b2"))
    assert b2["draining"] and b2["active"] == 1
    kept.send_line("q")
    assert kept.wait() == 0
    lbnat.expect(f"backend {host_ip('b2')}:{BACKEND_PORT} removed from service {SERVICE} (drained)")
    status = json.loads(admin(bed, "status", "--json").stdout)
    assert [b["ip"] for b in status["services"][0]["backends"]] == [host_ip("b1")]
    first.send_line("q")


def test_registering_a_backend_moves_no_client(bed: Bed) -> None:
    for b in ("b1", "b2", "b3"):
        bed.chat_server(b)
    lbnat = bed.lbnat(*FAST, *control_options(bed), backends=("b1", "b2"))
    clients = [bed.chat_client("c1", f"c{i}") for i in range(4)]
    before = {row.client: row.backend for row in bed.dump_table(lbnat).entries}
    assert register(bed, "b3").returncode == 0
    wait_alive(lbnat, "b3")
    after = {row.client: row.backend for row in bed.dump_table(lbnat).entries}
    assert after == before
    for proc, _ in clients:
        proc.send_line("hello")
    for proc, _ in clients:
        proc.expect(f"[{proc.name}] hello")


def test_refused_registrations_change_nothing(bed: Bed) -> None:
    bed.chat_server("b1")
    lbnat = bed.lbnat(*FAST, *control_options(bed, allow="198.18.0.21/32"), backends=("b1",))
    wrong = secret_file(bed, "not the secret")
    result = register(bed, "b1", "register", wrong, "--weight", "2")
    assert result.returncode == 1
    assert result.stderr.startswith("lbnat: refused: ")
    outsider = lbnat_cmd(
        bed, "c1", "register", "--lb", CONTROL, "--service", SERVICE, host_ip("c1"), "9000",
        "--secret-file", str(secret_file(bed)),
    )  # fmt: skip
    assert outsider.returncode == 1 and "not allowed" in outsider.stderr, outsider.stderr
    unknown = register(bed, "b1", "register", None, "--name", "x")
    assert unknown.returncode == 1 and "already in service" in unknown.stderr
    assert lbnat.out.count("control : refused") == 3
    status = json.loads(admin(bed, "status", "--json").stdout)
    assert [(b["ip"], b["weight"]) for b in status["services"][0]["backends"]] == [
        (host_ip("b1"), 1)
    ]


def test_admin_commands(bed: Bed) -> None:
    for b in ("b1", "b2"):
        bed.chat_server(b)
    lbnat = bed.lbnat(*FAST, backends=("b1",))
    bed.chat_client("c1", "one")
    text = admin(bed, "status")
    assert text.returncode == 0, text.stderr
    assert f"service {SERVICE}  tcp :20000  rr  check syn" in text.stdout
    assert f"{host_ip('b1')}:{BACKEND_PORT}" in text.stdout and "alive" in text.stdout
    sessions = json.loads(admin(bed, "sessions", "--json").stdout)
    assert [(s["backend"], s["state"]) for s in sessions] == [
        (f"{host_ip('b1')}:{BACKEND_PORT}", "ESTABLISHED")
    ]
    assert "1 rows" in admin(bed, "sessions").stdout
    added = admin(bed, "backend", "add", SERVICE, host_ip("b2"), str(BACKEND_PORT), "--weight", "2")
    assert added.returncode == 0, added.stderr
    wait_alive(lbnat, "b2")
    assert "b2" in landed_on(bed, ["x1", "x2"])
    assert admin(bed, "backend", "drain", SERVICE, host_ip("b2"), str(BACKEND_PORT)).returncode == 0
    removed = admin(bed, "backend", "remove", SERVICE, host_ip("b2"), str(BACKEND_PORT))
    assert removed.returncode == 0, removed.stderr
    missing = admin(bed, "backend", "remove", SERVICE, host_ip("b2"), str(BACKEND_PORT))
    assert missing.returncode == 1 and "is not in service" in missing.stderr
    nowhere = str(bed.tmp / "nope.sock")
    assert lbnat_cmd(bed, "lb", "status", "--admin-socket", nowhere).returncode == 1


def test_reload_keeps_every_session(bed: Bed) -> None:
    for b in ("b1", "b2", "b3"):
        bed.chat_server(b)
    config = bed.tmp / "lbnat.json"

    def write(backends: list[str], scheduler: str = "rr") -> None:
        service = {
            "name": "chat",
            "protocol": "tcp",
            "port": 20000,
            "scheduler": scheduler,
            "health": {"interval": 0.2, "timeout": 0.3},
            "backends": [{"ip": host_ip(b), "port": BACKEND_PORT} for b in backends],
        }
        config.write_text(json.dumps({"lb_ip": LB_IP, "services": [service]}))

    write(["b1", "b2"])
    lbnat = bed.start(
        "lb", console_script("lbnat"), "run", "--config", str(config),
        "--admin-socket", str(bed.tmp / "admin.sock"), name="lbnat",
    )  # fmt: skip
    bed.wait_ready(lbnat, ("b1", "b2"))
    clients = [bed.chat_client("c2", f"k{i}") for i in range(4)]
    before = {row.client: row.backend for row in bed.dump_table(lbnat).entries}

    write(["b1", "b2", "b3"], scheduler="lc")
    lbnat.signal(signal.SIGHUP)
    lbnat.expect("reload : applied")
    wait_alive(lbnat, "b3")
    assert {row.client: row.backend for row in bed.dump_table(lbnat).entries} == before
    assert "b3" in landed_on(bed, ["r1", "r2", "r3"])

    config.write_text('{"services": [{"port": "not a port"}]}')
    result = admin(bed, "reload")
    assert result.returncode == 1 and "services[0].port" in result.stderr
    lbnat.expect("reload : rejected, the running config stays: ")
    for proc, _ in clients:
        proc.send_line("after reloads")
        proc.expect(f"[{proc.name}] after reloads")
    after = {row.client: row.backend for row in bed.dump_table(lbnat).entries}
    assert after.items() >= before.items()
