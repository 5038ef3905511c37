"""Schedulers: which backend takes a NEW flow.

A scheduler is pure state: the engine hands it a fresh immutable backend snapshot with
`update()` whenever health or registration changes, and asks `pick()` once per new flow. Flows
already in the session table never come back here, so a scheduler only shapes where new flows go.

Every kind sees ALL of the service's backends, eligible or not, in config order, and skips the
ineligible ones itself: keeping dead backends in the list is what lets round-robin put a revived
backend back in its old place instead of at the end.
"""

from __future__ import annotations

import hashlib
import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from lbnat.backends import Backend, BackendKey

__all__ = [
    "DEFAULT_MAGLEV_TABLE_SIZE",
    "DEFAULT_SCHEDULER",
    "SCHEDULERS",
    "LeastConnections",
    "Maglev",
    "RoundRobin",
    "Scheduler",
    "SharedCursor",
    "WeightedRoundRobin",
    "backend_code",
    "make_scheduler",
]

DEFAULT_SCHEDULER = "rr"
DEFAULT_MAGLEV_TABLE_SIZE = 65537

_MASK64 = (1 << 64) - 1


class Scheduler(Protocol):
    name: str

    def update(self, backends: Sequence[Backend]) -> None:
        """Take a new snapshot of all the service's backends (eligible or not), in config order."""
        ...

    def pick(self, flow_hash: int, active: Mapping[BackendKey, int]) -> Backend | None:
        """Choose a backend for a new flow; None when no backend is eligible."""
        ...


class SharedCursor(Protocol):
    """One word that several workers' rotations share (lbnat.dataplane.workers maps it)."""

    def load(self) -> int: ...

    def store(self, value: int) -> None: ...


def backend_code(backend: Backend) -> int:
    """A backend as one non-zero integer that fits the SharedCursor's 64 bits (0 means nothing
    picked yet): an IPv4 backend's address and port as they are; an IPv6 one's hashed into
    bit 62 and below (its own range: an IPv4 code stays under 2**48)."""
    if backend.ip_int > 0xFFFFFFFF:
        digest = hashlib.blake2b(f"{backend.ip}:{backend.port}".encode(), digest_size=8).digest()
        return (int.from_bytes(digest, "big") >> 2) | (1 << 62)
    return ((backend.ip_int << 16) | backend.port) + 1


class _Rotation:
    """A round-robin cursor that survives snapshot changes.

    The cursor is anchored to the last picked backend's KEY, not to an index: a new snapshot may
    insert or remove backends, and an index would then point at a different backend and make the
    rotation jump (or give one backend two turns in a row).

    With a SharedCursor, workers that each own a rotation over the same backends take turns in
    one rotation: the last pick (as `backend_code`) is published, and a rotation that sees a
    newer one re-anchors there before it scans. No lock: two workers picking at the same instant
    may both take the same backend, which moves the balance by one flow, never a flow's path.
    """

    __slots__ = ("_backends", "_codes", "_cursor", "_last_key", "_next", "_seen")

    def __init__(self, cursor: SharedCursor | None = None) -> None:
        self._backends: tuple[Backend, ...] = ()
        # Where the next scan starts. When _last_key is in the snapshot, _next is the slot after
        # it; otherwise (nothing picked yet, or the last pick was removed) _next is the anchor.
        self._next = 0
        self._last_key: BackendKey | None = None
        self._cursor = cursor
        self._seen = 0  # the shared code this rotation last read or wrote
        self._codes: dict[int, int] = {}  # backend_code -> index in the snapshot

    @property
    def backends(self) -> tuple[Backend, ...]:
        return self._backends

    def update(self, backends: Sequence[Backend]) -> None:
        old = self._backends
        new = tuple(backends)
        self._backends = new
        if self._cursor is not None:
            self._codes = {backend_code(b): i for i, b in enumerate(new)}
        if not new:
            # Keep the anchor: when backends come back, the rotation goes on after the last
            # one picked instead of giving it a second turn in a row.
            return
        index_of = {backend.key: i for i, backend in enumerate(new)}
        if self._last_key is not None and self._last_key in index_of:
            self._next = (index_of[self._last_key] + 1) % len(new)
            return
        # The anchor is gone (or there never was one): resume at the first backend, from the
        # old scan position on, that survives into the new snapshot. That is "the position where
        # the removed backend was", robust to other removals around it.
        # The last pick's key is kept: if that backend returns in a later snapshot, the rotation
        # continues after it rather than giving it a second turn in a row.
        start = self._next % len(old) if old else 0
        self._next = 0
        for step in range(len(old)):
            survivor = index_of.get(old[(start + step) % len(old)].key)
            if survivor is not None:
                self._next = survivor
                return

    def order(self) -> list[int]:
        """Indices of the snapshot in scan order, starting after the last pick."""
        if self._cursor is not None:
            shared = self._cursor.load()
            if shared != self._seen:
                self._seen = shared
                index = self._codes.get(shared)
                if index is not None:  # another worker picked last: go on after its pick
                    self._last_key = self._backends[index].key
                    self._next = (index + 1) % len(self._backends)
        count = len(self._backends)
        start = self._next % count if count else 0
        return [*range(start, count), *range(start)]

    def picked(self, index: int) -> Backend:
        backend = self._backends[index]
        self._last_key = backend.key
        self._next = (index + 1) % len(self._backends)
        if self._cursor is not None:
            self._seen = backend_code(backend)
            self._cursor.store(self._seen)
        return backend


