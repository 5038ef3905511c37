"""Tests for lbnat_bench.report (tools' output in, figures and markdown out) and a smoke test
of lbnat_bench.charts.

The inputs are recorded output of wrk 4.1.0, iperf3 -J, /proc/PID/stat and py-spy's raw
collapsed stacks, kept as literal strings; each test feeds one in and asserts what comes out.
"""

# ruff: noqa: RUF001

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from lbnat_bench import report
from lbnat_bench.report import Record, Summary

WRK_LATENCY = """\
Running 1s test @ http://198.18.0.2:80/
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.31ms  405.12us   9.87ms   80.00%
    Req/Sec    25.16k     1.02k   26.80k    70.00%
  Latency Distribution
     50%    1.25ms
     75%    1.48ms
     90%    1.80ms
     99%    3.31ms
  50050 requests in 1.00s, 7.49MB read
Requests/sec:  50050.12
Transfer/sec:      7.49MB
"""

WRK_PLAIN = """\
Running 1m test @ http://198.18.0.2:80/
  4 threads and 256 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    12.04ms    3.10ms  48.22ms   71.35%
    Req/Sec     5.31k   402.11     6.20k    68.50%
  1267140 requests in 1.00m, 189.75MB read
Requests/sec:  21119.08
Transfer/sec:      3.16MB
"""

WRK_ERRORS = """\
Running 5s test @ http://198.18.0.2:80/
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   850.21us    1.10ms   1.20s    97.12%
    Req/Sec     4.02k   310.55     4.61k    72.00%
  Latency Distribution
     50%  612.00us
     75%  790.00us
     90%    1.05ms
     99%    1.20s
  40210 requests in 5.00s, 5.87MB read
  Socket errors: connect 0, read 12, write 0, timeout 3
  Non-2xx or 3xx responses: 5
Requests/sec:   8041.77
Transfer/sec:      1.17MB
"""

IPERF_TCP = json.dumps({
    "start": {"version": "iperf 3.12", "test_start": {"protocol": "TCP", "num_streams": 1}},
    "intervals": [],
    "end": {
        "sum_sent": {"start": 0, "end": 10.000051, "seconds": 10.000051, "bytes": 28991029248,
                     "bits_per_second": 23192705318.4, "retransmits": 0, "sender": True},
        "sum_received": {"start": 0, "end": 10.000339, "seconds": 10.000339,
                         "bytes": 28989980672, "bits_per_second": 23191199917.8, "sender": True},
        "cpu_utilization_percent": {"host_total": 61.2, "remote_total": 48.9},
    },
})

UDP_SUM = {"start": 0, "end": 5.0, "seconds": 5.0, "bytes": 3200000, "bits_per_second": 5120000.0,
           "jitter_ms": 0.0123, "lost_packets": 250, "packets": 50000, "lost_percent": 0.5,
           "sender": True}
IPERF_UDP = json.dumps({"start": {"test_start": {"protocol": "UDP", "blksize": 64}},
                        "intervals": [], "end": {"streams": [], "sum": UDP_SUM}})
IPERF_BUSY = json.dumps({"start": {}, "intervals": [], "end": {},
                         "error": "the server is busy running a test. try again later"})

# /proc/PID/stat, 52 fields: utime (14) 731, stime (15) 208, cutime (16) 55, cstime (17) 12
STAT_TAIL = (
    "S 1 1234 1234 0 -1 4194560 2810 0 0 0 731 208 55 12 20 0 3 0 98765 254611456 8123 "
    "18446744073709551615 94244566847488 94244569666805 140727164370896 0 0 0 0 16781312 "
    "17442 0 0 0 17 2 0 0 0 0 0 94244570555184 94244570966432 94244589629440 140727164376741 "
    "140727164376792 140727164376792 140727164379110 0\n"
)

PYSPY_RAW = """\
run (lbnat/dataplane/loop.py:94);handle (lbnat/engine.py:250);rewrite (lbnat/packet.py:300) 17
run (lbnat/dataplane/loop.py:94);handle (lbnat/engine.py:250);rewrite (lbnat/packet.py:312) 3
run (lbnat/dataplane/loop.py:94);handle (lbnat/engine.py:244) 20

run (lbnat/dataplane/loop.py:88);recv_into (socket.py:120) 60
a line without a count
"""

PATHS = ["direct", "lbnat", "haproxy", "nginx"]


