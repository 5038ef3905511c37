"""lbnat.privileges: which of CAP_NET_RAW and CAP_NET_ADMIN a /proc/<pid>/status grants."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lbnat.privileges import CAPABILITY_BITS, REQUIRED, effective_set, missing


def status(cap_eff: str) -> str:
    return f"Name:\tlbnat\nUid:\t0\t0\t0\t0\nCapPrm:\t{cap_eff}\nCapEff:\t{cap_eff}\nSeccomp:\t0\n"


@pytest.mark.parametrize(
    ("cap_eff", "lacking"),
    [
        pytest.param("000001ffffffffff", [], id="root"),
        pytest.param("0000000000003000", [], id="net-raw-and-net-admin"),
        pytest.param("0000000000003400", [], id="the-unit-s-three"),
        pytest.param("0000000000002000", ["CAP_NET_ADMIN"], id="net-raw-only"),
        pytest.param("0000000000001000", ["CAP_NET_RAW"], id="net-admin-only"),
        pytest.param("0000000000000000", ["CAP_NET_RAW", "CAP_NET_ADMIN"], id="nobody"),
        pytest.param("0000000000000004", ["CAP_NET_RAW", "CAP_NET_ADMIN"], id="dac-read-search"),
    ],
)
def test_missing_names_what_the_effective_set_lacks(cap_eff: str, lacking: list[str]) -> None:
    assert missing(status(cap_eff)) == lacking


def test_bits_are_the_kernels() -> None:
    # include/uapi/linux/capability.h
    assert CAPABILITY_BITS["CAP_NET_ADMIN"] == 12
    assert CAPABILITY_BITS["CAP_NET_RAW"] == 13
    assert effective_set(status("0000000000003000")) == (1 << 12) | (1 << 13)


@pytest.mark.parametrize("text", ["", "Name:\tx\n", "CapEff:\tzz\n", "CapEff:\n"])
def test_an_unreadable_status_grants_nothing(text: str) -> None:
    assert effective_set(text) is None
    assert missing(text) == list(REQUIRED)


@given(st.text())
def test_never_raises_on_any_text(text: str) -> None:
    assert set(missing(text)) <= set(REQUIRED)
