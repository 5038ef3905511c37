"""The control protocol: one JSON object per line in, one JSON object per line out. Pure.

Two channels speak it (docs/control-protocol.md is the wire format for writers of backends):

- the **control channel** (TCP): backends `register` and `unregister` themselves. The peer's
  source address must be in the allow list, and when a secret is configured every request is
  signed: `ts` (unix seconds), `nonce` (hex) and `mac` = HMAC-SHA256(secret, canonical form).
- the **admin socket** (a root-only Unix socket): every op, no authentication.

`parse_request` turns one request line into a `Request` or a `Nack` and never raises, whatever
the bytes. On the control channel it checks, in this order, and stops at the first failure:

1. the source address (before the line is even looked at, so garbage from a stranger is
   refused without being parsed);
2. the line: at most `MAX_LINE` bytes with its newline, one line, UTF-8, one JSON object
   without duplicate keys or NaN/Infinity;
3. with a secret: `ts`, `nonce`, `mac` present and well formed; `ts` within `window` seconds
   of `now` either way; the MAC (constant-time compare); the nonce not seen before; room in the
   nonce cache. Only then is the nonce remembered, so a forged or altered message never burns
   one, and an unauthenticated peer learns nothing past "not authenticated";
4. the request: a known op allowed on this channel, no unknown fields, no field the op does
   not take, every required field present, every value well typed and in range.

Without a secret (or with `auth=None`), and always on the admin socket, `ts`, `nonce` and
`mac` are not required and, if present, are ignored unchecked: a client may sign everything.

Nothing here opens a socket, starts a thread or reads the clock: time comes in as `now`.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import ipaddress
import json
import math
import re
import secrets
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from lbnat import fields as checks
from lbnat.control.client import HA_ROLES

MAX_LINE = 4096
"""Bytes in a request line, its newline included; a longer line is refused."""

REGISTRATION_OPS = ("register", "unregister")
"""Ops allowed on the TCP control channel (and on the admin socket)."""

ADMIN_OPS = ("status", "sessions", "backend_add", "backend_remove", "backend_drain", "reload",
             "ha_role", "ha_status", "bgp_status", "drain_node")  # fmt: skip
"""Ops allowed only on the admin socket."""

OPS = REGISTRATION_OPS + ADMIN_OPS

AUTH_FIELDS = ("ts", "nonce", "mac")
REQUEST_FIELDS = ("op", "service", "ip", "port", "weight", "name", "role")

MAX_NAME = 64  # characters in a backend name
MAX_SERVICE = 64  # characters in a service name
MAX_WEIGHT = checks.MAX_WEIGHT
NONCE_MIN_HEX, NONCE_MAX_HEX = 16, 128

_BACKEND = frozenset({"service", "ip", "port"})
_RECORD = frozenset({"weight", "name"})
_NONE: frozenset[str] = frozenset()
# op -> (required fields, optional fields), "op" itself aside.
_FIELDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "register": (_BACKEND, _RECORD),
    "unregister": (_BACKEND, _NONE),
    "status": (_NONE, frozenset({"service"})),
    "sessions": (_NONE, frozenset({"service"})),
    "backend_add": (_BACKEND, _RECORD),
    "backend_remove": (_BACKEND, _NONE),
    "backend_drain": (_BACKEND, _NONE),
    "reload": (_NONE, _NONE),
    "ha_role": (frozenset({"role"}), _NONE),
    "ha_status": (_NONE, _NONE),  # the sync's status alone: no worker is asked (lbnat-ha check)
    "bgp_status": (_NONE, _NONE),  # announce the VIP? (lbnat-bgp, every 0.5 s): no worker asked
    "drain_node": (_NONE, _NONE),  # withdraw the VIP, stop when the flows have ended
}

_NONCE = re.compile(f"[0-9a-fA-F]{{{NONCE_MIN_HEX},{NONCE_MAX_HEX}}}")
_MAC = re.compile("[0-9a-f]{64}")

_SHOW_CHARS = 40  # of a peer's value quoted in a reason
_SHOW_NAMES = 5  # unknown field names quoted in a reason


@dataclass(frozen=True, slots=True)
class Request:
    """A valid request. `ip` is IPv4 or IPv6 text as `Backend` takes it (IPv6 in RFC 5952 form)."""

    op: str
    service: str | None = None  # required for register/unregister/backend_*
    ip: str | None = None
    port: int | None = None
    weight: int = 1  # register/backend_add only; 0..MAX_WEIGHT
    name: str = ""  # register/backend_add only; "" = the backend's default name
    role: str = ""  # ha_role only: one of HA_ROLES


@dataclass(frozen=True, slots=True)
class Nack:
    """A refused request: `reason` is one line, safe to send to the peer and to log; `kind`
    one word for the metrics' `reason` label (lbnat.metrics): "malformed" (not a request we
    understand), "not_allowed" (the source is not on the allow list), "auth" (signature,
    timestamp or nonce refused)."""

    reason: str
    kind: str = "malformed"


# --- authentication -------------------------------------------------------------------------


class Authenticator:
    """The control channel's gate: the source allow list, the HMAC secret and the nonce cache.

    The cache remembers each accepted nonce for as long as its `ts` would pass the timestamp
    check (until `now - ts > window`), so a replay is refused as a replay while its timestamp
    is fresh and by the timestamp check afterwards. Entries sit in a heap by `ts`: expiry pops
    only what has expired, O(log n) each. At `nonce_capacity` entries new requests are refused
    ("too many requests") instead of forgetting a nonce early. Only messages with a valid MAC
    reach the cache, so only holders of the secret can fill it.

    Thread-safe: the server's handler threads may share one Authenticator; a lock makes the
    expiry, the replay check and the recording of a nonce one step (it starts no thread).
    """

    __slots__ = ("_heap", "_lock", "_seen", "allow", "nonce_capacity", "secret", "window")

    def __init__(
        self,
        secret: bytes | None,
        window: float = 30.0,
        allow: Sequence[checks.IPNetwork] = (),
        nonce_capacity: int = 100_000,
    ) -> None:
        if secret is not None:
            if not isinstance(secret, bytes | bytearray):
                raise TypeError("the secret must be bytes")
            if not secret:
                raise ValueError("the secret is empty (None means no authentication)")
        if not (isinstance(window, int | float) and math.isfinite(window) and window > 0):
            raise ValueError(f"window {window!r} is not a positive number of seconds")
        if isinstance(nonce_capacity, bool) or not isinstance(nonce_capacity, int):
            raise TypeError("nonce_capacity must be an int")
        if nonce_capacity < 1:
            raise ValueError(f"nonce_capacity {nonce_capacity} is not positive")
        for network in allow:
            if not isinstance(network, ipaddress.IPv4Network | ipaddress.IPv6Network):
                raise TypeError(f"allow: {network!r} is not an IPv4Network or IPv6Network")
        self.secret: bytes | None = None if secret is None else bytes(secret)
        self.window = float(window)
        self.allow: tuple[checks.IPNetwork, ...] = tuple(allow)
        self.nonce_capacity = nonce_capacity
        self._seen: set[str] = set()
        self._heap: list[tuple[float, str]] = []  # (ts, nonce), one per remembered nonce
        self._lock = threading.Lock()

    def source_allowed(self, source_ip: str) -> bool:
        """May this peer address talk to the control channel? An empty allow list allows any
        source; otherwise only addresses in a listed network of their family (an IPv4-mapped
        IPv6 source, from a dual-stack "::" listener, is its IPv4 address). A string that is not
        an address is not allowed."""
        if not self.allow:
            return True
        try:
            address: checks.IPAddress = ipaddress.ip_address(source_ip)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.allow)

    def __len__(self) -> int:
        """Nonces remembered now."""
        return len(self._seen)

    def __contains__(self, nonce: object) -> bool:
        return nonce in self._seen

    def expire(self, now: float) -> int:
        """Forget nonces whose timestamp can no longer pass; return how many."""
        with self._lock:
            return self._expire(now)

    def _expire(self, now: float) -> int:
        heap, window = self._heap, self.window
        expired = 0
        while heap and now - heap[0][0] > window:
            _, nonce = heapq.heappop(heap)
            self._seen.discard(nonce)
            expired += 1
        return expired

    def verify(self, message: Mapping[str, object], now: float) -> Nack | None:
        """Authenticate a parsed request: None if it passes (its nonce is now remembered),
        else the Nack. Without a secret every message passes and nothing is remembered."""
        if self.secret is None:
            return None
        with self._lock:
            return self._verify(self.secret, message, now)

    def _verify(self, secret: bytes, message: Mapping[str, object], now: float) -> Nack | None:
        self._expire(now)
        missing = [field for field in AUTH_FIELDS if field not in message]
        if missing:
            return Nack(_missing(missing))
        ts, nonce, mac = message["ts"], message["nonce"], message["mac"]
        if isinstance(ts, bool) or not isinstance(ts, int | float):
            return Nack(f"ts: must be a number (unix seconds), not {_show(ts)}")
        try:
            stamp = float(ts)
        except OverflowError:
            stamp = math.inf
        if not math.isfinite(stamp):
            return Nack(f"ts: {_show(ts)} is not a finite number")
        if not isinstance(nonce, str) or not _NONCE.fullmatch(nonce):
            return Nack(
                f"nonce: must be a string of {NONCE_MIN_HEX}-{NONCE_MAX_HEX} hex digits, "
                f"not {_show(nonce)}"
            )
        if not isinstance(mac, str) or not _MAC.fullmatch(mac):
            return Nack(f"mac: must be a string of 64 lowercase hex digits, not {_show(mac)}")
        skew = now - stamp
        if not abs(skew) <= self.window:
            side = "behind" if skew > 0 else "ahead of"
            return Nack(
                f"ts: {_show(ts)} is {abs(skew):.6g} s {side} the server clock "
                f"(window {self.window:g} s)"
            )
        try:
            data = canonical({key: value for key, value in message.items() if key != "mac"})
        except (ValueError, RecursionError):  # a lone surrogate, an absurd nesting
            return Nack("request has no canonical form (a lone surrogate in a string?)")
        expected = hmac.new(secret, data, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected.encode(), mac.encode()):
            return Nack(
                "mac: does not match (a wrong secret, or the message changed after signing)"
            )
        if nonce in self._seen:
            return Nack("nonce: already used (a replayed request)")
        if len(self._seen) >= self.nonce_capacity:
            return Nack(
                f"too many requests: {self.nonce_capacity} nonces in the last "
                f"{self.window:g} s, try again later"
            )
        self._seen.add(nonce)
        heapq.heappush(self._heap, (stamp, nonce))
        return None


def canonical(message: Mapping[str, object]) -> bytes:
    """What the MAC covers: the message (without "mac") as compact JSON with sorted keys and
    non-ASCII characters as raw UTF-8. Raises ValueError for a string with a lone surrogate."""
    return json.dumps(message, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign(
    message: Mapping[str, object], secret: bytes, now: float, nonce: str | None = None
) -> dict[str, object]:
    """The client side: a copy of `message` with `ts` = now, `nonce` (16 random bytes as hex
    when None) and `mac` added; any `ts`, `nonce` or `mac` in `message` is replaced."""
    if not secret:
        raise ValueError("the secret is empty")
    if nonce is None:
        nonce = secrets.token_hex(16)
    elif not _NONCE.fullmatch(nonce):
        raise ValueError(f"nonce {nonce!r} is not {NONCE_MIN_HEX}-{NONCE_MAX_HEX} hex digits")
    signed: dict[str, object] = {key: value for key, value in message.items() if key != "mac"}
    signed["ts"] = now
    signed["nonce"] = nonce
    signed["mac"] = hmac.new(secret, canonical(signed), hashlib.sha256).hexdigest()
    return signed


# --- requests -------------------------------------------------------------------------------


def parse_request(
    line: bytes,
    *,
    source_ip: str,
    now: float,
    auth: Authenticator | None,
    admin: bool = False,
) -> Request | Nack:
    """Parse, authenticate and validate one request line (see the module's docstring for the
    order of the checks). `admin=True` is the admin socket: every op, no authentication, no
    source check. `auth=None` on the control channel means any source, no authentication.
    Never raises."""
    if not admin and auth is not None and not auth.source_allowed(source_ip):
        return Nack(f"source {_plain(source_ip)} is not allowed", "not_allowed")
    message = _load(line)
    if isinstance(message, Nack):
        return message
    if not admin and auth is not None:
        refused = auth.verify(message, now)
        if refused is not None:
            return Nack(refused.reason, "auth")
    fields = {key: value for key, value in message.items() if key not in AUTH_FIELDS}
    return _request(fields, admin)


class _Refused(ValueError):
    """Raised by the JSON hooks; the message is the reason."""


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise _Refused(f"duplicate field {_show(key)}")
        result[key] = value
    return result


def _no_constant(name: str) -> object:
    raise _Refused(f"request is not valid JSON: {name} is not a number")


def _load(line: bytes) -> dict[str, object] | Nack:
    body = line[:-1] if line.endswith(b"\n") else line
    if len(body) + 1 > MAX_LINE:
        return Nack(f"request line is longer than {MAX_LINE} bytes")
    if b"\n" in body:
        return Nack("a request is one line: it contains a newline")
    try:
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError as error:
        return Nack(f"request is not valid UTF-8 (byte {error.start})")
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except _Refused as error:
        return Nack(str(error))
    except json.JSONDecodeError as error:
        return Nack(f"request is not valid JSON: {error.msg} at column {error.colno}")
    except ValueError:  # an integer literal past sys.get_int_max_str_digits()
        return Nack("request is not valid JSON: a number is too long")
    except RecursionError:
        return Nack("request is not valid JSON: nested too deeply")
    if not isinstance(value, dict):
        return Nack(f"request must be a JSON object, not {_kind(value)}")
    return value


def _request(fields: dict[str, object], admin: bool) -> Request | Nack:
    if "op" not in fields:
        return Nack(_missing(["op"]))
    op = fields["op"]
    channel_ops = OPS if admin else REGISTRATION_OPS
    if not isinstance(op, str):
        return Nack(f"op: must be a string, not {_show(op)}")
    if op not in OPS:
        return Nack(f"op: unknown op {_show(op)} (ops: {', '.join(channel_ops)})")
    if op not in channel_ops:
        return Nack(f"op: {_show(op)} is allowed on the admin socket only")

    unknown = sorted(key for key in fields if key not in REQUEST_FIELDS)
    if unknown:
        return Nack(f"unknown {_names('field', unknown)}")
    required, optional = _FIELDS[op]
    extra = [key for key in REQUEST_FIELDS[1:] if key in fields]
    extra = [key for key in extra if key not in required and key not in optional]
    if extra:
        return Nack(f"{_names('field', extra)} not allowed with op {_show(op)}")
    missing = [key for key in REQUEST_FIELDS if key in required and key not in fields]
    if missing:
        return Nack(_missing(missing))

    service: str | None = None
    if "service" in fields:
        checked_service = _service(fields["service"])
        if isinstance(checked_service, Nack):
            return checked_service
        service = checked_service
    ip: str | None = None
    if "ip" in fields:
        checked_ip = _ip(fields["ip"])
        if isinstance(checked_ip, Nack):
            return checked_ip
        ip = checked_ip
    port: int | None = None
    if "port" in fields:
        checked_port = _number("port", checks.port, fields["port"])
        if isinstance(checked_port, Nack):
            return checked_port
        port = checked_port
    weight = 1
    if "weight" in fields:
        checked_weight = _number("weight", checks.weight, fields["weight"])
        if isinstance(checked_weight, Nack):
            return checked_weight
        weight = checked_weight
    name = ""
    if "name" in fields:
        checked_name = _name(fields["name"])
        if isinstance(checked_name, Nack):
            return checked_name
        name = checked_name
    role = ""
    if "role" in fields:
        given = fields["role"]
        if not isinstance(given, str) or given.lower() not in HA_ROLES:
            return Nack(f"role: must be one of {', '.join(HA_ROLES)}, not {_show(given)}")
        role = given.lower()
    return Request(op, service, ip, port, weight, name, role)


def _service(value: object) -> str | Nack:
    if not isinstance(value, str):
        return Nack(f"service: must be a string, not {_show(value)}")
    if not 0 < len(value) <= MAX_SERVICE or not value.isprintable():
        return Nack(
            f"service: {_show(value)} is not a service name (1-{MAX_SERVICE} printable characters)"
        )
    return value


def _ip(value: object) -> str | Nack:
    if not isinstance(value, str):
        return Nack(f"ip: must be a string, not {_show(value)}")
    try:
        address = checks.ip(value)
    except checks.FieldError:
        return Nack(f"ip: {_show(value)} is not an IPv4 or IPv6 address")
    unusable = checks.backend_unusable(address)
    if unusable:
        return Nack(f"ip: {address} is not a backend address ({unusable})")
    return str(address)


def _number(field: str, check: Callable[[object], int], value: object) -> int | Nack:
    """An integer field checked by lbnat.fields (the config's checks), told the protocol's way."""
    if isinstance(value, bool) or not isinstance(value, int):
        return Nack(f"{field}: must be an integer, not {_show(value)}")
    try:
        return check(value)
    except checks.FieldError as error:
        return Nack(f"{field}: {_show(value)} {error.problem}")


def _name(value: object) -> str | Nack:
    if not isinstance(value, str):
        return Nack(f"name: must be a string, not {_show(value)}")
    if len(value) > MAX_NAME or not value.isprintable():
        return Nack(
            f"name: {_show(value)} is not a backend name (at most {MAX_NAME} printable characters)"
        )
    return value


# --- reasons --------------------------------------------------------------------------------


def _kind(value: object) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return "a number"


def _show(value: object) -> str:
    """A peer's value as one short line of ASCII JSON (strings quoted and escaped)."""
    if isinstance(value, str):
        shown = json.dumps(value[:_SHOW_CHARS])
        return shown + "..." if len(value) > _SHOW_CHARS else shown
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    if value is None or isinstance(value, bool | int | float):
        return json.dumps(value)
    return _kind(value)


def _plain(text: str) -> str:
    """Trusted text (an address from the server) as is, unless it could break the line."""
    if isinstance(text, str) and text.isascii() and text.isprintable() and len(text) <= 64:
        return text
    return _show(text)


def _names(noun: str, names: Sequence[str]) -> str:
    shown = ", ".join(_show(name) for name in names[:_SHOW_NAMES])
    if len(names) > _SHOW_NAMES:
        shown += f" and {len(names) - _SHOW_NAMES} more"
    return f"{noun}s {shown}" if len(names) > 1 else f"{noun} {shown}"


def _missing(names: Sequence[str]) -> str:
    return f"missing {_names('field', names)}"


# --- replies --------------------------------------------------------------------------------


def encode(obj: Mapping[str, object]) -> bytes:
    """One compact JSON line, ASCII (other characters escaped), newline-terminated.
    Raises TypeError / ValueError for what JSON cannot carry (NaN, sets, ...)."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("ascii") + b"\n"


def ack(**fields: object) -> bytes:
    """A success reply: {"ok":true, ...fields}."""
    if "ok" in fields:
        raise TypeError('ack() sets "ok" itself')
    return encode({"ok": True, **fields})


def nack(reason: str) -> bytes:
    """A refusal: {"ok":false,"error":reason}."""
    return encode({"ok": False, "error": reason})
