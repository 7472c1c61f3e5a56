"""Errors raised by every connector, classified once at the connector boundary.

Callers decide what to do from the class alone: retry a `TransientError` after
`retry_after` seconds, report a `PermanentError` as failed, and treat `NotFoundError`
and `AlreadyDoneError` as final answers. No foreign exception crosses a connector.
"""

from __future__ import annotations


class AutopullError(Exception):
    """Root of every error Autopull raises on purpose."""


class ConnectorError(AutopullError):
    """An external system refused or failed a request."""

    retriable = False

    def __init__(
        self,
        message: str,
        *,
        mailbox: str | None = None,
        message_id: str | None = None,
        platform: str | None = None,
    ) -> None:
        super().__init__(message)
        self.mailbox = mailbox
        self.message_id = message_id
        self.platform = platform


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
