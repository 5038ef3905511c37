"""lbnat.config: the JSON config file, its mistakes (one exact message each), its defaults, the
servers.json shape, the file-level errors, and the shipped example and schema."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lbnat import config as config_module
from lbnat.backends import Backend
from lbnat.config import (
    Config,
    ConfigError,
    ControlConfig,
    ServiceConfig,
    default_workers,
    load_config,
    parse_config,
)
from lbnat.eventlog import LEVELS
from lbnat.health import PROBE_KINDS, HealthPolicy, ProbeSettings
from lbnat.nat import Timeouts
from lbnat.scheduler import SCHEDULERS
from lbnat.service import Service

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
EXAMPLE = DOCS / "config.example.json"
SCHEMA = REPO / "lbnat" / "config.schema.json"  # package data: lbnat.config validates with it

B1 = {"ip": "198.18.0.21", "port": 9000}
B2 = {"ip": "198.18.0.22", "port": 9000}


def one(**service: Any) -> dict[str, Any]:
    """A config with one service made of these keys."""
    return {"services": [service]}


def health(**block: Any) -> dict[str, Any]:
    return one(health=block)


def control(**block: Any) -> dict[str, Any]:
    return {"control": {"listen": "127.0.0.1:7000", **block}}


def server(protocol: Any = "TCP", ip: Any = "198.18.0.21", port: Any = 9000) -> dict[str, Any]:
    return {"protocol": protocol, "ipAddress": ip, "port": port}


# --- mistakes: (config, the exact message) --------------------------------------------------

BAD: list[tuple[str, object, str]] = [
    ("top-level-array", [], "the top level must be a JSON object, not an array"),
    ("top-level-null", None, "the top level must be a JSON object, not null"),
    ("unknown-top-key", {"lb_ipp": "198.18.0.2"}, 'lb_ipp: unknown key (did you mean "lb_ip"?)'),
    (
        "unknown-service-key",
        one(helth={}),
        'services[0].helth: unknown key (did you mean "health"?)',
    ),
    (
        "unknown-key-case",
        one(Port=20000),
        'services[0].Port: unknown key (did you mean "port"?)',
    ),
    (
        "unknown-key-no-suggestion",
        {"services": [{"backends": [{"ip": "198.18.0.21", "port": 9000, "zzz": 1}]}]},
        'services[0].backends[0].zzz: unknown key (known keys: "ip", "port", "weight", "name")',
    ),
    (
        "unknown-key-not-identifier",
        {"log": {"my format": "text"}},
        'log["my format"]: unknown key (did you mean "format"?)',
    ),
    ("port-string", one(port="9000"), 'services[0].port: "9000" is not an integer'),
    ("port-bool", one(port=True), "services[0].port: true is not an integer"),
    ("port-float", one(port=20000.0), "services[0].port: 20000.0 is not an integer"),
    ("port-zero", one(port=0), "services[0].port: 0 is not a valid port"),
    (
        "backend-port-range",
        {"services": [{}, {"port": 20001, "backends": [{"ip": "198.18.0.21", "port": 70000}]}]},
        "services[1].backends[0].port: 70000 is not a valid port",
    ),
    (
        "backend-ip",
        one(backends=[{"ip": "198.18.0.300", "port": 9000}]),
        'services[0].backends[0].ip: "198.18.0.300" is not an IPv4 address',
    ),
    (
        "backend-ip-ipv6-loopback",
        one(backends=[{"ip": "::1", "port": 9000}]),
        "services[0].backends[0].ip: ::1 is not a backend address (loopback)",
    ),
    (
        "backend-ip-ipv6-link-local",
        one(backends=[{"ip": "fe80::1", "port": 9000}]),
        "services[0].backends[0].ip: fe80::1 is not a backend address (link-local)",
    ),
    (
        "backend-ip-ipv6-mapped",
        one(backends=[{"ip": "::ffff:198.18.0.1", "port": 9000}]),
        "services[0].backends[0].ip: ::ffff:c612:1 is not a backend address (IPv4-mapped: give "
        "the IPv4 address)",
    ),
    (
        "backend-ip-ipv6-multicast",
        one(backends=[{"ip": "ff02::1", "port": 9000}]),
        "services[0].backends[0].ip: ff02::1 is not a backend address (multicast)",
    ),
    (
        "backend-ip-ipv6-garbage",
        one(backends=[{"ip": "2001:db8::zz", "port": 9000}]),
        'services[0].backends[0].ip: "2001:db8::zz" is not an IPv6 address',
    ),
    (
        "backend-ip-not-an-address",
        one(backends=[{"ip": "backend1", "port": 9000}]),
        'services[0].backends[0].ip: "backend1" is not an IPv4 address',
    ),
    (
        "backend-families-mixed",
        one(backends=[{"ip": "198.18.0.21", "port": 9000}, {"ip": "2001:db8::21", "port": 9000}]),
        'services[0].backends: service "tcp:20000" mixes IPv4 and IPv6 backends '
        "(198.18.0.21:9000 and [2001:db8::21]:9000): a service's backends are all of one family",
    ),
    (
        "backend-ipv6-twice",
        one(backends=[{"ip": "2001:db8::21", "port": 90}, {"ip": "2001:DB8::0:21", "port": 90}]),
        "services[0].backends[1]: backend [2001:db8::21]:90 is listed twice "
        "(also services[0].backends[0])",
    ),
    (
        "backend-ip-unspecified",
        one(backends=[{"ip": "0.0.0.0", "port": 9000}]),
        "services[0].backends[0].ip: 0.0.0.0 is not a host address",
    ),
    (
        "backend-ip-number",
        one(backends=[{"ip": 3323068437, "port": 9000}]),
        "services[0].backends[0].ip: 3323068437 is not a string",
    ),
    (
        "backend-missing-port",
        one(backends=[{"ip": "198.18.0.21"}]),
        'services[0].backends[0]: missing the required key "port"',
    ),
    (
        "backend-not-object",
        one(backends=["198.18.0.21:9000"]),
        'services[0].backends[0]: "198.18.0.21:9000" is not an object',
    ),
    (
        "weight-bool",
        one(backends=[{**B1, "weight": True}]),
        "services[0].backends[0].weight: true is not an integer",
    ),
    (
        "weight-negative",
        one(backends=[{**B1, "weight": -1}]),
        "services[0].backends[0].weight: -1 must be at least 0",
    ),
    (
        "weight-float",
        one(backends=[{**B1, "weight": 1.5}]),
        "services[0].backends[0].weight: 1.5 is not an integer",
    ),
    (
        "backend-twice",
        one(backends=[B1, B2, {"ip": "198.18.0.21", "port": 9000, "name": "again"}]),
        "services[0].backends[2]: backend 198.18.0.21:9000 is listed twice"
        " (also services[0].backends[0])",
    ),
    (
        "backend-name-twice",
        one(backends=[{**B1, "name": "b1"}, {**B2, "name": "b1"}]),
        'services[0].backends[1].name: "b1" is already the name of services[0].backends[0]',
    ),
    (
        "backend-name-space",
        one(backends=[{**B1, "name": "web one"}]),
        'services[0].backends[0].name: "web one" must not contain spaces or control characters',
    ),
    (
        "scheduler",
        one(scheduler="wr"),
        'services[0].scheduler: "wr" is not one of "rr", "wrr", "lc", "maglev"'
        ' (did you mean "wrr"?)',
    ),
    ("protocol", one(protocol="sctp"), 'services[0].protocol: "sctp" is not "tcp" or "udp"'),
    ("protocol-type", one(protocol=6), "services[0].protocol: 6 is not a string"),
    ("on-dead", one(on_dead="drop"), 'services[0].on_dead: "drop" is not "keep" or "reset"'),
    ("affinity-negative", one(affinity=-1), "services[0].affinity: -1 must be at least 0"),
    ("name-empty", one(name=""), "services[0].name: must not be empty"),
    (
        "name-twice",
        {"services": [{"name": "chat"}, {"name": "chat", "port": 20001}]},
        'services[1].name: "chat" is already the name of services[0]',
    ),
    (
        "listener-twice",
        {"services": [{"name": "a"}, {"name": "b", "protocol": "TCP"}]},
        "services[1].port: tcp port 20000 is already used by services[0]",
    ),
    (
        "port-in-nat-range",
        one(port=62000),
        "services[0].port: 62000 is inside nat_ports 61000-65535",
    ),
    (
        "default-port-in-nat-range",
        {"nat_ports": "20000-30000", "services": [{}]},
        "services[0].port: 20000 is inside nat_ports 20000-30000",
    ),
    ("services-object", {"services": {}}, "services: {} is not an array"),
    ("service-string", {"services": ["chat"]}, 'services[0]: "chat" is not an object'),
    (
        "check-unknown",
        health(check="icmp"),
        'services[0].health.check: "icmp" is not one of "syn", "tcp", "hello", "udp", "http"',
    ),
    (
        "check-syn-on-udp",
        one(protocol="udp", health={"check": "syn"}),
        "services[0].health.check: a syn health check cannot probe a udp service",
    ),
    (
        "check-udp-on-tcp",
        health(check="udp"),
        "services[0].health.check: a udp health check cannot probe a tcp service",
    ),
    (
        "expect-regex",
        health(check="hello", expect="(ok"),
        'services[0].health.expect: "(ok" is not a valid regular expression:'
        " missing ), unterminated subpattern at position 0",
    ),
    ("interval-zero", health(interval=0), "services[0].health.interval: 0 must be positive"),
    ("timeout-string", health(timeout="2"), 'services[0].health.timeout: "2" is not a number'),
    ("fall-zero", health(fall=0), "services[0].health.fall: 0 must be at least 1"),
    ("rise-float", health(rise=1.0), "services[0].health.rise: 1.0 is not an integer"),
    (
        "http-status",
        health(check="http", http_status=600),
        "services[0].health.http_status: 600 must be at most 599",
    ),
    (
        "http-path",
        health(check="http", http_path="index.html"),
        'services[0].health.http_path: "index.html" must start with /',
    ),
    ("enabled", health(enabled="no"), 'services[0].health.enabled: "no" is not true or false'),
    ("health-null", one(health=None), "services[0].health: null is not an object"),
    ("lb-ip", {"lb_ip": "198.18.0"}, 'lb_ip: "198.18.0" is not an IPv4 address'),
    ("lb-ip-multicast", {"lb_ip": "224.0.0.1"}, "lb_ip: 224.0.0.1 is not a host address"),
    ("interface", {"interface": "eth0/1"}, 'interface: "eth0/1" is not an interface name'),
    (
        "nat-ports-reversed",
        {"nat_ports": "65535-61000"},
        "nat_ports: 65535-61000 is empty (its first port is above its last)",
    ),
    (
        "nat-ports-word",
        {"nat_ports": "61000"},
        'nat_ports: "61000" is not a port range like "61000-65535"',
    ),
    (
        "nat-ports-short-list",
        {"nat_ports": [61000]},
        "nat_ports: [61000] is not a port range like [61000, 65535]",
    ),
    ("nat-ports-list-zero", {"nat_ports": [0, 10]}, "nat_ports[0]: 0 is not a valid port"),
    ("nat-ports-high", {"nat_ports": "1-70000"}, "nat_ports: 70000 is not a valid port"),
    (
        "nat-ports-number",
        {"nat_ports": 61000},
        'nat_ports: 61000 is not a port range like "61000-65535" or [61000, 65535]',
    ),
    ("table-cap", {"table_cap": 0}, "table_cap: 0 must be at least 1"),
    ("syn-proxy-null", {"syn_proxy": None}, "syn_proxy: null is not an object"),
    (
        "syn-proxy-mode",
        {"syn_proxy": {"mode": "always"}},
        'syn_proxy.mode: "always" is not one of "auto", "on", "off"',
    ),
    (
        "syn-proxy-typo",
        {"syn_proxy": {"mod": "on"}},
        'syn_proxy.mod: unknown key (did you mean "mode"?)',
    ),
    (
        "syn-proxy-threshold",
        {"syn_proxy": {"threshold": 0}},
        "syn_proxy.threshold: 0 must be at least 1",
    ),
    ("syn-proxy-mss", {"syn_proxy": {"mss": 100}}, "syn_proxy.mss: 100 must be at least 536"),
    (
        "timeouts-typo",
        {"timeouts": {"establised": 900}},
        'timeouts.establised: unknown key (did you mean "established"?)',
    ),
    ("timeouts-zero", {"timeouts": {"udp": 0}}, "timeouts.udp: 0 must be positive"),
    (
        "timeouts-negative",
        {"timeouts": {"time_wait": -1}},
        "timeouts.time_wait: -1 must be at least 0",
    ),
    (
        "timeouts-nan",
        {"timeouts": {"established": float("nan")}},
        "timeouts.established: NaN is not a finite number",
    ),
    ("log-format", {"log": {"format": "xml"}}, 'log.format: "xml" is not "text" or "json"'),
    ("log-quiet", {"log": {"quiet": "yes"}}, 'log.quiet: "yes" is not true or false'),
    (
        "log-level",
        {"log": {"level": "warn"}},
        'log.level: "warn" is not one of "info", "notice", "warning", "error" (did you mean '
        '"warning"?)',
    ),
    ("admin-socket-empty", {"admin_socket": ""}, "admin_socket: must not be empty"),
    ("drain-timeout", {"drain_timeout": "300"}, 'drain_timeout: "300" is not a number'),
    (
        "control-no-listen",
        {"control": {"secret": "s3cret"}},
        'control: missing the required key "listen"',
    ),
    (
        "control-listen-name",
        {"control": {"listen": "localhost:7000"}},
        'control.listen: "localhost" is not an IPv4 address',
    ),
    (
        "control-listen-no-port",
        {"control": {"listen": "127.0.0.1"}},
        'control.listen: "127.0.0.1" is not HOST:PORT like "127.0.0.1:7000" or "[::1]:7000"',
    ),
    (
        "control-listen-port",
        {"control": {"listen": "127.0.0.1:70000"}},
        "control.listen: 70000 is not a valid port",
    ),
    (
        "control-listen-in-nat-range",
        {"control": {"listen": "0.0.0.0:62000"}},
        "control.listen: port 62000 is inside nat_ports 61000-65535",
    ),
    (
        "control-listen-on-service",
        {"control": {"listen": "0.0.0.0:20000"}, "services": [{"name": "chat"}]},
        'control.listen: port 20000 is also the port of service "chat"',
    ),
    (
        "metrics-listen-name",
        {"metrics": {"listen": "localhost:9120"}},
        'metrics.listen: "localhost" is not an IPv4 address',
    ),
    (
        "metrics-no-listen",
        {"metrics": {}},
        'metrics: missing the required key "listen"',
    ),
    (
        "metrics-listen-in-nat-range",
        {"metrics": {"listen": "127.0.0.1:62000"}},
        "metrics.listen: port 62000 is inside nat_ports 61000-65535",
    ),
    (
        "metrics-listen-on-service",
        {"metrics": {"listen": "0.0.0.0:20000"}, "services": [{"name": "chat"}]},
        'metrics.listen: port 20000 is also the port of service "chat"',
    ),
    (
        "control-both-secrets",
        control(secret="s3cret", secret_file="/etc/lbnat/secret"),
        'control.secret_file: give "secret" or "secret_file", not both',
    ),
    (
        "control-secret-file-missing",
        control(secret_file="/nonexistent/lbnat/secret"),
        'control.secret_file: cannot read "/nonexistent/lbnat/secret": No such file or directory',
    ),
    ("control-secret-empty", control(secret=""), "control.secret: must not be empty"),
    (
        "control-allow-host-bits",
        control(allow=["198.18.0.1/24"]),
        'control.allow[0]: "198.18.0.1/24" has host bits set (did you mean "198.18.0.0/24"?)',
    ),
    (
        "control-allow-garbage",
        control(allow=["198.18.0.0/24", "lan"]),
        'control.allow[1]: "lan" is not a network like "198.18.0.0/24" or "2001:db8::/64"',
    ),
    (
        "control-allow-string",
        control(allow="198.18.0.0/24"),
        ('control.allow: "198.18.0.0/24" is not an array'),
    ),
    ("control-window", control(window=0), "control.window: 0 must be positive"),
    (
        "servers-ip",
        {"servers": [server(), server(ip="198.18.0.22"), server(ip="198.18.0.256")]},
        'servers[2].ipAddress: "198.18.0.256" is not an IPv4 address',
    ),
    (
        "servers-ipv6-mixed",
        {"servers": [server(), server(ip="2001:db8::22")]},
        "servers[1].ipAddress: 2001:db8::22 is not of the family of the TCP servers before it "
        "(198.18.0.21): one protocol's servers form one service, whose backends are all IPv4 "
        "or all IPv6",
    ),
    (
        "servers-ipv6-bad",
        {"servers": [server(ip="fe80::22")]},
        "servers[0].ipAddress: fe80::22 is not a backend address (link-local)",
    ),
    (
        "control-listen-ipv6-service-port",
        {**one(port=7000), "ip6": "2001:db8::2", "control": {"listen": "[2001:db8::2]:7000"}},
        'control.listen: port 7000 is also the port of service "tcp:7000"',
    ),
    (
        "metrics-listen-ipv6-any-service-port",
        {**one(port=9120), "metrics": {"listen": "[::]:9120"}},
        'metrics.listen: port 9120 is also the port of service "tcp:9120"',
    ),
    (
        "ip6-not-ipv6",
        {"ip6": "198.18.0.2"},
        'ip6: "198.18.0.2" is not an IPv6 address',
    ),
    (
        "servers-protocol",
        {"servers": [server(protocol="SCTP")]},
        'servers[0].protocol: "SCTP" is not "TCP" or "UDP"',
    ),
    (
        "servers-port",
        {"servers": [server(port="9000")]},
        'servers[0].port: "9000" is not an integer',
    ),
    (
        "servers-missing",
        {"servers": [{"protocol": "TCP", "port": 9000}]},
        'servers[0]: missing the required key "ipAddress"',
    ),
    (
        "servers-key-case",
        {"servers": [{"protocol": "TCP", "ipaddress": "198.18.0.21", "port": 9000}]},
        'servers[0].ipaddress: unknown key (did you mean "ipAddress"?)',
    ),
    (
        "servers-twice",
        {"servers": [server(), server(protocol="UDP"), server(protocol="tcp")]},
        "servers[2]: TCP 198.18.0.21:9000 is listed twice (also servers[0])",
    ),
    ("servers-not-array", {"servers": {}}, "servers: {} is not an array"),
    (
        "servers-with-native-keys",
        {"lb_ip": "198.18.0.2", "servers": [server()]},
        'servers: unknown key (did you mean "services"?'
        ' A servers.json file has "servers" and no other key)',
    ),
]


@pytest.mark.parametrize(
    ("config", "message"), [(c, m) for _, c, m in BAD], ids=[i for i, *_ in BAD]
)
def test_bad_config(config: object, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(config)
    assert str(caught.value) == message


def test_the_table_is_long_enough_and_its_ids_unique() -> None:
    ids = [case_id for case_id, *_ in BAD]
    assert len(ids) >= 20
    assert len(set(ids)) == len(ids)


def test_config_error_parts() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(one(port=70000))
    error = caught.value
    assert isinstance(error, ValueError)
    assert (error.path, error.problem, error.file) == (
        "services[0].port",
        "70000 is not a valid port",
        None,
    )
    in_file = error.in_file("/etc/lbnat.json")
    assert str(in_file) == "/etc/lbnat.json: services[0].port: 70000 is not a valid port"
    assert str(pickle.loads(pickle.dumps(in_file))) == str(in_file)


def test_default_port_must_be_a_port() -> None:
    with pytest.raises(ValueError, match="default_port 0"):
        parse_config({}, default_port=0)


# --- good configs ----------------------------------------------------------------------------


def test_empty_config_is_all_defaults() -> None:
    config = parse_config({})
    assert config == Config(workers=default_workers())  # the file's default: one per core
    assert (config.io, config.rx_ring) == ("rings", "frames")
    assert config.lb_ip is None
    assert config.interface is None
    assert config.nat_ports == (61000, 65535)
    assert config.table_cap == 1_000_000
    assert config.timeouts == Timeouts()
    assert (config.log_format, config.quiet, config.log_transitions) == ("text", False, False)
    assert config.log_level == "info"
    assert config.control is None
    assert config.admin_socket == "/run/lbnat/lbnat.sock"
    assert config.drain_timeout == 300.0
    assert config.services == ()


def test_minimal_service_gets_defaults() -> None:
    (spec,) = parse_config({"services": [{}]}).services
    assert spec == ServiceConfig(
        service=Service("tcp:20000", "tcp", 20000, "rr", 0.0, ()),
        health=HealthPolicy(),
        probe=ProbeSettings(),
        on_dead="keep",
    )


def test_default_port_and_protocol_case() -> None:
    config = parse_config({"services": [{"protocol": "UDP", "backends": [B1]}]}, default_port=5353)
    (spec,) = config.services
    assert (spec.service.name, spec.service.proto, spec.service.port) == ("udp:5353", "udp", 5353)
    assert spec.service.backends == (Backend("198.18.0.21", 9000),)
    assert spec.probe.kind is None  # the protocol's default: udp


def test_full_config(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("  s3cret\n")
    data = {
        "lb_ip": "198.18.0.2",
        "interface": "eth0",
        "nat_ports": [50000, 59999],
        "table_cap": 5000,
        "timeouts": {"syn_sent": 30, "established": 600.5, "time_wait": 0, "udp_replied": 60},
        "log": {"format": "json", "quiet": True, "level": "warning", "transitions": True},
        "control": {
            "listen": "0.0.0.0:7000",
            "secret_file": str(secret),
            "allow": ["198.18.0.0/24", "10.1.2.3"],
            "window": 10,
        },
        "admin_socket": "/tmp/lbnat.sock",
        "drain_timeout": 0,
        "services": [
            {
                "name": "chat",
                "protocol": "tcp",
                "port": 20000,
                "scheduler": "wrr",
                "affinity": 60,
                "on_dead": "reset",
                "health": {
                    "enabled": True,
                    "check": "hello",
                    "interval": 1.5,
                    "timeout": 0.5,
                    "fall": 2,
                    "rise": 2,
                    "send": "ping",
                    "expect": "^pong",
                    "http_path": "/health",
                    "http_status": 204,
                },
                "backends": [
                    {"ip": "198.18.0.21", "port": 9000, "weight": 3, "name": "b1"},
                    {"ip": "198.18.0.22", "port": 9000, "weight": 0},
                ],
            },
            {
                "protocol": "udp",
                "port": 20000,  # the same port as chat, another protocol
                "health": {"enabled": False, "check": "udp"},
                "backends": [],
            },
        ],
    }
    config = parse_config(data)
    assert config.lb_ip == "198.18.0.2"
    assert config.interface == "eth0"
    assert config.nat_ports == (50000, 59999)
    assert config.table_cap == 5000
    assert config.timeouts == Timeouts(
        syn_sent=30.0, established=600.5, time_wait=0.0, udp_replied=60.0
    )
    assert (config.log_format, config.quiet, config.log_transitions) == ("json", True, True)
    assert config.log_level == "warning"
    assert config.control == ControlConfig(
        host="0.0.0.0",
        port=7000,
        secret=b"s3cret",
        allow=(ipaddress.IPv4Network("198.18.0.0/24"), ipaddress.IPv4Network("10.1.2.3/32")),
        window=10.0,
    )
    assert config.admin_socket == "/tmp/lbnat.sock"
    assert config.drain_timeout == 0.0
    chat, udp = config.services
    assert chat.service == Service(
        "chat",
        "tcp",
        20000,
        "wrr",
        60.0,
        (Backend("198.18.0.21", 9000, 3, "b1"), Backend("198.18.0.22", 9000, 0)),
    )
    assert chat.service.backends[1].name == "198.18.0.22:9000"
    assert chat.health == HealthPolicy(1.5, 0.5, 2, 2)
    assert chat.probe == ProbeSettings("hello", "ping", "^pong", "/health", 204)
    assert chat.on_dead == "reset"
    assert udp.service == Service("udp:20000", "udp", 20000)
    assert udp.health is None  # disabled, but its probe settings are still checked and kept
    assert udp.probe.kind == "udp"
    assert isinstance(config.drain_timeout, float)
    assert isinstance(config.timeouts.syn_sent, float)


def test_the_syn_proxy_block() -> None:
    config = parse_config({"syn_proxy": {"mode": "on", "threshold": 9, "mss": 1400}})
    assert (config.syn_proxy, config.syn_proxy_threshold, config.syn_proxy_mss) == ("on", 9, 1400)
    assert parse_config({}).syn_proxy == "auto"


def test_config_is_frozen() -> None:
    config = parse_config(one(backends=[B1]))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.table_cap = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.services[0].on_dead = "reset"  # type: ignore[misc]
    assert isinstance(config.services, tuple)


def test_nulls_mean_not_given_where_allowed() -> None:
    config = parse_config(
        {
            "lb_ip": None,
            "interface": None,
            "control": None,
            "services": [{"health": {"check": None, "expect": None}}],
        }
    )
    assert (config.lb_ip, config.interface, config.control) == (None, None, None)
    assert config.services[0].probe == ProbeSettings()
    control_config = parse_config(control(secret=None, secret_file=None)).control
    assert control_config == ControlConfig("127.0.0.1", 7000)


def test_nat_ports_string_with_spaces_and_addresses_normalised() -> None:
    config = parse_config({"nat_ports": " 40000 - 40100 ", "services": [{"port": 40101}]})
    assert config.nat_ports == (40000, 40100)


def test_secret_is_utf8_and_read_file_is_injectable() -> None:
    assert parse_config(control(secret="sécret")).control == ControlConfig(
        "127.0.0.1", 7000, "sécret".encode()
    )
    asked: list[str] = []

    def read(path: str) -> bytes:
        asked.append(path)
        return b"\n  from-a-file \n"

    config = parse_config(control(secret_file="secret"), read_file=read)
    assert config.control is not None and config.control.secret == b"from-a-file"
    assert asked == ["secret"]

    with pytest.raises(ConfigError, match=r'^control.secret_file: "secret" is empty$'):
        parse_config(control(secret_file="secret"), read_file=lambda path: b" \n")


def test_servers_json_shape() -> None:
    data = {
        "servers": [
            server("UDP", "198.18.0.21", 9053),
            server("TCP", "198.18.0.21", 9000),
            server("tcp", "198.18.0.22", 9000),
            server("TCP", "198.18.0.23", 9000),
            server("UDP", "198.18.0.21", 9000),  # TCP and UDP on one ip:port are two backends
        ]
    }
    config = parse_config(data, default_port=20000)
    assert config == Config(
        workers=default_workers(),
        services=(
            ServiceConfig(
                Service(
                    "tcp",
                    "tcp",
                    20000,
                    backends=(
                        Backend("198.18.0.21", 9000),
                        Backend("198.18.0.22", 9000),
                        Backend("198.18.0.23", 9000),
                    ),
                )
            ),
            ServiceConfig(
                Service(
                    "udp",
                    "udp",
                    20000,
                    backends=(Backend("198.18.0.21", 9053), Backend("198.18.0.21", 9000)),
                )
            ),
        ),
    )
    (udp_only,) = parse_config({"servers": [server("UDP")]}, default_port=30000).services
    assert (udp_only.service.name, udp_only.service.port) == ("udp", 30000)
    assert udp_only.health == HealthPolicy()
    assert udp_only.probe == ProbeSettings()
    assert udp_only.on_dead == "keep"
    assert parse_config({"servers": []}) == Config(workers=default_workers())


# --- files -----------------------------------------------------------------------------------


def test_load_config_json_syntax_error(tmp_path: Path) -> None:
    path = tmp_path / "lbnat.json"
    path.write_text('{\n  "lb_ip": "198.18.0.2",\n  "services": [}\n}\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: line 3, column 16: invalid JSON: Expecting value"
    assert caught.value.file == str(path)


def test_load_config_names_the_file_in_every_error(tmp_path: Path) -> None:
    path = tmp_path / "lbnat.json"
    path.write_text(json.dumps(one(helth={})))
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert str(caught.value) == (f'{path}: services[0].helth: unknown key (did you mean "health"?)')


def test_load_config_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "missing.json"
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: cannot read the file: No such file or directory"
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path)
    assert str(caught.value) == f"{tmp_path}: cannot read the file: Is a directory"


def test_load_config_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "lbnat.json"
    path.write_bytes(b'{"interface": "\xff"}')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: not UTF-8 text (byte 15)"


def test_load_config_key_given_twice(tmp_path: Path) -> None:
    path = tmp_path / "lbnat.json"
    path.write_text('{"services": [{"port": 20000, "backends": [], "port": 20001}]}')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: services[0].port: is given more than once"


def test_load_config_nan_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "lbnat.json"
    path.write_text('{"timeouts": {"udp": Infinity}}')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: timeouts.udp: Infinity is not a finite number"
    path.write_bytes('{"lb_ip": "198.18.0.2"}'.encode("utf-8-sig"))
    assert load_config(path).lb_ip == "198.18.0.2"


def test_load_config_secret_file_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "secret").write_bytes(b"abc\n")
    path = tmp_path / "etc" / "lbnat.json"
    path.write_text(json.dumps(control(secret_file="secret")))
    config = load_config(path)
    assert config.control is not None and config.control.secret == b"abc"


def test_load_config_servers_json_file(tmp_path: Path) -> None:
    path = tmp_path / "servers.json"
    path.write_text(json.dumps({"servers": [server(), server(ip="198.18.0.22")]}))
    (spec,) = load_config(path, default_port=20001).services
    assert spec.service.port == 20001
    assert [b.ip for b in spec.service.backends] == ["198.18.0.21", "198.18.0.22"]


# --- the shipped example and schema ----------------------------------------------------------


def test_example_loads() -> None:
    config = load_config(EXAMPLE)
    assert config.lb_ip == "198.18.0.2"
    assert config.control is not None and config.control.port == 7000
    chat, udp = config.services
    assert (chat.service.name, chat.service.proto, chat.service.port) == ("chat", "tcp", 20000)
    assert (udp.service.proto, udp.service.port) == ("udp", 20053)
    assert len(chat.service.backends) == len(udp.service.backends) == 3


def _schema_validator() -> Any:
    jsonschema = pytest.importorskip(
        "jsonschema", reason="jsonschema is not installed: the schema cannot be checked"
    )
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


def test_example_validates_against_the_schema() -> None:
    validator = _schema_validator()
    validator.validate(json.loads(EXAMPLE.read_text()))
    assert not validator.is_valid(one(helth={}))
    assert not validator.is_valid(one(port="9000"))
    assert not validator.is_valid(one(backends=[{"ip": "198.18.0.21"}]))


def _properties(schema: dict[str, Any], node: dict[str, Any]) -> set[str]:
    if "$ref" in node:
        node = schema["$defs"][node["$ref"].rpartition("/")[2]]
    for choice in node.get("anyOf", []):
        if choice.get("type") == "object":
            node = choice
    return set(node["properties"])


def test_the_schema_names_the_same_keys_as_the_parser() -> None:
    schema = json.loads(SCHEMA.read_text())
    top = schema["properties"]
    service = schema["$defs"]["service"]
    assert set(top) == set(config_module.TOP_KEYS)
    assert _properties(schema, top["timeouts"]) == set(config_module.TIMEOUT_KEYS)
    assert _properties(schema, top["log"]) == set(config_module.LOG_KEYS)
    assert _properties(schema, top["control"]) == set(config_module.CONTROL_KEYS)
    assert _properties(schema, top["metrics"]) == set(config_module.METRICS_KEYS)
    assert set(service["properties"]) == set(config_module.SERVICE_KEYS)
    assert _properties(schema, service["properties"]["health"]) == set(config_module.HEALTH_KEYS)
    assert set(schema["$defs"]["backend"]["properties"]) == set(config_module.BACKEND_KEYS)


def test_every_schema_property_is_described() -> None:
    schema = json.loads(SCHEMA.read_text())
    missing: list[str] = []

    def walk(node: object, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.get("properties", {}).items():
                if "description" not in value:
                    missing.append(f"{path}.{key}")
            for key, value in node.items():
                walk(value, f"{path}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]")

    walk(schema, "")
    assert missing == []


def test_the_schema_is_read_from_the_package() -> None:
    assert config_module.schema() == json.loads(SCHEMA.read_text())


def test_the_schema_lists_the_same_choices_as_the_code() -> None:
    schema = json.loads(SCHEMA.read_text())
    service = schema["$defs"]["service"]["properties"]
    health_check = schema["$defs"]["health"]["properties"]["check"]["enum"]
    dataplane = schema["properties"]["dataplane"]["properties"]
    assert tuple(service["scheduler"]["enum"]) == tuple(SCHEDULERS)
    assert tuple(service["on_dead"]["enum"]) == config_module.ON_DEAD
    assert tuple(kind for kind in health_check if kind is not None) == PROBE_KINDS
    assert tuple(schema["properties"]["log"]["properties"]["format"]["enum"]) == (
        config_module.LOG_FORMATS
    )
    assert tuple(schema["properties"]["log"]["properties"]["level"]["enum"]) == (
        config_module.LOG_LEVELS
    )
    assert tuple(LEVELS) == config_module.LOG_LEVELS  # the words the Log knows
    assert tuple(dataplane["io"]["enum"]) == config_module.IO_KINDS
    assert tuple(dataplane["rx_ring"]["enum"]) == config_module.RX_RINGS
    assert dataplane["workers"]["oneOf"][0]["maximum"] == config_module.MAX_WORKERS


def test_config_imports_nothing_from_the_data_plane_or_the_health_checker() -> None:
    code = (
        "import sys, lbnat.config\n"
        "bad = [m for m in sys.modules if m.startswith(('lbnat.dataplane', 'lbnat.health.'))"
        " or m == 'lbnat.health']\n"
        "print(' '.join(bad))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert result.stdout.split() == []


def test_an_empty_backend_name_means_the_default() -> None:
    (spec,) = parse_config(one(backends=[{**B1, "name": ""}])).services
    assert spec.service.backends[0].name == "198.18.0.21:9000"


def test_deeply_nested_values_are_an_error_not_a_crash() -> None:
    deep: list[object] = []
    inner = deep
    for _ in range(50_000):
        inner.append([])
        inner = inner[0]  # type: ignore[assignment]
    with pytest.raises(ConfigError, match=r"^nested too deeply$"):
        parse_config({"services": deep})


def test_ipv6_backends_listeners_and_allow_list_in_the_native_file() -> None:
    config = parse_config(
        {
            "lb_ip": "198.18.0.2",
            "ip6": "2001:DB8::2",
            "control": {"listen": "[::]:7000", "allow": ["2001:db8::/64", "198.18.0.0/24"]},
            "metrics": {"listen": "[2001:db8::2]:9120"},
            "services": [
                {"name": "v6", "backends": [{"ip": "2001:db8:0:0::21", "port": 80}]},
                {"name": "v4", "port": 8080, "backends": [{"ip": "198.18.0.21", "port": 80}]},
            ],
        }
    )
    assert config.ip6 == "2001:db8::2"
    assert config.services[0].service.backends[0].ip == "2001:db8::21"
    assert config.control is not None and config.control.host == "::"
    assert [str(n) for n in config.control.allow] == ["2001:db8::/64", "198.18.0.0/24"]
    assert config.metrics == ("2001:db8::2", 9120)


def test_ipv6_servers_json() -> None:
    config = parse_config({"servers": [server(ip="2001:db8::21"), server(ip="2001:db8::22")]})
    assert [b.ip for b in config.services[0].service.backends] == ["2001:db8::21", "2001:db8::22"]
