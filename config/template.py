"""The commented default config file, written by `sn1-gateway init`.

It is generated from the settings' own field metadata, so a new setting appears in it with its
documentation and default, and the file always loads back to the defaults.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.items import Table

from config.settings import NeuronSettings, Settings


def _toml_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def render_default() -> str:
    doc = tomlkit.document()
    doc.add(tomlkit.comment("sn1-gateway configuration. Every key is optional; shown are the defaults."))
    doc.add(tomlkit.comment("Check a file with: sn1-gateway check-config FILE"))
    defaults = Settings()
    for section in dataclasses.fields(Settings):
        if section.metadata.get("internal"):
            continue
        values = getattr(defaults, section.name)
        tbl: Table = tomlkit.table()
        tbl.comment(section.metadata["doc"])
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            if section.name == "subnet" and f.name == "neurons":
                continue
            note = f.metadata["doc"]
            if f.metadata.get("env"):
                note += f" (env {f.metadata['env']} overrides)"
            item = tomlkit.item(_toml_value(value))
            item.comment(note)
            tbl.add(f.name, item)
        doc.add(tomlkit.nl())
        doc.add(section.name, tbl)
    doc.add(tomlkit.nl())
    doc.add(tomlkit.comment("For subnet.source = \"static\", list the metagraph's neurons:"))
    example = NeuronSettings(uid=0, hotkey="5F...", axon="127.0.0.1:9001", incentive=0.1)
    doc.add(tomlkit.comment("[[subnet.neurons]]"))
    for f in dataclasses.fields(NeuronSettings):
        rendered = tomlkit.item(getattr(example, f.name)).as_string()
        doc.add(tomlkit.comment(f"{f.name} = {rendered}    # {f.metadata['doc']}"))
    return tomlkit.dumps(doc)


def write_default(path: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Write the default file; refuse to replace an existing one unless `force`."""
    target = Path(path)
    mode = "w" if force else "x"
    with target.open(mode, encoding="utf-8") as out:
        out.write(render_default())
    return target
