"""lbnat.metrics: two engines' real counters and a control plane's status in, the exposition
Prometheus would scrape out, parsed back and checked sample by sample."""

from __future__ import annotations

import urllib.request
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lbnat.backends import Health
from lbnat.config import Config, ServiceConfig
from lbnat.control.metrics_server import MetricsError, MetricsServer
from lbnat.control.plane import ControlPlane
from lbnat.health.checker import Report
from lbnat.health.probe import ProbeResult
from lbnat.metrics import Instruments, ScrapeCollector, Snapshot
from lbnat.service import Service
from lbnat.views import engine_counters, merge_counters
from tests.unit.fixtures import (
    CLIENT1,
    CLIENT2,
    LB,
    WEB_BACKEND_PORT,
    WEB_PORT,
    EngineHarness,
    tcp,
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(instruments: Instruments) -> tuple[Samples, dict[str, str]]:
    """Every sample of one scrape by (name, labels), and each family's type."""
    text = generate_latest(instruments.registry).decode()
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, frozenset(labels.items())]


def traffic() -> tuple[EngineHarness, EngineHarness]:
    """Worker 0: one flow that ended with FIN, one open; worker 1: one open flow, a drop."""
    zero, one = EngineHarness(backends=2), EngineHarness(backends=2)
    for lab, client in ((zero, CLIENT1), (zero, CLIENT2), (one, CLIENT1)):
        flow = lab.flow(client, 40000)
        for send in (flow.syn, flow.synack, flow.ack, flow.data_c, flow.data_s):
            assert send().forwarded
        if lab is zero and client == CLIENT1:
            flow.fin_c()
            flow.fin_s()
    one.send(tcp(CLIENT2, LB, 7, WEB_PORT, "A", 1, 1))  # no row: a drop (no_session)
    return zero, one


def control_plane(zero: EngineHarness) -> ControlPlane:
    backends = tuple(zero.tcp_backends)
    web = ServiceConfig(Service("web", "tcp", WEB_PORT, backends=backends))
    cp = ControlPlane(Config(lb_ip=LB, services=(web,)), started=0.0)
    dead = backends[1].with_health(Health.DEAD)
    cp.verdicts("web", (backends[0], dead))
    return cp


@pytest.fixture
def scraped() -> tuple[Samples, dict[str, str], list[dict[str, Any]]]:
    zero, one = traffic()
    parts = [engine_counters(zero.engine), engine_counters(one.engine)]
    workers: list[dict[str, object]] = [
        {"index": 0, "pid": 10, "alive": True, "restarts": 0},
        {"index": 1, "pid": 11, "alive": True, "restarts": 2},
    ]
    status = control_plane(zero).status(merge_counters(parts), workers, now=5.0)
    instruments = Instruments()
    snapshot = Snapshot(status, [(0, parts[0]), (1, parts[1])], offload=False, version="1.2")
    instruments.add(ScrapeCollector(lambda: snapshot))
    samples, types = scrape(instruments)
    return samples, types, parts


def test_per_backend_counters_per_direction_and_worker(
    scraped: tuple[Samples, dict[str, str], list[dict[str, Any]]],
) -> None:
    samples, _, parts = scraped
    for worker, part in enumerate(parts):
        for key, counted in part["services"]["web"]["backends"].items():
            labels = {"service": "web", "backend": f"{key[0]}:{key[1]}", "worker": str(worker)}
            assert value(samples, "lbnat_flows_opened_total", **labels) == counted["flows"]
            assert value(samples, "lbnat_open_flows", **labels) == counted["active"]
            for direction in ("to_backend", "to_client"):
                both = {**labels, "direction": direction}
                assert (
                    value(samples, "lbnat_backend_packets_total", **both)
                    == counted[direction]["packets"]
                )
                assert (
                    value(samples, "lbnat_backend_bytes_total", **both)
                    == counted[direction]["bytes"]
                )
    b1 = {"service": "web", "backend": f"198.18.0.21:{WEB_BACKEND_PORT}"}
    # worker 0's two flows went to b1 and b2 (round-robin); its b1 flow ended with FIN
    assert value(samples, "lbnat_flows_opened_total", **b1, worker="0") == 1
    assert value(samples, "lbnat_flows_ended_total", service="web", reason="fin", worker="0") == 1
    assert value(samples, "lbnat_open_flows", **b1, worker="0") == 0
    # the client's SYN, ACK, 7 bytes of data and FIN: 4 packets to the backend
    assert value(samples, "lbnat_backend_packets_total", **b1, direction="to_backend",
                 worker="0") == 4  # fmt: skip
    assert value(samples, "lbnat_nat_ports_in_use", **b1, worker="0") == 1  # TIME_WAIT keeps it
    # worker 1 never sent b2 a flow: no pool yet, but its slice of NAT ports is b2's all the same
    b2 = {"service": "web", "backend": f"198.18.0.22:{WEB_BACKEND_PORT}"}
    assert value(samples, "lbnat_nat_ports_limit", **b2, worker="1") == 65535 - 61000 + 1
    assert value(samples, "lbnat_drops_total", reason="no_session", worker="1") == 1
    assert value(samples, "lbnat_nat_rows", worker="0") == 2
    assert value(samples, "lbnat_nat_rows_limit", worker="1") == 1_000_000


