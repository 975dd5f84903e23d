"""`sn1-gateway doctor`: checks a production setup end to end and says what to fix.

Each check is a small function returning a `CheckResult`: a mark, the check's name, what it found
and, when something is wrong, what to do. The checks reuse the gateway's own code (the config
loader, the hotkey loader, the metagraph sources, the scoring forwarder's choice of validators, the
key store's readers), so doctor and `serve` cannot disagree about what is acceptable.

Doctor changes nothing: folders and files are judged by `stat` and `os.access`, never by creating
something in them, and a port is bound and released at once. The only requests it sends are the
metagraph read, a Redis PING and, with `--probe`, one empty scoring payload (no uids, no chunks:
validators take it and score nothing).

Marks: `ok`; `note` (a fact worth knowing); `WARN` (works, but likely not as meant); `FAIL` (will
not work as configured); `skip` (does not apply, or needs a check that failed). Only a FAIL makes
the exit status non-zero.
"""

from __future__ import annotations

import enum
import errno
import getpass
import os
import random
import socket
import stat
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import trio
from bittensor_core import Keypair

from actors.keystore import KeyStoreError, keyfile
from actors.scoring.forwarder import ANSWER_LIMIT_BYTES
from actors.scoring.spool import CURSOR_NAME, SEGMENT_SUFFIX
from actors.scoring.validators import Validator, ValidatorPicker
from actors.subnet.actor import MetagraphSource, SubnetUnavailable
from config.loading import ConfigError, load_settings
from config.settings import Settings, WalletSettings
from engine.gateway import make_http_client, metagraph_source
from wire.epistula import Signer
from wire.hotkey import MINER_SIGNER_MIN_STAKE, HotkeyError, hotkey_standing, load_hotkey
from wire.metagraph import SubnetSnapshot
from wire.pool import post_streaming
from wire.snapshot import SnapshotCell

CHAIN_TIMEOUT_S = 60.0  # a metagraph read that takes longer: the chain counts as unreachable
REDIS_TIMEOUT_S = 3.0  # PING
SHORT_ADMIN_KEY = 16  # characters; a shorter admin key is easy to guess
PROBE_PAYLOAD = b'{"body":{},"uids":[],"chunks":{},"timings":{},"chunk_dicts_raw":{}}'
SHOWN_ANSWER_CHARS = 160  # of a validator's answer, in a FAIL line

SourceFactory = Callable[[Settings], MetagraphSource]


class Mark(enum.Enum):
    OK = "ok"
    NOTE = "note"
    WARN = "WARN"
    FAIL = "FAIL"
    SKIP = "skip"


@dataclass(frozen=True, slots=True)
class CheckResult:
    check: str
    mark: Mark
    detail: str
    fix: str = ""

    @property
    def failed(self) -> bool:
        return self.mark is Mark.FAIL

    def line(self) -> str:
        text = f"{self.mark.value:<4}  {self.check}: {self.detail}"
        return f"{text}; fix: {self.fix}" if self.fix else text


def ok(check: str, detail: str) -> CheckResult:
    return CheckResult(check, Mark.OK, detail)


def note(check: str, detail: str, fix: str = "") -> CheckResult:
    return CheckResult(check, Mark.NOTE, detail, fix)


def warn(check: str, detail: str, fix: str) -> CheckResult:
    return CheckResult(check, Mark.WARN, detail, fix)


def fail(check: str, detail: str, fix: str) -> CheckResult:
    return CheckResult(check, Mark.FAIL, detail, fix)


def skip(check: str, detail: str) -> CheckResult:
    return CheckResult(check, Mark.SKIP, detail)


def amount(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.4g}"


def printable(text: str, limit: int = SHOWN_ANSWER_CHARS) -> str:
    """A peer's text, safe for one terminal line."""
    cleaned = "".join(c if c.isprintable() else " " for c in text).strip()
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."


def whoami() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


# -- the config and the hotkey ----------------------------------------------------------------------


