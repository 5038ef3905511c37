"""Field validators shared by the config (lbnat.config, the command line's options through it)
and the control protocol (lbnat.control.protocol): one check per kind of value. Pure.

Each validator returns the value in its checked, normal form or raises `FieldError`, whose
`problem` is a phrase about the value ("is not a valid port"); the caller names the field and
shows the value its own way (the config as the file spells it, the protocol as ASCII JSON):
`f"{path}: {show(value)} {error.problem}"`, or `f"{path}: {error.problem}"` when the phrase
does not follow the value (`error.follows_value` is False: "must not be empty").
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from typing import Final

MAX_WEIGHT: Final = 65535  # as IPVS
IFNAMSIZ: Final = 16  # interface names are at most 15 bytes
SOCKET_PATH_MAX: Final = 107  # sun_path is 108 bytes, one of them the terminating NUL

_BROADCAST: Final = ipaddress.IPv4Address("255.255.255.255")
_PORT_RANGE: Final = re.compile(r"\s*([0-9]{1,5})\s*-\s*([0-9]{1,5})\s*")
_HOST_PORT: Final = re.compile(r"(.+):([0-9]{1,5})")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Never a backend: lbnat forwards frames to these neither on the wire nor to itself.
_NOT_BACKENDS: Final = (
    (ipaddress.IPv4Network("0.0.0.0/8"), "this network"),
    (ipaddress.IPv4Network("127.0.0.0/8"), "loopback"),
    (ipaddress.IPv4Network("224.0.0.0/4"), "multicast"),
    (ipaddress.IPv4Network("240.0.0.0/4"), "reserved or broadcast"),
)
_NOT_BACKENDS6: Final = (
    (ipaddress.IPv6Network("::/128"), "unspecified"),
    (ipaddress.IPv6Network("::1/128"), "loopback"),
    (ipaddress.IPv6Network("::ffff:0:0/96"), "IPv4-mapped: give the IPv4 address"),
    (ipaddress.IPv6Network("::/96"), "IPv4-compatible, deprecated"),
    (ipaddress.IPv6Network("ff00::/8"), "multicast"),
    (ipaddress.IPv6Network("fe80::/10"), "link-local"),
)


class FieldError(ValueError):
    """A value that fails its check: `problem` is a phrase about it."""

    def __init__(self, problem: str, *, follows_value: bool = True) -> None:
        super().__init__(problem)
        self.problem = problem
        self.follows_value = follows_value


def integer(value: object) -> int:
    """A JSON integer: not a bool, not a float (20000.0 is not a port)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldError("is not an integer")
    return value


def port(value: object) -> int:
    """A TCP/UDP port, 1-65535."""
    number = integer(value)
    if not 0 < number < 65536:
        raise FieldError("is not a valid port")
    return number


def weight(value: object) -> int:
    """A backend's weight, 0 (no new flows) to MAX_WEIGHT."""
    number = integer(value)
    if not 0 <= number <= MAX_WEIGHT:
        raise FieldError(f"is not a valid weight (0-{MAX_WEIGHT})")
    return number


def seconds(value: object, *, zero: bool = False) -> float:
    """A duration in seconds, finite: positive, or at least 0 when `zero`."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FieldError("is not a number")
    try:
        number = float(value)
    except OverflowError:
        raise FieldError("is too large") from None
    if not math.isfinite(number):
        raise FieldError("is not a finite number")
    if number < 0 or (number == 0 and not zero):
        raise FieldError(f"must be {'at least 0' if zero else 'positive'}")
    return number


def text(value: object, *, empty: bool = True) -> str:
    """A string that can be written out as UTF-8 (no lone surrogates)."""
    if not isinstance(value, str):
        raise FieldError("is not a string")
    if not empty and not value:
        raise FieldError("must not be empty", follows_value=False)
    try:
        value.encode()
    except UnicodeEncodeError:
        raise FieldError("is not valid Unicode text") from None
    return value


def word(value: object) -> str:
    """A service or backend name: it appears in log lines and admin commands, so one word."""
    name = text(value, empty=False)
    if not printable_word(name):
        raise FieldError("must not contain spaces or control characters")
    return name


def printable_word(value: str) -> bool:
    """No spaces, no control characters."""
    return not any(char.isspace() or not char.isprintable() for char in value)


def ipv4(value: object) -> ipaddress.IPv4Address:
    """Dotted-quad IPv4 text."""
    try:
        return ipaddress.IPv4Address(text(value))
    except ValueError as error:
        if isinstance(error, FieldError):
            raise
        raise FieldError("is not an IPv4 address") from None


def host_ipv4(value: object) -> str:
    """An IPv4 address a packet may be sent to or from, as normal dotted text."""
    address = ipv4(value)
    if address.is_unspecified or address.is_multicast or address == _BROADCAST:
        raise FieldError(f"{address} is not a host address", follows_value=False)
    return str(address)


def host_ipv6(value: object) -> str:
    """An IPv6 unicast address a packet may be sent to or from, in RFC 5952 text."""
    try:
        address = ipaddress.IPv6Address(text(value))
    except ValueError as error:
        if isinstance(error, FieldError):
            raise
        raise FieldError("is not an IPv6 address") from None
    if address.is_unspecified or address.is_multicast or address.ipv4_mapped is not None:
        raise FieldError(f"{address} is not a host address", follows_value=False)
    return str(address)


def ip(value: object) -> IPAddress:
    """IPv4 or IPv6 text (an IPv6 address as plain text, not in brackets)."""
    try:
        return ipaddress.ip_address(text(value))
    except ValueError as error:
        if isinstance(error, FieldError):
            raise
        raise FieldError("is not an IPv4 or IPv6 address") from None


def host_ip(value: object) -> str:
    """`host_ipv4` or `host_ipv6`, by the text's family (an IPv6 address has a colon)."""
    spelled = text(value)
    return host_ipv6(spelled) if ":" in spelled else host_ipv4(spelled)


