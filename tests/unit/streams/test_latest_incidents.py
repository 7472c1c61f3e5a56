"""The read model's incidents, kept encoded until read."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from autopull.schemas import AvroCodec
from autopull.streams.api import LatestIncidents
from autopull.streams.incidents import new_incident

OPENED = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def incident(incident_id: str, title: str = "") -> dict[str, object]:
    value = new_incident(incident_id, "campaign-1", OPENED)
    value["title"] = title
    return value


@pytest.fixture
def codec() -> AvroCodec:
    return AvroCodec("Incident")


def test_latest_incidents_returns_last_put(codec: AvroCodec) -> None:
    incidents = LatestIncidents(codec)

    incidents.put("INC-1", codec.dumps(incident("INC-1", "first")))
    incidents.put("INC-1", codec.dumps(incident("INC-1", "second")))

    assert incidents["INC-1"]["title"] == "second"
    assert incidents["INC-1"] == incident("INC-1", "second")


def test_latest_incidents_lists_every_id(codec: AvroCodec) -> None:
    incidents = LatestIncidents(codec)

    for incident_id in ("INC-1", "INC-2", "INC-3"):
        incidents.put(incident_id, codec.dumps(incident(incident_id)))

    assert sorted(incidents) == ["INC-1", "INC-2", "INC-3"]
    assert len(incidents) == 3
    assert "INC-2" in incidents
    assert "INC-4" not in incidents
    assert incidents.get("INC-4") is None


def test_unreadable_record_keeps_read_state(
    codec: AvroCodec, caplog: pytest.LogCaptureFixture
) -> None:
    incidents = LatestIncidents(codec)
    incidents.put("INC-1", codec.dumps(incident("INC-1", "readable")))
    assert incidents["INC-1"]["title"] == "readable"

    incidents.put("INC-1", b"\xc3\x01not an incident")

    assert incidents["INC-1"]["title"] == "readable"
    assert "unreadable record on the incidents topic incident_id=INC-1" in caplog.text


def test_unreadable_first_record_is_missing(codec: AvroCodec) -> None:
    incidents = LatestIncidents(codec)

    incidents.put("INC-1", b"garbage")

    assert "INC-1" not in incidents
    assert len(incidents) == 0
