"""Prometheus metrics: what lbnat exposes, and how one scrape becomes metric families.

What this module may know: the status the control plane builds (`ControlPlane.status`:
services, backends with health, weight and draining, workers with restarts, the link), every
worker's own counters (`lbnat.views.engine_counters`) with the worker's index, and
prometheus-client's metric families and instruments. It opens no socket, starts no thread and
reads no clock: `families(snapshot)` turns one `Snapshot` into metric families, and the daemon
takes the snapshot only when Prometheus scrapes (`ScrapeCollector`): the workers are asked for
their counters then, so nothing is added to the packet path.

Naming follows Prometheus' conventions: the `lbnat_` prefix, `_total` counters, base units
(bytes, seconds), labels `service`, `backend` ("ip:port"), `reason`, `direction`
("to_backend", "to_client"), `worker`.

Why counters the workers hold carry a `worker` label rather than being summed: a restarted
worker's counters start over; per worker, Prometheus' `rate()` sees the reset for what it is,
while a sum over workers would fall and make rate() count the surviving workers' totals again.
Gauges (open flows, rows) carry it too, so `sum without (worker)` is the whole lbnat.

Events of the main process (probes, control requests, reloads) are counted as they happen with
prometheus-client's own thread-safe instruments (`Instruments`), in the same registry.
"""

from __future__ import annotations

import functools
import platform
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector

from lbnat.control.client import HA_ROLES
from lbnat.fields import host_port_text

__all__ = [
    "DIRECTIONS",
    "HEALTH_STATES",
    "PROBE_BUCKETS",
    "Instruments",
    "ScrapeCollector",
    "Snapshot",
    "families",
]

