"""The Avro table's size limit and its topics' record sizes."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from autopull.schemas import AvroCodec
from autopull.streams.app import AvroTable, RecordTooLargeError
from autopull.streams.incidents import new_incident
from autopull.streams.settings import MIB, Settings
from autopull.streams.topics import topic_specs

OPENED = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def test_put_over_limit_leaves_table_unchanged():
    codec = AvroCodec("Incident")
    small = new_incident("INC-1", "campaign-1", OPENED)
    table: dict[str, bytes] = {}
    limit = len(codec.dumps(small)) + 100
    avro = AvroTable(
        table,  # type: ignore[arg-type]
        codec,
        kept_records=4,
        max_bytes=limit,
        max_bytes_setting="AUTOPULL_INCIDENT_MAX_BYTES",
    )
    stored = avro.put("INC-1", small)

    large = avro.take("INC-1")
    assert large is not None
    large["title"] = "x" * 200
    with pytest.raises(RecordTooLargeError) as raised:
        avro.put("INC-1", large)

    assert raised.value.key == "INC-1"
    assert raised.value.limit == limit
    assert raised.value.size > limit
    assert "AUTOPULL_INCIDENT_MAX_BYTES" in str(raised.value)
    assert table == {"INC-1": stored}
    # The change that failed is not handed out again: the stored record is.
    again = avro.take("INC-1")
    assert again is not None
    assert again["title"] == ""
    assert again is not large


def test_encode_then_store_keeps_record():
    codec = AvroCodec("Incident")
    incident = new_incident("INC-1", "campaign-1", OPENED)
    table: dict[str, bytes] = {}
    limit = len(codec.dumps(incident)) + 100
    avro = AvroTable(table, codec, kept_records=4, max_bytes=limit)  # type: ignore[arg-type]

    data = avro.encode("INC-1", incident)
    assert table == {}
    avro.store("INC-1", incident, data)

    assert table == {"INC-1": data}
    assert data == codec.dumps(incident)
    assert avro.take("INC-1") is incident
    incident["title"] = "x" * 200
    with pytest.raises(RecordTooLargeError):
        avro.encode("INC-1", incident)
    assert table == {"INC-1": data}


def test_every_topic_takes_largest_record():
    settings = Settings(incident_max_bytes=32 * MIB)
    assert settings.max_record_bytes == 33 * MIB
    for spec in topic_specs(settings):
        assert spec.config["max.message.bytes"] == str(33 * MIB), spec.name


def test_record_limit_covers_raw_alerts():
    settings = Settings(ingest_max_bytes=8 * MIB)
    assert settings.max_record_bytes == 33 * MIB


def test_compacted_topics_roll_segments_for_compaction():
    settings = Settings()
    specs = {spec.name: spec.config for spec in topic_specs(settings)}
    assert specs["incidents"]["segment.bytes"] == str(128 * MIB)
    assert specs["exposures"]["segment.bytes"] == str(128 * MIB)
    assert "segment.bytes" not in specs["alerts.raw"]
    large = Settings(incident_max_bytes=64 * MIB)
    assert large.compacted_segment_bytes == 4 * 65 * MIB
