"""Benchmark results: parse the tools' output, take medians, compare paths, write markdown.

Pure: text and numbers in, numbers and text out; no process is started here. A *record* is one
repetition of one workload through one path: ``{"workload", "path", "rep", <metric>: float}``.
The summary is the median of every metric over the repetitions, per workload and path.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Record = dict[str, Any]
Summary = dict[str, dict[str, dict[str, float]]]
"""workload -> path -> metric -> median over the repetitions"""


class ParseError(ValueError):
    """A tool's output did not hold the figures it should (the run failed)."""


# --- the tools' output ------------------------------------------------------------------------

_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}
_NUMBER = r"(\d+(?:\.\d+)?)"
_LATENCY_RE = re.compile(rf"^\s*(50|75|90|99)(?:\.0+)?%\s+{_NUMBER}(us|ms|s|m)\s*$", re.M)
_RPS_RE = re.compile(rf"^Requests/sec:\s+{_NUMBER}", re.M)
_TOTAL_RE = re.compile(rf"^\s*(\d+) requests in {_NUMBER}(us|ms|s|m),", re.M)
_SOCKET_ERRORS_RE = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)"
)
_NON_2XX_RE = re.compile(r"Non-2xx or 3xx responses: (\d+)")


def parse_wrk(text: str) -> dict[str, float]:
    """Figures from wrk's text report (run with --latency for the percentiles).

    Returns rps, requests, seconds, errors (socket errors + non-2xx/3xx) and p50_ms, p75_ms,
    p90_ms, p99_ms when the latency distribution is there."""
    rps = _RPS_RE.search(text)
    total = _TOTAL_RE.search(text)
    if rps is None or total is None:
        raise ParseError(f"no 'Requests/sec' in wrk's output: {text.strip()[-300:]!r}")
    out = {
        "rps": float(rps.group(1)),
        "requests": float(total.group(1)),
        "seconds": float(total.group(2)) * _UNIT_MS[total.group(3)] / 1e3,
    }
    errors = 0
    if (m := _SOCKET_ERRORS_RE.search(text)) is not None:
        errors += sum(int(g) for g in m.groups())
    if (m := _NON_2XX_RE.search(text)) is not None:
        errors += int(m.group(1))
    out["errors"] = float(errors)
    for pct, value, unit in _LATENCY_RE.findall(text):
        out[f"p{pct}_ms"] = float(value) * _UNIT_MS[unit]
    return out


def parse_iperf_tcp(text: str) -> dict[str, float]:
    """Receiver-side throughput from ``iperf3 -J`` of a TCP test: gbit_s, bytes, seconds."""
    end = _iperf_end(text)
    try:
        received = end["sum_received"]
        return {
            "gbit_s": float(received["bits_per_second"]) / 1e9,
            "bytes": float(received["bytes"]),
            "seconds": float(received["seconds"]),
        }
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise ParseError(f"iperf3 TCP report without sum_received: {exc}") from None


def parse_iperf_udp(text: str) -> dict[str, float]:
    """Figures from ``iperf3 -u -J``: delivered pps (packets that reached the server per
    second), sent packets, loss_pct and bytes received."""
    end = _iperf_end(text)
    try:
        total = end["sum"]
        packets = float(total["packets"])
        lost = float(total["lost_packets"])
        seconds = float(total["seconds"])
        received_bytes = float(end.get("sum_received", total).get("bytes", total["bytes"]))
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise ParseError(f"iperf3 UDP report without sum: {exc}") from None
    if seconds <= 0:
        raise ParseError("iperf3 UDP report with a zero duration")
    return {
        "pps": (packets - lost) / seconds,
        "packets": packets,
        "loss_pct": 100.0 * lost / packets if packets else 100.0,
        "bytes": received_bytes,
        "seconds": seconds,
    }


