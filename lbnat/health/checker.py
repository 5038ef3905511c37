"""The health checker thread: probes every backend of every checked service, each service at
its own interval, runs the state machine and publishes the results.

It never touches the session table: after probing a service it publishes a new immutable
snapshot of that service's backends through `publish`, which the daemon hands to the data
plane (the loop's command queue, or every worker's socketpair). A probe never blocks the
packet loop; the probes of one round run in parallel on a small pool, so a few dead backends
(each costing a full timeout) do not stretch the round.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from lbnat.backends import Backend, Health
from lbnat.health.probe import Probe, ProbeResult
from lbnat.health.state import HealthPolicy, Verdict, judge

VerdictKey = tuple[str, str, int]  # (service, backend ip, backend port)


@dataclass(frozen=True, slots=True)
class HealthCheck:
    policy: HealthPolicy
    probe: Probe


@dataclass(frozen=True, slots=True)
class Report:
    """One probe's outcome, for the log: the original's "IP : a, Port : p Server is x"."""

    service: str
    backend: Backend
    health: Health
    changed: bool  # a transition (or the backend's first verdict)
    result: ProbeResult


def timed_check(probe: Probe, ip: str, port: int, timeout: float) -> ProbeResult:
    """The probe's result with how long it took, failures included (lbnat.metrics'
    probe duration histogram)."""
    began = time.monotonic()
    result = probe.check(ip, port, timeout)
    return dataclasses.replace(result, seconds=time.monotonic() - began)


@dataclass
class HealthChecker:
    checks: Mapping[str, HealthCheck]  # per service name; services not here are not probed
    backends: Callable[[], Mapping[str, Sequence[Backend]]]  # current backends per service
    publish: Callable[[str, tuple[Backend, ...]], None]
    report: Callable[[Report], None]
    verdicts: dict[VerdictKey, Verdict] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _wake: threading.Event = field(default_factory=threading.Event)  # stop or new checks
    _thread: threading.Thread | None = None
    # While lbnat's own link is down every probe fails, whatever the backends do: rounds that
    # overlap such a time are thrown away instead of judged (see `hold`).
    _held: threading.Event = field(default_factory=threading.Event)
    _epoch: int = 0  # moved by every hold and resume: a round that saw one is not judged

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lbnat-health", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            timeout = max((c.policy.timeout for c in self.checks.values()), default=0.0)
            self._thread.join(timeout=timeout + 1)

    def set_checks(self, checks: Mapping[str, HealthCheck]) -> None:
        """New checks (a reload); the thread picks them up at its next wake-up. Verdicts of
        backends that stay are kept."""
        self.checks = dict(checks)  # one reference swap: the thread reads either whole dict
        self._wake.set()

    def hold(self) -> None:
        """lbnat's own link is down: judge no probe until `resume` (a failed probe would say
        nothing about the backend, and `fall` of them would make every backend dead: no new
        flow for a round after the link is back, or every flow reset with --on-dead reset)."""
        self._epoch += 1
        self._held.set()

    def resume(self) -> None:
        self._epoch += 1
        self._held.clear()

    def _run(self) -> None:
        next_due: dict[str, float] = {}
        with ThreadPoolExecutor(max_workers=16, thread_name_prefix="lbnat-probe") as pool:
            while not self._stop.is_set():
                checks = self.checks
                next_due = {name: next_due.get(name, 0.0) for name in checks}
                now = time.monotonic()
                due = [name for name, at in next_due.items() if at <= now]
                if due:
                    self.round(pool, due, checks)
                    for name in due:
                        next_due[name] = now + checks[name].policy.interval
                # With nothing to probe, sleep until woken (new checks, or stop): a zero wait
                # here would spin and starve the packet loop of the GIL.
                wait = min(next_due.values()) - time.monotonic() if next_due else None
                self._wake.wait(None if wait is None else max(wait, 0.0))
                self._wake.clear()

    def round(
        self,
        pool: ThreadPoolExecutor,
        services: Sequence[str],
        checks: Mapping[str, HealthCheck] | None = None,
    ) -> None:
        """Probe every backend of these services once, then report and publish."""
        checks = self.checks if checks is None else checks
        if self._held.is_set():
            return
        epoch = self._epoch
        current = self.backends()
        futures = {}
        for name in services:
            check = checks[name]
            for backend in current.get(name, ()):
                futures[(name, backend.ip, backend.port)] = pool.submit(
                    timed_check, check.probe, backend.ip, backend.port, check.policy.timeout
                )
        results = {key: future.result() for key, future in futures.items()}
        if self._held.is_set() or self._epoch != epoch:
            return  # the link went down or came back while probing: these judge our link
        for name in services:
            backends = current.get(name, ())
            reports = []
            for backend in backends:
                key = (name, backend.ip, backend.port)
                before = self.verdicts.get(key)
                # A backend never judged starts from the health it was published with: alive
                # for a configured one, dead for one that registered and awaits a good probe.
                start = before or Verdict(backend.health)
                after = judge(start, results[key].ok, checks[name].policy)
                self.verdicts[key] = after
                # A backend's first verdict is news too: until then its state was unknown.
                changed = before is None or after.health is not before.health
                reports.append(Report(name, backend, after.health, changed, results[key]))
            # Publish first, then tell: once "Server is dead" is in the log, the snapshot that
            # stops new flows to that backend is already on its way to the packet loop.
            self.publish(
                name,
                tuple(b.with_health(self.verdicts[(name, b.ip, b.port)].health) for b in backends),
            )
            for report in reports:
                self.report(report)
