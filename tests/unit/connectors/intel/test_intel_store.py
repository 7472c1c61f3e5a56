from __future__ import annotations

from typing import Any

import pytest

from autopull.connectors.intel import IndicatorKind
from autopull.connectors.intel.exceptions import InvalidIndicatorError
from autopull.connectors.intel.indicators import IntelHit
from autopull.connectors.intel.store import IndicatorStore, StoreBuilder

SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
MD5 = "d41d8cd98f00b204e9800998ecf8427e"
NOW = 1_750_000_000.0


class Clock:
    """A settable clock in epoch seconds."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def build(
    *entries: tuple[IndicatorKind, str] | tuple[IndicatorKind, str, dict[str, Any]],
    clock: Clock | None = None,
) -> IndicatorStore:
    builder = StoreBuilder()
    for entry in entries:
        options: dict[str, Any] = {"source": "feed", "confidence": 50}
        if len(entry) == 3:
            options.update(entry[2])
        builder.add(entry[0], entry[1], **options)
    return builder.build(clock or Clock())


def indicators(hits: list[IntelHit]) -> list[str]:
    return [hit["indicator"] for hit in hits]


def test_lookup_ip_exact_address_hit() -> None:
    store = build(("ip", "198.51.100.1", {"source": "feodo", "confidence": 90}))

    assert store.lookup_ip("198.51.100.1") == [
        {"indicator": "198.51.100.1", "kind": "ip", "source": "feodo", "confidence": 90}
    ]
    assert store.lookup_ip("198.51.100.2") == []


def test_lookup_ip_returns_every_matching_range_longest_first() -> None:
    store = build(
        ("ip", "10.0.0.0/8"),
        ("ip", "10.20.0.0/16"),
        ("ip", "10.20.30.0/24"),
        ("ip", "10.20.30.40"),
        ("ip", "10.21.0.0/16"),
    )

    assert indicators(store.lookup_ip("10.20.30.40")) == [
        "10.20.30.40",
        "10.20.30.0/24",
        "10.20.0.0/16",
        "10.0.0.0/8",
    ]
    assert indicators(store.lookup_ip("10.20.31.1")) == ["10.20.0.0/16", "10.0.0.0/8"]
    assert indicators(store.lookup_ip("11.0.0.1")) == []


def test_lookup_ip_range_edges() -> None:
    store = build(("ip", "203.0.113.64/26"))

    assert indicators(store.lookup_ip("203.0.113.64")) == ["203.0.113.64/26"]
    assert indicators(store.lookup_ip("203.0.113.127")) == ["203.0.113.64/26"]
    assert store.lookup_ip("203.0.113.63") == []
    assert store.lookup_ip("203.0.113.128") == []


def test_lookup_ip_ipv6_range_and_mapped_ipv4() -> None:
    store = build(("ip", "2001:db8:abcd::/48"), ("ip", "198.51.100.0/24"))

    assert indicators(store.lookup_ip("2001:db8:abcd:12::1")) == ["2001:db8:abcd::/48"]
    assert store.lookup_ip("2001:db8:abce::1") == []
    assert indicators(store.lookup_ip("::ffff:198.51.100.9")) == ["198.51.100.0/24"]


def test_lookup_ip_ipv4_and_ipv6_tables_apart() -> None:
    store = build(("ip", "::c633:6401"))

    assert store.lookup_ip("198.51.100.1") == []
    assert indicators(store.lookup_ip("::c633:6401")) == ["::c633:6401"]


def test_lookup_ip_invalid_raises() -> None:
    store = build()

    with pytest.raises(InvalidIndicatorError):
        store.lookup_ip("not an address")


def test_lookup_host_listed_domain_matches_subdomains() -> None:
    store = build(("host", "evil.example.com"))

    assert indicators(store.lookup_host("evil.example.com")) == ["evil.example.com"]
    assert indicators(store.lookup_host("a.evil.example.com")) == ["evil.example.com"]
    assert indicators(store.lookup_host("x.y.evil.example.com")) == ["evil.example.com"]
    assert store.lookup_host("example.com") == []
    assert store.lookup_host("notevil.example.com") == []


def test_lookup_host_suffix_of_other_domain_no_match() -> None:
    store = build(("host", "example.com"))

    assert store.lookup_host("example.com.attacker.net") == []
    assert store.lookup_host("www.example.com.attacker.net") == []
    assert store.lookup_host("badexample.com") == []
    assert indicators(store.lookup_host("www.example.com")) == ["example.com"]


def test_lookup_host_stops_at_registrable_domain() -> None:
    store = build(("host", "amazonaws.com"))

    assert store.lookup_host("b.s3.amazonaws.com") == []
    assert indicators(store.lookup_host("ec2.amazonaws.com")) == ["amazonaws.com"]


def test_lookup_host_normalizes_query() -> None:
    store = build(("host", "xn--bcher-kva.example"))

    assert indicators(store.lookup_host("WWW.Bücher.example.")) == [
        "xn--bcher-kva.example"
    ]


def test_lookup_host_every_listed_parent() -> None:
    store = build(
        ("host", "example.com", {"source": "a"}),
        ("host", "evil.example.com", {"source": "b"}),
    )

    hits = store.lookup_host("x.evil.example.com")

    assert [(hit["indicator"], hit["source"]) for hit in hits] == [
        ("evil.example.com", "b"),
        ("example.com", "a"),
    ]


def test_lookup_host_ip_literal_looked_up_as_ip() -> None:
    store = build(("ip", "198.51.100.0/24"))

    hits = store.lookup_host("198.51.100.7")

    assert indicators(hits) == ["198.51.100.0/24"]
    assert hits[0]["kind"] == "ip"


def test_add_public_suffix_host_rejected() -> None:
    builder = StoreBuilder()

    for suffix in ("co.uk", "com", "github.io", "s3.amazonaws.com"):
        with pytest.raises(InvalidIndicatorError, match="public suffix"):
            builder.add("host", suffix, source="feed", confidence=50)


def test_add_host_address_stored_as_ip() -> None:
    builder = StoreBuilder()

    kind = builder.add("host", "198.51.100.3", source="feed", confidence=50)
    store = builder.build()

    assert kind == "ip"
    assert indicators(store.lookup_ip("198.51.100.3")) == ["198.51.100.3"]


def test_add_confidence_outside_range_rejected() -> None:
    builder = StoreBuilder()

    with pytest.raises(InvalidIndicatorError, match="outside 0 to 100"):
        builder.add("ip", "198.51.100.3", source="feed", confidence=101)


def test_lookup_url_normalized_both_sides() -> None:
    store = build(("url", "HTTP://Evil.Example.com:80/a/%7euser/../login.php#top"))

    hits = store.lookup_url("http://evil.example.com/a/login.php")

    assert indicators(hits) == ["http://evil.example.com/a/login.php"]
    assert store.lookup_url("http://evil.example.com/a/login.php?x=1") == []


def test_lookup_hash_any_case() -> None:
    store = build(("hash", SHA256.upper()), ("hash", MD5))

    assert indicators(store.lookup_hash(SHA256)) == [SHA256]
    assert indicators(store.lookup_hash(MD5.upper())) == [MD5]
    assert store.lookup_hash("0" * 40) == []


def test_lookup_expired_indicator_ignored() -> None:
    clock = Clock()
    store = build(
        ("ip", "198.51.100.1", {"expires": NOW + 60}),
        ("host", "evil.example.com", {"expires": NOW + 60}),
        clock=clock,
    )

    assert len(store.lookup_ip("198.51.100.1")) == 1
    clock.now = NOW + 60
    assert store.lookup_ip("198.51.100.1") == []
    assert store.lookup_host("a.evil.example.com") == []


def test_lookup_expiry_per_source() -> None:
    clock = Clock()
    store = build(
        ("ip", "198.51.100.1", {"source": "short", "expires": NOW + 10}),
        ("ip", "198.51.100.1", {"source": "long", "expires": None}),
        clock=clock,
    )

    clock.now = NOW + 11
    hits = store.lookup_ip("198.51.100.1")

    assert [hit["source"] for hit in hits] == ["long"]


def test_add_same_source_twice_keeps_stronger_entry() -> None:
    clock = Clock()
    store = build(
        ("ip", "198.51.100.1", {"confidence": 40, "expires": NOW + 10}),
        ("ip", "198.51.100.1", {"confidence": 80, "expires": NOW + 5}),
        clock=clock,
    )

    clock.now = NOW + 7
    hits = store.lookup_ip("198.51.100.1")

    assert len(hits) == 1
    assert hits[0]["confidence"] == 80


def test_counts_by_kind() -> None:
    store = build(
        ("ip", "198.51.100.1"),
        ("ip", "203.0.113.0/24"),
        ("host", "evil.example.com"),
        ("url", "http://evil.example.com/"),
        ("hash", MD5),
    )

    assert store.counts() == {"ip": 2, "host": 1, "url": 1, "hash": 1}


def test_lookup_alert_every_field_without_repeats() -> None:
    store = build(
        ("ip", "203.0.113.0/24", {"source": "ranges"}),
        ("host", "evil.example.com", {"source": "hosts"}),
        ("host", "sender.example.net", {"source": "hosts"}),
        ("url", "http://evil.example.com/login", {"source": "urls"}),
        ("hash", SHA256, {"source": "hashes"}),
        ("hash", MD5, {"source": "hashes"}),
    )
    alert = {
        "sender": "billing@mail.sender.example.net",
        "header_from": "Billing <billing@mail.sender.example.net>",
        "sender_ip": "203.0.113.9",
        "urls": ["http://EVIL.example.com/login", "http://a.evil.example.com/x"],
        "attachments": [{"name": "a.js", "md5": None, "sha256": SHA256.upper()}],
        "threats": [
            {"kind": "attachment", "value": MD5},
            {"kind": "url", "value": "http://evil.example.com/login#frag"},
            {"kind": "other", "value": "not an indicator at all"},
        ],
    }

    hits = store.lookup_alert(alert)

    assert sorted((hit["kind"], hit["indicator"]) for hit in hits) == [
        ("hash", MD5),
        ("hash", SHA256),
        ("host", "evil.example.com"),
        ("host", "sender.example.net"),
        ("ip", "203.0.113.0/24"),
        ("url", "http://evil.example.com/login"),
    ]


def test_lookup_alert_empty_fields_no_hits() -> None:
    store = build(("ip", "198.51.100.1"))
    alert: dict[str, Any] = {"sender": "", "sender_ip": None, "urls": []}

    assert store.lookup_alert(alert) == []


def test_lookup_alert_url_with_ip_host_hits_ip() -> None:
    store = build(("ip", "198.51.100.78"))

    hits = store.lookup_alert({"urls": ["http://198.51.100.78/bins/x.arm7"]})

    assert indicators(hits) == ["198.51.100.78"]
