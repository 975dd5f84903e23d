"""What the HTTP layer is handed: the settings and a handle to each running actor."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from actors.availability import AvailabilitySnapshot
from actors.fanout.breaker import MinerHealth
from actors.fanout.pool import FanoutPool
from actors.fanout.selection import Selector
from actors.keystore import FileKeyStore, KeyStore
from actors.scoring.forwarder import ScoringForwarder
from config.settings import Settings
from engine.supervisor import Supervisor
from wire.epistula import Signer
from wire.metagraph import SubnetSnapshot
from wire.snapshot import SnapshotCell


@dataclass
class Services:
    settings: Settings
    supervisor: Supervisor
    subnet: SnapshotCell[SubnetSnapshot]
    signer: Signer
    http: httpx.AsyncClient
    availability: SnapshotCell[AvailabilitySnapshot]
    miner_health: MinerHealth
    selector: Selector
    fanout: FanoutPool
    scoring: ScoringForwarder  # finished fan-outs go to `scoring.submit_nowait`
    # API keys and limits; the default, an empty in-memory store, is for tests that build Services
    keys: KeyStore = field(default_factory=FileKeyStore)
    # name -> a function giving that component's details for /health/ready
    health: dict[str, Callable[[], dict[str, Any]]] = field(default_factory=dict)
    draining: bool = False

    def readiness(self) -> dict[str, Any]:
        ready = self.supervisor.ready() and not self.draining
        return {
            "ready": ready,
            "draining": self.draining,
            "actors": self.supervisor.report(),
            **{name: describe() for name, describe in self.health.items()},
        }
