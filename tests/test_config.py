"""The config file: strict loading with operator-readable errors, the default file, the env override."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import tomlkit

from config.loading import ConfigError, default_settings, load_settings, parse_settings
from config.settings import NeuronSettings, Settings
from config.template import render_default, write_default


def load_text(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> Settings:
    path = tmp_path / "gw.toml"
    path.write_text(text, encoding="utf-8")
    return load_settings(path, environ={} if environ is None else environ)


def error_for(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_text(tmp_path, text)
    return str(caught.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # unknown keys: the dotted key, a suggestion, and the keys that are allowed there
        ("[server]\nprot = 1\n",
         'server.prot: unknown key (did you mean \'port\'? expected one of: host, port, max_body_bytes,'),
        ("colour = 1\n", "colour: unknown key (expected one of: server, auth, wallet, subnet,"),
        ("[[subnet.neurons]]\nuid = 1\nhotky = \"5F\"\n", "subnet.neurons[0].hotky: unknown key (did you mean 'hotkey'?"),
        # wrong types: expected and found, in TOML spelling
        ("[server]\nport = \"42170\"\n", 'server.port: expected an integer, found a string "42170"'),
        ("[server]\nport = true\n", "server.port: expected an integer, found a boolean true"),
        ("[server]\nport = 1.5\n", "server.port: expected an integer, found a number 1.5"),
        ("[server]\nhost = 127\n", "server.host: expected a string, found an integer 127"),
        ("[scoring]\nenabled = \"yes\"\n", 'scoring.enabled: expected a boolean (true or false), found a string "yes"'),
        ("server = 5\n", "server: expected a table, found an integer 5"),
        ("[subnet]\nneurons = 3\n", "subnet.neurons: expected an array, found an integer 3"),
        ("[devnet]\nfaults = [\"\", 7]\n", "devnet.faults[1]: expected a string, found an integer 7"),
        ("[[subnet.neurons]]\nhotkey = 5\n", "subnet.neurons[0].hotkey: expected a string, found an integer 5"),
        ("[subnet]\nsource = \"chian\"\n",
         'subnet.source: expected one of "chain", "static", "devnet", found a string "chian"'),
        ("[auth]\nstore = [\"file\"]\n", 'auth.store: expected one of "file", "redis", found an array'),
        # out of range
        ("[server]\nport = 70000\n", "server.port: expected an integer between 0 and 65535, found an integer 70000"),
        ("[fanout]\nminers = 0\n", "fanout.miners: expected an integer between 1 and 64, found an integer 0"),
        ("[server]\ndrain_timeout_s = -1\n",
         "server.drain_timeout_s: expected a number between 0.0 and 600.0, found an integer -1"),
        ("[subnet]\nsync_interval_s = 0.5\n", "subnet.sync_interval_s: expected a number at least 1.0, found a number 0.5"),
        ("[[subnet.neurons]]\nincentive = 1.5\n",
         "subnet.neurons[0].incentive: expected a number between 0.0 and 1.0, found a number 1.5"),
        ("[subnet]\nsync_interval_s = nan\n", "subnet.sync_interval_s: expected a finite number, found a number nan"),
        ("[subnet]\nsync_interval_s = inf\n", "subnet.sync_interval_s: expected a finite number, found a number inf"),
        # addresses and neurons that cannot both be meant
        ("[scoring]\nvalidator = \"127.0.0.1\"\n",
         'scoring.validator: expected "host:port" (a port from 1 to 65535) or "", found a string "127.0.0.1"'),
        ("[[subnet.neurons]]\naxon = \"1.2.3.4:0\"\n", 'subnet.neurons[0].axon: expected "host:port"'),
        ("[[subnet.neurons]]\naxon = \"host name:80\"\n", 'subnet.neurons[0].axon: expected "host:port"'),
        ("[[subnet.neurons]]\nuid = 3\n[[subnet.neurons]]\nuid = 4\n[[subnet.neurons]]\nuid = 3\n",
         "subnet.neurons[2].uid: an integer 3 is already the uid of subnet.neurons[0]"),
        ("[[subnet.neurons]]\nuid = 1\nhotkey = \"5F\"\n[[subnet.neurons]]\nuid = 2\nhotkey = \"5F\"\n",
         'subnet.neurons[1].hotkey: a string "5F" is already the hotkey of subnet.neurons[0]'),
        # not TOML at all
        ("[server\nport = 1\n", "not valid TOML"),
        ("[server]\nport = 1\nport = 2\n", "not valid TOML"),
    ],
)
def test_each_problem_is_one_message_naming_file_key_expected_and_found(
    tmp_path: Path, text: str, expected: str
) -> None:
    message = error_for(tmp_path, text)
    assert message.startswith(f"{tmp_path / 'gw.toml'}: ")
    assert expected in message
    assert "\n" not in message


def test_a_long_wrong_value_is_shortened(tmp_path: Path) -> None:
    message = error_for(tmp_path, f'[server]\nport = "{"x" * 500}"\n')
    assert message.endswith('found a string "' + "x" * 56 + "...")


def test_a_missing_file_says_how_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml: no such file \(create one with `sn1-gateway init"):
        load_settings(tmp_path / "nope.toml")


def test_a_file_that_is_not_utf8_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    path.write_bytes(b"[server]\nhost = \"\xff\xfe\"\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: cannot be read")):
        load_settings(path)


def test_values_are_read_into_typed_frozen_settings(tmp_path: Path) -> None:
    settings = load_text(tmp_path, """