def check_config(path: str, environ: Mapping[str, str] | None = None) -> tuple[CheckResult, Settings | None]:
    try:
        settings = load_settings(path, environ)
    except ConfigError as exc:
        return fail("config", str(exc), "edit the file as the message says (`sn1-gateway init NEW.toml` "
                                        "writes one with every key documented)"), None
    return ok("config", f"{path} loads"), settings


def describe_wallet(wallet: WalletSettings) -> str:
    if wallet.uri:
        return "wallet.uri, a development key"
    return f"wallet {wallet.name!r}, hotkey {wallet.hotkey!r} under {wallet.path}"


async def check_hotkey(settings: Settings) -> tuple[CheckResult, Keypair | None]:
    wallet = settings.wallet
    try:
        keypair = await trio.to_thread.run_sync(load_hotkey, wallet)
    except HotkeyError as exc:
        return fail("hotkey", str(exc), "point wallet.name, wallet.hotkey and wallet.path at the validator's "
                                        "hotkey (`btcli wallet list` shows the wallets)"), None
    ss58 = keypair.ss58_address
    if wallet.uri and settings.subnet.source == "chain":
        return warn("hotkey", f"signs as {ss58} from wallet.uri, a development key, on a real chain",
                    "set wallet.name and wallet.hotkey to the validator's hotkey and wallet.uri = \"\""), keypair
    return ok("hotkey", f"signs as {ss58} ({describe_wallet(wallet)})"), keypair


# -- the metagraph ----------------------------------------------------------------------------------


def _describe_source(settings: Settings) -> str:
    s = settings.subnet
    return f"{s.network} subnet {s.netuid}" if s.source == "chain" else f"static subnet {s.netuid} (subnet.neurons)"


async def check_metagraph(settings: Settings, *, source_factory: SourceFactory = metagraph_source,
                          timeout_s: float = CHAIN_TIMEOUT_S) -> tuple[CheckResult, SubnetSnapshot | None]:
    """Read the metagraph the way `serve` does (`subnet.source`), the chain within `timeout_s`."""
    name = "metagraph"
    try:
        source = source_factory(settings)
    except ConfigError as exc:
        return fail(name, str(exc), "set subnet.network to finney, test, local or a ws:// / wss:// endpoint"
                    if settings.subnet.source == "chain" else "use subnet.source = \"chain\" (or \"static\")"), None
    network = settings.subnet.network
    started = trio.current_time()
    try:
        with trio.fail_after(timeout_s):
            snapshot = await trio.to_thread.run_sync(source.fetch, abandon_on_cancel=True)
    except trio.TooSlowError:
        return fail(name, f"the chain is unreachable: {network} did not answer within {timeout_s:g} s",
                    f"check this machine's access to {network}, or set subnet.network to a reachable endpoint"), None
    except SubnetUnavailable as exc:
        return fail(name, f"the chain is unreachable: {exc}",
                    f"check this machine's access to {network} and subnet.netuid, or set subnet.network to a "
                    f"reachable endpoint"), None
    elapsed = trio.current_time() - started
    serving = sum(1 for n in snapshot.neurons if n.axon and not n.validator_permit)
    where = _describe_source(settings)
    if not snapshot.neurons:
        fix = ("list the neurons as [[subnet.neurons]] tables, or use subnet.source = \"chain\""
               if settings.subnet.source == "static" else "check subnet.netuid")
        return fail(name, f"{where} has no neurons: there are no miners to ask", fix), snapshot
    block = f" at block {snapshot.block}" if snapshot.block is not None else ""
    read = f", read in {elapsed:.1f} s" if settings.subnet.source == "chain" else ""
    found = f"{where}: {len(snapshot.neurons)} neurons, {serving} serving miners{block}{read}"
    if serving == 0:
        return warn(name, f"{found}: every chat request would answer 503",
                    "check subnet.netuid; miners need a serving axon"), snapshot
    return ok(name, found), snapshot


