"""The scale-out workload of the benchmark (issue 20, docs/scale-out.md): aggregate TCP
throughput through the VIP with 1, 2 and 3 lbnat instances behind the router's ECMP route,
and the same clients to the same backends through the router without lbnat ("direct").

Topology (scripts/ecmp-lab.sh, `lbnat_lab.ecmp.EcmpLab`)::

    c1 ─┐                         ┌─ lb1 198.18.1.11 ─┐      ┌─ b1 198.18.1.21 iperf3 :5201
        ├── rt (BIRD, ECMP) ──────┼─ lb2 198.18.1.12 ─┼──────┤
    c2 ─┘   VIP 198.18.100.1      └─ lb3 198.18.1.13 ─┘      └─ b2 198.18.1.22 iperf3 :5201

Each instance runs ``lbnat run 198.18.1.1N --vip 198.18.100.1 --workers 1`` (maglev, the
kernel fast path as the main benchmark's "lbnat" row, the sync in mesh mode among the N;
one instance alone has no peer, so no sync) and ExaBGP with lbnat-bgp announcing the VIP;
the workload starts once the router's route has N next hops.

Why one service per backend: an iperf3 test is a control connection plus its data
connections, which must all reach the one iperf3 server that holds the test; maglev over
two backends would send them to both. So the VIP has port 5201 -> b1 and 5202 -> b2 (each a
service with one backend), c1 tests against the first and c2 against the second, each with
`ecmp_streams` parallel connections: their source ports differ, so the router's 5-tuple hash
spreads them over the instances.

What bounds the figure on one machine: every host is a namespace on the same cores, so the
clients, the router, the instances and the backends all share them; iperf3 3.12 is one
thread per test, so each backend's server is one process (one core at most). The direct row
has the same clients, servers and router hop, so lbnat ÷ direct is the instances' cost, and
aggregate(N) ÷ aggregate(1) is bounded by the cores, not by lbnat: the report says so, with
the machine's busy CPU seconds per run (all of it, from /proc/stat) to show where it went.
Each full-speed run has a paced twin (PACED_GBIT in all), where the cores are not all busy:
the busy cores through lbnat minus direct's, per Gbit/s, is what the lbnat hop costs, the
figure the report's estimate for one instance per machine starts from.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from lbnat_bench import report
from lbnat_bench.report import Record
from lbnat_lab.ecmp import VIP, EcmpLab, host_ip
from lbnat_lab.netns import REPO, LabError, checkout_env, terminate

WORKLOAD = "ecmp"
PACED = "ecmp_paced"
"""the same flows held to a fixed total rate well below what the machine can carry: the
cores the lbnat hop adds per Gbit/s are the difference in busy cores between lbnat and direct
at the same rate (at saturation both use every core, and the difference is in the noise)"""
PACED_GBIT = 4.0
BACKENDS = ("b1", "b2")
IPERF_PORT = 5201
VIP_PORTS = {"b1": 5201, "b2": 5202}  # one service per backend (see the module's doc)
CLIENTS = {"c1": "b1", "c2": "b2"}  # each client tests against its own backend
ROUTE_TIMEOUT = 30.0
READY_TIMEOUT = 20.0


# --- pure parts ---------------------------------------------------------------------------------


def parse_link_bytes(link_json: str) -> tuple[int, int]:
    """(rx bytes, tx bytes) of the one interface in ``ip -j -s link show DEV``'s output."""
    try:
        stats = json.loads(link_json)[0]["stats64"]
        return int(stats["rx"]["bytes"]), int(stats["tx"]["bytes"])
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise report.ParseError(f"no byte counters in ip -s link's JSON: {exc!r}") from None


def busy_ticks(proc_stat: str) -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs from /proc/stat's first line: busy is all but
    idle and iowait (user, nice, system, irq, softirq, steal; guest time is already in user)."""
    for line in proc_stat.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            ticks = [int(x) for x in fields[1:9]]
            total = sum(ticks)
            return total - ticks[3] - ticks[4], total
    raise report.ParseError("/proc/stat has no 'cpu' line")


def shares(deltas: Mapping[str, int]) -> dict[str, float]:
    """Each instance's fraction of the bytes all of them received (0 each when none did)."""
    total = sum(deltas.values())
    return {name: (d / total if total else 0.0) for name, d in sorted(deltas.items())}


