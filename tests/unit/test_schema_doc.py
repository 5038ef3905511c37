"""The README's configuration reference is the schema's rendering, and names every key."""

from __future__ import annotations

import json

import pytest

from tests.unit.checkout_scripts import load_script

schema_doc = load_script("schema_doc")
BEGIN, END, README, SCHEMA = schema_doc.BEGIN, schema_doc.END, schema_doc.README, schema_doc.SCHEMA
block, replace_block, rows = schema_doc.block, schema_doc.replace_block, schema_doc.rows
schema = json.loads(SCHEMA.read_text())


def test_readme_block_is_the_schemas_rendering() -> None:
    text = README.read_text()
    assert block(schema) in text, "README is stale: run make config-reference"


def test_every_key_of_the_example_config_has_a_row() -> None:
    example = json.loads((README.parent / "docs" / "config.example.json").read_text())
    paths = {path for path, *_ in rows(schema)}

    def walk(value: object, prefix: str) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                path = f"{prefix}{key}"
                assert path in paths, path
                walk(inner, f"{path}.")
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    walk(item, prefix[:-1] + "[].")

    walk(example, "")


def test_required_keys_say_so() -> None:
    table = {path: default for path, _, default, _ in rows(schema)}
    assert table["control.listen"] == "required"
    assert table["services[].backends[].ip"] == "required"
    assert table["services[].backends[].port"] == "required"
    assert table["services[].scheduler"] == '`"rr"`'


def test_replace_block_keeps_the_rest_and_needs_the_markers() -> None:
    text = f"intro\n{BEGIN}\nOLD TABLE\n{END}\noutro\n"
    new = replace_block(text, schema)
    assert new.startswith("intro\n") and new.endswith("\noutro\n")
    assert "OLD TABLE" not in new and "`lb_ip`" in new
    with pytest.raises(ValueError):
        replace_block("no markers here", schema)
