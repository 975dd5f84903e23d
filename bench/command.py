"""`sn1-gateway bench`: its command-line options and the call into `bench.run`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import trio

from bench.processes import ChildFailed


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, not {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, not {text!r}") from None
    if not 0 < value <= 600:
        raise argparse.ArgumentTypeError(f"expected 0 < seconds <= 600, not {value:g}")
    return value


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(_positive_int(part) for part in text.split(",") if part.strip())


def _counts(text: str) -> tuple[int, ...]:
    """A comma-separated list of counts; "0" alone is the empty list (the phase is skipped)."""
    return () if text.strip() == "0" else _int_list(text)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.scenario == "subnet":
        return cmd_scenario(args)
    from bench.run import BenchOptions, run_bench

    chosen: dict[str, Any] = {
        "out": Path(args.out),
        "scoring": not args.no_scoring,
        "target_gateway": args.target_gateway,
        "target_fanout": args.target_fanout,
        "api_key": args.api_key,
        "gateway_pid": args.gateway_pid,
        "target_miner": args.target_miner,
        "miner_hotkey": args.miner_hotkey,
        "keep_dir": Path(args.keep) if args.keep else None,
        "profile": args.profile,
    }
    if args.signer_uri:
        chosen["signer_uri"] = args.signer_uri
    for name in ("duration_s", "max_requests", "concurrencies", "fanouts", "stream_concurrency", "open_streams",
                 "workers"):
        value = getattr(args, name)
        if value is not None:
            chosen[name] = value
    options = BenchOptions.quick_run(**chosen) if args.quick else BenchOptions(**chosen)
    try:
        doc = trio.run(run_bench, options)
    except ChildFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0 if all(t["met"] is not False for t in doc["targets"]) or not args.check else 3


def cmd_scenario(args: argparse.Namespace) -> int:
    from bench.scenario import ScenarioOptions, run_scenario

    chosen: dict[str, Any] = {"out": Path(args.out if args.out != DEFAULT_OUT else DEFAULT_SCENARIO_OUT),
                              "keep_dir": Path(args.keep) if args.keep else None}
    if args.duration_s is not None:
        chosen["duration_s"] = args.duration_s
    if args.rate is not None:
        chosen["rate"] = args.rate
    if args.selections is not None:
        chosen["selections"] = args.selections
    options = ScenarioOptions.quick_run(**chosen) if args.quick else ScenarioOptions(**chosen)
    try:
        doc = trio.run(run_scenario, options)
    except ChildFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0 if all(t["met"] is not False for t in doc["targets"]) or not args.check else 3


def _selections(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    wrong = [n for n in names if n not in ("uniform", "learned")]
    if wrong or not names:
        raise argparse.ArgumentTypeError(f"expected uniform and/or learned, not {text!r}")
    return names


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected requests per second, not {text!r}") from None
    if not 0 < value <= 200:
        raise argparse.ArgumentTypeError(f"expected 0 < rate <= 200, not {value:g}")
    return value


DEFAULT_OUT = "bench-results.json"
DEFAULT_SCENARIO_OUT = "bench-subnet.json"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `bench`."""
    p = sub.add_parser(
        "bench", help="measure the gateway against a direct-to-miner baseline",
        description="Start a devnet (bench-mode miners) and gateways in their own processes, drive load "
                    "from this one, print a table and write JSON. Each figure comes with the same load "
                    "sent straight to one miner, and the ratio gateway/direct.",
    )
    p.add_argument("--out", default=DEFAULT_OUT, metavar="FILE",
                   help=f"JSON results (default: %(default)s; {DEFAULT_SCENARIO_OUT} for --scenario subnet)")
    p.add_argument("--scenario", choices=("throughput", "subnet"), default="throughput",
                   help="throughput (default): the gateway against the stack floor and a direct baseline; "
                        "subnet: quality of service over 50 realistic miners, uniform and learned miner choice")
    p.add_argument("--rate", type=_rate, metavar="R", help="subnet scenario: client requests per second")
    p.add_argument("--selection", dest="selections", type=_selections, metavar="LIST",
                   help="subnet scenario: the miner choices to run, comma-separated (default uniform,learned)")
    p.add_argument("--quick", action="store_true", help="a few requests at small concurrency (about 30 s)")
    p.add_argument("--duration", dest="duration_s", type=_seconds, metavar="S",
                   help="seconds per phase (subnet scenario: per run, default 180)")
    p.add_argument("--requests", dest="max_requests", type=_positive_int, metavar="N",
                   help="at most N requests per phase")
    p.add_argument("--concurrency", dest="concurrencies", type=_int_list, metavar="LIST",
                   help="concurrent connections, comma-separated (default 1,16,64)")
    p.add_argument("--fanout", dest="fanouts", type=_int_list, metavar="LIST",
                   help="miners per request, comma-separated (default 1,5)")
    p.add_argument("--streams", dest="stream_concurrency", type=_positive_int, metavar="N",
                   help="concurrent streams in the streaming phase (default 64)")
    p.add_argument("--open-streams", dest="open_streams", type=_counts, metavar="LIST",
                   help="streams held open while the gateway's RSS is sampled, one figure per count "
                        "(default 1000,5000; 0 skips)")
    p.add_argument("--workers", type=_counts, metavar="LIST",
                   help="server.workers of the workers phases, comma-separated (default 1,2; 0 skips): fanout 1 "
                        "at the highest concurrency, keys in a redis-server the run starts (skipped without one); "
                        "more than one worker is not pinned and shares every core with the peers")
    p.add_argument("--no-scoring", action="store_true", help="gateways forward nothing to the validator")
    p.add_argument("--target-gateway", metavar="URL", help="a running gateway instead of starting ones")
    p.add_argument("--target-fanout", type=_positive_int, metavar="N", help="that gateway's [fanout] miners")
    p.add_argument("--api-key", metavar="KEY", help="an API key of the target gateway")
    p.add_argument("--gateway-pid", type=_positive_int, metavar="PID",
                   help="the target gateway's process id, to read its CPU and RSS")
    p.add_argument("--target-miner", metavar="URL", help="a running miner for the direct baseline")
    p.add_argument("--miner-hotkey", metavar="SS58", help="that miner's hotkey (requests are signed for it)")
    p.add_argument("--signer-uri", metavar="URI", help="keypair URI that signs direct requests "
                                                        "(default: the devnet's gateway key)")
    p.add_argument("--keep", metavar="DIR", help="keep configs, logs and profiles in DIR")
    p.add_argument("--profile", action="store_true", help="record each gateway with py-spy (into --keep DIR)")
    p.add_argument("--check", action="store_true", help="exit 3 when a measured target is missed")
    p.set_defaults(func=cmd_bench)
