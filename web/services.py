"""What the HTTP layer is handed: the settings, a handle to each running actor, and the registry that
`/health/ready` and `/metrics` read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx

from actors.actor import Registry
from actors.availability import AvailabilitySnapshot
from actors.fanout.breaker import MinerHealth
from actors.fanout.pool import FanoutPool
from actors.fanout.selection import Selector
from actors.jobs import JobsActor
from actors.keystore import FileKeyStore, KeyStore
from actors.peers import WorkerPeers
from actors.scoring.forwarder import ScoringForwarder
from config.settings import Settings
from web.telemetry import Telemetry
from wire.epistula import Signer
from wire.metagraph import SubnetSnapshot
from wire.snapshot import SnapshotCell

if TYPE_CHECKING:  # web.research imports this module
    from web.research.running import ResearchRuns


@dataclass
class Services:
    settings: Settings
    actors: Registry
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
    telemetry: Telemetry = field(default_factory=Telemetry)  # what requests did (`web/asgi.py` records it)
    jobs: JobsActor | None = None  # chat jobs, and work that outlives its request (streamed deep research)
    research: ResearchRuns | None = None  # deep-research runs under way, bounded (none: research is off)
    peers: WorkerPeers | None = None  # the other workers, when `server.workers` > 1
    draining: bool = False

    def readiness(self, health: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
        """`/health/ready`: `health`, the parts' reports, when the caller has read them already."""
        return {
            "ready": self.actors.ready() and not self.draining,
            "draining": self.draining,
            "worker": self.settings.worker,
            "actors": self.actors.report(),
            **(self.actors.health() if health is None else health),
        }