def check_registration(settings: Settings, snapshot: SubnetSnapshot, ss58: str) -> CheckResult:
    """Our hotkey in the metagraph, with the stake miners that verify Epistula ask of a signer."""
    name = "our hotkey"
    static = settings.subnet.source == "static"
    standing = hotkey_standing(snapshot, ss58)
    neuron = snapshot.by_hotkey.get(ss58)
    if not standing.registered or neuron is None:
        return fail(name, f"{ss58} is not in the metagraph of {_describe_source(settings)}: miners that verify "
                          f"Epistula refuse a signer they do not know (401)",
                    "list it in [[subnet.neurons]] as the chain lists it" if static else
                    f"register it (`btcli subnets register --netuid {settings.subnet.netuid}`), or sign with "
                    f"the registered validator hotkey (wallet.*)")
    found = f"uid {neuron.uid}, stake {amount(neuron.stake)}"
    if standing.warnings:
        return warn(name, f"{found}: miners that verify Epistula refuse a signer under "
                          f"{amount(MINER_SIGNER_MIN_STAKE)} stake (401)",
                    "stake at least 10,000 on this hotkey (`btcli stake add`), or sign with a hotkey that has it")
    return ok(name, f"{found} (miners that verify Epistula ask for {amount(MINER_SIGNER_MIN_STAKE)})")


# -- scoring ----------------------------------------------------------------------------------------


def scoring_validators(settings: Settings, snapshot: SubnetSnapshot | None) -> tuple[CheckResult, tuple[Validator, ...]]:
    """The validators the forwarder would choose from (its own `ValidatorPicker`)."""
    name = "validators"
    s = settings.scoring
    if not s.enabled:
        return note(name, "scoring.enabled = false: answers are not sent to a validator for scoring"), ()
    if snapshot is None and not (s.validator and s.validator_hotkey):
        return skip(name, "needs the metagraph"), ()
    snap = snapshot or SubnetSnapshot(netuid=settings.subnet.netuid)
    picker = ValidatorPicker(s, SnapshotCell(snap), random.Random())
    found = picker.candidates()
    if not found:
        fix = (f"set scoring.validator_hotkey to the hotkey of the validator at {s.validator}" if s.validator else
               "set scoring.validator (and scoring.validator_hotkey) to your validator, or lower "
               "scoring.min_validator_stake")
        return fail(name, f"none eligible: {picker.problem}", fix), ()
    if s.validator and s.validator_hotkey:
        listed = snap.hotkey_at(s.validator)
        if listed is not None and listed != s.validator_hotkey:
            return warn(name, f"the metagraph lists {listed} at {s.validator}, not scoring.validator_hotkey "
                              f"{s.validator_hotkey}: payloads signed for the wrong hotkey are refused (400)",
                        "set scoring.validator_hotkey to the hotkey of the validator at that address"), found
    ranked = sorted(found, key=lambda v: -v.stake)
    shown = ", ".join(f"{v.hotkey} at {v.axon}" + (f" (stake {amount(v.stake)})" if v.stake else "")
                      for v in ranked[:3])
    more = f" and {len(ranked) - 3} more" if len(ranked) > 3 else ""
    rule = "scoring.validator" if s.validator else (
        f"validator permit, stake >= {amount(s.min_validator_stake)}, serving axon")
    return ok(name, f"{len(found)} eligible ({rule}): {shown}{more}"), found


