"""URL normalization, so that one resource listed in any spelling matches.

A normalized URL has a lower-case scheme and host, with the host in punycode
without a trailing dot and IPv6 hosts in compressed form. It has no default port and
no fragment, and its path is at least `/`, with dot segments removed. Its
percent-encoding is canonical as yarl writes it: characters that need no encoding
are decoded (unreserved characters, and in the path also the sub-delimiters, `:` and
`@`), hex digits are upper case, and a stray `%` becomes `%25`. User information is
kept. Normalizing twice changes nothing, which a property test checks on arbitrary
text.
"""

from __future__ import annotations

import ipaddress
import re

from yarl import URL

from autopull.connectors.intel.exceptions import InvalidIndicatorError
from autopull.connectors.intel.indicators import normalize_host

# C0 control characters and DEL anywhere in a URL make it invalid.
_CONTROL = re.compile("[\x00-\x1f\x7f]")

# URLs that are already normalized, recognised without parsing: http or https, a
# lower-case ASCII host, a path without dot segments and no percent sign, no port,
# user information or fragment. A property test checks that yarl returns every
# match unchanged, so this shortcut gives the same result as parsing.
_PCHAR = r"[A-Za-z0-9._~!$&'()*+,;=:@-]"
_CANONICAL = re.compile(
    r"https?://(?P<host>[a-z0-9_-]{1,63}(?:\.[a-z0-9_-]{1,63})*)"
    rf"(?:/(?!\.\.?(?:[/?]|$)){_PCHAR}*)+"
    r"(?:\?[A-Za-z0-9._~!$&'()*+,;=:@/?-]+)?"
)
_MAX_HOST_LENGTH = 253


def normalize_url(value: str) -> str:
    """Return `value` as a normalized absolute URL.

    Raises `InvalidIndicatorError` (a `ValueError`) for text that is not an
    absolute URL with a scheme and a host.
    """
    match = _CANONICAL.fullmatch(value)
    if match and len(match["host"]) <= _MAX_HOST_LENGTH:
        return value
    return _normalize_with_yarl(value)


def _normalize_with_yarl(value: str) -> str:
    text = value.strip(" ")
    if _CONTROL.search(text):
        raise _invalid(value, "it contains control characters")

    url = _parse(text, value)
    if not url.scheme or not url.raw_host:
        raise _invalid(value, "it needs a scheme and a host, as in http://example.com/")

    authority = _userinfo(url) + _host(url.raw_host, value)
    if url.explicit_port is not None and not url.is_default_port():
        authority += f":{url.explicit_port}"
    path = url.raw_path or "/"
    query = f"?{url.raw_query_string}" if url.raw_query_string else ""
    return f"{url.scheme}://{authority}{path}{query}"


def _parse(text: str, value: str) -> URL:
    try:
        return URL(text)
    except (ValueError, IndexError) as error:
        # UnicodeError, raised for hosts that IDNA cannot encode, is a ValueError.
        # yarl 1.25 raises IndexError for an empty host after user information
        # in brackets, as in "http://[::1]@".
        raise _invalid(value, str(error)) from None


def _userinfo(url: URL) -> str:
    if url.raw_user is None and url.raw_password is None:
        return ""
    if url.raw_password is None:
        return f"{url.raw_user}@"
    return f"{url.raw_user or ''}:{url.raw_password}@"


def _host(raw_host: str, value: str) -> str:
    if ":" in raw_host:
        try:
            return f"[{ipaddress.IPv6Address(raw_host)}]"
        except ValueError as error:
            raise _invalid(value, str(error)) from None
    try:
        return normalize_host(raw_host)
    except InvalidIndicatorError:
        raise _invalid(value, f"its host {raw_host!r} is not a host name") from None


def _invalid(value: str, reason: str) -> InvalidIndicatorError:
    return InvalidIndicatorError(
        f"{value!r} is not a valid URL: {reason}.", kind="url", value=value
    )
