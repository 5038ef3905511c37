"""lbnat's admin socket as the fault cases read it (`lbnat status|sessions --json` in the lb
namespace), and a bounded poll."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from tests.integration.conftest import WAIT, Bed, admin_json


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
