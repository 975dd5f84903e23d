"""The gateway's settings: frozen, typed, with a default for everything.

Each field may carry `metadata` read by the loader and the default-file writer:
`doc` (the comment written by `sn1-gateway init`), `min` / `max` (inclusive bounds), `address`
(a "host:port" string, or empty) and `env` (an environment variable that overrides the file).
`Literal` types list the accepted words.
"""

from __future__ import annotations

import os.path
from dataclasses import dataclass, field
from typing import Any, Literal


def setting(default: Any, doc: str, **meta: Any) -> Any:
    """A field with its documentation and bounds, for the loader and for `init`."""
    return field(default=default, metadata={"doc": doc, **meta})


def table(factory: Any, doc: str) -> Any:
    return field(default_factory=factory, metadata={"doc": doc})


@dataclass(frozen=True)
class ServerSettings:
    host: str = setting("127.0.0.1", "address to listen on")
    port: int = setting(42170, "TCP port to listen on (0 picks a free one)", min=0, max=65535)
    max_body_bytes: int = setting(1_048_576, "largest request body accepted; larger ones get 413", min=1024)
    drain_timeout_s: float = setting(
        10.0, "on SIGINT/SIGTERM, how long in-flight requests and miners' answers may still run; the "
        "process exits at most 2.5 s after it (saving the scoring queue and key usage)", min=0.0, max=600.0
    )
    max_connections: int = setting(
        2048, "client connections open at once; more wait in the kernel's listen backlog until one closes",
        min=1, max=1_000_000,
    )
    keep_alive_timeout_s: float = setting(
        75.0, "an idle keep-alive client connection is closed after this long", min=0.1, max=3600.0
    )
    keep_alive_busy_s: float = setting(
        5.0, "while more than half of max_connections are open, idle ones are closed after this long instead",
        min=0.1, max=3600.0,
    )
    request_head_timeout_s: float = setting(
        10.0, "a request head still arriving after this long is refused and its connection closed (a client "
        "trickling bytes would hold its connection slot for ever)", min=0.5, max=600.0,
    )
    workers: int = setting(
        1, "serving processes on the same port (SO_REUSEPORT); more than 1 needs auth.store = \"redis\" "
        "(shared keys and limits), and each keeps its scoring spool in spool_dir/worker-N", min=1, max=64,
    )


@dataclass(frozen=True)
class AuthSettings:
    admin_key: str = setting(
        "", "key for the /api_management endpoints; empty disables them", env="SN1_GATEWAY_ADMIN_KEY"
    )
    store: Literal["file", "redis"] = setting("file", "where API keys live: \"file\" or \"redis\"")
    keys_file: str = setting("keys.toml", "the key store, for store = \"file\" (relative to this file)")
    redis_url: str = setting("redis://127.0.0.1:6379/0", "the key store, for store = \"redis\"")
    failed_auth_per_minute: int = setting(
        30, "failed authentications (wrong or missing API key, wrong admin key) one client address may "
        "make within a minute; beyond it that address gets 429 until it cools down (0 disables)",
        min=0, max=1_000_000)


@dataclass(frozen=True)
class WalletSettings:
    name: str = setting("default", "wallet name (the gateway's hotkey signs every outbound request)")
    hotkey: str = setting("default", "hotkey name inside the wallet")
    path: str = setting("~/.bittensor/wallets", "folder holding the wallets")
    uri: str = setting("", "for development only: a keypair URI such as \"//Alice\" instead of a wallet")


@dataclass(frozen=True)
class NeuronSettings:
    uid: int = setting(0, "the neuron's uid", min=0, max=65535)
    hotkey: str = setting("", "its hotkey (SS58 address)")
    axon: str = setting("", "its served \"host:port\"; empty when it serves nothing", address=True)
    incentive: float = setting(0.0, "incentive, 0..1", min=0.0, max=1.0)
    stake: float = setting(0.0, "stake", min=0.0)
    validator_permit: bool = setting(False, "whether it holds a validator permit")