def _iperf_end(text: str) -> Mapping[str, Any]:
    try:
        report = json.loads(text)
    except (ValueError, RecursionError):
        raise ParseError(f"iperf3 printed no JSON: {text.strip()[-300:]!r}") from None
    if not isinstance(report, dict):
        raise ParseError("iperf3's JSON is not an object")
    if report.get("error"):
        raise ParseError(f"iperf3: {report['error']}")
    end = report.get("end")
    if not isinstance(end, dict) or not end:
        raise ParseError("iperf3's JSON has no 'end' section")
    return end


def stat_fields(stat_line: str) -> list[str]:
    """Fields 3 and on of one /proc/<pid>/stat line (index 0 is field 3, the state).

    The command name (field 2) may hold spaces and parentheses; fields are counted from the
    last ')'."""
    return stat_line[stat_line.rindex(")") + 2 :].split()


def cpu_seconds(stat_line: str) -> float:
    """utime + stime (fields 14 and 15) of one /proc/<pid>/stat line, in clock ticks (divide
    by SC_CLK_TCK)."""
    rest = stat_fields(stat_line)
    return float(int(rest[11]) + int(rest[12]))


# --- what is measured, and how it is shown ----------------------------------------------------


@dataclass(frozen=True)
class Metric:
    workload: str
    key: str
    label: str
    unit: str
    higher_is_better: bool
    digits: int = 1
    ratios: bool = True  # False: a ratio would mislead (a percentage near zero)


METRICS: tuple[Metric, ...] = (
    Metric("bulk_1", "gbit_s", "bulk TCP, 1 stream", "Gbit/s", True, 2),
    Metric("bulk_8", "gbit_s", "bulk TCP, 8 streams", "Gbit/s", True, 2),
    Metric("bulk_1", "cpu_s_per_gb", "LB CPU per GB (1 stream)", "CPU s", False, 2),
    Metric("conn_rate", "rps", "new connections/s (Connection: close)", "conn/s", True, 0),
    Metric("conn_rate", "cpu_s_per_kconn", "LB CPU per 1,000 connections", "CPU s", False, 3),
    Metric("keepalive", "rps", "keep-alive requests/s", "req/s", True, 0),
    Metric("keepalive", "p50_ms", "keep-alive latency p50", "ms", False, 2),
    Metric("keepalive", "p99_ms", "keep-alive latency p99", "ms", False, 2),
    Metric("fixed_rate", "rps", "fixed-rate requests/s", "req/s", True, 0),
    Metric("fixed_rate", "p50_ms", "fixed-rate latency p50", "ms", False, 2),
    Metric("fixed_rate", "p99_ms", "fixed-rate latency p99", "ms", False, 2),
    Metric("fixed_rate", "added_p99_ms", "fixed-rate added p99 (vs direct)", "ms", False, 2),
    Metric("udp_low", "pps", "UDP delivered, low offered rate", "pps", True, 0),
    Metric("udp_low", "loss_pct", "UDP loss, low offered rate", "%", False, 2, ratios=False),
    Metric("udp_high", "pps", "UDP delivered, high offered rate", "pps", True, 0),
    Metric("udp_high", "loss_pct", "UDP loss, high offered rate", "%", False, 2, ratios=False),
)

PATH_LABELS = {
    "direct": "direct",
    "lbnat": "lbnat",  # the defaults: one worker per core, rings, the kernel fast path
    "lbnat-python": "lbnat, Python only",  # the same without the fast path (--offload off)
    "lbnat-1w": "lbnat 1 worker",
    "lbnat-socket": "lbnat 1 worker, no rings",
    "lbnat-metrics": "lbnat, metrics scraped 1/s",  # the defaults + --metrics, Prometheus
    "haproxy": "HAProxy",
    "nginx": "nginx stream",
    "nftables": "nftables",  # the kernel's own NAT: DNAT + SNAT, conntrack, no process
    # the IPv6 rows (issue 21): client and backend over IPv6, and NAT64
    "direct-v6": "direct, IPv6",
    "lbnat-v6": "lbnat, IPv6",  # an lbnat of its own with ip6, its defaults otherwise
    "haproxy-v6": "HAProxy, IPv6",
    "lbnat-nat64": "lbnat, NAT64",  # the same lbnat: an IPv6 client, the IPv4 backend
    "lbnat-dr": "lbnat, DR",  # direct routing (issue 24): the backend answers the client
}