def test_health_weights_workers_and_build(
    scraped: tuple[Samples, dict[str, str], list[dict[str, Any]]],
) -> None:
    samples, _, _ = scraped
    b1 = {"service": "web", "backend": f"198.18.0.21:{WEB_BACKEND_PORT}"}
    b2 = {"service": "web", "backend": f"198.18.0.22:{WEB_BACKEND_PORT}"}
    for labels, health in ((b1, "alive"), (b2, "dead")):
        for state in ("alive", "bad", "dead"):
            assert value(samples, "lbnat_backend_health", **labels, state=state) == (
                state == health
            )
    assert value(samples, "lbnat_backend_up", **b1) == 1
    assert value(samples, "lbnat_backend_up", **b2) == 0
    assert value(samples, "lbnat_backend_weight", **b1) == 1
    assert value(samples, "lbnat_worker_restarts_total", worker="1") == 2
    assert value(samples, "lbnat_worker_up", worker="0") == 1
    assert value(samples, "lbnat_offload_enabled") == 0
    [build] = [dict(key[1]) for key in samples if key[0] == "lbnat_build_info"]
    assert build["version"] == "1.2"


def test_names_follow_prometheus_conventions(
    scraped: tuple[Samples, dict[str, str], list[dict[str, Any]]],
) -> None:
    samples, types, _ = scraped
    for name in types:
        assert name.startswith(("lbnat_", "process_", "python_")), name
    counters = {name for name, kind in types.items() if kind == "counter"}
    for sample, _ in samples:
        if sample.removesuffix("_total") in counters or sample.removesuffix("_created") in counters:
            assert sample.endswith(("_total", "_created")), sample
        if sample.endswith("_total"):
            assert sample.removesuffix("_total") in counters, sample
    labels = {label for _, sample_labels in samples for label, _ in sample_labels}
    assert labels <= {"service", "backend", "reason", "direction", "worker", "state", "result",
                      "event", "op", "le", "version", "python", "interface", "role",
                      "peer"}  # fmt: skip
    assert "lbnat_process_start_time_seconds" not in types  # the process collector's own name:
    assert ("process_start_time_seconds", frozenset()) in samples


def test_the_session_sync_s_status_and_standby_rows(
    scraped: tuple[Samples, dict[str, str], list[dict[str, Any]]],
) -> None:
    samples, types, _ = scraped
    assert "lbnat_sync_ready" not in types  # the sync is off: no sync families
    sync = {
        "role": "backup", "ready": True, "listen": "198.18.0.4:7001", "epoch": 1,
        "peers": [{"address": "198.18.0.3:7001", "state": "in_sync", "ready": True}],
        "counts": {"datagrams_sent": 7, "datagrams_received": 9, "rows_received": 5,
                   "records_withheld": 2},
        "dropped": {"bad_mac": 3, "stranger": 1},
    }  # fmt: skip
    worker = {"standby": {"installed": 5, "swept": 1}}
    instruments = Instruments()
    snapshot = Snapshot({"sync": sync}, [(0, worker)], offload=False, version="1.2")
    instruments.add(ScrapeCollector(lambda: snapshot))
    samples, types = scrape(instruments)
    assert value(samples, "lbnat_sync_ready") == 1
    assert [r for r in ("unknown", "master", "backup", "fault", "stop")
            if value(samples, "lbnat_sync_role", role=r)] == ["backup"]  # fmt: skip
    assert value(samples, "lbnat_sync_datagrams_total", direction="sent") == 7
    assert value(samples, "lbnat_sync_datagrams_total", direction="received") == 9
    assert value(samples, "lbnat_sync_records_total", event="rows_received") == 5
    assert value(samples, "lbnat_sync_records_total", event="withheld") == 2
    assert value(samples, "lbnat_sync_records_total", event="sent") == 0
    assert value(samples, "lbnat_sync_dropped_total", reason="bad_mac") == 3
    assert value(samples, "lbnat_sync_peer_in_sync", peer="198.18.0.3:7001") == 1
    assert value(samples, "lbnat_standby_rows_total", event="installed", worker="0") == 5
    assert value(samples, "lbnat_standby_rows_total", event="swept", worker="0") == 1


