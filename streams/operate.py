"""CLI commands for analysts: list and show incidents, approve, retry, release.

They read the compacted incidents topic, so they work from any machine that
reaches the broker, whichever worker owns an incident.
"""

from __future__ import annotations

import getpass
import json
import sys
import time
from typing import Any, TextIO

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from autopull.streams.commands import (
    API_ACTOR_PREFIX,
    CommandError,
    check_approve_pick,
    check_incident_size,
    check_mailbox,
    check_reject,
    check_retry,
    command_event,
    normalize_mailbox,
    normalize_message_id,
    send_command,
)
from autopull.streams.follow import FollowedCopy, followed_copies, settled_copies
from autopull.streams.incidents import trace_retry_targets
from autopull.streams.progress import progress
from autopull.streams.records import Record
from autopull.streams.settings import Settings
from autopull.streams.views import (
    forward_rows,
    incident_detail,
    matches,
    result_rows,
    summary_row,
)
from autopull.streams.watch import IncidentWatcher


def load_incidents(settings: Settings) -> dict[str, Record]:
    """Return the latest state of every incident on the incidents topic."""
    watcher = IncidentWatcher(settings)
    try:
        watcher.catch_up()
        return dict(watcher.incidents)
    finally:
        watcher.close()


def _console(out: TextIO) -> Console:
    console = Console(file=out)
    if not console.is_terminal:
        console.width = 200
    return console


def run_incidents(
    settings: Settings, *, state: str | None, as_json: bool, out: TextIO = sys.stdout
) -> int:
    """Print the incidents, newest first."""
    incidents = [
        i for i in load_incidents(settings).values() if matches(i, state=state)
    ]
    incidents.sort(key=lambda incident: incident["updated_at"], reverse=True)
    rows = [summary_row(incident) for incident in incidents]
    if as_json:
        for row in rows:
            print(json.dumps(row), file=out)
        return 0

    table = Table(title=f"{len(rows)} incidents")
    for column in (
        "incident",
        "state",
        "class",
        "title",
        "targets",
        "pulls",
        "updated",
    ):
        table.add_column(column)
    for row in rows:
        pulls = ", ".join(f"{status} {count}" for status, count in row["pulls"].items())
        table.add_row(
            row["incident_id"],
            row["state"],
            row["classification"],
            escape(row["title"]),
            str(row["targets"]),
            pulls,
            row["updated_at"],
        )
    _console(out).print(table)
    return 0


def run_show(
    settings: Settings, incident_id: str, *, as_json: bool, out: TextIO = sys.stdout
) -> int:
    """Print one incident with a result row per mailbox action."""
    incident = load_incidents(settings).get(incident_id)
    if incident is None:
        print(
            f"error: incident {incident_id} was not found; list them with "
            "`autopull incidents`.",
            file=sys.stderr,
        )
        return 1
    if as_json:
        print(json.dumps(incident_detail(incident)), file=out)
        return 0

    console = _console(out)
    summary = summary_row(incident)
    console.print(
        f"[bold]{escape(incident_id)}[/bold] {summary['state']} "
        f"{summary['classification']}: {escape(summary['title'])}"
    )
    table = Table(title="Results")
    columns = ("mailbox", "Message-ID", "action", "status", "read", "folder", "undone")
    for column in columns:
        table.add_column(column)
    for row in result_rows(incident):
        table.add_row(*(escape(cell) for cell in _result_cells(row)))
    console.print(table)
    _print_candidates(console, result_rows(incident))
    hops = forward_rows(incident)
    if hops:
        console.print(forward_tree(hops, incident_detail(incident)["trace_state"]))
    for item in incident["history"]:
        line = f"{item['at']:%Y-%m-%d %H:%M:%S} {item['actor']}: {item['what']}"
        if item["detail"]:
            line += f" ({item['detail']})"
        console.print(escape(line))
    return 0


def forward_tree(hops: list[dict[str, Any]], state: str) -> Tree:
    """Build the forward tree for the terminal: each sender above its recipients.

    A copy that comes back to a mailbox already shown (a cycle) is printed once
    more as a leaf, so the tree always ends.
    """
    tree = Tree(f"Forwards (trace {state})")
    shown: set[tuple[str, str, str]] = set()

    def add(parent: Tree, sender: str, depth: int) -> None:
        for hop in hops:
            key = (hop["from_mailbox"], hop["to_mailbox"], hop["message_id"])
            if hop["from_mailbox"] != sender or hop["depth"] != depth or key in shown:
                continue
            shown.add(key)
            where = "external, reported" if hop["external"] else hop["action"]
            # Text, not markup, because the brackets and ids would read as styles.
            label = Text(
                f"{hop['to_mailbox']} {hop['message_id']} "
                f"[{hop['confidence']}, {where}] {hop['evidence']}"
            )
            add(parent.add(label), hop["to_mailbox"], depth + 1)

    senders = dict.fromkeys(hop["from_mailbox"] for hop in hops if hop["depth"] == 1)
    for sender in senders:
        add(tree.add(Text(sender)), sender, 1)
    return tree


READ_STATES = {None: "-", True: "read", False: "unread"}


