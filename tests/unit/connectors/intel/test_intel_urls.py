from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from autopull.connectors.intel.exceptions import InvalidIndicatorError
from autopull.connectors.intel.urls import (
    _CANONICAL,
    _normalize_with_yarl,
    normalize_url,
)

# Characters that URL parsers treat specially, mixed into generated text.
URL_CHARACTERS = list("aZ09%/:?#@[]._~-+=&;!$'()*, \t\u00e9\u00df\u4e2d\u0130")
URL_TOKENS = ["%2e", "%2E", "%41", "%zz", "%7e", "..", ".", "//", "xn--", "[::1]"]
URL_PIECES = st.sampled_from([*URL_CHARACTERS, *URL_TOKENS, "[2001:db8::1]", ":80"])
URL_LIKE = st.lists(URL_PIECES, max_size=30).map("".join)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("HTTP://Example.COM/a", "http://example.com/a"),
        ("http://example.com:80/a", "http://example.com/a"),
        ("https://example.com:443/a", "https://example.com/a"),
        ("http://example.com:443/a", "http://example.com:443/a"),
        ("http://example.com/a#frag", "http://example.com/a"),
        ("http://example.com", "http://example.com/"),
        ("http://example.com?q=1", "http://example.com/?q=1"),
        ("http://example.com/%7euser/%41", "http://example.com/~user/A"),
        ("http://example.com/a%2fb", "http://example.com/a%2Fb"),
        ("http://example.com/?q=%3d%26", "http://example.com/?q=%3D%26"),
        ("http://example.com/a/./b/../c", "http://example.com/a/c"),
        ("http://bücher.example/ä", "http://xn--bcher-kva.example/%C3%A4"),
        ("http://example.com./a", "http://example.com/a"),
        ("http://[2001:DB8:0::1]:8080/x", "http://[2001:db8::1]:8080/x"),
        ("http://User:Pw@Example.com/", "http://User:Pw@example.com/"),
        ("  http://example.com/a  ", "http://example.com/a"),
        ("http://example.com/a b", "http://example.com/a%20b"),
        ("http://example.com/50%", "http://example.com/50%25"),
    ],
)
def test_normalize_url_examples(value: str, expected: str) -> None:
    assert normalize_url(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "",
        "example.com/path",
        "mailto:someone@example.com",
        "http:///path",
        "http://exa mple.com/",
        "http://example.com:99999/",
        "http://example.com/\x00",
        "http://[zz::1]/",
        "http://[::1]@",
    ],
)
def test_normalize_url_invalid_raises(value: str) -> None:
    with pytest.raises(InvalidIndicatorError) as caught:
        normalize_url(value)

    assert caught.value.kind == "url"


@settings(max_examples=600)
@given(st.one_of(st.text(), URL_LIKE, URL_LIKE.map(lambda text: f"http://{text}")))
@example("http://a.com/%2e%2E/x")
@example("HTTPS://XN--BCHER-KVA.example:443")
def test_normalize_url_idempotent_or_invalid(text: str) -> None:
    try:
        normalized = normalize_url(text)
    except InvalidIndicatorError:
        return

    assert normalize_url(normalized) == normalized


@settings(max_examples=200, deadline=None)
@given(st.from_regex(_CANONICAL, fullmatch=True))
def test_canonical_shortcut_agrees_with_yarl(text: str) -> None:
    host = text.split("/")[2]
    if len(host) > 253:
        return

    assert _normalize_with_yarl(text) == text
