"""Command-line commands that need no root: check-config, and argument errors of run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NoReturn

import pytest
from click.testing import CliRunner

from lbnat import privileges
from lbnat.cli import lobin_main, main
from lbnat.config import Config

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "config.example.json"


def test_check_config_accepts_the_example() -> None:
    result = CliRunner().invoke(main, ["check-config", str(EXAMPLE)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"{EXAMPLE}: ok: 2 services: ")


def test_check_config_names_the_key_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"services": [{"backends": [{"ip": "198.18.0.21", "port": 70000}]}]}))
    result = CliRunner().invoke(main, ["check-config", str(bad)])
    assert result.exit_code == 2
    assert (
        result.output == f"lbnat: {bad}: services[0].backends[0].port: 70000 is not a valid port\n"
    )


def test_check_config_maps_a_java_servers_json(tmp_path: Path) -> None:
    servers = tmp_path / "servers.json"
    servers.write_text(
        json.dumps(
            {
                "servers": [
                    {"protocol": "TCP", "ipAddress": "198.18.0.21", "port": 9000},
                    {"protocol": "UDP", "ipAddress": "198.18.0.22", "port": 9053},
                ]
            }
        )
    )
    result = CliRunner().invoke(main, ["check-config", str(servers)])
    assert result.exit_code == 0, result.output
    assert "2 services: tcp (tcp/20000), udp (udp/20000); 2 backends" in result.output


def test_run_argument_errors_are_one_line_and_exit_2() -> None:
    cases = [
        (["run", "198.18.0.2", "198.18.0.21"], "odd number of words"),
        (["run", "198.18.0.2", "198.18.0.21", "9000", "--port", "70000"], "out of range"),
        (["run", "not-an-ip", "198.18.0.21", "9000"], "is not an IPv4 address"),
        (
            ["run", "198.18.0.2", "198.18.0.21", "9000", "--port", "62000"],
            "inside the NAT port range",
        ),
        (
            ["run", "198.18.0.2", "198.18.0.21", "9000", "--health-check", "udp"],
            "cannot probe a tcp",
        ),
        (["run", "--config", "/nonexistent/lbnat.json"], "cannot read the file"),
    ]
    for argv, message in cases:
        result = CliRunner().invoke(main, argv)
        assert result.exit_code == 2, (argv, result.output)
        lines = result.output.splitlines()
        assert len(lines) == 1 and message in lines[0], (argv, result.output)


@pytest.mark.parametrize(
    ("argv", "env", "file_level", "expected"),
    [
        ([], {}, None, ("info", False)),
        (["--quiet"], {}, None, ("info", True)),
        (["--log-level", "warning"], {}, None, ("warning", False)),
        ([], {"LBNAT_LOG_LEVEL": "error"}, None, ("error", False)),
        ([], {}, "notice", ("notice", False)),  # the file's log.level
        ([], {"LBNAT_LOG_LEVEL": "error"}, "notice", ("error", False)),  # the variable wins
        (["--log-level", "info"], {}, "warning", ("info", False)),  # the option wins
    ],
)
def test_the_log_level_reaches_the_config(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    argv: list[str],
    env: dict[str, str],
    file_level: str | None,
    expected: tuple[str, bool],
) -> None:
    started: list[Config] = []

    def run_daemon(config: Config, reload_config: object = None) -> NoReturn:
        started.append(config)
        raise SystemExit(0)

    monkeypatch.setattr("lbnat.cli.run_daemon", run_daemon)
    words = ["198.18.0.2", "198.18.0.21", "9000"]
    if file_level is not None:
        path = tmp_path / "lbnat.json"
        path.write_text(json.dumps({"log": {"level": file_level}}))
        words += ["--config", str(path)]
    result = CliRunner().invoke(main, ["run", *words, *argv], env=env)
    assert result.exit_code == 0, result.output
    assert [(c.log_level, c.quiet) for c in started] == [expected]


def test_an_unknown_log_level_is_a_usage_error() -> None:
    result = CliRunner().invoke(
        main, ["run", "198.18.0.2", "198.18.0.21", "9000"], env={"LBNAT_LOG_LEVEL": "debug"}
    )
    assert result.exit_code == 2 and "'debug' is not one of" in result.output


@pytest.mark.parametrize("command", ["", *sorted(main.commands)])
def test_every_help_carries_a_one_line_example(command: str) -> None:
    args = [command, "--help"] if command else ["--help"]
    result = CliRunner().invoke(main, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    examples = [line.strip() for line in result.output.splitlines() if "Example: " in line]
    assert len(examples) == 1, result.output
    assert f"lbnat {command}" in examples[0]


def test_loadbalancer_lobin_help_carries_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        lobin_main(["--help"])
    assert stopped.value.code == 0
    out = capsys.readouterr().out
    assert "Example: sudo loadbalancerLobin 198.18.0.2 198.18.0.21 9000" in out


def test_status_shows_the_syn_proxys_counters(monkeypatch: pytest.MonkeyPatch) -> None:
    service = {
        "name": "web", "proto": "tcp", "port": 80, "scheduler": "rr", "health_check": "syn",
        "flows": 3, "packets": 9, "bytes": 900, "drops": {"bad_cookie": 2},
        "syn_cookies": {"sent": 20000, "validated": 50, "invalid": 2}, "backends": [],
    }  # fmt: skip
    reply = {"lb_ip": "198.18.0.2", "uptime": 1.0, "rows": 3, "open_flows": 0, "workers": []}
    quiet = {**service, "name": "dns", "syn_cookies": {"sent": 0, "validated": 0, "invalid": 0}}
    monkeypatch.setattr("lbnat.cli.talk", lambda *_: {**reply, "services": [service, quiet]})
    result = CliRunner().invoke(main, ["status", "--admin-socket", "/nonexistent"])
    assert result.exit_code == 0, result.output
    web, dns = [line for line in result.output.splitlines() if line.startswith("service ")]
    assert web.endswith("drops bad_cookie 2  syn cookies sent 20000 validated 50 invalid 2")
    assert "syn cookies" not in dns


def test_cleanup_without_cap_net_admin_touches_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state.json"
    state.write_text("{}")
    monkeypatch.setattr(privileges, "missing_here", lambda: ["CAP_NET_ADMIN"])
    result = CliRunner().invoke(main, ["cleanup", "--state-file", str(state)])
    assert result.exit_code == 2
    assert result.output.startswith("lbnat: lbnat cleanup needs CAP_NET_ADMIN")
    assert state.exists()


def test_cleanup_of_a_bad_state_file_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state.json"
    state.write_text("nonsense")
    monkeypatch.setattr(privileges, "missing_here", lambda: [])
    result = CliRunner().invoke(main, ["cleanup", "--state-file", str(state)])
    assert result.exit_code == 2
    assert (
        result.output
        == f"lbnat: {state}: it is not JSON (Expecting value: line 1 column 1 (char 0))\n"
    )


def test_ipv6_backends_and_addresses_on_the_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """IPv6 in and out: a backend's IP plain or in brackets, the control channel's host in
    brackets; status and sessions show IPv6 addresses with their ports in brackets."""
    sent: list[tuple[object, dict[str, object]]] = []

    def talk(target: object, message: dict[str, object]) -> dict[str, object]:
        sent.append((target, message))
        return {"ok": True, "backend": "[2001:db8::24]:9000", "service": "web6", "state": "ok"}

    monkeypatch.setattr("lbnat.cli.talk", talk)
    runner = CliRunner()
    drain = ["backend", "drain", "web6", "[2001:DB8::24]", "9000", "--admin-socket", "/x.sock"]
    result = runner.invoke(main, drain)
    assert result.exit_code == 0, result.output
    register = ["register", "--lb", "[2001:db8::2]:7000", "--service", "web6", "2001:db8::24"]
    result = runner.invoke(main, [*register, "9000"])
    assert result.exit_code == 0, result.output
    assert [(t, m["ip"]) for t, m in sent] == [
        ("/x.sock", "2001:db8::24"),
        (("2001:db8::2", 7000), "2001:db8::24"),
    ]
    result = runner.invoke(main, ["backend", "add", "web6", "fe80::1", "9000"])
    assert result.exit_code != 0
    assert "backend address fe80::1 is not a backend address (link-local)" in result.output
    backend = {
        "ip": "2001:db8::24", "port": 9000, "name": "[2001:db8::24]:9000", "health": "alive",
        "draining": False, "weight": 1, "active": 0, "flows": 0, "packets": 0, "bytes": 0,
        "last_probe": "",
    }  # fmt: skip
    service = {
        "name": "web6", "proto": "tcp", "port": 80, "scheduler": "rr", "health_check": "syn",
        "flows": 0, "packets": 0, "bytes": 0, "drops": {}, "backends": [backend],
    }  # fmt: skip
    status = {"lb_ip": "198.18.0.2", "ip6": "2001:db8::2", "uptime": 1.0, "rows": 0,
              "open_flows": 0, "workers": [], "services": [service]}  # fmt: skip
    monkeypatch.setattr("lbnat.cli.talk", lambda *_: status)
    result = runner.invoke(main, ["status", "--admin-socket", "/nonexistent"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("lbnat 198.18.0.2 2001:db8::2  up 1.0 s")
    assert "  [2001:db8::24]:9000   [2001:db8::24]:9000" in result.output
    row = {"proto": "tcp", "client": "[2001:db8::11]:40000", "backend": "[2001:db8::24]:9000",
           "nat_port": 61000, "state": "ESTABLISHED", "age": 3.0}  # fmt: skip
    monkeypatch.setattr("lbnat.cli.talk", lambda *_: {"sessions": [row]})
    result = runner.invoke(main, ["sessions", "--admin-socket", "/nonexistent"])
    assert result.exit_code == 0, result.output
    assert "tcp   [2001:db8::11]:40000  [2001:db8::24]:9000   61000" in result.output


def test_check_config_notes_ipv6_backends_without_ip6(tmp_path: Path) -> None:
    path = tmp_path / "v6.json"
    path.write_text(json.dumps({"services": [{"backends": [{"ip": "2001:db8::21", "port": 80}]}]}))
    result = CliRunner().invoke(main, ["check-config", str(path)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[1] == (
        f'{path}: note: service "tcp:20000" has the IPv6 backend [2001:db8::21]:80, which needs '
        "the LB's IPv6 address: give ip6 in the config or --ip6"
    )
