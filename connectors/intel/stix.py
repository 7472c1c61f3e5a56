"""STIX 2.1 bundles: indicators whose pattern compares one observable to one value.

An indicator is used when its `pattern_type` is `stix`, it is not revoked, and its
pattern is a single comparison without qualifiers, such as
`[ipv4-addr:value = '198.51.100.1']` or `[file:hashes.'SHA-256' = '...']`. An address
range may also be given as `[ipv4-addr:value ISSUBSET '198.51.100.0/24']`.
`valid_until` becomes the expiry and `confidence` the confidence; `valid_from` is not
checked. Other patterns are skipped and counted by the reason they are not simple.

Patterns go through the stix2 library's pattern parser. The common canonical form is
recognised by a regular expression first, because the parser costs about 0.2 ms a
pattern (stix2 3.0.2) and a bundle can carry hundreds of thousands of indicators. A test
checks that both give the same result. Objects are read as JSON rather than through
`stix2.parse`, which costs about 0.7 ms an object and rejects a whole bundle over one
bad object.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from stix2 import patterns
from stix2.pattern_visitor import create_pattern_object
from stix2patterns.exceptions import ParseException

from autopull.connectors.intel import IndicatorKind
from autopull.connectors.intel.exceptions import FeedError
from autopull.connectors.intel.feeds import FeedReader, parse_confidence, parse_time
from autopull.connectors.intel.indicators import HashAlgorithm

# Object paths that name an indicator value, and the kind each stands for.
_VALUE_PATHS: dict[str, IndicatorKind] = {
    "ipv4-addr:value": "ip",
    "ipv6-addr:value": "ip",
    "domain-name:value": "host",
    "url:value": "url",
}
# Keys of the STIX hashes dictionary, upper case without hyphens or quotes.
_HASH_NAMES: dict[str, HashAlgorithm] = {
    "MD5": "md5",
    "SHA1": "sha1",
    "SHA256": "sha256",
}

_CANONICAL = re.compile(
    r"\[\s*(?P<path>(?:ipv4-addr|ipv6-addr|domain-name|url):value"
    r"|file:hashes\.(?:'[A-Za-z0-9-]+'|[A-Za-z0-9_]+))"
    r"\s*=\s*'(?P<value>(?:[^'\\]|\\['\\])*)'\s*\]"
)
_ESCAPE = re.compile(r"\\(['\\])")


class PatternNotSimpleError(ValueError):
    """A valid STIX pattern that is more than one equality comparison."""


class InvalidPatternError(ValueError):
    """Text that is not a valid STIX 2.1 pattern."""


@dataclass(frozen=True)
class SimplePattern:
    """The one comparison of a simple pattern."""

    kind: IndicatorKind
    value: str
    algorithm: HashAlgorithm | None = None


def read_bundle(data: Any, reader: FeedReader) -> None:
    """Read the indicators of a STIX 2.1 bundle (see the module for which)."""
    objects = data.get("objects") if isinstance(data, dict) else None
    if not isinstance(objects, list) or data.get("type") != "bundle":
        raise FeedError(
            f"The feed file {str(reader.report.path)!r} is not a STIX bundle: it "
            "needs type 'bundle' and a list of objects.",
            path=reader.report.path,
        )

    for index, item in enumerate(objects):
        if not isinstance(item, dict):
            reader.report.reject(f"object {index}", str(item)[:80], "Not an object.")
        elif item.get("type") != "indicator":
            reader.report.skip("not an indicator object")
        else:
            _read_indicator(item, f"object {item.get('id', index)}", reader)


def _read_indicator(item: dict[str, Any], location: str, reader: FeedReader) -> None:
    pattern = item.get("pattern")
    if item.get("revoked") is True:
        reader.report.skip("revoked")
        return
    if item.get("pattern_type", "stix") != "stix":
        reader.report.skip(f"pattern_type {item.get('pattern_type')!r} is not stix")
        return
    if not isinstance(pattern, str):
        reader.report.reject(location, "", "The indicator has no pattern text.")
        return

    try:
        simple = parse_simple_pattern(pattern)
        confidence = _optional(item, "confidence", parse_confidence)
        expires = _optional(item, "valid_until", parse_time)
    except PatternNotSimpleError as error:
        reader.report.skip(f"pattern is not a simple equality: {error}")
        return
    except ValueError as error:
        reader.report.reject(location, pattern, str(error))
        return
    reader.offer(
        location,
        simple.kind,
        simple.value,
        algorithm=simple.algorithm,
        confidence=confidence,
        expires=expires,
    )


def _optional(item: dict[str, Any], name: str, parse: Any) -> Any:
    value = item.get(name)
    return None if value is None else parse(value)


def parse_simple_pattern(pattern: str) -> SimplePattern:
    """Return the comparison of a simple pattern.

    Raises `PatternNotSimpleError` for a valid pattern of any other shape or on an
    unsupported object path, and `InvalidPatternError` for invalid text.
    """
    match = _CANONICAL.fullmatch(pattern.strip())
    if match:
        return _comparison(match["path"], "=", _ESCAPE.sub(r"\1", match["value"]))

    try:
        expression = create_pattern_object(pattern, version="2.1")
    except ParseException as error:
        raise InvalidPatternError(
            f"The pattern {pattern!r} is not valid STIX 2.1: {error}."
        ) from None
    return _simple_from_tree(expression)


def _simple_from_tree(expression: Any) -> SimplePattern:
    expression = _unwrap(expression)
    if isinstance(expression, patterns.QualifiedObservationExpression):
        raise PatternNotSimpleError("it has a qualifier (WITHIN, REPEATS, START)")
    if not isinstance(expression, patterns.ObservationExpression):
        raise PatternNotSimpleError("it joins observations (AND, OR, FOLLOWEDBY)")

    comparison = _unwrap(expression.operand)
    if isinstance(comparison, patterns._BooleanExpression):
        raise PatternNotSimpleError("it joins comparisons with AND or OR")
    if not isinstance(comparison, patterns._ComparisonExpression):
        raise PatternNotSimpleError("it is not a comparison")
    if comparison.negated:
        raise PatternNotSimpleError("the comparison is negated")
    if not isinstance(comparison.rhs, patterns.StringConstant):
        raise PatternNotSimpleError("it compares to something other than a string")

    lhs = comparison.lhs
    components = [part.property_name for part in lhs.property_path]
    path = f"{lhs.object_type_name}:{'.'.join(components)}"
    value = _ESCAPE.sub(r"\1", comparison.rhs.value)
    return _comparison(path, comparison.operator, value)


def _unwrap(expression: Any) -> Any:
    while isinstance(expression, patterns.ParentheticalExpression):
        expression = expression.expression
    return expression


def _comparison(path: str, operator: str, value: str) -> SimplePattern:
    object_path = path.replace("'", "")
    if object_path in _VALUE_PATHS:
        kind = _VALUE_PATHS[object_path]
        if operator == "=" or (operator == "ISSUBSET" and kind == "ip"):
            return SimplePattern(kind, value)
    elif object_path.startswith("file:hashes."):
        name = object_path.removeprefix("file:hashes.").upper().replace("-", "")
        if name in _HASH_NAMES and operator == "=":
            return SimplePattern("hash", value, _HASH_NAMES[name])
        if name not in _HASH_NAMES:
            raise PatternNotSimpleError(f"the hash {name} is not MD5, SHA-1 or SHA-256")
    else:
        raise PatternNotSimpleError(f"the object path {object_path} is not supported")
    raise PatternNotSimpleError(f"the operator {operator} is not =")