IPV6_PATHS = ("direct-v6", "lbnat-v6", "haproxy-v6", "lbnat-nat64")
"""the IPv6 rows' paths, in the IPv6 table's column order"""
IPV6_METRICS: tuple[Metric, ...] = tuple(
    m for m in METRICS if (m.workload, m.key) in {
        ("bulk_1", "gbit_s"), ("bulk_1", "cpu_s_per_gb"),
        ("conn_rate", "rps"), ("conn_rate", "cpu_s_per_kconn"),
    }
)  # fmt: skip
IPV6_RATIOS = (
    ("lbnat-v6", "direct-v6"),
    ("lbnat-v6", "haproxy-v6"),
    ("lbnat-nat64", "direct-v6"),
    ("lbnat-v6", "lbnat"),  # IPv6 against IPv4 through the same kind of lbnat
)
"""the IPv6 table's ratio columns: (path, peer); "lbnat" is the IPv4 table's"""

DR_PATHS = ("direct", "lbnat-dr", "haproxy", "lbnat")
"""the direct-routing rows' paths (lbnat_bench.dr), in the DR table's column order"""
DR_METRICS: tuple[tuple[str, str, str, int, bool], ...] = (
    ("gbit_s", "download, backend to client", "Gbit/s", 2, True),
    ("cpu_s_per_gb", "LB CPU per GB downloaded", "s/GB", 3, False),
)
"""(key, label, unit, digits, higher is better) of the DR table's rows (workload "download")"""
DR_RATIOS = (("lbnat-dr", "direct"), ("lbnat-dr", "haproxy"), ("lbnat-dr", "lbnat"))

PEERS = ("direct", "nftables", "haproxy")
"""what each lbnat path is divided by, in this order; nftables only in runs that have it"""

HEADLINE = ("lbnat", "lbnat-python")
"""the lbnat paths whose ratios the README's table shows (the full report shows them all)"""


def path_label(path: str) -> str:
    return PATH_LABELS.get(path, path)


def is_lbnat(path: str) -> bool:
    return path == "lbnat" or path.startswith("lbnat-")


# --- medians and ratios -----------------------------------------------------------------------


def derive(records: Iterable[Record]) -> list[Record]:
    """Add the figures computed from others within one record: CPU seconds per GB and per
    1,000 connections, from the load balancer's CPU seconds of that run."""
    out = []
    for record in records:
        r = dict(record)
        cpu = r.get("lb_cpu_s")
        if cpu is not None and r.get("bytes"):
            r["cpu_s_per_gb"] = cpu / (r["bytes"] / 1e9)
        if cpu is not None and r.get("workload") == "conn_rate" and r.get("requests"):
            r["cpu_s_per_kconn"] = cpu / (r["requests"] / 1000)
        out.append(r)
    return out


def summarize(records: Iterable[Record]) -> Summary:
    """Median of every numeric metric per (workload, path); then the latency each path adds
    to direct's (``added_p50_ms``, ``added_p99_ms``), from the medians."""
    grouped: dict[str, dict[str, dict[str, list[float]]]] = {}
    for record in derive(records):
        metrics = grouped.setdefault(record["workload"], {}).setdefault(record["path"], {})
        for key, value in record.items():
            if key in ("workload", "path", "rep") or not isinstance(value, int | float):
                continue
            if isinstance(value, bool) or not math.isfinite(value):
                continue
            metrics.setdefault(key, []).append(float(value))
    summary: Summary = {
        workload: {
            path: {key: statistics.median(values) for key, values in metrics.items()}
            for path, metrics in paths.items()
        }
        for workload, paths in grouped.items()
    }
    for by_path in summary.values():
        direct = by_path.get("direct", {})
        for medians in by_path.values():
            for pct in ("p50", "p99"):
                key = f"{pct}_ms"
                if key in medians and key in direct:
                    medians[f"added_{pct}_ms"] = medians[key] - direct[key]
    return summary


