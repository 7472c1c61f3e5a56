"""The one interface every mail platform implements.

A platform adapter finds the copies of a message in a mailbox, quarantines and
restores them, and lists what a mailbox sent. Adapters translate their client
library's errors into `autopull.connectors.errors` classes at exactly this boundary.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from autopull.connectors.errors import ConnectorError, PermanentError


@dataclass(frozen=True)
class MessageCopy:
    """One copy of a message in one folder of one mailbox."""

    mailbox: str
    message_id: str
    item_id: str
    folder: str
    read: bool
    subject: str | None = None
    received_at: datetime | None = None
    # Platforms with labels instead of folders (Gmail) list the copy's label ids.
    labels: tuple[str, ...] = ()
    sender: str | None = None


@dataclass(frozen=True)
class MessageSearch:
    """A message named by sender, exact subject and delivery time, not by Message-ID.

    A message matches when its From or Sender address is one of `senders` (compared
    in lower case), its subject equals `subject` exactly (white space around it
    aside), and it arrived between `received_after` and `received_before`,
    inclusive.
    """

    senders: tuple[str, ...]
    subject: str
    received_after: datetime
    received_before: datetime

    def matches(
        self, sender: str | None, subject: str | None, received_at: datetime | None
    ) -> bool:
        """Return True when a message with these properties is the one searched."""
        if sender is None or subject is None or received_at is None:
            return False
        if sender.strip().lower() not in {s.lower() for s in self.senders}:
            return False
        if subject.strip() != self.subject.strip():
            return False
        return self.received_after <= received_at <= self.received_before


@dataclass(frozen=True)
class QuarantineResult:
    """What a quarantine or restore did for one mailbox and one Message-ID.

    `copies` lists the originals as they were before they moved, so the caller can
    record each copy's folder and read state. `already_done` is true when every copy
    was already in quarantine (or, for a restore, already back in place).
    `unfinished` lists originals that reached quarantine but could not be removed
    from the mailbox; such a pull is not complete and `notes` say why.
    """

    mailbox: str
    message_id: str
    copies: tuple[MessageCopy, ...] = ()
    already_done: bool = False
    attempts: int = 1
    evidence_location: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    unfinished: tuple[MessageCopy, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class SentMessage:
    """A message a mailbox sent, with the headers forward tracing matches on."""

    mailbox: str
    message_id: str
    sent_at: datetime
    recipients: tuple[str, ...]
    subject: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    attachment_hashes: tuple[str, ...] = ()
    urls: tuple[str, ...] = ()
    attached_message_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class TraceEvent:
    """One row of a platform's message trace (Exchange message tracking log).

    `event` is the tracking event id (RECEIVE, DELIVER, REDIRECT, EXPAND, ...) and
    `source` the component that logged it (SMTP, STOREDRIVER, MAILBOXRULE, AGENT).
    `related_recipient` links a new recipient to the original one on EXPAND,
    REDIRECT and RESOLVE rows. `reference` names the message that made an inbox
    rule generate this one.
    """

    message_id: str
    event: str
    at: datetime
    source: str = ""
    sender: str = ""
    recipients: tuple[str, ...] = ()
    related_recipient: str | None = None
    reference: str | None = None
    internal_message_id: str | None = None
    subject: str | None = None


@dataclass(frozen=True)
class ForwardingRule:
    """A rule of a mailbox that sends its mail on: a redirect or a forward."""

    mailbox: str
    targets: tuple[str, ...]
    kind: str = "redirect"


def required_message_id(message_id: str, platform: str) -> str:
    """Return the Message-ID without surrounding white space and angle brackets.

    Raises `PermanentError` for an empty id, because no search can find a message
    by it.
    """
    bare = message_id.strip()
    if bare.startswith("<") and bare.endswith(">"):
        bare = bare[1:-1].strip()
    if not bare:
        raise PermanentError(
            f"The Message-ID {message_id!r} is empty; an alert must name a message.",
            platform=platform,
        )
    return bare


class MailPlatform(abc.ABC):
    """Async access to the mailboxes of one platform and tenant."""

    name: str = "unknown"
    # Called once for every response in which the platform asked the client to slow
    # down, including those that a client library retried by itself, so that
    # throttling shows even when no pull failed. The worker sets it to count
    # throttling in its metrics.
    throttle_listener: Callable[[], None] | None = None

    def report_throttled(self) -> None:
        """Tell the throttle listener, if any, that a response asked to slow down."""
        if self.throttle_listener is not None:
            self.throttle_listener()

    @abc.abstractmethod
    async def find(self, mailbox: str, message_id: str) -> list[MessageCopy]:
        """Find every copy of `message_id` (bare form) in all folders of `mailbox`."""

    @abc.abstractmethod
    async def quarantine(
        self, mailbox: str, message_id: str, incident_id: str
    ) -> QuarantineResult:
        """Take every copy out of the user's reach into quarantine, recording each.

        Raises `NotFoundError` when the mailbox holds no copy, in or out of
        quarantine, and `TransientError` or `PermanentError` on failures.
        """

    @abc.abstractmethod
    async def restore(
        self, mailbox: str, message_id: str, incident_id: str
    ) -> QuarantineResult:
        """Put every quarantined copy back in its original folder and read state."""

    async def quarantine_many(
        self, pulls: Sequence[tuple[str, str, str]]
    ) -> list[QuarantineResult | ConnectorError]:
        """Quarantine (mailbox, Message-ID, incident id) pulls; one result each.

        A failed pull is returned as its `ConnectorError`, never raised. The default
        runs `quarantine` for every pull concurrently; a platform with a cheaper
        way to pull many mailboxes at once overrides it.
        """

        async def one(pull: tuple[str, str, str]) -> QuarantineResult | ConnectorError:
            try:
                return await self.quarantine(*pull)
            except ConnectorError as error:
                return error

        return list(await asyncio.gather(*(one(pull) for pull in pulls)))

    async def search(self, mailbox: str, search: MessageSearch) -> list[MessageCopy]:
        """Find the copies, in all folders, of the messages that match `search`.

        Each copy carries its own bare Message-ID ("" when the message has none), so
        the caller can tell one message in several folders from several messages.
        """
        raise NotImplementedError(
            f"{self.name} cannot search by sender, subject and delivery time yet."
        )

    async def sent_since(self, mailbox: str, since: datetime) -> list[SentMessage]:
        """List the messages `mailbox` sent since `since`, for forward tracing."""
        raise NotImplementedError(f"{self.name} does not list sent messages yet.")

    async def message_trace(self, message_id: str, since: datetime) -> list[TraceEvent]:
        """Return the platform's message trace rows of `message_id` since `since`.

        Platforms without a message trace return no rows.
        """
        return []

    async def forwarding_rules(self, mailbox: str) -> list[ForwardingRule]:
        """Return the rules of `mailbox` that redirect or forward its mail.

        Platforms that cannot read such rules return none.
        """
        return []

    async def close(self) -> None:  # noqa: B027 - optional hook, empty by default
        """Release connections; the default has nothing to release."""
