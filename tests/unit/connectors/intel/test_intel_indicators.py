from __future__ import annotations

import pytest

from autopull.connectors.intel.exceptions import InvalidIndicatorError
from autopull.connectors.intel.indicators import (
    IpNetwork,
    format_network,
    guess_kind,
    hash_key,
    is_public_suffix,
    normalize_hash,
    normalize_host,
    parse_address,
    parse_network,
    registrable_domain,
)

MD5 = "d41d8cd98f00b204e9800998ecf8427e"
SHA1 = "da39a3ee5e6b4b0d3255bfef95601890afd80709"
SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("198.51.100.1", (4, 0xC6336401)),
        (" 198.51.100.1\n", (4, 0xC6336401)),
        ("::ffff:198.51.100.1", (4, 0xC6336401)),
        ("2001:db8::1", (6, 0x20010DB8000000000000000000000001)),
        ("[2001:DB8::1]", (6, 0x20010DB8000000000000000000000001)),
    ],
)
def test_parse_address_standard_forms(text: str, expected: tuple[int, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "198.51.100", "198.51.100.256", "0x7f.0.0.1", "010.1.1.1", "1.2.3.4/24", "x"],
)
def test_parse_address_other_text_raises(text: str) -> None:
    with pytest.raises(InvalidIndicatorError) as caught:
        parse_address(text)

    assert caught.value.kind == "ip"
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("198.51.100.7", IpNetwork(4, 0xC6336407, 32)),
        ("203.0.113.0/24", IpNetwork(4, 0xCB007100, 24)),
        ("203.0.113.9/24", IpNetwork(4, 0xCB007100, 24)),
        ("::ffff:203.0.113.0/120", IpNetwork(4, 0xCB007100, 24)),
        ("2001:db8:abcd::/48", IpNetwork(6, 0x20010DB8ABCD << 80, 48)),
    ],
)
def test_parse_network_clears_host_bits(text: str, expected: IpNetwork) -> None:
    assert parse_network(text) == expected


def test_parse_network_bad_prefix_raises() -> None:
    with pytest.raises(InvalidIndicatorError, match=r"198\.51\.100\.0/33"):
        parse_network("198.51.100.0/33")


@pytest.mark.parametrize(
    ("network", "text"),
    [
        (IpNetwork(4, 0xC6336407, 32), "198.51.100.7"),
        (IpNetwork(4, 0xCB007100, 24), "203.0.113.0/24"),
        (IpNetwork(6, 0x20010DB8ABCD << 80, 48), "2001:db8:abcd::/48"),
        (IpNetwork(6, 1, 128), "::1"),
    ],
)
def test_format_network_standard_text(network: IpNetwork, text: str) -> None:
    assert format_network(network) == text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Evil.Example.COM", "evil.example.com"),
        ("evil.example.com.", "evil.example.com"),
        ("  evil.example.com ", "evil.example.com"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("BÜCHER.example", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("_dmarc.example.com", "_dmarc.example.com"),
    ],
)
def test_normalize_host_lower_ascii(text: str, expected: str) -> None:
    assert normalize_host(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", ".", "a..b", "evil example.com", "evil/example.com", "a" * 64 + ".com", "a@b"],
)
def test_normalize_host_invalid_raises(text: str) -> None:
    with pytest.raises(InvalidIndicatorError) as caught:
        normalize_host(text)

    assert caught.value.kind == "host"


@pytest.mark.parametrize(
    ("host", "public"),
    [
        ("co.uk", True),
        ("com", True),
        ("github.io", True),
        ("s3.amazonaws.com", True),
        ("example.co.uk", False),
        ("amazonaws.com", False),
        ("user.github.io", False),
    ],
)
def test_is_public_suffix_follows_the_list(host: str, public: bool) -> None:
    assert is_public_suffix(host) is public


def test_registrable_domain_stops_at_public_suffix() -> None:
    assert registrable_domain("a.b.example.co.uk") == "example.co.uk"
    assert registrable_domain("b.s3.amazonaws.com") == "b.s3.amazonaws.com"
    assert registrable_domain("co.uk") is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [(MD5.upper(), MD5), (f" {SHA1} ", SHA1), (SHA256, SHA256)],
)
def test_normalize_hash_lower_hex(value: str, expected: str) -> None:
    assert normalize_hash(value) == expected


@pytest.mark.parametrize(
    "value",
    ["", "abc", MD5[:-1], MD5[:-1] + "g", SHA256 + "0", f"{MD5[:16]} {MD5[16:]}"],
)
def test_normalize_hash_bad_length_or_alphabet_raises(value: str) -> None:
    with pytest.raises(InvalidIndicatorError):
        normalize_hash(value)


def test_normalize_hash_algorithm_checks_length() -> None:
    assert normalize_hash(MD5, "md5") == MD5
    with pytest.raises(InvalidIndicatorError, match="SHA-256"):
        normalize_hash(MD5, "sha256")


def test_hash_key_ignores_case() -> None:
    assert hash_key(SHA256.upper()) == bytes.fromhex(SHA256)
    assert len(hash_key(MD5)) == 16


def test_hash_key_with_spaces_raises() -> None:
    spaced = MD5[:30] + " " + MD5[31:]

    with pytest.raises(InvalidIndicatorError):
        hash_key(spaced)


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ("http://evil.example.com/x", "url"),
        ("198.51.100.1", "ip"),
        ("203.0.113.0/24", "ip"),
        ("2001:db8::1", "ip"),
        (SHA256, "hash"),
        (MD5.upper(), "hash"),
        ("evil.example.com", "host"),
        ("host1.example.c0m", "host"),
    ],
)
def test_guess_kind_by_shape(value: str, kind: str) -> None:
    assert guess_kind(value) == kind
