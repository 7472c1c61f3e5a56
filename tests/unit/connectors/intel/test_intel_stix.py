from __future__ import annotations

from pathlib import Path

import pytest
from stix2.pattern_visitor import create_pattern_object

from autopull.connectors.intel import FeedSettings
from autopull.connectors.intel.exceptions import FeedError
from autopull.connectors.intel.feeds import FeedReport, parse_time, read_feed
from autopull.connectors.intel.stix import (
    InvalidPatternError,
    PatternNotSimpleError,
    SimplePattern,
    _simple_from_tree,
    parse_simple_pattern,
)
from autopull.connectors.intel.store import IndicatorStore, StoreBuilder

DATA = Path(__file__).parent / "data"
NOW = parse_time("2025-06-15T00:00:00Z")
SHA256 = "4a1e8b7c6d5f4e3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a"


@pytest.fixture(scope="module")
def loaded() -> tuple[FeedReport, IndicatorStore]:
    builder = StoreBuilder()
    feed = FeedSettings(path=DATA / "stix_bundle.json", source="cert", confidence=55)
    report = read_feed(feed, builder, now=NOW)
    return report, builder.build(lambda: NOW)


def test_bundle_accepts_simple_indicators(
    loaded: tuple[FeedReport, IndicatorStore],
) -> None:
    report, _ = loaded

    assert report.format == "stix"
    assert report.accepted == {"ip": 3, "host": 1, "url": 1, "hash": 2}


def test_bundle_skips_with_reasons(loaded: tuple[FeedReport, IndicatorStore]) -> None:
    report, _ = loaded

    assert report.skipped == {
        "not an indicator object": 3,
        "pattern is not a simple equality: it joins comparisons with AND or OR": 1,
        "pattern is not a simple equality: it has a qualifier (WITHIN, REPEATS, "
        "START)": 1,
        "pattern_type 'yara' is not stix": 1,
        "revoked": 1,
        "expired": 1,
    }


def test_bundle_rejects_invalid_value_and_pattern(
    loaded: tuple[FeedReport, IndicatorStore],
) -> None:
    report, _ = loaded
    reasons = {rejection.location: rejection.reason for rejection in report.rejections}

    assert report.rejected == 2
    bad_value = reasons["object indicator--6a7b8c9d-0e1f-4a2b-8c3d-5e6f7a8b9c22"]
    assert "198.51.100.300" in bad_value
    bad_pattern = reasons["object indicator--7b8c9d0e-1f2a-4b3c-9d4e-6f7a8b9c0d33"]
    assert "not valid STIX 2.1" in bad_pattern


def test_bundle_confidence_and_expiry(
    loaded: tuple[FeedReport, IndicatorStore],
) -> None:
    _, store = loaded

    assert store.lookup_ip("198.51.100.1") == [
        {"indicator": "198.51.100.1", "kind": "ip", "source": "cert", "confidence": 85}
    ]
    assert store.lookup_host("www.login-update.example.net")[0]["confidence"] == 55
    assert store.lookup_hash(SHA256)[0]["confidence"] == 95


def test_bundle_valid_until_is_expiry() -> None:
    builder = StoreBuilder()
    read_feed(FeedSettings(path=DATA / "stix_bundle.json"), builder, now=NOW)
    after = parse_time("2030-03-01T08:00:01Z")
    store = builder.build(lambda: after)

    assert store.lookup_ip("198.51.100.1") == []
    assert len(store.lookup_hash(SHA256)) == 1


def test_bundle_values_normalized(loaded: tuple[FeedReport, IndicatorStore]) -> None:
    _, store = loaded

    url = "http://login-update.example.net/owa/auth.php?id=7"
    assert store.lookup_url(url)[0]["indicator"] == url
    assert store.lookup_ip("203.0.113.200")[0]["indicator"] == "203.0.113.0/24"
    assert store.lookup_ip("2001:db8::17")[0]["indicator"] == "2001:db8::17"
    assert len(store.lookup_hash("5D41402ABC4B2A76B9719D911017C592")) == 1


