"""Enrichment of normalized alerts.

For now recipients stand for themselves and no intelligence is consulted; the
campaign key already follows its final rule so incidents group the same way later.
"""

from __future__ import annotations

import hashlib
from urllib.parse import urlsplit

from autopull.streams.records import Record


def campaign_key(alert: Record) -> str:
    """Return the key that groups alerts about one threat into one incident.

    The TAP campaign id wins. Otherwise a fingerprint of the threat (malicious URL
    host and path, attachment hashes, sender domain) lets alerts from different
    sources about the same threat join; a message without any of these groups by
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


def enrich(alert: Record) -> Record:
    """Build the EnrichedAlert for `alert`, each recipient standing for itself."""
    addresses = list(alert.get("recipients", []))
    if alert.get("clicker") and alert["clicker"] not in addresses:
        addresses.append(alert["clicker"])
    recipients = [
        {
            "address": address,
            "mailbox": address,
            "recipient_type": "original",
            "path": [address],
            "vip": False,
            "attributes": {},
        }
        for address in addresses
    ]
    return {
        "alert": alert,
        "campaign_key": campaign_key(alert),
        "intel_hits": [],
        "recipients": recipients,
        "unavailable": [],
    }