def _print_candidates(console: Console, rows: list[dict[str, Any]]) -> None:
    """Print the messages that held searches offer, and the one an approve picked."""
    for row in rows:
        if row.get("resolved_message_id") and row["candidates"]:
            console.print(
                escape(f"{row['mailbox']}: pulls {row['resolved_message_id']}")
            )
        if row["status"] != "held" or not row["candidates"]:
            continue
        console.print(
            escape(f"{row['mailbox']}: held with {len(row['candidates'])} candidates")
        )
        for candidate in row["candidates"]:
            message_id = candidate["message_id"] or "(no Message-ID)"
            line = (
                f"  {message_id}  {candidate.get('folder') or '-'}  "
                f"{candidate.get('received_at') or '-'}  "
                f"{candidate.get('subject') or ''}"
            )
            console.print(escape(line))


def _result_cells(row: dict[str, Any]) -> list[str]:
    read = READ_STATES[row["read"]]
    return [
        row["mailbox"],
        row["message_id"],
        row["action"],
        row["status"],
        read,
        row["original_folder"] or "-",
        "yes" if row["undone"] else "no",
    ]


def run_command(
    settings: Settings,
    incident_id: str,
    action: str,
    *,
    mailbox: str | None = None,
    text: str | None = None,
    actor: str | None = None,
    message_id: str | None = None,
    wait: bool = False,
    timeout: float = 600.0,
    out: TextIO | None = None,
) -> int:
    """Send one command and confirm it on standard error.

    With `wait`, follow the incident until every copy the command names has a
    final outcome, and return 1 when any failed or the wait timed out.
    """
    out = out if out is not None else sys.stderr
    try:
        mailbox = normalize_mailbox(mailbox)
        message_id = normalize_message_id(message_id)
    except CommandError as error:
        print(f"error: {error}", file=out)
        return 2
    watcher = IncidentWatcher(settings)
    try:
        watcher.catch_up()
        incident = watcher.incidents.get(incident_id)
        if incident is None:
            print(
                f"error: incident {incident_id} was not found; list them with "
                "`autopull incidents`.",
                file=out,
            )
            return 1
        name = actor or getpass.getuser()
        if name.startswith(API_ACTOR_PREFIX):
            print(
                f"error: actor names that start with {API_ACTOR_PREFIX!r} are reserved "
                "for API keys; give your own name.",
                file=out,
            )
            return 2
        try:
            check_mailbox(incident, mailbox)
            if action == "approve":
                check_approve_pick(incident, mailbox, message_id)
            elif action == "reject":
                check_reject(incident, mailbox)
            elif action == "retry":
                check_retry(incident, mailbox)
            event = command_event(
                incident_id,
                action,
                name,
                mailbox=mailbox,
                text=text,
                message_id=message_id,
            )
            check_incident_size(incident, event, settings.incident_max_bytes)
        except CommandError as error:
            print(f"error: {error}", file=out)
            return 2
        copies = followed_copies(incident, action, mailbox, message_id)
        searches = []
        if action == "retry":
            searches = [e["mailbox"] for e in trace_retry_targets(incident, mailbox)]
        try:
            send_command(settings, event)
        except CommandError as error:
            print(f"error: {error}", file=out)
            return 1
        target = f" for {mailbox}" if mailbox is not None else ""
        print(f"Sent {action}{target} on {incident_id}.", file=out)
        if searches:
            print(
                f"The forward search of {', '.join(searches)} starts again; "
                f"`autopull incident show {incident_id}` shows its progress.",
                file=out,
            )
        if wait and not copies and not searches:
            wanted = {"approve": "held", "retry": "failed"}.get(action, "quarantined")
            print(
                f"Nothing to wait for: {incident_id} has no {wanted} copies{target} "
                "for this command to act on; `autopull incident show "
                f"{incident_id}` lists each copy's status.",
                file=out,
            )
        if not wait or not copies:
            return 0
        return _follow(watcher, incident_id, action, copies, timeout, out)
    finally:
        watcher.close()


def _follow(
    watcher: IncidentWatcher,
    incident_id: str,
    action: str,
    copies: list[FollowedCopy],
    timeout: float,
    out: TextIO,
) -> int:
    deadline = time.monotonic() + timeout
    settled: dict[FollowedCopy, str] = {}
    verb = "Restoring" if action == "release" else "Pulling"
    with progress(f"{verb} copies of {incident_id}", len(copies), out=out) as shown:
        while len(settled) < len(copies) and time.monotonic() < deadline:
            watcher.poll(0.5)
            settled = settled_copies(watcher.incidents[incident_id], action, copies)
            shown.update(len(settled))

    # A pull that found no copy left nothing in the user's reach, so only a failed
    # pull counts against an approve. A release expects every copy restored.
    if action == "release":
        failures = {c: s for c, s in settled.items() if s != "restored"}
    else:
        failures = {c: s for c, s in settled.items() if s == "failed"}
    for copy, status in sorted(failures.items(), key=lambda item: item[0].mailbox):
        print(f"{copy.mailbox} {copy.message_id}: {status}", file=out)
    if len(settled) < len(copies):
        print(
            f"error: {len(copies) - len(settled)} of {len(copies)} copies had no final "
            f"outcome after {timeout:g} s; follow them with "
            f"`autopull incident show {incident_id}`.",
            file=out,
        )
        return 1
    if failures:
        print(
            f"error: {len(failures)} of {len(copies)} copies did not succeed; see "
            f"`autopull incident show {incident_id}` for the errors.",
            file=out,
        )
        return 1
    print(f"All {len(copies)} copies are done.", file=out)
    return 0
