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
from collections.abc import Iterator, Sequence
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
`scoring.spool_dir` and `subnet.cache_file` are taken relative to the config file's folder (the
working folder when there is no file); `~` is expanded.
"""

NEURONS_NOTE = """\
No two neurons may share a uid or a hotkey. For example:"""


def _type_name(tp: Any, meta: dict[str, Any]) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " or ".join(f'`"{word}"`' for word in get_args(tp))
    if origin is tuple:
        (item, _) = get_args(tp)
        if dataclasses.is_dataclass(item):
            return "array of tables"
        return f"array of {SCALARS[item]}s"
    if meta.get("address"):
        return '`"host:port"` or `""`'
    return SCALARS[tp]


def _toml(value: Any) -> str:
    return tomlkit.item(list(value) if isinstance(value, tuple) else value).as_string()


def _bounds(meta: dict[str, Any]) -> str:
    low, high = meta.get("min"), meta.get("max")
    if low is not None and high is not None:
        return f"{_toml(low)} to {_toml(high)}"
    if low is not None:
        return f"at least {_toml(low)}"
    if high is not None:
        return f"at most {_toml(high)}"
    return ""


def _cell(text: str) -> str:
    """Text for one table cell: a `|` would end the cell."""
    return text.replace("|", "\\|")


def _doc(meta: dict[str, Any], note: str = "") -> str:
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
        note = ""
        if get_origin(tp) is tuple and dataclasses.is_dataclass(get_args(tp)[0]):
            note = f" One `[[{where}.{f.name}]]` table each, below."
        default = _toml(getattr(values, f.name))
        yield (f"| `{f.name}` | {_type_name(tp, dict(f.metadata))} | `{_cell(default)}` | "
               f"{_bounds(dict(f.metadata))} | {_doc(dict(f.metadata), note)} |")


def _environment() -> Iterator[str]:
    defaults = Settings()
    overrides = [
        (f.metadata["env"], f"{section.name}.{f.name}")
        for section in dataclasses.fields(Settings) if not section.metadata.get("internal")
        for f in dataclasses.fields(getattr(defaults, section.name))
        if f.metadata.get("env")
    ]
    yield "## Environment"
    yield ""
    yield "Each of these variables, when set, replaces the key's value from the file (or its default)."
    yield ""
    yield "| variable | key |"
    yield "|---|---|"
    for variable, key in overrides:
        yield f"| `{variable}` | `{key}` |"
    yield ""


def render_markdown() -> str:
    """The whole page, as `make docs` writes it."""
    lines = [
        "# Configuration",
        "",
        "<!-- Generated from config/settings.py by `make docs` (python -m config.docs); do not edit. -->",
        "",
        *INTRODUCTION.splitlines(),
        "",
        *_environment(),
    ]
    defaults = Settings()
    for section in dataclasses.fields(Settings):
        if section.metadata.get("internal"):
            continue
        values = getattr(defaults, section.name)
        lines += [f"## `[{section.name}]`", "", _doc(dict(section.metadata)), "", *_rows(type(values), values,
                                                                                       section.name), ""]
        hints = typing.get_type_hints(type(values))
        for f in dataclasses.fields(values):
            tp = hints[f.name]
            if get_origin(tp) is tuple and dataclasses.is_dataclass(item := get_args(tp)[0]):
                table = f"{section.name}.{f.name}"
                lines += [f"### `[[{table}]]`", "", _doc(dict(f.metadata)), "",
                          *_rows(item, item(), table), ""]
                if item is NeuronSettings:
                    lines += [*NEURONS_NOTE.splitlines(), "", *_neuron_example(table), ""]
    return "\n".join(lines)


def _neuron_example(table: str) -> Iterator[str]:
    example = NeuronSettings(uid=0, hotkey="5F...", axon="127.0.0.1:9001", incentive=0.1)
    yield "```toml"
    yield f"[[{table}]]"
    for f in dataclasses.fields(NeuronSettings):
        yield f"{f.name} = {_toml(getattr(example, f.name))}"
    yield "```"


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
