"""Errors raised while reading alerts from a detection source."""

from __future__ import annotations

from autopull.connectors.errors import AutopullError


class InvalidAlertError(AutopullError):
    """An alert body that cannot be used: not JSON, wrong shape or a bad field.

    `reason` is a sentence that names the field, the value and what was expected.
    An invalid alert never becomes correct on retry, so callers send it to the dead
    letter topic with this reason.
    """

    def __init__(self, reason: str, *, field: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field


class UnknownFormatError(AutopullError):
    """A source format name that no parser is registered for."""

    def __init__(self, name: str, known: tuple[str, ...]) -> None:
        super().__init__(
            f"The alert format {name!r} is unknown. Use one of: {', '.join(known)}."
        )
        self.name = name
        self.known = known