# --- the tools' output ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (WRK_LATENCY, {"rps": 50050.12, "requests": 50050, "seconds": 1.0, "errors": 0,
                       "p50_ms": 1.25, "p75_ms": 1.48, "p90_ms": 1.80, "p99_ms": 3.31}),
        (WRK_PLAIN, {"rps": 21119.08, "requests": 1267140, "seconds": 60.0, "errors": 0}),
        (WRK_ERRORS, {"rps": 8041.77, "requests": 40210, "seconds": 5.0, "errors": 20,
                      "p50_ms": 0.612, "p75_ms": 0.79, "p90_ms": 1.05, "p99_ms": 1200.0}),
    ],
    ids=["latency", "no-latency", "errors-and-units"],
)
def test_parse_wrk(text: str, expected: dict[str, float]) -> None:
    assert report.parse_wrk(text) == pytest.approx(expected)


@pytest.mark.parametrize(
    "text",
    ["", "unable to connect to 198.18.0.2:80 Connection refused\n",
     WRK_LATENCY.replace("Requests/sec:", "Requests/s:")],
)
def test_parse_wrk_rejects_output_without_figures(text: str) -> None:
    with pytest.raises(report.ParseError, match="Requests/sec"):
        report.parse_wrk(text)


def test_parse_iperf_tcp() -> None:
    assert report.parse_iperf_tcp(IPERF_TCP) == pytest.approx(
        {"gbit_s": 23.1911999178, "bytes": 28989980672, "seconds": 10.000339}
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (IPERF_UDP, {"pps": 9950.0, "packets": 50000, "loss_pct": 0.5, "bytes": 3200000,
                     "seconds": 5.0}),
        # iperf3 >= 3.13 adds sum_received: the bytes are the receiver's
        (json.dumps({"end": {"sum": UDP_SUM, "sum_received": {"bytes": 3184000}}}),
         {"pps": 9950.0, "packets": 50000, "loss_pct": 0.5, "bytes": 3184000, "seconds": 5.0}),
        (json.dumps({"end": {"sum": {**UDP_SUM, "packets": 0, "lost_packets": 0}}}),
         {"pps": 0.0, "packets": 0, "loss_pct": 100.0, "bytes": 3200000, "seconds": 5.0}),
    ],
    ids=["sum", "sum_received", "nothing-sent"],
)
def test_parse_iperf_udp(text: str, expected: dict[str, float]) -> None:
    assert report.parse_iperf_udp(text) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (IPERF_BUSY, "iperf3: the server is busy running a test"),
        ("iperf3: error - unable to connect to server: Connection refused\n", "printed no JSON"),
        ("[1, 2]", "not an object"),
        (json.dumps({"start": {}, "end": {}}), "no 'end' section"),
        (json.dumps({"end": {"sum_sent": {"bytes": 1}}}), "without sum"),
        (json.dumps({"end": {"sum": {**UDP_SUM, "seconds": 0}}}), "zero duration"),
    ],
)
@pytest.mark.parametrize("parse", [report.parse_iperf_tcp, report.parse_iperf_udp])
def test_parse_iperf_errors(parse: Any, text: str, message: str) -> None:
    if message == "zero duration" and parse is report.parse_iperf_tcp:
        message = "without sum_received"
    with pytest.raises(report.ParseError, match=message):
        parse(text)


@pytest.mark.parametrize(
    "comm", ["python3", "my (odd) proc", "a) b", "lbnat (x)) y"], ids=repr
)
def test_cpu_seconds_counts_fields_after_the_last_paren(comm: str) -> None:
    line = f"1234 ({comm}) {STAT_TAIL}"
    assert len(line[line.rindex(")") + 2 :].split()) == 50  # fields 3..52
    assert report.cpu_seconds(line) == 731 + 208


# hypothesis generates mostly non-JSON, non-wrk text here: all of it must be a ParseError
@given(st.text())
@example("Requests/sec: 5\n")
@example('{"end": {"sum": []}}')
@example('{"end": {"sum_received": {"bits_per_second": "fast"}}}')
def test_parsers_raise_only_parse_error_on_arbitrary_text(text: str) -> None:
    for parse in (report.parse_wrk, report.parse_iperf_tcp, report.parse_iperf_udp):
        with contextlib.suppress(report.ParseError):
            parse(text)


_NUMBER = st.from_regex(r"[\d.]{1,8}", fullmatch=True)
_WRK_LINE = st.one_of(
    st.builds("Requests/sec:  {}".format, _NUMBER),
    st.builds("  {} requests in {}{}, 1.00MB read".format, st.integers(0, 10**6), _NUMBER,
              st.sampled_from(["us", "ms", "s", "m"])),
    st.builds("     {}%    {}{}".format, st.sampled_from(["50", "75", "90", "99"]), _NUMBER,
              st.sampled_from(["us", "ms", "s"])),
    st.sampled_from(WRK_ERRORS.splitlines()),
)


