"""Reading the TOML file into `Settings`, strictly.

Every problem is one `ConfigError` whose message names the file, the dotted key, what was expected
and what was found, so an operator can fix a typo without reading code.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import tomlkit
from tomlkit.exceptions import TOMLKitError

from config.settings import Settings

T = TypeVar("T")


class ConfigError(Exception):
    """A configuration file that cannot be used; the message is meant for the operator."""


def describe(value: object) -> str:
    """A value as the operator wrote it, in TOML spelling, with its kind: `a string "8o"`."""
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    kind = kinds.get(type(value))
    if kind is None:
        kind = "a table" if isinstance(value, Mapping) else "an array" if isinstance(value, list) else "a value"
    if isinstance(value, Mapping | list):
        return kind
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
    else:
        text = str(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{kind} {text}"


def _expected(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(f'"{a}"' for a in get_args(tp))
    if tp is bool:
        return "a boolean (true or false)"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    return "a table"


def _convert(tp: Any, value: Any, where: str, meta: Mapping[str, Any]) -> Any:
    """Check one value against its declared type and bounds, returning the plain Python value."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a table, found {describe(value)}")
        return _build(typing.cast(type, tp), value, where)
    if origin is tuple:
        (item_type, _) = get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected an array, found {describe(value)}")
        return tuple(_convert(item_type, item, f"{where}[{i}]", {}) for i, item in enumerate(value))
    if origin is Literal:
        if value not in get_args(tp) or not isinstance(value, str):
            raise ConfigError(f"{where}: expected {_expected(tp)}, found {describe(value)}")
        return str(value)
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, int | float) and not isinstance(value, bool))
        or (tp is str and isinstance(value, str))
    )
    if not ok:
        raise ConfigError(f"{where}: expected {_expected(tp)}, found {describe(value)}")
    plain: Any = tp(value)
    if tp is float and not math.isfinite(plain):
        raise ConfigError(f"{where}: expected a finite number, found {describe(value)}")
    if meta.get("address") and plain and not is_address(plain):
        raise ConfigError(f'{where}: expected "host:port" (a port from 1 to 65535) or "", found {describe(value)}')
    low, high = meta.get("min"), meta.get("max")
    if (low is not None and plain < low) or (high is not None and plain > high):
        bounds = (
            f"between {low} and {high}" if low is not None and high is not None
            else f"at least {low}" if low is not None else f"at most {high}"
        )
        raise ConfigError(f"{where}: expected {_expected(tp)} {bounds}, found {describe(value)}")
    return plain


def is_address(text: str) -> bool:
    """ "host:port", "[v6]:port": a host without spaces and a port from 1 to 65535."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return bool(sep and host and not any(c.isspace() for c in host) and port.isdigit() and 0 < int(port) < 65536)


def _check_neurons(settings: Settings) -> None:
    seen: dict[Any, int] = {}
    for i, neuron in enumerate(settings.subnet.neurons):
        for name, value in (("uid", neuron.uid), ("hotkey", neuron.hotkey)):
            if value == "":
                continue
            first = seen.setdefault((name, value), i)
            if first != i:
                raise ConfigError(f"subnet.neurons[{i}].{name}: {describe(value)} is already the {name} "
                                  f"of subnet.neurons[{first}]")


def _build(cls: type[T], data: Mapping[str, Any], where: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}  # type: ignore[arg-type]
    for key in data:
        if key not in fields:
            dotted = f"{where}.{key}" if where else key
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            known = ", ".join(fields)
            raise ConfigError(f"{dotted}: unknown key ({hint}expected one of: {known})")
    values = {}
    for name, f in fields.items():
        if name in data:
            dotted = f"{where}.{name}" if where else name
            values[name] = _convert(hints[name], data[name], dotted, f.metadata)
    return cls(**values)


def _unwrap(value: Any) -> Any:
    """tomlkit items to plain Python values."""
    if isinstance(value, Mapping):
        return {str(k): _unwrap(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unwrap(v) for v in value]
    if hasattr(value, "unwrap"):
        return value.unwrap()
    return value


def parse_settings(
    text: str, *, source: str = "<config>", environ: Mapping[str, str] | None = None
) -> Settings:
    """Parse TOML text into settings; `source` names the file in error messages."""
    try:
        document = tomlkit.parse(text)
    except TOMLKitError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    try:
        settings = _build(Settings, _unwrap(document), "")
        _check_neurons(settings)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    base_dir = os.path.dirname(os.path.abspath(source)) if source != "<config>" else "."
    return apply_environment(dataclasses.replace(settings, base_dir=base_dir), environ)


def apply_environment(settings: Settings, environ: Mapping[str, str] | None = None) -> Settings:
    """Apply the `env` overrides declared on fields (only string fields carry one)."""
    environ = os.environ if environ is None else environ
    sections: dict[str, Any] = {}
    for section in dataclasses.fields(Settings):
        current = getattr(settings, section.name)
        if not dataclasses.is_dataclass(current):
            continue
        changes = {
            f.name: environ[f.metadata["env"]]
            for f in dataclasses.fields(current)
            if f.metadata.get("env") and f.metadata["env"] in environ
        }
        if changes:
            sections[section.name] = dataclasses.replace(current, **changes)  # type: ignore[type-var]
    return dataclasses.replace(settings, **sections) if sections else settings


def load_settings(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate a config file."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"{file}: no such file (create one with `sn1-gateway init {file}`)") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file}: cannot be read: {exc}") from exc
    return parse_settings(text, source=str(file), environ=environ)


def default_settings(environ: Mapping[str, str] | None = None) -> Settings:
    return apply_environment(Settings(), environ)

