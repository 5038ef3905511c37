"""Tests for lbnat.syncookie: a cookie is accepted with the inputs it was made for, in its
counter and the next, and refused with any input changed or two counters later."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lbnat.syncookie import (
    COUNTER_SECONDS,
    MSS_TABLE,
    CookieFacts,
    SynProxySettings,
    check_cookie,
    kernel_wscale,
    make_cookie,
    mss_index,
)

SECRET = b"0123456789abcdef"
INPUTS = (0xC6120B0B, 40000, 0xC6120002, 80, 123456789)  # client ip, port, vip, port, isn
FACTS = CookieFacts(1460, 7, True)

u32 = st.integers(0, 0xFFFFFFFF)
u16 = st.integers(0, 0xFFFF)


@pytest.mark.parametrize(
    ("mss", "wscale", "sack", "facts"),
    [
        (1460, 7, True, CookieFacts(1460, 7, True)),
        (1400, 0, False, CookieFacts(1300, 0, False)),  # rounded down to the table
        (9000, 14, True, CookieFacts(1460, 14, True)),
        (536, None, False, CookieFacts(536, None, False)),  # no window scale offered
        (100, 3, True, CookieFacts(536, 3, True)),  # below the table: its smallest entry
        (1440, 15, False, CookieFacts(1440, 14, False)),  # RFC 7323's cap of 14
    ],
)
def test_a_cookie_carries_the_clients_options(
    mss: int, wscale: int | None, sack: bool, facts: CookieFacts
) -> None:
    cookie = make_cookie(SECRET, *INPUTS, 100.0, CookieFacts(mss, wscale, sack))
    assert check_cookie(SECRET, *INPUTS, cookie, 100.0) == facts


@pytest.mark.parametrize(
    ("made", "checked", "accepted"),
    [
        (0.0, 0.0, True),
        (0.0, COUNTER_SECONDS - 0.001, True),
        (COUNTER_SECONDS - 0.001, COUNTER_SECONDS, True),  # the next counter
        (0.0, 2 * COUNTER_SECONDS - 0.001, True),
        (0.0, 2 * COUNTER_SECONDS, False),  # two counters later
        (5 * COUNTER_SECONDS, 3 * COUNTER_SECONDS, False),  # from the future
        (1e6, 1e6 + 100, True),
    ],
)
def test_a_cookie_lives_one_or_two_counters(made: float, checked: float, accepted: bool) -> None:
    cookie = make_cookie(SECRET, *INPUTS, made, FACTS)
    assert (check_cookie(SECRET, *INPUTS, cookie, checked) is not None) is accepted


def test_the_mss_table_index_rounds_down() -> None:
    assert [mss_index(m) for m in (None, 535, 536, 1299, 1300, 1460, 65535)] == [
        0, 0, 0, 0, 1, 3, 3,
    ]  # fmt: skip
    assert MSS_TABLE[mss_index(1500)] == 1460


@given(
    ip=u32, port=u16, vip=u32, vport=u16, isn=u32, now=st.floats(0, 1e9),
    mss=st.integers(1, 65535), wscale=st.one_of(st.none(), st.integers(0, 14)),
    sack=st.booleans(), which=st.integers(0, 6), change=st.integers(1, 0xFFFFFFFF),
)  # fmt: skip
def test_any_changed_input_breaks_the_cookie(
    ip: int, port: int, vip: int, vport: int, isn: int, now: float, mss: int,
    wscale: int | None, sack: bool, which: int, change: int,
) -> None:  # fmt: skip
    facts = CookieFacts(mss, wscale, sack)
    cookie = make_cookie(SECRET, ip, port, vip, vport, isn, now, facts)
    inputs = [ip, port, vip, vport, isn, cookie]

    def check(secret: bytes, values: list[int], at: float) -> CookieFacts | None:
        c_ip, c_port, v_ip, v_port, c_isn, value = values
        return check_cookie(secret, c_ip, c_port, v_ip, v_port, c_isn, value, at)

    assert check(SECRET, inputs, now) == CookieFacts(MSS_TABLE[mss_index(mss)], wscale, sack)
    if which == 6:
        assert check(SECRET[::-1], inputs, now) is None  # another secret
        assert check(SECRET, inputs, now + 2 * COUNTER_SECONDS) is None
        return
    limit = 0xFFFF if which in (1, 3) else 0xFFFFFFFF
    inputs[which] = (inputs[which] + change) & limit
    if inputs[which] == [ip, port, vip, vport, isn, cookie][which]:
        return  # the change wrapped to the same value
    # 24 bits of hash: a changed input passes with odds 2**-24; hypothesis's few hundred
    # examples would be a 1-in-50,000 flake. The low byte of the cookie (options) is hashed too.
    assert check(SECRET, inputs, now) is None


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="not one of auto, on, off"):
        SynProxySettings(mode="sometimes")
    with pytest.raises(ValueError, match="at least 1"):
        SynProxySettings(threshold=0)
    with pytest.raises(ValueError, match="MSS"):
        SynProxySettings(mss=100)


@pytest.mark.parametrize(
    ("space", "wscale"),
    [(6291456, 7), (33554432, 10), (212992, 2), (65535, 0), (1, 0), (2**40, 14)],
)
def test_kernel_wscale_is_linuxs_choice(space: int, wscale: int) -> None:
    assert kernel_wscale(space) == wscale
