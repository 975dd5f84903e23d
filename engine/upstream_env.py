"""A config file from an upstream validator API's `.env.api` (`sn1-gateway init --from-upstream`).

Upstream (v2.19.10, `shared/settings.py`) loads `.env.api` with python-dotenv and reads its settings
with pydantic-settings: names match case-insensitively, booleans are words such as `true`/`1`/`yes`,
lists are JSON. The file is parsed here with the same library, so comments, quotes, `export`,
`${VAR}` references and empty values mean what they meant to upstream.

Every setting is either mapped to one of our keys (checked by the config loader itself, so the file
written always loads) or reported with why not. Settings the file does not name keep our defaults,
except where the API listens (`API_HOST`, `API_PORT`): clients keep reaching it where they did.
Values are printed only for settings we map and that are not secret (the admin key is written to
the file, mode 0600, and never printed); a setting we do not map is named, never shown (it may be
a token).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomlkit
from dotenv.main import resolve_variables
from dotenv.parser import parse_stream
from tomlkit.items import Item, Table

from config.loading import ConfigError, describe, is_address, parse_settings
from config.template import render_default

# Upstream's defaults where they decide what clients see, applied when the file does not name them.
UPSTREAM_API_HOST = "0.0.0.0"
UPSTREAM_API_PORT = 8005
MAX_ENV_BYTES = 1 << 20  # a .env file is a few hundred bytes; more is not one

SECRETS = frozenset({"auth.admin_key"})

# Upstream settings that exist but have no counterpart here, and why (upstream name -> reason).
NO_COUNTERPART: Mapping[str, str] = {
    "WORKERS": "one gateway process serves every request; to run several, share keys and limits "
               "through auth.store = \"redis\"",
    "SCORING_KEY": "v2.19.10 validators check the Epistula signer (their API_HOTKEY), not this key: nothing to set",
    "API_TEST_MODE": "there is no test mode; try the gateway on a simulated subnet with `sn1-gateway serve --devnet`",
    "SCORING_RATE_LIMIT_SEC": "scoring payloads go out as fast as validators take them (scoring.concurrency)",
    "SCORING_QUEUE_API_THRESHOLD": "scoring payloads go out as fast as validators take them (scoring.concurrency)",
    "MC_VALIDATOR_HOTKEY": "validators' axons come from the metagraph; to send to one validator at a fixed "
                           "address set scoring.validator and scoring.validator_hotkey",
    "MC_VALIDATOR_AXON": "validators' axons come from the metagraph; to send to one validator at a fixed "
                         "address set scoring.validator and scoring.validator_hotkey",
    "INFERENCE_TIMEOUT": "a request's time budget follows upstream's rule (60-300 s by its max tokens and "
                         "timeout); fanout.first_token_timeout_s caps the wait for the first token",
    "MAX_TIMEOUT": "a request's time budget follows upstream's rule (60-300 s by its max tokens and "
                   "timeout); fanout.first_token_timeout_s caps the wait for the first token",
    "NEURON_TIMEOUT": "a request's time budget follows upstream's rule (60-300 s by its max tokens and "
                      "timeout); fanout.connect_timeout_s bounds connecting to a miner",
    "API_UIDS_EXPLORE": "there is no exploration share; fanout.extra_scoring_miners asks random miners "
                        "for scoring",
    "TEST_MINER_IDS": "there are no fixed test miners; a request's `uids` names miners",
    "GEMMA_API_KEY": "deep research runs on the subnet's miners here, with no outside model",
    "UID_TRACKER_DB": "miner reliability is kept in memory (fanout.failure_threshold, fanout.breaker_cooldown_s)",
    "DEFAULT_SN1_API": "not used by the API",
    "LOG_LEVEL": "the gateway logs at INFO; run it with -v for debug logs",
    "AXON_PORT": "a validator or miner setting; the API does not use it",
}

# The other upstream settings (v2.19.10 `SharedSettings`): a validator's or a miner's, not the API's.
NOT_USED_BY_THE_API = frozenset({
    "MODE", "MOCK", "TEST", "WANDB_ON", "WANDB_ENTITY", "WANDB_PROJECT_NAME", "WANDB_API_KEY", "WANDB_OFFLINE",
    "WANDB_NOTES", "MAX_WANDB_DURATION", "LOGGING_DONT_SAVE_EVENTS", "LOG_WEIGHTS", "LOG_TIMINGS",
    "NEURON_DEVICE", "NEURON_DISABLE_SET_WEIGHTS", "NEURON_QUERY_UNIQUE_COLDKEYS", "NEURON_QUERY_UNIQUE_IPS",
    "NEURON_MAX_TOKENS", "REWARD_STEEPNESS", "TASK_QUEUE_LENGTH_THRESHOLD", "SCORING_QUEUE_LENGTH_THRESHOLD",
    "HF_TOKEN", "SCORING_API_PORT", "MAX_ALLOWED_VRAM_GB", "PROXY_URL", "LLM_MODEL", "SAMPLING_PARAMS",
    "LLM_MODEL_RAM", "OPENAI_API_KEY", "SN19_API_KEY", "SN19_API_URL", "GPT_MODEL_CONFIG",
})


class UpstreamEnvError(Exception):
    """The `.env.api` file cannot be read; the message names it and the cause."""


@dataclass(frozen=True, slots=True)
class Mapped:
    """An upstream setting (or upstream's default for it) written as one of our keys."""

    upstream: str  # as the file spells it; "API_PORT (not set)" for an applied upstream default
    key: str  # our dotted key
    value: Any
    note: str = ""

    def line(self) -> str:
        shown = "(secret: written to the file, not shown)" if self.key in SECRETS else describe_value(self.value)
        text = f"mapped: {self.upstream} -> {self.key} = {shown}"
        return f"{text}; {self.note}" if self.note else text


@dataclass(frozen=True, slots=True)
class Unmapped:
    upstream: str
    why: str
    line_no: int | None = None

    def line(self) -> str:
        if not self.upstream:
            return f"not mapped: line {self.line_no}: {self.why}"
        where = f" (line {self.line_no})" if self.line_no else ""
        return f"not mapped: {self.upstream}{where}: {self.why}"


@dataclass
class Translation:
    values: dict[str, Any] = field(default_factory=dict)  # dotted key -> value, in the order mapped
    mapped: list[Mapped] = field(default_factory=list)
    unmapped: list[Unmapped] = field(default_factory=list)
    keys_file: str | None = None  # upstream's API_KEYS_FILE, for `sn1-gateway keys import`

    def lines(self) -> list[str]:
        return [m.line() for m in self.mapped] + [u.line() for u in self.unmapped]


def describe_value(value: Any) -> str:
    return tomlkit.item(value).as_string()


@dataclass(frozen=True, slots=True)
class EnvFile:
    """The settings of a `.env` file: upper-cased name -> (name as written, value or None, line)."""

    entries: dict[str, tuple[str, str | None, int]]
    problems: tuple[Unmapped, ...] = ()

    def get(self, name: str) -> str | None:
        entry = self.entries.get(name)
        return None if entry is None else entry[1]

    def named(self, name: str) -> bool:
        return name in self.entries

    def spelled(self, name: str) -> str:
        return self.entries[name][0] if name in self.entries else name

    def line_of(self, name: str) -> int | None:
        return self.entries[name][2] if name in self.entries else None


def parse_env(text: str) -> EnvFile:
    """Parse `.env` text as upstream's python-dotenv does, `${VAR}` references included (resolved from
    the file's earlier lines, else the environment)."""
    pairs: list[tuple[str, str | None]] = []
    lines: dict[str, int] = {}
    problems: list[Unmapped] = []
    for binding in parse_stream(io.StringIO(text)):
        if binding.error:  # its text is not shown: it may hold a secret
            problems.append(Unmapped("", "python-dotenv cannot parse it (upstream skipped it too)",
                                     binding.original.line))
        elif binding.key is not None:
            pairs.append((binding.key, binding.value))
            lines[binding.key] = binding.original.line
    entries: dict[str, tuple[str, str | None, int]] = {}
    for name, value in resolve_variables(pairs, override=True).items():
        # pydantic-settings matches names case-insensitively; a later line wins, as in a shell.
        entries.pop(name.upper(), None)
        entries[name.upper()] = (name, value, lines[name])
    return EnvFile(entries, tuple(problems))


def read_env_file(path: str | os.PathLike[str]) -> EnvFile:
    file = Path(path)
    try:
        with file.open("rb") as handle:
            data = handle.read(MAX_ENV_BYTES + 1)
    except OSError as exc:
        raise UpstreamEnvError(f"{file}: cannot be read: {exc.strerror or exc}") from exc
    if len(data) > MAX_ENV_BYTES:
        raise UpstreamEnvError(f"{file}: over {MAX_ENV_BYTES} bytes; not a .env file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UpstreamEnvError(f"{file}: not UTF-8 text ({exc})") from exc
    return parse_env(text)


# -- converting upstream's values as pydantic does --------------------------------------------------

TRUE_WORDS = frozenset({"1", "on", "t", "true", "y", "yes"})
FALSE_WORDS = frozenset({"0", "off", "f", "false", "n", "no"})


class BadValue(ValueError):
    pass


def as_bool(text: str) -> bool:
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise BadValue("not a boolean (upstream takes true/false, 1/0, yes/no, on/off)")


def as_int(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise BadValue("not an integer") from None


def as_float(text: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise BadValue("not a number") from None


def as_text(text: str) -> str:
    return text.strip()


def as_destination(text: str) -> str:
    """An address to connect to: "0.0.0.0" (upstream's default, which Linux takes as this machine)
    becomes 127.0.0.1, which means the same and reads as what it is."""
    address = text.strip()
    host, sep, port = address.rpartition(":")
    if sep and host == "0.0.0.0":
        return f"127.0.0.1:{port}"
    return address


def check_value(key: str, value: Any) -> str | None:
    """The loader's own verdict on `value` for the dotted `key`: None when it takes it, else why not."""
    section, name = key.split(".", 1)
    doc = tomlkit.document()
    table = tomlkit.table()
    table.add(name, value)
    doc.add(section, table)
    try:
        parse_settings(tomlkit.dumps(doc), environ={})
    except ConfigError as exc:
        return str(exc).removeprefix("<config>: ")
    return None


# -- the translation --------------------------------------------------------------------------------


class _Translator:
    def __init__(self, env: EnvFile, base: Path) -> None:
        self.env = env
        self.base = base
        self.out = Translation()
        self.seen: set[str] = set()

    def unmapped(self, name: str, why: str) -> None:
        self.seen.add(name)
        self.out.unmapped.append(Unmapped(self.env.spelled(name), why, self.env.line_of(name)))

    def value(self, name: str) -> str | None:
        """The file's value for `name`, or None (and a line saying why) when it has none to map."""
        if not self.env.named(name):
            return None
        self.seen.add(name)
        text = self.env.get(name)
        if text is None:
            self.unmapped(name, "no value (upstream did not set it either)")
            return None
        if text.strip() == "":
            self.unmapped(name, "empty; the default stays")
            return None
        return text

    def put(self, name: str, key: str, value: Any, note: str = "", *, label: str | None = None) -> bool:
        """Map `value` to `key` if the config loader takes it; `label` names the source in the line
        (default: the setting as the file spells it)."""
        label = label or self.env.spelled(name)
        problem = check_value(key, value)
        if problem is not None:
            self.seen.add(name)
            why = f"{key} refuses it" if key in SECRETS else problem
            self.out.unmapped.append(Unmapped(label, why, self.env.line_of(name)))
            return False
        self.out.values[key] = value
        self.out.mapped.append(Mapped(label, key, value, note))
        return True

    def simple(self, name: str, key: str, convert: Callable[[str], Any], note: str = "") -> bool:
        text = self.value(name)
        if text is None:
            return False
        try:
            converted = convert(text)
        except BadValue as exc:
            self.unmapped(name, str(exc) if key in SECRETS else f"{exc}: {describe(text)}")
            return False
        return self.put(name, key, converted, note)

    def run(self) -> Translation:
        self.wallet()
        self.server()
        self.simple("ADMIN_KEY", "auth.admin_key", as_text)
        self.validator()
        self.simple("SCORE_ORGANICS", "scoring.enabled", as_bool)
        if not self.env.named("SCORE_ORGANICS"):
            self.out.unmapped.append(Unmapped(
                "SCORE_ORGANICS (not set)", "upstream's default was false (nothing sent for scoring); "
                "scoring.enabled stays true here: set it to false to keep that"))
        self.simple("NETUID", "subnet.netuid", as_int)
        if not self.env.named("NETUID"):
            self.out.unmapped.append(Unmapped(
                "NETUID (not set)", "upstream's default was 61; subnet.netuid stays 1 (Subnet 1) here"))
        self.network()
        self.simple("API_TOP_UIDS_TO_STREAM", "fanout.miners", as_int)
        self.simple("API_TOP_UIDS_SAMPLE", "fanout.top_pool", as_int)
        self.simple("API_EXTRA_UIDS_QUERY", "fanout.extra_scoring_miners", as_int)
        self.simple("NEURON_VPERMIT_TAO_LIMIT", "fanout.validator_stake_limit", as_float)
        self.keys_file()
        self.balance()
        for name in self.env.entries:
            if name in self.seen:
                continue
            if name in NO_COUNTERPART:
                self.unmapped(name, NO_COUNTERPART[name])
            elif name in NOT_USED_BY_THE_API:
                self.unmapped(name, "a validator's or a miner's setting; the API does not use it")
            else:
                self.unmapped(name, "not a setting of the upstream validator API (v2.19.10); ignored")
        self.out.unmapped.extend(self.env.problems)
        return self.out

    def wallet(self) -> None:
        # Upstream passes WALLET_NAME and HOTKEY to bittensor's wallet; without them bittensor's own
        # BT_WALLET_NAME / BT_WALLET_HOTKEY apply, and BT_WALLET_PATH names the wallets' folder.
        for ours, theirs, fallback in (("wallet.name", "WALLET_NAME", "BT_WALLET_NAME"),
                                       ("wallet.hotkey", "HOTKEY", "BT_WALLET_HOTKEY")):
            if not self.simple(theirs, ours, as_text) and self.env.named(fallback):
                self.simple(fallback, ours, as_text)
            elif self.env.named(fallback):
                self.unmapped(fallback, f"{theirs} names the {ours.split('.')[1]} and wins")
        self.simple("BT_WALLET_PATH", "wallet.path", as_text)

    def server(self) -> None:
        for name, key, convert, default in (("API_HOST", "server.host", as_text, UPSTREAM_API_HOST),
                                            ("API_PORT", "server.port", as_int, UPSTREAM_API_PORT)):
            if self.env.named(name):
                self.simple(name, key, convert)
            else:
                self.put(name, key, default, "upstream's default, so that clients reach the gateway where they "
                         "reached the API", label=f"{name} (not set)")

    def validator(self) -> None:
        """VALIDATOR_API is where upstream asked for availabilities, and what operators point at their
        validator; OVERRIDE_AVAILABLE_AXONS (a JSON list), with API_HOTKEY as the hotkey signed for, is
        where upstream sent scoring payloads instead of to the metagraph's validators. Here one
        address, `scoring.validator`, serves both."""
        fixed = self.override_axons()
        text = self.value("VALIDATOR_API")
        if text is not None:
            address = as_destination(text)
            if fixed is not None:
                if address != fixed:
                    self.unmapped("VALIDATOR_API", f"availability is asked of scoring.validator here, {fixed} "
                                                   f"(from OVERRIDE_AVAILABLE_AXONS)")
            elif not is_address(address):
                self.unmapped("VALIDATOR_API", f"not \"host:port\": {describe(text)}")
            else:
                note = ("scoring payloads and availability queries go there; set scoring.validator_hotkey to that "
                        "validator's hotkey unless the metagraph lists it at this address")
                if address != text.strip():
                    note = "0.0.0.0 as a destination is this machine; " + note
                self.put("VALIDATOR_API", "scoring.validator", address, note)
        if self.env.named("API_HOTKEY") and "API_HOTKEY" not in self.seen:
            self.unmapped("API_HOTKEY", "a validator's setting: every validator scoring our organics needs "
                                        "API_HOTKEY = the gateway's hotkey (`sn1-gateway doctor` shows it) "
                                        "in its .env.validator")

    def override_axons(self) -> str | None:
        """OVERRIDE_AVAILABLE_AXONS mapped to scoring.validator (and API_HOTKEY to its hotkey); the address."""
        text = self.value("OVERRIDE_AVAILABLE_AXONS")
        if text is None:
            return None
        try:
            axons = json.loads(text)
        except ValueError:
            axons = None
        if not isinstance(axons, list) or not all(isinstance(a, str) for a in axons):
            self.unmapped("OVERRIDE_AVAILABLE_AXONS", "not a JSON list of \"host:port\" strings, as upstream reads it")
            return None
        if not axons:
            self.unmapped("OVERRIDE_AVAILABLE_AXONS", "an empty list: upstream used the metagraph's validators, "
                                                      "as the gateway does")
            return None
        address = as_destination(axons[0])
        note = "scoring payloads and availability queries go there"
        if len(axons) > 1:
            note += f"; upstream sent every payload to all {len(axons)}, here one fixed validator takes them"
        hotkey = self.value("API_HOTKEY")
        if hotkey is None:
            note += "; with no API_HOTKEY, the hotkey the metagraph lists at that address is used"
        label = self.env.spelled("OVERRIDE_AVAILABLE_AXONS") + ("[0]" if len(axons) > 1 else "")
        if not self.put("OVERRIDE_AVAILABLE_AXONS", "scoring.validator", address, note, label=label):
            return None
        if hotkey is not None:
            self.put("API_HOTKEY", "scoring.validator_hotkey", hotkey.strip(),
                     "the hotkey upstream signed payloads to OVERRIDE_AVAILABLE_AXONS for")
        return address

    def network(self) -> None:
        # Upstream: SUBTENSOR_NETWORK (default "local", lower-cased); "local" means SUBTENSOR_CHAIN_ENDPOINT.
        network = self.value("SUBTENSOR_NETWORK")
        named_local = network is not None and network.strip().lower() == "local"
        if network is not None and not named_local:
            self.put("SUBTENSOR_NETWORK", "subnet.network", network.strip().lower())
            if self.env.named("SUBTENSOR_CHAIN_ENDPOINT"):
                self.unmapped("SUBTENSOR_CHAIN_ENDPOINT", "upstream uses it only with SUBTENSOR_NETWORK = local")
            return
        endpoint = self.value("SUBTENSOR_CHAIN_ENDPOINT")
        if endpoint is not None:
            self.put("SUBTENSOR_CHAIN_ENDPOINT", "subnet.network", endpoint.strip(),
                     "the chain endpoint upstream used for SUBTENSOR_NETWORK = local")
        elif named_local:
            self.unmapped("SUBTENSOR_NETWORK", "\"local\" without SUBTENSOR_CHAIN_ENDPOINT: upstream fell back to "
                                               "bittensor's default network; set subnet.network")

    def keys_file(self) -> None:
        text = self.value("API_KEYS_FILE")
        name = text.strip() if text is not None else "api_keys.json"
        path = Path(os.path.expanduser(name))
        self.out.keys_file = str(path if path.is_absolute() else self.base / path)
        if text is not None:
            self.unmapped("API_KEYS_FILE", f"API keys are imported, not configured: "
                                           f"sn1-gateway keys import {self.out.keys_file} --config FILE")

    def balance(self) -> None:
        text = self.value("API_ENABLE_BALANCE")
        if text is None:
            return
        try:
            balance = as_bool(text)
        except BadValue as exc:
            self.unmapped("API_ENABLE_BALANCE", str(exc))
            return
        self.unmapped("API_ENABLE_BALANCE", "nothing to set: each payload goes to one validator drawn by stake, "
                                            "as upstream's true" if balance else
                      "sending every payload to every validator is not offered; one validator drawn by stake "
                      "takes each")


def translate(env: EnvFile, *, base: str | os.PathLike[str] = ".") -> Translation:
    """Map the settings of an upstream `.env.api` onto ours. `base`: the file's folder, for API_KEYS_FILE."""
    return _Translator(env, Path(base)).run()


# -- the config file --------------------------------------------------------------------------------


def render_config(translation: Translation, *, source: str) -> str:
    """The commented default file with the mapped values in place, each marked with where it came from."""
    doc = tomlkit.parse(render_default())
    origin = {m.key: m.upstream for m in translation.mapped}
    for key, value in translation.values.items():
        section, name = key.split(".", 1)
        table = doc[section]
        assert isinstance(table, Table)
        old = table[name]
        doc_text = old.trivia.comment.removeprefix("#").strip() if isinstance(old, Item) else ""
        item = tomlkit.item(value)
        item.comment(f"{doc_text} (from {origin[key]})" if doc_text else f"from {origin[key]}")
        table[name] = item
    text = tomlkit.dumps(doc)
    header = (f"# sn1-gateway configuration, written by `sn1-gateway init --from-upstream {source}`.\n"
              f"# Values marked \"(from NAME)\" come from that file (or are upstream's defaults for NAME);\n"
              f"# every other key is this gateway's default.\n")
    first, _, rest = text.partition("\n")
    return header + rest if first.startswith("# sn1-gateway configuration.") else header + text


def write_private(path: str | os.PathLike[str], text: str, *, force: bool) -> Path:
    """Write `text` to `path` with mode 0600 (it may hold the admin key); refuse an existing file
    unless `force` (FileExistsError)."""
    target = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    fd = os.open(target, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing file replaced with --force keeps its old mode otherwise
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            fd = -1
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
    finally:
        if fd != -1:
            os.close(fd)
    return target
