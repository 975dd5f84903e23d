"""The devnet as a whole: its metagraph, the settings it hands the gateway, `sn1-gateway devnet` and
`sn1-gateway serve --devnet`, and a gateway answering from it."""

from __future__ import annotations

import dataclasses
import json
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio
from bittensor_core import Keypair

from config.loading import ConfigError, load_settings
from config.settings import AuthSettings, DevnetSettings, ServerSettings, Settings, WalletSettings
from devnet import text
from devnet.miner import MinerFault
from devnet.network import DEFAULT_GATEWAY_URI, Devnet
from engine.gateway import Gateway, metagraph_source, serve_with_devnet
from tests.cli_process import read_until, start_cli, stop
from wire.epistula import Signer


@pytest.fixture
async def devnet(nursery: trio.Nursery) -> Devnet:
    devnet = Devnet(miners=4)
    await nursery.start(devnet.run)
    return devnet


async def test_the_metagraph_lists_the_miners_then_the_validator_then_the_gateway(devnet: Devnet) -> None:
    snapshot = await trio.to_thread.run_sync(devnet.source.fetch)
    assert devnet.source.name == "devnet" and snapshot.source == "devnet" and snapshot.fetched_at
    neurons = snapshot.neurons
    assert [n.uid for n in neurons] == [0, 1, 2, 3, 4, 5]
    miners, validator, gateway = neurons[:4], neurons[4], neurons[5]
    assert [n.axon for n in miners] == [m.address for m in devnet.miners]
    assert len({n.axon for n in neurons[:5]}) == 5 and len({n.hotkey for n in neurons}) == 6
    # the gateway serves nothing, and holds what miners verifying signers ask of it
    # (docs/protocol.md, "What receivers check")
    assert (gateway.hotkey, gateway.axon) == (devnet.gateway_hotkey, None) and gateway.stake >= 10_000
    assert [n.incentive for n in miners] == sorted((n.incentive for n in miners), reverse=True)
    assert sum(n.incentive for n in miners) == pytest.approx(1.0, abs=1e-5)
    assert not any(n.validator_permit for n in miners) and all(n.stake < 1000 for n in miners)
    assert validator.validator_permit and validator.stake >= 1000 and validator.incentive == 0
    assert (validator.axon, validator.hotkey) == (devnet.validator.address, devnet.validator.hotkey)


async def test_configure_points_the_gateway_at_the_devnet(devnet: Devnet) -> None:
    settings = devnet.configure(Settings())
    assert settings.subnet.source == "devnet"
    assert settings.availability.source == "validator"
    assert settings.scoring.validator == devnet.validator.address
    assert settings.scoring.validator_hotkey == devnet.validator.hotkey
    assert Keypair.create_from_uri(settings.wallet.uri).ss58_address == devnet.gateway_hotkey
    with pytest.raises(ConfigError, match="serve --devnet"):
        metagraph_source(settings)  # a devnet source exists only next to a running devnet


