"""Health checking: the alive -> bad -> dead state machine, probes, and the thread that runs them.

The state machine is pure (results in, verdicts out) and mirrors the C++ original: one failed
probe makes a backend "bad" (it still gets new flows), `fall` consecutive failures (default 3)
make it "dead" (no new flows), and `rise` consecutive successes (default 1) make it alive again.

The thread never touches the session table: after each round it publishes a new immutable
snapshot of every service's backends through `publish`, which the daemon hands to the packet
loop's command queue. A probe never blocks the packet loop; probes of one round run in parallel
so a few dead backends (each costing a full timeout) do not stretch the round.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from lbnat.backends import Backend, BackendKey, Health


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    interval: float = 5.0
    timeout: float = 2.0
    fall: int = 3
    rise: int = 1

    def __post_init__(self) -> None:
        if self.interval <= 0 or self.timeout <= 0:
            raise ValueError("health interval and timeout must be positive")
        if self.fall < 1 or self.rise < 1:
            raise ValueError("fall and rise must be at least 1")


@dataclass(slots=True)
class Verdict:
    """What the state machine remembers of one backend."""

    health: Health = Health.ALIVE
    failures: int = 0  # consecutive
    successes: int = 0  # consecutive, counted while dead


def judge(verdict: Verdict, ok: bool, policy: HealthPolicy) -> Verdict:
    """The next verdict after one probe result."""
    if ok:
        if verdict.health is Health.DEAD:
            successes = verdict.successes + 1
            if successes >= policy.rise:
                return Verdict(Health.ALIVE)
            return Verdict(Health.DEAD, 0, successes)
        return Verdict(Health.ALIVE)
    failures = verdict.failures + 1
    if failures >= policy.fall or verdict.health is Health.DEAD:  # a failure resets "rise"
        return Verdict(Health.DEAD, failures, 0)
    return Verdict(Health.BAD, failures, 0)


DRAIN_SECONDS = 0.5  # how long a probe waits for the server's side of the close

Probe = Callable[[str, int, float], bool]
"""A probe kind: (ip, port, timeout) -> did the backend answer as a live one would?"""


def tcp_connect_probe(ip: str, port: int, timeout: float) -> bool:
    """Connect and close: the C++ original's check. The verdict is the connect alone.

    The close is a polite one: a FIN first, then whatever the server already sent (a greeting)
    is read until it closes too, for a short while. Closing with unread data makes the kernel
    send a RST instead of a FIN, and a backend should not see a reset every probe interval.
    """
    try:
        sock = socket.create_connection((ip, port), timeout=timeout)
    except OSError:
        return False
    with sock:
        try:
            sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + min(timeout, DRAIN_SECONDS)
            while (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                if not sock.recv(65536):
                    break
        except OSError:
            pass  # the server kept the connection open, or reset it: the probe still passed
    return True


@dataclass
class HealthChecker:
    """Probes every backend of every service each `policy.interval` seconds, on its own thread."""

    policy: HealthPolicy
    backends: Callable[[], Mapping[str, Sequence[Backend]]]  # the current backends per service
    publish: Callable[[str, tuple[Backend, ...]], None]
    report: Callable[[Backend, Health, bool], None]  # (backend, new health, changed)
    probe: Probe = tcp_connect_probe
    verdicts: dict[BackendKey, Verdict] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lbnat-health", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.policy.timeout + 1)

    def _run(self) -> None:
        with ThreadPoolExecutor(max_workers=16, thread_name_prefix="lbnat-probe") as pool:
            while not self._stop.is_set():
                self.round(pool)
                self._stop.wait(self.policy.interval)

    def round(self, pool: ThreadPoolExecutor) -> None:
        """Probe everything once, then publish and report."""
        services = self.backends()
        unique = {b.key: b for backends in services.values() for b in backends}
        futures = {
            key: pool.submit(self.probe, key[0], key[1], self.policy.timeout) for key in unique
        }
        results = {key: future.result() for key, future in futures.items()}
        for key, ok in results.items():
            before = self.verdicts.get(key)
            after = judge(before or Verdict(), ok, self.policy)
            self.verdicts[key] = after
            # A backend's first verdict is news too: until then its state was unknown.
            changed = before is None or after.health is not before.health
            self.report(unique[key], after.health, changed)
        for name, backends in services.items():
            self.publish(name, tuple(b.with_health(self.verdicts[b.key].health) for b in backends))
