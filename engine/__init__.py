"""The top floor: the assembly of one gateway (`engine.gateway.run`), its supervisor and workers,
the logs, and the command line (`engine.cli`) with its doctor and key commands."""

from typing import Any


def __getattr__(name: str) -> Any:
    # `engine.run(settings)` without importing the whole runtime when a submodule is all that is needed.
    if name == "run":
        from engine.gateway import run

        return run
    raise AttributeError(name)