DIRECTIONS = ("to_backend", "to_client")
HEALTH_STATES = ("alive", "bad", "dead")
# Probe round trips: a TCP connect on a LAN is 0.1-1 ms, an HTTP check a few ms, a timeout is
# the probe's timeout (2 s by default): buckets from 0.5 ms to 5 s.
PROBE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What one scrape sees: the control plane's status over the merged counters, and each
    worker that answered with its own counters (a worker being restarted has none)."""

    status: Mapping[str, Any]
    workers: Sequence[tuple[int, Mapping[str, Any]]]
    offload: bool  # the kernel fast path is attached
    version: str = ""


def backend_label(key: tuple[str, int]) -> str:
    """A backend key (ip, port) as the `backend` label: "198.18.0.21:9000", an IPv6 one
    "[2001:db8::21]:9000"."""
    return host_port_text(*key)


class _Families:
    """The metric families of one scrape, declared once, filled from the snapshot."""

    def __init__(self) -> None:
        self.out: list[Metric] = []

    def counter(self, name: str, doc: str, labels: Sequence[str], unit: str = "") -> Any:
        family = CounterMetricFamily(name, doc, labels=labels, unit=unit)
        self.out.append(family)
        return family

    def gauge(self, name: str, doc: str, labels: Sequence[str], unit: str = "") -> Any:
        family = GaugeMetricFamily(name, doc, labels=labels, unit=unit)
        self.out.append(family)
        return family


def families(snap: Snapshot) -> list[Metric]:
    """Every lbnat metric family of one scrape (the instruments' come from the registry)."""
    f = _Families()
    _control_families(f, snap)
    _worker_families(f, snap.workers)
    return f.out


def _control_families(f: _Families, snap: Snapshot) -> None:
    """From the control plane: backends' health, weight and draining; workers; the link."""
    status = snap.status
    info = f.gauge("lbnat_build_info", "lbnat's version and Python (always 1).",
                   ["version", "python"])  # fmt: skip
    info.add_metric([snap.version, platform.python_version()], 1)
    f.gauge("lbnat_offload_enabled", "1 when the kernel fast path (tc eBPF) is attached.",
            []).add_metric([], int(snap.offload))  # fmt: skip
    sync = status.get("sync")
    if isinstance(sync, Mapping):
        _sync_families(f, sync)
    bgp = status.get("bgp")
    if isinstance(bgp, Mapping):  # behind an ECMP router: what lbnat-bgp tells the router
        f.gauge("lbnat_bgp_announce", "1 while this instance wants its VIP announced (lbnat "
                "bgp-status), 0 while it wants it withdrawn.", []).add_metric(
            [], int(bool(bgp.get("announce"))))  # fmt: skip
    link = status.get("link")
    if isinstance(link, Mapping):
        up = f.gauge("lbnat_link_up", "1 when lbnat's interface is up.", ["interface"])
        up.add_metric([str(link["interface"])], int(link["state"] == "up"))
    health = f.gauge(
        "lbnat_backend_health",
        "The backend's health state: 1 for the current one of alive, bad, dead.",
        ["service", "backend", "state"],
    )
    backend_up = f.gauge(
        "lbnat_backend_up", "1 when the backend may take new flows (alive, not draining).",
        ["service", "backend"],
    )  # fmt: skip
    weight = f.gauge("lbnat_backend_weight", "The backend's scheduling weight.",
                     ["service", "backend"])  # fmt: skip
    draining = f.gauge("lbnat_backend_draining", "1 while the backend is being drained.",
                       ["service", "backend"])  # fmt: skip
    for service in status.get("services", []):
        name = str(service["name"])
        for b in service["backends"]:
            labels = [name, host_port_text(str(b["ip"]), int(b["port"]))]
            for state in HEALTH_STATES:
                health.add_metric([*labels, state], int(b["health"] == state))
            backend_up.add_metric(labels, int(b["health"] == "alive" and not b["draining"]))
            weight.add_metric(labels, b["weight"])
            draining.add_metric(labels, int(b["draining"]))
    up = f.gauge("lbnat_worker_up", "1 while the data-plane worker runs.", ["worker"])
    restarts = f.counter("lbnat_worker_restarts", "Times the worker was restarted after it died.",
                         ["worker"])  # fmt: skip
    for worker in status.get("workers", []):
        index = str(worker["index"])
        up.add_metric([index], int(bool(worker["alive"])))
        restarts.add_metric([index], worker["restarts"])


SYNC_ROLES = ("unknown", *HA_ROLES)  # lbnat.dataplane.syncnode.Role: before keepalived speaks
SYNC_COUNTS = {  # the sync node's counts: (metric, label value)
    "datagrams_sent": ("datagrams", "sent"), "datagrams_received": ("datagrams", "received"),
    "records_sent": ("records", "sent"), "records_withheld": ("records", "withheld"),
    "rows_received": ("records", "rows_received"), "bulk_rows_sent": ("records", "bulk_rows_sent"),
    "ignored_as_master": ("records", "ignored_as_master"), "send_errors": ("errors", "send"),
}  # fmt: skip


def _sync_families(f: _Families, sync: Mapping[str, Any]) -> None:
    """The session sync of a pair (lbnat.dataplane.syncnode), when it is on."""
    f.gauge("lbnat_sync_ready", "1 once the node holds its peers' flows (lbnat ha-check passes).",
            []).add_metric([], int(bool(sync.get("ready"))))  # fmt: skip
    role = f.gauge("lbnat_sync_role", "The VRRP role keepalived last told lbnat: 1 for the "
                   "current one.", ["role"])  # fmt: skip
    for name in SYNC_ROLES:
        role.add_metric([name], int(sync.get("role") == name))
    datagrams = f.counter("lbnat_sync_datagrams", "Sync datagrams sent and received.",
                          ["direction"])  # fmt: skip
    records = f.counter("lbnat_sync_records", "Row records sent, withheld (a backup's), "
                        "received, sent in bulks, ignored by a master.", ["event"])  # fmt: skip
    errors = f.counter("lbnat_sync_send_errors", "Sync datagrams the kernel refused to send.", [])
    families = {"datagrams": datagrams, "records": records}
    counts = sync.get("counts", {})
    for key, (family, label) in SYNC_COUNTS.items():
        if family == "errors":
            errors.add_metric([], counts.get(key, 0))
        else:
            families[family].add_metric([label], counts.get(key, 0))
    dropped = f.counter("lbnat_sync_dropped", "Sync datagrams dropped unread, by why.", ["reason"])
    for reason, n in sync.get("dropped", {}).items():
        dropped.add_metric([reason], n)
    in_sync = f.gauge("lbnat_sync_peer_in_sync", "1 when the peer's stream is in sync (no "
                      "resync due or under way).", ["peer"])  # fmt: skip
    for peer in sync.get("peers", []):
        in_sync.add_metric([str(peer["address"])], int(peer.get("state") == "in_sync"))


def _worker_families(f: _Families, workers: Iterable[tuple[int, Mapping[str, Any]]]) -> None:
    """From each worker's own counters, labelled with its index."""
    per_backend = ["service", "backend", "worker"]
    opened = f.counter("lbnat_flows_opened", "Flows scheduled to the backend.", per_backend)
    ended = f.counter("lbnat_flows_ended", "Flows that ended, by why.",
                      ["service", "reason", "worker"])  # fmt: skip
    active = f.gauge("lbnat_open_flows", "Flows open now (not ended).", per_backend)
    way = [*per_backend[:2], "direction", "worker"]
    packets = f.counter("lbnat_backend_packets", "Packets forwarded, per direction.", way)
    octets = f.counter("lbnat_backend_bytes", "Bytes forwarded (IP packets), per direction.", way,
                       unit="bytes")  # fmt: skip
    in_use = f.gauge("lbnat_nat_ports_in_use", "NAT ports a row of the backend holds now.",
                     per_backend)  # fmt: skip
    ports = f.gauge("lbnat_nat_ports_limit", "NAT ports of the worker's slice for the backend.",
                    per_backend)  # fmt: skip
    cookies = f.counter("lbnat_syn_cookies", "SYN cookies sent, validated, invalid.",
                        ["service", "result", "worker"])  # fmt: skip
    drops = f.counter("lbnat_drops", "Packets dropped, by why.", ["reason", "worker"])
    handled = f.counter("lbnat_engine_packets", "Packets the Python engine handled.",
                        ["worker"])  # fmt: skip
    rows = f.gauge("lbnat_nat_rows", "NAT table rows (open and lingering flows).", ["worker"])
    cap = f.gauge("lbnat_nat_rows_limit", "The worker's NAT table cap.", ["worker"])
    half_open = f.gauge("lbnat_nat_half_open_rows", "Rows not yet established.", ["worker"])
    evicted = f.counter("lbnat_nat_evicted_rows", "Rows evicted to make room.", ["worker"])
    reclaimed = f.counter("lbnat_nat_ports_reclaimed", "NAT ports taken back from half-open rows.",
                          ["worker"])  # fmt: skip
    kernel_rows = f.gauge("lbnat_offload_rows", "Rows the kernel fast path rewrites now.",
                          ["worker"])  # fmt: skip
    kernel_moves = f.counter(
        "lbnat_offload_row_changes",
        "Rows put into the kernel's map (entered), taken out (withdrawn), or refused (map full).",
        ["event", "worker"],
    )
    kernel_packets = f.counter("lbnat_offload_packets", "Packets the kernel fast path rewrote.",
                               ["worker"])  # fmt: skip
    kernel_bytes = f.counter("lbnat_offload_bytes", "Bytes the kernel fast path rewrote.",
                             ["worker"], unit="bytes")  # fmt: skip
    standby = f.counter("lbnat_standby_rows", "A peer's rows applied here (the session sync): "
                        "installed, updated, ended, refreshed, swept, or refused by why.",
                        ["event", "worker"])  # fmt: skip
    owned = f.gauge("lbnat_owner_records", "Flows of other instances sharing the VIP that this "
                    "worker knows the owner of (--sync-mode mesh).", ["worker"])  # fmt: skip
    to_owner = f.counter("lbnat_owner_forwarded_packets", "Packets of another instance's flow "
                         "that the router sent here, forwarded to their owner.",
                         ["worker"])  # fmt: skip
    for index, c in workers:
        w = str(index)
        for name, service in c.get("services", {}).items():
            for reason, n in service.get("ended", {}).items():
                ended.add_metric([name, reason, w], n)
            for result, n in service.get("syn_cookies", {}).items():
                cookies.add_metric([name, result, w], n)
            for key, b in service.get("backends", {}).items():
                labels = [name, backend_label(key), w]
                opened.add_metric(labels, b["flows"])
                active.add_metric(labels, b["active"])
                in_use.add_metric(labels, b["nat_ports"]["in_use"])
                ports.add_metric(labels, b["nat_ports"]["size"])
                for direction in DIRECTIONS:
                    packets.add_metric([*labels[:2], direction, w], b[direction]["packets"])
                    octets.add_metric([*labels[:2], direction, w], b[direction]["bytes"])
        for reason, n in c.get("drops", {}).items():
            drops.add_metric([reason, w], n)
        handled.add_metric([w], c.get("packets", 0))
        rows.add_metric([w], c.get("rows", 0))
        cap.add_metric([w], c.get("rows_cap", 0))
        table = c.get("table", {})
        half_open.add_metric([w], table.get("half_open", 0))
        evicted.add_metric([w], table.get("evicted", 0))
        reclaimed.add_metric([w], table.get("ports_reclaimed", 0))
        kernel = c.get("offload", {})
        kernel_rows.add_metric([w], kernel.get("rows", 0))
        for event, key in (("entered", "offloaded"), ("withdrawn", "withdrawn"),
                           ("refused", "refused")):  # fmt: skip
            kernel_moves.add_metric([event, w], kernel.get(key, 0))
        kernel_packets.add_metric([w], kernel.get("packets", 0))
        kernel_bytes.add_metric([w], kernel.get("bytes", 0))
        for event, n in c.get("standby", {}).items():
            standby.add_metric([event, w], n)
        owners = c.get("owners", {})
        if owners:
            owned.add_metric([w], owners.get("records", 0))
            to_owner.add_metric([w], owners.get("forwarded", 0))


class ScrapeCollector:
    """prometheus-client's custom collector: a snapshot taken at each scrape, as families.
    `take` returns None when lbnat cannot answer (stopping): the scrape has the rest."""

    def __init__(self, take: Callable[[], Snapshot | None]) -> None:
        self.take = take

    def collect(self) -> Iterator[Metric]:
        snap = self.take()
        if snap is not None:
            yield from families(snap)

    def describe(self) -> list[Metric]:
        return []  # no describe: registering must not take a snapshot (the workers may be down)


@functools.cache  # read once: the installed metadata does not change under a running lbnat
def lbnat_version() -> str:
    try:
        return version("lbnat")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


class Instruments:
    """The main process's event counters and the registry the HTTP server exposes: probe
    durations and failures, control requests by op and result, config reloads; the process
    collector (CPU, memory, start time of the main process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.registry)
        on = self.registry
        self.probe_seconds = Histogram(
            "lbnat_probe_duration_seconds", "Health probe round trips, failed ones included.",
            ["service", "backend"], buckets=PROBE_BUCKETS, registry=on,
        )  # fmt: skip
        # (no reason label: a probe's detail is free text, "expected 'x', got 'y'")
        self.probe_failures = Counter(
            "lbnat_probe_failures", "Health probes that failed.", ["service", "backend"],
            registry=on,
        )  # fmt: skip
        self.requests = Counter(
            "lbnat_control_requests",
            "Requests on the registration channel and the admin socket, by op and result "
            "(acked; nacked with a reason: malformed, auth, not_allowed, rejected, busy).",
            ["op", "result", "reason"], registry=on,
        )  # fmt: skip
        self.reloads = Counter("lbnat_config_reloads", "Config reloads, by result.", ["result"],
                               registry=on)  # fmt: skip
        self.last_reload_ok = Gauge(
            "lbnat_config_last_reload_successful", "1 unless the last reload was rejected.",
            registry=on,
        )  # fmt: skip
        self.last_reload_ok.set(1)
        for result in ("applied", "rejected"):
            self.reloads.labels(result)  # both series exist from the start, at 0

    def add(self, collector: ScrapeCollector) -> None:
        self.registry.register(collector)

    def probe(self, service: str, backend: str, seconds: float, ok: bool) -> None:
        self.probe_seconds.labels(service, backend).observe(seconds)
        if not ok:
            self.probe_failures.labels(service, backend).inc()

    def request(self, op: str, reason: str | None) -> None:
        self.requests.labels(op, "acked" if reason is None else "nacked", reason or "").inc()

    def reload(self, applied: bool) -> None:
        self.reloads.labels("applied" if applied else "rejected").inc()
        self.last_reload_ok.set(int(applied))
