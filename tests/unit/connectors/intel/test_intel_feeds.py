from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autopull.connectors.intel import FeedSettings, IntelSettings
from autopull.connectors.intel.exceptions import FeedError
from autopull.connectors.intel.feeds import (
    MAX_KEPT_REJECTIONS,
    FeedReader,
    FeedReport,
    parse_time,
    read_feed,
)
from autopull.connectors.intel.misp import read_misp
from autopull.connectors.intel.stix import read_bundle
from autopull.connectors.intel.store import IndicatorStore, StoreBuilder

DATA = Path(__file__).parent / "data"
NOW = 1_750_000_000.0  # 2025-06-15


def load(feed: FeedSettings) -> tuple[FeedReport, IndicatorStore]:
    builder = StoreBuilder()
    report = read_feed(feed, builder, now=NOW)
    return report, builder.build(lambda: NOW)


def reasons(report: FeedReport) -> dict[str, str]:
    return {rejection.location: rejection.reason for rejection in report.rejections}


def test_intel_settings_plain_path_becomes_feed() -> None:
    feeds = ["feeds/a.csv", {"path": "b.json", "format": "stix"}]

    settings = IntelSettings.model_validate({"feeds": feeds})

    assert settings.feeds[0] == FeedSettings(path=Path("feeds/a.csv"))
    assert settings.feeds[1].format == "stix"
    assert settings.feeds[0].source_name == "a"


def test_csv_feed_counts_and_rejections() -> None:
    report, _ = load(FeedSettings(path=DATA / "indicators.csv"))

    assert report.format == "csv"
    assert report.accepted == {"ip": 3, "host": 2, "url": 1, "hash": 2}
    assert report.rejected == 7
    assert report.skipped == {"expired": 1}
    rejected = reasons(report)
    assert "public suffix" in rejected["line 11"]
    assert "198.51.100.256" in rejected["line 12"]
    assert "hash" in rejected["line 13"]
    assert "SHA-1" in rejected["line 14"]
    assert "outside 0 to 100" in rejected["line 15"]
    assert "ISO 8601" in rejected["line 16"]
    assert "email" in rejected["line 18"]


def test_csv_feed_values_and_defaults() -> None:
    feed = FeedSettings(path=DATA / "indicators.csv", source="mailsec", confidence=30)
    _, store = load(feed)

    assert store.lookup_ip("198.51.100.5") == [
        {
            "indicator": "198.51.100.5",
            "kind": "ip",
            "source": "soc-blocklist",
            "confidence": 90,
        }
    ]
    assert store.lookup_hash("d41d8cd98f00b204e9800998ecf8427e") == [
        {
            "indicator": "d41d8cd98f00b204e9800998ecf8427e",
            "kind": "hash",
            "source": "mailsec",
            "confidence": 30,
        }
    ]
    assert store.lookup_ip("2001:db8:abcd:1::9")[0]["indicator"] == "2001:db8:abcd::/48"
    assert store.lookup_host("mail.bücher-rechnung.example")[0]["confidence"] == 70
    assert (
        store.lookup_url("http://evil.example.com/a/login.php")[0]["confidence"] == 75
    )


def test_csv_feed_expiry_column_applies() -> None:
    builder = StoreBuilder()
    read_feed(FeedSettings(path=DATA / "indicators.csv"), builder, now=NOW)
    later = parse_time("2100-01-01T00:00:00Z")
    store = builder.build(lambda: later)

    assert store.lookup_ip("203.0.113.1") == []
    assert len(store.lookup_ip("198.51.100.5")) == 1


def test_csv_feed_without_header_uses_documented_order(tmp_path: Path) -> None:
    path = tmp_path / "plain.csv"
    path.write_text("ip,198.51.100.9,blocklist,65,\nhost,evil.example.org\n")

    report, store = load(FeedSettings(path=path))

    assert report.accepted_total == 2
    assert store.lookup_ip("198.51.100.9")[0]["source"] == "blocklist"
    assert store.lookup_host("evil.example.org")[0]["confidence"] == 50


def test_csv_feed_header_in_other_order(tmp_path: Path) -> None:
    path = tmp_path / "reordered.csv"
    path.write_text("value,confidence,type\n198.51.100.9,65,ip\n")

    _, store = load(FeedSettings(path=path))

    assert store.lookup_ip("198.51.100.9")[0]["confidence"] == 65


def test_list_feed_urlhaus_urls() -> None:
    report, store = load(FeedSettings(path=DATA / "urlhaus_urls.txt", source="urlhaus"))

    assert report.format == "list"
    assert report.accepted == {"url": 5}
    assert report.rejected == 1
    assert "line 13" in reasons(report)
    assert (
        store.lookup_url("http://198.51.100.77:44761/Mozi.m")[0]["source"] == "urlhaus"
    )
    assert len(store.lookup_url("http://[2001:DB8::5]:8080/i")) == 1


def test_list_feed_feodo_ips() -> None:
    feed = FeedSettings(path=DATA / "feodo_ipblocklist.txt", kind="ip")
    report, store = load(feed)

    assert report.accepted == {"ip": 3}
    assert report.rejected == 1
    assert len(store.lookup_ip("203.0.113.250")) == 1


def test_list_feed_malwarebazaar_hashes() -> None:
    feed = FeedSettings(path=DATA / "malwarebazaar_sha256.txt", kind="hash")
    report, store = load(feed)

    assert report.accepted == {"hash": 2}
    assert report.rejected == 1
    digest = "486ea46224d1bb4fb680f34f7c9ad96a8f24ec88be73ea8e5a6c65260e9cb8a7"
    assert store.lookup_hash(digest)[0]["indicator"] == digest


