"""Routing of each mailbox to the mail platform that serves it.

The routing table maps an exact address or a domain to a platform name (graph,
ews, gmail, imap), so one deployment serves a hybrid organisation. An address wins
over its domain. With one platform configured and no table, every mailbox goes there.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from autopull.connectors.mail.base import MailPlatform
from autopull.streams.settings import Settings


def configured_platforms(settings: Settings) -> list[str]:
    """Return the names of the platforms that have settings."""
    names = []
    for name in ("graph", "ews", "gmail", "imap"):
        if getattr(settings, name) is not None:
            names.append(name)
    return names


def platform_name(settings: Settings, mailbox: str) -> str | None:
    """Return the platform of `mailbox` by the routing table, or None."""
    address = mailbox.strip().lower()
    routes = {key.strip().lower(): value for key, value in settings.routing.items()}
    if address in routes:
        return routes[address]
    domain = address.rpartition("@")[2]
    while domain:
        if domain in routes:
            return routes[domain]
        domain = domain.partition(".")[2]
    configured = configured_platforms(settings)
    return configured[0] if len(configured) == 1 and not routes else None


def routing_warning(settings: Settings) -> str | None:
    """Return a warning when every address, external ones too, goes to one platform.

    Without a routing table, the one configured platform gets every mailbox, so a
    pull for an address of another organisation is sent to it and fails there,
    and forward tracing counts forwards to such an address as internal.
    """
    configured = configured_platforms(settings)
    if settings.routing or len(configured) != 1:
        return None
    return (
        f"The routing table is empty, so every address is taken to be a mailbox on "
        f"{configured[0]}, external ones included. Set AUTOPULL_ROUTING (or "
        f"`routing` in the settings file) to your domains, such as "
        f'{{"example.com": "{configured[0]}"}}.'
    )


def _create(settings: Settings, name: str) -> MailPlatform | None:
    if name == "graph" and settings.graph is not None:
        from autopull.connectors.mail.graph import GraphPlatform

        return GraphPlatform(settings.graph)
    if name == "ews" and settings.ews is not None:
        from autopull.connectors.mail.ews import EwsPlatform

        return EwsPlatform(settings.ews)
    if name == "gmail" and settings.gmail is not None:
        from autopull.connectors.mail.gmail import GmailPlatform

        return GmailPlatform(settings.gmail)
    if name == "imap" and settings.imap is not None:
        from autopull.connectors.mail import imap

        platform_class = getattr(imap, "ImapPlatform", None)
        if platform_class is not None:
            created: MailPlatform = platform_class(settings.imap)
            return created
    return None


def build_router(
    settings: Settings,
    platforms: dict[str, MailPlatform],
    on_throttled: Callable[[str], None] | None = None,
) -> Callable[[str], MailPlatform | None]:
    """Return a function that maps a mailbox to its platform, creating each once.

    `on_throttled`, when given, is called with the platform's name for every
    response in which a created platform asked to slow down.
    """

    def route(mailbox: str) -> MailPlatform | None:
        name = platform_name(settings, mailbox)
        if name is None:
            return None
        if name not in platforms:
            platform = _create(settings, name)
            if platform is None:
                return None
            if on_throttled is not None:
                platform.throttle_listener = partial(on_throttled, platform.name)
            platforms[name] = platform
        return platforms[name]

    return route
