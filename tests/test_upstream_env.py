"""`sn1-gateway init --from-upstream .env.api [FILE]`: a config from an upstream validator API's settings."""

from __future__ import annotations

import io
import stat
from pathlib import Path

import pytest
from dotenv import dotenv_values

from config.loading import load_settings
from config.settings import Settings
from engine.cli import main
from engine.upstream_env import parse_env, translate

SECRET = "adm1n-#-s3cret-with 'quotes'"

# As operators write them: the upstream example's layout, comments, quotes, `export`, a reference,
# a lower-case name, empty and valueless lines, and settings that are not the API's.
ENV_API = f"""\
# Upstream validator API settings
API_PORT = "42170" # Port for the API server
API_HOST = "0.0.0.0" # Host for the API server
SCORING_KEY = "123" # The scoring key for the validator
VALIDATOR_API = "0.0.0.0:8094" # The validator API to forward responses to for scoring
WORKERS=4

export WALLET_NAME='validator'
HOTKEY=vali_hot   # trailing comment
ADMIN_KEY="{SECRET}"
score_organics=yes
NETUID=1
SUBTENSOR_NETWORK=local
CHAIN_HOST=10.1.2.3
SUBTENSOR_CHAIN_ENDPOINT="ws://${{CHAIN_HOST}}:9944"
API_EXTRA_UIDS_QUERY=50
API_KEYS_FILE=api_keys.json
WANDB_API_KEY=wandb-token-do-not-print
MY_OWN_SETTING=whatever
NEURON_VPERMIT_TAO_LIMIT=
API_TOP_UIDS_SAMPLE
"""

EXPECTED_MAPPED = [
    'mapped: WALLET_NAME -> wallet.name = "validator"',
    'mapped: HOTKEY -> wallet.hotkey = "vali_hot"',
    'mapped: API_HOST -> server.host = "0.0.0.0"',
    "mapped: API_PORT -> server.port = 42170",
    "mapped: ADMIN_KEY -> auth.admin_key = (secret: written to the file, not shown)",
    'mapped: VALIDATOR_API -> scoring.validator = "127.0.0.1:8094"; 0.0.0.0 as a destination is this machine; '
    "scoring payloads and availability queries go there; set scoring.validator_hotkey to that validator's "
    "hotkey unless the metagraph lists it at this address",
    "mapped: score_organics -> scoring.enabled = true",
    "mapped: NETUID -> subnet.netuid = 1",
    'mapped: SUBTENSOR_CHAIN_ENDPOINT -> subnet.network = "ws://10.1.2.3:9944"; the chain endpoint upstream used '
    "for SUBTENSOR_NETWORK = local",
    "mapped: API_EXTRA_UIDS_QUERY -> fanout.extra_scoring_miners = 50",
]