def test_list_feed_hosts_file_lines() -> None:
    report, store = load(FeedSettings(path=DATA / "urlhaus_hostfile.txt"))

    assert report.accepted == {"host": 2, "ip": 1}
    assert report.rejected == 1
    assert len(store.lookup_host("www.dropper.example.net")) == 1
    assert len(store.lookup_ip("198.51.100.78")) == 1


def test_list_feed_inline_comment_and_extra_fields(tmp_path: Path) -> None:
    path = tmp_path / "ips.txt"
    path.write_text("198.51.100.1  # C2 since March\n198.51.100.2 443\n")

    report, _ = load(FeedSettings(path=path))

    assert report.accepted == {"ip": 1}
    assert reasons(report)["line 2"] == (
        "A list line must hold one indicator and no spaces."
    )


def test_feed_malformed_lines_never_abort(tmp_path: Path) -> None:
    path = tmp_path / "noisy.txt"
    lines = [f"bad value {number}" for number in range(MAX_KEPT_REJECTIONS + 20)]
    path.write_text("\n".join([*lines, "198.51.100.1"]))

    report, store = load(FeedSettings(path=path))

    assert report.rejected == MAX_KEPT_REJECTIONS + 20
    assert len(report.rejections) == MAX_KEPT_REJECTIONS
    assert len(store.lookup_ip("198.51.100.1")) == 1


@pytest.mark.parametrize(
    ("name", "expected"),
    [("stix_bundle.json", "stix"), ("misp_event.json", "misp")],
)
def test_json_feed_format_detected(name: str, expected: str) -> None:
    report, _ = load(FeedSettings(path=DATA / name))

    assert report.format == expected


def test_missing_feed_file_raises(tmp_path: Path) -> None:
    with pytest.raises(FeedError, match="cannot be read") as caught:
        load(FeedSettings(path=tmp_path / "absent.csv"))

    assert caught.value.path == tmp_path / "absent.csv"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"type": "bundle", "objects": [', "not valid JSON"),
        ('{"hello": "world"}', "neither a STIX bundle"),
    ],
)
def test_unreadable_json_feed_raises(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "feed.json"
    path.write_text(content)

    with pytest.raises(FeedError, match=message):
        load(FeedSettings(path=path))


def test_non_utf8_feed_raises(tmp_path: Path) -> None:
    path = tmp_path / "feed.txt"
    path.write_bytes(b"198.51.100.1\n\xff\xfe\n")

    with pytest.raises(FeedError, match="not UTF-8"):
        load(FeedSettings(path=path))


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("2025-06-15T15:06:40Z", 1_750_000_000.0),
        ("2025-06-15T15:06:40.000Z", 1_750_000_000.0),
        ("2025-06-15T17:06:40+02:00", 1_750_000_000.0),
        ("2025-06-15T15:06:40", 1_750_000_000.0),
        ("2025-06-15", 1_749_945_600.0),
    ],
)
def test_parse_time_iso_forms(text: str, seconds: float) -> None:
    assert parse_time(text) == seconds


def test_csv_feed_quoted_fields_and_bad_quote(tmp_path: Path) -> None:
    path = tmp_path / "quoted.csv"
    path.write_text(
        'url,"http://evil.example.com/a,b",quoted,,\n'
        'ip,"198.51.100.1,,,\n'
        "ip,198.51.100.2,,,\n"
    )

    report, store = load(FeedSettings(path=path))

    assert store.lookup_url("http://evil.example.com/a,b")[0]["source"] == "quoted"
    assert reasons(report) == {"line 2": "The line is not valid CSV."}
    assert len(store.lookup_ip("198.51.100.2")) == 1


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)
STIX_FIELDS = st.fixed_dictionaries(
    {"type": st.just("indicator")},
    optional={
        name: JSON_VALUES | st.text(max_size=40)
        for name in ("pattern", "pattern_type", "valid_until", "confidence", "revoked")
    },
)
MISP_FIELDS = st.fixed_dictionaries(
    {"to_ids": st.just(True)},
    optional={
        "type": st.sampled_from(["ip-dst", "domain|ip", "filename|md5", "url"])
        | JSON_VALUES,
        "value": JSON_VALUES,
        "deleted": JSON_VALUES,
        "Tag": JSON_VALUES,
    },
)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(STIX_FIELDS | JSON_VALUES, max_size=5))
def test_stix_feed_arbitrary_objects_never_abort(objects: list[object]) -> None:
    bundle = {"type": "bundle", "id": "bundle--1", "objects": objects}
    report = FeedReport(path=Path("bundle.json"), format="stix", source="fuzz")
    reader = FeedReader(
        FeedSettings(path=Path("bundle.json")), StoreBuilder(), report, now=NOW
    )

    read_bundle(bundle, reader)

    assert report.accepted_total + report.rejected + sum(
        report.skipped.values()
    ) == len(objects)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(MISP_FIELDS | JSON_VALUES, max_size=5), JSON_VALUES)
def test_misp_feed_arbitrary_attributes_never_abort(
    attributes: list[object], tags: object
) -> None:
    event = {"Event": {"uuid": "e1", "Tag": tags, "Attribute": attributes}}
    report = FeedReport(path=Path("misp.json"), format="misp", source="fuzz")
    reader = FeedReader(
        FeedSettings(path=Path("misp.json")), StoreBuilder(), report, now=NOW
    )

    read_misp(event, reader)

    assert report.rejected + sum(
        report.skipped.values()
    ) + report.accepted_total >= len(attributes)
