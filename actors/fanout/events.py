"""What a fan-out tells the request handler waiting on it, over the job's channel."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from wire.organic import MinerAnswer


@dataclass(frozen=True, slots=True)
class Chunk:
    """Text of the winner's stream, with the miner's chunk choice it came in (None for text a successor
    supplied at a takeover): only ever read through an allowlist."""

    text: str
    choice: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class End:
    """The winner finished; `finish_reason` as it sent it (None if it only sent [DONE])."""

    finish_reason: str | None


@dataclass(frozen=True, slots=True)
class Broken:
    """The winner failed after it had started answering, and no miner could take over."""

    error: str


@dataclass(frozen=True, slots=True)
class Failed:
    """Every miner failed before any usable answer."""

    errors: dict[int, str]


@dataclass(frozen=True, slots=True)
class Complete:
    """A whole valid answer (mode "complete")."""

    answer: MinerAnswer


Event = Chunk | End | Broken | Failed | Complete
FINAL_EVENTS = (End, Broken, Failed, Complete)
