"""No class in the lbnat package grows past about 300 lines (issue 15): a class that long holds
several concerns, and each should be a class of its own. The limit here leaves some slack."""

from __future__ import annotations

import ast
from pathlib import Path

import lbnat

MAX_CLASS_LINES = 330
PACKAGE = Path(lbnat.__file__).parent


def class_sizes(root: Path) -> dict[str, int]:
    """Lines of every class (nested ones too) under `root`, by "path:line Name"."""
    sizes: dict[str, int] = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                where = f"{path.relative_to(root.parent)}:{node.lineno} {node.name}"
                sizes[where] = node.end_lineno - node.lineno + 1
    return sizes


def test_class_sizes_counts_each_class_from_its_line_to_its_last(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text(
        "class A:\n    x = 1\n\n    class B:\n        y = 2\n\n\ndef f() -> None:\n    pass\n"
    )
    assert class_sizes(tmp_path / "pkg") == {"pkg/m.py:1 A": 5, "pkg/m.py:4 B": 2}


def test_no_class_in_lbnat_is_longer_than_about_300_lines() -> None:
    sizes = class_sizes(PACKAGE)
    assert len(sizes) > 50, "the walk found too few classes: is PACKAGE the package?"
    too_long = {where: n for where, n in sizes.items() if n > MAX_CLASS_LINES}
    assert too_long == {}, f"classes longer than {MAX_CLASS_LINES} lines: {too_long}"