@dataclass(frozen=True)
class SubnetSettings:
    source: Literal["chain", "static", "devnet"] = setting(
        "chain", "where the metagraph comes from: \"chain\", \"static\" (the neurons below) or \"devnet\""
    )
    netuid: int = setting(1, "the subnet's netuid", min=0, max=65535)
    network: str = setting("finney", "chain network name or websocket endpoint, for source = \"chain\"")
    sync_interval_s: float = setting(600.0, "how often the metagraph is re-read from the chain", min=1.0)
    cache_file: str = setting(
        "metagraph.json", "last good metagraph, served after a restart while the chain is unreachable"
    )
    allow_private_axons: bool = setting(
        False, "for source = \"chain\": ask axons at loopback, private, link-local, unspecified or multicast "
        "addresses (or host names); when false such neurons count as not serving (counted on /health/ready)"
    )
    neurons: tuple[NeuronSettings, ...] = setting((), "the metagraph, for source = \"static\"")


@dataclass(frozen=True)
class AvailabilitySettings:
    source: Literal["validator", "miners", "none"] = setting(
        "validator", "who says what miners can do: \"validator\", \"miners\" or \"none\""
    )
    interval_s: float = setting(120.0, "how often availabilities are polled", min=1.0)
    concurrency: int = setting(16, "parallel polls, for source = \"miners\"", min=1, max=1024)
    timeout_s: float = setting(10.0, "timeout of one poll", min=0.1)
    validator_max_bytes: int = setting(
        8 * 1024 * 1024, "largest answer taken from the validator's availability endpoint; more is a failed "
        "poll. It covers every uid, about 400 bytes each: 1,024 uids take 0.4 MB, 8 MiB holds them 20 times over",
        min=64 * 1024)


@dataclass(frozen=True)
class FanoutSettings:
    miners: int = setting(5, "miners asked per request", min=1, max=64)
    top_pool: int = setting(300, "sample from this many eligible miners, best incentive first", min=1)
    selection: Literal["learned", "uniform"] = setting(
        "learned", "how miners are drawn from the pool: \"learned\" (weighted by each miner's recent time to "
        "first token and failures, with explore_share of draws uniform) or \"uniform\" (as upstream)")
    explore_share: float = setting(
        0.2, "with selection = \"learned\": the share of draws made uniformly over the pool, so every serving "
        "miner keeps a floor of organic traffic and a recovered miner is seen to be healthy again",
        min=0.0, max=1.0)
    extra_scoring_miners: int = setting(
        0, "more miners per request, drawn at random from the whole subnet, whose answers only go to "
        "scoring (upstream v2.19 asks 50): each costs one more miner stream and a larger scoring payload",
        min=0, max=256)
    default_model: str = setting(
        "mrfakename/mistral-small-3.1-24b-instruct-2503-hf",
        "the model asked of miners when a request names \"Default\" or no model, and instead of a model "
        "no miner serves")
    strict_models: bool = setting(
        False, "a model no miner serves is a 404, instead of going to the miners for the task as default_model")
    validator_stake_limit: float = setting(
        1000.0, "neurons with a validator permit and at least this stake are never asked", min=0.0
    )
    connect_timeout_s: float = setting(10.0, "connect timeout towards a miner", min=0.1)
    first_token_timeout_s: float = setting(
        0.0, "budget for the first content token of the whole fan-out; 0: the request's own time budget "
        "(upstream's: 60 s, more for long answers, or the request's `timeout` within 60-300 s)", min=0.0
    )
    sse_keepalive_s: float = setting(
        5.0, "while a streaming client waits, an SSE comment is sent this often", min=0.1, max=300.0)
    stall_timeout_s: float = setting(
        1.5, "a streaming winner silent this long is replaced by a miner that said the same so far", min=0.05
    )
    max_inflight: int = setting(
        512, "fan-outs whose client is still waiting (chat, retrieval, each step of a research run), at once; "
        "more get 503 overloaded with Retry-After", min=1)
    max_background: int = setting(
        4096, "fan-outs kept running, collection for scoring included; beyond it the oldest collection "
        "whose client is served is cut short (counted)", min=1)
    answers_max_bytes: int = setting(
        1024 * 1024 * 1024, "what the miners' answers of every fan-out running (collections for scoring included) "
        "may hold together, as received. While they hold more, an answer past its share (this over the miner "
        "streams open) is cut at its next read: the miner's failure when it is also past what its request "
        "typically takes (64 KiB and 600 bytes a token), else the gateway's own limit (cut_at_pool_budget); a "
        "client whose winner is cut gets a successor or an error event. Memory held stays under about twice "
        "this. 1 GiB: 512 requests of 5 miners' whole answers at 1,024 tokens (about 300 KB each as vLLM "
        "streams them with logprobs, 770 MB in all), with room for collections for scoring",
        min=1024 * 1024, max=1 << 40)
    failure_threshold: int = setting(
        3, "consecutive failures that open a miner's circuit breaker", min=1, max=1000
    )
    breaker_cooldown_s: float = setting(60.0, "how long an open breaker skips its miner", min=0.1)
    mixture_deadline_s: float = setting(
        20.0, "mixture of miners: how long the first round may take", min=0.1
    )
    max_connections: int = setting(
        8192, "outbound connections open at once, idle and in use, to all miners and validators; at the cap "
        "the longest-idle one is replaced, and with none idle a request fails at once (the gateway's own "
        "limit, not the miner's failure). 8192: 512 requests x 5 miners = 2,560 streams, twice as many "
        "again for collections outliving their client, and room for scoring, polls and idle connections. "
        "Keep it below the open-files limit", min=16, max=1_048_576)