async def probe_validator(settings: Settings, keypair: Keypair, validator: Validator,
                          transport: httpx.AsyncBaseTransport | None = None) -> CheckResult:
    """One empty scoring payload, signed as the forwarder signs: does the validator take our hotkey?"""
    name = "probe"
    ours = keypair.ss58_address
    who = f"validator {validator.hotkey} at {validator.axon}"
    headers = Signer(keypair).headers(PROBE_PAYLOAD, validator.hotkey)
    headers["Content-Type"] = "application/json"
    status, answer, reason = 0, b"", None
    async with make_http_client(settings, transport) as http:
        try:
            with trio.fail_after(settings.scoring.timeout_s):
                async with post_streaming(http, httpx.URL(f"http://{validator.axon}/scoring"), PROBE_PAYLOAD,
                                          headers, bounded=True) as response:
                    status = response.status_code
                    answer = await response.aread(max_bytes=ANSWER_LIMIT_BYTES)
        except trio.TooSlowError:
            reason = f"no answer within {settings.scoring.timeout_s:g} s (scoring.timeout_s)"
        except httpx.HTTPError as exc:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if reason is not None:
        return fail(name, f"{who} did not answer: {printable(reason)}",
                    f"check that it runs and that this machine reaches {validator.axon}")
    said = printable(answer.decode("utf-8", "replace"))
    if status in (401, 403):
        return fail(name, f"{who} refuses our hotkey {ours} (HTTP {status}): its API_HOTKEY does not name it",
                    f"set API_HOTKEY={ours} in that validator's environment (.env.validator) and restart it")
    if status == 400:
        return fail(name, f"{who} refused the signed payload (HTTP 400: {said})",
                    "check that scoring.validator_hotkey is the hotkey of the validator at that address, and "
                    "this machine's clock (signatures older than 8 s are refused)")
    if 200 <= status < 300:
        return ok(name, f"{who} accepts our hotkey (HTTP {status} to an empty scoring payload)")
    return warn(name, f"{who} answered HTTP {status} ({said}); it did not refuse our hotkey",
                "look at that validator's logs")


# -- the key store, the spool and the port ----------------------------------------------------------


async def check_redis(settings: Settings, timeout_s: float = REDIS_TIMEOUT_S) -> CheckResult:
    from actors.keystore.redisstore import RedisKeyStore, describe_url

    name = "redis"
    if settings.auth.store != "redis":
        return skip(name, "auth.store = \"file\"")
    try:
        async with RedisKeyStore.connect(settings.auth.redis_url, timeout_s=timeout_s):
            pass
    except KeyStoreError as exc:
        return fail(name, str(exc), "start Redis there, or correct auth.redis_url")
    return ok(name, f"answers PING at {describe_url(settings.auth.redis_url)}")


def mode_of(st: os.stat_result) -> str:
    return f"{stat.S_IMODE(st.st_mode):04o}"


def existing_ancestor(path: Path) -> Path:
    for parent in path.parents:
        if parent.exists():
            return parent
    return Path("/")


def can_create_in(path: Path) -> Path | None:
    """The nearest existing folder above `path` when this user cannot create there, else None."""
    ancestor = existing_ancestor(path)
    return None if os.access(ancestor, os.W_OK | os.X_OK) else ancestor


def check_keys_file(settings: Settings) -> CheckResult:
    name = "keys file"
    if settings.auth.store != "file":
        return skip(name, "auth.store = \"redis\"")
    path = Path(settings.resolve(settings.auth.keys_file))
    folder = path.parent
    no_keys_fix = ("import upstream's keys (`sn1-gateway keys import api_keys.json`) or create one "
                   "(`sn1-gateway keys create --rate-limit 60`)")
    try:
        st = path.stat()
    except FileNotFoundError:
        blocked = can_create_in(path) if not folder.is_dir() else (
            None if os.access(folder, os.W_OK | os.X_OK) else folder)
        if blocked is not None:
            return fail(name, f"{path} cannot be created: {blocked} is not writable by {whoami()}",
                        f"make {blocked} writable for {whoami()}, or set auth.keys_file elsewhere")
        made = "" if folder.is_dir() else f" (its folder {folder} is created 0700)"
        return warn(name, f"{path} does not exist yet: no API keys, every client request is refused (401); "
                          f"the first key creates it (0600){made}", no_keys_fix)
    except OSError as exc:
        return fail(name, f"{path} cannot be read: {exc.strerror}", f"make it readable for {whoami()}")
    if not stat.S_ISREG(st.st_mode):
        return fail(name, f"{path} is not a file", "move it away, or set auth.keys_file elsewhere")
    if not os.access(path, os.R_OK | os.W_OK):
        return fail(name, f"{path} is not readable and writable by {whoami()}",
                    f"chown {whoami()} {path} (or run the gateway as its owner)")
    if not os.access(folder, os.W_OK | os.X_OK):
        return fail(name, f"its folder {folder} is not writable by {whoami()}: the file is replaced there "
                          f"atomically, next to its lock file",
                    f"make {folder} writable for {whoami()}, or set auth.keys_file elsewhere")
    loose = [(p, s) for p in (path, keyfile.lock_path(path))
             if (s := _stat_or_none(p)) is not None and stat.S_IMODE(s.st_mode) & 0o077]
    if loose:
        shown = ", ".join(f"{p} (mode {mode_of(s)})" for p, s in loose)
        return fail(name, f"others may read {shown}", "chmod 600 " + " ".join(str(p) for p, _ in loose))
    try:
        keys = keyfile.read(path).keys
    except KeyStoreError as exc:
        return fail(name, str(exc), "fix the place named, or restore the file from a backup")
    if not keys:
        return warn(name, f"{path} holds no API keys: every client request is refused (401)", no_keys_fix)
    return ok(name, f"{path}: {len(keys)} API keys, mode {mode_of(st)}, writable")