[server]
port = 8080
drain_timeout_s = 5          # an integer is fine where a number is expected

[subnet]
source = "static"

[[subnet.neurons]]
uid = 3
hotkey = "5Fhot"
axon = "10.0.0.1:8091"
incentive = 0.25

[[subnet.neurons]]
uid = 4
hotkey = "5Gidle"
""")
    assert settings.server.port == 8080
    assert settings.server.drain_timeout_s == 5.0 and isinstance(settings.server.drain_timeout_s, float)
    assert settings.subnet.neurons == (
        NeuronSettings(uid=3, hotkey="5Fhot", axon="10.0.0.1:8091", incentive=0.25),
        NeuronSettings(uid=4, hotkey="5Gidle"),
    )
    assert settings.fanout == Settings().fanout  # untouched sections keep their defaults
    assert settings.base_dir == str(tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.server.port = 1  # type: ignore[misc]


def test_relative_paths_resolve_next_to_the_file(tmp_path: Path) -> None:
    settings = load_text(tmp_path, '[auth]\nkeys_file = "state/keys.toml"\n')
    assert settings.resolve(settings.auth.keys_file) == str(tmp_path / "state" / "keys.toml")
    assert settings.resolve("/abs/keys.toml") == "/abs/keys.toml"


def test_the_internal_base_dir_cannot_be_set_from_the_file(tmp_path: Path) -> None:
    assert "base_dir: unknown key" in error_for(tmp_path, 'base_dir = "/etc"\n')


def test_the_admin_key_environment_variable_overrides_the_file(tmp_path: Path) -> None:
    text = '[auth]\nadmin_key = "from-file"\n'
    assert load_text(tmp_path, text).auth.admin_key == "from-file"
    assert load_text(tmp_path, text, {"SN1_GATEWAY_ADMIN_KEY": "from-env"}).auth.admin_key == "from-env"
    assert default_settings({"SN1_GATEWAY_ADMIN_KEY": "from-env"}).auth.admin_key == "from-env"
    assert default_settings({}).auth.admin_key == ""


def test_the_admin_key_environment_variable_is_read_from_the_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SN1_GATEWAY_ADMIN_KEY", "process-env")
    path = tmp_path / "gw.toml"
    path.write_text("", encoding="utf-8")
    assert load_settings(path).auth.admin_key == "process-env"


def test_the_default_file_loads_back_to_the_defaults(tmp_path: Path) -> None:
    path = write_default(tmp_path / "gw.toml")
    assert load_settings(path, environ={}) == dataclasses.replace(Settings(), base_dir=str(tmp_path))


def test_the_default_file_documents_every_key(tmp_path: Path) -> None:
    text = render_default()
    assert set(tomlkit.parse(text)) == {f.name for f in dataclasses.fields(Settings) if not f.metadata.get("internal")}
    for section in dataclasses.fields(Settings):
        if section.metadata.get("internal"):
            continue
        body = text.split(f"\n[{section.name}]", 1)[1].split("\n[", 1)[0]
        for field in dataclasses.fields(getattr(Settings(), section.name)):
            if (section.name, field.name) == ("subnet", "neurons"):
                continue
            line = next(line for line in body.splitlines() if line.startswith(f"{field.name} = "))
            assert f"# {field.metadata['doc']}" in line, line
    assert "(env SN1_GATEWAY_ADMIN_KEY overrides)" in text


def test_the_commented_neuron_example_in_the_default_file_is_valid(tmp_path: Path) -> None:
    lines = render_default().splitlines()
    start = lines.index("# [[subnet.neurons]]")
    example = [line.removeprefix("# ") for line in lines[start:] if line.startswith("# ")]
    settings = parse_settings("\n".join(["[subnet]", 'source = "static"', *example]), environ={})
    assert settings.subnet.neurons == (
        NeuronSettings(uid=0, hotkey="5F...", axon="127.0.0.1:9001", incentive=0.1),
    )


def test_write_default_refuses_to_replace_a_file_unless_forced(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    path.write_text("# mine\n", encoding="utf-8")
    with pytest.raises(FileExistsError):
        write_default(path)
    assert path.read_text(encoding="utf-8") == "# mine\n"
    write_default(path, force=True)
    assert path.read_text(encoding="utf-8") == render_default()


@pytest.mark.parametrize("text", ["127.0.0.1:8091", "validator.example.com:443", "[::1]:8091", "localhost:65535"])
def test_addresses_in_the_usual_spellings_are_accepted(tmp_path: Path, text: str) -> None:
    assert load_text(tmp_path, f'[scoring]\nvalidator = "{text}"\n').scoring.validator == text