def write_env(tmp_path: Path, text: str = ENV_API) -> Path:
    path = tmp_path / ".env.api"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_realistic_env_api_becomes_a_config_that_loads_with_every_setting_mapped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = write_env(tmp_path)
    out = tmp_path / "gw.toml"
    assert main(["init", "--from-upstream", str(env), str(out)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    for expected in EXPECTED_MAPPED:
        assert expected in lines
    # Each unmapped setting: one line, with why, and never its value.
    assert f"not mapped: API_KEYS_FILE (line 17): API keys are imported, not configured: sn1-gateway keys import " \
           f"{tmp_path / 'api_keys.json'} --config FILE" in lines
    assert any(line.startswith("not mapped: WORKERS (line 6): one gateway process serves every request") for line in lines)
    assert any(line.startswith("not mapped: SCORING_KEY (line 4): v2.19.10 validators check the Epistula signer")
               for line in lines)
    assert "not mapped: WANDB_API_KEY (line 18): a validator's or a miner's setting; the API does not use it" in lines
    assert "not mapped: MY_OWN_SETTING (line 19): not a setting of the upstream validator API (v2.19.10); ignored" \
        in lines
    assert "not mapped: CHAIN_HOST (line 14): not a setting of the upstream validator API (v2.19.10); ignored" in lines
    assert "not mapped: NEURON_VPERMIT_TAO_LIMIT (line 20): empty; the default stays" in lines
    assert "not mapped: API_TOP_UIDS_SAMPLE (line 21): no value (upstream did not set it either)" in lines
    assert f"wrote {out} (mode 0600: it may hold the admin key)" in lines
    assert f"next: sn1-gateway keys import {tmp_path / 'api_keys.json'} --config {out}" in lines
    assert SECRET not in captured.out + captured.err
    assert "wandb-token-do-not-print" not in captured.out + captured.err

    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    settings = load_settings(out, environ={})
    assert (settings.server.host, settings.server.port) == ("0.0.0.0", 42170)
    assert settings.auth.admin_key == SECRET
    assert (settings.wallet.name, settings.wallet.hotkey, settings.wallet.path) == (
        "validator", "vali_hot", "~/.bittensor/wallets")
    assert settings.scoring.validator == "127.0.0.1:8094" and settings.scoring.enabled is True
    assert (settings.subnet.netuid, settings.subnet.network) == (1, "ws://10.1.2.3:9944")
    assert settings.fanout.extra_scoring_miners == 50
    # Everything else is the default, and keeps its documentation.
    defaults = Settings()
    assert settings.fanout.miners == defaults.fanout.miners and settings.scoring.spool_dir == defaults.scoring.spool_dir
    text = out.read_text(encoding="utf-8")
    assert "max_body_bytes = 1048576 # largest request body accepted; larger ones get 413" in text
    assert 'port = 42170 # TCP port to listen on (0 picks a free one) (from API_PORT)' in text
    assert main(["check-config", str(out)]) == 0


def test_settings_the_file_does_not_name_keep_upstreams_address_and_our_defaults_otherwise(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = write_env(tmp_path, "WALLET_NAME=v\nHOTKEY=h\n")
    out = tmp_path / "gw.toml"
    assert main(["init", "--from-upstream", str(env), str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert ('mapped: API_HOST (not set) -> server.host = "0.0.0.0"; upstream\'s default, so that clients reach the '
            "gateway where they reached the API") in lines
    assert any(line.startswith("mapped: API_PORT (not set) -> server.port = 8005;") for line in lines)
    assert ("not mapped: SCORE_ORGANICS (not set): upstream's default was false (nothing sent for scoring); "
            "scoring.enabled stays true here: set it to false to keep that") in lines
    assert "not mapped: NETUID (not set): upstream's default was 61; subnet.netuid stays 1 (Subnet 1) here" in lines
    settings = load_settings(out, environ={})
    assert (settings.server.host, settings.server.port) == ("0.0.0.0", 8005)
    assert settings.auth.admin_key == "" and settings.scoring.enabled and settings.subnet.netuid == 1


def test_refuses_to_overwrite_unless_forced_and_forced_files_become_private(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = write_env(tmp_path)
    out = tmp_path / "gw.toml"
    out.write_text("# mine\n", encoding="utf-8")
    out.chmod(0o644)
    assert main(["init", "--from-upstream", str(env), str(out)]) == 1
    assert capsys.readouterr().err == f"{out}: already exists; use --force to replace it\n"
    assert out.read_text(encoding="utf-8") == "# mine\n"
    assert main(["init", "--force", "--from-upstream", str(env), str(out)]) == 0
    assert load_settings(out, environ={}).auth.admin_key == SECRET
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_values_the_loader_refuses_are_reported_and_the_file_still_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = write_env(tmp_path, "API_PORT=eighty\nNETUID=70000\nSCORE_ORGANICS=maybe\nVALIDATOR_API=nowhere\n"
                              "API_TOP_UIDS_TO_STREAM=10\n")
    out = tmp_path / "gw.toml"
    assert main(["init", "--from-upstream", str(env), str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert 'not mapped: API_PORT (line 1): not an integer: a string "eighty"' in lines
    assert ("not mapped: NETUID (line 2): subnet.netuid: expected an integer between 0 and 65535, found an "
            "integer 70000") in lines
    assert ('not mapped: SCORE_ORGANICS (line 3): not a boolean (upstream takes true/false, 1/0, yes/no, on/off): '
            'a string "maybe"') in lines
    assert 'not mapped: VALIDATOR_API (line 4): not "host:port": a string "nowhere"' in lines
    assert "mapped: API_TOP_UIDS_TO_STREAM -> fanout.miners = 10" in lines
    settings = load_settings(out, environ={})
    assert settings.server.port == 42170 and settings.subnet.netuid == 1 and settings.fanout.miners == 10


def test_override_axons_name_the_scoring_validator_with_api_hotkey_as_its_hotkey(tmp_path: Path) -> None:
    env = parse_env('OVERRIDE_AVAILABLE_AXONS=\'["10.0.0.5:8091", "10.0.0.6:8091"]\'\n'
                    "API_HOTKEY=5Validator\nVALIDATOR_API=10.0.0.9:8094\nSUBTENSOR_NETWORK=Finney\n"
                    "SUBTENSOR_CHAIN_ENDPOINT=ws://x:9944\n")
    result = translate(env, base=tmp_path)
    assert result.values["scoring.validator"] == "10.0.0.5:8091"
    assert result.values["scoring.validator_hotkey"] == "5Validator"
    assert result.values["subnet.network"] == "finney"  # upstream lower-cases it
    lines = result.lines()
    assert any(line.startswith('mapped: OVERRIDE_AVAILABLE_AXONS[0] -> scoring.validator = "10.0.0.5:8091"; '
                               "scoring payloads and availability queries go there; upstream sent every payload "
                               "to all 2") for line in lines)
    assert ("not mapped: VALIDATOR_API (line 3): availability is asked of scoring.validator here, 10.0.0.5:8091 "
            "(from OVERRIDE_AVAILABLE_AXONS)") in lines
    assert ("not mapped: SUBTENSOR_CHAIN_ENDPOINT (line 5): upstream uses it only with SUBTENSOR_NETWORK = local"
            in lines)


def test_api_hotkey_alone_is_the_validators_setting_and_says_so(tmp_path: Path) -> None:
    result = translate(parse_env("API_HOTKEY=5Someone\n"), base=tmp_path)
    assert "scoring.validator_hotkey" not in result.values
    assert any(line.startswith("not mapped: API_HOTKEY (line 1): a validator's setting: every validator scoring "
                               "our organics needs API_HOTKEY = the gateway's hotkey") for line in result.lines())


def test_the_env_format_is_read_as_python_dotenv_reads_it() -> None:
    text = ("export A='single # not a comment'\n"
            'B="double \\"quoted\\" # still value"  # a comment\n'
            "C = spaced   # comment\n"
            "D=${B}!\n"
            "E=\n"
            "F\n"
            "this line is not a setting\n"
            "G=1\n"
            "g=2\n")
    env = parse_env(text)
    assert env.get("A") == "single # not a comment"
    assert env.get("B") == 'double "quoted" # still value'
    assert env.get("C") == "spaced"
    assert env.get("D") == 'double "quoted" # still value!'
    assert env.get("E") == "" and env.get("F") is None and env.named("F")
    assert env.get("G") == "2"  # names match case-insensitively, as pydantic-settings does; the last one wins
    assert [(p.line_no, p.upstream) for p in env.problems] == [(7, "")]
    # Upstream's own reader (python-dotenv's load_dotenv) sees the same values.
    upstream = dotenv_values(stream=io.StringIO(text))
    assert {name: env.get(name.upper()) for name in upstream if name != "G"} == {
        name: value for name, value in upstream.items() if name != "G"}


def test_a_line_that_does_not_parse_is_reported_by_number_without_its_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = write_env(tmp_path, 'WALLET_NAME=v\nADMIN_KEY="half-a-secret"garbage\nHOTKEY=h\n')
    out = tmp_path / "gw.toml"
    assert main(["init", "--from-upstream", str(env), str(out)]) == 0
    captured = capsys.readouterr()
    assert "not mapped: line 2: python-dotenv cannot parse it (upstream skipped it too)" in captured.out.splitlines()
    assert "half-a-secret" not in captured.out + captured.err
    assert load_settings(out, environ={}).wallet.hotkey == "h"


def test_a_missing_env_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init", "--from-upstream", str(tmp_path / "absent"), str(tmp_path / "gw.toml")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'absent'}: cannot be read: ") and err.count("\n") == 1
    assert not (tmp_path / "gw.toml").exists()