async def test_the_printed_config_loads_and_describes_the_devnet(devnet: Devnet, tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(devnet.config_toml())
    settings = load_settings(path)
    assert settings.subnet.source == "static"
    assert [(n.uid, n.hotkey, n.axon, n.validator_permit) for n in settings.subnet.neurons] == [
        (n.uid, n.hotkey, n.axon or "", n.validator_permit) for n in devnet.neurons()
    ]
    assert settings.availability.source == "validator"
    assert (settings.scoring.validator, settings.scoring.validator_hotkey) == (
        devnet.validator.address, devnet.validator.hotkey)
    assert settings.wallet.uri == DEFAULT_GATEWAY_URI


@pytest.mark.parametrize(("kw", "message"), [
    ({"miners": 2, "faults": ["", "sideways"]}, r"devnet\.faults\[1\]"),
    ({"miners": 1, "faults": ["", ""]}, "2 fault modes for 1 miners"),
    ({"miners": 0}, "devnet.miners"),
    ({"miners": 1, "gateway_uri": "not a uri"}, "wallet.uri"),
])
def test_bad_devnet_settings_are_config_errors(kw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Devnet(**kw)  # type: ignore[arg-type]


def test_from_settings_takes_the_devnet_section_and_the_wallet_uri() -> None:
    settings = dataclasses.replace(Settings(), devnet=DevnetSettings(miners=3, faults=("", "no_done")),
                                   wallet=WalletSettings(uri="//Bob"))
    devnet = Devnet.from_settings(settings)
    assert [m.fault for m in devnet.miners] == [MinerFault.HEALTHY, MinerFault.NO_DONE, MinerFault.HEALTHY]
    assert devnet.gateway_hotkey == Keypair.create_from_uri("//Bob").ss58_address
    assert Devnet.from_settings(Settings()).gateway_uri == DEFAULT_GATEWAY_URI


async def test_serve_with_devnet_answers_from_the_devnet_and_scores(tmp_path: Path, nursery: trio.Nursery) -> None:
    settings = dataclasses.replace(
        Settings(),
        server=ServerSettings(port=0),
        auth=AuthSettings(keys_file=str(tmp_path / "keys.toml")),
        base_dir=str(tmp_path),
    )
    devnet = Devnet(miners=3, faults=["http_500"])
    ready: list[Gateway] = []
    started = trio.Event()

    def on_ready(gateway: Gateway) -> None:
        ready.append(gateway)
        started.set()

    with trio.fail_after(20):
        nursery.start_soon(partial(serve_with_devnet, settings, on_ready=on_ready, devnet=devnet))
        await started.wait()
        gateway = ready[0]
        services = gateway.services
        assert services.settings.subnet.source == "devnet"
        assert services.settings.scoring.validator == devnet.validator.address
        assert len(services.subnet.get().neurons) == 5  # 3 miners, the validator, the gateway
        key, _ = await services.keys.create(100)
        messages = [{"role": "user", "content": "what is a devnet?"}]
        expected = text.answer(11, messages, 6).text
        async with httpx.AsyncClient(base_url=gateway.url, headers={"api-key": key}, verify=False) as client:
            response = await client.post("/v1/chat/completions",
                                         json={"messages": messages, "seed": 11, "max_tokens": 6})
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == expected
        # The miners' answers reached the devnet's validator, each under its own uid.
        await devnet.validator.wait_scored(1)
        [payload] = devnet.validator.scored
        assert payload["body"]["messages"] == messages and payload["body"]["seed"] == 11
        assert {int(u) for u in payload["chunks"]} == set(payload["uids"]) and payload["uids"]
        for uid in payload["uids"]:
            assert "".join(payload["chunks"][str(uid)]) == ("" if uid == 0 else expected)  # uid 0: HTTP 500
        gateway.shutdown()
        await gateway.wait_stopped()


# -- the command line -----------------------------------------------------------------------------


async def test_the_devnet_command_prints_a_config_that_reaches_its_miners(tmp_path: Path) -> None:
    process = await start_cli("devnet", "--miners", "2", "--faults", ",http_500", cwd=tmp_path)
    try:
        with trio.fail_after(30):
            await read_until(process.stderr, b"Ctrl-C to stop")
            printed = await read_until(process.stdout, rb'validator_hotkey = "\w+"\n')
        (tmp_path / "gateway.toml").write_bytes(printed)
        settings = load_settings(tmp_path / "gateway.toml")
        miners = [n for n in settings.subnet.neurons if not n.validator_permit]
        assert len(miners) == 2 and len(settings.subnet.neurons) == 4  # and the validator, the gateway
        signer = Signer(Keypair.create_from_uri(settings.wallet.uri))
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "seed": 1}).encode()
        statuses = []
        async with httpx.AsyncClient(verify=False, timeout=10) as http:
            for neuron in miners:
                response = await http.post(f"http://{neuron.axon}/v1/chat/completions", content=body,
                                           headers=signer.headers(body, neuron.hotkey))
                statuses.append(response.status_code)
        assert statuses == [200, 500]
    finally:
        code = await stop(process)
    assert code == 0


async def test_serve_devnet_works_without_a_wallet_or_a_chain(tmp_path: Path) -> None:
    (tmp_path / "sn1-gateway.toml").write_text('[server]\nport = 0\n[devnet]\nminers = 2\n')
    process = await start_cli("serve", "--devnet", cwd=tmp_path)
    try:
        with trio.fail_after(30):
            banner = (await read_until(process.stdout, b"simulated miners")).decode()
        url = banner.split("listening on ")[1].split()[0]
        assert "devnet: 2 simulated miners" in banner
        async with httpx.AsyncClient(verify=False, timeout=10) as http:
            ready = (await http.get(f"{url}/health/ready")).json()
        assert ready["subnet"]["source"] == "devnet" and ready["subnet"]["neurons"] == 4
    finally:
        code = await stop(process)
    assert code == 0
