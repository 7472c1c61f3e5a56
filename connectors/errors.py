"""Errors raised by every connector, classified once at the connector boundary.

Callers decide what to do from the class alone: retry a `TransientError` after
`retry_after` seconds, report a `PermanentError` as failed, and treat `NotFoundError`
and `AlreadyDoneError` as final answers. No foreign exception crosses a connector.
"""

from __future__ import annotations


class AutopullError(Exception):
    """Root of every error Autopull raises on purpose."""


class ConnectorError(AutopullError):
    """An external system refused or failed a request.

    `mailbox_missing` is True when the platform reported that the mailbox itself
    does not exist (no such user or mailbox), which a search of that mailbox
    would report again. Adapters set it next to the class they choose.
    """

    retriable = False

    def __init__(
        self,
        message: str,
        *,
        mailbox: str | None = None,
        message_id: str | None = None,
        platform: str | None = None,
        mailbox_missing: bool = False,
    ) -> None:
        super().__init__(message)
        self.mailbox = mailbox
        self.message_id = message_id
        self.platform = platform
        self.mailbox_missing = mailbox_missing


class TransientError(ConnectorError):
    """A failure that goes away by itself: throttling, timeouts, 5xx answers."""

    retriable = True

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        mailbox: str | None = None,
        message_id: str | None = None,
        platform: str | None = None,
    ) -> None:
        super().__init__(
            message, mailbox=mailbox, message_id=message_id, platform=platform
        )
        self.retry_after = retry_after


class ThrottledError(TransientError):
    """The platform asked us to slow down; `retry_after` is its requested wait."""


class PermanentError(ConnectorError):
    """A failure that repeats on retry: bad credentials, missing rights, bad input."""


class NotFoundError(ConnectorError):
    """The mailbox or the message does not exist."""


class AlreadyDoneError(ConnectorError):
    """The requested change is already in place, for example a quarantined copy."""
