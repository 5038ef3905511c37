"""A hitless restart (`lbnat run --state-file PATH`, issue 19): one lbnat hands its flows to
the next.

    lbnat A (running)    every worker keeps its rows in PATH.rows-<i> (lbnat.checkpoint's
                         records, written on open, state change and removal); PATH says who
                         wrote them (lbnat.statefile), `saved` false
    SIGTERM/SIGINT       the workers stop (their files are fsync'ed and closed); the nftables
                         table, the reserved NAT ports and the tc filter are left in place
                         (`Handover.leave`); PATH is rewritten with `saved` true and the rows
    (the gap)            the host's kernel drops the packets to the VIP and NAT ports (the
                         guard) instead of answering RSTs, so TCP retransmits; the tc program
                         keeps rewriting the flows in its maps (it holds both, IPv4's and
                         IPv6's)
    lbnat B starts       `Handover.take`: PATH fits (same address, NAT range, workers)? keep
                         the row files, else remove them (one line why); the guard is installed
                         over A's in one nft transaction, the tc filter replaced (A's program
                         and maps go), every worker restores its rows before its first frame
                         (the same path a restarted worker takes) and puts the established
                         ones back into the kernel; one line says how many rows came back

`cleanup` undoes what a stopped lbnat left when no lbnat follows (`lbnat cleanup`, the systemd
unit's ExecStopPost on `systemctl stop`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable

from lbnat.checkpoint import HEADER_SIZE, RECORD_SIZE, RestoreReport, records_below
from lbnat.config import Config
from lbnat.dataplane.guard import GuardError, KernelGuard, remove_leftover
from lbnat.dataplane.offload import KernelPath, filter_handle
from lbnat.dataplane.tcbpf import OffloadUnavailable, detach_stale
from lbnat.engine import ip_int
from lbnat.statefile import StateHeader, decode, encode, misfit, row_file

Logger = Callable[..., None]  # lbnat.eventlog.Log's call: (text, event, level=..., **fields)


class HandoverError(Exception):
    """The state file cannot be used at all (the message is for the user)."""


def rows_in(path: str) -> int:
    """Rows a row file holds (records whose slot is in use); 0 for a missing file."""
    try:
        with open(path, "rb") as f:
            below = records_below(f.read(HEADER_SIZE))
            marks = f.read(below * RECORD_SIZE)[::RECORD_SIZE]
    except FileNotFoundError:
        return 0
    return sum(1 for mark in marks if mark)


def write_header(path: str, header: StateHeader) -> None:
    """Replace PATH atomically (a reader sees the old header or the new, never half)."""
    temporary = f"{path}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, encode(header))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)


def read_header(path: str) -> StateHeader | None:
    """The header at PATH; None when there is none; ValueError when it cannot be used."""
    try:
        with open(path, "rb") as f:
            raw = f.read(1 << 20)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise ValueError(f"cannot read it: {error.strerror}") from None
    return decode(raw)


def header_for(config: Config, interface: str) -> StateHeader:
    """What this lbnat writes (and compares a previous one's header with)."""
    assert config.lb_ip is not None
    services = tuple((s.service.name, s.service.proto, s.service.port) for s in config.services)
    return StateHeader(
        config.lb_ip, interface, config.nat_ports, config.workers, services, time.time(),
        pid=os.getpid(), ip6=config.ip6,
    )  # fmt: skip


class Handover:
    """This lbnat's end of a hitless restart: take a predecessor's rows and guard at start,
    leave its own at exit."""

    def __init__(self, path: str, log: Logger) -> None:
        self.path = path
        self.log = log
        self.header: StateHeader | None = None
        self.previous: StateHeader | None = None  # the header found at start, when it fitted

    def row_files(self, workers: int) -> list[str]:
        return [row_file(self.path, i) for i in range(workers)]

    def take(self, config: Config, interface: str) -> list[str]:
        """At start, before the guard: decide whether the rows at PATH fit this lbnat (if not,
        say why once and start empty), mark PATH as this lbnat's (`saved` false: a kill leaves
        it so) and return each worker's row file."""
        wanted = header_for(config, interface)
        files = self.row_files(config.workers)
        why: str | None = None
        try:
            found = read_header(self.path)
        except ValueError as error:
            found, why = None, str(error)
        if found is not None:
            why = misfit(found, wanted)
        if found is not None and why is None:
            self.previous = found
        else:
            self._forget(max(config.workers, found.workers if found else 0))
            if why is not None:
                self.log(
                    f"state file : {self.path} not used ({why}); starting with empty tables",
                    "state_refused",
                    level=logging.WARNING,
                    path=self.path,
                    reason=why,
                )
        try:
            write_header(self.path, wanted)
        except OSError as error:
            raise HandoverError(f"cannot write the state file {self.path}: {error}") from None
        self.header = wanted
        return files

    def _forget(self, workers: int) -> None:
        """Remove row files that must not be restored (they do not fit, or have no header)."""
        for path in self.row_files(workers):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def restored(self, report: RestoreReport) -> None:
        """One line once every engine has taken its rows (only when a state file fitted)."""
        previous = self.previous
        if previous is None:
            return
        how = "saved at its stop" if previous.saved else "left by an lbnat that did not stop"
        dropped = ""
        if report.dropped:
            reasons = ", ".join(f"{n} {why}" for why, n in sorted(report.dropped.items()))
            dropped = f"; {report.dropped_total} dropped: {reasons}"
        self.log(
            f"restored {report.rows} rows from {self.path} ({how}{dropped})",
            "state_restored",
            path=self.path,
            rows=report.rows,
            open_flows=report.open_flows,
            dropped=dict(report.dropped),
            clean=previous.saved,
        )

    def leave(self, guard: KernelGuard | None, offload: KernelPath | None) -> None:
        """At exit, after the data plane has stopped (its row files are closed): leave the
        guard, the reserved ports and the tc filter for the next lbnat, and say so in PATH and
        in the log."""
        header = self.header
        if header is None:
            return
        if guard is not None:
            guard.release()
        if offload is not None:
            offload.release()
        rows = sum(rows_in(path) for path in self.row_files(header.workers))
        saved = StateHeader(
            header.lb_ip, header.interface, header.nat_ports, header.workers, header.services,
            time.time(), saved=True, rows=rows, offload_kept=offload is not None, pid=header.pid,
            ip6=header.ip6,
        )  # fmt: skip
        try:
            write_header(self.path, saved)
        except OSError as error:  # the rows are there; the next lbnat takes them as a crash's
            self.log(f"state file : cannot rewrite {self.path}: {error}", "state_error",
                     level=logging.WARNING, path=self.path)  # fmt: skip
        self.log(
            f"state saved: {rows} rows in {self.path}; guard kept for the next lbnat",
            "state_saved",
            path=self.path,
            rows=rows,
        )


def running(pid: int) -> bool:
    """Whether process `pid` is alive (and not this one)."""
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup(path: str) -> list[str]:
    """Remove what the lbnat that wrote PATH left for a successor (its nftables table, its
    reserved NAT ports, its tc filter) and the state files themselves; what was done, one
    line each. HandoverError when PATH cannot be read."""
    try:
        header = read_header(path)
    except ValueError as error:
        raise HandoverError(f"{path}: {error}") from None
    if header is None:
        return [f"{path}: no state file, nothing to clean"]
    if not header.saved and running(header.pid):
        raise HandoverError(
            f"{path} belongs to the lbnat running as pid {header.pid}: stop it first"
        )
    done: list[str] = []
    try:
        left = remove_leftover(header.lb_ip)
    except GuardError as error:
        raise HandoverError(str(error)) from None
    if left is not None:
        done.append(f"removed the nftables guard of {header.lb_ip} and gave back "
                    f"reserved ports {left[0]}-{left[1]}")  # fmt: skip
    try:
        ifindex = socket.if_nametoindex(header.interface)
        if detach_stale(ifindex, filter_handle(ip_int(header.lb_ip))):
            done.append(f"removed the tc filter of {header.lb_ip} from {header.interface}")
    except OSError:
        pass  # the interface is gone, and its filters with it
    except OffloadUnavailable as error:
        done.append(f"tc filter on {header.interface} not removed: {error}")
    for leftover in [path, *(row_file(path, i) for i in range(header.workers))]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(leftover)
    done.append(f"removed {path} and its row files")
    return done