def ratio(summary: Summary, workload: str, key: str, path: str, peer: str) -> float | None:
    """path's median over peer's median, or None when either is missing or the peer's is 0."""
    try:
        mine = summary[workload][path][key]
        theirs = summary[workload][peer][key]
    except KeyError:
        return None
    if theirs == 0:
        return None
    return mine / theirs


# --- goals (shown, never asserted) ------------------------------------------------------------


@dataclass(frozen=True)
class Goal:
    text: str
    workload: str
    key: str
    peer: str | None  # None: the path's own figure against the bound
    bound: float
    at_least: bool  # True: ratio >= bound is met; False: ratio <= bound
    difference: bool = False  # compare path - peer against bound instead of path / peer
    path: str | None = None  # whose figure: None, the path goal_rows is given (lbnat)


# Issue 17's goals (the kernel fast path): lbnat with its defaults against its peers.
GOALS: tuple[Goal, ...] = (
    Goal("bulk 1 stream ≥ 2 × HAProxy", "bulk_1", "gbit_s", "haproxy", 2.0, True),
    Goal("bulk 8 streams ≥ 2 × HAProxy", "bulk_8", "gbit_s", "haproxy", 2.0, True),
    Goal("bulk 1 stream ≥ 0.85 × direct", "bulk_1", "gbit_s", "direct", 0.85, True),
    Goal("bulk 8 streams ≥ 0.85 × direct", "bulk_8", "gbit_s", "direct", 0.85, True),
    Goal("new connections/s ≥ 1.3 × HAProxy", "conn_rate", "rps", "haproxy", 1.3, True),
    Goal(
        "LB CPU per 1,000 connections ≤ HAProxy's",
        "conn_rate",
        "cpu_s_per_kconn",
        "haproxy",
        1.0,
        False,
    ),
    Goal("keep-alive requests/s ≥ 1.5 × HAProxy", "keepalive", "rps", "haproxy", 1.5, True),
    Goal(
        "added p99 at fixed rate ≤ HAProxy's (ms)",
        "fixed_rate",
        "added_p99_ms",
        "haproxy",
        0.0,
        False,
        difference=True,
    ),
    Goal(
        "added p99 at saturation ≤ HAProxy's (ms)",
        "keepalive",
        "added_p99_ms",
        "haproxy",
        0.0,
        False,
        difference=True,
    ),
    Goal("UDP at the high offered rate: loss ≤ 2 % (%)", "udp_high", "loss_pct", None, 2.0, False),
    Goal("bulk 1 stream ≥ 0.9 × nftables", "bulk_1", "gbit_s", "nftables", 0.9, True),
    Goal("bulk 8 streams ≥ 0.9 × nftables", "bulk_8", "gbit_s", "nftables", 0.9, True),
    Goal("new connections/s ≥ 0.9 × nftables", "conn_rate", "rps", "nftables", 0.9, True),
    # Issue 18's: metrics cost the packet path nothing (read from the workers at scrape time)
    *(
        Goal(
            f"metrics on: {text} ≥ 0.95 × lbnat", workload, key, "lbnat", 0.95, True,
            path="lbnat-metrics",
        )
        for text, workload, key in (
            ("bulk 8 streams", "bulk_8", "gbit_s"),
            ("new connections/s", "conn_rate", "rps"),
            ("keep-alive requests/s", "keepalive", "rps"),
            ("UDP delivered at the high rate", "udp_high", "pps"),
        )
    ),
)

FLAT = 1.25
"""'Flat' for the scale goals: the 1M-row figure is within this factor of the 10k-row one."""


