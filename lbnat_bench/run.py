"""The benchmark runner: the netns lab, the servers, the load balancers and the workloads.

    python -m lbnat_bench [--quick] [--out DIR] [--reps N] [--seconds S] [--profile]

Topology (scripts/lab.sh with one backend; every host a network namespace on one bridge)::

    c1 198.18.0.11 ──► b1 198.18.0.21 :5201 iperf3, :80 nginx (HTTP)      direct
    c1 ──► lb 198.18.0.2 :5201 tcp+udp, :80   lbnat ─────────────────► b1  lbnat
    c1 ──► lb 198.18.0.2 :8201, :8080         HAProxy (mode tcp) ────► b1  haproxy
    c1 ──► lb 198.18.0.2 :9201 tcp+udp, :9080 nginx stream ──────────► b1  nginx
    c1 ──► lb 198.18.0.5 :5201 tcp+udp, :80   nftables DNAT+SNAT ────► b1  nftables

The IPv6 rows (issue 21), in the same lab made dual stack (fd18::/64 beside 198.18.0.0/24),
after the rows above, bulk (1 stream) and new connections/s::

    c1 fd18::11 ──► b1 fd18::21 :5201 iperf3, :80 nginx                    direct-v6
    c1 ──► fd18::8 :5201, :80   lbnat (SRCIP 198.18.0.8, ip6 fd18::8) ──► b1  lbnat-v6
    c1 ──► fd18::2 :8201, :8080 HAProxy (mode tcp) ──────────────────────► b1  haproxy-v6
    c1 ──► fd18::8 :5202        the same lbnat, NAT64 ──► b1 198.18.0.21   lbnat-nat64 (bulk)

Their records are results["ipv6"], their medians results["ipv6_summary"], their table the
report's "IPv6" section; a failed start of the IPv6 lbnat fails its rows, not the run's others.

The direct-routing rows (issue 24, lbnat_bench.dr), after the IPv6 ones: download
(``iperf3 -R``) direct, through lbnat in DR mode (VIP 198.18.0.10, b1 answering directly),
HAProxy and lbnat in NAT mode; results["dr"], results["dr_summary"].

The lbnat variants sit on addresses of their own (198.18.0.2-4, 6), and so does the nftables
path: the kernel's own NAT (conntrack, a jhash over a backend map), no process in the way,
the physical limit of a NAT load balancer on this machine (lbnat_bench/nftlb.py).

All load balancers run at once (idle ones cost nothing measurable); each workload runs through
each path in turn, the order rotating every repetition so slow drift in the machine does not
favour one path. The load balancer's CPU time is read from /proc before and after each run.

After that lab is down, the scale-out workload runs in a lab of its own (lbnat_bench.ecmp:
1, 2 and 3 lbnat instances behind an ECMP router, and direct through the same router); its
records are results["ecmp"], its table results["ecmp_summary"].

Tuning, the same for every path:

- The client may reuse its own TIME_WAIT ports for new connections (net.ipv4.tcp_tw_reuse=1),
  as load generators are run: wrk often closes first, and without it the client runs out of
  ports within seconds of a connections-per-second run and then burns CPU looking for one.
- In the lb namespace the kernel's ephemeral ports (HAProxy's and nginx's upstream
  connections) are 10000-32767 and lbnat's NAT ports 32768-65535, more than the client's
  28,232 ephemeral ports: lbnat gives a client socket that comes back the NAT port it had (the
  backend may hold that port in TIME_WAIT, and only the same client socket's SYN is accepted
  there), so the NAT range never has to recycle another client's port in this run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from lbnat_bench import ecmp, nftlb, report
from lbnat_bench.report import Record, is_lbnat
from lbnat_lab.netns import REPO, Lab, LabError, checkout_env, terminate

DEFAULT_OUT = REPO / "docs" / "benchmarks"
README = REPO / "README.md"
README_BEGIN = "<!-- bench:begin (written by python -m lbnat_bench) -->"
README_END = "<!-- bench:end -->"

LB_IP = "198.18.0.2"
CLIENT = "c1"
BACKEND = "b1"
BACKEND_IP = "198.18.0.21"
IPERF_PORT = 5201
HTTP_PORT = 80
EPHEMERAL = "10000 32767"
NAT_PORTS = "32768-65535"
LB_IP6 = "fd18::2"  # the lab's LB address over IPv6: HAProxy's IPv6 frontends
BACKEND_IP6 = "fd18::21"
LBNAT6_IP = "198.18.0.8"  # the IPv6 rows' lbnat: SRCIP (NAT64's source towards b1)
LBNAT6_IP6 = "fd18::8"  # ... and its ip6, the IPv6 clients' address of its services
NAT64_IPERF_PORT = 5202  # its service of the IPv4 backend, for IPv6 clients


@dataclass(frozen=True)
class PathSpec:
    """Where a client connects to reach the backend through one path."""

    name: str
    host: str
    iperf_port: int
    http_port: int
    udp: bool = True


# lbnat's data-plane variants (#8), each on an address of its own on the LB's interface so
# all of them run side by side (an lbnat instance owns its address's NAT ports and guard).
LBNAT_VARIANTS: dict[str, tuple[str, list[str]]] = {
    "lbnat": (LB_IP, []),  # the defaults: one worker per core, mmap'ed rings, --offload auto
    # the pure-Python data plane: the same as "lbnat" without the kernel fast path (#17)
    "lbnat-python": ("198.18.0.6", ["--offload", "off"]),
    # the Python loop's I/O variants, measured without the fast path too
    "lbnat-1w": ("198.18.0.3", ["--workers", "1", "--offload", "off"]),  # one worker
    "lbnat-socket": ("198.18.0.4",  # a syscall per packet
                     ["--workers", "1", "--io", "socket", "--offload", "off"]),
    # the defaults with the metrics server on, scraped by a real Prometheus every second for
    # the whole run (#18): what metrics cost the packet path, against "lbnat"
    "lbnat-metrics": ("198.18.0.7", ["--metrics", "198.18.0.7:9120"]),
}
METRICS_TARGET = "198.18.0.7:9120"
PROMETHEUS_LISTEN = "127.0.0.1:9090"  # in c2, the client namespace wrk and iperf3 do not use
CLIENT_OF_PROMETHEUS = "c2"
NFT_IP = "198.18.0.5"
"""the nftables path's address: its own, so its rules never see another path's packets"""

PATHS: dict[str, PathSpec] = {
    "direct": PathSpec("direct", BACKEND_IP, IPERF_PORT, HTTP_PORT),
    **{name: PathSpec(name, ip, IPERF_PORT, HTTP_PORT) for name, (ip, _) in LBNAT_VARIANTS.items()},
    "haproxy": PathSpec("haproxy", LB_IP, 8201, 8080, udp=False),  # HAProxy has no UDP
    "nginx": PathSpec("nginx", LB_IP, 9201, 9080),
    "nftables": PathSpec("nftables", NFT_IP, IPERF_PORT, HTTP_PORT),
}
IPV6_PATHS: dict[str, PathSpec] = {
    "direct-v6": PathSpec("direct-v6", BACKEND_IP6, IPERF_PORT, HTTP_PORT),
    "lbnat-v6": PathSpec("lbnat-v6", LBNAT6_IP6, IPERF_PORT, HTTP_PORT),
    "haproxy-v6": PathSpec("haproxy-v6", LB_IP6, 8201, 8080, udp=False),
    "lbnat-nat64": PathSpec("lbnat-nat64", LBNAT6_IP6, NAT64_IPERF_PORT, 0, udp=False),
}
"""the IPv6 rows' paths (report.IPV6_PATHS); lbnat-nat64 has no HTTP service (bulk only)"""
IPV6_WORKLOADS: dict[str, tuple[str, ...]] = {
    "bulk_1": tuple(IPV6_PATHS),
    "conn_rate": ("direct-v6", "lbnat-v6", "haproxy-v6"),
}
LBNAT6 = "lbnat-v6"  # its process (log, admin socket) serves lbnat-nat64 too


