"""Every message between the main process and the data plane, one frozen dataclass each, and the
one `DataPlane` protocol that carries them.

What this module may know: backends, service specs and engine events (the payloads). It
knows nothing of sockets, processes or engines: `lbnat.views` applies changes and answers
questions on an engine, `lbnat.dataplane.workers` carries them (in-process or pickled over a
socketpair to a worker), and both dispatch on the class with `match`.

    main process ─── Change (SetBackends, SetServices, ResetBackend, StandbyChange) ──► every engine
                 ─── Question (AskCounters, AskSessions, AskActive, AskSyncRows) ──► every engine
                 ◄── its answer (one per live worker)
    with N worker processes, on each worker's socketpair:
    main ── WorkerSetup (first), ApplyChange, Ask, Stop ──► worker
    main ◄── Ready, WorkerFailed, Events, Answer, SyncOut ── worker
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from lbnat.backends import Backend, BackendKey
from lbnat.checkpoint import RestoreReport
from lbnat.engine import Event
from lbnat.service import Service
from lbnat.standby import StandbyEffect, SyncRecords
from lbnat.syncookie import SynProxySettings

if TYPE_CHECKING:  # only annotations: this module stays free of the I/O modules
    from lbnat.dataplane.link import Link
    from lbnat.dataplane.rings import RingSpec
    from lbnat.nat import Timeouts

# --- changes: what the control plane tells every engine ------------------------------------


@dataclass(frozen=True, slots=True)
class SetBackends:
    """A new snapshot of one service's backends (health, draining, weights)."""

    service: str
    backends: tuple[Backend, ...]


@dataclass(frozen=True, slots=True)
class SetServices:
    """A reload: every service's spec; the `added` ones are new; `cursor_slots` is each
    service's round-robin word in the workers' shared memory."""

    specs: tuple[Service, ...]
    added: frozenset[str]
    cursor_slots: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ResetBackend:
    """--on-dead reset: end the dead backend's flows at both ends with RSTs."""

    service: str
    backend: BackendKey


@dataclass(frozen=True, slots=True)
class StandbyChange:
    """A peer's rows, applied as standby rows (lbnat.standby; the session sync is on)."""

    effect: StandbyEffect


Change = SetBackends | SetServices | ResetBackend | StandbyChange


# --- questions: what the control plane asks every engine -----------------------------------


@dataclass(frozen=True, slots=True)
class AskCounters:
    """Rows, open flows, packets, bytes, drops; per service and backend (engine_counters)."""


@dataclass(frozen=True, slots=True)
class AskSessions:
    """Every row (views.session_rows)."""


@dataclass(frozen=True, slots=True)
class AskActive:
    """Open flows of these (service, backend) pairs, for draining."""

    backends: tuple[tuple[str, BackendKey], ...]


@dataclass(frozen=True, slots=True)
class AskSyncRows:
    """Every row a peer should hold a copy of (a resync's answer, lbnat.standby)."""


Question = AskCounters | AskSessions | AskActive | AskSyncRows


# --- the worker wire: main process -> worker --------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkerSetup:
    """Everything a worker process needs to build its loop, sent as its first message.
    (Defined here, not in lbnat.dataplane.workers: a worker runs that module as __main__,
    where a class of its own would not be the one the main process pickled.)"""

    index: int
    lb_ip: str
    vip: str  # where clients connect: lb_ip unless --vip (Engine)
    link: Link
    specs: tuple[Service, ...]
    nat_ports: tuple[int, int]  # this worker's slice
    timeouts: Timeouts
    table_cap: int
    io: str  # "rings" or "socket"
    rings: RingSpec
    flow_events: bool  # send FlowOpened/FlowEnded (the log shows them) or only NoBackend
    cursor_slots: dict[str, int] = field(default_factory=dict)
    ip6: str | None = None  # the LB's IPv6 address (dual stack), or None (Engine)
    # The same secret in every worker: each checks any worker's cookies.
    syn_proxy: SynProxySettings = field(default_factory=lambda: SynProxySettings(mode="off"))
    # The kernel fast path's map (lbnat.dataplane.offload): an fd the worker inherits, -1: none.
    offload_fd: int = -1
    offload6_fd: int = -1  # its IPv6 flows' map, the same way
    ifindex: int = 0  # the interface the program redirects to
    sync: bool = False  # the session sync is on: journal the rows, apply a peer's (lbnat.standby)
    # "mesh": the peers' rows say which instance owns a flow (lbnat.owners), "pair": standby rows
    sync_mode: str = "pair"


@dataclass(frozen=True, slots=True)
class ApplyChange:
    change: Change


@dataclass(frozen=True, slots=True)
class Ask:
    request: int  # answered by the Answer with the same number
    question: Question


@dataclass(frozen=True, slots=True)
class Stop:
    pass


ToWorker = ApplyChange | Ask | Stop


# --- the worker wire: worker -> main process --------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ready:
    """The worker is about to read its first frame, with the rows of its predecessor (if any)
    rebuilt from its checkpoint (lbnat.checkpoint)."""

    pid: int
    restored: RestoreReport = field(default_factory=RestoreReport)


@dataclass(frozen=True, slots=True)
class WorkerFailed:
    """The worker could not start, or could not apply a change (the message is for the user)."""

    error: str


@dataclass(frozen=True, slots=True)
class Events:
    events: list[Event]


@dataclass(frozen=True, slots=True)
class Answer:
    request: int
    ok: bool
    value: Any  # the engine's answer (lbnat.views.answer), or the error text when not ok


@dataclass(frozen=True, slots=True)
class SyncOut:
    """A batch of the worker's row changes for the session sync's peers."""

    records: SyncRecords


FromWorker = Ready | WorkerFailed | Events | Answer | SyncOut


# --- the data plane as the daemon sees it -----------------------------------------------------


class DataPlane(Protocol):
    """One loop in the main process (InlinePlane) or N worker processes (WorkerPool)."""

    def run(self, upkeep: Callable[[float], None]) -> None:
        """Forward until stop(); call `upkeep(now)` between batches or supervision rounds."""

    def stop(self) -> None: ...

    def change(self, change: Change) -> None:
        """Apply `change` on every engine, in the order changes are given."""

    def ask(self, question: Question, timeout: float = 5.0) -> list[Any]:
        """Every live engine's answer to `question`."""

    def ask_each(self, question: Question, timeout: float = 5.0) -> list[tuple[int, Any]]:
        """The same, each with its worker's index (metrics label their series by worker)."""

    def set_filter(self, program: bytes, program6: bytes | None = None) -> None: ...

    def info(self) -> list[dict[str, object]]:
        """Index, pid, alive and restarts of each worker (for status)."""

    def restored(self) -> RestoreReport:
        """The rows the engines took over from a state file at start (--state-file)."""

    def close(self) -> None: ...
