"""Prometheus scrapes lbnat --metrics in the netns lab; the values it stored are checked
against the traffic the test sent and against `lbnat status --json`:

    c1 (curl: N downloads of M bytes) ──┐                  ┌── b1 (nginx :80)
                                        ├── sw ── lb ──────┤
    c2 (prometheus, scrape every 1 s) ──┘   lbnat          └── b2 (nginx :80)
         └── GET 198.18.0.2:9120/metrics     --metrics 198.18.0.2:9120

- flows opened and ended (by reason), bytes and packets per backend and direction, backend
  health, probe durations, control requests and the kernel path's rows, as Prometheus stored
  them, equal what was sent and what `lbnat status --json` says;
- every query of the Grafana dashboard (docs/observability/) runs on that Prometheus, and the
  per-backend panels have data; `promtool check metrics` passes on the exposition, `promtool
  check config` and `check rules` on the shipped scrape example and alert rules.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from lbnat_lab.dashboard import DASHBOARD, expand, load_panels
from lbnat_lab.netns import LB_IP
from tests.integration.conftest import (
    MB,
    VIP_PORT,
    WORKER_COUNTS,
    Bed,
    admin_json,
    random_file,
    require,
    start_nginx,
    variant_id,
)

pytestmark = pytest.mark.netns

METRICS = f"{LB_IP}:9120"
PROMETHEUS = "127.0.0.1:9090"  # in c2
SMALL = 256 * 1024  # bytes of each short download: over before the kernel path takes it
LARGE = 6 * MB  # and of each long one (curl reads it at 3 MB/s)
SHORT_FLOWS = 10
LONG_FLOWS = 2
WAIT = 30.0  # seconds for Prometheus to be up, or to have scraped what the test waits for

PROMETHEUS_YML = """\
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: lbnat
    static_configs:
      - targets: ["{target}"]
"""


def start_prometheus(bed: Bed) -> None:
    """Debian's prometheus in c2, its data and config under the test's tmp_path."""
    d = bed.tmp / "prometheus"
    d.mkdir()
    (d / "prometheus.yml").write_text(PROMETHEUS_YML.format(target=METRICS))
    bed.start(
        "c2", "prometheus", f"--config.file={d / 'prometheus.yml'}",
        f"--storage.tsdb.path={d / 'data'}", f"--web.listen-address={PROMETHEUS}",
        "--log.level=warn", name="prometheus",
    )  # fmt: skip
    bed.lab.wait_tcp_listening("c2", 9090, timeout=WAIT)


def query(bed: Bed, promql: str) -> list[dict[str, Any]]:
    """Prometheus' HTTP API, /api/v1/query, asked from c2: the result vector."""
    url = f"http://{PROMETHEUS}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    done = bed.lab.run("c2", "curl", "-sS", "--max-time", "5", url, check=False)
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert reply["status"] == "success", reply
    result: list[dict[str, Any]] = reply["data"]["result"]
    return result


def scalar(bed: Bed, promql: str) -> float | None:
    """The value of a one-sample query (a `sum(...)`), or None while there is none."""
    result = query(bed, promql)
    return float(result[0]["value"][1]) if result else None


def wait_value(bed: Bed, promql: str, wanted: float) -> float | None:
    """Poll until the query's value is `wanted` (Prometheus scrapes once a second); the last
    value seen."""
    deadline = time.monotonic() + WAIT
    seen = None
    while time.monotonic() < deadline:
        seen = scalar(bed, promql)
        if seen == wanted:
            return seen
        time.sleep(0.5)
    return seen


def download(bed: Bed, host: str, name: str, rate: str | None = None) -> subprocess.Popen[bytes]:
    argv = ["curl", "-sS", "-o", "/dev/null", "--max-time", "30",
            f"http://{LB_IP}:{VIP_PORT}/{name}"]  # fmt: skip
    if rate is not None:
        argv[1:1] = ["--limit-rate", rate]
    return bed.lab.popen(host, *argv)


def status_sum(status: dict[str, Any], direction: str, what: str) -> int:
    return sum(b[direction][what] for s in status["services"] for b in s["backends"])


