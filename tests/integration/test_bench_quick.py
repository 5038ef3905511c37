"""The benchmark suite's quick mode, run once: every workload through every path produced a
figure, and the report, the JSON and the charts were written. Nothing is asserted about speed
(the benchmark reports; it never judges)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lbnat_lab.netns import REPO, skip_reason
from tests.integration.conftest import require

pytestmark = pytest.mark.netns

PNG = b"\x89PNG\r\n\x1a\n"
PRIMARY = {  # workload -> the figure every path must have produced
    "bulk_1": "gbit_s",
    "bulk_8": "gbit_s",
    "conn_rate": "rps",
    "keepalive": "rps",
    "fixed_rate": "rps",
    "udp_low": "pps",
    "udp_high": "pps",
}
IPV6_ROWS = {
    "bulk_1": ("direct-v6", "lbnat-v6", "haproxy-v6", "lbnat-nat64"),
    "conn_rate": ("direct-v6", "lbnat-v6", "haproxy-v6"),
}
PATHS = ("direct", "lbnat", "lbnat-python", "lbnat-1w", "lbnat-socket", "haproxy", "nginx",
         "nftables")


def test_quick_benchmark_produces_every_result(tmp_path: Path) -> None:
    if (reason := skip_reason()) is not None:
        pytest.skip(reason)
    require("iperf3", "wrk", "haproxy", "nginx", "nft")
    if not Path("/usr/lib/nginx/modules/ngx_stream_module.so").exists():
        pytest.skip("needs nginx's stream module (libnginx-mod-stream)")
    out = tmp_path / "bench"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "lbnat_bench", "--quick", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    results = json.loads((out / "results.json").read_text())
    assert results["failed"] == []
    assert results["meta"]["settings"]["quick"] is True
    seen = {(r["workload"], r["path"]): r for r in results["records"]}
    for workload, key in PRIMARY.items():
        for path in PATHS:
            if path == "haproxy" and workload.startswith("udp"):
                assert (workload, path) not in seen  # HAProxy has no UDP
                continue
            record = seen[(workload, path)]
            assert record[key] > 0, (workload, path, record)
            if path not in ("direct", "nftables"):  # nftables: no process to measure
                assert record["lb_cpu_s"] >= 0, (workload, path, record)
    # the IPv6 rows: bulk and new connections/s direct, through lbnat and HAProxy over IPv6,
    # and NAT64 bulk through lbnat
    ipv6 = {(r["workload"], r["path"]): r for r in results["ipv6"]}
    assert set(ipv6) == {(w, p) for w, paths in IPV6_ROWS.items() for p in paths}
    for (workload, path), record in ipv6.items():
        assert record[PRIMARY[workload]] > 0, (workload, path, record)
        if path != "direct-v6":
            assert record["lb_cpu_s"] >= 0, (workload, path, record)
    assert results["meta"]["metrics_scrapes"] > 10  # Prometheus scraped lbnat-metrics, 1/s
    assert [r["rows"] for r in results["scale"]] == [10_000, 100_000]
    if results["ecmp"]:  # the scale-out workload ran (it needs bird and exabgp)
        assert {(r["path"], r["instances"]) for r in results["ecmp"]} == {
            (path, n) for path in ("lbnat", "direct") for n in (1, 2, 3)
        }
        rows = results["ecmp_summary"]
        assert [r["instances"] for r in rows] == [1, 2, 3]
        for row in rows:
            assert row["lbnat_gbit_s"] > 0 and row["direct_gbit_s"] > 0
            assert sorted(row["share"]) == [f"lb{i}" for i in range(1, row["instances"] + 1)]
        assert rows[0]["scaling"] == 1.0
        assert set(results["meta"]["ecmp_offload"]) == {"lb1", "lb2", "lb3"}
    for row in results["scale"]:
        assert row["us_per_packet"] > 0 and row["bytes_per_session"] > 0

    readme = (out / "README.md").read_text()
    assert (
        "| metric | direct | lbnat | lbnat, Python only | lbnat 1 worker "
        "| lbnat 1 worker, no rings | lbnat, metrics scraped 1/s | HAProxy | nginx stream "
        "| nftables |" in readme
    )
    assert (
        "| lbnat ÷ direct | lbnat ÷ nftables | lbnat ÷ HAProxy |" in readme
    )
    assert "| metric | direct, IPv6 | lbnat, IPv6 | HAProxy, IPv6 | lbnat, NAT64 |" in readme
    if results["ecmp"]:
        assert "## Scale-out: aggregate throughput over 1-N instances (ECMP)" in readme
    charts = sorted(p.name for p in out.glob("*.png"))
    expected = ["bulk.png", "cpu.png", "latency.png", "requests.png", "scale.png", "udp.png"]
    if results["ecmp"]:
        expected = sorted([*expected, "ecmp.png"])
    assert charts == expected
    for chart in charts:
        assert (out / chart).read_bytes().startswith(PNG)
        assert f"![{chart}]({chart})" in readme