def test_bundle_not_a_bundle_raises(tmp_path: Path) -> None:
    path = tmp_path / "feed.json"
    path.write_text('{"type": "bundle", "objects": {}}')

    with pytest.raises(FeedError, match="not a STIX bundle"):
        read_feed(FeedSettings(path=path, format="stix"), StoreBuilder(), now=NOW)


PATTERNS = [
    ("[ipv4-addr:value = '198.51.100.1']", SimplePattern("ip", "198.51.100.1")),
    ("[ipv6-addr:value = '2001:db8::1']", SimplePattern("ip", "2001:db8::1")),
    (
        "[domain-name:value='evil.example.com']",
        SimplePattern("host", "evil.example.com"),
    ),
    (
        "[ url:value = 'http://x.example/a' ]",
        SimplePattern("url", "http://x.example/a"),
    ),
    (
        "[url:value = 'http://x.example/it\\'s']",
        SimplePattern("url", "http://x.example/it's"),
    ),
    ("[file:hashes.'SHA-256' = 'ab']", SimplePattern("hash", "ab", "sha256")),
    ("[file:hashes.'SHA-1' = 'ab']", SimplePattern("hash", "ab", "sha1")),
    ("[file:hashes.MD5 = 'ab']", SimplePattern("hash", "ab", "md5")),
    ("[file:hashes.SHA256 = 'ab']", SimplePattern("hash", "ab", "sha256")),
    ("([ipv4-addr:value = '198.51.100.1'])", SimplePattern("ip", "198.51.100.1")),
    ("[(ipv4-addr:value = '198.51.100.1')]", SimplePattern("ip", "198.51.100.1")),
    (
        "[ipv4-addr:value ISSUBSET '198.51.100.0/24']",
        SimplePattern("ip", "198.51.100.0/24"),
    ),
]

NOT_SIMPLE = [
    (
        "[domain-name:value = 'a.example' OR domain-name:value = 'b.example']",
        "AND or OR",
    ),
    (
        "[url:value = 'http://a.example/'] AND [url:value = 'http://b.example/']",
        "joins",
    ),
    (
        "[url:value = 'http://a.example/'] FOLLOWEDBY [url:value = 'http://b.example/']",
        "joins",
    ),
    ("[ipv4-addr:value = '198.51.100.1'] REPEATS 5 TIMES", "qualifier"),
    ("[ipv4-addr:value != '198.51.100.1']", "negated"),
    ("[url:value LIKE 'http://a.example/%']", "LIKE"),
    ("[domain-name:value MATCHES '^evil']", "MATCHES"),
    ("[domain-name:value IN ('a.example', 'b.example')]", "other than a string"),
    ("[file:name = 'invoice.js']", "file:name"),
    ("[email-addr:value = 'a@example.com']", "email-addr:value"),
    ("[file:hashes.'SHA-512' = 'ab']", "SHA512"),
]


@pytest.mark.parametrize(("pattern", "expected"), PATTERNS)
def test_parse_simple_pattern_supported(pattern: str, expected: SimplePattern) -> None:
    assert parse_simple_pattern(pattern) == expected


@pytest.mark.parametrize(("pattern", "reason"), NOT_SIMPLE)
def test_parse_simple_pattern_other_shapes_not_simple(
    pattern: str, reason: str
) -> None:
    with pytest.raises(PatternNotSimpleError, match=reason):
        parse_simple_pattern(pattern)


@pytest.mark.parametrize(
    "pattern", ["[ipv4-addr:value = '1.2.3.4'", "ipv4", "[a:b = 'x''y']"]
)
def test_parse_simple_pattern_invalid_text_raises(pattern: str) -> None:
    with pytest.raises(InvalidPatternError):
        parse_simple_pattern(pattern)


@pytest.mark.parametrize(("pattern", "expected"), PATTERNS)
def test_canonical_shortcut_agrees_with_stix2_parser(
    pattern: str, expected: SimplePattern
) -> None:
    tree = create_pattern_object(pattern, version="2.1")

    assert _simple_from_tree(tree) == expected
