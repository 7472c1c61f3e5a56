"""`autopull plan`: show what the policy would do with alert files.

Planning parses each file as the pipeline would and applies the policy to every
recipient, without Kafka and without touching a mailbox. It imports neither Faust nor
the settings module, so it starts fast.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import BinaryIO, TextIO

from rich.console import Console
from rich.table import Table
from rich.text import Text

from autopull.connectors.errors import AutopullError
from autopull.connectors.sources.detect import get_format, parse_alert
from autopull.connectors.sources.exceptions import InvalidAlertError, UnknownFormatError
from autopull.streams.policy import Decision, PolicySettings, decide
from autopull.streams.scoring import score_single_alert

logger = logging.getLogger(__name__)

STDIN_PATH = "-"
DEFAULT_MAX_ALERT_BYTES = 1024 * 1024

_ACTION_STYLES = {"pull": "bold red", "hold": "yellow", "skip": "dim"}


@dataclass(frozen=True)
class FileError:
    """An input file that could not be planned, and why."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class _UnusableFileError(Exception):
    """Internal signal that a file cannot be read within the limit."""


def plan_files(
    paths: Sequence[str],
    settings: PolicySettings,
    source: str | None = None,
    *,
    max_bytes: int = DEFAULT_MAX_ALERT_BYTES,
    stdin: BinaryIO | None = None,
) -> tuple[list[Decision], list[FileError]]:
    """Return the decisions for every usable file and an error for each other one.

    Decisions come in file order, then event order, then recipient order. `source`
    names the alert format (for example "tap"); None detects it per file. The path
    "-" reads standard input (or `stdin`).
    """
    received_at = datetime.now(UTC)
    decisions: list[Decision] = []
    errors: list[FileError] = []

    for path in paths:
        # An invalid event of a file with several is reported on its own, as the
        # worker sends it alone to the dead letters, and the others are planned.
        rejected: list[InvalidAlertError] = []
        try:
            body = _read_alert(path, max_bytes, stdin)
            alerts = parse_alert(
                body, received_at=received_at, format_name=source, rejected=rejected
            )
        except (_UnusableFileError, AutopullError) as error:
            logger.debug("Cannot plan file path=%s error=%s", path, error)
            errors.append(FileError(_display_path(path), str(error)))
            continue
        for invalid in rejected:
            errors.append(FileError(_display_path(path), str(invalid)))

        for alert in alerts:
            score = score_single_alert(alert)
            decisions.extend(decide(alert, alert["recipients"], settings, score=score))
        logger.debug("Planned file path=%s alerts=%d", path, len(alerts))
    return decisions, errors


def run_plan(
    paths: Sequence[str],
    json_output: bool,
    source: str | None,
    settings: PolicySettings,
    *,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    stdin: BinaryIO | None = None,
    max_bytes: int = DEFAULT_MAX_ALERT_BYTES,
) -> int:
    """Print the plan for `paths` and return the exit code.

    With `json_output`, each decision is one JSON object per line. Otherwise the
    decisions form a table. Files that cannot be used get an error line on stderr and
    exit code 1, after the decisions of the other files are printed. No paths, or a
    `source` that names no registered format, gives exit code 2.
    """
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    if not paths:
        print("error: no alert files given. Name files, or - for stdin.", file=err)
        return 2

    if source is not None:
        try:
            get_format(source)
        except UnknownFormatError as unknown:
            print(f"error: {unknown}", file=err)
            return 2

    decisions, errors = plan_files(
        paths, settings, source, max_bytes=max_bytes, stdin=stdin
    )
    if json_output:
        _print_json(decisions, out)
    elif decisions or not errors:
        # A table without rows would only precede the errors.
        _print_table(decisions, out)

    for error in errors:
        print(f"error: {error}", file=err)
    return 1 if errors else 0


def _read_alert(path: str, max_bytes: int, stdin: BinaryIO | None) -> bytes:
    """Read at most `max_bytes` from a file or stdin, rejecting anything larger."""
    limit = f"the ingest limit of {max_bytes:,} bytes"
    if path == STDIN_PATH:
        stream = stdin if stdin is not None else sys.stdin.buffer
        body = stream.read(max_bytes + 1)
        if len(body) > max_bytes:
            raise _UnusableFileError(
                f"The input is more than {max_bytes:,} bytes, larger than {limit}. "
                "Split it into smaller alerts."
            )
        return _non_empty(body)

    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size > max_bytes:
                raise _UnusableFileError(
                    f"The file is {size:,} bytes, larger than {limit}. "
                    "Split it into smaller alerts."
                )
            body = file.read(max_bytes + 1)
    except OSError as error:
        raise _UnusableFileError(
            f"The file cannot be read ({error.strerror or error}). Check the path "
            "and its permissions."
        ) from error

    if len(body) > max_bytes:
        raise _UnusableFileError(
            f"The file is more than {max_bytes:,} bytes, larger than {limit}. "
            "Split it into smaller alerts."
        )
    return _non_empty(body)


def _non_empty(body: bytes) -> bytes:
    # An empty body is no alert, as the webhook and `autopull ingest` reject it too.
    if not body:
        raise _UnusableFileError("The input is empty. Send one alert.")
    return body


def _display_path(path: str) -> str:
    return "<stdin>" if path == STDIN_PATH else path


def _print_json(decisions: list[Decision], out: TextIO) -> None:
    for decision in decisions:
        out.write(json.dumps(decision.as_dict(), ensure_ascii=False) + "\n")


def _action_label(decision: Decision) -> str:
    return f"{decision.action} (notify)" if decision.notify else decision.action


def _print_table(decisions: list[Decision], out: TextIO) -> None:
    table = Table(title="Plan")
    table.add_column("Mailbox", no_wrap=True)
    table.add_column("Message-ID", overflow="fold", ratio=2)
    table.add_column("Action", no_wrap=True)
    table.add_column("Rule", overflow="fold", ratio=2)
    table.add_column("Reason", overflow="fold", ratio=4)

    # Cells are Text objects, because ids such as <[gw10]...> would read as markup.
    for decision in decisions:
        table.add_row(
            Text(decision.mailbox),
            Text(decision.message_id or "(none)"),
            Text(_action_label(decision), style=_ACTION_STYLES[decision.action]),
            Text(decision.rule),
            Text(decision.reason),
        )
    Console(file=out).print(table)