def goal_rows(summary: Summary, scale: Sequence[Record], path: str = "lbnat") -> list[Record]:
    """Where each goal stands for `path`: text, value, met (None when not measured)."""
    rows: list[Record] = []
    for goal in GOALS:
        try:
            mine = summary[goal.workload][goal.path or path][goal.key]
            theirs = 0.0 if goal.peer is None else summary[goal.workload][goal.peer][goal.key]
        except KeyError:
            rows.append({"goal": goal.text, "value": None, "met": None})
            continue
        if goal.peer is None:
            value = mine
        elif goal.difference:
            value = mine - theirs
        elif theirs:
            value = mine / theirs
        else:
            rows.append({"goal": goal.text, "value": None, "met": None})
            continue
        met = value >= goal.bound if goal.at_least else value <= goal.bound
        rows.append({"goal": goal.text, "value": value, "met": met})
    by_rows = {int(r["rows"]): r for r in scale}
    if by_rows:
        small, big = by_rows[min(by_rows)], by_rows[max(by_rows)]
        span = f"{_rows_label(min(by_rows))} → {_rows_label(max(by_rows))} rows"
        for key, text in (
            ("us_per_packet", f"per-packet cost flat, {span} (≤ {FLAT} ×)"),
            ("bytes_per_session", f"memory per session flat, {span} (≤ {FLAT} ×)"),
        ):
            if small.get(key) and big.get(key) is not None and min(by_rows) != max(by_rows):
                value = big[key] / small[key]
                rows.append({"goal": text, "value": value, "met": value <= FLAT})
            else:
                rows.append({"goal": text, "value": None, "met": None})
    return rows


# --- markdown ---------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def _rows_label(rows: int) -> str:
    if rows >= 1_000_000 and rows % 1_000_000 == 0:
        return f"{rows // 1_000_000}M"
    if rows >= 1000 and rows % 1000 == 0:
        return f"{rows // 1000}k"
    return str(rows)


def ratio_peers(paths: Sequence[str]) -> list[str]:
    """The peers of the ratio columns: direct and HAProxy always (as in every earlier run),
    nftables between them when the run has it."""
    return [p for p in PEERS if p != "nftables" or p in paths]


def headline_paths(paths: Sequence[str]) -> list[str]:
    """The lbnat paths of HEADLINE that the run has, or every lbnat path if it has none."""
    lbnats = [p for p in paths if is_lbnat(p)]
    return [p for p in lbnats if p in HEADLINE] or lbnats


