"""Tests for the pure parts of lbnat_bench.ecmp (the scale-out workload): the counters it
reads, the scaling arithmetic, the estimate and the tables of the report and the README.
The inputs are recorded output of ``ip -j -s link`` and /proc/stat, kept as literal strings."""

# ruff: noqa: RUF001

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lbnat_bench import ecmp, report
from lbnat_bench.report import Record

IP_LINK = json.dumps([{
    "ifindex": 2, "ifname": "eth0", "flags": ["BROADCAST", "MULTICAST", "UP", "LOWER_UP"],
    "mtu": 1500, "operstate": "UP",
    "stats64": {"rx": {"bytes": 7461234567, "packets": 123456, "errors": 0, "dropped": 0},
                "tx": {"bytes": 98765, "packets": 1234, "errors": 0, "dropped": 0}},
}])  # fmt: skip
PROC_STAT = """\
cpu  10132153 290696 3084719 46828483 16683 0 25195 0 0 0
cpu0 1393280 32966 572056 13343292 6080 0 17875 0 0 0
intr 1462898 0 0
"""


def test_parse_link_bytes() -> None:
    assert ecmp.parse_link_bytes(IP_LINK) == (7461234567, 98765)


@pytest.mark.parametrize("text", ["", "[]", "{}", '[{"ifname": "eth0"}]', "not json"])
def test_parse_link_bytes_refuses_what_has_no_counters(text: str) -> None:
    with pytest.raises(report.ParseError):
        ecmp.parse_link_bytes(text)


def test_busy_ticks_leave_out_idle_and_iowait() -> None:
    busy, total = ecmp.busy_ticks(PROC_STAT)
    assert total == 10132153 + 290696 + 3084719 + 46828483 + 16683 + 0 + 25195 + 0
    assert busy == total - 46828483 - 16683


def test_busy_ticks_needs_the_cpu_line() -> None:
    with pytest.raises(report.ParseError):
        ecmp.busy_ticks("cpu0 1 2 3 4 5 6 7 8\n")


def test_shares() -> None:
    assert ecmp.shares({"lb2": 300, "lb1": 100}) == {"lb1": 0.25, "lb2": 0.75}
    assert ecmp.shares({"lb1": 0, "lb2": 0}) == {"lb1": 0.0, "lb2": 0.0}


def rec(path: str, n: int, gbit: float, rep: int = 0, cores: float = 2.0,
        workload: str = "ecmp", **extra: Any) -> Record:
    r: Record = {"workload": workload, "path": path, "instances": n, "rep": rep,
                 "gbit_s": gbit, "cores_busy": cores}  # fmt: skip
    if path == "lbnat":
        nodes = [f"lb{i}" for i in range(1, n + 1)]
        r["share"] = {node: 1 / n for node in nodes}
        r["lb_cpu_s"] = {node: 0.1 for node in nodes}
    r.update(extra)
    return r


RECORDS = [
    rec("lbnat", 1, 10.0), rec("lbnat", 1, 12.0, 1), rec("lbnat", 1, 8.0, 2),
    rec("direct", 1, 16.0), rec("direct", 1, 14.0, 1), rec("direct", 1, 20.0, 2),
    rec("lbnat", 2, 15.0), rec("direct", 2, 15.0),
    rec("lbnat", 3, 18.0, share={"lb1": 0.2, "lb2": 0.3, "lb3": 0.5}), rec("direct", 3, 12.0),
    {"workload": "ecmp", "path": "lbnat", "instances": 3, "rep": 1, "error": "iperf3: busy"},
    # paced to 4 Gbit/s: lbnat's hop costs 0.8 - 0.5 = 0.3 cores at 4 Gbit/s with one instance
    rec("lbnat", 1, 4.0, cores=0.8, workload="ecmp_paced"),
    rec("direct", 1, 4.0, cores=0.5, workload="ecmp_paced"),
    rec("direct", 1, 4.0, 1, cores=1.3, workload="ecmp_paced"),  # disturbed: not the least
    rec("lbnat", 2, 4.0, cores=0.9, workload="ecmp_paced"),
    rec("direct", 2, 4.0, cores=0.5, workload="ecmp_paced"),
    {"workload": "bulk_1", "path": "lbnat", "rep": 0, "gbit_s": 99.0},
]  # fmt: skip


