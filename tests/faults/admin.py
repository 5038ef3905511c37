"""lbnat's admin socket as the fault cases read it (`lbnat status|sessions --json` in the lb
namespace), and a bounded poll."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from tests.integration.conftest import WAIT, Bed


def admin_json(fbed: Bed, command: str) -> Any:
    """`lbnat COMMAND --json` on the test's admin socket, parsed."""
    out = fbed.lab.run(
        "lb", "lbnat", command, "--json", "--admin-socket", str(fbed.tmp / "admin.sock")
    ).stdout
    return json.loads(out)


def backends(fbed: Bed, service: int = 0) -> dict[str, dict[str, Any]]:
    """The backends of the `service`-th service in `lbnat status`, by IP."""
    status = admin_json(fbed, "status")
    return {b["ip"]: b for b in status["services"][service]["backends"]}


def wait_until(what: str, check: Callable[[], bool], timeout: float = WAIT) -> None:
    """Poll `check()` every 0.1 s until it is true; TimeoutError after `timeout`."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout} s")
        time.sleep(0.1)


def no_traceback(*outputs: list[str]) -> bool:
    return not any("Traceback" in line for lines in outputs for line in lines)