class RoundRobin:
    """Each eligible backend in turn, in config order; the default scheduler."""

    name = "rr"

    def __init__(self, cursor: SharedCursor | None = None) -> None:
        self._rotation = _Rotation(cursor)

    def update(self, backends: Sequence[Backend]) -> None:
        self._rotation.update(backends)

    def pick(self, flow_hash: int, active: Mapping[BackendKey, int]) -> Backend | None:
        backends = self._rotation.backends
        for index in self._rotation.order():
            if backends[index].eligible:
                return self._rotation.picked(index)
        return None


class WeightedRoundRobin:
    """nginx's smooth weighted round-robin: weights 5,1,1 give a a b a c a a, not a a a a a b c."""

    name = "wrr"

    def __init__(self) -> None:
        self._backends: tuple[Backend, ...] = ()
        # Kept by key across snapshots so a health flap or an added backend does not restart
        # everyone else's cycle.
        self._current: dict[BackendKey, int] = {}

    def update(self, backends: Sequence[Backend]) -> None:
        self._backends = tuple(backends)
        self._current = {b.key: self._current.get(b.key, 0) for b in self._backends}

    def pick(self, flow_hash: int, active: Mapping[BackendKey, int]) -> Backend | None:
        current = self._current
        best: Backend | None = None
        best_weight = 0
        total = 0
        for backend in self._backends:
            if not backend.eligible:
                continue
            weight = current[backend.key] + backend.weight
            current[backend.key] = weight
            total += backend.weight
            # Strictly greater: on a tie the earlier backend in config order wins, as in nginx.
            if best is None or weight > best_weight:
                best = backend
                best_weight = weight
        if best is not None:
            current[best.key] -= total
        return best


class LeastConnections:
    """The eligible backend with the fewest active flows per unit of weight.

    Ties go to the first candidate in round-robin order, so a burst of new flows on an idle
    service still spreads instead of piling onto the first backend before its count rises.
    """

    name = "lc"

    def __init__(self, cursor: SharedCursor | None = None) -> None:
        self._rotation = _Rotation(cursor)

    def update(self, backends: Sequence[Backend]) -> None:
        self._rotation.update(backends)

    def pick(self, flow_hash: int, active: Mapping[BackendKey, int]) -> Backend | None:
        backends = self._rotation.backends
        best_index = -1
        best_active = 0
        best_weight = 1
        for index in self._rotation.order():
            backend = backends[index]
            if not backend.eligible:
                continue
            flows = active.get(backend.key, 0)
            # flows/weight < best_active/best_weight, cross-multiplied to stay in exact integers.
            if best_index < 0 or flows * best_weight < best_active * backend.weight:
                best_index = index
                best_active = flows
                best_weight = backend.weight
        if best_index < 0:
            return None
        return self._rotation.picked(best_index)


def is_prime(number: int) -> bool:
    if number < 2:
        return False
    if number % 2 == 0:
        return number == 2
    return all(number % divisor for divisor in range(3, math.isqrt(number) + 1, 2))


def mix64(value: int) -> int:
    """splitmix64's finalizer: spreads sequential inputs (client ports) over all 64 bits."""
    value &= _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def _permutation(backend: Backend, table_size: int) -> tuple[int, int]:
    """(offset, skip) of the backend's preference list, from a hash stable across processes.

    Python's hash() is salted per process; two load balancers (or a restarted one) must build
    the same table or established clients would be sent elsewhere.
    """
    digest = hashlib.blake2b(
        f"{backend.name}\0{backend.ip}:{backend.port}".encode(), digest_size=16
    ).digest()
    h1 = int.from_bytes(digest[:8], "little")
    h2 = int.from_bytes(digest[8:], "little")
    # A prime table size and 1 <= skip < M make every preference list a full permutation.
    return h1 % table_size, h2 % (table_size - 1) + 1


