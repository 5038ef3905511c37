"""The health state machine: probe results in, verdicts out. Pure.

It mirrors the C++ original: one failed probe makes a backend "bad" (it still gets new flows),
`fall` consecutive failures (default 3) make it "dead" (no new flows), and `rise` consecutive
successes (default 1) make it alive again; a failure while reviving starts the count over.
"""

from __future__ import annotations

from dataclasses import dataclass

from lbnat.backends import Health


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
