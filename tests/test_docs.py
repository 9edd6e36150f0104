"""The README and docs/ name only things that exist: every linked file and anchor, every repository path in
backticks, every `distill-dist` command and every config key. Docs that name a missing thing mislead the
newcomer they are for, so each failure says which file and which token."""
from __future__ import annotations

import dataclasses
import io
import re
from contextlib import redirect_stderr, redirect_stdout
from functools import lru_cache
from pathlib import Path

import pytest

from distill_dist import cli
from distill_dist.config import RunConfig

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, REPO / "CHANGELOG.md", *sorted((REPO / "docs").glob("*.md"))]
README_MAX_CHARS = 12_000
PATH_PREFIXES = ("src/", "tests/", "bench/", "slurm/", "launch/", "configs/", "ds_configs/", "docs/", ".ci/")
SECTIONS = "model|tiny|teacher|data|prune|eval|export|gguf_import|train|report|demo"
CONFIG_KEY = re.compile(rf"^({SECTIONS})\.([a-z_]+)(=.*)?$")
FILE_SUFFIXES = {"py", "md", "csv", "json", "jsonl", "yaml", "sh", "png", "txt", "log", "gguf", "safetensors"}
COMMAND = re.compile(r"(?:distill-dist|distill_dist\.cli)\s+([a-z][a-z-]*)")
ISSUE_REF = re.compile(r"\bissues?\s*#?\s*\d+", re.IGNORECASE)

FENCE = re.compile(r"^```.*?^```[ \t]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")


def _rel(page: Path) -> str:
    return str(page.relative_to(REPO))


def _prose(text: str) -> str:
    return FENCE.sub("", text)


def _code_words(text: str) -> list[str]:
    """Whitespace-separated words of inline code spans and fenced blocks, edge punctuation stripped."""
    chunks = INLINE_CODE.findall(_prose(text)) + FENCE.findall(text)
    return [w.strip(",;:()'\"") for chunk in chunks for w in chunk.split()]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@lru_cache(maxsize=None)
def _anchors(page: Path) -> frozenset[str]:
    headings = re.findall(r"^#+\s+(.+)$", _prose(page.read_text()), re.MULTILINE)
    return frozenset(_slug(h.replace("`", "")) for h in headings)


@lru_cache(maxsize=None)
def _is_command(name: str) -> bool:
    """Whether `distill-dist NAME --help` is accepted by the CLI's own parser (exit 0, not argparse's 2)."""
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        try:
            cli.main([name, "--help"])
        except SystemExit as e:
            return e.code == 0
    return False


def _config_fields() -> dict[str, set[str]]:
    cfg = RunConfig()
    return {f.name: {g.name for g in dataclasses.fields(getattr(cfg, f.name))}
            for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))}


def _named_commands() -> dict[str, set[str]]:
    return {_rel(p): set(COMMAND.findall(p.read_text())) for p in PAGES}


def test_the_pages_exist():
    assert README.is_file() and (REPO / "docs" / "README.md").is_file(), "README.md and docs/README.md"
    assert len(PAGES) > 10, f"expected the docs/ pages, found {[_rel(p) for p in PAGES]}"


def test_readme_is_short():
    n = len(README.read_text())
    assert n <= README_MAX_CHARS, f"README.md has {n} characters, the limit is {README_MAX_CHARS}: move detail to docs/"


def test_every_relative_link_and_anchor_exists():
    bad = []
    for page in PAGES:
        for target in LINK.findall(_prose(page.read_text())):
            if re.match(r"^[a-z]+:", target):
                continue  # http(s)://, mailto:
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                bad.append(f"{_rel(page)}: link to '{target}': no such file")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                bad.append(f"{_rel(page)}: link to '{target}': {dest.name} has no heading with anchor '#{anchor}'")
    assert not bad, "\n".join(bad)


def test_every_repository_path_named_exists():
    bad = []
    for page in PAGES:
        for word in _code_words(page.read_text()):
            top_level_file = "/" not in word and word.endswith((".sh", ".toml"))
            if word.startswith(PATH_PREFIXES) or top_level_file:
                if not any(c in word for c in "*<>{}$…") and not (REPO / word).exists():
                    bad.append(f"{_rel(page)}: `{word}` does not exist in the repository")
    assert not bad, "\n".join(bad)


def test_every_command_named_is_a_real_subcommand():
    bad = [f"{page}: `distill-dist {name}` is not a command of distill_dist.cli"
           for page, names in _named_commands().items() for name in sorted(names)
           if not _is_command(name)]
    assert not bad, "\n".join(bad)


def test_every_config_key_named_exists():
    fields, bad = _config_fields(), []
    for page in PAGES:
        for word in _code_words(page.read_text()):
            m = CONFIG_KEY.match(word)
            if m and m.group(2) not in FILE_SUFFIXES and m.group(2) not in fields[m.group(1)]:
                bad.append(f"{_rel(page)}: `{word}`: {m.group(1)} has no field '{m.group(2)}' (distill_dist.config)")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("page", [p for p in PAGES if p.name != "CHANGELOG.md"], ids=_rel)
def test_no_issue_numbers_in_prose(page):
    hits = ISSUE_REF.findall(page.read_text())
    assert not hits, f"{_rel(page)}: issue references {hits}: docs describe what is, history goes to CHANGELOG.md"


def test_the_checks_catch_what_they_are_for():
    """The patterns match the mistakes they exist to catch, so a green run means something."""
    assert CONFIG_KEY.match("train.lrr=1e-4").group(2) == "lrr" and "lrr" not in _config_fields()["train"]
    assert COMMAND.findall("run `distill-dist prun -c x` then python -m distill_dist.cli trian") == ["prun", "trian"]
    assert not _is_command("prun") and _is_command("prune") and _is_command("plan")
    assert ISSUE_REF.search("as issue 20 measured") and ISSUE_REF.search("see issue #7")
    assert _slug("The real-model study: `x/y.py`".replace("`", "")) == "the-real-model-study-xypy"
