"""docs/configuration.md is generated from config.py: it is current, and every key in it has a help text."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from distill_dist import cli
from distill_dist.config import READ_BY, RunConfig, load_config
from distill_dist.config_reference import REGENERATE, render
from distill_dist.errors import ConfigError

PAGE = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def all_fields(schema=RunConfig, prefix=""):
    """(dotted key, dataclass field) for every leaf key of the config, sections recursed into."""
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(f.default_factory):
            yield prefix + f.name, f
            yield from all_fields(f.default_factory, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, f


def test_page_is_current():
    assert PAGE.read_text(encoding="utf-8") == render() + "\n", f"docs/configuration.md is stale: run `{REGENERATE}`"


def test_every_key_is_documented_with_help():
    page = render()
    keys = list(all_fields())
    assert len(keys) > 100  # every section recursed into, not just the top level
    for key, f in keys:
        assert f.metadata.get("help", "").strip(), f"{key} has no help text"
        if not dataclasses.is_dataclass(f.default_factory):
            assert f"| `{key}` |" in page, f"{key} is missing from the reference"


def test_every_section_names_real_commands():
    """READ_BY names every top-level key and only commands the CLI has."""
    assert set(READ_BY) == {f.name for f in dataclasses.fields(RunConfig)}
    commands = set(cli.COMMANDS) | {"plan"}
    for name, readers in READ_BY.items():
        assert readers and set(readers) <= commands, (name, readers)


@pytest.mark.parametrize("key", [k for k, f in all_fields() if "choices" in f.metadata])
def test_listed_choices_are_the_validated_ones(key):
    """A value outside a field's listed choices is refused, naming the field and listing exactly those choices."""
    f = dict(all_fields())[key]
    value = "[not_a_choice]" if str(f.type).startswith("List") else "not_a_choice"
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{key}={value}"])
    msg = str(e.value)
    assert f"'{key}" in msg and "not_a_choice" in msg
    listed = [str(c).lower() for c in f.metadata["choices"]]
    assert msg.endswith(", ".join(listed[:-1]) + " or " + listed[-1]), msg
    row = next(line for line in render().splitlines() if line.startswith(f"| `{key}` |"))
    assert row.split(" | ")[3] == ", ".join(f"`{c}`" for c in listed)
