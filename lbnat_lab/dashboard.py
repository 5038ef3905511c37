"""The Grafana dashboard (docs/observability/grafana-dashboard.json) drawn from real data where
Grafana cannot run: each panel's PromQL, evaluated by a real Prometheus over a lab run, as one
matplotlib chart per panel.

`make dashboard` (`python -m lbnat_lab.dashboard --out docs/screenshots/dashboard.png`, root,
about two minutes): the netns lab, nginx on three backends, lbnat --metrics, Debian's Prometheus
scraping it every second, then a bounded run of traffic (short downloads paced in a loop and
one rate-limited long one) during which b3's nginx stops and starts again; then every panel's
targets through /api/v1/query_range, drawn into one PNG.

The loading, the expansion of Grafana's variables and the drawing are pure functions of their
arguments (tests/unit/test_dashboard.py); `record` runs the lab.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lbnat_lab.netns import LB_IP, REPO, Lab, checkout_env, host_ip, terminate

DASHBOARD = REPO / "docs" / "observability" / "grafana-dashboard.json"
RATE_INTERVAL = "5s"  # $__rate_interval at a 1 s scrape interval (Grafana: 4 times the interval)
METRICS = f"{LB_IP}:9120"
PROMETHEUS = "127.0.0.1:9090"  # in c2
VIP_PORT = 20000

Series = list[tuple[str, list[tuple[float, float]]]]  # (legend, [(unix time, value)])


@dataclass(frozen=True)
class Target:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str
    targets: tuple[Target, ...]


def load_panels(path: Path = DASHBOARD) -> list[Panel]:
    """The dashboard's panels, in its order, with their queries."""
    dashboard = json.loads(path.read_text())
    return [
        Panel(
            p["title"],
            p.get("fieldConfig", {}).get("defaults", {}).get("unit", ""),
            tuple(Target(t["expr"], t.get("legendFormat", "")) for t in p["targets"]),
        )
        for p in dashboard["panels"]
    ]


def expand(expr: str, rate_interval: str = RATE_INTERVAL, service: str = ".*") -> str:
    """Grafana's variables as the dashboard uses them: $__rate_interval and $service (All)."""
    return expr.replace("$__rate_interval", rate_interval).replace("$service", service)


def legend(template: str, labels: dict[str, str]) -> str:
    """Grafana's legendFormat: {{label}} replaced by the series' label."""
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m[1], ""), template)
    return text.strip() or json.dumps(labels)


def scale(unit: str) -> tuple[float, str]:
    """Divisor and axis label for a Grafana unit."""
    return {"bps": (1e6, "Mbit/s"), "pps": (1.0, "packets/s"), "ops": (1.0, "per second"),
            "s": (1e-3, "ms")}.get(unit, (1.0, ""))  # fmt: skip


