"""lbnat_bench.dr and its report table: the DR lbnat's config is a valid DR config, the table
shows DR's medians and its ratios to direct, HAProxy and NAT, and a run without it shows none."""

from __future__ import annotations

from pathlib import Path

from lbnat.config import parse_config
from lbnat_bench import report
from lbnat_bench.dr import DR_VIP, dr_conf


def test_the_dr_lbnat_config_is_a_dr_service_on_its_own_vip(tmp_path: Path) -> None:
    config = parse_config(dr_conf(tmp_path))
    (spec,) = config.services
    assert spec.service.mode == "dr" and config.vip == DR_VIP and config.lb_ip != DR_VIP
    assert all(b.port == spec.service.port for b in spec.service.backends)


def test_the_dr_table() -> None:
    download = {
        "direct": {"gbit_s": 20.0},
        "lbnat-dr": {"gbit_s": 18.0, "cpu_s_per_gb": 0.01},
        "haproxy": {"gbit_s": 9.0, "cpu_s_per_gb": 0.2},
        "lbnat": {"gbit_s": 12.0, "cpu_s_per_gb": 0.1},
    }
    table = report.markdown_dr({"download": download})
    lines = table.splitlines()
    assert lines[0].startswith("| metric | direct | lbnat, DR | HAProxy | lbnat |")
    assert lines[2] == (
        "| download, backend to client (Gbit/s) ↑ | 20.00 | 18.00 | 9.00 | 12.00 "
        "| 0.90 \u00d7 | 2.00 \u00d7 | 1.50 \u00d7 |"
    )
    assert "| LB CPU per GB downloaded (s/GB) ↓ | \u2013 | 0.010 | 0.200 | 0.100 |" in lines[3]
    assert report._dr_section({"dr_summary": {}}, "## Direct routing") == []
    assert report._dr_section({"dr_summary": {"download": download}}, "x")[0] == "x"
