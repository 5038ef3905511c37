"""`lbnat-ha`: keepalived's two hooks into a running lbnat (docs/ha.md), on the standard
library alone.

    lbnat-ha check [--admin-socket PATH]        keepalived's vrrp_script, every second:
                                                exit 0 when lbnat runs and its sync is ready
    lbnat-ha role STATE [--admin-socket PATH]   keepalived's notify script: master, backup,
                                                fault or stop (any case)

Why a tool of its own, hand-written on socket and json rather than the click CLI: keepalived
runs the check every second on both nodes, and `lbnat ha-check` costs about 0.35 s of CPU
(its imports: click, the config's jsonschema, the whole package), over 2 s on a busy 2-core
machine, where a check that times out makes the node FAULT. This module imports nothing of
lbnat's but `lbnat.control.client` (the standard library too); a check costs about 30 ms.
`lbnat ha-check` and `lbnat ha-role` call the same functions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from lbnat.control.client import HA_ROLES, request_line

DEFAULT_ADMIN_SOCKET = "/run/lbnat/lbnat.sock"  # lbnat.config.DEFAULT_ADMIN_SOCKET (a test
# keeps them equal: importing lbnat.config here would cost what this module saves)
ADMIN_SOCKET_ENV = "LBNAT_ADMIN_SOCKET"
TIMEOUT = 3.0  # seconds for lbnat's reply (keepalived's own timeout is the real bound)


class HaError(Exception):
    """lbnat cannot be asked, or refused: the message is for keepalived's log."""


def ask(path: str, request: dict[str, object]) -> dict[str, Any]:
    """One request line to lbnat's admin socket, its reply line parsed (ok or not)."""
    try:
        reply = request_line(path, json.dumps(request).encode() + b"\n", TIMEOUT)
    except FileNotFoundError:
        raise HaError(f"no admin socket at {path}: is lbnat running?") from None
    except OSError as error:
        raise HaError(f"cannot ask lbnat at {path}: {error.strerror or error}") from None
    try:
        answer = json.loads(reply)
    except ValueError:
        raise HaError(f"lbnat at {path} sent no reply") from None
    if not isinstance(answer, dict):
        raise HaError(f"lbnat at {path} sent {reply[:60]!r}")
    if not answer.get("ok"):
        raise HaError(f"lbnat refused: {answer.get('error', answer)}")
    return answer


def check(path: str) -> str:
    """'' when lbnat runs and holds its peer's flows, else why not (for keepalived's log)."""
    answer = ask(path, {"op": "ha_status"})
    if not answer.get("ready"):
        return "not ready: its first resync from the peer is not complete"
    return ""


def tell_role(path: str, role: str) -> dict[str, Any]:
    if role.lower() not in HA_ROLES:
        raise HaError(f"role {role!r} is not one of {', '.join(HA_ROLES)}")
    return ask(path, {"op": "ha_role", "role": role.lower()})


def main(argv: list[str] | None = None) -> int:
    socket_option = argparse.ArgumentParser(add_help=False)  # before or after the command
    socket_option.add_argument("--admin-socket", default=argparse.SUPPRESS)
    parser = argparse.ArgumentParser(
        prog="lbnat-ha", description="keepalived's hooks into a running lbnat (docs/ha.md)",
        parents=[socket_option],
    )  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "check", help="exit 0 when lbnat runs and holds its peer's flows", parents=[socket_option]
    )
    role = commands.add_parser("role", help="tell lbnat its VRRP role", parents=[socket_option])
    role.add_argument("role", metavar="STATE", help="master, backup, fault or stop")
    args = parser.parse_args(argv)
    path = getattr(args, "admin_socket", os.environ.get(ADMIN_SOCKET_ENV, DEFAULT_ADMIN_SOCKET))
    try:
        if args.command == "check":
            problem = check(path)
            if problem:
                print(f"lbnat-ha: {problem}", file=sys.stderr)
                return 1
            return 0
        answer = tell_role(path, args.role)
    except HaError as error:
        print(f"lbnat-ha: {error}", file=sys.stderr)
        return 1
    ready = "ready" if answer.get("ready") else "not ready"
    print(f"lbnat-ha: role {answer.get('role')} (sync {ready})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
