"""The `sn1-gateway` command line."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING

import trio

from actors.keystore import KeyStoreError
from bench import command as bench_command
from config.loading import ConfigError, default_settings, load_settings
from config.settings import LogSettings, Settings
from engine import keys_commands, logs
from engine.supervisor import StartupError
from web.openapi import package_version
from web.server import settle_heap
from wire.hotkey import HotkeyError

if TYPE_CHECKING:
    from engine.gateway import Gateway

DEFAULT_CONFIG = "sn1-gateway.toml"

Command = Callable[[argparse.Namespace], int]


def config_path(args: argparse.Namespace) -> str | None:
    """The file named by `--config`, else `./sn1-gateway.toml` if present, else None (the defaults)."""
    path: str | None = getattr(args, "config", None)
    if path is None and os.path.exists(DEFAULT_CONFIG):
        path = DEFAULT_CONFIG
    return path


def settings_from(args: argparse.Namespace) -> Settings:
    """The settings of `config_path(args)`, or the defaults."""
    path = config_path(args)
    return default_settings() if path is None else load_settings(path)


async def devnet_key(settings: Settings) -> str:
    """A fresh API key for trying the devnet, created in the key store of `settings`."""
    from actors.keystore.actor import open_keystore

    async with open_keystore(settings) as store:
        key, _ = await store.create(600)
    return key


def devnet_state(settings: Settings, folder: str) -> Settings:
    """`settings` with the state a gateway writes (keys, scoring spool, jobs) kept in `folder`.

    `serve --devnet` runs this way: its trial key and its simulated organics must not land in the
    operator's key store or spool (a real validator would be sent devnet answers on the next start).
    """
    return dataclasses.replace(
        settings,
        auth=dataclasses.replace(settings.auth, store="file", keys_file=os.path.join(folder, "keys.toml")),
        scoring=dataclasses.replace(settings.scoring, spool_dir=os.path.join(folder, "spool")),
        jobs=dataclasses.replace(settings.jobs, file=os.path.join(folder, "jobs.sqlite")),
    )


def on_ready(gateway: Gateway, *, devnet_api_key: str | None = None) -> None:
    """Once the gateway serves (`serve`, and `serve --devnet`): the heap is settled, the banner printed."""
    settle_heap()
    print(f"sn1-gateway listening on {gateway.url}  (Ctrl-C to stop)", flush=True)
    settings = gateway.services.settings
    if settings.subnet.source == "devnet":
        neurons = gateway.services.subnet.get().neurons
        miners = sum(1 for n in neurons if not n.validator_permit)
        print(f"devnet: {miners} simulated miners; validator at {settings.scoring.validator}", flush=True)
    if devnet_api_key is not None:
        body = '{"messages": [{"role": "user", "content": "Hello!"}], "stream": true}'
        print(f"API key (600 requests/minute, valid while this devnet runs): {devnet_api_key}\ntry it:\n"
              f"  curl -sN {gateway.url}/v1/chat/completions -H 'api-key: {devnet_api_key}' "
              f"-H 'Content-Type: application/json' -d '{body}'", flush=True)


def raise_open_files_limit() -> None:
    """Lift the soft open-files limit to the hard one: each open stream holds two sockets or more."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as exc:
            logging.getLogger("sn1_gateway").warning("open-files limit stays at %d: %s", soft, exc)


def cmd_serve(args: argparse.Namespace) -> int:
    raise_open_files_limit()
    from engine.gateway import serve_until_signalled
    from engine.workers import check_workers, run_workers, worker_settings

    settings = settings_from(args)
    logs.configure(settings.log, verbose=args.verbose)
    if not args.devnet:
        check_workers(settings)
    if args.worker is not None:
        settings = worker_settings(settings, args.worker)
    elif settings.server.workers > 1 and not args.devnet:
        path = config_path(args)
        assert path is not None  # more than one worker is a setting of a file (the defaults have one)
        return trio.run(run_workers, settings, os.path.abspath(path))
    if args.devnet:
        from engine.gateway import serve_with_devnet

        with tempfile.TemporaryDirectory(prefix="sn1-gateway-devnet-") as folder:
            settings = devnet_state(settings, folder)
            key = trio.run(devnet_key, settings)
            trio.run(partial(serve_with_devnet, settings, on_ready=partial(on_ready, devnet_api_key=key)))
    else:
        trio.run(partial(serve_until_signalled, settings, on_ready=on_ready))
    return 0


def cmd_devnet(args: argparse.Namespace) -> int:
    from devnet.network import Devnet, run_until_signalled

    faults = tuple(args.faults.split(",")) if args.faults else ()

    def ready(devnet: Devnet) -> None:
        print(devnet.config_toml(), flush=True)
        print(f"# devnet: {len(devnet.miners)} miners and a validator are running; Ctrl-C to stop",
              file=sys.stderr, flush=True)

    async def main() -> None:
        devnet = Devnet(miners=args.miners, faults=faults, validator_fault=args.validator_fault,
                        gateway_uri=args.gateway_uri,
                        names={"miners": "--miners", "faults": "--faults", "gateway_uri": "--gateway-uri",
                               "validator_fault": "--validator-fault"})
        await run_until_signalled(devnet, on_ready=ready)

    trio.run(main)
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from config.template import write_default

    if args.from_upstream is not None:
        return init_from_upstream(args.from_upstream, args.file, force=args.force)
    try:
        path = write_default(args.file, force=args.force)
    except FileExistsError:
        print(f"{args.file}: already exists; use --force to replace it", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{args.file}: cannot be written: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"wrote {path}; check it with: sn1-gateway check-config {path}")
    return 0