def backend_ip(value: object) -> str:
    """A backend's address in the config: a `host_ipv4` (as ever), or an IPv6 address that
    `backend_unusable` does not refuse, in RFC 5952 text."""
    spelled = text(value)
    if ":" not in spelled:
        return host_ipv4(spelled)
    try:
        address = ipaddress.IPv6Address(spelled)
    except ValueError:
        raise FieldError("is not an IPv6 address") from None
    unusable = backend_unusable(address)
    if unusable:
        raise FieldError(f"{address} is not a backend address ({unusable})", follows_value=False)
    return str(address)


def backend_unusable(address: IPAddress) -> str | None:
    """Why lbnat cannot forward to this address (a registered backend's), or None."""
    table = _NOT_BACKENDS6 if address.version == 6 else _NOT_BACKENDS
    for network, what in table:
        if address in network:
            return what
    return None


def network(value: object) -> IPNetwork:
    """An IPv4 or IPv6 network with its host bits clear (or one address, a /32 or /128)."""
    spelled = text(value)
    try:
        return ipaddress.ip_network(spelled)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(spelled, strict=False)
    except ValueError:
        raise FieldError('is not a network like "198.18.0.0/24" or "2001:db8::/64"') from None
    raise FieldError(f'has host bits set (did you mean "{loose}"?)')


def port_range(value: object) -> tuple[int, int]:
    """A port range, "FIRST-LAST" (spaces allowed around the numbers), FIRST <= LAST."""
    match = _PORT_RANGE.fullmatch(text(value))
    if match is None:
        raise FieldError('is not a port range like "61000-65535"')
    return ordered_range(_range_end(match[1]), _range_end(match[2]))


def ordered_range(first: int, last: int) -> tuple[int, int]:
    """(first, last) when it holds a port at least."""
    if first > last:
        raise FieldError(
            f"{first}-{last} is empty (its first port is above its last)", follows_value=False
        )
    return first, last


def _range_end(digits: str) -> int:
    number = int(digits)
    if not 0 < number < 65536:
        raise FieldError(f"{number} is not a valid port", follows_value=False)
    return number


def host_port(value: object) -> tuple[str, int]:
    """An address to listen on, "HOST:PORT": an IPv4 HOST, or an IPv6 one in brackets
    ("[::]:7000"); the HOST comes back without brackets, in its normal text."""
    match = _HOST_PORT.fullmatch(text(value))
    if match is None:
        raise FieldError('is not HOST:PORT like "127.0.0.1:7000" or "[::1]:7000"')
    host, digits = match[1], match[2]
    try:
        if host.startswith("[") and host.endswith("]"):
            try:
                address: IPAddress = ipaddress.IPv6Address(host[1:-1])
            except ValueError:
                raise FieldError("is not an IPv6 address") from None
        elif ":" in host:
            raise FieldError("is an IPv6 address without brackets (write [HOST]:PORT)")
        else:
            address = ipv4(host)
    except FieldError as error:
        raise FieldError(f"{json.dumps(host)} {error.problem}", follows_value=False) from None
    return str(address), _range_end(digits)


def host_port_text(host: str, port: int) -> str:
    """`host_port`'s inverse: "198.18.0.21:9000", an IPv6 host in brackets
    ("[2001:db8::21]:9000"). For address text; `lbnat.addresses.with_port` for address ints."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def interface(value: object) -> str:
    """A network interface's name."""
    name = text(value, empty=False)
    if len(name.encode()) >= IFNAMSIZ or "/" in name or any(c.isspace() for c in name):
        raise FieldError("is not an interface name")
    return name


def socket_path(value: object) -> str:
    """A Unix socket's path."""
    path = text(value, empty=False)
    if "\0" in path:
        raise FieldError("must not contain a NUL character", follows_value=False)
    if len(path.encode()) > SOCKET_PATH_MAX:
        raise FieldError(
            f"is longer than a Unix socket path may be ({SOCKET_PATH_MAX} bytes)",
            follows_value=False,
        )
    return path


def pattern(value: object) -> str:
    """A regular expression, compiled as the probes compile it (over bytes)."""
    expression = text(value)
    try:
        re.compile(expression.encode())
    except re.error as error:
        raise FieldError(f"is not a valid regular expression: {error}") from None
    return expression


def http_path(value: object) -> str:
    """The path an http probe GETs."""
    path = text(value)
    if not path.startswith("/"):
        raise FieldError("must start with /")
    if not printable_word(path):
        raise FieldError("must not contain spaces or control characters")
    return path
