"""The benchmark's direct-routing rows (issue 24, docs/dr.md): download throughput, backend to
client (``iperf3 -R``), direct, through lbnat in DR mode and through HAProxy (and lbnat in
NAT mode for reference), in the same lab and run as the other rows, and each load balancer's
CPU per GB.

    c1 ──► 198.18.0.10 :5201   lbnat-dr (SRCIP 198.18.0.9, VIP 198.18.0.10) ──► b1, which
                               holds the VIP on lo and answers c1 directly

In DR mode only the client's ACKs pass lbnat; the data goes from b1 to c1 straight over the
bridge, so the row should approach direct and lbnat's CPU per GB fall far below NAT's. A run
takes DR_SECONDS per path (at most the run's seconds), repetitions as the other rows'.
Records are results["dr"], medians results["dr_summary"], the report's "Direct routing".
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

from lbnat_bench import report
from lbnat_bench.report import Record
from lbnat_bench.run import (
    BACKEND,
    BACKEND_IP,
    CLIENT,
    IPERF_PORT,
    PATHS,
    WORKLOADS,
    Bed,
    BenchError,
    PathSpec,
    measure,
    one_line,
)
from lbnat_lab.netns import terminate

DR_IP = "198.18.0.9"  # lbnat-dr's SRCIP: the backends must reach it (ARP, probes)
DR_VIP = "198.18.0.10"  # its VIP: on the LB's eth0 (it answers ARP) and on b1's lo
DR = "lbnat-dr"
DR_SECONDS = 2.0
DR_PATHS: dict[str, PathSpec] = {
    "direct": PATHS["direct"],
    DR: PathSpec(DR, DR_VIP, IPERF_PORT, 0, udp=False),
    "haproxy": PATHS["haproxy"],
    "lbnat": PATHS["lbnat"],
}
"""the download row's paths, in the report's column order"""


def dr_conf(work: Path) -> dict[str, Any]:
    return {
        "lb_ip": DR_IP,
        "vip": DR_VIP,
        "admin_socket": str(work / f"{DR}.sock"),
        "log": {"quiet": True},
        "services": [
            {"name": "iperf", "protocol": "tcp", "port": IPERF_PORT, "mode": "dr",
             "health": {"enabled": False},
             "backends": [{"ip": BACKEND_IP, "port": IPERF_PORT}]},
        ],
    }  # fmt: skip


def dr_up(bed: Bed) -> None:
    """lbnat-dr's addresses on the LB's interface, b1 a DR backend of its VIP
    (scripts/dr-backend.sh), lbnat-dr started and ready; BenchError if it does not start."""
    bed.run("lb", ["ip", "addr", "add", f"{DR_IP}/24", "dev", "eth0"], timeout=10)
    bed.run("lb", ["ip", "addr", "add", f"{DR_VIP}/32", "dev", "eth0"], timeout=10)
    bed.lab.dr_backend(BACKEND, vip=DR_VIP)
    conf = bed.work / f"{DR}.json"
    conf.write_text(json.dumps(dr_conf(bed.work)))
    proc = bed.start("lb", DR, [sys.executable, "-m", "lbnat.cli", "run", "--config", str(conf)])
    try:
        bed.wait_lbnat(DR)
    except BenchError:
        terminate([proc])
        del bed.servers[DR]
        raise
    bed.lb_pid[DR] = proc.pid


def download(bed: Bed, path: PathSpec) -> Record:
    """``iperf3 -R``: the backend sends, the client receives, for DR_SECONDS at most."""
    seconds = min(bed.settings.seconds, DR_SECONDS)
    argv = ["iperf3", "-c", path.host, "-p", str(path.iperf_port), "-t", f"{seconds:g}",
            "-R", "-J"]  # fmt: skip
    try:
        text = bed.run(CLIENT, argv, timeout=seconds + 30)
    except subprocess.SubprocessError as exc:
        raise BenchError(str(exc)) from None
    return report.parse_iperf_tcp(text)


def dr_rows(bed: Bed, log: IO[str]) -> list[Record]:
    """Start lbnat-dr, then the download through each path in turn (the order rotating every
    repetition). If lbnat-dr does not start, its records are failed ones."""
    WORKLOADS.setdefault("download", download)  # (measure() runs a workload by its name)
    down = ""
    try:
        dr_up(bed)
        print(f"bench: DR rows: lbnat-dr VIP {DR_VIP}, b1 answers directly", file=log)
    except (BenchError, subprocess.SubprocessError) as exc:
        down = str(exc)[-1000:]
        print(f"bench: DR rows: lbnat-dr did not start: {down}", file=log)
    order = [p for p in DR_PATHS if p == "direct" or p == DR or p in bed.lb_pid]
    records: list[Record] = []
    for rep in range(bed.settings.reps):
        shift = rep % len(order)
        for name in order[shift:] + order[:shift]:
            if down and name == DR:
                record: Record = {"workload": "download", "path": name, "rep": rep,
                                  "error": f"{DR} did not start: {down}"}  # fmt: skip
            else:
                record = measure(bed, "download", DR_PATHS[name], rep, log)
            print(f"  rep {rep + 1} download   {name:<11} {one_line(record)}", file=log,
                  flush=True)  # fmt: skip
            records.append(record)
    return records
