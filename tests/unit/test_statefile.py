"""A hitless restart's state file (lbnat.statefile) and its files (lbnat.dataplane.handover):
the header, the fit decision, rows kept in files that outlive the process."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest

from lbnat.checkpoint import RestoreReport, restore
from lbnat.config import Config
from lbnat.dataplane.handover import Handover, HandoverError, cleanup, rows_in
from lbnat.dataplane.workers import RowMemory, map_checkpoint, merge_reports
from lbnat.statefile import StateHeader, decode, encode, misfit, row_file
from tests.unit.fixtures import CLIENT1, EngineHarness

HEADER = StateHeader(
    "198.18.0.2", "lb0", (61000, 65535), 2, (("chat", "tcp", 20000),), 1.5e9, pid=42
)


def test_a_header_survives_encoding() -> None:
    assert decode(encode(HEADER)) == HEADER
    saved = dataclasses.replace(HEADER, saved=True, rows=7, offload_kept=True)
    assert decode(encode(saved)) == saved
    dual = dataclasses.replace(HEADER, ip6="2001:db8::2")
    assert decode(encode(dual)) == dual


def test_a_header_from_before_ipv6_has_no_ip6() -> None:
    data: dict[str, Any] = json.loads(encode(HEADER))
    del data["ip6"]
    assert decode(json.dumps(data).encode()) == HEADER
    data["ip6"] = 6
    with pytest.raises(ValueError, match="'ip6' is not a string or null"):
        decode(json.dumps(data).encode())


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b"\xff\xfe", "not JSON"),
        (b'{"format": 2}', "format is 2, this lbnat reads format 1"),
        (b'{"format": true}', "'format' is missing or not a int"),
        (b'{"format": 1, "nat_ports": [1]}', "'nat_ports' is not"),
    ],
)
def test_a_header_that_cannot_be_used_says_why(raw: bytes, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        decode(raw)


def test_a_header_with_a_field_of_the_wrong_type_is_refused() -> None:
    data: dict[str, Any] = json.loads(encode(HEADER))
    data["workers"] = "2"
    with pytest.raises(ValueError, match="'workers'"):
        decode(json.dumps(data).encode())
    data = json.loads(encode(HEADER))
    data["services"] = [["chat", "tcp"]]
    with pytest.raises(ValueError, match="not \\[name, protocol, port\\]"):
        decode(json.dumps(data).encode())


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({}, None),
        ({"services": ()}, None),  # restore drops the rows of a service that is gone
        ({"interface": "eth1", "written": 0.0, "saved": True, "rows": 9, "pid": 1}, None),
        ({"lb_ip": "198.18.0.3"}, "it is for address 198.18.0.2, this lbnat balances 198.18.0.3"),
        ({"nat_ports": (62000, 65535)}, "its NAT ports are 61000-65535, this lbnat's are 62000"),
        ({"workers": 1}, "it was written by 2 workers, this lbnat has 1"),
        ({"workers": 3}, "it was written by 2 workers, this lbnat has 3"),
        (
            {"ip6": "2001:db8::2"},
            "it is for IPv6 address none, this lbnat's is 2001:db8::2 (an IPv6 client's row",
        ),
    ],
)
def test_rows_fit_when_address_nat_ports_and_workers_are_the_same(
    change: dict[str, Any], why: str | None
) -> None:
    wanted = dataclasses.replace(HEADER, **change)
    problem = misfit(HEADER, wanted)
    if why is None:
        assert problem is None
    else:
        assert problem is not None and problem.startswith(why)


def test_row_memory_in_a_file_outlives_its_process_and_is_restored(tmp_path: Path) -> None:
    """A RowMemory with a path is what a worker keeps with --state-file: a second one on the
    same file (the next lbnat) restores the first one's rows; the file is never shrunk."""
    path = str(tmp_path / "state.json.rows-0")
    memory = RowMemory(0, rows=100, path=path)
    first = EngineHarness()
    restore(first.engine, map_checkpoint(memory.fd), 0.0)
    for port in range(40000, 40006):
        assert first.flow(CLIENT1, port).syn().forwarded
    memory.close()
    size = os.path.getsize(path)
    assert rows_in(path) == 6
    again = RowMemory(0, rows=10, path=path)  # a smaller table cap
    try:
        assert os.path.getsize(path) == size
        second = EngineHarness()
        assert restore(second.engine, map_checkpoint(again.fd), 1.0) == RestoreReport(6, 6)
        assert {r.nat_port for r in second.table} == {r.nat_port for r in first.table}
    finally:
        again.close()
    assert rows_in(str(tmp_path / "missing")) == 0