@dataclass(frozen=True)
class ScoringSettings:
    enabled: bool = setting(True, "forward every miner's answer to a validator for scoring")
    validator: str = setting("", "fixed validator axon \"host:port\"; empty: choose from the metagraph",
                             address=True)
    validator_hotkey: str = setting("", "its hotkey, when validator is set")
    min_validator_stake: float = setting(
        1000.0, "validators chosen from the metagraph hold at least this stake", min=0.0
    )
    spool_dir: str = setting("spool", "undelivered payloads wait here (relative to this file)")
    spool_max_bytes: int = setting(
        256 * 1024 * 1024, "largest spool; beyond it the oldest payloads are dropped and counted", min=4096
    )
    queue_size: int = setting(
        1024, "payloads queued in memory for delivery (within memory_max_bytes); more spill to the spool", min=1)
    timeout_s: float = setting(10.0, "timeout of one delivery", min=0.1)
    concurrency: int = setting(
        32, "deliveries in flight at once (also the spool replay batch); under load fewer fall behind and spill "
        "to the spool", min=1, max=256)
    overflow_size: int = setting(
        4096, "payloads waiting in memory for the spool writer or a validator when the queue is full (within "
        "memory_max_bytes); more are dropped and counted", min=1
    )
    memory_max_bytes: int = setting(
        64 * 1024 * 1024, "what scoring holds in memory at most: the queue, payloads waiting for the spool or a "
        "validator, deliveries in flight, the batch being written (an organic weighs its raw chunks and their "
        "text). Payloads are delivered from memory while that takes at most half of it; beyond, they go to the "
        "spool at once; beyond the whole (a failing or slow disk) they are dropped and counted (dropped.memory). "
        "64 MiB: 9 deliveries in flight of organics at 1,024 tokens from 5 miners (about 3.4 MB each) with a "
        "few queued, and as much again on its way to the spool; raise it with fanout.extra_scoring_miners",
        min=1024 * 1024)
    spool_batch: int = setting(256, "payloads written to the spool per fsync, at most", min=1)
    backoff_base_s: float = setting(1.0, "a validator that failed is skipped this long, doubling per failure",
                                    min=0.01)
    backoff_max_s: float = setting(
        300.0, "the longest a failed validator is skipped; a validator refusing our hotkey (401/403) is "
        "sent one payload this often", min=0.01)
    max_age_s: float = setting(
        86_400.0, "payloads older than this leave the spool undelivered (counted as dropped.expired)", min=1.0)
    max_payload_bytes: int = setting(
        16 * 1024 * 1024, "a scoring payload larger than this once encoded is dropped (counted as too_large)",
        min=1024)


@dataclass(frozen=True)
class ResearchSettings:
    max_steps: int = setting(
        10, "deep research (inference_mode \"Chain-of-Thought\" or test_time_inference): research steps (tools, "
        "then thinking) before the final answer is written", min=1, max=100)
    deadline_s: float = setting(
        600.0, "deep research: the whole run's deadline, final answer included; past it the run ends with an "
        "error", min=1.0, max=86_400.0)
    json_retries: int = setting(
        3, "deep research: a step whose answer is not the JSON asked for is asked again this many times, then "
        "the run ends with an error", min=0, max=20)
    max_tool_calls_per_step: int = setting(
        2, "deep research: web searches a step may plan; further planned ones are dropped", min=0, max=10)
    search_results: int = setting(
        2, "deep research: pages per web search, the most a plan may ask for", min=1, max=20)
    search_miners: int = setting(
        10, "deep research: miners asked per web search (as GET /web_retrieval's n_miners)", min=1, max=64)
    search_timeout_s: int = setting(
        30, "deep research: seconds a web search waits for its miners", min=1, max=120)
    max_running: int = setting(
        32, "deep-research runs this gateway works on at once, all keys together (streamed, answered whole or "
        "as jobs); more get 503 research_busy. Each run makes a fan-out at a time (two web searches at most)",
        min=1, max=10_000)
    max_running_per_key: int = setting(
        4, "deep-research runs one API key may have under way at once; more get 429 too_many_research_runs",
        min=1, max=10_000)


