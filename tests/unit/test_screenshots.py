"""The pure half of scripts/screenshots.py: captured lines -> SVG terminal window -> PNG.

The SVG tests need rich, the PNG tests also cairosvg (or rsvg-convert); without them they skip
and say what to install (pip install rich cairosvg, the `docs` extra).
"""

from __future__ import annotations

import html
import importlib.util
import re
import struct
import zlib
from typing import Any

import pytest

from tests.unit.checkout_scripts import load_script

shots = load_script("screenshots")

LOG = (
    "srcIP : 198.18.0.2",
    "IP : 198.18.0.21, Port : 9000 Server is alive",
    "IP : 198.18.0.22, Port : 9000 Server is dead",
    "new client <198.18.0.11,56656> -> server 198.18.0.21:9000 (NAT port 61000)",
)


def needs_rich() -> None:
    if importlib.util.find_spec("rich") is None:  # not imported here: mypy need not know rich
        pytest.skip("the screenshot renderer needs rich (pip install rich)")


def needs_png() -> None:
    reason = shots.renderer_missing()
    if reason is not None:
        pytest.skip(f"the screenshot renderer {reason}")


def screen() -> Any:
    Line, Pane = shots.Line, shots.Pane
    log = shots.Pane((Line("lb# loadbalancerLobin 198.18.0.2", "prompt"), *map(Line, LOG)))
    clients = tuple(
        Pane(
            (Line(f"* connected to b{i}"), Line(f"hello from test{i}", "input")),
            f"test{i} on c1",
        )
        for i in (1, 2, 3)
    )
    return shots.Screen("demo", "a title", ((log,), clients))


TEXT_RE = re.compile(r'<text class="[^"]*-r\d+" x="([\d.]+)" y="([\d.]+)"[^>]*>(.*?)</text>', re.S)


def svg_rows(svg: str) -> list[str]:
    """The text of the SVG, one string per terminal row (text elements joined by x)."""
    cells: dict[float, list[tuple[float, str]]] = {}
    for x, y, body in TEXT_RE.findall(svg):
        cells.setdefault(float(y), []).append((float(x), html.unescape(body).replace("\xa0", " ")))
    return ["".join(t for _, t in sorted(row)).rstrip() for _, row in sorted(cells.items())]


def test_svg_holds_every_captured_line_unchanged() -> None:
    needs_rich()
    svg = shots.render_svg(screen())
    rows = svg_rows(svg)
    assert rows[0] == "lb# loadbalancerLobin 198.18.0.2"
    assert rows[1 : 1 + len(LOG)] == list(LOG)
    client_row = next(r for r in rows if "* connected to b1" in r)
    assert "* connected to b2" in client_row and "* connected to b3" in client_row
    assert any("hello from test3" in r for r in rows)
    assert ">a&#160;title<" in svg or ">a title<" in svg


def test_svg_uses_a_local_monospace_font_and_no_web_font() -> None:
    needs_rich()
    svg = shots.render_svg(screen())
    assert f'font-family: "{shots.FONT}"' in svg
    assert "@font-face" not in svg and "url(http" not in svg and "cdnjs" not in svg


def test_window_is_wide_enough_that_nothing_wraps() -> None:
    needs_rich()
    long_line = "x" * 150
    one = shots.Screen("w", "t", ((shots.Pane((shots.Line(long_line), shots.Line("end"))),),))
    assert shots.screen_width(one) >= 150
    assert svg_rows(shots.render_svg(one)) == [long_line, "end"]


def test_health_words_are_coloured_and_kinds_styled() -> None:
    needs_rich()
    dead = shots.styled(shots.Line("IP : 198.18.0.22, Port : 9000 Server is dead"))
    spans = [(dead.plain[s.start : s.end], str(s.style)) for s in dead.spans]
    assert ("dead", "bold #e57474") in spans
    typed = shots.styled(shots.Line("dead", "input"))
    assert str(typed.style) == shots.KIND_STYLES["input"] and not typed.spans
    with pytest.raises(ValueError, match="kind"):
        shots.styled(shots.Line("x", "shout"))


def png_pixels(data: bytes) -> bytes:
    """The decompressed image data of a PNG (filter bytes included)."""
    idat, pos = b"", 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        if kind == b"IDAT":
            idat += data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    return zlib.decompress(idat)


def test_png_has_the_svg_size_and_shows_text() -> None:
    needs_rich()
    needs_png()
    svg = shots.render_svg(screen())
    png = shots.svg_to_png(svg)
    assert png[:8] == shots.PNG_SIGNATURE
    width, height = shots.png_size(png)
    view_w, view_h = shots.svg_size(svg)
    assert (width, height) == (round(view_w), round(view_h))
    assert width > 600 and height > 200
    # the same window with blank lines instead of text differs: the text is drawn
    blank = re.sub(r'(<text class="[^"]*-r\d+"[^>]*>)(.*?)(</text>)', r"\1\3", svg, flags=re.S)
    assert png_pixels(shots.svg_to_png(blank)) != png_pixels(png)
    assert len(png) < 300 * 1024


def test_png_size_rejects_other_data() -> None:
    with pytest.raises(ValueError, match="PNG"):
        shots.png_size(b"GIF89a" + bytes(30))


TOP = """\
lbnat 198.18.0.2  up 3s  rows 11/1,000,000  open flows 4  offload rows 4 (2.53k pkt/s)

                                                   to backend  to backend  to client  to client
service / backend     health  weight  active  new/s  pkt/s  bit/s  pkt/s  bit/s  drops/s  NAT ports
tcp:20000 tcp/20000 rr  2/3 alive          4    {new}  1.12k  3.33M  1.46k  8.81M  0
  198.18.0.21:9000    alive          1       3    3.0  1.06k  3.11M  {b1_out}  8.59M     6/4536
  198.18.0.22:9000    alive          1       1    2.0     60   224k     56   223k     5/4536
  198.18.0.23:9000    {b3}           1       0      0      0      0      0      0        0/0
"""
UP = ["198.18.0.21:9000", "198.18.0.22:9000"]


@pytest.mark.parametrize(
    ("fields", "ready"),
    [
        ({"new": "5.0", "b1_out": "1.40k", "b3": "dead"}, True),
        ({"new": "0", "b1_out": "1.40k", "b3": "dead"}, False),  # no new flows yet
        ({"new": "5.0", "b1_out": "0", "b3": "dead"}, False),  # nothing back to the clients
        ({"new": "5.0", "b1_out": "1.40k", "b3": "bad"}, False),  # b3 not dead yet
    ],
)
def test_top_ready_waits_for_traffic_both_ways_and_the_dead_backend(
    fields: dict[str, str], ready: bool
) -> None:
    assert shots.top_ready(TOP.format(**fields), UP, "198.18.0.23:9000") is ready
    assert shots.top_ready("", UP, "198.18.0.23:9000") is False