@given(st.lists(_WRK_LINE, max_size=8).map("\n".join))
@example("Requests/sec: 1.2.3\n  10 requests in 1.00s, 1.00MB read")
def test_parse_wrk_raises_only_parse_error_on_wrk_shaped_text(text: str) -> None:
    with contextlib.suppress(report.ParseError):
        report.parse_wrk(text)


@pytest.mark.parametrize(("parse", "text"), [
    (report.parse_iperf_tcp, json.dumps(
        {"end": {"sum_received": {"bits_per_second": 10**400, "bytes": 1, "seconds": 1}}})),
    (report.parse_iperf_udp, json.dumps({"end": {"sum": {**UDP_SUM, "packets": 10**400}}})),
    (report.parse_iperf_tcp, "[" * 100_000),
], ids=["tcp-huge-int", "udp-huge-int", "deep-nesting"])
def test_iperf_parsers_raise_only_parse_error_on_odd_json(parse: Any, text: str) -> None:
    with contextlib.suppress(report.ParseError):
        parse(text)


# --- medians, derived figures and ratios ------------------------------------------------------


def rec(workload: str, path: str, rep: int = 0, **metrics: Any) -> Record:
    return {"workload": workload, "path": path, "rep": rep, **metrics}


def test_derive_cpu_per_gb_and_per_kconn() -> None:
    bulk, conn, keep, no_cpu = report.derive([
        rec("bulk_1", "lbnat", lb_cpu_s=2.0, bytes=4e9),
        rec("conn_rate", "lbnat", lb_cpu_s=3.0, requests=60000.0),
        rec("keepalive", "lbnat", lb_cpu_s=3.0, requests=60000.0),
        rec("bulk_1", "direct", bytes=4e9),
    ])
    assert bulk["cpu_s_per_gb"] == pytest.approx(0.5)
    assert conn["cpu_s_per_kconn"] == pytest.approx(0.05)
    assert "cpu_s_per_kconn" not in keep  # only conn_rate's requests are connections
    assert "cpu_s_per_gb" not in no_cpu


def test_summarize_medians_added_latency_and_non_finite() -> None:
    summary = report.summarize([
        rec("bulk_1", "lbnat", 0, gbit_s=9.0, lb_cpu_s=1.0, bytes=1e9),
        rec("bulk_1", "lbnat", 1, gbit_s=11.0, lb_cpu_s=3.0, bytes=1e9),
        rec("bulk_1", "lbnat", 2, gbit_s=math.nan, lb_cpu_s=math.inf, bytes=1e9),
        rec("bulk_1", "lbnat", 3, gbit_s=10.0, lb_cpu_s=2.0, bytes=1e9, ok=True, note="x"),
        rec("fixed_rate", "direct", 0, p50_ms=0.5, p99_ms=1.0),
        rec("fixed_rate", "direct", 1, p50_ms=0.7, p99_ms=1.4),
        rec("fixed_rate", "lbnat", 0, p50_ms=0.9, p99_ms=3.51),
        rec("fixed_rate", "haproxy", 0, p99_ms=math.inf),
    ])
    assert summary["bulk_1"]["lbnat"] == pytest.approx(
        {"gbit_s": 10.0, "lb_cpu_s": 2.0, "bytes": 1e9, "cpu_s_per_gb": 2.0}
    )
    assert summary["fixed_rate"]["direct"] == pytest.approx(
        {"p50_ms": 0.6, "p99_ms": 1.2, "added_p50_ms": 0.0, "added_p99_ms": 0.0}
    )
    assert summary["fixed_rate"]["lbnat"]["added_p99_ms"] == pytest.approx(2.31)
    assert summary["fixed_rate"]["lbnat"]["added_p50_ms"] == pytest.approx(0.3)
    assert summary["fixed_rate"]["haproxy"] == {}


@pytest.mark.parametrize(
    ("workload", "path", "peer", "expected"),
    [("bulk_1", "lbnat", "haproxy", 2.5), ("bulk_1", "lbnat", "direct", None),
     ("bulk_8", "lbnat", "haproxy", None), ("udp_low", "lbnat", "haproxy", None)],
)
def test_ratio(workload: str, path: str, peer: str, expected: float | None) -> None:
    summary: Summary = {"bulk_1": {"lbnat": {"gbit_s": 20.0}, "haproxy": {"gbit_s": 8.0},
                                   "direct": {"gbit_s": 0.0}},
                        "udp_low": {"lbnat": {"gbit_s": 1.0}}}
    assert report.ratio(summary, workload, "gbit_s", path, peer) == expected


# --- goals --------------------------------------------------------------------------------------

