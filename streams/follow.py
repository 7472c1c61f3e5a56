"""Follow a command until the worker has acted on every copy it names.

A command only requests work from the incident agent. The pulls and restores happen
later, in whichever worker owns the mailboxes. `autopull approve --wait`,
`autopull retry --wait` and `autopull release --wait` read the incidents topic
until each copy the command named has a final outcome, with a progress bar or
plain lines.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from autopull.streams.incidents import (
    approve_targets,
    outcome_detail,
    release_targets,
    retry_targets,
)
from autopull.streams.records import Record

# Pull statuses after which nothing more happens to a copy without a new command.
# `throttled` is parked work that will run again, and `held` waits for a person.
SETTLED_PULL_STATUSES = frozenset(
    {"quarantined", "already_quarantined", "not_found", "failed", "skipped"}
)
# Restore outcomes other than this one are retried by the worker.
RETRIED_RESTORE_STATUS = "throttled"


@dataclass(frozen=True)
class FollowedCopy:
    """One copy that a command names, and how far the history had got at the send."""

    mailbox: str
    message_id: str
    history_at_send: int
    # When the pull had finished at the send: a retried copy has a final outcome
    # once its pull finishes again.
    finished_at_send: datetime | None = None


def followed_copies(
    incident: Record, action: str, mailbox: str | None, message_id: str | None = None
) -> list[FollowedCopy]:
    """Return the copies that `action` on `incident` starts work for.

    This mirrors what the incident agent does with the command: approve pulls the
    held copies (only those that `message_id` picks, when given), retry pulls the
    copies whose pull failed, and release restores the pulled copies that are not
    undone yet. Other actions start no work and name no copies.
    """
    wanted = mailbox.strip().lower() if mailbox is not None else None
    at = len(incident["history"])
    if action == "approve":
        entries = [entry for entry, _ in approve_targets(incident, wanted, message_id)]
    elif action == "retry":
        entries = retry_targets(incident, wanted)
    elif action == "release":
        entries = release_targets(incident, wanted)
    else:
        entries = []
    return [
        FollowedCopy(entry["mailbox"], entry["message_id"], at, entry["finished_at"])
        for entry in entries
    ]


def settled_copies(
    incident: Record, action: str, copies: list[FollowedCopy]
) -> dict[FollowedCopy, str]:
    """Return each followed copy that has a final outcome, with that outcome."""
    entries = {(e["mailbox"], e["message_id"]): e for e in incident["pulls"]}
    settled: dict[FollowedCopy, str] = {}
    for copy in copies:
        entry = entries.get((copy.mailbox, copy.message_id))
        if entry is None:
            continue
        if action in ("approve", "retry"):
            # An approved or retried entry goes back to no status until its
            # outcome arrives. Before the agent applies a retry, the entry still
            # shows the failure it had at the send.
            finished = entry["status"] in SETTLED_PULL_STATUSES
            again = action == "approve" or entry["finished_at"] != copy.finished_at_send
            if finished and again and entry["action"] == "pull":
                settled[copy] = entry["status"]
        elif entry["undone"]:
            settled[copy] = "restored"
        elif entry["error"]:
            # A restore that failed leaves the entry as it was, with its error.
            status = _restore_outcome_since(incident, copy)
            if status is not None and status != RETRIED_RESTORE_STATUS:
                settled[copy] = status
    return settled


def _restore_outcome_since(incident: Record, copy: FollowedCopy) -> str | None:
    """Return the status of the last restore outcome for `copy` after the send.

    The incident agent records each outcome in the history as "restore outcome"
    with the detail "MAILBOX <MESSAGE-ID>: STATUS" and an optional error.
    """
    status = None
    prefix = outcome_detail(copy.mailbox, copy.message_id)
    for item in incident["history"][copy.history_at_send :]:
        if item["what"] == "restore outcome" and item["detail"].startswith(prefix):
            status = item["detail"][len(prefix) :].split(" ", 1)[0]
    return status
