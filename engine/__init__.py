"""The runtime: supervisor, snapshots, wire protocols, assembly (`engine.run`) and the CLI."""

from typing import Any


def __getattr__(name: str) -> Any:
    # `engine.run(settings)` without importing the whole runtime when a submodule is all that is needed.
    if name == "run":
        from engine.gateway import run

        return run
    raise AttributeError(name)