@dataclass
class Settings:
    quick: bool = False
    reps: int = 3
    seconds: float = 4.0
    paths: list[str] = field(default_factory=lambda: list(PATHS))
    workloads: list[str] = field(
        default_factory=lambda: [
            "bulk_1", "bulk_8", "conn_rate", "keepalive", "fixed_rate", "udp_low", "udp_high"
        ]
    )
    scale_rows: list[int] = field(default_factory=lambda: [10_000, 100_000, 1_000_000])
    # the scale-out workload (lbnat_bench.ecmp): lbnat instances behind the ECMP router
    ecmp_instances: list[int] = field(default_factory=lambda: [1, 2, 3])
    ecmp_streams: int = 16  # parallel connections from each client: source ports to hash
    ecmp_paced_gbit: float = ecmp.PACED_GBIT  # all clients together, for the cost per Gbit/s
    conn_rate_connections: int = 32
    keepalive_connections: int = 64
    fixed_rate_rps: int = 1000
    fixed_rate_connections: int = 10
    udp_low_pps: int = 50_000
    udp_high_pps: int = 200_000
    udp_payload: int = 64
    threads: int = 2
    nat_ports: str = NAT_PORTS
    ipv6: bool = True  # the IPv6 rows (IPV6_WORKLOADS through IPV6_PATHS), after the others
    dr: bool = True  # the direct-routing rows (lbnat_bench.dr), after the IPv6 ones
    profile: bool = False
    redraw: bool = False

    @classmethod
    def quick_mode(cls) -> Settings:
        return cls(quick=True, reps=1, seconds=1.0, scale_rows=[10_000, 100_000])


class BenchError(RuntimeError):
    """A setup step or a workload failed; the message says which and why."""


# --- processes in namespaces ------------------------------------------------------------------


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants (nginx's workers are children of its master)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(report.stat_fields(stat)[1])  # field 4
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds of these processes (all their threads) so far."""
    ticks = 0.0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
            ticks += report.cpu_seconds(f.read())
    return ticks / os.sysconf("SC_CLK_TCK")


# --- configuration files of the peers ---------------------------------------------------------


def backend_nginx_conf(work: Path, ipv6: bool = False) -> str:
    root = work / "b1-nginx"
    root.mkdir(exist_ok=True)
    listen6 = f"listen [{BACKEND_IP6}]:{HTTP_PORT} reuseport backlog=4096;" if ipv6 else ""
    return f"""
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log;
user root;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path {root};
    proxy_temp_path {root};
    fastcgi_temp_path {root};
    uwsgi_temp_path {root};
    scgi_temp_path {root};
    server {{
        listen {BACKEND_IP}:{HTTP_PORT} reuseport backlog=4096;
        {listen6}
        location / {{ return 200 "hello from b1\\n"; }}
    }}
}}
"""


def haproxy_conf(cpus: int, ipv6: bool = False) -> str:
    p = PATHS["haproxy"]
    return haproxy_v4_conf(cpus, p) + (haproxy_v6_conf() if ipv6 else "")


def haproxy_v6_conf() -> str:
    """HAProxy's IPv6 frontends (the haproxy-v6 path), in the same process as the IPv4 ones."""
    p = IPV6_PATHS["haproxy-v6"]
    return f"""
frontend iperf6
    bind [{LB_IP6}]:{p.iperf_port}
    default_backend iperf6
backend iperf6
    server b1 [{BACKEND_IP6}]:{IPERF_PORT}

frontend http6
    bind [{LB_IP6}]:{p.http_port}
    default_backend http6
backend http6
    server b1 [{BACKEND_IP6}]:{HTTP_PORT}
"""


def haproxy_v4_conf(cpus: int, p: PathSpec) -> str:
    return f"""
global
    nbthread {cpus}
    maxconn 8000

defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s

frontend iperf
    bind {LB_IP}:{p.iperf_port}
    default_backend iperf
backend iperf
    server b1 {BACKEND_IP}:{IPERF_PORT}

frontend http
    bind {LB_IP}:{p.http_port}
    default_backend http
backend http
    server b1 {BACKEND_IP}:{HTTP_PORT}
"""