@dataclass(frozen=True)
class JobsSettings:
    file: str = setting(
        "jobs.sqlite", "chat jobs, for auth.store = \"file\": an SQLite file (relative to this file); with "
        "auth.store = \"redis\" jobs live in that Redis, shared by every gateway using it")
    ttl_s: float = setting(
        86_400.0, "a job is kept this long after it was created or, once finished, after it finished; then "
        "it is gone (404)", min=1.0, max=365 * 86_400.0)
    max_running: int = setting(
        64, "jobs this gateway runs at once, all keys together; more get 503", min=1, max=10_000)
    max_running_per_key: int = setting(
        4, "jobs this gateway runs at once for one API key; more get 429", min=1, max=10_000)
    max_stored_per_key: int = setting(
        256, "jobs kept for one API key (running or finished, not yet expired); more get 429 until some "
        "expire or are deleted", min=1, max=1_000_000)
    max_result_bytes: int = setting(
        16 * 1024 * 1024, "the most a job's result may hold (its chunks' JSON text); a job whose answer goes "
        "over it fails, saying so", min=4096, max=1024 * 1024 * 1024)
    sweep_interval_s: float = setting(
        60.0, "how often expired jobs are removed and jobs no gateway runs any more are marked failed",
        min=0.05, max=86_400.0)
    store_timeout_s: float = setting(
        5.0, "the longest one read or write of the job store may take; beyond it the store counts as "
        "unavailable (503)", min=0.1, max=600.0)


@dataclass(frozen=True)
class DevnetSettings:
    miners: int = setting(5, "simulated miners started by `serve --devnet`", min=1, max=256)
    faults: tuple[str, ...] = setting(
        (), "fault mode per miner, in uid order: \"\", \"slow_first_token\", \"http_500\", ..."
    )
    validator_fault: str = setting(
        "", "fault mode of the validator: \"\", \"down\", \"http_500\", \"slow\" or \"refuse_signer\""
    )


@dataclass(frozen=True)
class LogSettings:
    level: Literal["debug", "info", "warning", "error"] = setting(
        "info", "least severe record written: \"debug\", \"info\" (one access line per request), \"warning\" "
        "or \"error\"; `sn1-gateway -v serve` means \"debug\"")
    format: Literal["text", "json"] = setting(
        "text", "\"text\" (one line per record, the request id in brackets) or \"json\" (one object per line)")


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = table(ServerSettings, "the HTTP server")
    auth: AuthSettings = table(AuthSettings, "API keys and the admin key")
    wallet: WalletSettings = table(WalletSettings, "the gateway's hotkey, used to sign every outbound request")
    subnet: SubnetSettings = table(SubnetSettings, "the subnet and its metagraph")
    availability: AvailabilitySettings = table(AvailabilitySettings, "what each miner says it can do")
    fanout: FanoutSettings = table(FanoutSettings, "how requests are spread over miners")
    scoring: ScoringSettings = table(ScoringSettings, "organic scoring: every answer goes to a validator")
    research: ResearchSettings = table(ResearchSettings, "deep research: a chat request answered by a run of "
                                       "model calls and web searches")
    jobs: JobsSettings = table(JobsSettings, "chat jobs: POST /v1/chat/completions/jobs, answered without "
                               "holding the connection")
    devnet: DevnetSettings = table(DevnetSettings, "the local simulated subnet")
    log: LogSettings = table(LogSettings, "what the gateway logs, and how (to standard error)")
    base_dir: str = field(default=".", metadata={"internal": True})
    worker: int | None = field(default=None, metadata={"internal": True})  # this process's index, of several

    def resolve(self, path: str) -> str:
        """A path from the file, relative to the file's folder (or the working folder without one)."""
        expanded = os.path.expanduser(path)
        return expanded if os.path.isabs(expanded) else os.path.join(self.base_dir, expanded)