@pytest.mark.parametrize(
    "bed", [(WORKER_COUNTS[1], "tc"), (1, "off")], indirect=True, ids=variant_id
)
def test_prometheus_scrapes_what_was_sent(bed: Bed) -> None:
    require("prometheus", "promtool", "curl", "nginx")
    for backend in ("b1", "b2"):
        www = start_nginx(bed, backend) / "www"
        random_file(www / "large", LARGE)
        (www / "small").write_bytes(b"x" * SMALL)
    lbnat = bed.lbnat("--metrics", METRICS, backends=("b1", "b2"), port=80)
    start_prometheus(bed)
    assert wait_value(bed, 'up{job="lbnat"}', 1.0) == 1.0, "Prometheus never scraped lbnat"

    downloads = [download(bed, "c1", "large", rate="3M") for _ in range(LONG_FLOWS)]
    for _ in range(SHORT_FLOWS):
        short = download(bed, "c1", "small")
        assert short.wait(timeout=30) == 0
    for long in downloads:
        assert long.wait(timeout=40) == 0
    flows = SHORT_FLOWS + LONG_FLOWS
    payload = SHORT_FLOWS * SMALL + LONG_FLOWS * LARGE

    # Every flow ended with FINs both ways (curl and nginx close politely): once Prometheus has
    # scraped that, the counters no longer move and must equal lbnat's own status.
    ended = 'sum(lbnat_flows_ended_total{reason="fin"})'
    assert wait_value(bed, ended, flows) == flows, lbnat.out.tail()
    assert scalar(bed, "sum(lbnat_flows_opened_total)") == flows
    assert scalar(bed, "sum(lbnat_open_flows)") == 0
    status = admin_json(bed, "status")
    for direction in ("to_backend", "to_client"):
        for what in ("bytes", "packets"):
            promql = f'sum(lbnat_backend_{what}_total{{direction="{direction}"}})'
            assert wait_value(bed, promql, status_sum(status, direction, what)) == status_sum(
                status, direction, what
            ), (direction, what)
    to_client = status_sum(status, "to_client", "bytes")
    # IP bytes: the payload plus headers (under 10 % for full-size segments and HTTP headers)
    assert payload < to_client < payload * 1.1 + flows * 4096, (to_client, payload)
    per_backend = query(bed, 'sum by (backend) (lbnat_flows_opened_total)')
    assert sorted(float(r["value"][1]) for r in per_backend) == [flows / 2, flows / 2]

    up = query(bed, "lbnat_backend_up")
    assert [r["value"][1] for r in up] == ["1", "1"], up
    assert (scalar(bed, "sum(lbnat_probe_duration_seconds_count)") or 0) > 0
    workers = status["workers"]
    assert scalar(bed, "count(lbnat_worker_up == 1)") == len(workers)
    # the status question above was a control request on the admin socket
    acked = 'sum(lbnat_control_requests_total{op="status",result="acked"})'
    assert (wait_value(bed, acked, 1.0) or 0) >= 1
    entered = scalar(bed, 'sum(lbnat_offload_row_changes_total{event="entered"})')
    # The kernel path's counts as lbnat's status has them. (How many rows entered varies: a
    # 6 MB download may sit in c1's socket buffer within 50 ms, before its row is due, and an
    # idle flow is never handed to the kernel.)
    kernel = status["offload"]
    assert entered == kernel["offloaded"]
    refused = scalar(bed, 'sum(lbnat_offload_row_changes_total{event="refused"})')
    assert refused == kernel["refused"]
    tc = os.environ["LBNAT_OFFLOAD"] == "tc"  # the bed's variant: lbnat refuses to start without
    assert scalar(bed, "max(lbnat_offload_enabled)") == int(tc)

    for panel in load_panels():
        results = [query(bed, expand(target.expr)) for target in panel.targets]
        if "per backend" in panel.title:
            assert all(results), (panel.title, results)

    exposition = bed.lab.run("c2", "curl", "-sS", f"http://{METRICS}/metrics", check=False)
    assert exposition.returncode == 0, exposition.stderr
    checked = subprocess.run(
        ["promtool", "check", "metrics"], input=exposition.stdout, capture_output=True,
        text=True, timeout=30, check=False,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    Path(bed.tmp / "exposition.txt").write_text(exposition.stdout)


def test_the_shipped_prometheus_files_pass_promtool() -> None:
    require("promtool")
    observability = DASHBOARD.parent
    for argv in (["check", "config", "prometheus.yml"], ["check", "rules", "lbnat-alerts.yml"]):
        done = subprocess.run(["promtool", *argv], cwd=observability, capture_output=True,
                              text=True, timeout=30, check=False)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