def test_summarize_medians_ratios_and_the_scaling_factor() -> None:
    rows = ecmp.summarize(RECORDS)
    assert [r["instances"] for r in rows] == [1, 2, 3]
    one, two, three = rows
    assert (one["lbnat_gbit_s"], one["direct_gbit_s"]) == (10.0, 16.0)  # medians
    assert one["lbnat_per_direct"] == pytest.approx(10 / 16)
    assert one["scaling"] == 1.0
    assert two["scaling"] == pytest.approx(1.5) and two["lbnat_per_direct"] == 1.0
    assert three["scaling"] == pytest.approx(1.8)  # the failed run and bulk_1 left out
    assert three["share"] == {"lb1": 0.2, "lb2": 0.3, "lb3": 0.5}
    assert three["lb_cpu_s"] == {"lb1": 0.1, "lb2": 0.1, "lb3": 0.1}
    assert one["lbnat_cores_busy"] == 2.0
    assert (one["paced_lbnat_cores_busy"], one["paced_direct_cores_busy"]) == (0.8, 0.5)
    assert one["added_cores_per_gbit"] == pytest.approx(0.075)
    assert two["added_cores_per_gbit"] == pytest.approx(0.1)
    assert three["added_cores_per_gbit"] is None  # not paced


def test_summarize_without_one_instance_has_no_scaling() -> None:
    rows = ecmp.summarize([rec("lbnat", 2, 15.0)])
    assert rows[0]["scaling"] is None and rows[0]["lbnat_per_direct"] is None
    assert ecmp.summarize([]) == []


def test_cost_per_gbit() -> None:
    one = ecmp.summarize(RECORDS)[0]  # paced: 0.8 cores busy through lbnat, 0.5 direct
    cost = ecmp.cost_per_gbit(one, seconds=4.0)
    assert cost["cores_per_gbit_lbnat"] == pytest.approx(0.2)
    assert cost["cores_per_gbit_direct"] == pytest.approx(0.125)
    assert cost["cores_per_gbit_added"] == pytest.approx(0.075)
    assert cost["process_cores_per_gbit"] == pytest.approx(0.1 / 4.0 / 10.0)


def test_markdown_table() -> None:
    text = ecmp.markdown_table(ecmp.summarize(RECORDS))
    lines = text.splitlines()
    assert lines[0].startswith("| instances | lbnat (Gbit/s) ↑ | direct (Gbit/s) ↑ |")
    assert lines[2] == ("| 1 | 10.00 | 16.00 | 0.62 × | 1.00 × | lb1 100 % | lb1 0.10 "
                        "| 2.00 / 2.00 | 4.00: 0.80 / 4.00: 0.50 | 0.075 |")  # fmt: skip
    assert lines[4].startswith("| 3 | 18.00 | 12.00 | 1.50 × | 1.80 × | lb1 20 %, lb2 30 %, "
                               "lb3 50 % |")  # fmt: skip


def test_estimate_shows_its_arithmetic_and_says_it_is_one() -> None:
    rows = ecmp.summarize(RECORDS)
    (text,) = ecmp.estimate_lines(rows, seconds=4.0, cores=2)
    assert text.startswith("Estimate (arithmetic, not a measurement")
    assert "at the paced rate" in text
    assert "0.200 − 0.125 = 0.075 cores per Gbit/s" in text
    assert "2 ÷ 0.075 = 27 Gbit/s" in text
    assert "N instances on N machines N times that" in text


def test_estimate_within_noise_claims_no_capacity() -> None:
    rows = ecmp.summarize([rec("lbnat", 1, 4.0, cores=0.5, workload="ecmp_paced"),
                           rec("direct", 1, 4.0, cores=0.52, workload="ecmp_paced")])
    (text,) = ecmp.estimate_lines(rows, seconds=4.0, cores=2)
    assert "within this run's noise" in text and "÷" not in text.split("so the lbnat")[0]
    assert ecmp.estimate_lines([], 4.0, 2) == []


def results(records: list[Record]) -> dict[str, Any]:
    meta = {"started": "2026-12-07 19:00:00 UTC", "command": "make bench", "reps": 3,
            "seconds": 4.0, "kernel": "6.1.0", "cpus": 2, "cpu_model": "x", "python": "3.11",
            "versions": {}, "settings": {"ecmp_streams": 16}, "ecmp_seconds": 4.0,
            "ecmp_offload": {"lb1": "tc offload", "lb2": "no offload (no object; x)"}}
    return {"meta": meta, "paths": ["direct", "lbnat"], "records": [], "summary": {},
            "scale": [], "goals": [], "ecmp": records, "ecmp_summary": ecmp.summarize(records)}


