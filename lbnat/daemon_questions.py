"""What the daemon answers about the running lbnat: status, sessions, a scrape's snapshot.

A part of `Daemon` (lbnat.daemon) kept apart: questions only read. They are asked on the
admin server's threads and the metrics server's thread, without the control plane's lock
(the loops answer them between batches); only the control plane's part of the status is built
under it.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from lbnat.control.plane import ControlPlane
from lbnat.dataplane.link import Link
from lbnat.dataplane.offload import KernelPath
from lbnat.dataplane.syncnode import SyncNode
from lbnat.eventlog import Log, table_error_line, table_lines
from lbnat.linkwatch import LinkWatch
from lbnat.messages import AskCounters, AskSessions, DataPlane, Question
from lbnat.metrics import Snapshot, lbnat_version
from lbnat.views import merge_counters

__all__ = ["SCRAPE_TIMEOUT", "Questions", "link_status"]

SCRAPE_TIMEOUT = 2.0  # seconds a scrape waits for the workers' counters (Prometheus: 10 s)


def link_status(watch: LinkWatch, link: Link, now: float) -> dict[str, object]:
    return {
        "interface": link.interface,
        "state": watch.state.value,
        "since": round(now - watch.since, 1),  # seconds in this state
    }


class Questions:
    """The daemon's answers about the data plane (the attributes are the Daemon's)."""

    plane: DataPlane | None
    control: ControlPlane
    link: Link | None
    link_watch: LinkWatch | None
    offload: KernelPath | None
    sync: SyncNode | None
    log: Log
    _lock: threading.Lock

    def ask(self, question: Question, timeout: float = 5.0) -> list[Any]:
        """Every engine's answer to `question` (lbnat.views.answer), one per live worker."""
        return [answer for _, answer in self.ask_each(question, timeout)]

    def ask_each(self, question: Question, timeout: float = 5.0) -> list[tuple[int, Any]]:
        """The same, each with its worker's index."""
        plane = self.plane
        if plane is None:
            raise RuntimeError("lbnat is not running")
        return plane.ask_each(question, timeout)

    def open_flows(self) -> int | None:
        """Open flows over every worker; None when they cannot say (stopping, stuck)."""
        try:
            return int(merge_counters(self.ask(AskCounters()))["open_flows"])
        except (TimeoutError, RuntimeError):
            return None

    def status(self) -> dict[str, object]:
        """Services, backends with state, and counters summed over every worker."""
        return self.status_of(merge_counters(self.ask(AskCounters())))

    def status_of(self, counters: dict[str, Any]) -> dict[str, object]:
        """The status around `counters` (every worker's, merged)."""
        plane = self.plane
        if plane is None:
            raise RuntimeError("lbnat is not running")
        workers = plane.info()
        now = time.monotonic()
        with self._lock:
            status = self.control.status(counters, workers, now)
        if self.link_watch is not None and self.link is not None:
            status["link"] = link_status(self.link_watch, self.link, now)
        if self.sync is not None:
            status["sync"] = self.sync.status()
        return status

    def metrics_snapshot(self) -> Snapshot | None:
        """What one scrape sees (on the metrics server's thread): each worker's own counters,
        and the status around their sum. None once lbnat is stopping."""
        plane = self.plane
        if plane is None:
            return None
        try:
            answers = plane.ask_each(AskCounters(), SCRAPE_TIMEOUT)
            status = self.status_of(merge_counters([answer for _, answer in answers]))
        except (TimeoutError, RuntimeError):
            return None  # a worker stuck or dying: this scrape has the main process's metrics
        return Snapshot(status, answers, self.offload is not None, lbnat_version())

    def dump_table(self) -> None:
        """`kill -USR1`: the NAT table into the log (on a thread of its own)."""
        try:
            lines = table_lines(self.sessions())
        except (TimeoutError, RuntimeError) as error:
            lines = [table_error_line(str(error))]
        for line in lines:
            self.log.write(line)

    def sessions(self) -> list[dict[str, object]]:
        """Every worker's rows, each marked with its worker."""
        rows: list[dict[str, object]] = []
        for worker, answer in self.ask_each(AskSessions()):
            rows.extend({**row, "worker": worker} for row in answer)
        return rows