def init_from_upstream(env_path: str, file: str, *, force: bool) -> int:
    """`init --from-upstream .env.api [FILE]`: the commented file with upstream's settings mapped in."""
    from engine import upstream_env

    if not force and os.path.lexists(file):  # before reading anything, as plain `init` does
        print(f"{file}: already exists; use --force to replace it", file=sys.stderr)
        return 1
    try:
        env = upstream_env.read_env_file(env_path)
    except upstream_env.UpstreamEnvError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    translation = upstream_env.translate(env, base=os.path.dirname(os.path.abspath(env_path)))
    text = upstream_env.render_config(translation, source=env_path)
    try:
        path = upstream_env.write_private(file, text, force=force)
    except FileExistsError:
        print(f"{file}: already exists; use --force to replace it", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{file}: cannot be written: {exc.strerror or exc}", file=sys.stderr)
        return 1
    for line in translation.lines():
        print(line)
    load_settings(path)  # what was written loads, or this is a bug worth a loud error
    print(f"wrote {path} (mode 0600: it may hold the admin key)")
    print(f"next: sn1-gateway keys import {translation.keys_file} --config {path}")
    print(f"then: sn1-gateway doctor --config {path}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from engine.doctor import CheckResult, run_checks, summary

    def report(result: CheckResult) -> None:
        print(result.line(), flush=True)

    if not args.verbose:  # the chain client logs each endpoint it tries; the check says what matters
        logging.getLogger("bittensor").setLevel(logging.WARNING)

    results = trio.run(partial(run_checks, args.config, probe=args.probe, report=report))
    print(summary(results))
    return 1 if any(r.failed for r in results) else 0


def cmd_check_config(args: argparse.Namespace) -> int:
    load_settings(args.file)
    print(f"{args.file}: OK")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sn1-gateway", description="OpenAI-style API gateway for a Bittensor subnet validator."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", metavar="FILE", help=f"config file (default: ./{DEFAULT_CONFIG} if present)")
    serve.add_argument("--devnet", action="store_true", help="run a local simulated subnet in the same process "
                       "(always one worker)")
    serve.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # one of server.workers
    serve.set_defaults(func=cmd_serve)

    init = sub.add_parser("init", help="write a commented default config file")
    init.add_argument("file", nargs="?", default=DEFAULT_CONFIG, metavar="FILE")
    init.add_argument("--force", action="store_true", help="replace an existing file")
    init.add_argument("--from-upstream", metavar="ENV_FILE",
                      help="fill it in from an upstream validator API's .env.api (printing what was mapped "
                           "and what was not)")
    init.set_defaults(func=cmd_init)

    doctor = sub.add_parser("doctor", help="check a production setup end to end and say what to fix")
    doctor.add_argument("--config", metavar="FILE", default=DEFAULT_CONFIG,
                        help=f"config file (default: ./{DEFAULT_CONFIG})")
    doctor.add_argument("--probe", action="store_true",
                        help="also send one empty scoring payload to a validator, to see it accepts our hotkey")
    doctor.set_defaults(func=cmd_doctor)

    check = sub.add_parser("check-config", help="validate a config file")
    check.add_argument("file", metavar="FILE")
    check.set_defaults(func=cmd_check_config)

    devnet = sub.add_parser("devnet", help="run a local simulated subnet and print the config that uses it")
    devnet.add_argument("--miners", type=int, default=5, metavar="N", help="simulated miners (default 5)")
    devnet.add_argument("--faults", default="", metavar="LIST",
                        help="fault mode per miner in uid order, comma-separated: slow_first_token, "
                             "slow_tokens, http_500, refuse, hang_after_headers, stop_mid_stream, "
                             "invalid_json, no_done, bench; empty for healthy (e.g. ',http_500,refuse')")
    devnet.add_argument("--validator-fault", default="", metavar="MODE",
                        help="fault mode of the validator: down, http_500, slow, refuse_signer (401 to every "
                             "scoring post, as a validator whose API_HOTKEY names another hotkey); empty for healthy")
    devnet.add_argument("--gateway-uri", default="//devnet/gateway", metavar="URI",
                        help="keypair URI of the gateway whose requests the devnet accepts")
    devnet.set_defaults(func=cmd_devnet)

    keys_commands.add_parser(sub, settings_from)
    bench_command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(LogSettings(), verbose=args.verbose)  # until `serve` has read its [log]
    func: Command = args.func
    try:
        return func(args)
    except (ConfigError, HotkeyError, KeyStoreError, StartupError, ExceptionGroup) as exc:
        problem = operator_error(exc)
        if problem is None:
            raise
        print(f"error: {problem}", file=sys.stderr)
        return 2 if isinstance(problem, ConfigError) else 1


OperatorError = ConfigError | HotkeyError | KeyStoreError | StartupError


def operator_error(exc: BaseException) -> OperatorError | None:
    """The operator-facing error behind `exc`, looking inside exception groups from nurseries."""
    if isinstance(exc, OperatorError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := operator_error(inner)) is not None:
                return found
    return None


if __name__ == "__main__":
    sys.exit(main())
