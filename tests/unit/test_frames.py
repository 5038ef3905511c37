"""The frame around a translated packet (lbnat.dataplane.frames): the vnet header's offsets and
GSO type, the Ethernet type by the new packet's version, table-driven."""

from __future__ import annotations

import pytest

from lbnat.dataplane.frames import ethertype, translated, translated_vnet, with_ethertype
from lbnat.dataplane.kernel import HEADROOM, IP_OFFSET, VNET_HDR

MACS = bytes(range(12))


def vnet(flags: int, gso: int, hdr_len: int, size: int, csum_start: int, off: int) -> bytes:
    return VNET_HDR.pack(flags, gso, hdr_len, size, csum_start, off)


@pytest.mark.parametrize(
    ("before", "grown", "to_v6", "after"),
    [
        # TCP super-packet v4 -> v6: offsets from the Ethernet header grow by 20, TCPV4 -> TCPV6
        (vnet(1, 1, 66, 1448, 34, 16), 20, True, vnet(1, 4, 86, 1448, 54, 16)),
        # ... and back
        (vnet(1, 4, 86, 1448, 54, 16), -20, False, vnet(1, 1, 66, 1448, 34, 16)),
        # the ECN bit of gso_type stays
        (vnet(1, 0x81, 66, 1448, 34, 16), 20, True, vnet(1, 0x84, 86, 1448, 54, 16)),
        # UDP_L4 is the same in both families; its offsets still move
        (vnet(1, 5, 42, 1200, 34, 6), 20, True, vnet(1, 5, 62, 1200, 54, 6)),
        # a complete packet (no NEEDS_CSUM, no GSO, no hdr_len): nothing to move
        (vnet(0, 0, 0, 0, 0, 0), 20, True, vnet(0, 0, 0, 0, 0, 0)),
        # a partial checksum without GSO: csum_start moves, the zero hdr_len stays
        (vnet(1, 0, 0, 0, 54, 16), -20, False, vnet(1, 0, 0, 0, 34, 16)),
        # an IPv6 header with extension headers shrinks by more than 20
        (vnet(1, 4, 94, 1440, 62, 16), -28, False, vnet(1, 1, 66, 1440, 34, 16)),
    ],
)
def test_translated_vnet(before: bytes, grown: int, to_v6: bool, after: bytes) -> None:
    assert translated_vnet(before, grown, to_v6) == after


@pytest.mark.parametrize(
    ("first", "kind"), [(0x45, b"\x08\x00"), (0x4F, b"\x08\x00"), (0x60, b"\x86\xdd")]
)
def test_ethertype_by_version(first: int, kind: bytes) -> None:
    assert ethertype(first) == kind
    for header in (MACS + b"\x08\x00", MACS + b"\x86\xdd"):
        assert with_ethertype(header, first) == MACS + kind


@pytest.mark.parametrize(("shift", "version"), [(-20, 6), (20, 4), (28, 4)])
def test_translated_writes_both_headers_before_the_new_start(shift: int, version: int) -> None:
    start = HEADROOM + IP_OFFSET  # as a receive path leaves it: HEADROOM bytes before the vnet
    new_start = start + shift
    buf = bytearray(b"\xee" * 200)
    received = vnet(1, 1 if version == 6 else 4, 0, 0, 34 if version == 6 else 54, 16)
    buf[start - IP_OFFSET : start - IP_OFFSET + 10] = received
    if new_start < start:  # the engine moves the vnet header clear of the grown IP header first
        buf[new_start - IP_OFFSET : new_start - IP_OFFSET + 10] = received
    buf[new_start : new_start + 40] = bytes([version << 4 | (5 if version == 4 else 0)]) * 40
    header = MACS + (b"\x08\x00" if version == 6 else b"\x86\xdd")  # the hop's family: fixed up
    frame = translated(buf, start, new_start, header)
    assert frame == new_start - IP_OFFSET
    grown = start - new_start
    expected = vnet(1, 4 if version == 6 else 1, 0, 0, (34 if version == 6 else 54) + grown, 16)
    assert bytes(buf[frame : frame + 10]) == expected
    assert bytes(buf[frame + 10 : new_start]) == MACS + ethertype(buf[new_start])
    assert buf[new_start] >> 4 == version


def test_translated_refuses_a_frame_without_room() -> None:
    buf = bytearray(100)
    buf[IP_OFFSET - 20] = 0x60
    with pytest.raises(ValueError, match="no room"):
        translated(buf, IP_OFFSET, IP_OFFSET - 20, MACS + b"\x86\xdd")