SUMMARY: Summary = {
    "bulk_1": {"direct": {"gbit_s": 25.0}, "lbnat": {"gbit_s": 20.0, "cpu_s_per_gb": 0.41},
               "haproxy": {"gbit_s": 8.0}, "nginx": {"gbit_s": 9.5}},
    "conn_rate": {"direct": {"rps": 15000.0}, "lbnat": {"rps": 9000.0},
                  "haproxy": {"rps": 12000.0}, "nginx": {"rps": 11000.0}},
    "keepalive": {"lbnat": {"added_p99_ms": 2.0}, "haproxy": {"added_p99_ms": 1.5}},
    "fixed_rate": {"direct": {"p99_ms": 1.0, "added_p99_ms": 0.0},
                   "lbnat": {"p99_ms": 1.4, "added_p99_ms": 0.4},
                   "haproxy": {"p99_ms": 1.6, "added_p99_ms": 0.6}},
    "bulk_8": {"lbnat": {"gbit_s": 30.0}, "haproxy": {"gbit_s": 0.0}},
    "udp_low": {"direct": {"pps": 300000.0}, "lbnat": {"pps": 150000.0},
                "nginx": {"pps": 120000.0}},
}
SCALE: list[Record] = [
    {"rows": 1e6, "us_per_packet": 4.6, "bytes_per_session": 560.0},
    {"rows": 1e4, "us_per_packet": 4.0, "bytes_per_session": 400.0},
]


# SUMMARY with what the goals of issue 17 read besides: nftables, CPU per connection, UDP loss
GOAL_SUMMARY: Summary = {
    **SUMMARY,
    "bulk_1": {**SUMMARY["bulk_1"], "nftables": {"gbit_s": 16.0}},
    "conn_rate": {
        **SUMMARY["conn_rate"],
        "lbnat": {"rps": 9000.0, "cpu_s_per_kconn": 0.05},
        "haproxy": {"rps": 12000.0, "cpu_s_per_kconn": 0.1},
        "nftables": {"rps": 10000.0},
        "lbnat-metrics": {"rps": 8100.0},  # issue 18's goals: this path against lbnat
    },
    "udp_high": {"lbnat": {"loss_pct": 1.5}},
}


def test_goal_rows() -> None:
    rows = {
        r["goal"]: (None if r["value"] is None else round(r["value"], 9), r["met"])
        for r in report.goal_rows(GOAL_SUMMARY, SCALE)
    }
    assert rows == {
        "bulk 1 stream ≥ 2 × HAProxy": (2.5, True),
        "bulk 8 streams ≥ 2 × HAProxy": (None, None),  # HAProxy's 0: no ratio
        "bulk 1 stream ≥ 0.85 × direct": (0.8, False),
        "bulk 8 streams ≥ 0.85 × direct": (None, None),
        "new connections/s ≥ 1.3 × HAProxy": (0.75, False),
        "LB CPU per 1,000 connections ≤ HAProxy's": (0.5, True),
        "keep-alive requests/s ≥ 1.5 × HAProxy": (None, None),
        "added p99 at fixed rate ≤ HAProxy's (ms)": (-0.2, True),
        "added p99 at saturation ≤ HAProxy's (ms)": (0.5, False),
        "UDP at the high offered rate: loss ≤ 2 % (%)": (1.5, True),  # the path's own figure
        "bulk 1 stream ≥ 0.9 × nftables": (1.25, True),
        "bulk 8 streams ≥ 0.9 × nftables": (None, None),  # no nftables in this run
        "new connections/s ≥ 0.9 × nftables": (0.9, True),
        "metrics on: bulk 8 streams ≥ 0.95 × lbnat": (None, None),
        "metrics on: new connections/s ≥ 0.95 × lbnat": (0.9, False),
        "metrics on: keep-alive requests/s ≥ 0.95 × lbnat": (None, None),
        "metrics on: UDP delivered at the high rate ≥ 0.95 × lbnat": (None, None),
        "per-packet cost flat, 10k → 1M rows (≤ 1.25 ×)": (1.15, True),
        "memory per session flat, 10k → 1M rows (≤ 1.25 ×)": (1.4, False),
    }


@pytest.mark.parametrize(
    ("scale", "extra"),
    [([], 0), (SCALE[:1], 2),
     ([{**SCALE[1], "us_per_packet": 0.0, "bytes_per_session": 0.0}, SCALE[0]], 2)],
    ids=["no-scale", "one-size", "zero-baseline"],
)
def test_goal_rows_scale_not_measured(scale: list[Record], extra: int) -> None:
    rows = report.goal_rows(SUMMARY, scale)
    assert len(rows) == len(report.GOALS) + extra
    assert all(r["value"] is None and r["met"] is None for r in rows[len(report.GOALS) :])


# --- markdown -----------------------------------------------------------------------------------