def summarize(records: Sequence[Record]) -> list[Record]:
    """One row per instance count: the medians of lbnat's and of direct's aggregate Gbit/s
    (direct measured between lbnat's runs at that count), lbnat ÷ direct, the scaling factor
    (lbnat's aggregate over its aggregate with one instance), each instance's median share
    and median lbnat CPU seconds, the machine's busy cores during lbnat's and direct's runs,
    and the same at the paced rate with the cores lbnat adds per Gbit/s there."""
    by_n: dict[int, dict[str, list[Record]]] = {}
    paced: dict[int, dict[str, list[Record]]] = {}
    for r in records:
        if "error" in r or r.get("workload") not in (WORKLOAD, PACED):
            continue
        into = by_n if r["workload"] == WORKLOAD else paced
        into.setdefault(int(r["instances"]), {}).setdefault(str(r["path"]), []).append(r)

    def median(rows: Sequence[Record], key: str) -> float | None:
        values = [float(r[key]) for r in rows if isinstance(r.get(key), int | float)]
        return statistics.median(values) if values else None

    def least(rows: Sequence[Record], key: str) -> float | None:
        values = [float(r[key]) for r in rows if isinstance(r.get(key), int | float)]
        return min(values) if values else None

    rows: list[Record] = []
    for n in sorted(by_n.keys() | paced.keys()):
        lb, direct = by_n.get(n, {}).get("lbnat", []), by_n.get(n, {}).get("direct", [])
        row: Record = {
            "instances": n,
            "lbnat_gbit_s": median(lb, "gbit_s"),
            "direct_gbit_s": median(direct, "gbit_s"),
            "lbnat_cores_busy": median(lb, "cores_busy"),
            "direct_cores_busy": median(direct, "cores_busy"),
            "share": {},
            "lb_cpu_s": {},
        }
        names = sorted({k for r in lb for k in r.get("share", {})})
        for name in names:
            row["share"][name] = statistics.median(r["share"].get(name, 0.0) for r in lb)
            cpu = [r["lb_cpu_s"][name] for r in lb if name in r.get("lb_cpu_s", {})]
            if cpu:
                row["lb_cpu_s"][name] = statistics.median(cpu)
        row["lbnat_per_direct"] = _div(row["lbnat_gbit_s"], row["direct_gbit_s"])
        p_lb, p_direct = paced.get(n, {}).get("lbnat", []), paced.get(n, {}).get("direct", [])
        row["paced_lbnat_gbit_s"] = median(p_lb, "gbit_s")
        row["paced_direct_gbit_s"] = median(p_direct, "gbit_s")
        # the least of the repetitions, not the median: the machine's busy time includes
        # whatever else runs on it, which only ever adds (a shared machine: another user's
        # tests made single runs 0.4 to 1 core busier); the rate itself is fixed
        row["paced_lbnat_cores_busy"] = least(p_lb, "cores_busy")
        row["paced_direct_cores_busy"] = least(p_direct, "cores_busy")
        row["added_cores_per_gbit"] = _added(row)
        rows.append(row)
    base = next((r["lbnat_gbit_s"] for r in rows if r["instances"] == 1), None)
    for row in rows:
        row["scaling"] = _div(row["lbnat_gbit_s"], base)
    return rows


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _added(row: Mapping[str, Any]) -> float | None:
    """Busy cores per Gbit/s through lbnat minus direct's, at the paced rate (each divided by
    its own measured rate: the paced rates are close but not equal)."""
    lb = _div(row.get("paced_lbnat_cores_busy"), row.get("paced_lbnat_gbit_s"))
    direct = _div(row.get("paced_direct_cores_busy"), row.get("paced_direct_gbit_s"))
    return None if lb is None or direct is None else lb - direct


