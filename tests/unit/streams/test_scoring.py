"""The threat score: the points of each factor and how they change as alerts join."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from autopull.streams.incidents import apply_alert, new_incident
from autopull.streams.policy import PolicySettings, decide
from autopull.streams.scoring import (
    FACTORS,
    MAX_SCORE,
    score_alert,
    score_single_alert,
    total,
)

RECEIVED = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)


def enriched(
    alert_id: str = "tap:1",
    recipients: tuple[str, ...] = ("alice@example.com",),
    vips: tuple[str, ...] = (),
    hits: tuple[tuple[str, int], ...] = (),
    **changes: Any,
) -> dict[str, Any]:
    alert = {
        "alert_id": alert_id,
        "source": "tap",
        "event_class": "message_delivered",
        "message_id": "m1@example.net",
        "message_id_synthetic": False,
        "recipients": list(recipients),
        "sender": "billing@example.net",
        "classification": "phish",
        "threat_status": "active",
        "severity": None,
        "received_at": RECEIVED,
        **changes,
    }
    return {
        "alert": alert,
        "campaign_key": "campaign:c1",
        "intel_hits": [
            {"indicator": indicator, "kind": "url", "source": "feed", "confidence": c}
            for indicator, c in hits
        ],
        "recipients": [
            {"mailbox": mailbox, "vip": mailbox in vips, "attributes": {}}
            for mailbox in recipients
        ],
    }


def points(value: dict[str, Any], mailboxes: int = 1, vips: int = 0) -> dict[str, int]:
    return score_alert(
        {},
        value,
        [f"user{index}@example.com" for index in range(mailboxes)],
        [f"user{index}@example.com" for index in range(vips)],
    )


@pytest.mark.parametrize(
    ("classification", "expected"),
    [("malware", 40), ("phish", 30), ("impostor", 30), ("spam", 5), ("unknown", 0)],
)
def test_classification_points(classification: str, expected: int) -> None:
    assert points(enriched(classification=classification))["classification"] == expected


@pytest.mark.parametrize(
    ("severity", "expected"),
    [("CRIT", 20), ("High", 15), ("majr", 15), ("medium", 10), ("low", 5), (None, 0)],
)
def test_severity_points(severity: str | None, expected: int) -> None:
    assert points(enriched(severity=severity))["severity"] == expected


@pytest.mark.parametrize(
    ("status", "expected"),
    [("active", 10), ("unknown", 5), ("cleared", 0), ("false_positive", 0)],
)
def test_threat_status_points(status: str, expected: int) -> None:
    assert points(enriched(threat_status=status))["threat_status"] == expected


def test_permitted_click_points_add_up_to_cap() -> None:
    click = enriched(event_class="click_permitted")
    factors: dict[str, int] = {}
    seen = []
    for _ in range(3):
        factors = score_alert(factors, click, ["alice@example.com"], [])
        seen.append(factors["clicks"])

    assert seen == [15, 30, 30]


def test_blocked_click_adds_nothing() -> None:
    assert points(enriched(event_class="click_blocked"))["clicks"] == 0


@pytest.mark.parametrize(("vips", "expected"), [(0, 0), (1, 10), (3, 30), (5, 30)])
def test_vip_points_per_mailbox(vips: int, expected: int) -> None:
    assert points(enriched(), mailboxes=5, vips=vips)["vip_recipients"] == expected


def test_intel_hits_count_confident_indicators() -> None:
    hits = (("a.example", 90), ("b.example", 50), ("c.example", 49), ("a.example", 80))

    assert points(enriched(hits=hits))["intel_hits"] == 20
    assert points(enriched(hits=(("a.example", 60),)))["intel_hits"] == 10
    assert points(enriched(hits=(("a.example", 10),)))["intel_hits"] == 0


@pytest.mark.parametrize(
    ("mailboxes", "expected"),
    [(1, 0), (2, 5), (9, 5), (10, 10), (49, 10), (50, 20), (5000, 20)],
)
def test_campaign_size_points(mailboxes: int, expected: int) -> None:
    assert points(enriched(), mailboxes=mailboxes)["campaign_size"] == expected


def test_factors_keep_highest_points() -> None:
    first = score_alert({}, enriched(classification="malware"), ["a@example.com"], [])
    second = score_alert(first, enriched(classification="spam"), ["a@example.com"], [])

    assert second["classification"] == 40


def test_total_sums_every_factor() -> None:
    factors = dict.fromkeys(FACTORS, 1)

    assert total(factors) == len(FACTORS)
    assert MAX_SCORE == 40 + 20 + 10 + 30 + 30 + 20 + 20


def test_single_alert_score() -> None:
    alert = enriched(recipients=("a@example.com", "b@example.com"))["alert"]

    # phish 30, active 10, two mailboxes 5.
    assert score_single_alert(alert) == 45


def pull_all(alert: dict[str, Any], recipients: list[dict[str, Any]]) -> Any:
    return decide(alert, recipients, PolicySettings())


def test_incident_score_updates_as_alerts_join() -> None:
    incident = new_incident("INC-1", "campaign:c1", RECEIVED)

    apply_alert(incident, enriched("tap:1", ("alice@example.com",)), pull_all)
    first = incident["score"]
    apply_alert(
        incident,
        enriched(
            "tap:2",
            ("bob@example.com", "ceo@example.com"),
            vips=("ceo@example.com",),
            classification="malware",
        ),
        pull_all,
    )

    assert first == 30 + 10
    assert incident["score_factors"] == {
        "classification": 40,
        "severity": 0,
        "threat_status": 10,
        "clicks": 0,
        "vip_recipients": 10,
        "intel_hits": 0,
        "campaign_size": 5,
    }
    assert incident["score"] == 65
    ceo = next(p for p in incident["pulls"] if p["mailbox"] == "ceo@example.com")
    assert ceo["vip"] is True


def test_replayed_alert_keeps_score() -> None:
    incident = new_incident("INC-1", "campaign:c1", RECEIVED)
    click = enriched("tap:click", event_class="click_permitted")

    apply_alert(incident, click, pull_all)
    apply_alert(incident, click, pull_all)

    assert incident["score_factors"]["clicks"] == 15
