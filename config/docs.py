"""docs/configuration.md, generated from the settings' own field metadata.

As `config/template.py` writes the commented default file, this writes the reference page: every
section and key with its type, default, bounds, documentation and environment override, read from
the dataclasses in `config/settings.py`, so the page cannot say what the loader does not do.
`python -m config.docs [FILE]` (`make docs`) writes it; `tests/test_docs.py` keeps it current.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import tomlkit

from config.settings import NeuronSettings, Settings

DEFAULT_PATH = Path("docs/configuration.md")
SCALARS = {bool: "boolean", int: "integer", float: "number", str: "string"}

INTRODUCTION = """\
The gateway reads one TOML file: the one `sn1-gateway serve --config FILE` names, else
`./sn1-gateway.toml` when it exists, else none (every default below). Every key is optional.
`sn1-gateway init FILE` writes a file with every key at its default and these descriptions as comments;
`sn1-gateway check-config FILE` checks a file without starting anything.

A file is read strictly: an unknown key (with a suggestion when one is close), a value of the wrong
type, a number outside its bounds or a malformed `host:port` stops the command with one message naming
the file, the dotted key, what was expected and what was found (exit status 2). Numbers must be finite;
an integer is accepted where a number is expected, not the other way round. `auth.keys_file`,
`jobs.file`, `scoring.spool_dir` and `subnet.cache_file` are taken relative to the config file's folder (the
working folder when there is no file); `~` is expanded."""

NEURONS_NOTE = "No two neurons may share a uid or a hotkey. For example:"


def array_of_tables(tp: Any) -> type | None:
    """The settings class of an array of tables (`tuple[NeuronSettings, ...]`), else None."""
    if get_origin(tp) is tuple:
        item = get_args(tp)[0]
        if isinstance(item, type) and dataclasses.is_dataclass(item):
            return item
    return None


def toml_text(value: Any) -> str:
    """A value as it is written in the file."""
    return tomlkit.item(list(value) if isinstance(value, tuple) else value).as_string()


def _type_name(tp: Any, meta: Mapping[str, Any]) -> str:
    if get_origin(tp) is Literal:
        return " or ".join(f'`"{word}"`' for word in get_args(tp))
    if array_of_tables(tp) is not None:
        return "array of tables"
    if get_origin(tp) is tuple:
        return f"array of {SCALARS[get_args(tp)[0]]}s"
    if meta.get("address"):
        return '`"host:port"` or `""`'
    return SCALARS[tp]


def _bounds(meta: Mapping[str, Any]) -> str:
    low, high = meta.get("min"), meta.get("max")
    if low is not None and high is not None:
        return f"{toml_text(low)} to {toml_text(high)}"
    if low is not None:
        return f"at least {toml_text(low)}"
    if high is not None:
        return f"at most {toml_text(high)}"
    return ""


def _cell(text: str) -> str:
    """Text for one table cell: a `|` would end the cell."""
    return text.replace("|", "\\|")


def _doc(meta: Mapping[str, Any], note: str = "") -> str:
    text = meta["doc"]
    text = text[0].upper() + text[1:]
    if not text.endswith("."):
        text += "."
    if meta.get("env"):
        text += f" The environment variable `{meta['env']}`, when set, overrides it."
    return _cell(text + note)


def _rows(cls: type, values: Any, where: str) -> Iterator[str]:
    hints = typing.get_type_hints(cls)
    yield "| key | type | default | bounds | meaning |"
    yield "|---|---|---|---|---|"
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        tp = hints[f.name]
        note = f" One `[[{where}.{f.name}]]` table each, below." if array_of_tables(tp) else ""
        default = toml_text(getattr(values, f.name))
        yield (f"| `{f.name}` | {_type_name(tp, f.metadata)} | `{_cell(default)}` | "
               f"{_bounds(f.metadata)} | {_doc(f.metadata, note)} |")


def _table(heading: str, meta: Mapping[str, Any], cls: type, values: Any, where: str) -> Iterator[str]:
    yield from (heading, "", _doc(meta), "")
    yield from _rows(cls, values, where)
    yield ""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        item = array_of_tables(hints[f.name])
        if item is None:
            continue
        table = f"{where}.{f.name}"
        yield from _table(f"### `[[{table}]]`", f.metadata, item, item(), table)
        if item is NeuronSettings:
            yield from (NEURONS_NOTE, "", *_neuron_example(table), "")


def _neuron_example(table: str) -> Iterator[str]:
    example = NeuronSettings(uid=0, hotkey="5F...", axon="127.0.0.1:9001", incentive=0.1)
    yield "```toml"
    yield f"[[{table}]]"
    for f in dataclasses.fields(NeuronSettings):
        yield f"{f.name} = {toml_text(getattr(example, f.name))}"
    yield "```"


def _environment(defaults: Settings) -> Iterator[str]:
    yield from ("## Environment", "",
                "Each of these variables, when set, replaces the key's value from the file (or its default).", "",
                "| variable | key |", "|---|---|")
    for section in dataclasses.fields(Settings):
        if section.metadata.get("internal"):
            continue
        for f in dataclasses.fields(getattr(defaults, section.name)):
            if f.metadata.get("env"):
                yield f"| `{f.metadata['env']}` | `{section.name}.{f.name}` |"
    yield ""


def render_markdown() -> str:
    """The whole page, as `make docs` writes it."""
    defaults = Settings()
    lines = [
        "# Configuration", "",
        "<!-- Generated from config/settings.py by `make docs` (python -m config.docs); do not edit. -->", "",
        INTRODUCTION, "",
        *_environment(defaults),
    ]
    for section in dataclasses.fields(Settings):
        if section.metadata.get("internal"):
            continue
        values = getattr(defaults, section.name)
        lines += _table(f"## `[{section.name}]`", section.metadata, type(values), values, section.name)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) > 1:
        print("usage: python -m config.docs [FILE]  (default: docs/configuration.md)", file=sys.stderr)
        return 2
    target = Path(args[0]) if args else DEFAULT_PATH
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render_markdown(), encoding="utf-8")
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