def test_markdown_table() -> None:
    lines = report.markdown_table(SUMMARY, PATHS).splitlines()
    assert lines[:2] == [
        "| metric | direct | lbnat | HAProxy | nginx stream | lbnat ÷ direct | lbnat ÷ HAProxy |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    assert ("| bulk TCP, 1 stream (Gbit/s) ↑ | 25.00 | 20.00 | 8.00 | 9.50 "
            "| 0.80 × | 2.50 × |") in lines
    assert "| bulk TCP, 8 streams (Gbit/s) ↑ | – | 30.00 | 0.00 | – | – | – |" in lines
    assert "| LB CPU per GB (1 stream) (CPU s) ↓ | – | 0.41 | – | – | – | – |" in lines
    assert ("| UDP delivered, low offered rate (pps) ↑ | 300,000 | 150,000 | – | 120,000 "
            "| 0.50 × | – |") in lines
    assert "| fixed-rate added p99 (vs direct) (ms) ↓ | 0.00 | 0.40 | 0.60 | – |  |  |" in lines
    assert not any(line.startswith(("| UDP loss", "| keep-alive requests")) for line in lines)
    assert len(lines) == 2 + 7  # bulk_1: 2, bulk_8, conn_rate, fixed_rate: 2, udp_low


def test_markdown_table_one_ratio_pair_per_lbnat_path() -> None:
    head = report.markdown_table(SUMMARY, ["direct", "lbnat", "lbnat-pypy"]).splitlines()[0]
    assert head.endswith("| lbnat ÷ direct | lbnat ÷ HAProxy "
                         "| lbnat-pypy ÷ direct | lbnat-pypy ÷ HAProxy |")


NFT_SUMMARY: Summary = {
    "bulk_1": {"direct": {"gbit_s": 20.0}, "lbnat": {"gbit_s": 16.0, "cpu_s_per_gb": 0.1},
               "lbnat-python": {"gbit_s": 8.0, "cpu_s_per_gb": 0.8},
               "lbnat-1w": {"gbit_s": 7.0}, "haproxy": {"gbit_s": 5.0},
               "nftables": {"gbit_s": 18.0}},
    "udp_high": {"lbnat": {"pps": 90000.0, "loss_pct": 1.0},
                 "nftables": {"pps": 100000.0, "loss_pct": 0.5}},
}
NFT_PATHS = ["direct", "lbnat", "lbnat-python", "lbnat-1w", "haproxy", "nftables"]


def test_markdown_table_divides_by_nftables_when_the_run_has_it() -> None:
    lines = report.markdown_table(NFT_SUMMARY, NFT_PATHS, ["lbnat", "lbnat-python"]).splitlines()
    assert lines[0] == (
        "| metric | direct | lbnat | lbnat, Python only | lbnat 1 worker | HAProxy | nftables "
        "| lbnat ÷ direct | lbnat ÷ nftables | lbnat ÷ HAProxy "
        "| lbnat, Python only ÷ direct | lbnat, Python only ÷ nftables "
        "| lbnat, Python only ÷ HAProxy |"
    )
    assert ("| bulk TCP, 1 stream (Gbit/s) ↑ | 20.00 | 16.00 | 8.00 | 7.00 | 5.00 | 18.00 "
            "| 0.80 × | 0.89 × | 3.20 × | 0.40 × | 0.44 × | 1.60 × |") in lines
    # no CPU figure for nftables (no process), no HAProxy over UDP: no ratio
    assert ("| LB CPU per GB (1 stream) (CPU s) ↓ | – | 0.10 | 0.80 | – | – | – "
            "| – | – | – | – | – | – |") in lines
    assert ("| UDP delivered, high offered rate (pps) ↑ | – | 90,000 | – | – | – | 100,000 "
            "| – | 0.90 × | – | – | – | – |") in lines
    assert ("| UDP loss, high offered rate (%) ↓ | – | 1.00 | – | – | – | 0.50 "
            "|  |  |  |  |  |  |") in lines


@pytest.mark.parametrize(
    ("paths", "peers", "headline"),
    [
        (PATHS, ["direct", "haproxy"], ["lbnat"]),  # an earlier run: its columns unchanged
        (NFT_PATHS, ["direct", "nftables", "haproxy"], ["lbnat", "lbnat-python"]),
        (["direct", "nftables", "haproxy"], ["direct", "nftables", "haproxy"], []),
        (["lbnat-1w", "lbnat-socket", "nginx"], ["direct", "haproxy"],
         ["lbnat-1w", "lbnat-socket"]),  # no headline path: every lbnat path
    ],
)
def test_ratio_peers_and_headline_paths(
    paths: list[str], peers: list[str], headline: list[str]
) -> None:
    assert report.ratio_peers(paths) == peers
    assert report.headline_paths(paths) == headline


