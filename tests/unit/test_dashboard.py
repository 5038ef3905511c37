"""The Grafana dashboard and its renderer (lbnat_lab.dashboard): every query names metrics
lbnat exposes, Grafana's variables expand, legends fill in, and the charts are drawn."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lbnat.metrics import Instruments, ScrapeCollector, Snapshot
from lbnat.views import engine_counters
from lbnat_lab.dashboard import Panel, Target, expand, legend, load_panels, render
from tests.unit.fixtures import CLIENT2, LB, WEB_PORT, EngineHarness, tcp

METRIC_NAME = re.compile(r"\blbnat_[a-z_]+\b")


def exposed_names() -> set[str]:
    """Every sample name lbnat can expose: a scrape with one engine and one of each event."""
    lab = EngineHarness()
    flow = lab.flow()
    for send in (flow.syn, flow.synack, flow.ack, flow.fin_c, flow.fin_s):
        send()
    lab.send(tcp(CLIENT2, LB, 7, WEB_PORT, "A", 1, 1))  # a drop: no row
    counters = engine_counters(lab.engine)
    status = {
        "services": [{"name": "web", "backends": [{"ip": "198.18.0.21", "port": 8080,
                                                   "health": "alive", "draining": False,
                                                   "weight": 1}]}],
        "workers": [{"index": 0, "alive": True, "restarts": 0}],
        "link": {"interface": "eth0", "state": "up"},
    }  # fmt: skip
    instruments = Instruments()
    instruments.add(ScrapeCollector(lambda: Snapshot(status, [(0, counters)], offload=True)))
    instruments.probe("web", "198.18.0.21:8080", 0.001, ok=False)
    instruments.request("status", None)
    text = generate_latest(instruments.registry).decode()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def test_every_query_names_metrics_lbnat_exposes() -> None:
    names = exposed_names()
    panels = load_panels()
    assert len(panels) >= 10
    used = {name for panel in panels for target in panel.targets
            for name in METRIC_NAME.findall(target.expr)}  # fmt: skip
    assert used, "the dashboard queries no lbnat metric"
    assert used - names == set()


def test_the_issue_s_panels_are_there() -> None:
    titles = " / ".join(panel.title for panel in load_panels()).lower()
    for wanted in ("per backend", "health", "drops", "nat table", "throughput"):
        assert wanted in titles, wanted


@pytest.mark.parametrize(
    ("expr", "expanded"),
    [
        ('rate(x{service=~"$service"}[$__rate_interval])', 'rate(x{service=~".*"}[5s])'),
        ("sum(lbnat_nat_rows)", "sum(lbnat_nat_rows)"),
    ],
)
def test_grafana_variables_expand(expr: str, expanded: str) -> None:
    assert expand(expr) == expanded
    for panel in load_panels():
        for target in panel.targets:
            assert "$" not in expand(target.expr), target.expr


@pytest.mark.parametrize(
    ("template", "labels", "text"),
    [
        ("{{backend}} {{direction}}", {"backend": "b:1", "direction": "to_client"},
         "b:1 to_client"),
        ("rows", {}, "rows"),
        ("", {"reason": "fin"}, '{"reason": "fin"}'),
    ],
)
def test_legends(template: str, labels: dict[str, str], text: str) -> None:
    assert legend(template, labels) == text


def test_render_draws_every_panel(tmp_path: Path) -> None:
    panels = [Panel("a", "bps", (Target("x", ""),)), Panel("b", "", (Target("y", ""),)),
              Panel("c", "s", (Target("z", ""),))]  # fmt: skip
    series = [[("one", [(100.0, 1e6), (101.0, 2e6)])], [], [("p99", [(100.0, 0.002)])]]
    out = tmp_path / "dashboard.png"
    render(panels, series, out, started=100.0)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