def nginx_stream_conf(work: Path, cpus: int) -> str:
    root = work / "lb-nginx"
    root.mkdir(exist_ok=True)
    p = PATHS["nginx"]
    return f"""
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
user root;
worker_processes {cpus};
pid {root}/nginx.pid;
error_log {root}/error.log;
events {{ worker_connections 16384; }}
stream {{
    server {{ listen {LB_IP}:{p.iperf_port} reuseport; proxy_pass {BACKEND_IP}:{IPERF_PORT}; }}
    server {{ listen {LB_IP}:{p.iperf_port} udp reuseport;
              proxy_pass {BACKEND_IP}:{IPERF_PORT}; proxy_timeout 10s; }}
    server {{ listen {LB_IP}:{p.http_port} reuseport backlog=4096;
              proxy_pass {BACKEND_IP}:{HTTP_PORT}; }}
}}
"""


def lbnat_conf(work: Path, nat_ports: str, variant: str = "lbnat") -> dict[str, Any]:
    off = {"enabled": False}  # iperf3's server takes a probe's connect for a test client
    return {
        "lb_ip": LBNAT_VARIANTS[variant][0],
        "nat_ports": nat_ports,
        "admin_socket": str(work / f"{variant}.sock"),
        "log": {"quiet": True},
        "services": [
            {"name": "iperf", "protocol": "tcp", "port": IPERF_PORT, "health": off,
             "backends": [{"ip": BACKEND_IP, "port": IPERF_PORT}]},
            {"name": "iperf-udp", "protocol": "udp", "port": IPERF_PORT, "health": off,
             "backends": [{"ip": BACKEND_IP, "port": IPERF_PORT}]},
            {"name": "http", "protocol": "tcp", "port": HTTP_PORT,
             "health": {"check": "syn", "interval": 2},
             "backends": [{"ip": BACKEND_IP, "port": HTTP_PORT}]},
        ],
    }


def lbnat6_conf(work: Path, nat_ports: str) -> dict[str, Any]:
    """The IPv6 rows' lbnat: SRCIP LBNAT6_IP and ip6 LBNAT6_IP6; iperf3 and HTTP on the
    backend's IPv6 address, and iperf3 on its IPv4 address for IPv6 clients (NAT64)."""
    off = {"enabled": False}
    return {
        "lb_ip": LBNAT6_IP,
        "ip6": LBNAT6_IP6,
        "nat_ports": nat_ports,
        "admin_socket": str(work / f"{LBNAT6}.sock"),
        "log": {"quiet": True},
        "services": [
            {"name": "iperf6", "protocol": "tcp", "port": IPERF_PORT, "health": off,
             "backends": [{"ip": BACKEND_IP6, "port": IPERF_PORT}]},
            {"name": "http6", "protocol": "tcp", "port": HTTP_PORT,
             "health": {"check": "syn", "interval": 2},
             "backends": [{"ip": BACKEND_IP6, "port": HTTP_PORT}]},
            {"name": "iperf-nat64", "protocol": "tcp", "port": NAT64_IPERF_PORT, "health": off,
             "backends": [{"ip": BACKEND_IP, "port": IPERF_PORT}]},
        ],
    }  # fmt: skip


def nft_services() -> list[nftlb.Service]:
    """The nftables path's services: the same three as lbnat's, each port to itself."""
    return [
        nftlb.Service("iperf_tcp", "tcp", IPERF_PORT, ((BACKEND_IP, IPERF_PORT),)),
        nftlb.Service("iperf_udp", "udp", IPERF_PORT, ((BACKEND_IP, IPERF_PORT),)),
        nftlb.Service("http", "tcp", HTTP_PORT, ((BACKEND_IP, HTTP_PORT),)),
    ]


# --- the bed: lab + servers + load balancers --------------------------------------------------