def test_readme_block_shows_the_headline_ratios_and_says_where_the_others_are() -> None:
    res = {**results(NFT_SUMMARY, [], []), "paths": NFT_PATHS}
    text = report.readme_block(res)
    assert report.markdown_table(NFT_SUMMARY, NFT_PATHS, ["lbnat", "lbnat-python"]) in text
    assert "lbnat 1 worker ÷" not in text
    assert "README.md); the ratios of lbnat 1 worker too)." in text


def test_a_fast_path_fallback_is_said_in_the_report_and_the_readme() -> None:
    res = results(SUMMARY, [], [])
    res["meta"]["offload"] = {"lbnat": "no offload (no fastpath.bpf.o)", "lbnat-1w": "off"}
    warning = "**lbnat ran without its kernel fast path**: no offload (no fastpath.bpf.o).\n"
    assert warning in report.markdown_report(res)
    assert warning in report.readme_block(res)
    res["meta"]["offload"] = {"lbnat": "tc offload", "lbnat-1w": "off"}
    assert "kernel fast path" not in report.readme_block(res)


@pytest.mark.parametrize(
    ("variant", "log", "expected"),
    [
        ("lbnat", "srcIP : 198.18.0.2\n", "tc offload"),
        ("lbnat", "data plane : 2 workers, mmap rings, no offload (no such file: "
         "fastpath.bpf.o; --offload off to silence this)\n",
         "no offload (no such file: fastpath.bpf.o; --offload off to silence this)"),
        ("lbnat-python", "", "off"),
        ("lbnat-socket", "", "off"),
    ],
)
def test_bed_offload_reads_the_start_line(
    tmp_path: Path, variant: str, log: str, expected: str
) -> None:
    from lbnat_bench import run

    (tmp_path / f"{variant}.log").write_text(log)
    assert run.Bed(run.Settings(), tmp_path).offload(variant) == expected


def test_markdown_goals() -> None:
    text = report.markdown_goals([
        {"goal": "bulk 1 stream ≥ 2 × HAProxy", "value": 2.5, "met": True},
        {"goal": "new connections/s ≥ HAProxy's", "value": 0.75, "met": False},
        {"goal": "bulk 8 streams ≥ 2 × HAProxy", "value": None, "met": None},
    ])
    assert text.splitlines() == [
        "| goal | measured | met? |",
        "|---|---:|:---:|",
        "| bulk 1 stream ≥ 2 × HAProxy | 2.50 | yes |",
        "| new connections/s ≥ HAProxy's | 0.75 | **no** |",
        "| bulk 8 streams ≥ 2 × HAProxy | – | not measured |",
    ]


def results(summary: Summary, records: list[Record], scale: list[Record]) -> dict[str, Any]:
    meta = {"started": "2024-05-02T10:00:00Z", "command": "make bench", "reps": 3, "seconds": 10.0,
            "kernel": "6.1.0-21-amd64", "cpus": 8, "cpu_model": "AMD EPYC 7B13",
            "python": "3.11.2", "versions": {"wrk": "4.1.0", "iperf3": "3.12"},
            "settings": {"reps": 3, "seconds": 10.0, "paths": PATHS}}
    return {"meta": meta, "paths": PATHS, "records": records, "summary": summary,
            "scale": scale, "goals": report.goal_rows(summary, scale)}


SCALE_FULL = [{**s, "us_per_packet_fwd": s["us_per_packet"] - 0.1,
               "us_per_packet_rev": s["us_per_packet"] + 0.1, "rss_bytes": 60e6 + s["rows"] * 560}
              for s in SCALE]


def test_markdown_report() -> None:
    res = results(SUMMARY, [], SCALE_FULL)
    text = report.markdown_report(res, ["bulk.png", "requests.png"])
    assert text.startswith("# lbnat benchmarks\n")
    assert report.markdown_table(SUMMARY, PATHS) in text
    assert report.markdown_goals(res["goals"]) in text
    assert "iperf3 3.12, wrk 4.1.0" in text
    assert "| 10k | 3.90 | 4.10 | 66 | 400 |" in text  # the scale table, smallest first
    assert "## Charts\n\n![bulk.png](bulk.png)\n![requests.png](requests.png)\n" in text
    assert json.dumps(res["meta"]["settings"], indent=2) in text
    bare = report.markdown_report({**res, "scale": []})
    assert "## Charts" not in bare and "## lbnat's own scale" not in bare
    assert "## Where lbnat's time goes" not in bare


