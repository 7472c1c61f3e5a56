"""Which mail platform serves a mailbox.

One Microsoft 365 tenant for now; a routing table by mailbox and domain will let
one deployment serve Exchange, Microsoft 365, Gmail and IMAP side by side.
"""

from __future__ import annotations

from collections.abc import Callable

from autopull.connectors.mail.base import MailPlatform
from autopull.streams.settings import Settings


def build_router(
    settings: Settings, platforms: dict[str, MailPlatform]
) -> Callable[[str], MailPlatform | None]:
    """Return a function that maps a mailbox to its platform, creating it once."""

    def route(mailbox: str) -> MailPlatform | None:
        if settings.graph is None:
            return None
        if "graph" not in platforms:
            from autopull.connectors.mail.graph import GraphPlatform

            platforms["graph"] = GraphPlatform(settings.graph)
        return platforms["graph"]

    return route
