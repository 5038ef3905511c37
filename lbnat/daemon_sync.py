"""The daemon's part in the session sync of an active/backup pair (docs/ha.md): the sync node
it runs, the standby changes and resync answers it relays between that node and the engines,
and keepalived's word on its role (`lbnat ha-role`).

A part of `Daemon` (lbnat.daemon) kept apart, as `Questions` is: the sync node's thread calls
into the data plane here, and the admin server's threads call `ha_role`.
"""

from __future__ import annotations

from collections.abc import Callable

from lbnat.config import Config
from lbnat.control.protocol import Request, ack, nack
from lbnat.dataplane.syncnode import Role, SyncNode
from lbnat.eventlog import Log
from lbnat.messages import AskSyncRows, DataPlane, StandbyChange
from lbnat.standby import SyncRecords
from lbnat.syncwire import RowUpdate

__all__ = ["SyncGlue"]


class SyncGlue:
    """The sync node and its glue (the attributes are the Daemon's)."""

    plane: DataPlane | None
    log: Log
    sync: SyncNode | None

    def _open_sync(self, config: Config) -> Callable[[SyncRecords], None] | None:
        """The sync node, its socket bound (OSError if it cannot be), its thread not started;
        returns where the engines' journals go (None: the sync is off)."""
        if config.sync is None:
            return None
        self.sync = SyncNode(config.sync, self._standby_change, self._sync_rows, self.log)
        return self.sync.submit

    def _start_sync(self) -> None:
        if self.sync is not None:
            self.sync.start()

    def _close_sync(self) -> None:
        if self.sync is not None:
            self.sync.close()
            self.sync = None

    def _standby_change(self, change: StandbyChange) -> None:
        """A peer's rows to every engine (on the sync thread)."""
        plane = self.plane
        if plane is not None:
            plane.change(change)

    def _sync_rows(self) -> list[RowUpdate]:
        """Every engine's rows, for a peer's resync (on the sync thread)."""
        plane = self.plane
        if plane is None:
            raise RuntimeError("lbnat is stopping")
        answers = plane.ask_each(AskSyncRows())
        workers = len(plane.info())
        if len(answers) < workers:  # a bulk without a worker's rows would sweep them
            raise RuntimeError(f"{workers - len(answers)} of {workers} workers did not answer")
        return [row for _, rows in answers for row in rows]

    def ha_request(self, request: Request) -> tuple[bytes, str | None]:
        """keepalived's hooks (lbnat.hatool): `ha_role` sets this node's VRRP role, both answer
        with the sync's status; the reply, and why a nack."""
        if self.sync is None:
            return nack("the session sync is off: start lbnat with --sync-peer"), "rejected"
        if request.op == "ha_role":
            if self.sync.settings.mode == "mesh":
                return nack("the sync is in mesh mode (instances behind ECMP): roles are for an "
                            "active/backup pair"), "rejected"  # fmt: skip
            self.sync.set_role(Role(request.role))
        return ack(op=request.op, **self.sync.status()), None
