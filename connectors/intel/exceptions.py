"""Errors raised while reading indicator feeds and looking indicators up."""

from __future__ import annotations

from pathlib import Path

from autopull.connectors.errors import AutopullError, TransientError


class InvalidIndicatorError(AutopullError, ValueError):
    """A value that is not a valid indicator of the kind it was given as.

    `reason` is a sentence naming the value and what was expected. Feed readers
    record it as the reason of a rejected line; lookups raise it for input that
    cannot be normalized.
    """

    def __init__(self, reason: str, *, kind: str, value: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind
        self.value = value


class FeedError(AutopullError):
    """A feed file that cannot be read as a whole: missing, unreadable or malformed.

    A malformed line or object does not raise it: the readers reject and count such
    entries in the feed's report.
    """

    def __init__(self, reason: str, *, path: Path) -> None:
        super().__init__(reason)
        self.reason = reason
        self.path = path


class ProviderUnavailableError(TransientError):
    """An online provider that is not asked because its circuit is open.

    `retry_after` is the number of seconds until a trial request is allowed.
    """