def cost_per_gbit(row: Mapping[str, Any], seconds: float) -> Mapping[str, float | None]:
    """From one summary row, at the paced rate: the machine's busy cores per Gbit/s with lbnat
    and direct, their difference (what the lbnat hop adds per Gbit/s: the instances' kernel
    fast path, their extra veth and bridge crossing, the Python process); and, at full
    speed, the lbnat processes' own CPU per Gbit/s (seconds of CPU per second: cores)."""
    per_lb = _div(row.get("paced_lbnat_cores_busy"), row.get("paced_lbnat_gbit_s"))
    per_direct = _div(row.get("paced_direct_cores_busy"), row.get("paced_direct_gbit_s"))
    added = None if per_lb is None or per_direct is None else per_lb - per_direct
    process = sum(row.get("lb_cpu_s", {}).values()) / seconds if seconds else None
    lb = row.get("lbnat_gbit_s")
    return {
        "cores_per_gbit_lbnat": per_lb,
        "cores_per_gbit_direct": per_direct,
        "cores_per_gbit_added": added,
        "process_cores_per_gbit": _div(process, lb),
    }


def markdown_table(rows: Sequence[Record]) -> str:
    """The scale-out table of the report and the README."""
    lines = [
        "| instances | lbnat (Gbit/s) ↑ | direct (Gbit/s) ↑ | lbnat ÷ direct "
        "| scaling (÷ 1 instance) | per-instance share | lbnat CPU s per instance "
        "| machine cores busy (lbnat / direct) | paced: Gbit/s, cores busy (lbnat / direct) "
        "| paced: cores lbnat adds per Gbit/s ↓ |",
        "|---:|---:|---:|---:|---:|---|---|---:|---:|---:|",
    ]
    for r in rows:
        share = ", ".join(f"{k} {100 * v:.0f} %" for k, v in sorted(r["share"].items()))
        cpu = ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["lb_cpu_s"].items()))
        ratio = r.get("lbnat_per_direct")
        scaling = r.get("scaling")
        lines.append(
            f"| {r['instances']} | {_fmt(r['lbnat_gbit_s'])} | {_fmt(r['direct_gbit_s'])} "
            f"| {'–' if ratio is None else f'{ratio:.2f} ×'} "
            f"| {'–' if scaling is None else f'{scaling:.2f} ×'} | {share or '–'} "
            f"| {cpu or '–'} | {_fmt(r.get('lbnat_cores_busy'))} / "
            f"{_fmt(r.get('direct_cores_busy'))} "
            f"| {_fmt(r.get('paced_lbnat_gbit_s'))}: {_fmt(r.get('paced_lbnat_cores_busy'))} / "
            f"{_fmt(r.get('paced_direct_gbit_s'))}: {_fmt(r.get('paced_direct_cores_busy'))} "
            f"| {_fmt(r.get('added_cores_per_gbit'), 3)} |"
        )
    return "\n".join(lines)


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


# --- the run ------------------------------------------------------------------------------------


def missing_tools() -> list[str]:
    """The tools this workload needs that this machine lacks (it is skipped then)."""
    path = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"
    tools = ("bird", "birdc", "exabgp", "iperf3")
    return [t for t in tools if not shutil.which(t, path=path)]


