"""The documents in docs/ say what the code does: the configuration page is the settings' metadata as
`make docs` renders it, the protocol page lists every route the app serves and the constants the code
sends, and whatever the code and the documents cite (documents, sections, modules) exists."""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
import typing
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from config import docs as config_docs
from config.settings import Settings
from web.app import create_app
from web.chat_request import DEFAULT_SAMPLING
from web.services import Services
from web.telemetry import route_template
from wire.epistula import ROUTED_FIELDS

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CODE_FOLDERS = ("config", "wire", "actors", "web", "engine", "devnet", "bench", "tests")
# Documents the code was once written against, which are not in the repository (spelled in two pieces
# so that this file does not cite them itself).
ABSENT_DOCUMENTS = ("PROTOCOL" + ".md", "UPSTREAM" + ".md")
CITATION = re.compile(r'docs/(\w+)\.md, "([^"]+)"')
ROUTE = re.compile(r"`(GET|POST|PUT|PATCH|DELETE) (/[^`\s]*)`")
MODULE_PATH = re.compile(r"`((?:config|wire|actors|web|engine|devnet|bench|tests)/[\w/]+(?:\.py)?/?)`")


def page(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


def flat(text: str) -> str:
    """`text` with every run of white space (line breaks included) as one space."""
    return " ".join(text.split())


def section(text: str, heading: str) -> str:
    """The text under `heading` (a whole heading line) up to the next heading of any level."""
    lines = text.splitlines()
    start = lines.index(heading) + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("#")), len(lines))
    return "\n".join(lines[start:end])


def headings(text: str) -> set[str]:
    """Heading texts, without the #s and backticks, skipping fenced code."""
    found, fenced = set(), False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            found.add(line.lstrip("#").strip().replace("`", ""))
    return found


def code_files() -> list[Path]:
    files = [p for folder in CODE_FOLDERS for p in (ROOT / folder).rglob("*.py")]
    return [*files, ROOT / "Makefile", ROOT / "pyproject.toml"]


# --- docs/configuration.md ---------------------------------------------------------------------------

def test_the_configuration_page_is_what_make_docs_writes() -> None:
    written = page("configuration.md")
    assert written == config_docs.render_markdown(), (
        "docs/configuration.md is stale: run make docs (python -m config.docs) and commit the result")


def table_rows(text: str) -> dict[str, list[str]]:
    """A section's table, by key: the cells of each row."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            rows[cells[0].strip("`")] = cells
    return rows


def sections_and_tables() -> list[tuple[str, type, Any]]:
    """(heading, dataclass, its defaults) for every table of the configuration."""
    found: list[tuple[str, type, Any]] = []
    defaults = Settings()
    for f in dataclasses.fields(Settings):
        if f.metadata.get("internal"):
            continue
        values = getattr(defaults, f.name)
        found.append((f"## `[{f.name}]`", type(values), values))
        for inner in dataclasses.fields(values):
            item = config_docs.array_of_tables(typing.get_type_hints(type(values))[inner.name])
            if item is not None:
                found.append((f"### `[[{f.name}.{inner.name}]]`", item, item()))
    return found


@pytest.mark.parametrize(("heading", "cls", "values"), sections_and_tables(), ids=lambda v: str(v)[:30])
def test_every_key_is_listed_with_a_default_that_loads_back_as_the_default(heading: str, cls: type,
                                                                          values: Any) -> None:
    rows = table_rows(section(config_docs.render_markdown(), heading))
    names = [f.name for f in dataclasses.fields(cls)]
    assert list(rows) == names
    for f in dataclasses.fields(cls):
        _, kind, default, bounds, meaning = rows[f.name]
        # What an operator copies from the page into the file is the default, in TOML.
        pasted = tomllib.loads(f"value = {default.strip('`').replace(chr(92) + '|', '|')}")["value"]
        expected = getattr(values, f.name)
        assert pasted == (list(expected) if isinstance(expected, tuple) else expected), f.name
        assert kind
        for bound in ("min", "max"):
            if bound in f.metadata:
                assert config_docs.toml_text(f.metadata[bound]) in bounds, (f.name, bound)
        assert f.metadata["doc"][1:] in meaning.replace("\\|", "|")
        if "env" in f.metadata:
            assert f"`{f.metadata['env']}`" in meaning


def test_every_environment_override_is_listed() -> None:
    environment = table_rows(section(page("configuration.md"), "## Environment"))
    declared = {f.metadata["env"]: f"{s.name}.{f.name}"
                for s in dataclasses.fields(Settings) if not s.metadata.get("internal")
                for f in dataclasses.fields(getattr(Settings(), s.name)) if "env" in f.metadata}
    assert declared
    assert {name: cells[1].strip("`") for name, cells in environment.items()} == declared


def test_the_generator_writes_the_file_it_is_given(tmp_path: Path) -> None:
    target = tmp_path / "docs" / "configuration.md"
    assert config_docs.main([str(target)]) == 0
    assert target.read_text(encoding="utf-8") == config_docs.render_markdown()


# --- docs/protocol.md --------------------------------------------------------------------------------

def served_routes() -> set[tuple[str, str]]:
    """(method, path) of every route the app serves, but the 405 refusals of a wrong method."""
    app = create_app(typing.cast(Services, SimpleNamespace(settings=Settings())))
    return {(method, route_template(rule.rule)) for rule in app.url_map.iter_rules()
            if not rule.endpoint.endswith("-other")
            for method in rule.methods or () if method not in ("HEAD", "OPTIONS")}


def test_the_protocol_page_lists_every_route_the_app_serves_and_no_other() -> None:
    listed = set(ROUTE.findall(section(page("protocol.md"), "## The client API")))
    served = served_routes()
    assert served - listed == set(), "served but not in docs/protocol.md"
    assert listed - served == set(), "in docs/protocol.md but not served"


def test_the_protocol_page_states_what_the_code_sends() -> None:
    text = page("protocol.md")
    routing = flat(section(text, "### Routing headers"))
    assert ", ".join(f"`{name}`" for name in ROUTED_FIELDS) in routing
    chat_body = flat(section(text, "### The chat body"))
    assert json.dumps(dict(DEFAULT_SAMPLING)) in chat_body


# --- citations ---------------------------------------------------------------------------------------

def test_no_code_cites_a_document_that_is_not_in_the_repository() -> None:
    citing = [f"{path.relative_to(ROOT)}: {name}" for path in code_files()
              for name in ABSENT_DOCUMENTS if name in path.read_text(encoding="utf-8")]
    assert citing == []


def test_every_cited_section_exists() -> None:
    cited = [(path, doc, heading) for path in code_files() + sorted(DOCS.glob("*.md"))
             for doc, heading in CITATION.findall(path.read_text(encoding="utf-8"))]
    assert cited, "the code cites sections of docs/protocol.md"
    missing = [f"{path.relative_to(ROOT)}: docs/{doc}.md, {heading!r}" for path, doc, heading in cited
               if not (DOCS / f"{doc}.md").exists() or heading not in headings(page(f"{doc}.md"))]
    assert missing == []


@pytest.mark.parametrize("name", ["architecture.md", "protocol.md"])
def test_every_module_a_document_names_exists(name: str) -> None:
    named = set(MODULE_PATH.findall(page(name)))
    assert named
    assert sorted(p for p in named if not (ROOT / p).exists()) == []


def test_the_architecture_page_quotes_the_import_contract() -> None:
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    (floors,) = [c for c in contracts if c["type"] == "layers"]
    assert f"layers = {json.dumps(floors['layers'])}" in section(page("architecture.md"), "## The floors")