def _populate(
    offsets: Sequence[int], skips: Sequence[int], turns: Sequence[int], table_size: int
) -> list[int]:
    """Maglev's population loop (NSDI 2016, Pseudocode 1) with weighted turns.

    Each backend claims its next preferred empty slot, `turns[i]` times per round. The preference
    list is walked incrementally (add skip, wrap once) rather than recomputed with a multiply
    and a modulo per probe; this loop is the whole cost of a rebuild.
    """
    table = [-1] * table_size
    positions = list(offsets)
    filled = 0
    while True:
        for owner, skip in enumerate(skips):
            position = positions[owner]
            for _ in range(turns[owner]):
                while table[position] >= 0:
                    position += skip
                    if position >= table_size:
                        position -= table_size
                table[position] = owner
                position += skip
                if position >= table_size:
                    position -= table_size
                filled += 1
                if filled == table_size:
                    return table
            positions[owner] = position


class Maglev:
    """Google's Maglev consistent hashing: a flow's backend changes only if its backend leaves.

    Only the low 64 bits of `flow_hash` are used, passed through a mixer so that hashes of
    neighbouring client ports land in unrelated slots.

    Weights: a backend of weight w takes w turns per population round (the paper's weighted
    variant, section 3.4), divided by the weights' gcd first so 10,10,20 costs what 1,1,2 does.
    """

    name = "maglev"

    def __init__(self, table_size: int = DEFAULT_MAGLEV_TABLE_SIZE) -> None:
        if isinstance(table_size, bool) or not isinstance(table_size, int):
            raise ValueError(f"maglev table_size must be an integer, not {table_size!r}")
        if not is_prime(table_size):
            raise ValueError(f"maglev table_size {table_size} is not a prime number")
        self.table_size = table_size
        self.rebuilds = 0
        # Eligible backends in a canonical order (by key), so that config order does not change
        # the table: two instances fed the same backends in any order agree on every flow.
        self._eligible: tuple[Backend, ...] = ()
        self._signature: tuple[tuple[BackendKey, str, int], ...] = ()
        self._table: list[int] = []

    def update(self, backends: Sequence[Backend]) -> None:
        eligible = tuple(sorted((b for b in backends if b.eligible), key=lambda b: b.key))
        signature = tuple((b.key, b.name, b.weight) for b in eligible)
        # Always take the new records (e.g. ALIVE -> BAD), so pick() never returns a stale one;
        # same signature means same order, so the table's indices still point at the same keys.
        self._eligible = eligible
        if signature == self._signature:
            return
        self._signature = signature
        self._table = self._build(eligible) if eligible else []
        self.rebuilds += 1

    def _build(self, eligible: tuple[Backend, ...]) -> list[int]:
        permutations = [_permutation(backend, self.table_size) for backend in eligible]
        divisor = math.gcd(*(backend.weight for backend in eligible))
        return _populate(
            [offset for offset, _ in permutations],
            [skip for _, skip in permutations],
            [backend.weight // divisor for backend in eligible],
            self.table_size,
        )

    def pick(self, flow_hash: int, active: Mapping[BackendKey, int]) -> Backend | None:
        if not self._table:
            return None
        return self._eligible[self._table[mix64(flow_hash) % self.table_size]]

    def table_counts(self) -> dict[BackendKey, int]:
        """How many table slots each eligible backend owns (its share of new flows)."""
        counts = dict.fromkeys((backend.key for backend in self._eligible), 0)
        for owner in self._table:
            counts[self._eligible[owner].key] += 1
        return counts


SCHEDULERS: dict[str, type[Scheduler]] = {
    RoundRobin.name: RoundRobin,
    WeightedRoundRobin.name: WeightedRoundRobin,
    LeastConnections.name: LeastConnections,
    Maglev.name: Maglev,
}


def make_scheduler(name: str, **options: Any) -> Scheduler:
    """Build the scheduler called `name`; ValueError names the problem for config errors."""
    try:
        kind = SCHEDULERS[name]
    except KeyError:
        known = ", ".join(sorted(SCHEDULERS))
        raise ValueError(f"unknown scheduler {name!r}; known schedulers: {known}") from None
    try:
        inspect.signature(kind).bind(**options)
    except TypeError:
        accepted = ", ".join(inspect.signature(kind).parameters) or "none"
        given = ", ".join(sorted(options))
        raise ValueError(
            f"scheduler {name!r} does not accept option(s) {given}; accepted options: {accepted}"
        ) from None
    return kind(**options)
