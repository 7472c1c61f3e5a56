"""The threat score of an incident, updated as alerts join it.

The score is the sum of the points of seven factors, and the incident keeps the
points of each factor in `score_factors`, so a reader sees why it scored what it
did. docs/scoring.md lists the points. Each factor keeps the highest points any
alert gave it, except clicks, which add up, and VIP recipients and campaign size,
which are counted over the incident's mailboxes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from autopull.streams.records import Record

CLASSIFICATION_POINTS = {
    "malware": 40,
    "phish": 30,
    "impostor": 30,
    "spam": 5,
    "unknown": 0,
}
# Severity words of the sources, lower-cased: FireEye writes crit, majr and minr,
# the generic format takes any word.
SEVERITY_POINTS = {
    "critical": 20,
    "crit": 20,
    "high": 15,
    "major": 15,
    "majr": 15,
    "medium": 10,
    "moderate": 10,
    "minor": 5,
    "minr": 5,
    "low": 5,
}
THREAT_STATUS_POINTS = {"active": 10, "unknown": 5, "cleared": 0, "false_positive": 0}
CLICK_POINTS = 15
MAX_CLICK_POINTS = 30
VIP_POINTS = 10
MAX_VIP_POINTS = 30
INTEL_POINTS = 10
MAX_INTEL_POINTS = 20
# Intelligence hits below this confidence (0 to 100) add nothing.
MIN_INTEL_CONFIDENCE = 50
# Campaign size points: (at least this many mailboxes, points), largest first.
CAMPAIGN_SIZE_POINTS = ((50, 20), (10, 10), (2, 5), (0, 0))

FACTORS = (
    "classification",
    "severity",
    "threat_status",
    "clicks",
    "vip_recipients",
    "intel_hits",
    "campaign_size",
)
MAX_SCORE = (
    max(CLASSIFICATION_POINTS.values())
    + max(SEVERITY_POINTS.values())
    + max(THREAT_STATUS_POINTS.values())
    + MAX_CLICK_POINTS
    + MAX_VIP_POINTS
    + MAX_INTEL_POINTS
    + CAMPAIGN_SIZE_POINTS[0][1]
)


def score_alert(
    factors: Mapping[str, int],
    enriched: Record,
    mailboxes: Iterable[str],
    vip_mailboxes: Iterable[str],
) -> dict[str, int]:
    """Return the points of each factor once `enriched` has joined the incident.

    `factors` are the points before the alert. `mailboxes` and `vip_mailboxes` are
    the distinct mailboxes of the incident with this alert's recipients, and those
    of them that the directory marks as VIP.
    """
    alert = enriched["alert"]
    alert_points = {
        "classification": CLASSIFICATION_POINTS.get(alert.get("classification"), 0),
        "severity": SEVERITY_POINTS.get((alert.get("severity") or "").lower(), 0),
        "threat_status": THREAT_STATUS_POINTS.get(alert.get("threat_status"), 0),
        "intel_hits": _intel_points(enriched.get("intel_hits", [])),
    }
    updated = {
        name: max(factors.get(name, 0), alert_points[name]) for name in alert_points
    }

    clicks = factors.get("clicks", 0)
    if alert.get("event_class") == "click_permitted":
        clicks = min(clicks + CLICK_POINTS, MAX_CLICK_POINTS)
    updated["clicks"] = clicks
    updated["vip_recipients"] = min(
        len(set(vip_mailboxes)) * VIP_POINTS, MAX_VIP_POINTS
    )
    updated["campaign_size"] = _size_points(len(set(mailboxes)))
    return {name: updated[name] for name in FACTORS}


def score_single_alert(alert: Mapping[str, Any]) -> int:
    """Return the score of an incident that only `alert` joined, without enrichment.

    No intelligence hits and no VIP recipients are known then.
    """
    enriched = {"alert": alert, "intel_hits": [], "recipients": []}
    mailboxes = [mailbox.lower() for mailbox in alert.get("recipients", [])]
    return total(score_alert({}, enriched, mailboxes, []))


def total(factors: Mapping[str, int]) -> int:
    """Return the score: the sum of the points of every factor."""
    return sum(factors.get(name, 0) for name in FACTORS)


def _intel_points(hits: Iterable[Mapping[str, Any]]) -> int:
    indicators = {
        hit["indicator"]
        for hit in hits
        if hit.get("confidence", 0) >= MIN_INTEL_CONFIDENCE
    }
    return min(len(indicators) * INTEL_POINTS, MAX_INTEL_POINTS)


def _size_points(count: int) -> int:
    for at_least, points in CAMPAIGN_SIZE_POINTS:
        if count >= at_least:
            return points
    return 0
