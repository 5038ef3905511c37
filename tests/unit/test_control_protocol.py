"""lbnat.control.protocol: parsing, validation, HMAC authentication, replay defence, replies.

Modelled on keepalived's auth_hmac tests: a good message passes; every way of getting one
wrong (a wrong key, any single flipped byte, a stale or future timestamp, a replayed or
missing nonce, a missing MAC) is refused, and a refused message leaves no trace in the nonce
cache. Time is a parameter: no test sleeps.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbnat.control.protocol import (
    ADMIN_OPS,
    MAX_LINE,
    REGISTRATION_OPS,
    Authenticator,
    Nack,
    Request,
    ack,
    canonical,
    encode,
    nack,
    parse_request,
    sign,
)

SECRET = b"test-secret"
OTHER_SECRET = b"another-secret"
NOW = 1_700_000_000.0
WINDOW = 30.0
EPSILON = 1e-3
SOURCE = "198.18.0.21"
ALLOW = (ipaddress.IPv4Network("198.18.0.0/15"), ipaddress.IPv6Network("2001:db8::/64"))
NONCE = "00112233445566778899aabbccddeeff"

REGISTER: dict[str, object] = {
    "op": "register",
    "service": "tcp:20000",
    "ip": "198.18.0.21",
    "port": 9000,
    "weight": 2,
    "name": "b1",
}
REGISTERED = Request("register", "tcp:20000", "198.18.0.21", 9000, 2, "b1")
UNREGISTER: dict[str, object] = {
    "op": "unregister",
    "service": "tcp:20000",
    "ip": "198.18.0.21",
    "port": 9000,
}
UNREGISTERED = Request("unregister", "tcp:20000", "198.18.0.21", 9000)


def gate(secret: bytes | None = SECRET, **options: Any) -> Authenticator:
    return Authenticator(secret, window=WINDOW, allow=ALLOW, **options)


def signed(
    message: dict[str, object] = REGISTER,
    ts: float = NOW,
    nonce: str | None = None,
    secret: bytes = SECRET,
) -> bytes:
    return encode(sign(message, secret, ts, nonce))


def parse(
    line: bytes,
    auth: Authenticator | None,
    now: float = NOW,
    source: str = SOURCE,
    admin: bool = False,
) -> Request | Nack:
    result = parse_request(line, source_ip=source, now=now, auth=auth, admin=admin)
    if isinstance(result, Nack):
        assert result.reason and "\n" not in result.reason and "\r" not in result.reason
    return result


def refused(result: Request | Nack, *fragments: str) -> str:
    assert isinstance(result, Nack), f"accepted: {result}"
    for fragment in fragments:
        assert fragment in result.reason, result.reason
    return result.reason


def raw(message: dict[str, object]) -> bytes:
    return json.dumps(message).encode() + b"\n"


# --- good requests --------------------------------------------------------------------------


@pytest.mark.parametrize("auth", [None, Authenticator(None)], ids=["auth=None", "no secret"])
@pytest.mark.parametrize(
    ("message", "expected"), [(REGISTER, REGISTERED), (UNREGISTER, UNREGISTERED)]
)
def test_registration_without_a_secret(
    auth: Authenticator | None, message: dict[str, object], expected: Request
) -> None:
    assert parse(raw(message), auth) == expected
    assert parse(raw(message), auth) == expected  # no nonce, nothing to replay


@pytest.mark.parametrize(
    ("message", "expected"), [(REGISTER, REGISTERED), (UNREGISTER, UNREGISTERED)]
)
def test_registration_with_a_secret(message: dict[str, object], expected: Request) -> None:
    auth = gate()
    assert parse(signed(message, nonce=NONCE), auth) == expected
    assert NONCE in auth and len(auth) == 1


def test_register_defaults() -> None:
    line = raw({"op": "register", "service": "chat", "ip": "10.0.0.1", "port": 80})
    assert parse(line, None) == Request("register", "chat", "10.0.0.1", 80, weight=1, name="")


def test_without_a_secret_auth_fields_are_ignored_unchecked() -> None:
    junk = {**REGISTER, "ts": "yesterday", "nonce": 5, "mac": "not hex"}
    assert parse(raw(junk), gate(None)) == REGISTERED
    assert parse(raw(junk), None) == REGISTERED
    assert parse(raw(junk), gate(), admin=True) == REGISTERED


def test_lines_with_and_without_newline_and_crlf() -> None:
    body = json.dumps(REGISTER).encode()
    for line in (body, body + b"\n", body + b"\r\n", b"  " + body + b" \n"):
        assert parse(line, None) == REGISTERED


def test_max_line_counts_the_newline() -> None:
    body = b'{"op":"reload"}'
    at_limit = body + b" " * (MAX_LINE - 1 - len(body))
    assert len(at_limit + b"\n") == MAX_LINE
    assert parse(at_limit + b"\n", None, admin=True) == Request("reload")
    assert parse(at_limit, None, admin=True) == Request("reload")
    refused(parse(at_limit + b" \n", None, admin=True), f"longer than {MAX_LINE} bytes")
    refused(parse(at_limit + b" ", None, admin=True), f"longer than {MAX_LINE} bytes")


# --- the admin socket -----------------------------------------------------------------------

ADMIN_REQUESTS: list[tuple[dict[str, object], Request]] = [
    ({"op": "status"}, Request("status")),
    ({"op": "status", "service": "chat"}, Request("status", "chat")),
    ({"op": "sessions"}, Request("sessions")),
    ({"op": "sessions", "service": "chat"}, Request("sessions", "chat")),
    (
        {"op": "backend_add", "service": "chat", "ip": "10.0.0.1", "port": 80, "weight": 0},
        Request("backend_add", "chat", "10.0.0.1", 80, weight=0),
    ),
    (
        {"op": "backend_add", "service": "chat", "ip": "10.0.0.1", "port": 80, "name": "n"},
        Request("backend_add", "chat", "10.0.0.1", 80, name="n"),
    ),
    (
        {"op": "backend_remove", "service": "chat", "ip": "10.0.0.1", "port": 80},
        Request("backend_remove", "chat", "10.0.0.1", 80),
    ),
    (
        {"op": "backend_drain", "service": "chat", "ip": "10.0.0.1", "port": 80},
        Request("backend_drain", "chat", "10.0.0.1", 80),
    ),
    ({"op": "reload"}, Request("reload")),
    ({"op": "ha_role", "role": "MASTER"}, Request("ha_role", role="master")),
    ({"op": "ha_role", "role": "backup"}, Request("ha_role", role="backup")),
    ({"op": "ha_status"}, Request("ha_status")),
    ({"op": "bgp_status"}, Request("bgp_status")),
    ({"op": "drain_node"}, Request("drain_node")),
    (REGISTER, REGISTERED),
    (UNREGISTER, UNREGISTERED),
]


def test_every_op_is_covered() -> None:
    assert {str(m["op"]) for m, _ in ADMIN_REQUESTS} == set(ADMIN_OPS) | set(REGISTRATION_OPS)


@pytest.mark.parametrize(("message", "expected"), ADMIN_REQUESTS, ids=lambda x: str(x)[:40])
def test_admin_socket_takes_every_op_without_auth_or_source_check(
    message: dict[str, object], expected: Request
) -> None:
    auth = gate()
    for source in ("127.0.0.1", "", "garbage"):
        assert parse(raw(message), auth, source=source, admin=True) == expected
    assert len(auth) == 0


@pytest.mark.parametrize(
    ("message", "_"), [r for r in ADMIN_REQUESTS if r[1].op in ADMIN_OPS], ids=lambda x: str(x)
)
def test_admin_ops_are_refused_on_the_control_channel(
    message: dict[str, object], _: Request
) -> None:
    reason = f'op: "{message["op"]}" is allowed on the admin socket only'
    assert parse(raw(message), None) == Nack(reason)
    assert parse(raw(message), gate(None)) == Nack(reason)
    # Signed with the right key: authenticated, and still refused.
    assert parse(signed(message), gate()) == Nack(reason)
    # Unsigned, with a secret configured: not even authenticated.
    refused(parse(raw(message), gate()), "missing fields")


# --- authentication -------------------------------------------------------------------------


def test_bad_mac_is_refused_and_burns_no_nonce() -> None:
    auth = gate()
    message = sign(REGISTER, SECRET, NOW, NONCE)
    assert isinstance(message["mac"], str)
    forged = {**message, "mac": "0" * 64 if message["mac"] != "0" * 64 else "1" * 64}
    refused(parse(encode(forged), auth), "mac: does not match")
    assert len(auth) == 0 and NONCE not in auth
    assert parse(encode(message), auth) == REGISTERED


def test_unknown_key_is_refused_and_burns_no_nonce() -> None:
    auth = gate()
    refused(parse(signed(nonce=NONCE, secret=OTHER_SECRET), auth), "mac: does not match")
    assert len(auth) == 0
    assert parse(signed(nonce=NONCE), auth) == REGISTERED


def test_mac_must_be_lowercase_hex() -> None:
    message = sign(REGISTER, SECRET, NOW, NONCE)
    assert isinstance(message["mac"], str)
    upper = {**message, "mac": message["mac"].upper()}
    if upper != message:  # (a MAC of digits only would have no case)
        refused(parse(encode(upper), gate()), "mac: must be a string of 64 lowercase hex")


@pytest.mark.parametrize("field", ["ts", "nonce", "mac"])
def test_missing_auth_field(field: str) -> None:
    auth = gate()
    message = sign(REGISTER, SECRET, NOW, NONCE)
    del message[field]
    assert parse(encode(message), auth) == Nack(f'missing field "{field}"', "auth")
    assert len(auth) == 0


def test_unsigned_request_names_every_missing_auth_field() -> None:
    assert parse(raw(REGISTER), gate()) == Nack('missing fields "ts", "nonce", "mac"', "auth")


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("ts", "1700000000", 'ts: must be a number (unix seconds), not "1700000000"'),
        ("ts", True, "ts: must be a number (unix seconds), not true"),
        ("ts", None, "ts: must be a number (unix seconds), not null"),
        ("ts", [NOW], "ts: must be a number (unix seconds), not an array"),
        ("ts", 10**400, "ts: an integer of 1329 bits is not a finite number"),
        ("nonce", "0" * 15, "nonce: must be a string of 16-128 hex digits"),
        ("nonce", "0" * 129, "nonce: must be a string of 16-128 hex digits"),
        ("nonce", "g" * 32, "nonce: must be a string of 16-128 hex digits"),
        ("nonce", 1234567890123456, "nonce: must be a string of 16-128 hex digits"),
        ("mac", "0" * 63, "mac: must be a string of 64 lowercase hex digits"),
        ("mac", "0" * 65, "mac: must be a string of 64 lowercase hex digits"),
        ("mac", "A" * 64, "mac: must be a string of 64 lowercase hex digits"),
        ("mac", {"sha256": "0" * 64}, "mac: must be a string of 64 lowercase hex digits"),
    ],
)
def test_malformed_auth_field(field: str, value: object, fragment: str) -> None:
    auth = gate()
    message = {**sign(REGISTER, SECRET, NOW, NONCE), field: value}
    refused(parse(raw(message), auth), fragment)
    assert len(auth) == 0


def test_infinite_ts_is_refused() -> None:
    line = signed(nonce=NONCE).replace(b'"ts":1700000000.0', b'"ts":1e400')
    assert b"1e400" in line
    refused(parse(line, gate()), "ts: Infinity is not a finite number")


@pytest.mark.parametrize("nonce", ["0" * 16, "f" * 128, "ABCDEF0123456789", NONCE])
def test_nonce_lengths_and_case(nonce: str) -> None:
    auth = gate()
    assert parse(signed(nonce=nonce), auth) == REGISTERED
    assert nonce in auth


@pytest.mark.parametrize(
    ("offset", "accepted"),
    [
        (0.0, True),
        (WINDOW, True),  # the window's edges are inside it
        (-WINDOW, True),
        (WINDOW - EPSILON, True),
        (-WINDOW + EPSILON, True),
        (WINDOW + EPSILON, False),  # a future-dated message (the client's clock runs ahead)
        (-WINDOW - EPSILON, False),  # a stale one
        (3600.0, False),
        (-3600.0, False),
    ],
)
def test_timestamp_window(offset: float, accepted: bool) -> None:
    auth = gate()
    result = parse(signed(ts=NOW + offset), auth)
    if accepted:
        assert result == REGISTERED
    else:
        side = "ahead of" if offset > 0 else "behind"
        refused(result, f"s {side} the server clock (window 30 s)")
        assert len(auth) == 0


def test_timestamp_window_is_configurable() -> None:
    auth = Authenticator(SECRET, window=5.0)
    assert parse(signed(ts=NOW - 5.0), auth) == REGISTERED
    refused(parse(signed(ts=NOW - 5.5), auth), "5.5 s behind", "window 5 s")


def test_integer_timestamps_work() -> None:
    auth = gate()
    assert parse(signed(ts=int(NOW) - 10), auth) == REGISTERED


def test_replay_is_refused_inside_the_window_and_by_the_timestamp_after_it() -> None:
    auth = gate()
    line = signed(nonce=NONCE)
    assert parse(line, auth) == REGISTERED
    assert parse(line, auth) == Nack("nonce: already used (a replayed request)", "auth")
    # Still remembered at the window's far edge, where the timestamp still passes.
    replayed = Nack("nonce: already used (a replayed request)", "auth")
    assert parse(line, auth, now=NOW + WINDOW) == replayed
    # Past it the timestamp refuses the replay, and the nonce has been forgotten.
    refused(parse(line, auth, now=NOW + WINDOW + EPSILON), "ts:", "behind the server clock")
    assert len(auth) == 0


def test_replay_of_a_future_dated_message_is_refused_until_its_timestamp_expires() -> None:
    # ts = now + window is accepted now and passes the timestamp check until now + 2 * window:
    # the nonce must be remembered that long, not just `window` seconds after it arrived.
    auth = gate()
    line = signed(ts=NOW + WINDOW, nonce=NONCE)
    assert parse(line, auth) == REGISTERED
    replay = Nack("nonce: already used (a replayed request)", "auth")
    assert parse(line, auth, now=NOW + WINDOW + 1.0) == replay
    assert parse(line, auth, now=NOW + 2 * WINDOW) == replay
    refused(parse(line, auth, now=NOW + 2 * WINDOW + EPSILON), "ts:")


def test_same_nonce_in_a_new_message_is_a_replay() -> None:
    auth = gate()
    assert parse(signed(REGISTER, nonce=NONCE), auth) == REGISTERED
    refused(parse(signed(UNREGISTER, nonce=NONCE), auth), "nonce: already used")


@pytest.mark.parametrize("mask", [0x01, 0x02, 0x20, 0x80])
def test_one_flipped_byte_anywhere_is_refused_and_burns_no_nonce(mask: int) -> None:
    auth = gate()
    line = signed(nonce=NONCE)
    mac_failures = 0
    for position in range(len(line)):
        flipped = bytearray(line)
        flipped[position] ^= mask
        reason = refused(parse(bytes(flipped), auth))
        mac_failures += reason.startswith("mac: does not match")
        assert len(auth) == 0, (position, reason)
    if mask in (0x01, 0x02):  # (0x20 and 0x80 mostly break the JSON or the UTF-8 instead)
        assert mac_failures > len(line) // 2  # the MAC, not only the syntax, caught them
    assert parse(line, auth) == REGISTERED  # the nonce is still fresh


def test_signed_request_with_bad_content_is_refused_after_authentication() -> None:
    auth = gate()
    refused(parse(signed({**REGISTER, "port": 70000}), auth), "port: 70000 is not a valid port")
    assert len(auth) == 1  # authenticated: its nonce is used up, a re-signed request gets a new one


def test_unsigned_stranger_learns_nothing_but_authentication() -> None:
    assert parse(raw({"op": "explode", "colour": 1}), gate()) == Nack(
        'missing fields "ts", "nonce", "mac"', "auth"
    )


# --- the source allow list ------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        b"\xff\xfe garbage \x00",
        b"x" * (MAX_LINE * 2),
        b"",
        raw(REGISTER),
    ],
    ids=["garbage", "too long", "empty", "valid"],
)
def test_source_outside_the_allow_list_is_refused_before_parsing(line: bytes) -> None:
    for auth in (gate(), gate(None)):
        assert parse(line, auth, source="10.0.0.1") == Nack(
            "source 10.0.0.1 is not allowed", "not_allowed"
        )


def test_source_refused_burns_no_nonce() -> None:
    auth = gate()
    line = signed(nonce=NONCE)
    refused(parse(line, auth, source="10.0.0.1"), "source 10.0.0.1 is not allowed")
    assert len(auth) == 0
    assert parse(line, auth) == REGISTERED


@pytest.mark.parametrize(
    ("source", "allowed"),
    [
        ("198.18.0.21", True),
        ("198.19.255.255", True),
        ("198.20.0.1", False),
        ("10.0.0.1", False),
        ("::ffff:198.18.0.21", True),  # a dual-stack listener's view of an IPv4 peer
        ("::ffff:10.0.0.1", False),
        ("::1", False),
        ("2001:db8::21", True),
        ("2001:db8:0:1::21", False),
        ("", False),
        ("not an address", False),
        ("198.18.0.21:7000", False),
    ],
)
def test_source_allowed(source: str, allowed: bool) -> None:
    assert gate().source_allowed(source) is allowed


def test_empty_allow_list_allows_any_source() -> None:
    auth = Authenticator(None)
    for source in ("10.0.0.1", "::1", "anything"):
        assert auth.source_allowed(source)
        assert parse(raw(REGISTER), auth, source=source) == REGISTERED


def test_refused_source_reason_stays_one_line() -> None:
    refused(parse(b"", gate(), source="evil\nline"), 'source "evil\\nline" is not allowed')


# --- malformed requests ---------------------------------------------------------------------

BACKEND: dict[str, object] = {"op": "register", "service": "chat", "ip": "10.0.0.1", "port": 80}

MALFORMED_LINES: list[tuple[bytes, str]] = [
    (b"", "request is not valid JSON: Expecting value at column 1"),
    (b"\n", "request is not valid JSON"),
    (b"hello", "request is not valid JSON"),
    (b'{"op":"register"', "request is not valid JSON"),
    (b'{"op":"register"}{}', "request is not valid JSON: Extra data"),
    (b"\xff\xfe{}", "request is not valid UTF-8 (byte 0)"),
    (b'{"op":"reg\xc3"}', "request is not valid UTF-8 (byte 10)"),
    (b"\xef\xbb\xbf{}", "request is not valid JSON"),  # a BOM
    (b"[" * 3000, "request is not valid JSON"),
    (b'{"op":"register"}\n{"op":"unregister"}\n', "a request is one line"),
    (b'{"op":"reload","x":NaN}', "request is not valid JSON: NaN is not a number"),
    (b'{"op":"reload","x":-Infinity}', "-Infinity is not a number"),
    (b'{"op":"register","op":"unregister"}', 'duplicate field "op"'),
    (b"[]", "request must be a JSON object, not an array"),
    (b'"register"', "request must be a JSON object, not a string"),
    (b"null", "request must be a JSON object, not null"),
    (b"42", "request must be a JSON object, not a number"),
    (b"true", "request must be a JSON object, not a boolean"),
    (b'{"op":"register","name":"' + b"a" * MAX_LINE + b'"}', "longer than 4096 bytes"),
]


@pytest.mark.parametrize(("line", "reason"), MALFORMED_LINES, ids=lambda x: repr(x)[:30])
def test_malformed_line(line: bytes, reason: str) -> None:
    for admin in (False, True):
        refused(parse(line, None, admin=admin), reason)


MALFORMED_REQUESTS: list[tuple[dict[str, object], str]] = [
    ({}, 'missing field "op"'),
    ({"service": "chat"}, 'missing field "op"'),
    ({"op": 5}, "op: must be a string, not 5"),
    ({"op": None}, "op: must be a string, not null"),
    ({"op": "explode"}, 'op: unknown op "explode" (ops: register, unregister)'),
    ({"op": "REGISTER"}, 'op: unknown op "REGISTER"'),
    ({**BACKEND, "colour": "red"}, 'unknown field "colour"'),
    ({**BACKEND, "b": 1, "a": 2}, 'unknown fields "a", "b"'),
    ({**BACKEND, **{f"x{i}": i for i in range(8)}}, '"x4" and 3 more'),
    ({**BACKEND, "x\ny": 1}, 'unknown field "x\\ny"'),
    ({"op": "register", "ip": "10.0.0.1", "port": 80}, 'missing field "service"'),
    ({"op": "register", "service": "chat", "port": 80}, 'missing field "ip"'),
    ({"op": "register", "service": "chat", "ip": "10.0.0.1"}, 'missing field "port"'),
    ({"op": "unregister"}, 'missing fields "service", "ip", "port"'),
    ({**BACKEND, "op": "unregister", "weight": 1}, 'field "weight" not allowed with op'),
    ({**BACKEND, "op": "unregister", "name": "b", "weight": 1}, 'fields "weight", "name"'),
    ({**BACKEND, "service": 5}, "service: must be a string, not 5"),
    ({**BACKEND, "service": ""}, 'service: "" is not a service name'),
    ({**BACKEND, "service": "s" * 65}, "is not a service name (1-64 printable characters)"),
    ({**BACKEND, "service": "a\tb"}, 'service: "a\\tb" is not a service name'),
    ({**BACKEND, "ip": 167772161}, "ip: must be a string, not 167772161"),
    ({**BACKEND, "ip": "1.2.3"}, 'ip: "1.2.3" is not an IPv4 or IPv6 address'),
    ({**BACKEND, "ip": "256.1.1.1"}, "is not an IPv4 or IPv6 address"),
    ({**BACKEND, "ip": "010.0.0.1"}, "is not an IPv4 or IPv6 address"),
    ({**BACKEND, "ip": " 10.0.0.1"}, "is not an IPv4 or IPv6 address"),
    ({**BACKEND, "ip": "example.com"}, "is not an IPv4 or IPv6 address"),
    ({**BACKEND, "ip": "[2001:db8::1]"}, 'ip: "[2001:db8::1]" is not an IPv4 or IPv6 address'),
    ({**BACKEND, "ip": "2001:db8::zz"}, "is not an IPv4 or IPv6 address"),
    ({**BACKEND, "ip": "::1"}, "ip: ::1 is not a backend address (loopback)"),
    ({**BACKEND, "ip": "::"}, "ip: :: is not a backend address (unspecified)"),
    ({**BACKEND, "ip": "ff02::1"}, "ip: ff02::1 is not a backend address (multicast)"),
    ({**BACKEND, "ip": "fe80::1"}, "ip: fe80::1 is not a backend address (link-local)"),
    (
        {**BACKEND, "ip": "::ffff:10.0.0.1"},
        "ip: ::ffff:a00:1 is not a backend address (IPv4-mapped: give the IPv4 address)",
    ),
    ({**BACKEND, "ip": "0.0.0.0"}, "ip: 0.0.0.0 is not a backend address (this network)"),
    ({**BACKEND, "ip": "127.0.0.1"}, "ip: 127.0.0.1 is not a backend address (loopback)"),
    ({**BACKEND, "ip": "224.0.0.5"}, "(multicast)"),
    ({**BACKEND, "ip": "255.255.255.255"}, "(reserved or broadcast)"),
    ({**BACKEND, "port": 70000}, "port: 70000 is not a valid port"),
    ({**BACKEND, "port": 0}, "port: 0 is not a valid port"),
    ({**BACKEND, "port": -1}, "port: -1 is not a valid port"),
    ({**BACKEND, "port": 10**30}, "port: an integer of 100 bits is not a valid port"),
    ({**BACKEND, "port": "80"}, 'port: must be an integer, not "80"'),
    ({**BACKEND, "port": 80.0}, "port: must be an integer, not 80.0"),
    ({**BACKEND, "port": True}, "port: must be an integer, not true"),
    ({**BACKEND, "port": None}, "port: must be an integer, not null"),
    ({**BACKEND, "port": {"n": 80}}, "port: must be an integer, not an object"),
    ({**BACKEND, "weight": -1}, "weight: -1 is not a valid weight (0-65535)"),
    ({**BACKEND, "weight": 65536}, "weight: 65536 is not a valid weight"),
    ({**BACKEND, "weight": False}, "weight: must be an integer, not false"),
    ({**BACKEND, "weight": 1.5}, "weight: must be an integer, not 1.5"),
    ({**BACKEND, "name": 5}, "name: must be a string, not 5"),
    ({**BACKEND, "name": "n" * 65}, "(at most 64 printable characters)"),
    ({**BACKEND, "name": "a\nb"}, 'name: "a\\nb" is not a backend name'),
    ({**BACKEND, "name": "\u2028"}, "is not a backend name"),
    ({**BACKEND, "name": "\ud800"}, "is not a backend name"),  # a lone surrogate
    ({"op": "reload", "service": "chat"}, 'field "service" not allowed with op "reload"'),
    ({"op": "status", "ip": "10.0.0.1"}, 'field "ip" not allowed with op "status"'),
]


@pytest.mark.parametrize(("message", "reason"), MALFORMED_REQUESTS, ids=lambda x: str(x)[:50])
def test_malformed_request(message: dict[str, object], reason: str) -> None:
    admin = message.get("op") in ("reload", "status")
    refused(parse(raw(message), None, admin=admin), reason)


def test_deep_nesting_is_refused() -> None:
    # Python 3.11's JSON parser runs out of recursion here; a later one may not.
    reason = refused(parse(b"[" * 2000 + b"]" * 2000, None))
    assert reason in (
        "request is not valid JSON: nested too deeply",
        "request must be a JSON object, not an array",
    )


def test_spec_examples_exactly() -> None:
    assert parse(raw({**BACKEND, "port": 70000}), None) == Nack("port: 70000 is not a valid port")
    assert parse(raw({**BACKEND, "colour": "red"}), None) == Nack('unknown field "colour"')


def test_admin_socket_lists_every_op_for_an_unknown_one() -> None:
    refused(parse(raw({"op": "x"}), None, admin=True), "(ops: register, unregister, status, ")


def test_long_values_are_cut_in_reasons() -> None:
    reason = refused(parse(raw({**BACKEND, "name": "n" * 1000}), None))
    assert len(reason) < 200 and '"... is not a backend name' in reason


def test_signed_message_with_a_lone_surrogate_is_refused() -> None:
    message = {**sign(REGISTER, SECRET, NOW, NONCE), "name": "\ud800"}
    refused(parse(raw(message), gate()), "no canonical form")


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("port", 1, 1),
        ("port", 65535, 65535),
        ("weight", 0, 0),
        ("weight", 65535, 65535),
        ("name", "n" * 64, "n" * 64),
        ("name", "café ☕ b1", "café ☕ b1"),
        ("name", "", ""),
        ("service", "s" * 64, "s" * 64),
        ("ip", "223.255.255.255", "223.255.255.255"),
        ("ip", "1.0.0.0", "1.0.0.0"),
    ],
)
def test_boundaries_accepted(field: str, value: object, expected: object) -> None:
    result = parse(raw({**BACKEND, field: value}), None)
    assert isinstance(result, Request) and getattr(result, field) == expected
    # And signed: non-ASCII survives the canonical form.
    result = parse(signed({**BACKEND, field: value}), gate())
    assert isinstance(result, Request) and getattr(result, field) == expected


# --- the nonce cache ------------------------------------------------------------------------


def test_nonce_cache_expires_only_what_is_due() -> None:
    auth = gate()
    for i in range(10):  # ts NOW-9 .. NOW
        assert parse(signed(ts=NOW - 9 + i, nonce=f"{i:032x}"), auth) == REGISTERED
    assert len(auth) == 10
    assert auth.expire(NOW + WINDOW - 9) == 0  # ts NOW-9 passes the check to the very edge
    assert auth.expire(NOW + WINDOW - 8.5) == 1
    assert f"{0:032x}" not in auth and f"{1:032x}" in auth
    assert auth.expire(NOW + WINDOW - 3.5) == 5
    assert auth.expire(NOW + WINDOW - 3.5) == 0
    assert auth.expire(NOW + WINDOW + 1) == 4
    assert len(auth) == 0


def test_nonce_cache_expires_in_timestamp_order_not_arrival_order() -> None:
    auth = gate()
    assert parse(signed(ts=NOW + 20, nonce="a" * 32), auth) == REGISTERED
    assert parse(signed(ts=NOW - 20, nonce="b" * 32), auth) == REGISTERED
    assert auth.expire(NOW + 15) == 1
    assert "b" * 32 not in auth and "a" * 32 in auth


def test_parse_expires_old_nonces() -> None:
    auth = gate()
    assert parse(signed(nonce="a" * 32), auth) == REGISTERED
    assert parse(signed(ts=NOW + 100, nonce="b" * 32), auth, now=NOW + 100) == REGISTERED
    assert "a" * 32 not in auth and len(auth) == 1


def test_nonce_cache_capacity_refuses_rather_than_forgets() -> None:
    auth = gate(nonce_capacity=3)
    for i in range(3):
        assert parse(signed(nonce=f"{i:032x}"), auth) == REGISTERED
    full = signed(nonce="f" * 32)
    refused(parse(full, auth), "too many requests")
    assert len(auth) == 3 and "f" * 32 not in auth
    # Nothing was forgotten early: the first message is still a replay.
    refused(parse(signed(nonce=f"{0:032x}"), auth), "nonce: already used")
    # Forged messages are refused for their MAC, not for the full cache.
    refused(parse(signed(nonce="e" * 32, secret=OTHER_SECRET), auth), "mac: does not match")
    # Still full a moment later, at the window's edge: the old nonces could still be replayed.
    refused(parse(signed(ts=NOW + 1, nonce="f" * 32), auth, now=NOW + WINDOW), "too many requests")
    # Once the old nonces expire there is room again.
    later = NOW + WINDOW + 1
    assert parse(signed(ts=later, nonce="f" * 32), auth, now=later) == REGISTERED
    assert len(auth) == 1


def test_nonce_cache_large_capacity_stays_fast() -> None:
    auth = gate(nonce_capacity=2000)
    for i in range(2000):
        assert parse(signed(ts=NOW + i / 100, nonce=f"{i:032x}"), auth, now=NOW) == REGISTERED
    refused(parse(signed(nonce="f" * 32), auth), "too many requests")
    assert auth.expire(NOW + WINDOW + 10) == 1000  # ts < NOW + 10: now - ts > window
    assert len(auth) == 1000 and f"{1000:032x}" in auth


def test_concurrent_replays_accept_exactly_one() -> None:
    """The server's handler threads share one Authenticator."""
    auth = gate()
    line = signed(nonce=NONCE)
    start = threading.Barrier(8)

    def attempt() -> Request | Nack:
        start.wait()
        return parse(line, auth)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: attempt(), range(8)))
    assert results.count(REGISTERED) == 1
    assert results.count(Nack("nonce: already used (a replayed request)", "auth")) == 7


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"secret": b""}, ValueError),
        ({"secret": "text"}, TypeError),
        ({"secret": SECRET, "window": 0}, ValueError),
        ({"secret": SECRET, "window": float("inf")}, ValueError),
        ({"secret": SECRET, "nonce_capacity": 0}, ValueError),
        ({"secret": SECRET, "allow": ["10.0.0.0/8"]}, TypeError),
    ],
)
def test_authenticator_rejects_bad_settings(kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        Authenticator(**kwargs)


# --- sign, canonical, replies ---------------------------------------------------------------


def test_sign_known_answer() -> None:
    """The worked example of docs/control-protocol.md."""
    message = {"op": "register", "service": "tcp:20000", "ip": "198.18.0.21", "port": 9000}
    message["name"] = "b1"
    nonce = "0123456789abcdef0123456789abcdef"
    result = sign(message, b"example-secret", 1700000000, nonce)
    assert canonical({k: v for k, v in result.items() if k != "mac"}) == (
        b'{"ip":"198.18.0.21","name":"b1","nonce":"0123456789abcdef0123456789abcdef",'
        b'"op":"register","port":9000,"service":"tcp:20000","ts":1700000000}'
    )
    assert result["mac"] == "701d45e12a824571813192b9fcbe6e99b04e3b1c623b5a163b1752c3038d0a21"
    auth = Authenticator(b"example-secret")
    assert parse(encode(result), auth, now=1700000000.0) == Request(
        "register", "tcp:20000", "198.18.0.21", 9000, name="b1"
    )


def test_sign_is_a_copy_with_ts_nonce_and_mac() -> None:
    original = dict(REGISTER)
    result = sign(original, SECRET, NOW)
    assert original == REGISTER
    assert set(result) == set(REGISTER) | {"ts", "nonce", "mac"}
    assert result["ts"] == NOW
    nonce = result["nonce"]
    assert isinstance(nonce, str) and len(nonce) == 32 and int(nonce, 16) >= 0
    assert sign(original, SECRET, NOW)["nonce"] != nonce
    unsigned = {k: v for k, v in result.items() if k != "mac"}
    data = json.dumps(unsigned, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert result["mac"] == hmac.new(SECRET, data.encode(), hashlib.sha256).hexdigest()


def test_sign_replaces_old_auth_fields() -> None:
    old = sign(REGISTER, SECRET, NOW - 1000, "a" * 32)
    new = sign(old, SECRET, NOW, NONCE)
    assert new["ts"] == NOW and new["nonce"] == NONCE
    assert parse(encode(new), gate()) == REGISTERED


def test_sign_rejects_a_bad_nonce_or_no_secret() -> None:
    with pytest.raises(ValueError):
        sign(REGISTER, SECRET, NOW, "xyz")
    with pytest.raises(ValueError):
        sign(REGISTER, b"", NOW)


def test_canonical_form() -> None:
    assert (
        canonical({"b": 1, "a": 'é"\\', "c": [1, 2]}) == '{"a":"é\\"\\\\","b":1,"c":[1,2]}'.encode()
    )


def test_replies() -> None:
    assert ack() == b'{"ok":true}\n'
    assert ack(op="register", backend="198.18.0.21:9000") == (
        b'{"ok":true,"op":"register","backend":"198.18.0.21:9000"}\n'
    )
    assert nack("port: 70000 is not a valid port") == (
        b'{"ok":false,"error":"port: 70000 is not a valid port"}\n'
    )
    assert encode({"a": [1, {"b": None}]}) == b'{"a":[1,{"b":null}]}\n'


def test_replies_are_one_ascii_line() -> None:
    line = nack("two\nlines \u2028 caf\xe9")
    assert line.count(b"\n") == 1 and line.endswith(b"\n") and line.isascii()
    assert json.loads(line) == {"ok": False, "error": "two\nlines \u2028 caf\xe9"}


def test_replies_refuse_what_json_cannot_carry() -> None:
    with pytest.raises(ValueError):
        encode({"x": float("nan")})
    with pytest.raises(TypeError):
        encode({"x": {1, 2}})
    with pytest.raises(TypeError):
        ack(ok=False)


# --- properties -----------------------------------------------------------------------------

PROPERTY = settings(max_examples=150, deadline=None)
BYTES = settings(max_examples=500, deadline=None)


@BYTES
@given(line=st.binary(max_size=MAX_LINE + 100), admin=st.booleans(), with_secret=st.booleans())
def test_parse_never_raises_on_bytes(line: bytes, admin: bool, with_secret: bool) -> None:
    auth = gate(SECRET if with_secret else None)
    assert isinstance(parse(line, auth, admin=admin), Request | Nack)
    assert isinstance(parse(line, None, admin=admin), Request | Nack)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=10,
)
FIELD_NAMES = st.sampled_from(["op", "service", "ip", "port", "weight", "name", "ts", "nonce"])
OPS_OR_NOT = st.sampled_from([*REGISTRATION_OPS, *ADMIN_OPS, "nope"])


@PROPERTY
@given(
    fields=st.dictionaries(FIELD_NAMES | st.text(max_size=5), JSON_VALUES, max_size=7),
    op=OPS_OR_NOT,
    admin=st.booleans(),
    nonce=st.text("0123456789abcdef", min_size=16, max_size=40),
)
def test_parse_never_raises_on_json_objects_even_signed(
    fields: dict[str, object], op: str, admin: bool, nonce: str
) -> None:
    message = {"op": op, **fields}
    try:
        line = encode(sign(message, SECRET, NOW, nonce))
    except ValueError:  # a lone surrogate: sign() cannot make a canonical form
        line = json.dumps(message).encode() + b"\n"
    for auth in (gate(), None):
        assert isinstance(parse(line, auth, admin=admin), Request | Nack)


NAMES = st.text(
    st.characters(exclude_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"))
    | st.just(" "),
    max_size=64,
)
ADDRESSES = st.ip_addresses(v=4).filter(
    lambda a: not (a.is_loopback or a.is_multicast or int(a) >> 24 == 0 or int(a) >> 28 == 0xF)
)


@st.composite
def valid_requests(draw: st.DrawFn, ops: tuple[str, ...]) -> tuple[dict[str, object], Request]:
    op = draw(st.sampled_from(ops))
    message: dict[str, object] = {"op": op}
    if op in ("ha_status", "bgp_status", "drain_node"):
        return message, Request(op)
    if op in ("status", "sessions", "reload"):
        filtered = op != "reload" and draw(st.booleans())
        only = draw(NAMES.filter(bool)) if filtered else None
        if only is not None:
            message["service"] = only
        return message, Request(op, service=only)
    if op == "ha_role":
        role = draw(st.sampled_from(["master", "backup", "fault", "stop"]))
        message["role"] = draw(st.sampled_from([role, role.upper(), role.capitalize()]))
        return message, Request(op, role=role)
    service = draw(NAMES.filter(bool))
    ip = str(draw(ADDRESSES))
    port = draw(st.integers(1, 65535))
    message.update(service=service, ip=ip, port=port)
    weight, name = 1, ""
    if op in ("register", "backend_add"):
        if draw(st.booleans()):
            weight = message["weight"] = draw(st.integers(0, 65535))
        if draw(st.booleans()):
            name = message["name"] = draw(NAMES)
    return message, Request(op, service, ip, port, weight, name)


@PROPERTY
@given(
    request=valid_requests(REGISTRATION_OPS),
    ts=st.floats(NOW - WINDOW, NOW + WINDOW) | st.integers(int(NOW) - 30, int(NOW) + 30),
)
def test_sign_then_parse_round_trips(request: tuple[dict[str, object], Request], ts: float) -> None:
    message, expected = request
    auth = gate()
    line = encode(sign(message, SECRET, ts))
    assert parse(line, auth) == expected
    assert parse(line, auth) == Nack("nonce: already used (a replayed request)", "auth")


@PROPERTY
@given(request=valid_requests(REGISTRATION_OPS + ADMIN_OPS))
def test_admin_round_trips(request: tuple[dict[str, object], Request]) -> None:
    message, expected = request
    assert parse(encode(message), None, admin=True) == expected


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ({"op": "ha_role"}, 'missing field "role"'),
        ({"op": "ha_role", "role": "leader"}, "role: must be one of master, backup, fault, stop"),
        ({"op": "ha_role", "role": 1}, "role: must be one of"),
        ({"op": "status", "role": "master"}, "not allowed with op"),
    ],
)
def test_ha_role_takes_only_keepalived_s_states(message: dict[str, object], reason: str) -> None:
    refused(parse(json.dumps(message).encode() + b"\n", None, admin=True), reason)


def test_an_ipv6_backend_is_registered_in_its_canonical_text() -> None:
    message = {**UNREGISTER, "op": "register", "ip": "2001:DB8:0:0::21"}
    request = parse_request(
        encode(message), source_ip="2001:db8::5", now=0.0, auth=Authenticator(None)
    )
    assert isinstance(request, Request)
    assert request.ip == "2001:db8::21"
