"""Indicator kinds and the validation and normalization of their values.

Stored values and lookup keys pass through these functions, so both sides have one
form. IP addresses and ranges become (version, network int, prefix length). Host
names become lower-case ASCII, encoded with IDNA by yarl, the encoder that URL hosts
go through too. Hashes become lower-case hex. Invalid input raises
`InvalidIndicatorError`, a `ValueError`.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from functools import lru_cache
from typing import Literal, NamedTuple, TypedDict

from publicsuffixlist import PublicSuffixList
from yarl import URL

from autopull.connectors.intel import IndicatorKind
from autopull.connectors.intel.exceptions import InvalidIndicatorError

HashAlgorithm = Literal["md5", "sha1", "sha256"]
IpVersion = Literal[4, 6]

# Hex digits of each supported digest.
HASH_LENGTHS: dict[HashAlgorithm, int] = {"md5": 32, "sha1": 40, "sha256": 64}
_HASH_NAMES: dict[HashAlgorithm, str] = {
    "md5": "MD5",
    "sha1": "SHA-1",
    "sha256": "SHA-256",
}
_ALGORITHM_BY_LENGTH = {length: name for name, length in HASH_LENGTHS.items()}
_HEX = re.compile(r"[0-9a-f]+")

# Letters, digits, hyphens and underscores (seen in real host names though not in
# RFC 1123), at most 63 characters a label and 253 in all.
_HOST = re.compile(r"(?=.{1,253}$)[a-z0-9_-]{1,63}(?:\.[a-z0-9_-]{1,63})*")

_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_IPV4_MAPPED_PREFIX = int(_IPV4_MAPPED.network_address)


class IntelHit(TypedDict):
    """One listed indicator that a lookup matched (the Avro record `IntelHit`)."""

    indicator: str
    kind: IndicatorKind
    source: str
    confidence: int


class IpNetwork(NamedTuple):
    """An address range; an address is a range with a full-length prefix."""

    version: IpVersion
    address: int
    prefix: int


@lru_cache(maxsize=1)
def public_suffix_list() -> PublicSuffixList:
    """Return the Public Suffix List shipped with the publicsuffixlist package."""
    return PublicSuffixList()


def parse_address(value: str) -> tuple[IpVersion, int]:
    """Parse an IPv4 or IPv6 address into (version, address as int).

    IPv4-mapped IPv6 addresses (::ffff:192.0.2.1) become IPv4. Only the standard
    forms are accepted: dotted quads without leading zeros, and RFC 4291 text.
    """
    text = value.strip()
    try:
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, text))
    except OSError:
        pass

    try:
        address = int.from_bytes(socket.inet_pton(socket.AF_INET6, text.strip("[]")))
    except OSError:
        raise InvalidIndicatorError(
            f"{value!r} is not an IPv4 or IPv6 address.", kind="ip", value=value
        ) from None
    if address >> 32 == _IPV4_MAPPED_PREFIX >> 32:
        return 4, address & 0xFFFFFFFF
    return 6, address


def parse_network(value: str) -> IpNetwork:
    """Parse an address or a CIDR range; host bits set in a range are cleared."""
    text = value.strip()
    if "/" not in text:
        address_version, address = parse_address(text)
        return IpNetwork(address_version, address, 32 if address_version == 4 else 128)
    if text.startswith("["):
        text = text[1:].replace("]", "", 1)
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError as error:
        raise InvalidIndicatorError(
            f"{value!r} is not an IP address or CIDR range: {error}.",
            kind="ip",
            value=value,
        ) from None

    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_IPV4_MAPPED):
        mapped = int(network.network_address) & 0xFFFFFFFF
        return IpNetwork(4, mapped, network.prefixlen - 96)
    version: IpVersion = 4 if network.version == 4 else 6
    return IpNetwork(version, int(network.network_address), network.prefixlen)


def format_network(network: IpNetwork) -> str:
    """Return the text of a range, or of an address for a full-length prefix."""
    if network.version == 4:
        text = socket.inet_ntop(socket.AF_INET, network.address.to_bytes(4))
        full = network.prefix == 32
    else:
        # ipaddress, not inet_ntop, which writes ::c633:6401 as ::198.51.100.1.
        text = str(ipaddress.IPv6Address(network.address))
        full = network.prefix == 128
    return text if full else f"{text}/{network.prefix}"


def normalize_host(value: str) -> str:
    """Return a host name lower case in ASCII, without a trailing dot.

    Internationalized names become punycode (IDNA 2008 with UTS 46 mapping, as
    yarl encodes URL hosts). Raises `InvalidIndicatorError` for anything that is
    not a host name.
    """
    host = value.strip()
    if host.endswith("."):
        host = host[:-1]
    host = host.lower() if host.isascii() else _encode_idn(host, value)

    if not _HOST.fullmatch(host):
        raise InvalidIndicatorError(
            f"{value!r} is not a host name: use letters, digits, hyphens and dots.",
            kind="host",
            value=value,
        )
    return host


def _encode_idn(host: str, value: str) -> str:
    try:
        encoded: str = URL.build(scheme="http", host=host).raw_host or ""
    except ValueError as error:
        raise InvalidIndicatorError(
            f"{value!r} is not a valid internationalized host name: {error}.",
            kind="host",
            value=value,
        ) from None
    return encoded.lower()


def is_public_suffix(host: str) -> bool:
    """Return True when `host` is a public suffix such as co.uk or github.io."""
    public: bool = public_suffix_list().is_public(host)
    return public


def registrable_domain(host: str) -> str | None:
    """Return the registrable domain of `host`, or None for a public suffix."""
    domain: str | None = public_suffix_list().privatesuffix(host)
    return domain


def normalize_hash(value: str, algorithm: HashAlgorithm | None = None) -> str:
    """Return an MD5, SHA-1 or SHA-256 digest as lower-case hex.

    With `algorithm` the length must be that digest's; without it, the length picks
    the digest (32, 40 or 64 hex digits).
    """
    digest = value.strip().lower()
    if algorithm is not None and len(digest) != HASH_LENGTHS[algorithm]:
        raise InvalidIndicatorError(
            f"{value!r} is not a valid {_HASH_NAMES[algorithm]} hash: it needs "
            f"{HASH_LENGTHS[algorithm]} hex digits.",
            kind="hash",
            value=value,
        )
    if len(digest) not in _ALGORITHM_BY_LENGTH or not _HEX.fullmatch(digest):
        raise InvalidIndicatorError(
            f"{value!r} is not an MD5, SHA-1 or SHA-256 hash: use 32, 40 or 64 hex "
            "digits.",
            kind="hash",
            value=value,
        )
    return digest


def hash_key(value: str) -> bytes:
    """Return the digest bytes of a hex MD5, SHA-1 or SHA-256 hash, the store key."""
    text = value.strip()
    if len(text) in _ALGORITHM_BY_LENGTH:
        try:
            key = bytes.fromhex(text)
        except ValueError:
            pass
        else:
            # fromhex skips spaces, so a shorter result means there were some.
            if len(key) * 2 == len(text):
                return key
    return bytes.fromhex(normalize_hash(value))


def guess_kind(value: str) -> IndicatorKind:
    """Guess the kind of a bare indicator value: URL, IP or range, hash, or host."""
    text = value.strip()
    if "://" in text:
        return "url"
    if ":" in text or text[-1:].isdigit():
        try:
            parse_network(text)
        except InvalidIndicatorError:
            pass
        else:
            return "ip"
    if len(text) in _ALGORITHM_BY_LENGTH and _HEX.fullmatch(text.lower()):
        return "hash"
    return "host"
