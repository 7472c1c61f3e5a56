"""The `autopull` command line."""

from __future__ import annotations

import argparse
import logging.config
import os
import sys
from collections.abc import Sequence

from pydantic import ValidationError
from pydantic_settings import SettingsError

from autopull.connectors.sources.detect import format_names
from autopull.streams.logs import logging_config
from autopull.streams.policy_file import PolicyError
from autopull.streams.settings import (
    Settings,
    SettingsFileError,
    describe_settings_error,
    load_settings,
)
from autopull.streams.topics import TopicError
from autopull.streams.views import INCIDENT_STATES

FORMAT_NAMES = format_names()
SOURCE_HELP = (
    f"Alert format of every file ({', '.join(FORMAT_NAMES)}); default: detected "
    "per file."
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autopull",
        description="Pull malicious email out of mailboxes after delivery.",
    )
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        help="Write log lines as plain text or as JSON objects (AUTOPULL_LOG_FORMAT).",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser(
        "worker", help="Run the pipeline against the configured broker."
    )

    ingest = commands.add_parser(
        "ingest", help="Send alert files (or standard input) to the raw alerts topic."
    )
    ingest.add_argument("files", nargs="*", help="Alert files; - or none reads stdin.")
    ingest.add_argument("--source", choices=FORMAT_NAMES, help=SOURCE_HELP)

    plan = commands.add_parser(
        "plan",
        help="Print what would be pulled from which mailbox and why, without Kafka.",
    )
    plan.add_argument("files", nargs="+", help="Alert files; - reads stdin.")
    plan.add_argument("--source", choices=FORMAT_NAMES, help=SOURCE_HELP)
    plan.add_argument(
        "--json", action="store_true", help="Print one JSON object per decision."
    )

    incidents = commands.add_parser("incidents", help="List incidents, newest first.")
    incidents.add_argument(
        "--state", choices=INCIDENT_STATES, help="Only incidents in this state."
    )
    incidents.add_argument(
        "--json", action="store_true", help="One JSON object per line."
    )

    incident = commands.add_parser("incident", help="Work with one incident.")
    incident_commands = incident.add_subparsers(dest="incident_command", required=True)
    show = incident_commands.add_parser(
        "show", help="Show an incident and its results."
    )
    show.add_argument("incident_id")
    show.add_argument("--json", action="store_true", help="Print JSON.")

    for action, text in (
        ("approve", "Approve the held pulls of an incident."),
        ("reject", "Reject the held pulls of an incident."),
        ("release", "Restore the quarantined copies of an incident."),
        ("retry", "Pull again the copies of an incident whose pull failed."),
        ("close", "Close an incident."),
        ("comment", "Add a comment to an incident."),
    ):
        command = commands.add_parser(action, help=text)
        command.add_argument("incident_id")
        if action == "comment":
            command.add_argument("text", help="The comment.")
        else:
            command.add_argument("--comment", dest="text", help="Why, for the history.")
        if action in ("approve", "reject", "release", "retry"):
            command.add_argument("--mailbox", help="Only this mailbox's copies.")
        if action == "approve":
            command.add_argument(
                "--message-id",
                help="Only the held copy with this Message-ID, or the search "
                "candidate with it, which is then pulled instead of searching again.",
            )
        if action in ("approve", "release", "retry"):
            command.add_argument(
                "--wait",
                action="store_true",
                help="Wait until every copy the command names has a final outcome, "
                "with a progress bar on a terminal; exit 1 if any failed.",
            )
            command.add_argument(
                "--timeout",
                type=positive_seconds,
                default=600.0,
                help="Seconds to wait with --wait (default 600).",
            )
        command.add_argument("--actor", help="Who gives the command; default: you.")

    demo = commands.add_parser(
        "demo",
        help="Run the pipeline on the bundled alerts and mail world, end to end.",
    )
    demo.add_argument(
        "--reset",
        action="store_true",
        help="Start the broker, the simulator and the worker state over.",
    )
    demo.add_argument(
        "--timeout",
        type=positive_seconds,
        default=300.0,
        help="Seconds to wait for every planned copy to reach a final outcome.",
    )
    demo.add_argument(
        "--stop", action="store_true", help="Stop the demo's broker and simulator."
    )
    return parser


def positive_seconds(value: str) -> float:
    """Parse a number of seconds above zero, for argparse."""
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a number of seconds"
        ) from None
    if not seconds > 0:
        raise argparse.ArgumentTypeError(
            f"{value!r} must be a number of seconds above 0"
        )
    return seconds


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `autopull` command and return its exit code."""
    args = _parser().parse_args(argv)
    overrides = {"log_format": args.log_format} if args.log_format else {}
    try:
        settings = load_settings(**overrides)
    except ValidationError as error:
        print(f"error: {describe_settings_error(error)}", file=sys.stderr)
        return 2
    except SettingsError as error:
        # pydantic-settings raises this for an environment value that is not JSON
        # where a list or mapping is expected.
        print(
            f"error: invalid settings: {error}. Settings that are lists or mappings "
            "take JSON in the environment, for example "
            'AUTOPULL_ROUTING=\'{"example.com": "graph"}\'.',
            file=sys.stderr,
        )
        return 2
    except (SettingsFileError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    logging.config.dictConfig(logging_config(settings.log_level, settings.log_format))
    if args.command in ("worker", "plan"):
        # A malformed policy file is rejected before anything starts.
        try:
            settings.pull_policy()
        except PolicyError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    try:
        return _dispatch(args, settings)
    except TopicError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TimeoutError as error:
        # The broker did not respond in time; the message names its address.
        print(f"error: {error}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader of standard output went away (`autopull incidents | head`).
        # Point stdout at /dev/null so that the interpreter's final flush is quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "worker":
        from autopull.streams.worker import run_worker

        return run_worker(settings)
    if args.command == "ingest":
        from autopull.streams.ingest import run_ingest

        return run_ingest(args.files, settings, args.source)
    if args.command == "plan":
        from autopull.streams.plan import run_plan

        return run_plan(
            args.files,
            args.json,
            args.source,
            settings.pull_policy(),
            max_bytes=settings.ingest_max_bytes,
        )
    if args.command in ("incidents", "incident"):
        from autopull.streams.operate import run_incidents, run_show

        if args.command == "incidents":
            return run_incidents(settings, state=args.state, as_json=args.json)
        return run_show(settings, args.incident_id, as_json=args.json)
    if args.command in ("approve", "reject", "release", "retry", "close", "comment"):
        from autopull.streams.operate import run_command

        return run_command(
            settings,
            args.incident_id,
            args.command,
            mailbox=getattr(args, "mailbox", None),
            text=args.text,
            actor=args.actor,
            message_id=getattr(args, "message_id", None),
            wait=getattr(args, "wait", False),
            timeout=getattr(args, "timeout", 600.0),
        )
    if args.command == "demo":
        from autopull.streams.demo import run_demo

        return run_demo(reset=args.reset, stop=args.stop, timeout=args.timeout)
    raise AssertionError(f"unknown command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
