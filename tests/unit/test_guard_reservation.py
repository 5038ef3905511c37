"""The NAT-port reservation where /proc/sys cannot be written (a container): lbnat goes on when
the reservation made for it beforehand (compose's `sysctls:`) covers its NAT range, and stops
with a message saying what to set when it does not."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import pytest

from lbnat.dataplane import guard as guard_module
from lbnat.dataplane.guard import GuardError, KernelGuard, reservation_covers

LB = "198.18.0.2"
NAT = (61000, 65535)


@pytest.mark.parametrize(
    ("reserved", "wanted", "covered"),
    [
        ("", NAT, False),
        ("\n", NAT, False),
        ("61000-65535\n", NAT, True),
        ("61000-65535", (62000, 63000), True),
        ("60000-65535", NAT, True),
        ("61000-65534", NAT, False),  # one port short at the top
        ("61001-65535", NAT, False),  # one port short at the bottom
        ("8080,61000-65535", NAT, True),
        ("1000-2000,3000", (1000, 2000), True),
        ("1000-2000,3000", (3000, 3000), True),
        ("1000-2000,3000", (1500, 3000), False),  # 2001-2999 are not reserved
        ("1000-2000,3000", (2000, 2001), False),
        ("1000-2000,2001-2999,3000", (1500, 3000), True),  # pieces that touch join up
        ("61000-62999,63000-65535", NAT, True),
        ("63000-65535,61000-62999", NAT, True),  # in any order
        ("61000-63000,62000-65535", NAT, True),  # overlapping
        ("61000-62000,62002-65535", NAT, False),  # 62001 missing
        ("3000", (3000, 3000), True),
        ("3000", (3000, 3001), False),
        ("2999", (3000, 3000), False),
    ],
)
def test_reservation_covers(reserved: str, wanted: tuple[int, int], covered: bool) -> None:
    assert reservation_covers(reserved, wanted) is covered


def read_only_open(error: int) -> Callable[..., IO[Any]]:
    """open() as in a container: reading works, writing fails with `error`."""

    def fake_open(path: str, mode: str = "r", *args: Any, **kwargs: Any) -> IO[Any]:
        if "w" in mode:
            raise OSError(error, os.strerror(error), path)
        return open(path, mode, *args, **kwargs)

    return fake_open


@pytest.mark.parametrize("error", [errno.EROFS, errno.EACCES])
def test_read_only_reservation_already_in_place_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: int
) -> None:
    scripts: list[str] = []
    monkeypatch.setattr(guard_module, "nft", scripts.append)
    monkeypatch.setattr(guard_module, "open", read_only_open(error), raising=False)
    sysctl = tmp_path / "reserved"
    sysctl.write_text("8080,61000-65535\n")
    guard = KernelGuard(LB, [20000], [], NAT, reserved_path=str(sysctl))
    guard.install()
    assert guard.installed
    assert guard.notice is not None and "61000-65535 already in" in guard.notice
    guard.remove()
    # the reservation is the container's, not lbnat's: left as it was; the table is gone
    assert sysctl.read_text() == "8080,61000-65535\n"
    assert len(scripts) == 2 and "delete table" in scripts[1]


@pytest.mark.parametrize("reserved", ["", "8080\n", "61000-65000\n"])
def test_read_only_without_the_reservation_says_what_to_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reserved: str
) -> None:
    scripts: list[str] = []
    monkeypatch.setattr(guard_module, "nft", scripts.append)
    monkeypatch.setattr(guard_module, "open", read_only_open(errno.EROFS), raising=False)
    sysctl = tmp_path / "reserved"
    sysctl.write_text(reserved)
    guard = KernelGuard(LB, [20000], [], NAT, reserved_path=str(sysctl))
    with pytest.raises(GuardError) as raised:
        guard.install()
    message = str(raised.value)
    assert "cannot reserve the NAT ports" in message
    assert "net.ipv4.ip_local_reserved_ports=61000-65535" in message
    assert not guard.installed  # the table it had created is removed again
    assert "delete table" in scripts[-1]
    assert guard.notice is None


def test_other_write_errors_are_not_excused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a read-only /proc/sys is excused; say EIO stops lbnat even with the range covered."""
    monkeypatch.setattr(guard_module, "nft", lambda script: None)
    monkeypatch.setattr(guard_module, "open", read_only_open(errno.EIO), raising=False)
    sysctl = tmp_path / "reserved"
    sysctl.write_text("61000-65535\n")
    guard = KernelGuard(LB, [20000], [], NAT, reserved_path=str(sysctl))
    with pytest.raises(GuardError, match="cannot reserve the NAT ports"):
        guard.install()
