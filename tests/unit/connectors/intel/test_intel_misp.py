from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from autopull.connectors.intel import FeedSettings
from autopull.connectors.intel.exceptions import FeedError
from autopull.connectors.intel.feeds import FeedReport, read_feed
from autopull.connectors.intel.store import IndicatorStore, StoreBuilder

DATA = Path(__file__).parent / "data"
NOW = 1_750_000_000.0
EVENT = json.loads((DATA / "misp_event.json").read_text())


def load(feed: FeedSettings) -> tuple[FeedReport, IndicatorStore]:
    builder = StoreBuilder()
    report = read_feed(feed, builder, now=NOW)
    return report, builder.build(lambda: NOW)


def write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "misp.json"
    path.write_text(json.dumps(data))
    return path


def test_misp_event_attributes_and_objects() -> None:
    report, _ = load(FeedSettings(path=DATA / "misp_event.json", source="misp"))

    assert report.format == "misp"
    assert report.accepted == {"ip": 3, "host": 3, "url": 1, "hash": 6}
    assert report.skipped == {
        "to_ids is false": 2,
        "deleted": 1,
        "type email-src is not read": 1,
    }
    assert report.rejected == 1
    assert "198.51.100.999" in report.rejections[0].reason


def test_misp_composite_values_split() -> None:
    _, store = load(FeedSettings(path=DATA / "misp_event.json"))

    assert len(store.lookup_ip("203.0.113.45")) == 1
    assert len(store.lookup_ip("192.0.2.77")) == 1
    assert len(store.lookup_host("mx.bulk-sender.example.net")) == 1
    digest = "d7a8fbb307d7809469ca9abcb0082e4f8d5651e46d3cdb762d02d0bf37c9e592"
    assert len(store.lookup_hash(digest)) == 1


def test_misp_confidence_from_tags() -> None:
    _, store = load(FeedSettings(path=DATA / "misp_event.json", confidence=10))

    assert store.lookup_host("invoice-portal.example.com")[0]["confidence"] == 100
    assert store.lookup_ip("198.51.100.23")[0]["confidence"] == 75
    assert store.lookup_hash("e4d909c290d0fb1ca068ffaddf22cbd0")[0]["confidence"] == 25


def test_misp_to_ids_only_off_reads_context_attributes() -> None:
    feed = FeedSettings(path=DATA / "misp_event.json", misp_to_ids_only=False)
    report, store = load(feed)

    assert len(store.lookup_ip("192.0.2.10")) == 1
    assert report.skipped["type filename is not read"] == 1


@pytest.mark.parametrize(
    "layout",
    [
        [EVENT],
        {"response": [EVENT]},
        EVENT["Event"],
        {"response": {"Attribute": EVENT["Event"]["Attribute"]}},
    ],
)
def test_misp_other_layouts(tmp_path: Path, layout: Any) -> None:
    report, store = load(FeedSettings(path=write(tmp_path, layout), format="misp"))

    assert report.accepted["ip"] >= 3
    assert len(store.lookup_ip("198.51.100.23")) == 1


def test_misp_event_without_tag_uses_feed_confidence(tmp_path: Path) -> None:
    event = {
        "Event": {
            "uuid": "e1",
            "Attribute": [{"type": "ip-dst", "value": "198.51.100.40", "to_ids": True}],
        }
    }

    _, store = load(FeedSettings(path=write(tmp_path, event), confidence=42))

    assert store.lookup_ip("198.51.100.40")[0]["confidence"] == 42


def test_misp_malformed_entries_rejected_not_fatal(tmp_path: Path) -> None:
    event = {
        "Event": {
            "uuid": "e1",
            "Attribute": [
                "not an object",
                {"type": "filename|sha256", "value": "only-a-name.exe", "to_ids": True},
                {"type": "ip-dst", "value": "198.51.100.41", "to_ids": True},
            ],
        }
    }

    report, store = load(FeedSettings(path=write(tmp_path, event)))

    assert report.rejected == 2
    assert "first|second" in report.rejections[1].reason
    assert len(store.lookup_ip("198.51.100.41")) == 1


def test_misp_wrong_shape_raises(tmp_path: Path) -> None:
    path = write(tmp_path, {"Events": []})

    with pytest.raises(FeedError, match="not MISP event JSON"):
        load(FeedSettings(path=path, format="misp"))