class Fleet:
    """N lbnat instances with their speakers in an EcmpLab, started and stopped by pid."""

    def __init__(self, lab: EcmpLab, work: Path) -> None:
        self.lab = lab
        self.work = work
        self.lbnat: dict[str, subprocess.Popen[bytes]] = {}
        self.secret = work / "sync.secret"
        self.secret.write_text(os.urandom(32).hex())
        self.secret.chmod(0o600)
        # ExaBGP runs lbnat-bgp by an absolute path: this checkout's, whatever is installed
        self.lbnat_bgp = work / "lbnat-bgp"
        self.lbnat_bgp.write_text(
            f'#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -m lbnat.bgptool "$@"\n'
        )
        self.lbnat_bgp.chmod(0o755)
        self.config = work / "ecmp-services.json"
        services = [
            {"name": f"iperf-{b}", "protocol": "tcp", "port": VIP_PORTS[b], "scheduler": "maglev",
             # no probes: iperf3's server takes a probe's connect for a test client
             "health": {"enabled": False},
             "backends": [{"ip": host_ip(b), "port": IPERF_PORT}]}
            for b in BACKENDS
        ]  # fmt: skip
        self.config.write_text(json.dumps({"log": {"quiet": True}, "services": services}))

    def socket(self, node: str) -> str:
        return str(self.work / f"{node}.sock")

    def up(self, n: int) -> None:
        nodes = [f"lb{i}" for i in range(1, n + 1)]
        for node in nodes:
            argv = [
                sys.executable, "-m", "lbnat.cli", "run", host_ip(node), "--vip", VIP,
                "--config", str(self.config), "--interface", "eth0", "--workers", "1",
                "--admin-socket", self.socket(node),
            ]  # fmt: skip
            peers = [p for p in nodes if p != node]
            if peers:  # the sync needs a peer: one instance alone runs without it
                argv += ["--sync-mode", "mesh", "--sync-listen", host_ip(node),
                         "--sync-secret-file", str(self.secret)]  # fmt: skip
                for peer in peers:
                    argv += ["--sync-peer", host_ip(peer)]
            log = (self.work / f"{node}-lbnat.log").open("wb")
            try:
                self.lbnat[node] = self.lab.popen(
                    node, *argv, stdout=log, stderr=subprocess.STDOUT, env=checkout_env()
                )
            finally:
                log.close()
        for node in nodes:
            self.wait_ready(node)
        for node in nodes:
            self.lab.start_exabgp(node, str(self.lbnat_bgp), self.socket(node))
        try:
            self.lab.wait_routes({host_ip(node) for node in nodes}, timeout=ROUTE_TIMEOUT)
        except TimeoutError as exc:
            raise LabError(f"{exc}; bird.log: {self.tail('bird.log')}") from None

    def wait_ready(self, node: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.lbnat[node].poll() is not None:
                raise LabError(f"{node}'s lbnat exited: {self.tail(f'{node}-lbnat.log')}")
            done = self.lab.run(node, sys.executable, "-m", "lbnat.cli", "status", "--json",
                                "--admin-socket", self.socket(node), check=False, timeout=10)
            if done.returncode == 0:
                return
            time.sleep(0.2)
        raise LabError(f"{node}'s lbnat not ready in {READY_TIMEOUT} s")

    def offload(self, node: str) -> str:
        """"tc offload", or the fallback lbnat printed at start (as lbnat_bench.run says)."""
        log = (self.work / f"{node}-lbnat.log").read_text(errors="replace")
        start = log.find("no offload (")
        return "tc offload" if start < 0 else log[start : log.find(")", start) + 1]

    def cpu(self) -> dict[str, float]:
        from lbnat_bench.run import cpu_seconds, process_tree

        return {node: cpu_seconds(process_tree(p.pid)) for node, p in self.lbnat.items()}

    def down(self) -> None:
        """Speakers first (the route goes), then lbnat; by pid."""
        for node in list(self.lab.exabgp):
            self.lab.stop_exabgp(node)
        terminate(list(self.lbnat.values()))
        self.lbnat.clear()
        with contextlib.suppress(TimeoutError):
            self.lab.wait_routes(set(), timeout=10)

    def tail(self, name: str) -> str:
        path = self.work / name
        return path.read_text(errors="replace")[-500:] if path.exists() else "(no log)"


def rx_bytes(lab: EcmpLab, nodes: Sequence[str]) -> dict[str, int]:
    return {
        node: parse_link_bytes(lab.run(node, "ip", "-j", "-s", "link", "show", "eth0").stdout)[0]
        for node in nodes
    }


def machine_ticks() -> tuple[int, int]:
    with open("/proc/stat") as f:
        return busy_ticks(f.read())


def aggregate(lab: EcmpLab, targets: Mapping[str, tuple[str, int]], seconds: float,
              streams: int, gbit: float | None = None) -> Record:
    """iperf3 from every client at once, each to its (address, port) with `streams` parallel
    connections (all of them together held to `gbit` Gbit/s if given): the aggregate Gbit/s
    (the receivers' sums), bytes, and the machine's busy cores over the run."""
    pace: list[str] = []
    if gbit is not None:  # iperf3's -b is per stream
        pace = ["-b", f"{gbit * 1e9 / (len(targets) * streams):.0f}"]
    procs = {
        client: lab.popen(client, "iperf3", "-c", ip, "-p", str(port), "-t", f"{seconds:g}",
                          "-P", str(streams), "-J", *pace)
        for client, (ip, port) in targets.items()
    }  # fmt: skip
    busy0, total0 = machine_ticks()
    t0 = time.monotonic()
    outputs: dict[str, str] = {}
    try:
        for client, proc in procs.items():
            out, err = proc.communicate(timeout=seconds + 30)
            outputs[client] = out.decode(errors="replace") or err.decode(errors="replace")
    except subprocess.TimeoutExpired:
        raise LabError(f"iperf3 did not finish in {seconds + 30:.0f} s") from None
    finally:
        terminate(list(procs.values()))
    wall = time.monotonic() - t0
    busy1, total1 = machine_ticks()
    figures = [report.parse_iperf_tcp(text) for text in outputs.values()]
    cores = os.cpu_count() or 1
    # busy share of all CPUs' ticks over the run, as a number of cores
    busy = (busy1 - busy0) / (total1 - total0) * cores if total1 > total0 else 0.0
    return {
        "gbit_s": sum(f["gbit_s"] for f in figures),
        "bytes": sum(f["bytes"] for f in figures),
        "seconds": max(f["seconds"] for f in figures),
        "cores_busy": busy,
        "wall_s": wall,
    }


def start_servers(lab: EcmpLab, work: Path) -> list[subprocess.Popen[bytes]]:
    servers = []
    for b in BACKENDS:
        log = (work / f"{b}-iperf3.log").open("wb")
        try:
            servers.append(lab.popen(b, "iperf3", "-s", "-p", str(IPERF_PORT),
                                     stdout=log, stderr=subprocess.STDOUT))
        finally:
            log.close()
    for b in BACKENDS:
        lab.wait_listening(b, IPERF_PORT, timeout=10)
    return servers


def measure(lab: EcmpLab, fleet: Fleet | None, n: int, rep: int, seconds: float,
            streams: int, log: IO[str], gbit: float | None = None) -> Record:
    """One run at `n` instances: through the VIP (`fleet` up) or direct (`fleet` None); at
    full speed, or paced to `gbit` (the PACED workload)."""
    path = "direct" if fleet is None else "lbnat"
    if fleet is None:
        targets = {c: (host_ip(b), IPERF_PORT) for c, b in CLIENTS.items()}
    else:
        targets = {c: (VIP, VIP_PORTS[b]) for c, b in CLIENTS.items()}
    workload = WORKLOAD if gbit is None else PACED
    record: Record = {"workload": workload, "path": path, "instances": n, "rep": rep}
    nodes = sorted(fleet.lbnat) if fleet is not None else []
    for attempt in (1, 2):
        try:
            rx0 = rx_bytes(lab, nodes)
            cpu0 = fleet.cpu() if fleet is not None else {}
            figures = aggregate(lab, targets, seconds, streams, gbit)
            cpu1 = fleet.cpu() if fleet is not None else {}
            rx1 = rx_bytes(lab, nodes)
        except (LabError, report.ParseError, subprocess.SubprocessError) as exc:
            print(f"  {workload} {path} N={n}: attempt {attempt} failed: {exc}", file=log)
            if attempt == 2:
                return {**record, "error": str(exc)}
            time.sleep(1)  # an iperf3 server stays 'busy' for a moment after a failed test
            continue
        record.update(figures)
        if fleet is not None:
            record["share"] = shares({node: rx1[node] - rx0[node] for node in nodes})
            record["lb_cpu_s"] = {node: cpu1[node] - cpu0[node] for node in nodes}
        return record
    raise AssertionError("unreachable")


def one_line(record: Record) -> str:
    if "error" in record:
        return f"FAILED: {record['error']}"
    text = f"{record['gbit_s']:.2f} Gbit/s, {record['cores_busy']:.2f} cores busy"
    if "share" in record:
        text += "; share " + " ".join(f"{k} {100 * v:.0f}%" for k, v in record["share"].items())
        text += "; lbnat CPU s " + " ".join(f"{k} {v:.2f}" for k, v in record["lb_cpu_s"].items())
    return text


def run(instances: Sequence[int], reps: int, seconds: float, streams: int, work: Path,
        log: IO[str], paced_gbit: float = PACED_GBIT) -> tuple[list[Record], dict[str, str]]:
    """The workload at each instance count in turn (a fleet of N brought up, `reps` runs of
    direct and of lbnat alternating, the fleet taken down): its records, and each instance's
    data path ("tc offload" or lbnat's fallback) as seen at the largest N."""
    records: list[Record] = []
    offload: dict[str, str] = {}
    with EcmpLab(workdir=work, instances=max(instances), backends=len(BACKENDS)) as lab:
        try:
            start_servers(lab, work)
            lab.start_bird(instances=max(instances))
            fleet = Fleet(lab, work)
            for n in instances:
                fleet.up(n)
                offload = {node: fleet.offload(node) for node in sorted(fleet.lbnat)}
                print(f"  ecmp: {n} instance(s) announcing; the router's next hops "
                      f"{' '.join(sorted(lab.routes()))}", file=log, flush=True)
                try:
                    for rep in range(reps):
                        # alternate which goes first, so slow drift favours neither
                        order = (fleet, None) if rep % 2 == 0 else (None, fleet)
                        for gbit in (None, paced_gbit):
                            for which in order:
                                record = measure(lab, which, n, rep, seconds, streams, log, gbit)
                                print(f"  rep {rep + 1} {record['workload']:<10} N={n} "
                                      f"{record['path']:<7}{one_line(record)}", file=log,
                                      flush=True)
                                records.append(record)
                finally:
                    fleet.down()
        finally:
            for node in list(lab.exabgp):
                lab.stop_exabgp(node)
            lab.stop_bird()
    return records, offload


# --- the report's section -----------------------------------------------------------------------


def estimate_lines(rows: Sequence[Record], seconds: float, cores: int) -> list[str]:
    """The arithmetic of the on-paper estimate, from the one-instance row: what the lbnat hop
    adds in busy cores per Gbit/s here, and what one instance per machine would give. An
    estimate, and labelled so; nothing when the run has no usable one-instance row."""
    one = next((r for r in rows if r["instances"] == 1), None)
    if one is None:
        return []
    cost = cost_per_gbit(one, seconds)
    added, process = cost["cores_per_gbit_added"], cost["process_cores_per_gbit"]
    per_lb, per_direct = cost["cores_per_gbit_lbnat"], cost["cores_per_gbit_direct"]
    if per_lb is None or per_direct is None:
        return []
    lines = [
        f"Estimate (arithmetic, not a measurement of bigger machines): at the paced rate, with "
        f"one instance, the machine spent {per_lb:.3f} busy cores per Gbit/s through lbnat and "
        f"{per_direct:.3f} direct, so the lbnat hop (its tc fast path, its extra veth and "
        f"bridge crossing, its process) costs {per_lb:.3f} − {per_direct:.3f} = "
        f"{per_lb - per_direct:.3f} cores per Gbit/s"
        + (f", of which the lbnat process itself {process:.4f}." if process is not None else "."),
    ]
    if added is not None and added > 0:
        lines[0] += (
            f" One instance on a machine of its own with {cores} such cores (veth carries 64 KB "
            f"GSO packets: a real NIC's 1,500-byte frames cost more per Gbit/s, GRO "
            f"or not) would forward about "
            f"{cores} ÷ {added:.3f} = {cores / added:,.0f} Gbit/s before its CPU is the limit, "
            f"and N instances on N machines N times that (the router hashes flows evenly; the "
            f"bulk flows here are few, so the mesh sync's per-flow cost is not in it), until "
            f"the router's forwarding or the backends saturate first."
        )
    else:
        lines[0] += (
            " The difference is within this run's noise, so no per-instance capacity follows "
            "from it; docs/scale-out.md does the arithmetic from a run where it is not."
        )
    return lines


def markdown_section(results: Mapping[str, Any]) -> list[str]:
    """The report's scale-out section (nothing when the run has no scale-out rows)."""
    rows = results.get("ecmp_summary") or []
    if not rows:
        return []
    meta = results["meta"]
    seconds = float(meta.get("ecmp_seconds", meta.get("seconds", 1.0)))
    fallbacks = {k: v for k, v in meta.get("ecmp_offload", {}).items() if v != "tc offload"}
    parts = [
        "## Scale-out: aggregate throughput over 1-N instances (ECMP)",
        "",
        f"`lbnat_bench.ecmp`: N lbnat instances (`--workers 1`, maglev, the kernel fast path, "
        f"the mesh sync among them) announce the VIP over BGP to BIRD on a router that "
        f"spreads flows over them with ECMP (scripts/ecmp-lab.sh); c1 and c2 each run "
        f"`iperf3 -P {results['meta']['settings'].get('ecmp_streams', 16)}` for {seconds:g} s "
        f"at once through the VIP, each to its own backend; \"direct\" is the same clients to "
        f"the same backends through the router, measured between lbnat's runs at each N. "
        f"Share: each instance's part of the bytes the instances received (their eth0 "
        f"counters); CPU: each lbnat process's user + system seconds in a run (the fast path "
        f"runs in the kernel's softirq and is not in it); cores busy: the whole machine's, "
        f"from /proc/stat. Paced: the same runs held to "
        f"{meta.get('ecmp_paced_gbit', PACED_GBIT):g} Gbit/s in all (iperf3 `-b`), where the "
        f"machine has cores to spare, so the busy cores through lbnat minus direct's, per "
        f"Gbit/s, is what the lbnat hop costs (the least busy repetition of each: anything "
        f"else running on the machine only adds; a negative figure means every direct run "
        f"at that N was disturbed more than the least disturbed lbnat run: noise, not a "
        f"gain).",
        "",
        markdown_table(rows),
        "",
        f"On this machine ({meta.get('cpus')} CPUs) the clients, the router, every instance "
        f"and the backends share the same cores, and every core is busy in every full-speed "
        f"run (the \"machine cores busy\" column): the aggregate is bounded by the "
        f"machine's CPU, not by the instances, so "
        f"the scaling factor here measures what more instances cost on the same cores (more "
        f"processes, more sync), not what separate machines would give; and it is noisy, as "
        f"the direct column at each N shows (nothing about direct changes with N).",
        "",
        *estimate_lines(rows, seconds, int(meta.get("cpus") or 1)),
    ]
    if fallbacks:
        parts += ["", "**Instances without their kernel fast path**: "
                  + "; ".join(f"{k}: {v}" for k, v in sorted(fallbacks.items()))]
    return parts


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lbnat_bench.ecmp [--quick] [--json FILE]``: this workload alone (root),
    with `python -m lbnat_bench`'s settings; its table and estimate on stdout."""
    import argparse
    import tempfile

    from lbnat_bench.run import Settings, ecmp_seconds

    parser = argparse.ArgumentParser(prog="python -m lbnat_bench.ecmp")
    parser.add_argument("--quick", action="store_true", help="1 repetition of 2 s")
    parser.add_argument("--json", type=Path, help="write the records and the summary here")
    args = parser.parse_args(argv)
    settings = Settings.quick_mode() if args.quick else Settings()
    if missing := missing_tools():
        print(f"missing: {', '.join(missing)}", file=sys.stderr)
        return 1
    seconds = ecmp_seconds(settings)
    with tempfile.TemporaryDirectory(prefix="lbnat-bench-ecmp.") as tmp:
        records, offload = run(settings.ecmp_instances, settings.reps, seconds,
                               settings.ecmp_streams, Path(tmp), sys.stdout,
                               settings.ecmp_paced_gbit)
    rows = summarize(records)
    results = {
        "meta": {"cpus": os.cpu_count(), "ecmp_seconds": seconds, "ecmp_offload": offload,
                 "ecmp_paced_gbit": settings.ecmp_paced_gbit,
                 "settings": {"ecmp_streams": settings.ecmp_streams}},
        "ecmp": records,
        "ecmp_summary": rows,
    }
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print("\n".join(["", *markdown_section(results)]))
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
