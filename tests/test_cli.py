"""The `sn1-gateway` command line: init, check-config, and how operator errors end a command."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from config.loading import load_settings
from config.settings import Settings
from config.template import render_default
from engine.cli import devnet_state, main
from tests.cli_process import config_text

GOOD = config_text()


def test_init_writes_the_commented_default_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "gw.toml"
    assert main(["init", str(path)]) == 0
    assert path.read_text(encoding="utf-8") == render_default()
    assert path.read_text(encoding="utf-8").startswith("# sn1-gateway configuration.")
    assert f"check it with: sn1-gateway check-config {path}" in capsys.readouterr().out
    assert load_settings(path, environ={}).server == Settings().server


def test_init_without_a_name_writes_sn1_gateway_toml_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["init"]) == 0
    assert (tmp_path / "sn1-gateway.toml").read_text(encoding="utf-8") == render_default()


def test_init_refuses_to_overwrite_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "gw.toml"
    path.write_text("# my settings\n", encoding="utf-8")
    assert main(["init", str(path)]) == 1
    assert f"{path}: already exists; use --force to replace it" in capsys.readouterr().err
    assert path.read_text(encoding="utf-8") == "# my settings\n"
    assert main(["init", "--force", str(path)]) == 0
    assert path.read_text(encoding="utf-8") == render_default()


def test_init_into_a_missing_folder_is_one_line_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "no" / "such" / "gw.toml"
    assert main(["init", str(path)]) == 1
    err = capsys.readouterr().err
    assert err == f"{path}: cannot be written: No such file or directory\n"


def test_check_config_accepts_a_good_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(GOOD, encoding="utf-8")
    assert main(["check-config", str(path)]) == 0
    assert capsys.readouterr().out == f"{path}: OK\n"


def test_check_config_exits_2_with_one_line_naming_the_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "gw.toml"
    path.write_text("[fanout]\nminers = \"five\"\n", encoding="utf-8")
    assert main(["check-config", str(path)]) == 2
    assert capsys.readouterr().err == (
        f'error: {path}: fanout.miners: expected an integer, found a string "five"\n'
    )


def test_check_config_of_a_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(tmp_path / "absent.toml")]) == 2
    assert "absent.toml: no such file" in capsys.readouterr().err


def test_serve_with_a_bad_file_exits_2_before_starting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "gw.toml"
    path.write_text("[server]\nport = -1\n", encoding="utf-8")
    assert main(["serve", "--config", str(path)]) == 2
    assert "server.port: expected an integer between 0 and 65535, found an integer -1" in capsys.readouterr().err


def test_serve_with_a_missing_wallet_exits_1_naming_the_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "gw.toml"
    wallets = tmp_path / "wallets"
    path.write_text(GOOD.replace('uri = "//Alice"', f'path = "{wallets}"\nname = "val"'), encoding="utf-8")
    assert main(["serve", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no hotkey at ")
    assert str(wallets / "val" / "hotkeys" / "default") in err
    assert "Traceback" not in err


def test_serve_with_an_unknown_chain_network_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(GOOD.replace('source = "static"', 'source = "chain"\nnetwork = "fineny"'), encoding="utf-8")
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: subnet.network: Unknown network 'fineny'")


def test_the_console_script_reports_config_errors_with_status_2(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    path.write_text("[server]\nhots = \"0.0.0.0\"\n", encoding="utf-8")
    script = Path(sys.executable).with_name("sn1-gateway")
    done = subprocess.run([str(script), "check-config", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr == f"error: {path}: server.hots: unknown key (did you mean 'host'? expected one of: " \
                          "host, port, max_body_bytes, drain_timeout_s, max_connections, keep_alive_timeout_s, " \
                          "keep_alive_busy_s, request_head_timeout_s, workers)\n"
    assert done.stdout == ""


def test_serve_when_an_actor_cannot_start_exits_1_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "spool").write_text("not a folder", encoding="utf-8")
    path = tmp_path / "gw.toml"
    path.write_text(GOOD.replace("enabled = false", 'enabled = true\nvalidator = "127.0.0.1:9"\n'
                                 'validator_hotkey = "5F"\nspool_dir = "spool"'), encoding="utf-8")
    assert main(["serve", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: scoring could not start (3 attempts): ")
    assert str(tmp_path / "spool") in err
    assert "Traceback" not in err


def test_serve_on_a_port_in_use_exits_1_naming_the_setting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = tmp_path / "gw.toml"
        path.write_text(GOOD.replace("port = 0", f'host = "127.0.0.1"\nport = {port}'), encoding="utf-8")
        assert main(["serve", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot listen on 127.0.0.1:{port} (server.host, server.port): ")
    assert "Traceback" not in err and err.count("\n") == 1


def test_devnet_state_keeps_keys_and_spool_out_of_the_operator_files(tmp_path: Path) -> None:
    settings = devnet_state(Settings(base_dir=str(tmp_path)), str(tmp_path / "devnet"))
    assert settings.resolve(settings.auth.keys_file) == str(tmp_path / "devnet" / "keys.toml")
    assert settings.resolve(settings.scoring.spool_dir) == str(tmp_path / "devnet" / "spool")
    assert settings.auth.store == "file"


@pytest.mark.parametrize(("args", "expected"), [
    (["--miners", "1", "--faults", ",http_500"], "error: --faults: 2 fault modes for 1 miners\n"),
    (["--faults", "slowly"], "error: --faults[0]: expected one of"),
    (["--miners", "0"], "error: --miners: a devnet needs at least one miner, found 0\n"),
])
def test_devnet_option_errors_name_the_option(
    args: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["devnet", *args]) == 2
    assert capsys.readouterr().err.startswith(expected)


def test_serve_devnet_answers_with_its_printed_key_and_leaves_no_state_behind(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("sn1-gateway")
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir()
    (tmp_path / "work").mkdir()
    popen = subprocess.Popen([str(script), "serve", "--devnet"], cwd=tmp_path / "work", env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert popen.stdout is not None
        banner = [popen.stdout.readline() for _ in range(3)]
        assert "listening on " in banner[0], banner
        url = banner[0].split("listening on ", 1)[1].split()[0]
        key = banner[2].rsplit(" ", 1)[1].strip()
        assert len(list((tmp_path / "tmp").iterdir())) == 1  # its keys and spool live here while it runs
        response = httpx.post(f"{url}/v1/chat/completions", headers={"api-key": key}, timeout=30,
                              json={"messages": [{"role": "user", "content": "Hello!"}]})
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"]
        popen.send_signal(signal.SIGINT)
        assert popen.wait(20) == 0
    finally:
        if popen.poll() is None:
            popen.kill()
        popen.communicate(timeout=10)
    assert list((tmp_path / "work").iterdir()) == [], "no keys file or spool in the working folder"
    assert list((tmp_path / "tmp").iterdir()) == [], "the temporary state is removed at exit"


def test_settle_heap_freezes_start_up_objects_and_collects_young_ones_less_often() -> None:
    import gc

    from web.server import GC_YOUNG_THRESHOLD, settle_heap

    before = gc.get_threshold()
    try:
        settle_heap()
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *before[1:])
        assert gc.get_freeze_count() > 1000  # modules, classes and everything else made so far
        cycle: list[object] = []
        cycle.append(cycle)
        del cycle
        assert gc.collect() >= 1  # cycles made afterwards are still found and freed
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
