"""Enrichment of normalized alerts: recipients resolved and expanded, intel hits.

With a directory configured, each recipient is resolved through its aliases to
the primary mailbox, and a distribution list is expanded to its members, each with
the path by which it was reached. Without one, each recipient stands for itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Protocol
from urllib.parse import urlsplit

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    wait_exponential,
)

from autopull.connectors.directory import Expansion, Person
from autopull.connectors.errors import TransientError
from autopull.streams.records import Record

log = logging.getLogger(__name__)

# Attribute set on the members of a list too large to pull from without approval.
LIST_TOO_LARGE = "list_too_large"
# Directory look-ups between two yields to the event loop. A cached look-up
# returns without suspending, so an alert to tens of thousands of cached
# recipients would otherwise hold the loop for all of them.
LOOKUPS_PER_YIELD = 500


class DirectoryLike(Protocol):
    """The part of the directory connector that enrichment uses."""

    async def resolve(self, address: str) -> Person | None: ...

    async def expand(self, address: str) -> Expansion: ...


class IntelAnswerLike(Protocol):
    """IntelHit records, and the names of the providers that could not be asked."""

    @property
    def hits(self) -> list[Record]: ...
    @property
    def unavailable(self) -> list[str]: ...


class IntelLike(Protocol):
    """The part of the intel lookups that enrichment uses."""

    async def lookup_alert(self, alert: Record) -> IntelAnswerLike: ...


def campaign_key(alert: Record) -> str:
    """Return the key that groups alerts about one threat into one incident.

    The TAP campaign id wins. Otherwise a fingerprint of the threat (malicious URL
    host and path, attachment hashes, sender domain) lets alerts from different
    sources about the same threat join. A message without any of these groups by
    its Message-ID.
    """
    if alert.get("campaign_id"):
        return f"campaign:{alert['campaign_id']}"

    parts = sorted(_url_fingerprint(url) for url in alert.get("urls", []))
    parts += sorted(
        attachment["sha256"].lower()
        for attachment in alert.get("attachments", [])
        if attachment.get("sha256")
    )
    if parts:
        sender = alert.get("sender") or ""
        parts.append(sender.rpartition("@")[2].lower())
        digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()
        return f"threat:{digest[:32]}"

    message_id = alert.get("message_id") or alert["alert_id"]
    return f"message:{message_id}"


def _url_fingerprint(url: str) -> str:
    split = urlsplit(url if "://" in url else f"http://{url}")
    return f"{(split.hostname or '').lower()}{split.path}"


def _addresses(alert: Record) -> list[str]:
    addresses = list(alert.get("recipients", []))
    if alert.get("clicker") and alert["clicker"] not in addresses:
        addresses.append(alert["clicker"])
    return addresses


def _recipient(
    address: str,
    mailbox: str,
    recipient_type: str,
    path: list[str],
    person: Person | None = None,
    attributes: dict[str, str] | None = None,
) -> Record:
    values = dict(attributes or {})
    if person is not None:
        for name in ("display_name", "title", "department", "manager"):
            value = getattr(person, name)
            if value:
                values[name] = value
        if person.groups:
            # Group DNs contain commas, so the attribute lists one a line.
            values["groups"] = "\n".join(person.groups)
    return {
        "address": address,
        "mailbox": mailbox,
        "recipient_type": recipient_type,
        "path": path,
        "vip": bool(person and person.vip),
        "attributes": values,
    }


async def resolve_recipients(
    addresses: list[str], directory: DirectoryLike | None
) -> list[Record]:
    """Return one Recipient record per mailbox behind `addresses`, each once."""
    if directory is None:
        return [_recipient(a, a, "original", [a]) for a in addresses]

    recipients: dict[str, Record] = {}
    for count, address in enumerate(a.strip().lower() for a in addresses):
        await _yield_periodically(count)
        person = await directory.resolve(address)
        if person is not None:
            kind = "original" if person.mailbox == address else "alias"
            path = [address] if kind == "original" else [address, person.mailbox]
            found = [_recipient(address, person.mailbox, kind, path, person)]
        else:
            found = await _expand(address, directory)
        for recipient in found:
            recipients.setdefault(recipient["mailbox"], recipient)
    return list(recipients.values())


async def _expand(address: str, directory: DirectoryLike) -> list[Record]:
    expansion = await directory.expand(address)
    if expansion.kind != "list" or not expansion.members:
        return [_recipient(address, address, "original", [address])]

    attributes = {"list": address}
    if expansion.too_large:
        attributes[LIST_TOO_LARGE] = "true"
    found = []
    for count, member in enumerate(expansion.members):
        await _yield_periodically(count)
        person = await directory.resolve(member.mailbox)
        found.append(
            _recipient(
                address,
                member.mailbox,
                "list_member",
                list(member.path),
                person,
                attributes,
            )
        )
    return found


async def _yield_periodically(count: int) -> None:
    if count and count % LOOKUPS_PER_YIELD == 0:
        await asyncio.sleep(0)


async def enrich(
    alert: Record,
    directory: DirectoryLike | None = None,
    intel: IntelLike | None = None,
) -> Record:
    """Build the EnrichedAlert for `alert`.

    An intel provider that cannot be asked does not stop the alert: its name goes
    into `unavailable` and the hits of the other sources are kept.
    """
    recipients = await resolve_recipients(_addresses(alert), directory)
    hits: list[Record] = []
    unavailable: list[str] = []
    if intel is not None:
        answer = await intel.lookup_alert(alert)
        hits, unavailable = list(answer.hits), list(answer.unavailable)
    return {
        "alert": alert,
        "campaign_key": campaign_key(alert),
        "intel_hits": hits,
        "recipients": recipients,
        "unavailable": unavailable,
    }


def _log_retry(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    log.warning(
        "Enrichment failed, retrying attempt=%d error=%s", state.attempt_number, error
    )


async def enrich_until_done(
    alert: Record,
    directory: DirectoryLike | None = None,
    intel: IntelLike | None = None,
    max_wait_seconds: float = 60.0,
) -> Record:
    """Enrich `alert`, retrying transient failures with backoff until it succeeds.

    An unreachable directory slows the stream down: the alert waits, and it is
    never dropped or pulled from a mailbox the directory did not name.
    """
    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type(TransientError),
        wait=wait_exponential(multiplier=0.5, max=max_wait_seconds),
        before_sleep=_log_retry,
    ):
        with attempt:
            return await enrich(alert, directory, intel)
    raise AssertionError("unreachable: tenacity retries until success")
