"""The scale-out's BGP configs (issue 20, docs/scale-out.md) as their generators write them,
checked by the daemons that read them: scripts/exabgp/exabgp-conf.sh runs `exabgp --test`,
scripts/bird/router-conf.sh runs `bird -p` (each fails when its daemon refuses). Under
tests/integration so that CI (CI=true) fails rather than skips when exabgp or bird is missing.
test_bgp_netns.py runs both for real."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from lbnat_lab.netns import REPO
from tests.integration.test_deploy_files import run, tool

SBIN_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"


def words_of(conf: str) -> list[list[str]]:
    return [line.strip().rstrip(";").split() for line in conf.splitlines() if line.strip()]


def test_exabgp_config_of_an_instance(tmp_path: Path) -> None:
    tool("exabgp", "exabgp")
    lbnat_bgp = tmp_path / "lbnat-bgp"  # exabgp --test wants the process to exist
    lbnat_bgp.write_text("#!/bin/sh\nexit 1\n")
    lbnat_bgp.chmod(0o755)
    argv = [
        "bash", str(REPO / "scripts/exabgp/exabgp-conf.sh"), "--name", "lb2",
        "--own", "198.18.1.12", "--router", "198.18.1.1", "--lbnat-bgp", str(lbnat_bgp),
        "--admin-socket", "/run/lbnat/lb2.sock", "--vip", "198.18.100.1",
    ]  # fmt: skip
    conf = run(argv, REPO, dict(os.environ, PATH=SBIN_PATH))
    words = words_of(conf)
    for expected in (
        ["neighbor", "198.18.1.1", "{"], ["router-id", "198.18.1.12"],
        ["local-address", "198.18.1.12"], ["local-as", "65001"], ["peer-as", "65000"],
        ["hold-time", "3"], ["encoder", "text"], ["processes", "[", "lbnat", "]"],
        ["run", str(lbnat_bgp), "--admin-socket", "/run/lbnat/lb2.sock", "--vip", "198.18.100.1"],
    ):  # fmt: skip
        assert expected in words, (expected, conf)
    assert re.search(r"@[A-Z_]+@", conf) is None


def test_exabgp_refuses_a_hold_time_under_3_s_and_so_does_the_generator() -> None:
    done = subprocess.run(
        ["bash", str(REPO / "scripts/exabgp/exabgp-conf.sh"), "--name", "lb1",
         "--own", "198.18.1.11", "--router", "198.18.1.1", "--hold-time", "2"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 2 and "--hold-time must be 0 or 3-65535" in done.stderr


def test_bird_config_of_the_router() -> None:
    tool("bird", "bird2")
    argv = [
        "bash", str(REPO / "scripts/bird/router-conf.sh"), "--router-id", "198.18.1.1",
        "--local", "198.18.1.1", "--instance", "lb1=198.18.1.11", "--instance", "lb2=198.18.1.12",
        "--instance", "lb3=198.18.1.13",
    ]  # fmt: skip
    conf = run(argv, REPO, dict(os.environ, PATH=SBIN_PATH))
    words = words_of(conf)
    for expected in (
        ["router", "id", "198.18.1.1"], ["merge", "paths", "yes", "limit", "16"],
        ["local", "198.18.1.1", "as", "65000"], ["hold", "time", "3"],
        ["keepalive", "time", "1"], ["graceful", "restart", "off"],
        ["import", "filter", "lbnat_vips"], ["export", "none"],
        ["if", "net", "~", "[", "198.18.100.0/24{32,32}", "]", "then", "accept"],
    ):  # fmt: skip
        assert expected in words, (expected, conf)
    for n in (1, 2, 3):
        assert ["protocol", "bgp", f"lb{n}", "from", "lbnat_instance", "{"] in words
        assert ["neighbor", f"198.18.1.1{n}", "as", "65001"] in words


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "give at least one --instance"),
        (["--instance", "lb1=198.18.1.1"], "has the router's own address"),
        (["--instance", "1lb=198.18.1.11"], "is not a plain name"),
        (["--instance", "lb1=198.18.1.11", "--keepalive-time", "3"], "below the hold time"),
    ],
)
def test_the_router_generator_refuses_mistakes(extra: list[str], message: str) -> None:
    done = subprocess.run(
        ["bash", str(REPO / "scripts/bird/router-conf.sh"), "--router-id", "198.18.1.1",
         "--local", "198.18.1.1", *extra],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 2 and message in done.stderr, done.stderr