def markdown_table(
    summary: Summary, paths: Sequence[str], ratio_paths: Sequence[str] | None = None
) -> str:
    """Medians per metric and path, then each lbnat path's ratio to direct, to nftables (when
    the run has it) and to HAProxy (for latencies and CPU, lower is better; the arrow in the
    first column says which). `ratio_paths`: the lbnat paths with ratio columns (default:
    every one)."""
    lbnats = [p for p in paths if is_lbnat(p)] if ratio_paths is None else list(ratio_paths)
    peers = ratio_peers(paths)
    head = ["metric", *(path_label(p) for p in paths)]
    for p in lbnats:
        head += [f"{path_label(p)} ÷ {path_label(peer)}" for peer in peers]
    lines = [
        "| " + " | ".join(head) + " |",
        "|---" + "|---:" * (len(head) - 1) + "|",
    ]
    for metric in METRICS:
        paths_seen = summary.get(metric.workload, {})
        if not any(metric.key in paths_seen.get(p, {}) for p in paths):
            continue
        arrow = "↑" if metric.higher_is_better else "↓"
        cells = [f"{metric.label} ({metric.unit}) {arrow}"]
        for p in paths:
            cells.append(_fmt(paths_seen.get(p, {}).get(metric.key), metric.digits))
        for p in lbnats:
            for peer in peers:
                if metric.key.startswith("added_") or not metric.ratios:
                    cells.append("")
                    continue
                r = ratio(summary, metric.workload, metric.key, p, peer)
                cells.append("–" if r is None else f"{r:.2f} ×")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_ipv6(ipv6_summary: Summary, summary: Summary | None = None) -> str:
    """The IPv6 rows: medians of bulk (1 stream) and new connections/s (and the LB's CPU for
    them) direct over IPv6, through lbnat over IPv6, through HAProxy over IPv6 and through lbnat
    from an IPv6 client to the IPv4 backend (NAT64), then lbnat's ratios to direct and HAProxy
    over IPv6, NAT64's to direct over IPv6, and lbnat over IPv6 to lbnat over IPv4 (`summary`,
    the IPv4 table's medians, when given)."""
    both: Summary = {}
    for part in (summary or {}, ipv6_summary):
        for workload, by_path in part.items():
            both.setdefault(workload, {}).update(by_path)
    head = ["metric", *(path_label(p) for p in IPV6_PATHS)]
    head += [f"{path_label(p)} ÷ {path_label(peer)}" + (", IPv4" if peer == "lbnat" else "")
             for p, peer in IPV6_RATIOS]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for metric in IPV6_METRICS:
        by_path = ipv6_summary.get(metric.workload, {})
        if not any(metric.key in by_path.get(p, {}) for p in IPV6_PATHS):
            continue
        arrow = "↑" if metric.higher_is_better else "↓"
        cells = [f"{metric.label} ({metric.unit}) {arrow}"]
        cells += [_fmt(by_path.get(p, {}).get(metric.key), metric.digits) for p in IPV6_PATHS]
        for p, peer in IPV6_RATIOS:
            r = ratio(both, metric.workload, metric.key, p, peer)
            cells.append("–" if r is None else f"{r:.2f} ×")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ipv6_section(results: Mapping[str, Any], heading: str) -> list[str]:
    """The IPv6 table with its heading and a line on what it is (nothing for a run without)."""
    if not results.get("ipv6_summary"):
        return []
    return [
        heading,
        "",
        "Client and backend over IPv6 (the lab's fd18::/64), through an lbnat of its own with "
        "`ip6` (its defaults otherwise) and through HAProxy, in the same lab and run as the "
        "rows above, each path in turn; \"lbnat, NAT64\" is the same lbnat from an IPv6 client "
        "to the backend's IPv4 address.",
        "",
        markdown_ipv6(results["ipv6_summary"], results.get("summary")),
    ]


def markdown_dr(dr_summary: Summary) -> str:
    """The direct-routing rows: download medians (and the LB's CPU per GB) direct, through
    lbnat in DR mode, HAProxy and lbnat in NAT mode, then lbnat DR's ratios to each."""
    by_path = dr_summary.get("download", {})
    head = ["metric", *(path_label(p) for p in DR_PATHS)]
    head += [f"{path_label(p)} ÷ {path_label(peer)}" for p, peer in DR_RATIOS]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for key, label, unit, digits, higher in DR_METRICS:
        if not any(key in by_path.get(p, {}) for p in DR_PATHS):
            continue
        cells = [f"{label} ({unit}) {'↑' if higher else '↓'}"]
        cells += [_fmt(by_path.get(p, {}).get(key), digits) for p in DR_PATHS]
        for p, peer in DR_RATIOS:
            r = ratio(dr_summary, "download", key, p, peer)
            cells.append("–" if r is None else f"{r:.2f} ×")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _dr_section(results: Mapping[str, Any], heading: str) -> list[str]:
    """The direct-routing table with its heading and what it is (nothing for a run without)."""
    if not results.get("dr_summary"):
        return []
    return [
        heading,
        "",
        "Download (`iperf3 -R`, the backend sends) in the same lab and run: direct, through "
        "lbnat in DR mode (`mode: dr`, docs/dr.md: the backend holds the VIP on lo and answers "
        "the client itself, so only the client's ACKs pass lbnat), through HAProxy and through "
        "lbnat in NAT mode; CPU is each load balancer's per GB downloaded.",
        "",
        markdown_dr(results["dr_summary"]),
    ]


