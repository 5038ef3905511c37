"""lbnat.dataplane.tcbpf in a namespace, for tests/integration/test_tcbpf_netns.py (root); run
there with `nsenter --net=/run/netns/NS` (not `ip netns exec`: it keeps the real mounts):

python -m tests.integration.tcbpftool hold DEVICE
    load the fast path, attach it to DEVICE's clsact ingress and print {"ifindex": N}; then
    obey lines on stdin: "detach" (prints {"detached": true} or {"error": reason}), "attach"
    (prints {"attached": true}); at end of input close the program (detaching) and exit.
python -m tests.integration.tcbpftool stale DEVICE
    detach_stale on DEVICE; prints {"removed": true|false}.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys

from lbnat.dataplane import tcbpf


def say(message: dict[str, object]) -> None:
    print(json.dumps(message), flush=True)


def hold(device: str) -> None:
    ifindex = socket.if_nametoindex(device)
    with tcbpf.TcProgram.load(tcbpf.object_path(), 64) as program:
        program.attach(ifindex)
        say({"ifindex": ifindex})
        for line in sys.stdin:
            command = line.strip()
            try:
                if command == "detach":
                    program.detach()
                    say({"detached": True})
                elif command == "attach":
                    program.attach(ifindex)
                    say({"attached": True})
            except tcbpf.OffloadUnavailable as error:
                say({"error": str(error)})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["hold", "stale"])
    parser.add_argument("device")
    args = parser.parse_args()
    if args.command == "hold":
        hold(args.device)
    else:
        say({"removed": tcbpf.detach_stale(socket.if_nametoindex(args.device))})


if __name__ == "__main__":
    main()