@pytest.mark.parametrize("announce", [True, False])
def test_scale_out_s_announcement_and_flow_owners(
    scraped: tuple[Samples, dict[str, str], list[dict[str, Any]]], announce: bool
) -> None:
    samples, types, _ = scraped
    assert "lbnat_bgp_announce" not in types  # no --vip
    assert not [name for name, _ in samples if name.startswith("lbnat_owner_")]  # no mesh
    bgp = {"announce": announce, "why": "...", "phase": "serving"}
    worker = {"owners": {"records": 12, "forwarded": 40}}
    instruments = Instruments()
    snapshot = Snapshot({"bgp": bgp}, [(0, worker)], offload=False, version="1.2")
    instruments.add(ScrapeCollector(lambda: snapshot))
    samples, types = scrape(instruments)
    assert value(samples, "lbnat_bgp_announce") == int(announce)
    assert value(samples, "lbnat_owner_records", worker="0") == 12
    assert value(samples, "lbnat_owner_forwarded_packets_total", worker="0") == 40


def test_instruments_count_probes_requests_and_reloads() -> None:
    instruments = Instruments()
    instruments.probe("web", "198.18.0.21:8080", 0.002, ok=True)
    instruments.probe("web", "198.18.0.21:8080", 2.0, ok=False)
    instruments.request("register", None)
    instruments.request("register", "rejected")
    instruments.request("unknown", "auth")
    instruments.reload(applied=True)
    instruments.reload(applied=False)
    samples, types = scrape(instruments)
    backend = {"service": "web", "backend": "198.18.0.21:8080"}
    assert types["lbnat_probe_duration_seconds"] == "histogram"
    assert value(samples, "lbnat_probe_duration_seconds_count", **backend) == 2
    assert value(samples, "lbnat_probe_duration_seconds_bucket", **backend, le="0.0025") == 1
    assert value(samples, "lbnat_probe_duration_seconds_sum", **backend) == pytest.approx(2.002)
    assert value(samples, "lbnat_probe_failures_total", **backend) == 1
    assert value(samples, "lbnat_control_requests_total", op="register", result="acked",
                 reason="") == 1  # fmt: skip
    assert value(samples, "lbnat_control_requests_total", op="register", result="nacked",
                 reason="rejected") == 1  # fmt: skip
    assert value(samples, "lbnat_control_requests_total", op="unknown", result="nacked",
                 reason="auth") == 1  # fmt: skip
    assert value(samples, "lbnat_config_reloads_total", result="applied") == 1
    assert value(samples, "lbnat_config_reloads_total", result="rejected") == 1
    assert value(samples, "lbnat_config_last_reload_successful") == 0


def test_a_scrape_while_stopping_has_the_main_process_metrics_only() -> None:
    instruments = Instruments()
    instruments.add(ScrapeCollector(lambda: None))
    samples, types = scrape(instruments)
    assert "lbnat_config_reloads" in types and "lbnat_flows_opened" not in types
    assert samples


def test_probe_reports_carry_their_duration() -> None:
    report = Report("web", EngineHarness().tcp_backends[0], Health.ALIVE, False,
                    ProbeResult(True, "connected", 0.004))  # fmt: skip
    assert report.result.seconds == 0.004


def test_the_server_serves_the_registry_and_stops() -> None:
    instruments = Instruments()
    instruments.reload(applied=True)
    server = MetricsServer.start("127.0.0.1", 0, instruments.registry)
    try:
        url = f"http://127.0.0.1:{server.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
        assert 'lbnat_config_reloads_total{result="applied"} 1.0' in text
        with pytest.raises(MetricsError, match=f"cannot serve metrics on 127.0.0.1:{server.port}: "
                           "Address already in use"):  # fmt: skip
            MetricsServer.start("127.0.0.1", server.port, instruments.registry)
    finally:
        server.close()
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=2)


def test_ipv6_backend_labels_and_a_dual_stack_server() -> None:
    from lbnat.metrics import backend_label

    assert backend_label(("2001:db8::21", 9000)) == "[2001:db8::21]:9000"
    assert backend_label(("198.18.0.21", 9000)) == "198.18.0.21:9000"
    instruments = Instruments()
    server = MetricsServer.start("::", 0, instruments.registry)
    try:
        for host in ("127.0.0.1", "[::1]"):  # "::" takes both families
            url = f"http://{host}:{server.port}/metrics"
            with urllib.request.urlopen(url, timeout=10) as reply:
                assert reply.status == 200
    finally:
        server.close()
