"""The authoritative list of every service's backends, and what may change it. Pure.

Three writers meet here: the config (and its reloads), the control channel (backends that
register and unregister themselves, admin commands) and the health checker (verdicts). Each
change produces a new immutable snapshot per service for the packet loop; nothing here touches
the session table. The daemon serialises calls with one lock.

Lifecycles:
- A backend from the config starts alive (the original assumes so until the first probe).
- A backend that registers at run time starts dead ("waiting for its first good probe") when
  its service is health-checked: it gets flows only once a probe has seen it answer.
- Unregister or drain: the backend is *draining*: no new flows, existing flows go on; it is
  removed once its last flow has ended, or when the drain timeout passes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from lbnat.addresses import is_v6
from lbnat.backends import Backend, BackendKey, Health
from lbnat.fields import host_port_text
from lbnat.service import dr_misfit


class RegistryError(ValueError):
    """A change that cannot be made (unknown service, duplicate backend, ...); the message is
    the reason sent back to whoever asked."""


@dataclass(slots=True)
class Entry:
    backend: Backend  # ip, port, weight, name; health and draining live in the fields below
    health: Health
    origin: str  # "config", "registered" or "admin"
    drain_deadline: float | None = None  # set while draining

    @property
    def draining(self) -> bool:
        return self.drain_deadline is not None


@dataclass
class Registry:
    drain_timeout: float = 300.0
    _services: dict[str, dict[BackendKey, Entry]] = field(default_factory=dict)
    _probed: set[str] = field(default_factory=set)  # services with a health check
    _direct: dict[str, int] = field(default_factory=dict)  # dr services' ports (lbnat.direct)

    # --- services ---------------------------------------------------------------------------

    def set_service(
        self, name: str, backends: Iterable[Backend], probed: bool, dr_port: int = 0
    ) -> None:
        """Define (or redefine, on reload) a service's configured backends.

        Backends that stay keep their health and drain state; new ones start alive; config
        backends that are gone are drained (their flows go on); registered backends stay.
        """
        entries = self._services.setdefault(name, {})
        if dr_port:  # a direct-routed service takes backends on its own port alone
            self._direct[name] = dr_port
        else:
            self._direct.pop(name, None)
        wanted = {b.key: b for b in backends}
        for key, backend in wanted.items():
            entry = entries.get(key)
            if entry is None:
                entries[key] = Entry(backend, Health.ALIVE, "config")
            else:
                entry.backend = backend  # a new weight or name
                entry.origin = "config"
                entry.drain_deadline = None
        for key, entry in entries.items():
            if entry.origin == "config" and key not in wanted and not entry.draining:
                entry.drain_deadline = float("inf")  # swept at the next call with a clock
        if probed:
            self._probed.add(name)
        else:
            self._probed.discard(name)

    def services(self) -> list[str]:
        return list(self._services)

    def snapshot(self, service: str) -> tuple[Backend, ...]:
        """The service's backends as the data plane must see them, in registration order."""
        return tuple(
            replace(e.backend, health=e.health, draining=e.draining)
            for e in self._entries(service).values()
        )

    def entries(self, service: str) -> list[Entry]:
        return list(self._entries(service).values())

    # --- run-time changes -------------------------------------------------------------------

    def add(self, service: str, backend: Backend, origin: str = "registered") -> Entry:
        entries = self._entries(service)
        entry = entries.get(backend.key)
        if entry is not None and not entry.draining:
            shown = host_port_text(backend.ip, backend.port)
            raise RegistryError(f"backend {shown} is already in service {service}")
        if service in self._direct:
            misfit = dr_misfit(service, self._direct[service], (backend,))
            if misfit:
                raise RegistryError(misfit)
        v6 = is_v6(backend.ip_int)
        other = next((e.backend for e in entries.values() if is_v6(e.backend.ip_int) != v6), None)
        if other is not None:  # a draining one too: its flows still use the service's pool
            raise RegistryError(
                f"backend {host_port_text(backend.ip, backend.port)} is IPv{6 if v6 else 4} and "
                f"service {service} has IPv{4 if v6 else 6} backends "
                f"({host_port_text(other.ip, other.port)}): a service's backends are all of "
                "one family"
            )
        # A probed service takes a new backend only after a good probe; an unprobed one at once.
        health = Health.DEAD if service in self._probed else Health.ALIVE
        if entry is not None:  # re-registered while draining: it comes back
            entry.backend, entry.origin, entry.drain_deadline = backend, origin, None
            return entry
        entry = entries[backend.key] = Entry(backend, health, origin)
        return entry

    def drain(
        self, service: str, key: BackendKey, now: float, timeout: float | None = None
    ) -> Entry:
        entry = self._entry(service, key)
        if not entry.draining:
            entry.drain_deadline = now + (self.drain_timeout if timeout is None else timeout)
        return entry

    def remove(self, service: str, key: BackendKey) -> Entry:
        entry = self._entry(service, key)
        del self._services[service][key]
        return entry

    def set_health(self, service: str, key: BackendKey, health: Health) -> bool:
        """Record a verdict; False if the backend is no longer there (removed meanwhile)."""
        entry = self._services.get(service, {}).get(key)
        if entry is None:
            return False
        entry.health = health
        return True

    def sweep(
        self, now: float, active: Callable[[str, BackendKey], int]
    ) -> list[tuple[str, Entry]]:
        """Remove draining backends whose last flow has ended or whose drain time is up.
        `active(service, key)` is the number of open flows (asked of the packet loop)."""
        removed = []
        for service, entries in self._services.items():
            for key, entry in list(entries.items()):
                if not entry.draining:
                    continue
                assert entry.drain_deadline is not None
                if entry.drain_deadline == float("inf"):  # dropped from the config on reload
                    entry.drain_deadline = now + self.drain_timeout
                if active(service, key) == 0 or now >= entry.drain_deadline:
                    del entries[key]
                    removed.append((service, entry))
        return removed

    @property
    def any_draining(self) -> bool:
        return any(e.draining for entries in self._services.values() for e in entries.values())

    # --- helpers ----------------------------------------------------------------------------

    def _entries(self, service: str) -> dict[BackendKey, Entry]:
        entries = self._services.get(service)
        if entries is None:
            known = ", ".join(sorted(self._services)) or "none"
            raise RegistryError(f"unknown service {service!r} (services: {known})")
        return entries

    def _entry(self, service: str, key: BackendKey) -> Entry:
        entry = self._entries(service).get(key)
        if entry is None:
            raise RegistryError(f"backend {host_port_text(*key)} is not in service {service}")
        return entry