def markdown_scale(scale: Sequence[Record]) -> str:
    lines = [
        "| table rows | µs per packet (client→backend) | µs per packet (backend→client) "
        "| RSS (MB) | bytes per session |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(scale, key=lambda r: int(r["rows"])):
        lines.append(
            f"| {_rows_label(int(r['rows']))} | {r['us_per_packet_fwd']:.2f} "
            f"| {r['us_per_packet_rev']:.2f} | {r['rss_bytes'] / 1e6:,.0f} "
            f"| {r['bytes_per_session']:,.0f} |"
        )
    return "\n".join(lines)


def markdown_goals(rows: Sequence[Record]) -> str:
    lines = ["| goal | measured | met? |", "|---|---:|:---:|"]
    for row in rows:
        value = row["value"]
        shown = "–" if value is None else f"{value:.2f}"
        met = {True: "yes", False: "**no**", None: "not measured"}[row["met"]]
        lines.append(f"| {row['goal']} | {shown} | {met} |")
    return "\n".join(lines)


def _fallbacks(meta: Mapping[str, Any]) -> list[str]:
    """A warning paragraph for each lbnat path that asked for the kernel fast path and ran
    without it (it said why at start): its figures are the Python data plane's."""
    return [
        f"**{path_label(path)} ran without its kernel fast path**: {state}.\n"
        for path, state in meta.get("offload", {}).items()
        if state.startswith("no offload")
    ]


def _scrapes(meta: Mapping[str, Any]) -> str:
    scrapes = meta.get("metrics_scrapes")
    return "scrapes not counted" if scrapes is None else f"{scrapes:,} good scrapes"


def markdown_report(results: Mapping[str, Any], charts: Sequence[str] = ()) -> str:
    """The whole docs/benchmarks/README.md: machine, table, goals, scale, charts."""
    meta = results["meta"]
    paths = results["paths"]
    summary = results["summary"]
    versions = ", ".join(f"{k} {v}" for k, v in sorted(meta.get("versions", {}).items()))
    parts = [
        "# lbnat benchmarks",
        "",
        f"Run {meta['started']} with `{meta['command']}`: {meta['reps']} repetition(s) of "
        f"{meta['seconds']} s per workload and path, paths alternating, medians shown. "
        f"Kernel {meta['kernel']}, {meta['cpus']} CPUs ({meta['cpu_model']}), Python "
        f"{meta['python']}; {versions}. Everything (client, load balancer, backend) runs on "
        "this one machine in network namespaces joined by veth pairs and a bridge, so the "
        "load generator, the load balancer and the backend share the CPUs.",
        "",
        markdown_table(summary, paths),
        "",
        "HAProxy has no UDP (the UDP rows show it as –). \"Added p99\" is the path's p99 minus "
        "direct's. nftables is the kernel's own NAT load balancer on the same host (DNAT to a "
        "backend picked by a jhash of the client's address and port, SNAT to its address, "
        "conntrack): no process, so no CPU figure; it is what a NAT load balancer can do on "
        "this machine. \"lbnat\" runs with its defaults (the kernel fast path where it can); "
        "\"lbnat, Python only\" and the 1-worker variants run with `--offload off`; "
        "\"lbnat, metrics scraped 1/s\" is \"lbnat\" with `--metrics`, scraped every second by "
        f"a real Prometheus for the whole run ({_scrapes(meta)}). "
        "CPU is the load balancer's processes' user + system time during the run "
        "(/proc/PID/stat), per GB received or per 1,000 connections. With veth, part of the "
        "receiving namespace's network stack runs inside the sender's send call, and how much "
        "of it the kernel charges to the sending process depends on its IRQ-time accounting: "
        "compare these figures between the paths of one run, not across machines.",
        "",
        *_fallbacks(meta),
        "## Goals (reported, never asserted)",
        "",
        markdown_goals(results.get("goals", [])),
    ]
    if ipv6 := _ipv6_section(results, "## IPv6"):
        parts += ["", *ipv6]
    if dr := _dr_section(results, "## Direct routing"):
        parts += ["", *dr]
    if results.get("scale"):
        parts += [
            "",
            "## lbnat's own scale",
            "",
            "The engine with a session table filled synthetically (established flows, "
            "distinct clients), in a fresh process per size; per-packet cost of an "
            "established flow, median, and the process's resident set size.",
            "",
            markdown_scale(results["scale"]),
        ]
    if scale_out := _ecmp_section(results):
        parts += ["", *scale_out]
    if results.get("profiles"):
        parts += [
            "",
            "## Where lbnat's time goes",
            "",
            "py-spy sampled lbnat's threads during one extra run of each workload (`--profile`). "
            "Time in a system call counts for the Python function that made it: with veth, "
            "the kernel delivers a sent frame to the receiving namespace within the sender's "
            "`send()`, so `PacketLoop._send` includes the peer's network stack.",
        ]
        for profile in results["profiles"]:
            parts += ["", profile]
    if charts:
        parts += ["", "## Charts", ""]
        parts += [f"![{name}]({name})" for name in charts]
    parts += ["", "Settings of this run:", "", "```", json.dumps(meta["settings"], indent=2),
              "```", ""]
    return "\n".join(parts)


def _ecmp_section(results: Mapping[str, Any]) -> list[str]:
    from lbnat_bench import ecmp  # it imports this module

    return ecmp.markdown_section(results)


def _ecmp_readme(results: Mapping[str, Any]) -> list[str]:
    """The scale-out table under the README's goals (nothing for a run without it)."""
    from lbnat_bench import ecmp

    rows = results.get("ecmp_summary") or []
    if not rows:
        return []
    return ["", "Scale-out (`lbnat_bench.ecmp`: 1-N instances behind the router's ECMP route, "
            "all on this machine's cores; the estimate for separate machines is in "
            "[docs/benchmarks/](docs/benchmarks/README.md) and "
            "[docs/scale-out.md](docs/scale-out.md#scaling)):", "", ecmp.markdown_table(rows)]


# --- profiles and the README block ------------------------------------------------------------

_FRAME_LINE_RE = re.compile(r":\d+\)$")


def profile_summary(collapsed: str, workload: str, top: int = 12) -> str:
    """Markdown table of the functions holding the most samples in py-spy's collapsed stacks
    (``--format raw``: ``frame;frame;...;leaf count`` per line, root first). "self" counts a
    function when it is the leaf; "total" when it is anywhere on the stack (once per stack)."""
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_FRAME_LINE_RE.sub(")", f.strip()) for f in stack.split(";") if f.strip()]
        if not frames:
            continue
        samples += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            total[frame] = total.get(frame, 0) + count
    lines = [
        f"### Profile of lbnat under `{workload}` (py-spy, {samples} samples)",
        "",
        "| function | self % | total % |",
        "|---|---:|---:|",
    ]
    if samples == 0:
        return "\n".join([*lines, "| (no samples) | | |"])
    for frame, count in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(
            f"| `{frame}` | {100 * count / samples:.1f} | {100 * total[frame] / samples:.1f} |"
        )
    return "\n".join(lines)


def readme_block(results: Mapping[str, Any]) -> str:
    """What the top-level README shows of a full run: the table, the goals, two charts."""
    meta = results["meta"]
    paths = results["paths"]
    headline = headline_paths(paths)
    rest = [path_label(p) for p in paths if is_lbnat(p) and p not in headline]
    others = f"; the ratios of {', '.join(rest)} too" if rest else ""
    return "\n".join([
        f"Measured {meta['started']} on {meta['cpus']} CPUs, kernel {meta['kernel']} "
        f"(`make bench`; medians of {meta['reps']} × {meta['seconds']:g} s; the full report, "
        f"JSON and charts are in [docs/benchmarks/](docs/benchmarks/README.md){others}).",
        "",
        *_fallbacks(meta),
        markdown_table(results["summary"], paths, headline),
        "",
        *_ipv6_section(results, "IPv6:"),
        *([""] if results.get("ipv6_summary") else []),
        *_dr_section(results, "Direct routing:"),
        *([""] if results.get("dr_summary") else []),
        markdown_goals(results.get("goals", [])),
        *_ecmp_readme(results),
        "",
        "![bulk throughput](docs/benchmarks/bulk.png)",
        "![requests](docs/benchmarks/requests.png)",
    ])
