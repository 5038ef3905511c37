"""The soak's verdict (lbnat_lab.soak): RSS flat within 1.2 x after the warm-up, no restart,
traffic intact, and "too short" below 7 samples."""

from __future__ import annotations

from lbnat_lab.soak import Sample, judge_memory, judge_traffic


def run(main: list[int], worker_pids: list[int] | None = None) -> list[Sample]:
    pids = worker_pids or [7] * len(main)
    return [
        Sample(float(i), {"main": kb, "w0": 1000}, {"main": 1, "w0": pid}, 0)
        for i, (kb, pid) in enumerate(zip(main, pids, strict=True))
    ]


def test_flat_memory_passes_and_warm_up_growth_is_forgiven() -> None:
    flat, lines = judge_memory(run([100, 500, 1000, 1000, 1010, 1050, 1100, 1150, 1190, 1190]))
    assert flat is True
    assert lines[0].startswith("memory: main 1.0 MB after warm-up -> 1.2 MB at the end")


def test_growth_past_the_limit_fails() -> None:
    flat, lines = judge_memory(run([1000] * 5 + [1300] * 5))
    assert flat is False and lines[0].endswith("GROWS")


def test_a_restarted_worker_fails() -> None:
    flat, lines = judge_memory(run([1000] * 8, [7, 7, 7, 7, 8, 8, 8, 8]))
    assert flat is False and "w0 restarted" in lines[1]


def test_too_few_samples_cannot_be_judged() -> None:
    assert judge_memory(run([1000] * 6))[0] is None


def test_traffic() -> None:
    good = {"conn": {"ok": 5, "failed": 0}, "udp": {"sent": 1000, "answered": 991}}
    assert judge_traffic(good)[0] is True
    assert judge_traffic({**good, "conn": {"ok": 5, "failed": 1}})[0] is False
    assert judge_traffic({**good, "udp": {"sent": 1000, "answered": 989}})[0] is False
    assert judge_traffic({"conn": {}})[0] is False  # a client that reported nothing
