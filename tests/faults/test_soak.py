"""`make soak` in miniature: `python -m lbnat_lab.soak` builds its lab, loads lbnat, samples its
memory, judges, and leaves nothing behind (the full 10 minutes are `make soak`)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from lbnat_lab.netns import checkout_env, skip_reason
from tests.faults.conftest import scaled

pytestmark = pytest.mark.netns

MINUTES = scaled(0.25, 2.0)
EVERY = scaled(1.0, 10.0)
SAMPLE_RE = re.compile(r"^t=\s*\d+ s  main +[\d.]+ MB  w0 +[\d.]+ MB  w1 +[\d.]+ MB  rows \d+$")


def test_the_soak_runs_samples_and_judges() -> None:
    if (reason := skip_reason()) is not None:
        pytest.skip(reason)
    result = subprocess.run(
        [sys.executable, "-m", "lbnat_lab.soak", "--minutes", str(MINUTES), "--every", str(EVERY)],
        capture_output=True, text=True, timeout=MINUTES * 60 + 120, env=checkout_env(),
    )  # fmt: skip
    print(result.stdout, result.stderr)
    lines = result.stdout.splitlines()
    assert result.returncode == 0, result.stdout + result.stderr
    assert sum(bool(SAMPLE_RE.match(line)) for line in lines) >= 7
    for label in ("main", "w0", "w1"):
        assert any(line.startswith(f"memory: {label} ") and line.endswith("flat") for line in lines)
    assert "traffic: conn " in result.stdout and " 0 failed" in result.stdout
    assert lines[-1].startswith("verdict: PASS")
    prefix = re.search(r"in lab (\S+);", result.stdout)
    assert prefix is not None
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert prefix[1] not in namespaces  # the lab is gone
