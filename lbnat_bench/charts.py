"""PNG charts of a benchmark run, drawn with matplotlib (headless Agg backend).

Every chart is drawn from the run's summary (medians) and shows the spread of the repetitions
as min-max error bars where there was more than one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on a server; must precede pyplot's import
import matplotlib.pyplot as plt

from lbnat_bench.report import Record, Summary, path_label

COLOURS = {"direct": "#7f7f7f", "haproxy": "#1f77b4", "nginx": "#2ca02c", "nftables": "#bcbd22"}
LBNAT_COLOURS = ("#d62728", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2")


def width(paths: Sequence[str], base: float, panels: int = 1) -> float:
    """Figure width in inches: `base` up to six paths, wider with more (per panel of bars), so
    the medians written above the bars stay apart."""
    return base + 0.6 * panels * max(0, len(paths) - 6)


def colour(path: str, paths: Sequence[str]) -> str:
    if path in COLOURS:
        return COLOURS[path]
    lbnats = [p for p in paths if p not in COLOURS]
    return LBNAT_COLOURS[lbnats.index(path) % len(LBNAT_COLOURS)]


def _spread(records: Sequence[Record], workload: str, path: str, key: str) -> tuple[float, float]:
    values = [
        float(r[key])
        for r in records
        if r["workload"] == workload and r["path"] == path and key in r
    ]
    return (min(values), max(values)) if values else (0.0, 0.0)


def _bars(
    ax: Any,
    summary: Summary,
    records: Sequence[Record],
    paths: Sequence[str],
    groups: Sequence[tuple[str, str, str]],
    ylabel: str,
) -> None:
    """Grouped bars: one group per (workload, metric, group label), one bar per path."""
    width = 0.8 / max(1, len(paths))
    for i, path in enumerate(paths):
        xs, heights, low, high = [], [], [], []
        for g, (workload, key, _label) in enumerate(groups):
            value = summary.get(workload, {}).get(path, {}).get(key)
            if value is None:
                continue
            lo, hi = _spread(records, workload, path, key)
            xs.append(g + (i - (len(paths) - 1) / 2) * width)
            heights.append(value)
            low.append(max(0.0, value - lo) if lo else 0.0)
            high.append(max(0.0, hi - value) if hi else 0.0)
        if not xs:
            continue
        ax.bar(
            xs,
            heights,
            width,
            label=path_label(path),
            color=colour(path, paths),
            yerr=[low, high],
            capsize=3,
        )
        for x, h, above in zip(xs, heights, high, strict=True):
            ax.annotate(  # the median, written above the bar's error bar
                _short(h), (x, h + above), ha="center", va="bottom", fontsize=7,
                xytext=(0, 2), textcoords="offset points",
            )
    ax.set_xticks(range(len(groups)), [label for _w, _k, label in groups])
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def _short(value: float) -> str:
    if value >= 10_000:
        return f"{value / 1000:.0f}k"
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.2f}"


def _save(fig: Any, out: Path) -> None:
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def draw_all(results: Mapping[str, Any], out_dir: Path) -> list[str]:
    """Write every chart the results have data for; return the file names written."""
    summary: Summary = results["summary"]
    records: list[Record] = results["records"]
    paths: list[str] = results["paths"]
    title = f"{results['meta']['kernel']}, {results['meta']['cpus']} CPUs, medians"
    written = []

    def chart(
        name: str, groups: list[tuple[str, str, str]], ylabel: str, heading: str
    ) -> None:
        if not any(summary.get(w, {}).get(p, {}).get(k) is not None
                   for w, k, _ in groups for p in paths):
            return
        fig, ax = plt.subplots(figsize=(width(paths, 8), 4.2))
        _bars(ax, summary, records, paths, groups, ylabel)
        ax.set_title(f"{heading} ({title})", fontsize=10)
        _save(fig, out_dir / name)
        written.append(name)

    chart(
        "bulk.png",
        [("bulk_1", "gbit_s", "1 stream"), ("bulk_8", "gbit_s", "8 streams")],
        "Gbit/s (higher is better)",
        "Bulk TCP throughput, iperf3",
    )
    chart(
        "requests.png",
        [("conn_rate", "rps", "new connections/s"), ("keepalive", "rps", "keep-alive req/s")],
        "per second (higher is better)",
        "HTTP through each path, wrk",
    )
    latency = [
        ([("fixed_rate", "p50_ms", "p50"), ("fixed_rate", "p99_ms", "p99")],
         f"at a fixed {results['meta']['settings'].get('fixed_rate_rps', '')} requests/s"),
        ([("keepalive", "p50_ms", "p50"), ("keepalive", "p99_ms", "p99")],
         "saturated (keep-alive, as fast as it goes)"),
    ]
    if any(summary.get(w, {}).get(p, {}).get(k) is not None
           for groups, _ in latency for w, k, _ in groups for p in paths):
        # two panels, each on its own scale: saturation latencies dwarf the fixed-rate ones
        fig, axes = plt.subplots(1, 2, figsize=(width(paths, 9, panels=2), 4.2))
        for ax, (groups, heading) in zip(axes, latency, strict=True):
            _bars(ax, summary, records, paths, groups, "ms (lower is better)")
            ax.set_title(heading, fontsize=9)
        fig.suptitle(f"HTTP latency, wrk --latency ({title})", fontsize=10)
        _save(fig, out_dir / "latency.png")
        written.append("latency.png")
    chart(
        "udp.png",
        [("udp_low", "pps", "low offered rate"), ("udp_high", "pps", "high offered rate")],
        "delivered packets/s (higher is better)",
        "UDP, iperf3 -u, 64-byte payloads",
    )
    chart(
        "cpu.png",
        [("bulk_1", "cpu_s_per_gb", "CPU s per GB"),
         ("conn_rate", "cpu_s_per_kconn", "CPU s per 1,000 conns")],
        "load balancer CPU seconds (lower is better)",
        "Load balancer CPU cost",
    )
    if _ecmp(results, out_dir / "ecmp.png", title):
        written.append("ecmp.png")
    scale = results.get("scale") or []
    if scale:
        rows = sorted(scale, key=lambda r: r["rows"])
        fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.6))
        xs = [r["rows"] for r in rows]
        left.plot(xs, [r["us_per_packet_fwd"] for r in rows], "o-", label="client→backend")
        left.plot(xs, [r["us_per_packet_rev"] for r in rows], "s-", label="backend→client")
        left.set_xscale("log")
        left.set_ylim(bottom=0)
        left.set_xlabel("session table rows")
        left.set_ylabel("µs per packet")
        left.legend(fontsize=8)
        left.grid(alpha=0.3)
        right.plot(xs, [r["bytes_per_session"] for r in rows], "o-", color="#d62728")
        right.set_xscale("log")
        right.set_ylim(bottom=0)
        right.set_xlabel("session table rows")
        right.set_ylabel("RSS bytes per session")
        right.grid(alpha=0.3)
        fig.suptitle("lbnat engine: cost per packet and memory per session", fontsize=10)
        _save(fig, out_dir / "scale.png")
        written.append("scale.png")
    return written


def _ecmp(results: Mapping[str, Any], out: Path, title: str) -> bool:
    """The scale-out workload's aggregate per instance count, lbnat beside direct (the same
    grouped bars as the others: a group per N); False when the run has none."""
    rows = results.get("ecmp_summary") or []
    summary: Summary = {}
    for row in rows:
        group = f"{row['instances']} instance{'s' if row['instances'] > 1 else ''}"
        summary[group] = {path: {"gbit_s": row[f"{path}_gbit_s"]}
                          for path in ("direct", "lbnat") if row.get(f"{path}_gbit_s")}
    if not any(summary.values()):
        return False
    records = [
        {**r, "workload": f"{r['instances']} instance{'s' if r['instances'] > 1 else ''}"}
        for r in results.get("ecmp", [])
        if r.get("workload") == "ecmp" and "error" not in r
    ]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    _bars(ax, summary, records, ["direct", "lbnat"], [(g, "gbit_s", g) for g in summary],
          "aggregate Gbit/s (higher is better)")
    ax.set_title(f"Scale-out: 2 iperf3 clients through the ECMP router ({title})", fontsize=10)
    _save(fig, out)
    return True
