"""lbnat.config.build_config: `lbnat run`'s options merged into the config file, or the whole
config made from them, and checked in one place."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
from pathlib import Path
from typing import Any

import pytest

from lbnat.backends import Backend
from lbnat.config import (
    Config,
    ConfigError,
    ControlConfig,
    Overrides,
    ServiceConfig,
    build_config,
    default_workers,
)
from lbnat.health import HealthPolicy, ProbeSettings
from lbnat.nat import Timeouts
from lbnat.service import Service

WORDS = ("198.18.0.2", "198.18.0.21", "9000", "198.18.0.22", "9000")
FILE = {
    "lb_ip": "198.18.0.2",
    "services": [
        {"name": "chat", "port": 20000, "backends": [{"ip": "198.18.0.21", "port": 9000}]},
        {"name": "dns", "protocol": "udp", "port": 20053, "health": {"check": "udp"}},
    ],
}


def config_file(tmp_path: Path, data: object = FILE, name: str = "lbnat.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def given(**options: Any) -> Overrides:
    """The command line WORDS with these options."""
    return Overrides(**{"words": WORDS, **options})


def refused(overrides: Overrides) -> str:
    with pytest.raises(ConfigError) as caught:
        build_config(overrides)
    return str(caught.value)


def test_the_command_line_alone_is_the_originals_defaults() -> None:
    config = build_config(Overrides(words=WORDS, workers="1"))
    backends = (Backend("198.18.0.21", 9000), Backend("198.18.0.22", 9000))
    assert config == Config(
        lb_ip="198.18.0.2",
        services=(
            ServiceConfig(
                Service("tcp:20000", "tcp", 20000, backends=backends),
                HealthPolicy(),
                ProbeSettings(),
                "keep",
            ),
        ),
        workers=1,
    )
    assert build_config(Overrides(words=WORDS)).workers == default_workers()


def test_every_option_reaches_the_config_without_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text(" s3cret\n")
    config = build_config(
        Overrides(
            words=WORDS,
            vip_port="30000",
            proto="udp",
            interface="eth1",
            scheduler="maglev",
            nat_ports="50000-50999",
            table_cap=10,
            affinity=5.0,
            no_health=True,
            on_dead="reset",
            time_wait=1.0,
            udp_timeout=2.0,
            udp_replied_timeout=3.0,
            drain_timeout=4.0,
            control_listen="198.18.0.2",
            secret_file=str(secret),
            allow=("198.18.0.1/24",),
            admin_socket="",
            workers="2",
            io="socket",
            rx_ring="blocks",
            quiet=True,
            log_format="json",
            log_level="error",
            log_transitions=True,
        )
    )
    (spec,) = config.services
    assert spec.service == Service(
        "udp:30000",
        "udp",
        30000,
        "maglev",
        5.0,
        (Backend("198.18.0.21", 9000), Backend("198.18.0.22", 9000)),
    )
    assert (spec.health, spec.on_dead) == (None, "reset")
    assert config.control == ControlConfig(
        "198.18.0.2", 7000, b"s3cret", (ipaddress.IPv4Network("198.18.0.0/24"),), 30.0
    )
    assert config.timeouts == Timeouts(time_wait=1.0, udp=2.0, udp_replied=3.0)
    assert (config.interface, config.nat_ports, config.table_cap) == ("eth1", (50000, 50999), 10)
    assert (config.drain_timeout, config.admin_socket, config.workers) == (4.0, "", 2)
    assert (config.io, config.rx_ring, config.quiet) == ("socket", "blocks", True)
    assert (config.log_format, config.log_transitions, config.log_level) == ("json", True, "error")


def test_backends_join_the_files_service_and_only_given_options_override(tmp_path: Path) -> None:
    overrides = Overrides(
        words=("198.18.0.22", "9000"),
        config_file=config_file(tmp_path),
        scheduler="lc",
        quiet=True,  # not given: the file's (default) setting stays
        log_level="error",  # not given either
        fall=5,
        given=frozenset({"scheduler", "fall"}),
    )
    config = build_config(overrides)
    chat, dns = config.services
    assert chat.service.backends == (Backend("198.18.0.21", 9000), Backend("198.18.0.22", 9000))
    assert chat.service.scheduler == "lc"
    assert chat.health == HealthPolicy(fall=5)
    assert dns.service.backends == ()
    assert (config.quiet, config.log_level) == (False, "info")
    assert config.lb_ip == "198.18.0.2"


def test_syn_proxy_options_override_the_file_only_when_given(tmp_path: Path) -> None:
    data = {**FILE, "syn_proxy": {"mode": "off", "threshold": 7}}
    path = config_file(tmp_path, data)
    config = build_config(
        Overrides(config_file=path, syn_proxy="on", given=frozenset({"syn_proxy"}))
    )
    assert (config.syn_proxy, config.syn_proxy_threshold) == ("on", 7)
    config = build_config(Overrides(config_file=path))
    assert (config.syn_proxy, config.syn_proxy_threshold) == ("off", 7)
    alone = build_config(given(syn_proxy_threshold=50))
    assert (alone.syn_proxy, alone.syn_proxy_threshold) == ("auto", 50)


def test_srcip_first_and_a_new_service_from_the_command_line(tmp_path: Path) -> None:
    overrides = Overrides(
        words=("198.18.0.3", "198.18.0.23", "9000"),
        config_file=config_file(tmp_path),
        vip_port="20001",
    )
    config = build_config(overrides)
    assert config.lb_ip == "198.18.0.3"
    assert [s.service.name for s in config.services] == ["chat", "dns", "tcp:20001"]
    # the file's services that name no port take --port
    (only,) = build_config(
        Overrides(
            config_file=config_file(tmp_path, {"lb_ip": "198.18.0.2", "services": [{}]}),
            vip_port="20002",
        )
    ).services
    assert only.service.port == 20002


def test_the_secret_file_is_read_once_through_read_file() -> None:
    asked: list[str] = []

    def read(path: str) -> bytes:
        asked.append(path)
        return b"abc\n"

    overrides = Overrides(words=WORDS, control_listen="127.0.0.1:7001", secret_file="/s")
    config = build_config(overrides, read_file=read)
    assert config.control is not None and config.control.secret == b"abc"
    assert asked == ["/s"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (Overrides(), "give SRCIP and at least one backend: SRCIP IP PORT [IP PORT ...]"),
        (Overrides(words=("198.18.0.2",)), "give at least one backend: IP PORT [IP PORT ...]"),
        (given(words=WORDS[:2]), "backends come in IP PORT pairs; got an odd number of words (1)"),
        (given(words=("x", *WORDS[1:])), "SRCIP 'x' is not an IPv4 address"),
        (given(words=(*WORDS[:3], *WORDS[1:3])), "backend 198.18.0.21:9000 is given twice"),
        (given(vip_port="70000"), "virtual port 70000 is out of range (1-65535)"),
        (given(vip_port="62000"), "virtual port 62000 is inside the NAT port range 61000-65535"),
        (given(nat_ports="61000"), "NAT port range '61000' must look like 61000-65535"),
        (given(nat_ports="2-1"), "NAT port range '2-1' is empty"),
        (
            given(nat_ports="1000-1001", workers="3"),
            "nat_ports 1000-1001 is too small for 3 workers",
        ),
        (given(workers="65"), "--workers: 65 is not between 1 and 64"),
        (given(health_check="udp"), "a udp health check cannot probe a tcp service"),
        (given(control_listen="198.18.0.2:x"), "control address port 'x' is not a port number"),
        (given(control_listen="1.2.3.4", allow=("lan",)), "--allow: "),
        (given(control_listen="1.2.3.4", secret_file="/no/s"), "cannot read the secret file: No "),
        (Overrides(config_file="/no/lbnat.json"), "/no/lbnat.json: cannot read the file"),
    ],
)
def test_command_line_mistakes(overrides: Overrides, message: str) -> None:
    assert refused(overrides).startswith(message)


def test_mistakes_with_a_file(tmp_path: Path) -> None:
    path = config_file(tmp_path)
    assert refused(Overrides(words=("198.18.0.21", "9000"), config_file=path)) == (
        "services[chat].backends: 198.18.0.21:9000 is both in the config and on the command line"
    )
    no_srcip = config_file(tmp_path, {"services": [{}]}, "no-srcip.json")
    assert refused(Overrides(words=("198.18.0.21", "9000"), config_file=no_srcip)) == (
        "no SRCIP: give it first on the command line or as lb_ip in the config"
    )
    moved = Overrides(config_file=path, nat_ports="20000-30000", given=frozenset({"nat_ports"}))
    assert refused(moved) == "virtual port 20000 is inside the NAT port range 20000-30000"


def test_overrides_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Overrides().proto = "udp"  # type: ignore[misc]


def test_metrics_address_from_the_command_line_and_the_file(tmp_path: Path) -> None:
    assert build_config(Overrides(words=WORDS)).metrics is None
    assert build_config(Overrides(words=WORDS, metrics="127.0.0.1")).metrics == ("127.0.0.1", 9120)
    path = tmp_path / "lbnat.json"
    path.write_text(json.dumps({"lb_ip": "198.18.0.2", "metrics": {"listen": "0.0.0.0:9200"}}))
    assert build_config(Overrides(config_file=str(path))).metrics == ("0.0.0.0", 9200)
    given = Overrides(config_file=str(path), metrics="127.0.0.1:9300", given=frozenset({"metrics"}))
    assert build_config(given).metrics == ("127.0.0.1", 9300)


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("localhost:9120", "metrics address 'localhost' is not an IPv4 address"),
        ("127.0.0.1:99999", "metrics address port"),
        ("127.0.0.1:62000", "--metrics: port 62000 is inside nat_ports 61000-65535"),
    ],
)
def test_metrics_address_mistakes(address: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_config(Overrides(words=WORDS, metrics=address))


def test_state_file_from_the_command_line_and_the_file(tmp_path: Path) -> None:
    assert build_config(Overrides(words=WORDS)).state_file is None  # off by default
    cli = build_config(Overrides(words=WORDS, state_file="/run/lbnat/state.json"))
    assert cli.state_file == "/run/lbnat/state.json"
    path = config_file(tmp_path, {**FILE, "state_file": "/var/lib/lbnat/state.json"})
    assert build_config(Overrides(config_file=path)).state_file == "/var/lib/lbnat/state.json"
    given = Overrides(config_file=path, state_file="/tmp/s.json", given=frozenset({"state_file"}))
    assert build_config(given).state_file == "/tmp/s.json"


# --- IPv6 (issue 21) --------------------------------------------------------------------------

V6_WORDS = ("198.18.0.2", "2001:db8::21", "9000", "[2001:DB8::22]", "9000")


def test_ipv6_backends_on_the_command_line_plain_or_in_brackets() -> None:
    config = build_config(Overrides(words=V6_WORDS, ip6="2001:db8::2", workers="1"))
    backends = config.services[0].service.backends
    assert [(b.ip, b.port) for b in backends] == [("2001:db8::21", 9000), ("2001:db8::22", 9000)]
    assert config.ip6 == "2001:db8::2"


def test_the_command_lines_ip6_overrides_the_files(tmp_path: Path) -> None:
    path = config_file(tmp_path, {**FILE, "ip6": "2001:db8::2"})
    assert build_config(Overrides(config_file=path, workers="1")).ip6 == "2001:db8::2"
    config = build_config(Overrides(config_file=path, ip6="2001:db8::9", workers="1"))
    assert config.ip6 == "2001:db8::9"


def test_a_files_ipv6_backends_may_take_their_ip6_from_the_command_line(tmp_path: Path) -> None:
    data = {"lb_ip": "198.18.0.2", "services": [{"backends": [{"ip": "2001:db8::21", "port": 80}]}]}
    path = config_file(tmp_path, data)
    assert "give ip6 in the config or --ip6" in refused(Overrides(config_file=path))
    assert build_config(Overrides(config_file=path, ip6="2001:db8::2")).ip6 == "2001:db8::2"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            Overrides(words=V6_WORDS),
            'service "tcp:20000" has the IPv6 backend [2001:db8::21]:9000, which needs the LB\'s '
            "IPv6 address: give ip6 in the config or --ip6",
        ),
        (
            Overrides(words=(*WORDS, "2001:db8::23", "9000"), ip6="2001:db8::2"),
            'service "tcp:20000" mixes IPv4 and IPv6 backends (198.18.0.21:9000 and '
            "[2001:db8::23]:9000): a service's backends are all of one family",
        ),
        (
            Overrides(words=("198.18.0.2", "::1", "9000"), ip6="2001:db8::2"),
            "backend address ::1 is not a backend address (loopback)",
        ),
        (
            Overrides(words=("198.18.0.2", "2001:db8::zz", "9000"), ip6="2001:db8::2"),
            "backend address '2001:db8::zz' is not an IPv6 address",
        ),
        (
            Overrides(
                words=("198.18.0.2", "2001:db8::21", "9000", "[2001:db8::21]", "9000"),
                ip6="2001:db8::2",
            ),
            "backend [2001:db8::21]:9000 is given twice",
        ),
        (Overrides(words=WORDS, ip6="198.18.0.3"), '--ip6: "198.18.0.3" is not an IPv6 address'),
        (Overrides(words=WORDS, ip6="ff02::1"), "--ip6: ff02::1 is not a host address"),
        (
            Overrides(words=WORDS, metrics="[::]:20000"),
            '--metrics: port 20000 is also the port of service "tcp:20000"',
        ),
        (
            Overrides(words=WORDS, ip6="2001:db8::2", control_listen="[2001:db8::2]:20000"),
            '--control: port 20000 is also the port of service "tcp:20000"',
        ),
        (Overrides(words=WORDS, metrics="[::1"), "metrics address '[::1' is not [IPv6]:PORT"),
        (
            Overrides(words=WORDS, metrics="[::zz]:9"),
            "metrics address '::zz' is not an IPv6 address",
        ),
    ],
)
def test_ipv6_command_line_mistakes(overrides: Overrides, message: str) -> None:
    assert refused(overrides) == message


@pytest.mark.parametrize(
    ("address", "expected"),
    [("[::]:9120", ("::", 9120)), ("::1", ("::1", 9120)), ("[2001:db8::1]", ("2001:db8::1", 9120))],
)
def test_ipv6_listen_addresses_on_the_command_line(address: str, expected: object) -> None:
    assert build_config(Overrides(words=WORDS, metrics=address)).metrics == expected


def test_an_ipv6_allow_list_from_the_command_line() -> None:
    config = build_config(
        Overrides(words=WORDS, control_listen="[::]:7000", allow=("2001:db8::/64", "10.0.0.0/8"))
    )
    assert config.control is not None
    assert config.control.host == "::"
    assert config.control.allow == (
        ipaddress.ip_network("2001:db8::/64"),
        ipaddress.ip_network("10.0.0.0/8"),
    )
