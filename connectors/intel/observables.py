"""The indicators an alert names: what `lookup_alert` looks up."""

from __future__ import annotations

from email.utils import parseaddr
from typing import Any
from urllib.parse import urlsplit

from autopull.connectors.intel import IndicatorKind
from autopull.connectors.intel.indicators import guess_kind

Observable = tuple[IndicatorKind, str]


def alert_observables(alert: dict[str, Any]) -> list[Observable]:
    """Return the (kind, value) pairs of a NormalizedAlert dict, without repeats.

    The pairs come from the sender IP, the domains of the envelope sender and the
    From header, each URL and its host, and the MD5 and SHA-256 of each attachment.
    Each threat value is taken by its shape: a URL and its host, an IP, a hash, the
    domain of an address, or a host name. Missing and empty fields are skipped.
    """
    found: dict[Observable, None] = {}

    def add(kind: IndicatorKind, value: str | None) -> None:
        if value and value.strip():
            found[(kind, value.strip())] = None

    add("ip", alert.get("sender_ip"))
    add("host", _address_domain(alert.get("sender")))
    add("host", _address_domain(parseaddr(alert.get("header_from") or "")[1]))

    for url in alert.get("urls") or ():
        add("url", url)
        add("host", _url_host(url))
    for attachment in alert.get("attachments") or ():
        add("hash", attachment.get("md5"))
        add("hash", attachment.get("sha256"))
    for threat in alert.get("threats") or ():
        for kind, value in _threat_observables(threat.get("value") or ""):
            add(kind, value)
    return list(found)


def _threat_observables(value: str) -> list[Observable]:
    text = value.strip()
    if not text:
        return []
    kind = guess_kind(text)
    if kind == "url":
        return [("url", text), ("host", _url_host(text) or "")]
    if kind == "host" and "@" in text:
        return [("host", _address_domain(text) or "")]
    return [(kind, text)]


def _address_domain(address: str | None) -> str | None:
    if not address or "@" not in address:
        return None
    return address.rpartition("@")[2].strip().strip(">")


def _url_host(url: str) -> str | None:
    try:
        return urlsplit(url.strip()).hostname
    except ValueError:
        return None
