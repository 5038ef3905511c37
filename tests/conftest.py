"""Suite-wide rule: under CI (CI=true) an integration test that skips is a failure. And the
fixture every bulk transfer writes its files under (`scratch`).

The netns tests skip with a reason when they cannot run (not root, a tool missing). That is
right on a developer's laptop and wrong in CI, where they must run: a CI run whose network
tests all skipped would prove nothing and still be green.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Generator
from pathlib import Path

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


@pytest.fixture
def scratch(tmp_path: Path) -> Generator[Path, None, None]:
    """A directory for a test's bulk files, removed after the test (pytest keeps the last
    tmp_paths, and tens of MB each would pile up)."""
    path = tmp_path / "scratch"
    path.mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)
