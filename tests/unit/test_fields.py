"""lbnat.fields: the field checks the config and the control protocol share."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lbnat import fields
from lbnat.fields import FieldError


@pytest.mark.parametrize(
    ("check", "value", "expected"),
    [
        (fields.integer, 7, 7),
        (fields.port, 65535, 65535),
        (fields.weight, 0, 0),
        (fields.seconds, 1, 1.0),
        (fields.text, "", ""),
        (fields.word, "b1", "b1"),
        (fields.ipv4, "198.18.0.1", ipaddress.IPv4Address("198.18.0.1")),
        (fields.host_ipv4, "198.18.0.1", "198.18.0.1"),
        (fields.network, "198.18.0.0/24", ipaddress.IPv4Network("198.18.0.0/24")),
        (fields.network, "10.1.2.3", ipaddress.IPv4Network("10.1.2.3/32")),
        (fields.port_range, " 40000 - 40100 ", (40000, 40100)),
        (fields.host_port, "0.0.0.0:7000", ("0.0.0.0", 7000)),
        (fields.host_port, "[::]:7000", ("::", 7000)),
        (fields.host_port, "[2001:DB8::0:1]:9120", ("2001:db8::1", 9120)),
        (fields.network, "2001:db8::/64", ipaddress.IPv6Network("2001:db8::/64")),
        (fields.ip, "2001:db8::1", ipaddress.IPv6Address("2001:db8::1")),
        (fields.host_ip, "2001:DB8::1", "2001:db8::1"),
        (fields.host_ip, "198.18.0.1", "198.18.0.1"),
        (fields.backend_ip, "2001:db8:0::21", "2001:db8::21"),
        (fields.backend_ip, "198.18.0.21", "198.18.0.21"),
        (fields.interface, "eth0", "eth0"),
        (fields.socket_path, "/run/lbnat/lbnat.sock", "/run/lbnat/lbnat.sock"),
        (fields.pattern, "^OK", "^OK"),
        (fields.http_path, "/health", "/health"),
    ],
)
def test_good_values(check: Callable[[object], object], value: object, expected: object) -> None:
    assert check(value) == expected


@pytest.mark.parametrize(
    ("check", "value", "problem", "follows_value"),
    [
        (fields.integer, True, "is not an integer", True),
        (fields.integer, 1.0, "is not an integer", True),
        (fields.port, 0, "is not a valid port", True),
        (fields.port, 65536, "is not a valid port", True),
        (fields.weight, 65536, "is not a valid weight (0-65535)", True),
        (fields.weight, -1, "is not a valid weight (0-65535)", True),
        (fields.seconds, 0, "must be positive", True),
        (fields.seconds, float("inf"), "is not a finite number", True),
        (fields.seconds, 10**400, "is too large", True),
        (fields.seconds, "1", "is not a number", True),
        (fields.text, 5, "is not a string", True),
        (fields.text, "\ud800", "is not valid Unicode text", True),
        (fields.word, "", "must not be empty", False),
        (fields.word, "a\u0007b", "must not contain spaces or control characters", True),
        (fields.ipv4, "198.18.0", "is not an IPv4 address", True),
        (fields.host_ipv4, "224.0.0.1", "224.0.0.1 is not a host address", False),
        (fields.host_ipv4, "255.255.255.255", "255.255.255.255 is not a host address", False),
        (fields.network, "10.0.0.1/8", 'has host bits set (did you mean "10.0.0.0/8"?)', True),
        (fields.network, "lan", 'is not a network like "198.18.0.0/24" or "2001:db8::/64"', True),
        (
            fields.network,
            "2001:db8::1/64",
            'has host bits set (did you mean "2001:db8::/64"?)',
            True,
        ),
        (fields.ip, "2001:db8::zz", "is not an IPv4 or IPv6 address", True),
        (fields.host_ip, "ff02::1", "ff02::1 is not a host address", False),
        (fields.host_ip, "224.0.0.1", "224.0.0.1 is not a host address", False),
        (fields.backend_ip, "::1", "::1 is not a backend address (loopback)", False),
        (fields.backend_ip, "2001:db8::zz", "is not an IPv6 address", True),
        (
            fields.host_port,
            "::1:7000",
            '"::1" is an IPv6 address without brackets (write [HOST]:PORT)',
            False,
        ),
        (fields.host_port, "[::zz]:7000", '"[::zz]" is not an IPv6 address', False),
        (fields.port_range, "1-70000", "70000 is not a valid port", False),
        (fields.port_range, "2-1", "2-1 is empty (its first port is above its last)", False),
        (fields.port_range, "61000", 'is not a port range like "61000-65535"', True),
        (fields.host_port, "localhost:7000", '"localhost" is not an IPv4 address', False),
        (
            fields.host_port,
            "127.0.0.1",
            'is not HOST:PORT like "127.0.0.1:7000" or "[::1]:7000"',
            True,
        ),
        (fields.interface, "a" * 16, "is not an interface name", True),
        (fields.socket_path, "/x\0", "must not contain a NUL character", False),
        (
            fields.socket_path,
            "/" * 108,
            "is longer than a Unix socket path may be (107 bytes)",
            False,
        ),
        (fields.http_path, "/a b", "must not contain spaces or control characters", True),
        (fields.http_path, "a", "must start with /", True),
    ],
)
def test_bad_values(
    check: Callable[[object], object], value: object, problem: str, follows_value: bool
) -> None:
    with pytest.raises(FieldError) as caught:
        check(value)
    assert (caught.value.problem, caught.value.follows_value) == (problem, follows_value)


def test_a_bad_pattern_names_the_regex_error() -> None:
    with pytest.raises(FieldError, match="is not a valid regular expression: missing \\)"):
        fields.pattern("(ok")


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("0.1.2.3", "this network"),
        ("127.0.0.1", "loopback"),
        ("239.1.1.1", "multicast"),
        ("255.255.255.255", "reserved or broadcast"),
        ("198.18.0.21", None),
        ("::", "unspecified"),
        ("::1", "loopback"),
        ("::ffff:198.18.0.21", "IPv4-mapped: give the IPv4 address"),
        ("::198.18.0.21", "IPv4-compatible, deprecated"),
        ("ff02::1", "multicast"),
        ("fe80::1", "link-local"),
        ("2001:db8::21", None),
        ("fd00::21", None),
    ],
)
def test_backend_unusable(address: str, reason: str | None) -> None:
    assert fields.backend_unusable(ipaddress.ip_address(address)) == reason


ADDRESSY = st.text(alphabet="0123456789abcdefABCDEF:.[]/%-x ", max_size=50)


@given(ADDRESSY | st.text(max_size=50) | st.integers() | st.none())
def test_the_address_checks_raise_only_field_errors(value: object) -> None:
    """Bad input gets a FieldError with a phrase, never another exception (IPv6 text
    included: brackets, zones, too many colons)."""
    for check in (
        fields.ip, fields.host_ip, fields.backend_ip, fields.host_ipv6, fields.network,
        fields.host_port,
    ):  # fmt: skip
        try:
            check(value)
        except FieldError as error:
            assert error.problem


@given(st.integers(0, 2**128 - 1))
def test_an_ipv6_backend_is_usable_or_says_why(low: int) -> None:
    address = ipaddress.IPv6Address(low)
    reason = fields.backend_unusable(address)
    try:
        assert fields.backend_ip(str(address)) == str(address) and reason is None
    except FieldError as error:
        assert (
            reason is not None and error.problem == f"{address} is not a backend address ({reason})"
        )
