"""The README's configuration reference, rendered from lbnat/config.schema.json (a checkout
tool, not part of the installed package: it finds the schema and the README from its own path).

The schema is the one description of the config file; this turns it into a table (key path,
type, default, meaning) so that the README cannot drift from it. A unit test renders the
schema and compares it with the README's block.

    python3 scripts/schema_doc.py            print the table
    python3 scripts/schema_doc.py --write    replace the README's block (make config-reference)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "lbnat" / "config.schema.json"  # the one place that says where the schema is
README = REPO / "README.md"
BEGIN = "<!-- config-reference:begin (scripts/schema_doc.py --write) -->"
END = "<!-- config-reference:end -->"

Schema = Mapping[str, Any]


def _resolve(node: Schema, defs: Schema) -> Schema:
    """The node with its $ref followed (the referring node's keys win: description, default)."""
    seen = 0
    while "$ref" in node and seen < 10:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        seen += 1
    return node


def _object_branch(node: Schema, defs: Schema) -> Schema | None:
    """The object schema inside node (itself, or the object branch of an anyOf/oneOf)."""
    node = _resolve(node, defs)
    if "properties" in node:
        return node
    for branch in node.get("anyOf", node.get("oneOf", [])):
        branch = _resolve(branch, defs)
        if "properties" in branch:
            return branch
    return None


def type_of(node: Schema, defs: Schema) -> str:
    """A short human name for what a value may be: `integer 1-65535`, `"rr" | "wrr"`, ..."""
    ref = node.get("$ref", "")
    node = _resolve(node, defs)
    if "enum" in node:
        return " \\| ".join("null" if v is None else json.dumps(v) for v in node["enum"])
    if "const" in node:
        return json.dumps(node["const"])
    for key in ("anyOf", "oneOf"):
        if key in node:
            return " \\| ".join(type_of(branch, defs) for branch in node[key])
    if ref.endswith("/ipv4") or ref.endswith("/host_ipv4"):
        return "IPv4 address"
    kind = node.get("type", "any")
    kinds = kind if isinstance(kind, list) else [kind]
    name = " \\| ".join(str(k) for k in kinds)
    if "array" in kinds and "items" in node:
        items = _resolve(node["items"], defs)
        if "properties" in items:
            return "array of objects"
        return f"array of {type_of(node['items'], defs)}"
    if "prefixItems" in node:
        return f"[{', '.join(type_of(i, defs) for i in node['prefixItems'])}]"
    low, high = node.get("minimum"), node.get("maximum")
    if low is None and "exclusiveMinimum" in node:
        return f"{name} > {node['exclusiveMinimum']}"
    if low is not None and high is not None:
        return f"{name} {low}-{high}"
    if low is not None:
        return f"{name} ≥ {low}"
    return name


def _default(node: Schema, defs: Schema) -> str:
    node = _resolve(node, defs)
    if "default" not in node:
        return ""
    value = node["default"]
    if isinstance(value, dict | list) and value:
        return ""  # described in words
    return f"`{json.dumps(value)}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def rows(schema: Schema) -> Iterator[tuple[str, str, str, str]]:
    """(key path, type, default or "required", description) for every key, parents first."""
    defs = schema.get("$defs", {})

    def walk(parent: Schema, prefix: str) -> Iterator[tuple[str, str, str, str]]:
        required = set(parent.get("required", ()))
        for key, raw in parent["properties"].items():
            path = f"{prefix}{key}"
            node = _resolve(raw, defs)
            inner = _object_branch(node, defs)
            items = _object_branch(node["items"], defs) if "items" in node else None
            if inner is not None:
                kind = "object" if inner is node else "object \\| null"
            elif items is not None:
                kind = "array of objects"
            else:
                kind = type_of(raw, defs)
            default = "required" if key in required else _default(raw, defs)
            yield path, kind, default, node.get("description", "")
            if inner is not None:
                yield from walk(inner, f"{path}.")
            if items is not None:
                yield from walk(items, f"{path}[].")

    yield from walk(schema, "")


def reference(schema: Schema) -> str:
    """The markdown table of every key of the config file."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for path, kind, default, description in rows(schema):
        lines.append(f"| `{path}` | {kind} | {default} | {_cell(description)} |")
    return "\n".join(lines) + "\n"


def block(schema: Schema) -> str:
    return f"{BEGIN}\n{reference(schema)}{END}"


def replace_block(text: str, schema: Schema) -> str:
    """`text` with the part between the markers (kept) replaced; ValueError without them."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the markers {BEGIN!r} ... {END!r} are not in the file")
    return text[:start] + block(schema) + text[end + len(END) :]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/schema_doc.py",
        description="Render lbnat/config.schema.json as the README's configuration reference. "
        "Example: python3 scripts/schema_doc.py --write",
    )
    parser.add_argument("--write", action="store_true", help="update README.md in place")
    args = parser.parse_args(argv)
    schema = json.loads(SCHEMA.read_text())
    if not args.write:
        sys.stdout.write(reference(schema))
        return 0
    try:
        README.write_text(replace_block(README.read_text(), schema))
    except ValueError as error:
        print(f"schema_doc: {README}: {error}", file=sys.stderr)
        return 2
    print(f"schema_doc: wrote the configuration reference into {README}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
