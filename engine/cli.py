"""The `sn1-gateway` command line."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version

import trio

from actors.keystore import KeyStoreError
from actors.keystore import commands as keys_commands
from config.loading import ConfigError, default_settings, load_settings
from config.settings import Settings
from engine.hotkey import HotkeyError

DEFAULT_CONFIG = "sn1-gateway.toml"

Command = Callable[[argparse.Namespace], int]


def package_version() -> str:
    try:
        return version("sn1-gateway")
    except PackageNotFoundError:
        return "unknown"


def settings_from(args: argparse.Namespace) -> Settings:
    """The settings named by `--config`, else `./sn1-gateway.toml` if present, else the defaults."""
    path = getattr(args, "config", None)
    if path is None:
        import os

        if not os.path.exists(DEFAULT_CONFIG):
            return default_settings()
        path = DEFAULT_CONFIG
    return load_settings(path)


def cmd_serve(args: argparse.Namespace) -> int:
    from engine.gateway import Gateway, serve_until_signalled

    settings = settings_from(args)
    if args.devnet:
        settings = dataclasses.replace(
            settings,
            subnet=dataclasses.replace(settings.subnet, source="static", neurons=()),
            wallet=dataclasses.replace(settings.wallet, uri=settings.wallet.uri or "//Alice"),
        )

    def on_ready(gateway: Gateway) -> None:
        print(f"sn1-gateway listening on {gateway.url}  (Ctrl-C to stop)", flush=True)

    trio.run(lambda: serve_until_signalled(settings, on_ready=on_ready))
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from config.template import write_default

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
    serve.add_argument("--devnet", action="store_true", help="run a local simulated subnet in the same process")
    serve.set_defaults(func=cmd_serve)

    init = sub.add_parser("init", help="write a commented default config file")
    init.add_argument("file", nargs="?", default=DEFAULT_CONFIG, metavar="FILE")
    init.add_argument("--force", action="store_true", help="replace an existing file")
    init.set_defaults(func=cmd_init)

    check = sub.add_parser("check-config", help="validate a config file")
    check.add_argument("file", metavar="FILE")
    check.set_defaults(func=cmd_check_config)

    keys_commands.add_parser(sub, settings_from)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    func: Command = args.func
    try:
        return func(args)
    except (ConfigError, HotkeyError, KeyStoreError, ExceptionGroup) as exc:
        problem = operator_error(exc)
        if problem is None:
            raise
        print(f"error: {problem}", file=sys.stderr)
        return 2 if isinstance(problem, ConfigError) else 1


def operator_error(exc: BaseException) -> ConfigError | HotkeyError | KeyStoreError | None:
    """The operator-facing error behind `exc`, looking inside exception groups from nurseries."""
    if isinstance(exc, ConfigError | HotkeyError | KeyStoreError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := operator_error(inner)) is not None:
                return found
    return None


if __name__ == "__main__":
    sys.exit(main())
