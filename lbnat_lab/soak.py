"""`make soak`: lbnat under a mixed, moderate load for minutes, its memory sampled.

    sudo python -m lbnat_lab.soak --minutes 10 [--every 10]

Builds its own netns lab (`Lab`: c1, c2, lb, b1..b3), nginx (keep-alive) and a UDP echo server
on every backend, and lbnat with 2 workers and two services: `web` (tcp 8080 -> 80) and `echo`
(udp 20053 -> 9053). Then, for the given minutes, three paced clients (bounded in rate and
time; they run as `python -m lbnat_lab.soak --load KIND` inside the client namespaces):

- `conn`: a new TCP connection per request (HTTP/1.0, 50 a second) from c1;
- `keepalive`: 4 keep-alive connections, 200 requests a second in all, from c2;
- `udp`: 100 echo datagrams a second from c1, a new socket (a new row) every 100.

Every `--every` seconds it prints one line: the RSS of lbnat's main process and of each worker
(pids from the admin socket's status) and lbnat's rows. The verdict, at the end:

- memory: for each process, the median of the last 3 samples is at most 1.2 x the median of
  the 3 samples that follow the warm-up (the first fifth of the run); a worker whose pid
  changed (restarted) fails;
- traffic: no failed TCP connection or request, at most 1 % of UDP echoes missing.

Exit 0 when both hold, 1 when not, 2 when the run was too short to judge (fewer than 7
samples). Everything it started goes away at the end, on Ctrl-C and on SIGTERM too.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO

from lbnat_lab.netns import ECHO, LB_IP, Lab, host_ip, skip_reason

WEB_PORT, UDP_PORT = 8080, 20053
BACKEND_UDP_PORT = 9053
BACKENDS = ("b1", "b2", "b3")
CONN_RATE, KEEPALIVE_RATE, KEEPALIVE_CONNECTIONS, UDP_RATE = 50.0, 200.0, 4, 100.0
GROWTH = 1.2  # the most the end's RSS may be of the baseline's
UDP_LOSS = 0.01  # the most UDP echoes that may go missing
MIN_SAMPLES = 7

NGINX_CONF = """\
user root;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {d}/tmp;
    proxy_temp_path {d}/tmp;
    fastcgi_temp_path {d}/tmp;
    uwsgi_temp_path {d}/tmp;
    scgi_temp_path {d}/tmp;
    default_type text/plain;
    keepalive_timeout 650s;
    keepalive_requests 1000000;
    server {{
        listen {ip}:80;
        root {d}/www;
    }}
}}
"""


# -- the verdict (pure) ---------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    at: float  # seconds since the load started
    rss: dict[str, int]  # process label ("main", "w0", ...) -> RSS in kB
    pids: dict[str, int]
    rows: int


def judge_memory(samples: Sequence[Sample]) -> tuple[bool | None, list[str]]:
    """(flat?, one line per process) by the rule of the module docstring; None: too few."""
    if len(samples) < MIN_SAMPLES:
        return None, [f"memory: {len(samples)} samples, at least {MIN_SAMPLES} are needed"]
    warm = max(1, len(samples) // 5)
    base, end = samples[warm : warm + 3], samples[-3:]
    flat = True
    lines = []
    for label in samples[0].rss:
        pids = {s.pids.get(label) for s in samples}
        if len(pids) != 1:
            flat = False
            lines.append(f"memory: {label} restarted (pids {sorted(p or 0 for p in pids)})")
            continue
        before = statistics.median(s.rss[label] for s in base)
        after = statistics.median(s.rss[label] for s in end)
        ratio = after / before if before else float("inf")
        ok = ratio <= GROWTH
        flat = flat and ok
        lines.append(
            f"memory: {label} {before / 1024:.1f} MB after warm-up -> {after / 1024:.1f} MB at "
            f"the end ({ratio:.2f} x, limit {GROWTH} x): {'flat' if ok else 'GROWS'}"
        )
    return flat, lines


def judge_traffic(results: dict[str, dict[str, int]]) -> tuple[bool, list[str]]:
    ok = True
    lines = []
    for kind, r in sorted(results.items()):
        if kind == "udp":
            missing = r.get("sent", 0) - r.get("answered", 0)
            good = r.get("sent", 0) > 0 and missing <= UDP_LOSS * r["sent"]
            lines.append(f"traffic: udp {r.get('answered', 0)}/{r.get('sent', 0)} echoed")
        else:
            good = r.get("ok", 0) > 0 and r.get("failed", 0) == 0
            lines.append(f"traffic: {kind} {r.get('ok', 0)} ok, {r.get('failed', 0)} failed")
        ok = ok and good
    return ok, lines


# -- the load (run inside a namespace) ------------------------------------------------------


def _paced(rate: float, seconds: float) -> Iterator[int]:
    """Yield 0, 1, 2, ... about `rate` times a second for `seconds`."""
    start = time.monotonic()
    n = 0
    while (now := time.monotonic() - start) < seconds:
        ahead = n / rate - now
        if ahead > 0:
            time.sleep(ahead)
        yield n
        n += 1


def load_conn(seconds: float) -> dict[str, int]:
    ok = failed = 0
    for _ in _paced(CONN_RATE, seconds):
        try:
            with socket.create_connection((LB_IP, WEB_PORT), timeout=5.0) as sock:
                sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
                reply = b""
                while chunk := sock.recv(65536):
                    reply += chunk
            good = reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"\n")
        except OSError:
            good = False
        ok, failed = ok + good, failed + (not good)
    return {"ok": ok, "failed": failed}


def load_keepalive(seconds: float) -> dict[str, int]:
    connections = [
        http.client.HTTPConnection(LB_IP, WEB_PORT, timeout=5.0)
        for _ in range(KEEPALIVE_CONNECTIONS)
    ]
    ok = failed = 0
    for n in _paced(KEEPALIVE_RATE, seconds):
        connection = connections[n % len(connections)]
        try:
            connection.request("GET", "/")
            response = connection.getresponse()
            good = response.status == 200 and response.read().startswith(b"backend ")
        except (OSError, http.client.HTTPException):
            connection.close()  # http.client reconnects on the next request
            good = False
        ok, failed = ok + good, failed + (not good)
    for connection in connections:
        connection.close()
    return {"ok": ok, "failed": failed}


def load_udp(seconds: float) -> dict[str, int]:
    sent = answered = 0
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for n in _paced(UDP_RATE, seconds):
            if n % 100 == 0:
                sock.close()
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.settimeout(1.0)
            payload = f"soak {n}".encode()
            sock.sendto(payload, (LB_IP, UDP_PORT))
            sent += 1
            with contextlib.suppress(OSError):  # no echo within 1 s: counted as missing
                answered += sock.recv(65536).endswith(b"] " + payload)
    finally:
        sock.close()
    return {"sent": sent, "answered": answered}


LOADS = {"conn": ("c1", load_conn), "keepalive": ("c2", load_keepalive), "udp": ("c1", load_udp)}


# -- the run --------------------------------------------------------------------------------


def config(work: Path) -> dict[str, object]:
    def service(name: str, proto: str, port: int, bport: int) -> dict[str, object]:
        return {
            "name": name,
            "protocol": proto,
            "port": port,
            "backends": [{"ip": host_ip(b), "port": bport} for b in BACKENDS],
        }

    return {
        "lb_ip": LB_IP,
        "log": {"quiet": True},
        "admin_socket": str(work / "admin.sock"),
        "dataplane": {"workers": 2},
        "services": [
            service("web", "tcp", WEB_PORT, 80),
            service("echo", "udp", UDP_PORT, BACKEND_UDP_PORT),
        ],
    }


def status(admin_socket: str) -> dict[str, object]:
    from lbnat.control.client import request_line  # the admin socket is a file: any netns

    reply: dict[str, object] = json.loads(request_line(admin_socket, b'{"op": "status"}\n'))
    return reply


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise ProcessLookupError(pid)


def sample(main_pid: int, admin_socket: str, at: float) -> Sample:
    reply = status(admin_socket)
    pids = {"main": main_pid}
    workers = reply.get("workers")
    assert isinstance(workers, list)
    for worker in workers:
        pids[f"w{worker['index']}"] = int(worker["pid"])
    rows = reply.get("rows")
    return Sample(at, {k: rss_kb(p) for k, p in pids.items()}, pids, int(str(rows)))


def wait_for(what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, ValueError):
            if check():
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"soak: no {what} within {timeout:g} s")
        time.sleep(0.2)


def soak(minutes: float, every: float, out: IO[str]) -> int:
    def say(text: str) -> None:
        print(text, file=out, flush=True)

    seconds = minutes * 60
    with (
        tempfile.TemporaryDirectory(prefix="lbnat-soak-") as tmp,
        contextlib.ExitStack() as files,
        Lab() as lab,
    ):
        work = Path(tmp)
        for b in BACKENDS:
            d = work / f"nginx-{b}"
            (d / "www").mkdir(parents=True)
            (d / "tmp").mkdir()
            (d / "www" / "index.html").write_text(f"backend {b}\n")
            (d / "nginx.conf").write_text(NGINX_CONF.format(d=d, ip=host_ip(b)))
            logs = files.enter_context((d / "output").open("wb"))
            nginx = ("nginx", "-p", str(d), "-e", str(d / "error.log"), "-c", str(d / "nginx.conf"))
            lab.popen(b, *nginx, "-g", "daemon off;", stdout=logs, stderr=logs)
            echo = (*ECHO, "--port", str(BACKEND_UDP_PORT), "--name", b)
            lab.popen(b, *echo, stdout=subprocess.DEVNULL, stderr=logs)
        for b in BACKENDS:
            lab.wait_tcp_listening(b, 80)
            lab.wait_listening(b, BACKEND_UDP_PORT, udp=True)
        (work / "lbnat.json").write_text(json.dumps(config(work)))
        lbnat_log = work / "lbnat.log"
        with lbnat_log.open("wb") as log:
            lbnat = lab.popen("lb", sys.executable, "-m", "lbnat.cli", "run", "--config",
                              str(work / "lbnat.json"), stdout=log, stderr=log)  # fmt: skip
        admin_socket = str(work / "admin.sock")
        wait_for("lbnat status", lambda: bool(status(admin_socket)))
        wait_for("live backends", lambda: all(
            b["health"] == "alive" for s in status(admin_socket)["services"]  # type: ignore[attr-defined]
            for b in s["backends"]))  # fmt: skip
        say(f"soak: lbnat (pid {lbnat.pid}, 2 workers) in lab {lab.prefix}; {minutes:g} min "
            f"of load, a sample every {every:g} s")  # fmt: skip
        loads = {}
        for kind, (host, _) in LOADS.items():
            result = files.enter_context((work / f"load-{kind}.json").open("wb"))
            loads[kind] = lab.popen(host, sys.executable, "-m", "lbnat_lab.soak", "--load", kind,
                                    "--seconds", str(seconds), stdout=result)  # fmt: skip
        samples: list[Sample] = []
        start = time.monotonic()
        while (at := time.monotonic() - start) < seconds + 1:
            if lbnat.poll() is not None:
                say(f"soak: lbnat exited ({lbnat.returncode})")
                break
            s = sample(lbnat.pid, admin_socket, at)
            samples.append(s)
            mb = "  ".join(f"{k} {v / 1024:6.1f} MB" for k, v in s.rss.items())
            say(f"t={at:6.0f} s  {mb}  rows {s.rows}")
            time.sleep(max(0.0, every * len(samples) - (time.monotonic() - start)))
        results = {}
        for kind, proc in loads.items():
            proc.wait(timeout=60)
            text = (work / f"load-{kind}.json").read_text().strip()
            results[kind] = json.loads(text) if text else {}
        alive = lbnat.poll() is None
        log_text = lbnat_log.read_text(errors="replace")
    flat, memory_lines = judge_memory(samples)
    traffic_ok, traffic_lines = judge_traffic(results)
    for line in memory_lines + traffic_lines:
        say(line)
    clean = alive and "Traceback" not in log_text and " restarted" not in log_text
    say(f"lbnat: {'alive, no traceback, no worker restart' if clean else 'FAILED'}")
    if flat is None:
        say("verdict: too short to judge")
        return 2
    verdict = flat and traffic_ok and clean
    say(f"verdict: {'PASS' if verdict else 'FAIL'} (RSS flat within {GROWTH} x, traffic intact)")
    return 0 if verdict else 1


def _stop(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through the Lab, which stops everything by pid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lbnat_lab.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--load", choices=sorted(LOADS), help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.load:  # one of the clients, inside a namespace
        print(json.dumps(LOADS[args.load][1](args.seconds)), flush=True)
        return 0
    if not (0 < args.minutes <= 24 * 60 and 0 < args.every <= 600):
        parser.error("--minutes must be in (0, 1440] and --every in (0, 600]")
    if (reason := skip_reason()) is not None:
        print(f"soak: cannot run: {reason}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _stop)
    try:
        return soak(args.minutes, args.every, sys.stdout)
    except KeyboardInterrupt:
        print("soak: interrupted; the lab is gone", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
