"""The health state machine: probe results in, verdicts out. Pure.

It mirrors the C++ original: one failed probe makes a backend "bad" (it still gets new flows),
`fall` consecutive failures (default 3) make it "dead" (no new flows), and `rise` consecutive
successes (default 1) make it alive again; a failure while reviving starts the count over.
"""

from __future__ import annotations

from dataclasses import dataclass

from lbnat.backends import Health
from lbnat.health_settings import HealthPolicy as HealthPolicy  # the checker imports it here


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
