"""Properties of `parse_alert` over any JSON value and over mutated examples.

Parsing either returns normalized alerts or raises `InvalidAlertError`, whatever
the JSON value. It is also idempotent. The same body parsed again, later or after
its JSON was re-encoded, gives the same alerts with the same ids, so a replay
creates no second alert.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autopull.connectors.sources.detect import format_names, parse_alert
from autopull.connectors.sources.exceptions import InvalidAlertError

EXAMPLES = Path(__file__).resolve().parents[4] / "examples" / "alerts"
EXAMPLE_DOCUMENTS = [
    json.loads(path.read_text()) for path in sorted(EXAMPLES.glob("*.json"))
]
RECEIVED_AT = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
FORMAT_NAMES: list[str | None] = [None, *format_names()]

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
    | st.sampled_from(
        [
            "",
            "2026-12-01T09:30:04.000Z",
            "2026-12-01 09:30:04",
            "alice@example.com",
            "<a@b>",
            "phish",
            "MALWARE",
            "notified",
            "blocked",
            "cleared",
        ]
    )
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Return the path of every member and element inside `value`."""
    found = []
    if isinstance(value, dict):
        items: list[tuple[Any, Any]] = list(value.items())
    elif isinstance(value, list):
        items = list(enumerate(value))
    else:
        return []
    for key, child in items:
        found.append((*prefix, key))
        found.extend(_paths(child, (*prefix, key)))
    return found


@st.composite
def mutated_examples(draw: st.DrawFn) -> Any:
    """Return an example alert with one member replaced by any JSON value or removed."""
    document = json.loads(json.dumps(draw(st.sampled_from(EXAMPLE_DOCUMENTS))))
    path = draw(st.sampled_from(_paths(document)))
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    if isinstance(parent, dict) and draw(st.booleans()):
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(JSON_VALUES)
    return document


def parse_or_none(
    body: bytes, format_name: str | None, at: datetime
) -> list[dict[str, Any]] | None:
    """Return the alerts of `body`, or None when parsing raised InvalidAlertError."""
    try:
        alerts = parse_alert(body, received_at=at, format_name=format_name)
    except InvalidAlertError as error:
        assert error.reason
        return None
    return [dict(alert) for alert in alerts]


def without_received_at(alerts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in alert.items() if k != "received_at"} for alert in alerts]


def check_idempotent(document: Any, format_name: str | None) -> None:
    body = json.dumps(document).encode()
    first = parse_or_none(body, format_name, RECEIVED_AT)
    later = parse_or_none(body, format_name, RECEIVED_AT + timedelta(hours=3))
    reencoded = json.dumps(json.loads(body), indent=2, ensure_ascii=True).encode()
    again = parse_or_none(reencoded, format_name, RECEIVED_AT)

    if first is None:
        assert later is None
        assert again is None
        return
    assert later is not None
    assert again is not None
    assert [a["alert_id"] for a in later] == [a["alert_id"] for a in first]
    assert without_received_at(later) == without_received_at(first)
    assert again == first
    assert {a["received_at"] for a in later} <= {RECEIVED_AT + timedelta(hours=3)}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(JSON_VALUES, st.sampled_from(FORMAT_NAMES))
def test_parse_alert_any_json_value_idempotent(
    document: Any, format_name: str | None
) -> None:
    check_idempotent(document, format_name)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_examples(), st.sampled_from(FORMAT_NAMES))
def test_parse_alert_mutated_example_idempotent(
    document: Any, format_name: str | None
) -> None:
    check_idempotent(document, format_name)


def test_parse_alert_examples_idempotent() -> None:
    for document in EXAMPLE_DOCUMENTS:
        body = json.dumps(document).encode()
        first = parse_or_none(body, None, RECEIVED_AT)
        assert first, document

        check_idempotent(document, None)
