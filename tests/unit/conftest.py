"""`private_netns`: unit tests that open sockets run inside a network namespace of their own.

The project's rule is that test traffic never leaves a namespace the test made. A unit test
that needs real sockets (the chat app, the probes) asks for this fixture: it creates a
namespace with only `lo` up and 198.18.255.1 on it, moves the test's thread into it with
setns(2) -- threads and processes the test starts afterwards inherit it -- and moves back and
deletes the namespace afterwards, whatever happened. Without root the test is skipped with the
reason (under CI=true the suite-wide rule of tests/conftest.py does not apply to unit tests,
and CI runs as root).
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator

import pytest

HOST = "198.18.255.1"  # the test's own address, on lo of its private namespace
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


@pytest.fixture
def private_netns() -> Iterator[str]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2: socket tests run in a network namespace of their own")
    name = f"lbu{os.getpid()}{secrets.token_hex(2)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "addr", "add", f"{HOST}/32", "dev", "lo"], check=True)
        yield name
    finally:
        _setns(home)
        os.close(home)
        subprocess.run(["ip", "netns", "del", name], check=False)
