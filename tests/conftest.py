"""Suite-wide rule: under CI (CI=true) an integration test that skips is a failure.

The netns tests skip with a reason when they cannot run (not root, a tool missing). That is
right on a developer's laptop and wrong in CI, where they must run: a CI run whose network
tests all skipped would prove nothing and still be green.
"""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    node = item.nodeid.replace(os.sep, "/")
    in_integration = "tests/integration/" in node or "tests/faults/" in node
    if os.environ.get("CI") == "true" and report.skipped and in_integration:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"integration test skipped under CI=true (it must run in CI): {reason}"