def test_markdown_report_shows_the_profiles() -> None:
    profile = report.profile_summary("run (lbnat/dataplane/loop.py:94) 3", "keepalive")
    text = report.markdown_report({**results(SUMMARY, [], SCALE_FULL), "profiles": [profile]})
    assert "## Where lbnat's time goes" in text
    assert profile in text
    assert text.index("## Where lbnat's time goes") < text.index("Settings of this run")


def test_readme_block_links_docs_benchmarks() -> None:
    text = report.readme_block(results(SUMMARY, [], []))
    assert "medians of 3 × 10 s" in text
    assert "[docs/benchmarks/](docs/benchmarks/README.md)" in text
    assert "![bulk throughput](docs/benchmarks/bulk.png)" in text
    assert report.markdown_table(SUMMARY, PATHS) in text


# --- profiles -------------------------------------------------------------------------------------


def test_profile_summary_merges_lines_self_and_total() -> None:
    assert report.profile_summary(PYSPY_RAW, "keepalive").splitlines() == [
        "### Profile of lbnat under `keepalive` (py-spy, 100 samples)",
        "",
        "| function | self % | total % |",
        "|---|---:|---:|",
        "| `recv_into (socket.py)` | 60.0 | 60.0 |",
        "| `rewrite (lbnat/packet.py)` | 20.0 | 20.0 |",
        "| `handle (lbnat/engine.py)` | 20.0 | 40.0 |",
    ]
    assert len(report.profile_summary(PYSPY_RAW, "keepalive", top=1).splitlines()) == 5


def test_profile_summary_recursion_counts_once_in_total() -> None:
    text = report.profile_summary("f (a.py:1);f (a.py:2) 5\n", "bulk_1")
    assert text.splitlines()[-1] == "| `f (a.py)` | 100.0 | 100.0 |"


@pytest.mark.parametrize("collapsed", ["", "\n\n", "garbage\n"])
def test_profile_summary_without_samples(collapsed: str) -> None:
    text = report.profile_summary(collapsed, "udp_high")
    assert "(py-spy, 0 samples)" in text
    assert text.endswith("| (no samples) | | |")


# --- charts -------------------------------------------------------------------------------------