def test_the_report_and_the_readme_show_the_scale_out_table() -> None:
    res = results(RECORDS)
    table = ecmp.markdown_table(res["ecmp_summary"])
    text = report.markdown_report(res)
    assert "## Scale-out: aggregate throughput over 1-N instances (ECMP)" in text
    assert table in text and "`iperf3 -P 16` for 4 s" in text
    assert "Estimate (arithmetic" in text
    assert "**Instances without their kernel fast path**: lb2: no offload" in text
    assert text.index("## Scale-out") < text.index("Settings of this run")
    block = report.readme_block(res)
    assert table in block and "docs/scale-out.md#scaling" in block
    bare = results([])
    assert "Scale-out" not in report.markdown_report(bare)
    assert "Scale-out" not in report.readme_block(bare)


def test_redraw_keeps_an_earlier_run_without_the_workload(tmp_path: Path) -> None:
    from lbnat_bench import run

    old = results([])
    del old["ecmp"], old["ecmp_summary"]
    (tmp_path / "results.json").write_text(json.dumps(old))
    assert run.redraw(tmp_path, readme=False) == 0
    assert "Scale-out" not in (tmp_path / "README.md").read_text()


@pytest.mark.parametrize("argv", [["--ecmp-instances", "1,x"], ["--ecmp-instances", "0"],
                                  ["--ecmp-instances", "10"]])  # fmt: skip
def test_ecmp_instances_refused_with_a_message(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    from lbnat_bench import run

    with pytest.raises(SystemExit) as exit_info:
        run.parse_args(argv)
    assert exit_info.value.code == 2
    assert "--ecmp-instances" in capsys.readouterr().err


def test_ecmp_arguments() -> None:
    from lbnat_bench import run

    settings, _, _ = run.parse_args([])
    assert settings.ecmp_instances == [1, 2, 3] and settings.ecmp_streams == 16
    assert run.ecmp_seconds(settings) == 4.0
    quick, _, _ = run.parse_args(["--quick"])
    assert quick.ecmp_instances == [1, 2, 3] and run.ecmp_seconds(quick) == 2.0
    none, _, _ = run.parse_args(["--ecmp-instances", ""])
    assert none.ecmp_instances == []


def test_the_scale_out_chart(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from lbnat_bench import charts

    res = results(RECORDS)
    names = charts.draw_all({**res, "meta": {**res["meta"], "kernel": "6.1.0"}}, tmp_path)
    assert names == ["ecmp.png"]  # the run has nothing else
    assert (tmp_path / "ecmp.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert charts.draw_all(results([]), tmp_path / "none") == []


def test_scale_out_skips_without_its_tools_and_keeps_a_failed_setup_as_a_record(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import io

    from lbnat_bench import run
    from lbnat_lab.netns import LabError

    settings = run.Settings.quick_mode()
    log = io.StringIO()
    monkeypatch.setattr(ecmp, "missing_tools", lambda: ["exabgp"])
    assert run.scale_out(settings, log) == ([], {})
    assert "ecmp workload skipped: missing exabgp" in log.getvalue()

    calls: list[tuple[Any, ...]] = []

    def fake_run(*args: Any) -> tuple[list[Record], dict[str, str]]:
        calls.append(args)
        return [rec("lbnat", 1, 9.0)], {"lb1": "tc offload"}

    monkeypatch.setattr(ecmp, "missing_tools", lambda: [])
    monkeypatch.setattr(ecmp, "run", fake_run)
    assert run.scale_out(settings, log) == ([rec("lbnat", 1, 9.0)], {"lb1": "tc offload"})
    instances, reps, seconds, streams, _work, _log, paced = calls[0]
    assert (instances, reps, seconds, streams, paced) == ([1, 2, 3], 1, 2.0, 16, 4.0)

    def failing_run(*_args: Any) -> tuple[list[Record], dict[str, str]]:
        raise LabError("ecmp-lab.sh up failed")

    monkeypatch.setattr(ecmp, "run", failing_run)
    records, offload = run.scale_out(settings, log)
    assert offload == {} and records[0]["error"] == "ecmp-lab.sh up failed"
    assert ecmp.summarize(records) == []
    settings.ecmp_instances = []
    assert run.scale_out(settings, log) == ([], {})