def test_reports_of_several_workers_add_up() -> None:
    merged = merge_reports(
        [RestoreReport(3, 2, {"torn": 1}), RestoreReport(4, 4, {"torn": 2, "no_backend": 1})]
    )
    assert merged == RestoreReport(7, 6, {"torn": 3, "no_backend": 1})


class Lines:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def __call__(self, text: str, event: str, **fields: object) -> None:
        self.lines.append((text, event))


def config(workers: int) -> Config:
    return Config(lb_ip="198.18.0.2", workers=workers, nat_ports=(61000, 65535))


def test_a_state_file_that_fits_keeps_its_rows_and_one_that_does_not_is_forgotten(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "state.json")
    log = Lines()
    first = Handover(path, log)
    files = first.take(config(2), "lb0")
    assert files == [row_file(path, 0), row_file(path, 1)] and log.lines == []
    for name in files:
        Path(name).write_bytes(b"rows")
    assert decode(Path(path).read_bytes()).saved is False

    second = Handover(path, log)
    assert second.take(config(2), "lb0") == files
    assert all(Path(name).read_bytes() == b"rows" for name in files)
    second.restored(RestoreReport(5, 4, {"no_service": 1}))
    assert log.lines == [
        (
            f"restored 5 rows from {path} (left by an lbnat that did not stop; 1 dropped: "
            "1 no_service)",
            "state_restored",
        )
    ]

    log.lines.clear()
    third = Handover(path, log)
    assert third.take(config(1), "lb0") == [row_file(path, 0)]
    assert not any(Path(name).exists() for name in files)
    assert log.lines == [
        (
            f"state file : {path} not used (it was written by 2 workers, this lbnat has 1 (a "
            "row's NAT port decides its worker)); starting with empty tables",
            "state_refused",
        )
    ]
    third.restored(RestoreReport())
    assert len(log.lines) == 1  # nothing was restored: no second line
    assert decode(Path(path).read_bytes()).workers == 1


def test_a_state_file_that_is_not_json_is_refused_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text("{")
    Path(row_file(str(path), 0)).write_bytes(b"rows")
    log = Lines()
    Handover(str(path), log).take(config(1), "lb0")
    assert len(log.lines) == 1 and "not used (it is not JSON" in log.lines[0][0]
    assert not Path(row_file(str(path), 0)).exists()


def test_a_state_file_in_a_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(HandoverError, match="cannot write the state file"):
        Handover(str(tmp_path / "no" / "state.json"), Lines()).take(config(1), "lb0")


class FakeGuard:
    released = False

    def release(self) -> None:
        self.released = True


def test_leaving_keeps_the_guard_and_says_how_many_rows(tmp_path: Path) -> None:
    path = str(tmp_path / "state.json")
    log = Lines()
    handover = Handover(path, log)
    files = handover.take(config(1), "lb0")
    memory = RowMemory(0, rows=10, path=files[0])
    engine = EngineHarness()
    restore(engine.engine, map_checkpoint(memory.fd), 0.0)
    for port in (40000, 40001, 40002):
        assert engine.flow(CLIENT1, port).syn().forwarded
    memory.close()
    guard = FakeGuard()
    handover.leave(guard, None)  # type: ignore[arg-type]
    assert guard.released
    assert log.lines == [
        (f"state saved: 3 rows in {path}; guard kept for the next lbnat", "state_saved")
    ]
    header = decode(Path(path).read_bytes())
    assert header.saved and header.rows == 3 and not header.offload_kept


def test_cleanup_refuses_the_state_of_a_running_lbnat_and_reads_bad_files_clearly(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.json"
    assert cleanup(str(path)) == [f"{path}: no state file, nothing to clean"]
    path.write_bytes(encode(dataclasses.replace(HEADER, pid=os.getppid())))
    with pytest.raises(HandoverError, match=f"running as pid {os.getppid()}: stop it first"):
        cleanup(str(path))
    path.write_text("nonsense")
    with pytest.raises(HandoverError, match="not JSON"):
        cleanup(str(path))