def test_charts_draw_all_writes_pngs(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from lbnat_bench import charts

    records: list[Record] = []
    for rep in range(2):
        for i, path in enumerate(PATHS):
            k = 1.0 + 0.1 * rep - 0.2 * i
            records += [
                rec("bulk_1", path, rep, gbit_s=20 * k, bytes=2.5e10 * k, lb_cpu_s=4.0),
                rec("conn_rate", path, rep, rps=9000 * k, requests=9e4 * k, lb_cpu_s=5.0),
                rec("keepalive", path, rep, rps=50000 * k, p50_ms=1.25 / k, p99_ms=3.3 / k),
                rec("fixed_rate", path, rep, rps=5000.0, p50_ms=0.6 / k, p99_ms=1.2 / k),
            ]
            if path != "haproxy":
                records.append(rec("udp_low", path, rep, pps=1e5 * k, loss_pct=0.1, bytes=6.4e6))
    res = results(report.summarize(records), records, SCALE_FULL)

    names = charts.draw_all(res, tmp_path)

    assert names == ["bulk.png", "requests.png", "latency.png", "udp.png", "cpu.png", "scale.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    for name in names:
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_charts_every_path_has_its_own_colour() -> None:
    pytest.importorskip("matplotlib")
    from lbnat_bench import charts, run

    paths = list(run.PATHS)
    assert len({charts.colour(p, paths) for p in paths}) == len(paths)
    assert charts.width(PATHS, 8) == 8 and charts.width(paths, 9, panels=2) > 9


def test_update_readme_replaces_only_the_marked_block(tmp_path: Path) -> None:
    from lbnat_bench import run

    readme = tmp_path / "README.md"
    res = results(SUMMARY, [], SCALE_FULL)
    readme.write_text(f"# top\n\n{run.README_BEGIN}\nold table\n{run.README_END}\n\n## after\n")
    assert run.update_readme(res, readme)
    text = readme.read_text()
    assert "old table" not in text
    assert text.startswith(f"# top\n\n{run.README_BEGIN}\n{report.readme_block(res)}\n")
    assert text.endswith(f"{run.README_END}\n\n## after\n")
    assert run.update_readme(res, readme)  # idempotent: the markers survive
    assert readme.read_text() == text
    unmarked = tmp_path / "OTHER.md"
    unmarked.write_text("# no markers\n")
    assert not run.update_readme(res, unmarked)
    assert unmarked.read_text() == "# no markers\n"


@pytest.mark.parametrize("argv", [
    ["--reps", "0"],
    ["--seconds", "0.5"],
    ["--paths", "lbnat,f5"],
    ["--paths", ","],
    ["--workloads", "bulk_1,ping"],
    ["--scale-rows", "10k"],
    ["--scale-rows", "0"],
])
def test_bench_arguments_refused_with_a_message(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    from lbnat_bench import run

    with pytest.raises(SystemExit) as exit_info:
        run.parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


def test_bench_arguments() -> None:
    from lbnat_bench import run

    quick, out, readme = run.parse_args(["--quick", "--out", "/tmp/x"])
    assert (quick.reps, quick.seconds, quick.scale_rows) == (1, 1.0, [10_000, 100_000])
    assert (out, readme) == (Path("/tmp/x"), False)
    full, out, readme = run.parse_args(["--paths", "lbnat,haproxy", "--scale-rows", ""])
    assert full.paths == ["lbnat", "haproxy"] and full.scale_rows == [] and full.reps == 3
    assert out == run.DEFAULT_OUT and readme  # only a full run into docs/benchmarks edits README


IPV6_SUMMARY: Summary = {
    "bulk_1": {"direct-v6": {"gbit_s": 20.0}, "lbnat-v6": {"gbit_s": 16.0, "cpu_s_per_gb": 0.5},
               "haproxy-v6": {"gbit_s": 5.0}, "lbnat-nat64": {"gbit_s": 4.0}},
    "conn_rate": {"direct-v6": {"rps": 20000.0}, "lbnat-v6": {"rps": 8000.0},
                  "haproxy-v6": {"rps": 10000.0}},
}


def test_markdown_ipv6() -> None:
    """The IPv6 rows: their paths, then lbnat over IPv6 against direct and HAProxy over IPv6,
    NAT64 against direct over IPv6, and lbnat over IPv6 against the IPv4 table's lbnat."""
    lines = report.markdown_ipv6(IPV6_SUMMARY, SUMMARY).splitlines()
    assert lines[:2] == [
        "| metric | direct, IPv6 | lbnat, IPv6 | HAProxy, IPv6 | lbnat, NAT64 "
        "| lbnat, IPv6 ÷ direct, IPv6 | lbnat, IPv6 ÷ HAProxy, IPv6 "
        "| lbnat, NAT64 ÷ direct, IPv6 | lbnat, IPv6 ÷ lbnat, IPv4 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    assert lines[2:] == [
        "| bulk TCP, 1 stream (Gbit/s) ↑ | 20.00 | 16.00 | 5.00 | 4.00 "
        "| 0.80 × | 3.20 × | 0.20 × | 0.80 × |",
        "| LB CPU per GB (1 stream) (CPU s) ↓ | – | 0.50 | – | – | – | – | – | 1.22 × |",
        "| new connections/s (Connection: close) (conn/s) ↑ | 20,000 | 8,000 | 10,000 | – "
        "| 0.40 × | 0.80 × | – | 0.89 × |",
    ]
    # without the IPv4 medians, no IPv6 ÷ IPv4 ratio
    assert report.markdown_ipv6(IPV6_SUMMARY).splitlines()[2].endswith("| 0.20 × | – |")


def test_the_ipv6_rows_in_the_report_and_the_readme_block() -> None:
    plain = results(SUMMARY, [], SCALE_FULL)
    assert "IPv6" not in report.markdown_report(plain) + report.readme_block(plain)
    res = {**plain, "ipv6_summary": IPV6_SUMMARY}
    table = report.markdown_ipv6(IPV6_SUMMARY, SUMMARY)
    full = report.markdown_report(res)
    assert "## IPv6\n\nClient and backend over IPv6" in full and f"\n\n{table}\n" in full
    assert full.index("## IPv6") > full.index("## Goals")
    block = report.readme_block(res)
    assert "IPv6:\n\nClient and backend over IPv6" in block and f"\n\n{table}\n" in block


def test_bench_arguments_ipv6() -> None:
    from lbnat_bench import run

    assert run.parse_args([])[0].ipv6 and run.parse_args(["--quick"])[0].ipv6
    assert not run.parse_args(["--no-ipv6"])[0].ipv6
    # lbnat-nat64 has no HTTP service: it is in the bulk rows only
    assert run.IPV6_WORKLOADS == {
        "bulk_1": ("direct-v6", "lbnat-v6", "haproxy-v6", "lbnat-nat64"),
        "conn_rate": ("direct-v6", "lbnat-v6", "haproxy-v6"),
    }
    assert tuple(run.IPV6_PATHS) == report.IPV6_PATHS
    assert all(report.is_lbnat(p) for p in ("lbnat-v6", "lbnat-nat64"))
    assert "[fd18::2]:8201" in run.haproxy_conf(2, ipv6=True)
    assert "fd18" not in run.haproxy_conf(2)  # the IPv4-only lab's HAProxy as before
