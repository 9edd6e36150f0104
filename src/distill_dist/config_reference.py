"""docs/configuration.md, rendered from config.py's dataclasses: every key's type, default, allowed values
(the same `choices` the validators check), help text and the commands that read it.

Regenerate: `python -m distill_dist.config_reference > docs/configuration.md` (tests/test_config_reference.py
fails while the page is stale).
"""
from __future__ import annotations

import dataclasses
import re
import sys
from typing import Any

from .config import READ_BY, RunConfig, yaml_name

REGENERATE = "python -m distill_dist.config_reference > docs/configuration.md"


def render() -> str:
    """The whole page: the top-level keys, then one table per section in RunConfig's order."""
    fields = dataclasses.fields(RunConfig)
    top = [f for f in fields if not _is_section(f)]
    out = ["# Configuration reference", "",
           f"Generated from src/distill_dist/config.py by `{REGENERATE}`; do not edit.", "",
           "Every command takes `-c FILE.yaml` and `key=value` overrides (dotted keys, YAML values, e.g. "
           "`prune.schedule=[0.5]`); an override beats the file. `distill-dist config [-c FILE] [key=value ...]` "
           "prints the resolved, validated config. `${output_dir}` in a default is the top-level `output_dir`.", ""]
    out += ["## Top level", "", *_table("", top, RunConfig())]
    for f in fields:
        if _is_section(f):
            section = getattr(RunConfig(), f.name)
            out += [f"## `{f.name}`", "", f.metadata["help"], "", _read_by(f.name), "",
                    *_table(f"{f.name}.", dataclasses.fields(section), section)]
    return "\n".join(out)


def _is_section(f: dataclasses.Field) -> bool:
    return f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory)


def _read_by(name: str) -> str:
    return "Read by: " + ", ".join(f"`{c}`" for c in READ_BY[name]) + "."


def _table(prefix: str, fields, instance: Any) -> list[str]:
    rows = ["| key | type | default | allowed values | meaning | read by |" if not prefix else
            "| key | type | default | allowed values | meaning |",
            "|---|---|---|---|---|---|" if not prefix else "|---|---|---|---|---|"]
    for f in fields:
        choices = f.metadata.get("choices")
        cells = [f"`{prefix}{f.name}`", _type_name(f.type), f"`{_value(getattr(instance, f.name))}`",
                 ", ".join(f"`{yaml_name(c)}`" for c in choices) if choices else "",
                 _markdown_text(f.metadata["help"])]
        if not prefix:
            cells.append(", ".join(f"`{c}`" for c in READ_BY[f.name]))
        rows.append("| " + " | ".join(cells) + " |")
    return rows + [""]


def _markdown_text(text: str) -> str:
    """Help text in a table cell: `|` would end the cell, `<output_dir>` would be read as an HTML tag."""
    return text.replace("|", "\\|").replace("<", "\\<")


_TYPE_NAMES = {"str": "string", "int": "integer", "float": "number", "bool": "boolean", "Any": "any"}


def _type_name(annotation: str) -> str:
    """`Optional[List[int]]` -> `list of integer or null`: the annotation in YAML's terms."""
    annotation = str(annotation)
    if m := re.fullmatch(r"Optional\[(.*)\]", annotation):
        return f"{_type_name(m.group(1))} or null"
    if m := re.fullmatch(r"List\[(.*)\]", annotation):
        return f"list of {_type_name(m.group(1))}"
    if annotation.startswith("Dict["):
        return "mapping"
    return _TYPE_NAMES.get(annotation, annotation)


def _value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_value(v)}" for k, v in value.items()) + "}"
    return yaml_name(value)


if __name__ == "__main__":
    sys.stdout.write(render() + "\n")
