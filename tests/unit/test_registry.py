"""The backend registry: configured, registered, draining and removed backends, and the
snapshots the data plane gets."""

from __future__ import annotations

import pytest

from lbnat.backends import Backend, Health
from lbnat.registry import Registry, RegistryError

B1, B2, B3 = (
    Backend("198.18.0.21", 9000),
    Backend("198.18.0.22", 9000),
    Backend("198.18.0.23", 9000),
)


def registry(probed: bool = True) -> Registry:
    r = Registry(drain_timeout=60)
    r.set_service("chat", [B1, B2], probed)
    return r


def test_config_backends_start_alive_registered_ones_wait_for_a_probe() -> None:
    r = registry()
    r.add("chat", B3)
    assert [(b.key, b.health) for b in r.snapshot("chat")] == [
        (B1.key, Health.ALIVE),
        (B2.key, Health.ALIVE),
        (B3.key, Health.DEAD),
    ]
    assert not r.snapshot("chat")[2].eligible
    assert r.set_health("chat", B3.key, Health.ALIVE)
    assert r.snapshot("chat")[2].eligible


def test_without_health_checks_a_registered_backend_takes_flows_at_once() -> None:
    r = registry(probed=False)
    r.add("chat", B3)
    assert r.snapshot("chat")[2].eligible


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.add("chat", B1), "backend 198.18.0.21:9000 is already in service chat"),
        (lambda r: r.add("web", B3), "unknown service 'web' (services: chat)"),
        (lambda r: r.drain("chat", B3.key, 0.0), "backend 198.18.0.23:9000 is not in service chat"),
        (lambda r: r.remove("chat", B3.key), "backend 198.18.0.23:9000 is not in service chat"),
    ],
)
def test_refused_changes_change_nothing(change: object, message: str) -> None:
    r = registry()
    before = r.snapshot("chat")
    with pytest.raises(RegistryError) as error:
        change(r)  # type: ignore[operator]
    assert str(error.value) == message
    assert r.snapshot("chat") == before


def test_drain_until_the_last_flow_ends() -> None:
    r = registry()
    r.drain("chat", B2.key, now=10.0)
    assert r.snapshot("chat")[1].draining and not r.snapshot("chat")[1].eligible
    flows = {B2.key: 2}
    assert r.sweep(11.0, lambda service, key: flows.get(key, 0)) == []
    flows[B2.key] = 0
    removed = r.sweep(12.0, lambda service, key: flows.get(key, 0))
    assert [(service, entry.backend.key) for service, entry in removed] == [("chat", B2.key)]
    assert [b.key for b in r.snapshot("chat")] == [B1.key]


def test_drain_timeout_removes_a_backend_with_flows_left() -> None:
    r = registry()
    r.drain("chat", B2.key, now=10.0)
    assert r.sweep(69.0, lambda service, key: 5) == []
    assert len(r.sweep(70.0, lambda service, key: 5)) == 1


def test_registering_again_while_draining_brings_it_back() -> None:
    r = registry()
    r.drain("chat", B2.key, now=0.0)
    r.add("chat", Backend(B2.ip, B2.port, weight=3))
    entry = r.entries("chat")[1]
    assert not entry.draining and entry.backend.weight == 3


def test_reload_keeps_health_and_drains_dropped_config_backends() -> None:
    r = registry()
    r.set_health("chat", B1.key, Health.BAD)
    r.add("chat", B3)  # registered: a reload of the config does not touch it
    r.set_service("chat", [Backend(B1.ip, B1.port, weight=5)], probed=True)
    snapshot = {b.key: b for b in r.snapshot("chat")}
    assert snapshot[B1.key].health is Health.BAD and snapshot[B1.key].weight == 5
    assert snapshot[B2.key].draining and not snapshot[B3.key].draining
    removed = r.sweep(1.0, lambda service, key: 0)
    assert [entry.backend.key for _, entry in removed] == [B2.key]


def test_a_verdict_for_a_removed_backend_is_ignored() -> None:
    r = registry()
    r.remove("chat", B2.key)
    assert not r.set_health("chat", B2.key, Health.DEAD)