def render(panels: Sequence[Panel], series: Sequence[Series], out: Path, started: float) -> None:
    """One chart per panel, two per row, time in seconds from `started`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = math.ceil(len(panels) / 2)
    fig, axes = plt.subplots(rows, 2, figsize=(14, 3.2 * rows), squeeze=False)
    for index, (panel, lines) in enumerate(zip(panels, series, strict=True)):
        ax = axes[index // 2][index % 2]
        divisor, label = scale(panel.unit)
        for name, points in lines:
            ax.plot([t - started for t, _ in points], [v / divisor for _, v in points],
                    label=name, linewidth=1.3)  # fmt: skip
        ax.set_title(panel.title, fontsize=10, loc="left")
        ax.set_ylabel(label, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if lines:
            ax.legend(fontsize=7, loc="upper left", ncol=2)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    for index in range(len(panels), rows * 2):
        axes[index // 2][index % 2].axis("off")
    fig.supxlabel("seconds into the run", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


# --- the lab run -------------------------------------------------------------------------------


def prometheus_query(lab: Lab, path: str, params: dict[str, str]) -> Any:
    url = f"http://{PROMETHEUS}{path}?" + urllib.parse.urlencode(params)
    done = lab.run("c2", "curl", "-sS", "--max-time", "10", url, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"prometheus: {done.stderr.strip()}")
    reply = json.loads(done.stdout)
    if reply.get("status") != "success":
        raise RuntimeError(f"prometheus: {reply.get('error', reply)}")
    return reply["data"]


def query_range(lab: Lab, panel: Panel, start: float, end: float) -> Series:
    lines: Series = []
    for target in panel.targets:
        data = prometheus_query(lab, "/api/v1/query_range", {
            "query": expand(target.expr), "start": f"{start:.3f}", "end": f"{end:.3f}",
            "step": "1"})  # fmt: skip
        for result in data["result"]:
            points = [(float(t), float(v)) for t, v in result["values"] if v not in ("NaN",)]
            lines.append((legend(target.legend, result["metric"]), points))
    return lines


def record(out: Path, seconds: float) -> None:
    """Run the lab for `seconds` of traffic and draw the dashboard into `out`."""
    with Lab() as lab, tempfile.TemporaryDirectory(prefix="lbnat-dashboard.") as tmp:
        work = Path(tmp)
        procs: list[subprocess.Popen[bytes]] = []
        try:
            backends = ("b1", "b2", "b3")
            nginx = {b: start_nginx(lab, prepare_nginx(work, b), b) for b in backends}
            procs += nginx.values()
            words = [w for b in backends for w in (host_ip(b), "80")]
            procs.append(lab.popen("lb", sys.executable, "-m", "lbnat.cli", "run", LB_IP, *words,
                                   "--metrics", METRICS, "--quiet", "--health-interval", "1",
                                   "--admin-socket", str(work / "admin.sock"),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   env=checkout_env()))  # fmt: skip
            lab.wait_listening("lb", 9120)
            (work / "prometheus.yml").write_text(
                "global: {scrape_interval: 1s, scrape_timeout: 1s}\nscrape_configs:\n"
                f"  - {{job_name: lbnat, static_configs: [{{targets: ['{METRICS}']}}]}}\n"
            )
            procs.append(lab.popen(
                "c2", "prometheus", f"--config.file={work / 'prometheus.yml'}",
                f"--storage.tsdb.path={work / 'tsdb'}", f"--web.listen-address={PROMETHEUS}",
                "--log.level=warn", stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL))  # fmt: skip
            lab.wait_listening("c2", 9090)
            started = time.time()

            def restart_b3() -> None:
                procs.append(start_nginx(lab, work / "nginx-b3", "b3"))

            traffic(lab, seconds, procs, nginx["b3"], restart_b3)
            time.sleep(3)  # the last scrapes
            panels = load_panels()
            series = [query_range(lab, panel, started - 5, time.time()) for panel in panels]
        finally:
            terminate(list(reversed(procs)))
    render(panels, series, out, started)


def prepare_nginx(work: Path, backend: str) -> Path:
    """An nginx root for `backend` under `work`: a small file, a large sparse one; its dir."""
    d = work / f"nginx-{backend}"
    (d / "www").mkdir(parents=True)
    (d / "www" / "small").write_bytes(b"x" * 64 * 1024)
    with (d / "www" / "large").open("wb") as f:
        f.truncate(512 * 1024 * 1024)  # sparse: read back as zeros, fast
    (d / "nginx.conf").write_text(
        f"user root; pid {d}/nginx.pid; error_log {d}/error.log; events {{}}\n"
        f"http {{ access_log off; client_body_temp_path {d}; proxy_temp_path {d};\n"
        f"fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};\n"
        f"server {{ listen {host_ip(backend)}:80; root {d}/www; }} }}\n"
    )
    return d


def start_nginx(lab: Lab, d: Path, backend: str) -> subprocess.Popen[bytes]:
    proc = lab.popen(backend, "nginx", "-p", str(d), "-e", str(d / "error.log"),
                     "-c", str(d / "nginx.conf"), "-g", "daemon off;",
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    lab.wait_listening(backend, 80)
    return proc


def traffic(
    lab: Lab,
    seconds: float,
    procs: list[subprocess.Popen[bytes]],
    b3: subprocess.Popen[bytes],
    restart_b3: Callable[[], None],
) -> None:
    """Short downloads paced (~40/s) and one long one at 4 MB/s for `seconds`; b3's nginx
    is stopped at a third of the run and started again at two thirds."""
    url = f"http://{LB_IP}:{VIP_PORT}"
    count = int(seconds * 40)
    loop = (f"for i in $(seq {count}); do curl -s -o /dev/null --max-time 2 {url}/small; "
            "sleep 0.02; done")  # fmt: skip
    short = lab.popen("c1", "sh", "-c", loop, stdout=subprocess.DEVNULL)
    long = lab.popen("c1", "curl", "-s", "-o", "/dev/null", "--limit-rate", "4M",
                     "--max-time", str(int(seconds)), f"{url}/large",
                     stdout=subprocess.DEVNULL)  # fmt: skip
    procs += [short, long]
    begin = time.monotonic()
    time.sleep(seconds / 3)
    terminate([b3])
    time.sleep(seconds / 3)
    restart_b3()
    time.sleep(max(0.0, seconds - (time.monotonic() - begin)))
    for proc in (short, long):
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            terminate([proc])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots" /
                        "dashboard.png")  # fmt: skip
    parser.add_argument("--seconds", type=float, default=90.0)
    args = parser.parse_args(argv)

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(f"dashboard: stopped by signal {signum}")  # the lab comes down

    signal.signal(signal.SIGTERM, stop)
    record(args.out, args.seconds)
    print(f"dashboard: wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
