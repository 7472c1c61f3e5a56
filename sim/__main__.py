"""Run a simulator from the command line: `python -m autopull.sim SIMULATOR ...`.

Each simulator is a subcommand that adds its own options and runs until stopped:

    python -m autopull.sim graph --world examples/worlds/demo.json \
        --state /tmp/demo-state.json --port 8443
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .ews import add_ews_arguments, run_ews
from .gmail import GmailSimSettings, GmailSimulator
from .graph import GraphSimSettings, GraphSimulator
from .registry import start_registry
from .tap import add_tap_arguments, run_tap
from .world import ScenarioError, World

logger = logging.getLogger(__name__)

Runner = Callable[[argparse.Namespace], int]


def add_world_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options every simulator over the mail world shares."""
    parser.add_argument(
        "--world", type=Path, required=True, help="scenario file (JSON) to start from"
    )
    parser.add_argument(
        "--state",
        type=Path,
        required=True,
        help="state file (JSON); loaded when it exists, written after every change",
    )
    parser.add_argument(
        "--reset",
        action="store_true",
        help="start from the scenario even when the state file exists",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"
    )
    parser.add_argument("--port", type=int, required=True, help="TCP port to listen on")
    parser.add_argument(
        "--latency-ms",
        type=float,
        default=0.0,
        help="delay added to every request, in milliseconds (default 0)",
    )


def add_graph_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the Microsoft Graph simulator's options."""
    add_world_arguments(parser)
    defaults = GraphSimSettings()
    parser.add_argument(
        "--concurrency-limit",
        type=int,
        default=defaults.concurrency_limit,
        help="requests in flight per mailbox before 429 (default %(default)s)",
    )
    parser.add_argument(
        "--window-requests",
        type=int,
        default=defaults.window_requests,
        help="requests per mailbox per window before 429 (default %(default)s)",
    )
    parser.add_argument(
        "--window-seconds",
        type=float,
        default=defaults.window_seconds,
        help="length of the request window in seconds (default %(default)s)",
    )


def run_graph(args: argparse.Namespace) -> int:
    """Serve the Graph simulator until SIGINT or SIGTERM."""
    world = World.open(args.world, args.state, reset=args.reset)
    settings = GraphSimSettings(
        latency_ms=args.latency_ms,
        concurrency_limit=args.concurrency_limit,
        window_requests=args.window_requests,
        window_seconds=args.window_seconds,
    )
    simulator = GraphSimulator(world, settings, scenario_path=args.world)
    asyncio.run(_serve_until_stopped(simulator, args.host, args.port))
    return 0


async def _serve_until_stopped(simulator: GraphSimulator, host: str, port: int) -> None:
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopped.set)
    url = await simulator.start(host, port)
    print(f"Graph simulator listening on {url}", flush=True)
    try:
        await stopped.wait()
    finally:
        await simulator.stop()


def add_gmail_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the Gmail API simulator's options."""
    add_world_arguments(parser)
    defaults = GmailSimSettings()
    parser.add_argument(
        "--quota-units",
        type=int,
        default=defaults.user_quota_units,
        help="quota units per user per window (default %(default)s)",
    )
    parser.add_argument(
        "--quota-window-seconds",
        type=float,
        default=defaults.quota_window_seconds,
        help="length of the quota window in simulated seconds (default %(default)s)",
    )
    parser.add_argument(
        "--concurrency-limit",
        type=int,
        default=defaults.concurrency_limit,
        help="requests in flight per user before 429 (default %(default)s)",
    )
    parser.add_argument(
        "--time-scale",
        type=float,
        default=defaults.time_scale,
        help="how many times faster than real time the simulated clock runs; "
        "latency, quota windows and Retry-After shrink by it (default %(default)s)",
    )


def run_gmail(args: argparse.Namespace) -> int:
    """Serve the Gmail simulator until SIGINT or SIGTERM."""
    world = World.open(args.world, args.state, reset=args.reset)
    settings = GmailSimSettings(
        latency_ms=args.latency_ms,
        user_quota_units=args.quota_units,
        quota_window_seconds=args.quota_window_seconds,
        concurrency_limit=args.concurrency_limit,
        time_scale=args.time_scale,
    )
    simulator = GmailSimulator(world, settings, scenario_path=args.world)
    asyncio.run(_serve_gmail_until_stopped(simulator, args.host, args.port))
    return 0


async def _serve_gmail_until_stopped(
    simulator: GmailSimulator, host: str, port: int
) -> None:
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopped.set)
    url = await simulator.start(host, port)
    print(f"Gmail simulator listening on {url}", flush=True)
    try:
        await stopped.wait()
    finally:
        await simulator.stop()


def add_registry_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the schema registry simulator's options."""
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"
    )
    parser.add_argument(
        "--port", type=int, default=8081, help="TCP port to listen on (default 8081)"
    )


def run_registry(args: argparse.Namespace) -> int:
    """Serve the schema registry simulator until SIGINT or SIGTERM."""
    asyncio.run(_serve_registry_until_stopped(args.host, args.port))
    return 0


async def _serve_registry_until_stopped(host: str, port: int) -> None:
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopped.set)
    runner = await start_registry(host, port)
    bound_host, bound_port = runner.addresses[0][:2]
    print(f"Schema registry listening on http://{bound_host}:{bound_port}", flush=True)
    try:
        await stopped.wait()
    finally:
        await runner.cleanup()


SIMULATORS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Runner]] = {
    "graph": ("Microsoft Graph mail API", add_graph_arguments, run_graph),
    "ews": ("Exchange Web Services (Exchange Server 2016)", add_ews_arguments, run_ews),
    "gmail": (
        "Gmail API (users.messages, users.labels)",
        add_gmail_arguments,
        run_gmail,
    ),
    "tap": ("Proofpoint TAP SIEM API", add_tap_arguments, run_tap),
    "registry": (
        "Confluent schema registry (REST subset)",
        add_registry_arguments,
        run_registry,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """Build the command-line parser with one subcommand per simulator."""
    parser = argparse.ArgumentParser(
        prog="python -m autopull.sim", description="Run one of the local simulators."
    )
    parser.add_argument(
        "--log-level", default="INFO", help="logging level (default INFO)"
    )
    commands = parser.add_subparsers(dest="simulator", required=True)
    for name, (summary, add_arguments, runner) in SIMULATORS.items():
        command = commands.add_parser(name, help=summary, description=summary)
        add_arguments(command)
        command.set_defaults(run=runner)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run the chosen simulator."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    try:
        runner: Runner = args.run
        return runner(args)
    except ScenarioError as exc:
        logger.error("Cannot start the simulator: %s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
