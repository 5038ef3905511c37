"""The deployment files that cannot run here are still checked by the tools that own them.

- vagrant/Vagrantfile: `vagrant validate --ignore-provider` (no hypervisor on these machines:
  it parses the file and checks every VM's settings, it boots nothing);
- scripts/compose/docker-compose.yml: `docker compose config` (or Debian's `docker-compose`),
  which validates it against the Compose schema without a Docker engine (the lab itself runs
  in `make lab-compose-check`, lbnat_lab/compose_check.py);
- scripts/*.sh: shellcheck, since the Vagrant VMs and the compose lab run them unattended.

The provisioning scripts themselves run for real in test_provision_netns.py. These tests live
under tests/integration so that CI (CI=true) fails rather than skips them when a tool is
missing: .ci/run installs vagrant, docker-compose and shellcheck.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from lbnat_lab.netns import REPO

VAGRANT_DIR = REPO / "vagrant"
COMPOSE_FILE = REPO / "scripts" / "compose" / "docker-compose.yml"


def tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"needs {name} (Debian package {package})")
    return path


def run(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 0, f"{argv}:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def test_vagrantfile_validates(tmp_path: Path) -> None:
    vagrant = tool("vagrant", "vagrant")
    # vagrant keeps state in VAGRANT_HOME and the project's .vagrant/: both go to tmp_path
    env = dict(
        os.environ,
        VAGRANT_HOME=str(tmp_path / "home"),
        VAGRANT_DOTFILE_PATH=str(tmp_path / "dot"),
        VAGRANT_CHECKPOINT_DISABLE="1",
    )
    out = run([vagrant, "validate", "--ignore-provider"], VAGRANT_DIR, env)
    assert "Vagrantfile validated successfully" in out, out


def test_compose_file_validates() -> None:
    if (docker := shutil.which("docker")) is not None and subprocess.run(
        [docker, "compose", "version"], capture_output=True, timeout=30
    ).returncode == 0:
        argv = [docker, "compose", "-f", str(COMPOSE_FILE), "config"]
    else:
        argv = [tool("docker-compose", "docker-compose"), "-f", str(COMPOSE_FILE), "config"]
    out = run(argv, REPO)
    # the resolved file: the LB holds NET_ADMIN and NET_RAW, the five hosts share one network
    for name in ("lb:", "b1:", "b2:", "b3:", "client:", "NET_ADMIN", "NET_RAW", "198.19.0.0/24"):
        assert name in out, name
    # the LB's NAT ports are reserved by the engine (per-netns sysctl), the same range the
    # config uses, without the `docker run`-only option the engine API rejects
    nat_ports = json.loads((REPO / "docs" / "config.example.json").read_text())["nat_ports"]
    assert f"net.ipv4.ip_local_reserved_ports: {nat_ports}" in out, out
    assert "systempaths" not in out
    # the web service: the LB's second VIP port, a web server on every backend
    assert "--web-vip-port" in out and out.count("--web-port") == 4, out


def test_one_dockerignore_for_both_builders() -> None:
    """The classic builder (docker-compose 1.29, docker build without BuildKit) reads only the
    context root's .dockerignore; a Dockerfile.dockerignore would be BuildKit's alone."""
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    for entry in (".git", "**/__pycache__", ".venv", "vagrant/.vagrant"):
        assert entry in ignored, entry
    assert not list(REPO.glob("**/Dockerfile.dockerignore"))


def test_shell_scripts_pass_shellcheck() -> None:
    shellcheck = tool("shellcheck", "shellcheck")
    scripts = sorted(str(p.relative_to(REPO)) for p in (REPO / "scripts").glob("*.sh"))
    assert "scripts/provision-lb.sh" in scripts
    keepalived = [f"scripts/keepalived/{name}" for name in ("keepalived-conf.sh", "lbnat-notify")]
    bgp = ["scripts/exabgp/exabgp-conf.sh", "scripts/bird/router-conf.sh"]
    run([shellcheck, "-x", *scripts, *keepalived, *bgp], REPO)


@pytest.mark.parametrize(
    ("name", "own", "peer", "priority"),
    [("lb1", "198.18.0.3", "198.18.0.4", 150), ("lb2", "198.18.0.4", "198.18.0.3", 100)],
)
def test_keepalived_config_for_the_pair(
    tmp_path: Path, name: str, own: str, peer: str, priority: int
) -> None:
    """scripts/keepalived/keepalived-conf.sh writes a config `keepalived -t` accepts (it runs
    it), for each node of the Vagrant pair: VRRP unicast to the peer, advert_int 1, nopreempt,
    lbnat-ha check tracked (init_fail, fall 2), the notify script, the VIP with the segment's
    prefix. (test_provision_netns.py runs keepalived from it in namespaces.)"""
    tool("keepalived", "keepalived")
    lbnat = tmp_path / "lbnat"  # keepalived -t wants the scripts to exist: lbnat-ha beside it
    for path in (lbnat, tmp_path / "lbnat-ha"):
        path.write_text("#!/bin/sh\nexit 1\n")
        path.chmod(0o755)
    argv = [
        "bash", str(REPO / "scripts" / "keepalived" / "keepalived-conf.sh"), "--name", name,
        "--own", own, "--peer", peer, "--vip", "198.18.0.2", "--priority", str(priority),
        "--lbnat", str(lbnat), "--admin-socket", "/run/lbnat/lbnat.sock",
    ]  # fmt: skip
    env = dict(os.environ, PATH=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    conf = run(argv, REPO, env)
    words = [line.split() for line in conf.splitlines() if line.strip()]
    for expected in (
        ["router_id", name], ["state", "BACKUP"], ["priority", str(priority)],
        ["advert_int", "1"], ["nopreempt"], ["unicast_src_ip", own], [peer],
        ["198.18.0.2/24", "dev", "eth0"], ["chk_lbnat"], ["interval", "1"], ["fall", "2"],
        ["rise", "1"], ["init_fail"], ["enable_script_security"], ["script_user", "root"],
    ):  # fmt: skip
        assert expected in words, (expected, conf)
    assert f'script "{lbnat}-ha check --admin-socket /run/lbnat/lbnat.sock"' in conf
    notify = REPO / "scripts" / "keepalived" / "lbnat-notify"
    assert f'notify "{notify} --lbnat {lbnat} --admin-socket /run/lbnat/lbnat.sock"' in conf
    assert re.search(r"@[A-Z_]+@", conf) is None  # no placeholder left