class Bed:
    def __init__(self, settings: Settings, work: Path) -> None:
        self.settings = settings
        self.work = work
        self._lab: Lab | None = None
        self.servers: dict[str, subprocess.Popen[bytes]] = {}  # by name, as in <work>/<name>.log
        self.cpus = os.cpu_count() or 1
        self.lb_pid: dict[str, int] = {}
        self.iperf_server: subprocess.Popen[bytes] | None = None
        self.nft_table: str | None = None  # the nftables path's table, while it may be there

    @property
    def lab(self) -> Lab:
        if self._lab is None:
            raise BenchError("the lab is not up")
        return self._lab

    def up(self) -> None:
        # one backend: every path ends at b1
        ipv6 = self.settings.ipv6  # dual stack for the IPv6 rows
        self._lab = Lab(backends=1, prefix=f"lbb{secrets.token_hex(3)}", ipv6=ipv6)
        lab, work = self.lab, self.work
        self.sysctl("lb", f"net.ipv4.ip_local_port_range={EPHEMERAL}")  # IPv6's too
        self.sysctl(CLIENT, "net.ipv4.tcp_tw_reuse=1")  # IPv6's too
        (work / "b1-nginx.conf").write_text(backend_nginx_conf(work, ipv6))
        self.start(BACKEND, "b1-nginx", ["nginx", "-e", str(work / "b1-nginx" / "error.log"),
                                        "-c", str(work / "b1-nginx.conf"), "-g", "daemon off;"])
        self.start_iperf_server()
        (work / "haproxy.cfg").write_text(haproxy_conf(self.cpus, ipv6))
        (work / "lb-nginx.conf").write_text(nginx_stream_conf(work, self.cpus))
        if "haproxy" in self.settings.paths or ipv6:
            proc = self.start("lb", "haproxy", ["haproxy", "-db", "-f", str(work / "haproxy.cfg")])
            if "haproxy" in self.settings.paths:
                self.lb_pid["haproxy"] = proc.pid
            if ipv6:
                self.lb_pid["haproxy-v6"] = proc.pid
        if "nginx" in self.settings.paths:
            proc = self.start("lb", "lb-nginx", [
                "nginx", "-e", str(work / "lb-nginx" / "error.log"),
                "-c", str(work / "lb-nginx.conf"), "-g", "daemon off;"])
            self.lb_pid["nginx"] = proc.pid
        for variant, (ip, options) in LBNAT_VARIANTS.items():
            if variant not in self.settings.paths:
                continue
            if ip != LB_IP:
                subprocess.run(lab.argv("lb", ["ip", "addr", "add", f"{ip}/24", "dev", "eth0"]),
                               check=True, capture_output=True, timeout=10)
            conf = work / f"{variant}.json"
            conf.write_text(json.dumps(lbnat_conf(work, self.settings.nat_ports, variant)))
            proc = self.start("lb", variant, [
                sys.executable, "-m", "lbnat.cli", "run", "--config", str(conf), *options])
            self.lb_pid[variant] = proc.pid
        if "nftables" in self.settings.paths:
            self.nft_up()
        if "lbnat-metrics" in self.lb_pid:
            self.prometheus_up()
        self.wait_listening(BACKEND, HTTP_PORT)
        self.wait_listening(BACKEND, IPERF_PORT)
        for path in ("haproxy", "nginx"):
            if path in self.lb_pid:
                self.wait_listening("lb", PATHS[path].http_port)
                self.wait_listening("lb", PATHS[path].iperf_port)
        if "haproxy-v6" in self.lb_pid:
            self.wait_listening("lb", IPV6_PATHS["haproxy-v6"].http_port)
            self.wait_listening("lb", IPV6_PATHS["haproxy-v6"].iperf_port)
        for variant in LBNAT_VARIANTS:
            if variant in self.lb_pid:
                self.wait_lbnat(variant)

    def offload(self, variant: str) -> str:
        """Which data path an lbnat variant runs: "off" (asked for), "tc offload", or the
        fallback lbnat printed at start ("no offload (why; ...)", said even with quiet logs)."""
        options = LBNAT_VARIANTS[variant][1] if variant in LBNAT_VARIANTS else []
        if "--offload" in options and options[options.index("--offload") + 1] == "off":
            return "off"
        log = (self.work / f"{variant}.log").read_text(errors="replace")
        fallback = re.search(r"no offload \(.*\)", log)
        return "tc offload" if fallback is None else fallback.group(0)

    def start_iperf_server(self) -> None:
        if self.iperf_server is not None:
            terminate([self.iperf_server])
        self.iperf_server = self.start(BACKEND, "b1-iperf3", ["iperf3", "-s", "-p",
                                                              str(IPERF_PORT)])

    def wait_lbnat(self, variant: str = "lbnat", timeout: float = 20) -> None:
        """Ready when the admin socket answers `status` and the http backend is alive."""
        deadline = time.monotonic() + timeout
        sock = str(self.work / f"{variant}.sock")
        last = ""
        while time.monotonic() < deadline:
            done = subprocess.run(
                [sys.executable, "-m", "lbnat.cli", "status", "--json", "--admin-socket", sock],
                capture_output=True, text=True, timeout=10, check=False,
            )
            last = done.stdout + done.stderr
            if done.returncode == 0 and '"alive"' in done.stdout:
                return
            proc = self.servers[variant]
            if proc.poll() is not None:
                log = (self.work / f"{variant}.log").read_text(errors="replace")
                raise BenchError(f"lbnat exited {proc.returncode} at start: {log[-500:]}")
            time.sleep(0.2)
        raise BenchError(f"lbnat did not become ready in {timeout} s: {last[-300:]}")

    def lbnat6_up(self) -> None:
        """The IPv6 rows' lbnat (LBNAT6), its addresses on the LB's interface, ready; on a
        failed start it is stopped and forgotten (its rows fail, the others' retries do not)
        and the BenchError raised."""
        self.run("lb", ["ip", "addr", "add", f"{LBNAT6_IP}/24", "dev", "eth0"], timeout=10)
        self.run("lb", ["ip", "-6", "addr", "add", f"{LBNAT6_IP6}/64", "dev", "eth0", "nodad"],
                 timeout=10)  # fmt: skip
        conf = self.work / f"{LBNAT6}.json"
        conf.write_text(json.dumps(lbnat6_conf(self.work, self.settings.nat_ports)))
        proc = self.start("lb", LBNAT6, [sys.executable, "-m", "lbnat.cli", "run", "--config",
                                         str(conf)])  # fmt: skip
        try:
            self.wait_lbnat(LBNAT6)
            self.wait_listening(BACKEND, HTTP_PORT)  # nginx on b1's IPv6 address too
        except BenchError:
            terminate([proc])
            del self.servers[LBNAT6]
            raise
        self.lb_pid[LBNAT6] = self.lb_pid["lbnat-nat64"] = proc.pid

    def nft_up(self) -> None:
        """The nftables path: its address on the LB's interface, forwarding on (the kernel
        forwards the DNATed packets; no ICMP redirects to the client, which would tell it the
        backend is one hop away), then its table."""
        self.nft_table = nftlb.table_name(NFT_IP)  # from here on, down() removes it
        self.run("lb", ["ip", "addr", "add", f"{NFT_IP}/24", "dev", "eth0"], timeout=10)
        self.sysctl("lb", "net.ipv4.ip_forward=1")
        for dev in ("all", "eth0"):
            self.sysctl("lb", f"net.ipv4.conf.{dev}.send_redirects=0")
        script = self.work / "nftables.nft"
        script.write_text(nftlb.ruleset(NFT_IP, nft_services()))
        self.run("lb", ["nft", "-f", str(script)], timeout=10)

    def prometheus_up(self) -> None:
        """Debian's Prometheus in c2, scraping lbnat-metrics every second."""
        conf = self.work / "prometheus.yml"
        conf.write_text(
            "global: {scrape_interval: 1s, scrape_timeout: 1s}\n"
            "scrape_configs:\n"
            f"  - {{job_name: lbnat, static_configs: [{{targets: ['{METRICS_TARGET}']}}]}}\n"
        )
        self.start(CLIENT_OF_PROMETHEUS, "prometheus", [
            "prometheus", f"--config.file={conf}", f"--storage.tsdb.path={self.work / 'tsdb'}",
            f"--web.listen-address={PROMETHEUS_LISTEN}", "--log.level=warn"])

    def scrapes(self) -> int | None:
        """How many scrapes of lbnat-metrics succeeded (the samples of `up` that are 1)."""
        if "prometheus" not in self.servers:
            return None
        query = "sum_over_time(up{job='lbnat'}[6h])"
        with contextlib.suppress(BenchError, ValueError, KeyError, IndexError):
            reply = json.loads(self.run(CLIENT_OF_PROMETHEUS, [
                "curl", "-sS", "--max-time", "5", "--get", "--data-urlencode", f"query={query}",
                f"http://{PROMETHEUS_LISTEN}/api/v1/query"], timeout=10))
            return int(float(reply["data"]["result"][0]["value"][1]))
        return None

    def nft_down(self) -> None:
        """Remove the nftables path's table (quietly: it runs in a finally, even after a
        failed start; the namespace goes right after)."""
        if self.nft_table is None or self._lab is None:
            return
        with contextlib.suppress(BenchError, OSError):
            self.run("lb", ["nft", "-f", "-"], timeout=10, stdin=nftlb.delete_script(NFT_IP))
        self.nft_table = None

    def down(self) -> None:
        """Stop every process by pid, take the namespaces down; quietly (it runs in a finally)."""
        self.nft_down()
        if self._lab is not None:
            with contextlib.suppress(LabError):
                self._lab.close()
            self._lab = None

    # processes in the lab's namespaces

    def start(self, host: str, name: str, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        """Start a server in `host`; its output goes to <work>/<name>.log."""
        log = open(self.work / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
        try:
            # not the lab's LBNAT_ADMIN_SOCKET: it would override each lbnat config's own socket
            proc = self.lab.popen(host, *argv, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True, env=checkout_env())
        finally:
            log.close()
        self.servers[name] = proc
        return proc

    def check_alive(self) -> None:
        """Raise with the tail of its log if a server started here has exited."""
        for name, proc in self.servers.items():
            if proc.poll() is not None:
                log = (self.work / f"{name}.log").read_text(errors="replace").strip()
                raise BenchError(f"{name} exited {proc.returncode}: {log[-500:]}")

    def run(self, host: str, argv: Sequence[str], timeout: float, stdin: str | None = None) -> str:
        """Run a client in `host` to completion; its stdout (stderr appended on failure)."""
        try:
            done = self.lab.run(host, *argv, check=False, timeout=timeout, start_new_session=True,
                                input=stdin)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{argv[0]} did not finish in {timeout:.0f} s") from None
        if done.returncode != 0:
            raise BenchError(
                f"{' '.join(argv)} exited {done.returncode}: "
                f"{(done.stdout + done.stderr).strip()[-400:]}"
            )
        return done.stdout

    def sysctl(self, host: str, setting: str) -> None:
        self.run(host, ["sysctl", "-qw", setting], timeout=10)

    def wait_listening(self, host: str, port: int, timeout: float = 15) -> None:
        try:
            self.lab.wait_listening(host, port, timeout=timeout, between_polls=self.check_alive)
        except TimeoutError:
            raise BenchError(f"nothing listens on {host} port {port} after {timeout} s") from None

    def lb_cpu(self, path: str) -> float | None:
        pid = self.lb_pid.get(path)
        return None if pid is None else cpu_seconds(process_tree(pid))


# --- workloads ---------------------------------------------------------------------------------


Workload = Callable[[Bed, PathSpec], Record]


def _iperf(bed: Bed, path: PathSpec, extra: Sequence[str], udp: bool) -> Record:
    s = bed.settings
    argv = ["iperf3", "-c", path.host, "-p", str(path.iperf_port), "-t", f"{s.seconds:g}",
            "-J", *extra]
    if ":" in path.host:  # the IPv6 rows: a path that does not connect fails in 5 s, not 30
        argv[1:1] = ["--connect-timeout", "5000"]
    text = bed.run(CLIENT, argv, timeout=s.seconds + 30)
    return report.parse_iperf_udp(text) if udp else report.parse_iperf_tcp(text)


def bulk_1(bed: Bed, path: PathSpec) -> Record:
    return _iperf(bed, path, [], udp=False)


def bulk_8(bed: Bed, path: PathSpec) -> Record:
    return _iperf(bed, path, ["-P", "8"], udp=False)


def _udp(bed: Bed, path: PathSpec, pps: int) -> Record:
    s = bed.settings
    bits = pps * s.udp_payload * 8
    figures = _iperf(bed, path, ["-u", "-l", str(s.udp_payload), "-b", str(bits)], udp=True)
    figures["offered_pps"] = float(pps)
    return figures


def udp_low(bed: Bed, path: PathSpec) -> Record:
    return _udp(bed, path, bed.settings.udp_low_pps)


def udp_high(bed: Bed, path: PathSpec) -> Record:
    return _udp(bed, path, bed.settings.udp_high_pps)


def _wrk(bed: Bed, path: PathSpec, connections: int, extra: Sequence[str]) -> Record:
    s = bed.settings
    host = f"[{path.host}]" if ":" in path.host else path.host  # an IPv6 address in a URL
    url = f"http://{host}:{path.http_port}/"
    argv = ["wrk", "-t", str(min(s.threads, connections)), "-c", str(connections),
            "-d", f"{max(1, round(s.seconds))}s", "--timeout", "5s", "--latency", *extra, url]
    figures = report.parse_wrk(bed.run(CLIENT, argv, timeout=s.seconds + 30))
    if figures["requests"] == 0:
        raise BenchError(f"wrk through {path.name}: no request completed")
    return figures


def conn_rate(bed: Bed, path: PathSpec) -> Record:
    """One request per connection: the client asks the server to close after the reply."""
    s = bed.settings
    return _wrk(bed, path, s.conn_rate_connections, ["-H", "Connection: close"])


def keepalive(bed: Bed, path: PathSpec) -> Record:
    return _wrk(bed, path, bed.settings.keepalive_connections, [])


def fixed_rate(bed: Bed, path: PathSpec) -> Record:
    """A steady request rate well below saturation: each connection waits `delay` ms before
    each request (wrk's delay() hook), so the rate is about connections x 1000 / delay."""
    s = bed.settings
    delay_ms = s.fixed_rate_connections * 1000 / s.fixed_rate_rps
    script = bed.work / "fixed_rate.lua"
    script.write_text(f"function delay()\n  return {delay_ms:g}\nend\n")
    figures = _wrk(bed, path, s.fixed_rate_connections, ["-s", str(script)])
    figures["target_rps"] = float(s.fixed_rate_rps)
    return figures


WORKLOADS: dict[str, Workload] = {
    "bulk_1": bulk_1,
    "bulk_8": bulk_8,
    "conn_rate": conn_rate,
    "keepalive": keepalive,
    "fixed_rate": fixed_rate,
    "udp_low": udp_low,
    "udp_high": udp_high,
}
UDP_WORKLOADS = {"udp_low", "udp_high"}
PROFILED = ("bulk_1", "conn_rate", "keepalive", "udp_high")
"""the workloads --profile samples lbnat under (one more run each, not counted)"""


# --- one run -----------------------------------------------------------------------------------


def measure(bed: Bed, workload: str, path: PathSpec, rep: int, log: IO[str]) -> Record:
    """One workload through one path, with the load balancer's CPU seconds; one retry."""
    for attempt in (1, 2):
        before = bed.lb_cpu(path.name)
        try:
            figures = WORKLOADS[workload](bed, path)
        except (BenchError, report.ParseError) as exc:
            print(f"  {workload} via {path.name}: attempt {attempt} failed: {exc}", file=log)
            if attempt == 2:
                return {"workload": workload, "path": path.name, "rep": rep, "error": str(exc)}
            if workload.startswith(("bulk", "udp")):
                bed.start_iperf_server()  # iperf3 -s can stay 'busy' after a failed test
                bed.wait_listening(BACKEND, IPERF_PORT)
            time.sleep(1)
            continue
        after = bed.lb_cpu(path.name)
        record: Record = {"workload": workload, "path": path.name, "rep": rep, **figures}
        if before is not None and after is not None:
            record["lb_cpu_s"] = after - before
        return record
    raise AssertionError("unreachable")


def ipv6_rows(bed: Bed, log: IO[str]) -> list[Record]:
    """The IPv6 rows: start their lbnat (the direct and HAProxy paths run already), then each
    of IPV6_WORKLOADS through its paths in turn, the order rotating every repetition as the
    other rows'. If that lbnat does not start, its rows are failed records."""
    s = bed.settings
    down = ""
    try:
        bed.lbnat6_up()
        print(f"bench: IPv6 rows: lbnat {LBNAT6_IP6} ({bed.offload(LBNAT6)})", file=log)
    except BenchError as exc:
        down = str(exc)[-1000:]
        print(f"bench: IPv6 rows: lbnat over IPv6 did not start: {down}", file=log)
    records: list[Record] = []
    for rep in range(s.reps):
        for w_index, (workload, order) in enumerate(IPV6_WORKLOADS.items()):
            shift = (rep + w_index) % len(order)
            for name in order[shift:] + order[:shift]:
                if down and is_lbnat(name):
                    record: Record = {"workload": workload, "path": name, "rep": rep,
                                      "error": f"{LBNAT6} did not start: {down}"}  # fmt: skip
                else:
                    record = measure(bed, workload, IPV6_PATHS[name], rep, log)
                print(f"  rep {rep + 1} {workload:<10} {name:<11} {one_line(record)}",
                      file=log, flush=True)  # fmt: skip
                records.append(record)
    return records


def one_line(record: Record) -> str:
    if "error" in record:
        return f"FAILED: {record['error']}"
    keys = ("gbit_s", "rps", "pps", "loss_pct", "p50_ms", "p99_ms", "lb_cpu_s")
    return "  ".join(f"{k} {record[k]:.3g}" for k in keys if k in record)


def scale_records(rows_list: Sequence[int], log: IO[str]) -> list[Record]:
    out = []
    for rows in rows_list:
        done = subprocess.run(
            [sys.executable, "-m", "lbnat_bench.scale", "--rows", str(rows)],
            capture_output=True, text=True, timeout=600, check=False,
        )
        if done.returncode != 0:
            print(f"  scale {rows} rows failed: {done.stderr.strip()[-300:]}", file=log)
            continue
        record = json.loads(done.stdout)
        print(f"  scale {rows:>9,} rows: {record['us_per_packet']:.2f} us/packet, "
              f"{record['bytes_per_session']:.0f} B/session, RSS "
              f"{record['rss_bytes'] / 1e6:.0f} MB", file=log)
        out.append(record)
    return out


def profile_lbnat(bed: Bed, workload: str, log: IO[str]) -> str | None:
    """Sample lbnat's threads with py-spy while `workload` runs through lbnat; the collapsed
    stacks are summarised into the functions that hold the most samples."""
    pyspy = shutil.which("py-spy")
    if pyspy is None or "lbnat" not in bed.lb_pid:
        print("  profile: py-spy not found; skipped", file=log)
        return None
    raw = bed.work / f"profile-{workload}.txt"
    seconds = max(1, round(bed.settings.seconds))
    sampler = subprocess.Popen(
        [pyspy, "record", "--pid", str(bed.lb_pid["lbnat"]), "--subprocesses",
         "--duration", str(seconds),
         "--rate", "250", "--format", "raw", "--nonblocking", "--output", str(raw)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        measure(bed, workload, PATHS["lbnat"], -1, log)
    finally:
        try:
            sampler.wait(seconds + 30)
        except subprocess.TimeoutExpired:
            sampler.kill()
            sampler.wait()
    if not raw.exists():
        why = sampler.stderr.read().decode(errors="replace") if sampler.stderr else ""
        print(f"  profile: py-spy wrote nothing: {why.strip()[-300:]}", file=log)
        return None
    return report.profile_summary(raw.read_text(), workload)


def ecmp_seconds(settings: Settings) -> float:
    # a run of 1 s (quick mode) is mostly 32 connections' slow start: 2 s at least
    return max(2.0, settings.seconds)


def scale_out(settings: Settings, log: IO[str]) -> tuple[list[Record], dict[str, str]]:
    """The scale-out workload in a lab of its own, after the main one is down (they would
    share the cores): its records (a failed setup is one failed record, so the rest of the
    run is still written) and each instance's data path."""
    if not settings.ecmp_instances:
        return [], {}
    if missing := ecmp.missing_tools():
        print(f"bench: ecmp workload skipped: missing {', '.join(missing)} "
              "(apt-get install bird2 exabgp)", file=log)
        return [], {}
    print(f"bench: ecmp workload, {', '.join(map(str, settings.ecmp_instances))} instance(s), "
          f"{settings.reps} rep(s) x {ecmp_seconds(settings):g} s", file=log, flush=True)
    with tempfile.TemporaryDirectory(prefix="lbnat-bench-ecmp.") as tmp:
        try:
            return ecmp.run(settings.ecmp_instances, settings.reps, ecmp_seconds(settings),
                            settings.ecmp_streams, Path(tmp), log, settings.ecmp_paced_gbit)
        except (LabError, OSError, subprocess.SubprocessError) as exc:
            print(f"  ecmp: failed: {exc}", file=log)
            return [{"workload": ecmp.WORKLOAD, "path": "lbnat", "rep": 0,
                     "error": str(exc)[-1000:]}], {}


def versions() -> dict[str, str]:
    def first_line(argv: Sequence[str], pattern: str) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except OSError:
            return "missing"
        m = re.search(pattern, done.stdout + done.stderr)
        return m.group(1) if m else "unknown"

    from lbnat import __version__

    return {
        "lbnat": __version__,
        "haproxy": first_line(["haproxy", "-v"], r"version (\S+)"),
        "nginx": first_line(["nginx", "-v"], r"nginx/(\S+)"),
        "iperf3": first_line(["iperf3", "-v"], r"iperf (\S+)"),
        "wrk": first_line(["wrk", "-v"], r"wrk (\S+)"),
    }


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def preflight(settings: Settings) -> None:
    if os.geteuid() != 0:
        raise BenchError("run as root: the benchmark builds network namespaces")
    needed = {"ip": "iproute2", "iperf3": "iperf3", "wrk": "wrk", "ss": "iproute2"}
    if "nftables" in settings.paths or any(is_lbnat(p) for p in settings.paths):
        needed["nft"] = "nftables"
    if "haproxy" in settings.paths or settings.ipv6:
        needed["haproxy"] = "haproxy"
    if "lbnat-metrics" in settings.paths:
        needed["prometheus"] = "prometheus"
        needed["curl"] = "curl"
    if "nginx" in settings.paths or "direct" in settings.paths or settings.ipv6:
        needed["nginx"] = "nginx-light"
    missing = [f"{tool} (Debian package {pkg})" for tool, pkg in needed.items()
               if shutil.which(tool) is None]
    if "nginx" in settings.paths and not Path(
        "/usr/lib/nginx/modules/ngx_stream_module.so"
    ).exists():
        missing.append("nginx's stream module (Debian package libnginx-mod-stream)")
    if missing:
        raise BenchError("missing: " + ", ".join(missing) + "; run `make deps`")


def run(settings: Settings, out: Path, command: str, log: IO[str]) -> dict[str, Any]:
    preflight(settings)
    out.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    t0 = time.monotonic()
    records: list[Record] = []
    profiles: list[str] = []
    offload: dict[str, str] = {}
    scrapes: int | None = None
    ipv6_records: list[Record] = []
    dr_records: list[Record] = []
    with tempfile.TemporaryDirectory(prefix="lbnat-bench.") as tmp:
        bed = Bed(settings, Path(tmp))
        try:
            bed.up()
            print(f"bench: lab {bed.lab.prefix} up; {settings.reps} rep(s) x "
                  f"{settings.seconds:g} s; paths {', '.join(settings.paths)}", file=log)
            offload = {v: bed.offload(v) for v in LBNAT_VARIANTS if v in bed.lb_pid}
            for variant, state in offload.items():
                if state.startswith("no offload"):
                    print(f"bench: WARNING: {variant} runs without its kernel fast path: {state}"
                          " (`make bpf` builds the program)", file=log)
            for rep in range(settings.reps):
                for w_index, workload in enumerate(settings.workloads):
                    order = [p for p in settings.paths
                             if workload not in UDP_WORKLOADS or PATHS[p].udp]
                    shift = (rep + w_index) % len(order)
                    for name in order[shift:] + order[:shift]:
                        record = measure(bed, workload, PATHS[name], rep, log)
                        print(f"  rep {rep + 1} {workload:<10} {name:<8} {one_line(record)}",
                              file=log, flush=True)
                        records.append(record)
            scrapes = bed.scrapes()
            if settings.ipv6:
                ipv6_records = ipv6_rows(bed, log)
                if LBNAT6 in bed.lb_pid:
                    offload[LBNAT6] = bed.offload(LBNAT6)
            if settings.dr:
                from lbnat_bench import dr  # (it builds on this module)

                dr_records = dr.dr_rows(bed, log)
            if settings.profile:
                for workload in [w for w in PROFILED if w in settings.workloads]:
                    profile = profile_lbnat(bed, workload, log)
                    if profile:
                        profiles.append(profile)
        finally:
            bed.down()
    ecmp_records, ecmp_offload = scale_out(settings, log)
    scale = scale_records(settings.scale_rows, log)
    good = [r for r in records if "error" not in r]
    summary = report.summarize(good)
    results: dict[str, Any] = {
        "meta": {
            "started": started,
            "command": command,
            "seconds_total": round(time.monotonic() - t0, 1),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "cpu_model": cpu_model(),
            "versions": versions(),
            "reps": settings.reps,
            "seconds": settings.seconds,
            "settings": asdict(settings),
            "offload": offload,  # lbnat variant -> "tc offload", "off" or lbnat's fallback
            "metrics_scrapes": scrapes,  # Prometheus' good scrapes of lbnat-metrics
            "ecmp_offload": ecmp_offload,  # instance -> "tc offload" or lbnat's fallback
            "ecmp_seconds": ecmp_seconds(settings),
            "ecmp_paced_gbit": settings.ecmp_paced_gbit,
        },
        "paths": settings.paths,
        "records": records,
        "failed": [
            r for r in records + ipv6_records + dr_records + ecmp_records if "error" in r
        ],
        "summary": summary,
        "ipv6": ipv6_records,
        "ipv6_summary": report.summarize(r for r in ipv6_records if "error" not in r),
        "dr": dr_records,
        "dr_summary": report.summarize(r for r in dr_records if "error" not in r),
        "ecmp": ecmp_records,
        "ecmp_summary": ecmp.summarize(ecmp_records),
        "scale": scale,
        "goals": report.goal_rows(summary, scale),
        "profiles": profiles,
    }
    write_outputs(results, out)
    return results


def write_outputs(results: dict[str, Any], out: Path) -> None:
    from lbnat_bench import charts  # matplotlib is imported only when charts are drawn

    names = charts.draw_all(results, out)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    text = report.markdown_report(results, names)
    (out / "README.md").write_text(text)


def update_readme(results: dict[str, Any], readme: Path = README) -> bool:
    """Put the run's table and charts between the README's bench markers."""
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        return False
    block = report.readme_block(results)
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(f"{head}{README_BEGIN}\n{block}\n{README_END}{tail}")
    return True


def redraw(out: Path, readme: bool) -> int:
    """Rewrite the report, the goals and the charts of an earlier run from its JSON."""
    try:
        results = json.loads((out / "results.json").read_text())
        results["summary"] = report.summarize(r for r in results["records"] if "error" not in r)
        results["goals"] = report.goal_rows(results["summary"], results.get("scale", []))
        results["ipv6_summary"] = report.summarize(
            r for r in results.get("ipv6", []) if "error" not in r
        )
        results["ecmp_summary"] = ecmp.summarize(results.get("ecmp", []))
        write_outputs(results, out)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"bench: error: cannot redraw from {out / 'results.json'}: {exc!r}",
              file=sys.stderr)
        return 1
    if readme:
        update_readme(results)
    print(f"bench: redrew {out}/README.md and charts from results.json")
    return 0


def parse_args(argv: Sequence[str] | None) -> tuple[Settings, Path, bool]:
    parser = argparse.ArgumentParser(
        prog="python -m lbnat_bench",
        description="lbnat against direct, HAProxy, nginx stream and nftables NAT in a netns "
        "lab (root). "
        "Example: sudo python -m lbnat_bench --quick --out /tmp/bench",
    )
    parser.add_argument("--quick", action="store_true",
                        help="smoke run of about two minutes: 1 repetition of 1 s (2 s for "
                        "the scale-out workload), small scale")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output directory (default {DEFAULT_OUT.relative_to(REPO)})")
    parser.add_argument("--reps", type=int, help="repetitions per workload and path")
    parser.add_argument("--seconds", type=float, help="seconds per run")
    parser.add_argument("--paths", help=f"comma-separated subset of {','.join(PATHS)}")
    parser.add_argument("--workloads", help=f"comma-separated subset of {','.join(WORKLOADS)}")
    parser.add_argument("--scale-rows", help="comma-separated table sizes, e.g. 10000,1000000; "
                        "'' to skip")
    parser.add_argument("--ecmp-instances", help="comma-separated instance counts of the "
                        "scale-out workload (default 1,2,3); '' to skip")
    parser.add_argument("--no-ipv6", action="store_true",
                        help="leave out the IPv6 rows (lbnat, HAProxy and direct over IPv6, "
                        "NAT64; about a minute and a half, 15 s with --quick)")
    parser.add_argument("--no-dr", action="store_true",
                        help="leave out the direct-routing rows (download through lbnat in DR "
                        "mode, direct, HAProxy and lbnat in NAT mode; about 30 s, 10 s with "
                        "--quick)")
    parser.add_argument("--profile", action="store_true",
                        help="also sample lbnat with py-spy under keep-alive, UDP and bulk load")
    parser.add_argument("--no-readme", action="store_true",
                        help="do not update README.md's benchmark section")
    parser.add_argument("--redraw", action="store_true",
                        help="run nothing: redraw the report and charts from OUT/results.json")
    args = parser.parse_args(argv)
    settings = Settings.quick_mode() if args.quick else Settings()
    if args.reps is not None:
        if args.reps < 1:
            parser.error("--reps must be at least 1")
        settings.reps = args.reps
    if args.seconds is not None:
        if not 1 <= args.seconds <= 600:
            parser.error("--seconds must be between 1 and 600")
        settings.seconds = args.seconds
    if args.paths is not None:
        settings.paths = _subset(parser, "--paths", args.paths, PATHS)
    if args.workloads is not None:
        settings.workloads = _subset(parser, "--workloads", args.workloads, WORKLOADS)
    if args.scale_rows is not None:
        try:
            settings.scale_rows = [int(x) for x in args.scale_rows.split(",") if x.strip()]
        except ValueError:
            parser.error(f"--scale-rows: not a list of integers: {args.scale_rows!r}")
        if any(not 1 <= r <= 2_000_000 for r in settings.scale_rows):
            parser.error("--scale-rows: each size must be between 1 and 2,000,000")
    if args.ecmp_instances is not None:
        try:
            settings.ecmp_instances = [int(x) for x in args.ecmp_instances.split(",") if x.strip()]
        except ValueError:
            parser.error(f"--ecmp-instances: not a list of integers: {args.ecmp_instances!r}")
        if any(not 1 <= n <= 9 for n in settings.ecmp_instances):
            parser.error("--ecmp-instances: each count must be between 1 and 9")
    settings.profile = args.profile
    settings.ipv6 = not args.no_ipv6
    settings.dr = not args.no_dr
    settings.redraw = args.redraw
    out = args.out or DEFAULT_OUT
    readme = not args.no_readme and not args.quick and out.resolve() == DEFAULT_OUT.resolve()
    return settings, out, readme


def _subset(parser: argparse.ArgumentParser, option: str, value: str, known: Any) -> list[str]:
    chosen = [x.strip() for x in value.split(",") if x.strip()]
    unknown = [x for x in chosen if x not in known]
    if unknown or not chosen:
        parser.error(f"{option}: unknown {', '.join(unknown) or '(empty)'}; "
                     f"choose from {', '.join(known)}")
    return chosen


def main(argv: Sequence[str] | None = None) -> int:
    settings, out, readme = parse_args(argv)
    command = "python -m lbnat_bench " + " ".join(sys.argv[1:] if argv is None else argv)

    def interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    if settings.redraw:
        return redraw(out, readme)
    signal.signal(signal.SIGTERM, interrupted)
    try:
        results = run(settings, out, command.strip(), sys.stdout)
    except (BenchError, LabError) as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; the lab was taken down", file=sys.stderr)
        return 130
    print()
    print(report.markdown_table(results["summary"], results["paths"]))
    print()
    if results["ipv6_summary"]:
        print(report.markdown_ipv6(results["ipv6_summary"], results["summary"]))
        print()
    print(report.markdown_goals(results["goals"]))
    if results["ecmp_summary"]:
        print()
        print(ecmp.markdown_table(results["ecmp_summary"]))
    for profile in results["profiles"]:
        print()
        print(profile)
    if readme and update_readme(results):
        print(f"\nbench: README.md's benchmark section updated from {out}/results.json")
    print(f"\nbench: wrote {out}/results.json, README.md and charts in "
          f"{results['meta']['seconds_total']:.0f} s")
    return 1 if results["failed"] else 0

