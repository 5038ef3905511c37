"""lbnat.hatool (`lbnat-ha`): keepalived's check and notify hooks against a stand-in for
lbnat's admin socket (a Unix socket in the test's directory that answers canned lines), and
the CLI's ha-check / ha-role, which call the same functions."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from lbnat import hatool
from lbnat.cli import main
from lbnat.config import DEFAULT_ADMIN_SOCKET
from tests.unit.fake_admin import FakeLbnat


@pytest.fixture
def lbnat(tmp_path: Path) -> Iterator[FakeLbnat]:
    fake = FakeLbnat(tmp_path / "admin.sock", {"ok": True, "role": "backup", "ready": True})
    yield fake
    fake.close()


def test_the_default_socket_is_the_config_s() -> None:
    assert hatool.DEFAULT_ADMIN_SOCKET == DEFAULT_ADMIN_SOCKET


def test_check_passes_when_ready_and_asks_for_the_sync_alone(
    lbnat: FakeLbnat, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert hatool.main(["--admin-socket", lbnat.path, "check"]) == 0
    assert hatool.main(["check", "--admin-socket", lbnat.path]) == 0  # as keepalived runs it
    monkeypatch.setenv("LBNAT_ADMIN_SOCKET", lbnat.path)
    assert hatool.main(["check"]) == 0
    assert lbnat.requests == [{"op": "ha_status"}] * 3


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        ({"ok": True, "ready": False}, "not ready: its first resync"),
        ({"ok": False, "error": "the session sync is off"}, "lbnat refused: the session sync"),
    ],
)
def test_check_fails_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], reply: dict[str, object], message: str
) -> None:
    fake = FakeLbnat(tmp_path / "admin.sock", reply)
    try:
        assert hatool.main(["--admin-socket", fake.path, "check"]) == 1
    finally:
        fake.close()
    err = capsys.readouterr().err
    assert err.startswith("lbnat-ha: ") and message in err and err.count("\n") == 1


def test_check_without_lbnat_fails_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert hatool.main(["--admin-socket", str(tmp_path / "none.sock"), "check"]) == 1
    assert capsys.readouterr().err == (
        f"lbnat-ha: no admin socket at {tmp_path / 'none.sock'}: is lbnat running?\n"
    )


def test_role_sends_keepalived_s_state_in_lower_case(
    lbnat: FakeLbnat, capsys: pytest.CaptureFixture[str]
) -> None:
    assert hatool.main(["role", "BACKUP", "--admin-socket", lbnat.path]) == 0
    assert lbnat.requests == [{"op": "ha_role", "role": "backup"}]
    assert capsys.readouterr().out == "lbnat-ha: role backup (sync ready)\n"


def test_an_unknown_role_is_refused_before_asking(
    lbnat: FakeLbnat, capsys: pytest.CaptureFixture[str]
) -> None:
    assert hatool.main(["--admin-socket", lbnat.path, "role", "leader"]) == 1
    assert lbnat.requests == []
    assert "is not one of master, backup, fault, stop" in capsys.readouterr().err


def test_the_cli_s_ha_check_and_ha_role_are_the_same(lbnat: FakeLbnat) -> None:
    runner = CliRunner()
    assert runner.invoke(main, ["ha-check", "--admin-socket", lbnat.path]).exit_code == 0
    result = runner.invoke(main, ["ha-role", "MASTER", "--admin-socket", lbnat.path])
    assert result.exit_code == 0 and result.output == "ha-role: backup (sync ready)\n"
    assert lbnat.requests[-1] == {"op": "ha_role", "role": "master"}


def test_the_sync_node_s_roles_are_keepalived_s_and_unknown() -> None:
    from lbnat.control.client import HA_ROLES
    from lbnat.dataplane.syncnode import Role
    from lbnat.metrics import SYNC_ROLES

    assert tuple(role.value for role in Role) == SYNC_ROLES == ("unknown", *HA_ROLES)