def _stat_or_none(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except OSError:
        return None


def check_spool(settings: Settings) -> CheckResult:
    name = "spool"
    if not settings.scoring.enabled:
        return skip(name, "scoring.enabled = false")
    path = Path(settings.resolve(settings.scoring.spool_dir))
    try:
        st = path.stat()
    except FileNotFoundError:
        blocked = can_create_in(path)
        if blocked is not None:
            return fail(name, f"{path} cannot be created: {blocked} is not writable by {whoami()}",
                        f"make {blocked} writable for {whoami()}, or set scoring.spool_dir elsewhere")
        return ok(name, f"{path} does not exist yet; the gateway creates it (0700) at start")
    except OSError as exc:
        return fail(name, f"{path} cannot be read: {exc.strerror}", f"make it readable for {whoami()}")
    if not stat.S_ISDIR(st.st_mode):
        return fail(name, f"{path} is not a folder", "move it away, or set scoring.spool_dir elsewhere")
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        return fail(name, f"{path} is not writable by {whoami()}",
                    f"chown -R {whoami()} {path} (or run the gateway as its owner)")
    if stat.S_IMODE(st.st_mode) & 0o077:
        return fail(name, f"others may read the prompts in {path} (mode {mode_of(st)})", f"chmod 700 {path}")
    files = [p for p in path.iterdir() if p.name == CURSOR_NAME or p.name.endswith(SEGMENT_SUFFIX)]
    stats = [(p, s) for p in files if (s := _stat_or_none(p)) is not None]
    loose = [p for p, s in stats if stat.S_IMODE(s.st_mode) & 0o077]
    if loose:
        return fail(name, f"others may read {len(loose)} files in {path} (e.g. {loose[0].name}, mode "
                          f"{mode_of(loose[0].stat())})", f"chmod 600 {path}/*")
    locked = [p for p, _ in stats if not os.access(p, os.R_OK | os.W_OK)]
    if locked:
        return fail(name, f"{len(locked)} files in {path} are not readable and writable by {whoami()} "
                          f"(e.g. {locked[0].name})", f"chown -R {whoami()} {path}")
    waiting = sum(s.st_size for p, s in stats if p.name.endswith(SEGMENT_SUFFIX))
    held = f"; {waiting:,} bytes of segments wait for a validator or replay" if waiting else ""
    return ok(name, f"{path}: mode {mode_of(st)}, writable{held}")


def check_port(settings: Settings) -> CheckResult:
    """Bind `server.host:server.port` as the server does (hypercorn: the address family by the host's
    spelling, SO_REUSEADDR) and release it at once."""
    name = "port"
    host, port = settings.server.host, settings.server.port
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if port == 0:
        return note(name, "server.port = 0: a free port is picked at each start")
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen()
    except socket.gaierror as exc:
        return fail(name, f"server.host {host!r} does not resolve ({exc.strerror})",
                    "set server.host to an address of this machine (0.0.0.0 for all)")
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return fail(name, f"{where} is in use (a gateway, or the upstream API, still running?)",
                        "stop what listens there, or set server.port")
        if exc.errno == errno.EACCES:
            return fail(name, f"binding {where} needs privileges", "use a port above 1023, or grant the "
                        "gateway CAP_NET_BIND_SERVICE")
        if exc.errno == errno.EADDRNOTAVAIL:
            return fail(name, f"{host} is not an address of this machine",
                        "set server.host to one of its addresses (0.0.0.0 for all)")
        return fail(name, f"cannot listen on {where}: {exc.strerror or exc}", "set server.host and server.port")
    return ok(name, f"{where} is free")


def check_admin_key(settings: Settings, environ: Mapping[str, str] | None = None) -> CheckResult:
    name = "admin key"
    environ = os.environ if environ is None else environ
    key = settings.auth.admin_key
    origin = " (from SN1_GATEWAY_ADMIN_KEY)" if environ.get("SN1_GATEWAY_ADMIN_KEY") else ""
    if not key:
        return note(name, "auth.admin_key is empty: the /api_management endpoints are off "
                          "(manage keys with `sn1-gateway keys ...`)")
    if len(key) < SHORT_ADMIN_KEY:
        return warn(name, f"set{origin}, but only {len(key)} characters: easy to guess",
                    "use a long random one: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'")
    return ok(name, f"set{origin}; the /api_management endpoints are on")


# -- all of them ------------------------------------------------------------------------------------


async def run_checks(
    path: str,
    *,
    probe: bool = False,
    report: Callable[[CheckResult], object] = lambda result: None,
    source_factory: SourceFactory = metagraph_source,
    chain_timeout_s: float = CHAIN_TIMEOUT_S,
    transport: httpx.AsyncBaseTransport | None = None,
    environ: Mapping[str, str] | None = None,
) -> list[CheckResult]:
    """Every check in order, each handed to `report` as soon as it is known."""
    results: list[CheckResult] = []

    def done(result: CheckResult) -> None:
        results.append(result)
        report(result)

    async def step(check: Callable[[], Awaitable[CheckResult]]) -> None:
        done(await check())

    config, settings = check_config(path, environ)
    done(config)
    if settings is None:
        return results
    hotkey, keypair = await check_hotkey(settings)
    done(hotkey)
    metagraph, snapshot = await check_metagraph(settings, source_factory=source_factory, timeout_s=chain_timeout_s)
    done(metagraph)
    if keypair is not None and snapshot is not None:
        done(check_registration(settings, snapshot, keypair.ss58_address))
    else:
        done(skip("our hotkey", "needs the hotkey and the metagraph"))
    validators, found = scoring_validators(settings, snapshot)
    done(validators)
    if not probe:
        if found:
            done(skip("probe", "run with --probe to send one empty scoring payload to a validator"))
    elif not found or keypair is None:
        done(skip("probe", "needs the hotkey and an eligible validator"))
    else:
        target = max(found, key=lambda v: v.stake)  # the configured one, or the likeliest to be chosen
        await step(lambda: probe_validator(settings, keypair, target, transport))
    await step(lambda: check_redis(settings))
    done(check_keys_file(settings))
    done(check_spool(settings))
    done(check_port(settings))
    done(check_admin_key(settings, environ))
    return results


def summary(results: list[CheckResult]) -> str:
    counts = {mark: sum(1 for r in results if r.mark is mark) for mark in Mark}
    failed = counts[Mark.FAIL]
    warnings = counts[Mark.WARN]
    tail = f", {warnings} warning{'s' if warnings != 1 else ''}" if warnings else ""
    if failed:
        return f"doctor: {failed} check{'s' if failed != 1 else ''} failed{tail}; fix them and run doctor again"
    return f"doctor: every check passed{tail}"
