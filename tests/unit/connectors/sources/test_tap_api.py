"""The TAP SIEM API client: settings, windows, responses, errors and retries."""

from __future__ import annotations

import base64
import itertools
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone

import httpx
import pytest
from pydantic import ValidationError

from autopull.connectors.errors import (
    ConnectorError,
    PermanentError,
    ThrottledError,
    TransientError,
)
from autopull.connectors.sources.tap_api import (
    LOOKBACK_MARGIN,
    MAX_LOOKBACK,
    TapClient,
    TapSettings,
    error_for_response,
    format_time,
    map_tap_error,
    parse_retry_after,
    parse_siem_body,
    plan_windows,
    poll_range,
    split_envelope,
)

NOW = datetime(2026, 12, 8, 12, 0, 0, tzinfo=UTC)
PRINCIPAL = "svc-principal-1"
SECRET = "s3cret-value-never-logged"
START = datetime(2026, 12, 8, 9, 0, 0, tzinfo=UTC)
END = datetime(2026, 12, 8, 10, 0, 0, tzinfo=UTC)
PLUS_TWO = timezone(timedelta(hours=2))
INTERVAL = "2026-12-08T09:00:00Z/2026-12-08T10:00:00Z"
BODY = json.dumps(
    {
        "queryEndTime": "2026-12-08T10:00:00Z",
        "messagesDelivered": [{"id": "a"}, {"id": "b"}],
        "messagesBlocked": [],
        "clicksPermitted": [{"id": "c"}],
        "clicksBlocked": [],
    }
).encode()

Handler = Callable[[httpx.Request], httpx.Response]


def settings(**changes: object) -> TapSettings:
    values: dict[str, object] = {
        "enabled": True,
        "url": "https://tap.example.test",
        "principal": PRINCIPAL,
        "secret": SECRET,
        "max_attempts": 3,
    }
    values.update(changes)
    return TapSettings.model_validate(values)


class Recorder:
    """A mock transport handler that returns listed responses and records requests."""

    def __init__(self, *responses: httpx.Response) -> None:
        self.responses = list(responses)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.responses.pop(0)


class Sleeps:
    """Records the waits the client asks for instead of sleeping."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def client_for(
    handler: Handler, sleeps: Sleeps | None = None, **changes: object
) -> TapClient:
    return TapClient(
        settings(**changes),
        transport=httpx.MockTransport(handler),
        sleep=sleeps or Sleeps(),
    )


# --- settings -------------------------------------------------------------------------


def test_settings_defaults_match_the_api_limits() -> None:
    defaults = TapSettings()

    assert defaults.enabled is False
    assert defaults.overlap == timedelta(minutes=30)
    assert defaults.lookback == timedelta(days=7)
    assert defaults.poll_interval_seconds == 60
    assert defaults.threat_statuses == ["active", "cleared", "falsePositive"]


def test_settings_enabled_without_credentials_is_rejected() -> None:
    with pytest.raises(ValidationError) as caught:
        TapSettings(enabled=True, principal=PRINCIPAL)

    assert "tap.secret" in str(caught.value)


def test_settings_lookback_beyond_seven_days_is_rejected() -> None:
    with pytest.raises(ValidationError):
        settings(lookback_hours=169)


def test_settings_url_without_http_scheme_is_rejected() -> None:
    with pytest.raises(ValidationError) as caught:
        settings(url="tap.example.test")

    assert "tap.url" in str(caught.value)


def test_settings_repr_hides_the_secret() -> None:
    assert SECRET not in repr(settings())
    assert PRINCIPAL not in repr(settings())


# --- windows --------------------------------------------------------------------------


def test_poll_range_without_cursor_starts_lookback_before_now() -> None:
    span = poll_range(
        None, NOW, overlap=timedelta(minutes=30), lookback=timedelta(hours=5)
    )

    assert span.start == NOW - timedelta(hours=5)
    assert span.end == NOW
    assert span.lost_from is None


def test_poll_range_with_cursor_starts_one_overlap_earlier() -> None:
    cursor = NOW - timedelta(minutes=2)

    span = poll_range(
        cursor, NOW, overlap=timedelta(minutes=30), lookback=timedelta(days=7)
    )

    assert span.start == cursor - timedelta(minutes=30)
    assert span.end == NOW


def test_poll_range_drops_fractions_of_a_second() -> None:
    span = poll_range(
        None,
        NOW + timedelta(milliseconds=999),
        overlap=timedelta(0),
        lookback=timedelta(hours=1),
    )

    assert span.end == NOW
    assert span.start == NOW - timedelta(hours=1)


def test_poll_range_seven_day_lookback_keeps_a_margin() -> None:
    span = poll_range(None, NOW, overlap=timedelta(0), lookback=timedelta(days=7))

    assert span.start == NOW - MAX_LOOKBACK + LOOKBACK_MARGIN
    assert span.lost_from is None


def test_poll_range_stale_cursor_reports_loss() -> None:
    cursor = NOW - timedelta(days=9)

    span = poll_range(
        cursor, NOW, overlap=timedelta(minutes=30), lookback=timedelta(days=7)
    )

    assert span.start == NOW - MAX_LOOKBACK + LOOKBACK_MARGIN
    assert span.lost_from == cursor


def test_poll_range_overlap_cut_by_lookback_loses_nothing() -> None:
    cursor = NOW - MAX_LOOKBACK + LOOKBACK_MARGIN + timedelta(minutes=10)

    span = poll_range(
        cursor, NOW, overlap=timedelta(minutes=30), lookback=timedelta(days=7)
    )

    assert span.start == NOW - MAX_LOOKBACK + LOOKBACK_MARGIN
    assert span.lost_from is None


def test_plan_windows_seven_days_gives_contiguous_hours() -> None:
    windows = plan_windows(NOW - timedelta(days=7), NOW)

    assert len(windows) == 168
    assert windows[0][0] == NOW - timedelta(days=7)
    assert windows[-1][1] == NOW
    for (_, end), (next_start, _) in itertools.pairwise(windows):
        assert next_start == end
    assert {end - start for start, end in windows} == {timedelta(hours=1)}


def test_plan_windows_partial_last_window_ends_at_now() -> None:
    windows = plan_windows(NOW - timedelta(minutes=90), NOW)

    assert windows == [
        (NOW - timedelta(minutes=90), NOW - timedelta(minutes=30)),
        (NOW - timedelta(minutes=30), NOW),
    ]


def test_plan_windows_short_last_window_starts_earlier() -> None:
    start = NOW - timedelta(hours=1, seconds=10)

    windows = plan_windows(start, NOW)

    assert windows[0] == (start, start + timedelta(hours=1))
    assert windows[1] == (NOW - timedelta(seconds=30), NOW)


def test_plan_windows_span_under_thirty_seconds_is_empty() -> None:
    assert plan_windows(NOW - timedelta(seconds=29), NOW) == []


def test_plan_windows_exactly_thirty_seconds_is_one_window() -> None:
    assert plan_windows(NOW - timedelta(seconds=30), NOW) == [
        (NOW - timedelta(seconds=30), NOW)
    ]


def test_format_time_writes_utc_whole_seconds_with_z() -> None:
    moment = datetime(2026, 12, 8, 13, 4, 5, 678000, tzinfo=UTC)

    assert format_time(moment) == "2026-12-08T13:04:05Z"
    assert format_time(moment.astimezone(PLUS_TWO)) == "2026-12-08T13:04:05Z"


# --- responses ------------------------------------------------------------------------


def test_parse_siem_body_valid_body() -> None:
    query_end_time, events = parse_siem_body(BODY)

    assert query_end_time == END
    assert events == 3


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b"<html>proxy error</html>", "not JSON"),
        (b"[]", "not a JSON object"),
        (b'{"messagesDelivered": []}', "no queryEndTime"),
        (b'{"queryEndTime": "yesterday"}', "not a time"),
        (b'{"queryEndTime": "2026-12-08T10:00:00"}', "no time zone"),
    ],
)
def test_parse_siem_body_rejects_other_bodies(body: bytes, detail: str) -> None:
    with pytest.raises(PermanentError) as caught:
        parse_siem_body(body)

    assert detail in str(caught.value)
    assert "tap.url" in str(caught.value)


def test_split_envelope_small_body_is_kept_as_is() -> None:
    assert split_envelope(BODY, 10_000) == [BODY]


def test_split_envelope_large_body_keeps_every_event() -> None:
    events = [{"id": f"event-{index}", "pad": "x" * 300} for index in range(20)]
    clicks = [{"id": "click-1"}]
    body = json.dumps(
        {
            "queryEndTime": "2026-12-08T10:00:00Z",
            "messagesDelivered": events,
            "clicksPermitted": clicks,
        }
    ).encode()

    parts = split_envelope(body, 2_000)
    documents = [json.loads(part) for part in parts]

    assert len(parts) > 1
    assert all(len(part) <= 2_000 for part in parts)
    assert {document["queryEndTime"] for document in documents} == {
        "2026-12-08T10:00:00Z"
    }
    delivered = [e for d in documents for e in d.get("messagesDelivered", [])]
    assert delivered == events
    assert [e for d in documents for e in d.get("clicksPermitted", [])] == clicks


def test_split_envelope_oversized_event_gets_its_own_part() -> None:
    events = [{"id": "big", "pad": "x" * 5_000}, {"id": "small"}]
    body = json.dumps(
        {"queryEndTime": "2026-12-08T10:00:00Z", "messagesDelivered": events}
    ).encode()

    parts = [json.loads(part) for part in split_envelope(body, 1_000)]

    assert [part["messagesDelivered"] for part in parts] == [[events[0]], [events[1]]]


def test_split_envelope_keeps_guid_events_together() -> None:
    # Three messages, each reported once per recipient, the events interleaved.
    events = [
        {"id": f"e{index}", "GUID": f"guid-{index % 3}", "pad": "x" * 200}
        for index in range(12)
    ]
    body = json.dumps(
        {"queryEndTime": "2026-12-08T10:00:00Z", "messagesDelivered": events}
    ).encode()

    parts = [json.loads(part) for part in split_envelope(body, 2_500)]

    assert len(parts) > 1
    for guid in ("guid-0", "guid-1", "guid-2"):
        holding = [
            part
            for part in parts
            if any(event["GUID"] == guid for event in part["messagesDelivered"])
        ]
        assert len(holding) == 1
    delivered = sorted(e["id"] for p in parts for e in p["messagesDelivered"])
    assert delivered == sorted(event["id"] for event in events)


def test_split_envelope_guid_over_limit_split_by_event() -> None:
    events = [
        {"id": f"e{index}", "GUID": "one", "pad": "x" * 600} for index in range(4)
    ]
    body = json.dumps(
        {"queryEndTime": "2026-12-08T10:00:00Z", "messagesDelivered": events}
    ).encode()

    parts = split_envelope(body, 1_500)

    assert len(parts) > 1
    assert all(len(part) <= 1_500 for part in parts)
    delivered = [e for p in parts for e in json.loads(p)["messagesDelivered"]]
    assert delivered == events


# --- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("7", 7.0),
        (" 2.5 ", 2.5),
        ("0", 0.0),
        ("-1", None),
        ("soon", None),
        ("", None),
        (None, None),
        ("Tue, 08 Dec 2026 12:00:30 GMT", 30.0),
        ("Tue, 08 Dec 2026 11:00:00 GMT", 0.0),
    ],
)
def test_parse_retry_after_values(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, now=NOW) == expected


def response(status: int, text: str = "", **headers: str) -> httpx.Response:
    request = httpx.Request("GET", f"https://tap.example.test/v2/siem/all?i={INTERVAL}")
    return httpx.Response(status, text=text, headers=headers, request=request)


@pytest.mark.parametrize(
    ("status", "headers", "error_class", "retry_after"),
    [
        (429, {"Retry-After": "3"}, ThrottledError, 3.0),
        (429, {}, ThrottledError, None),
        (500, {}, TransientError, None),
        (502, {}, TransientError, None),
        (503, {"Retry-After": "5"}, ThrottledError, 5.0),
        (504, {}, TransientError, None),
        (400, {}, PermanentError, None),
        (401, {}, PermanentError, None),
        (403, {}, PermanentError, None),
        (404, {}, PermanentError, None),
        (405, {}, PermanentError, None),
        (418, {}, PermanentError, None),
    ],
)
def test_error_for_response_classifies_every_status(
    status: int,
    headers: dict[str, str],
    error_class: type[ConnectorError],
    retry_after: float | None,
) -> None:
    error = error_for_response(response(status, "detail", **headers), INTERVAL)

    assert type(error) is error_class
    assert getattr(error, "retry_after", None) == retry_after
    assert error.platform == "tap"
    assert INTERVAL in str(error)


@pytest.mark.parametrize("status", [401, 403])
def test_error_for_response_bad_credentials_names_the_settings(status: int) -> None:
    error = error_for_response(response(status, "Unauthorized"), INTERVAL)

    assert "tap.principal" in str(error)
    assert "tap.secret" in str(error)


def test_error_for_response_quotes_the_server_message() -> None:
    error = error_for_response(
        response(400, "The requested interval is too long."), INTERVAL
    )

    assert "The requested interval is too long." in str(error)


def test_error_for_response_shortens_long_bodies() -> None:
    error = error_for_response(response(400, "x" * 5_000), INTERVAL)

    assert len(str(error)) < 600


@pytest.mark.parametrize(
    ("upstream", "error_class"),
    [
        (httpx.ConnectTimeout("slow"), TransientError),
        (httpx.ReadTimeout("slow"), TransientError),
        (httpx.PoolTimeout("slow"), TransientError),
        (TimeoutError(), TransientError),
        (httpx.ConnectError("refused"), TransientError),
        (httpx.ReadError("reset"), TransientError),
        (httpx.RemoteProtocolError("garbled"), TransientError),
        (httpx.UnsupportedProtocol("ftp"), PermanentError),
        (httpx.InvalidURL("bad"), PermanentError),
        (RuntimeError("bug"), PermanentError),
    ],
)
def test_map_tap_error_classifies_upstream_errors(
    upstream: Exception, error_class: type[ConnectorError]
) -> None:
    error = map_tap_error(upstream, INTERVAL)

    assert type(error) is error_class
    assert INTERVAL in str(error)


def test_map_tap_error_keeps_connector_errors() -> None:
    original = ThrottledError("slow down", retry_after=2)

    assert map_tap_error(original, INTERVAL) is original


# --- client ---------------------------------------------------------------------------


async def test_fetch_window_sends_the_siem_request() -> None:
    recorder = Recorder(httpx.Response(200, content=BODY))

    async with client_for(recorder) as client:
        await client.fetch_window(START, END)

    [request] = recorder.requests
    assert request.method == "GET"
    assert request.url.path == "/v2/siem/all"
    assert request.url.params.get("format") == "json"
    assert request.url.params.get("interval") == INTERVAL
    assert request.url.params.get_list("threatStatus") == [
        "active",
        "cleared",
        "falsePositive",
    ]
    expected = base64.b64encode(f"{PRINCIPAL}:{SECRET}".encode()).decode()
    assert request.headers["Authorization"] == f"Basic {expected}"


async def test_fetch_window_returns_body_and_query_end_time() -> None:
    recorder = Recorder(httpx.Response(200, content=BODY))

    async with client_for(recorder) as client:
        window = await client.fetch_window(START, END)

    assert window.body == BODY
    assert window.query_end_time == END
    assert window.events == 3
    assert (window.start, window.end) == (START, END)


async def test_fetch_window_base_url_with_path_prefix() -> None:
    recorder = Recorder(httpx.Response(200, content=BODY))

    async with client_for(recorder, url="https://proxy.example.test/tap/") as client:
        await client.fetch_window(START, END)

    assert recorder.requests[0].url.path == "/tap/v2/siem/all"


async def test_fetch_window_throttled_waits_retry_after() -> None:
    recorder = Recorder(
        httpx.Response(429, text="Too many requests", headers={"Retry-After": "4"}),
        httpx.Response(200, content=BODY),
    )
    sleeps = Sleeps()

    async with client_for(recorder, sleeps) as client:
        window = await client.fetch_window(START, END)

    assert window.events == 3
    assert len(recorder.requests) == 2
    assert sleeps.waits == [4.0]


async def test_fetch_window_retry_after_is_capped() -> None:
    recorder = Recorder(
        httpx.Response(429, headers={"Retry-After": "3600"}),
        httpx.Response(200, content=BODY),
    )
    sleeps = Sleeps()

    async with client_for(recorder, sleeps, max_retry_wait_seconds=30) as client:
        await client.fetch_window(START, END)

    assert sleeps.waits == [30.0]


async def test_fetch_window_server_errors_back_off_then_succeed() -> None:
    recorder = Recorder(
        httpx.Response(502, text="Bad gateway"),
        httpx.Response(500, text="Internal error"),
        httpx.Response(200, content=BODY),
    )
    sleeps = Sleeps()

    async with client_for(recorder, sleeps) as client:
        window = await client.fetch_window(START, END)

    assert window.events == 3
    assert len(sleeps.waits) == 2
    assert all(0 <= wait <= 120 for wait in sleeps.waits)


async def test_fetch_window_gives_up_after_max_attempts() -> None:
    recorder = Recorder(*(httpx.Response(503, text="Unavailable") for _ in range(3)))

    async with client_for(recorder) as client:
        with pytest.raises(TransientError) as caught:
            await client.fetch_window(START, END)

    assert len(recorder.requests) == 3
    assert "503" in str(caught.value)


async def test_fetch_window_connection_errors_are_transient() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async with client_for(refuse) as client:
        with pytest.raises(TransientError) as caught:
            await client.fetch_window(START, END)

    assert isinstance(caught.value.__cause__, httpx.ConnectError)


@pytest.mark.parametrize("status", [400, 401, 403, 404])
async def test_fetch_window_client_errors_are_not_retried(status: int) -> None:
    recorder = Recorder(httpx.Response(status, text="Rejected"))

    async with client_for(recorder) as client:
        with pytest.raises(PermanentError):
            await client.fetch_window(START, END)

    assert len(recorder.requests) == 1


async def test_fetch_window_errors_and_logs_never_show_credentials(
    caplog: pytest.LogCaptureFixture,
) -> None:
    recorder = Recorder(
        httpx.Response(500, text="oops"), httpx.Response(401, text="Unauthorized")
    )
    caplog.set_level(logging.DEBUG)

    async with client_for(recorder) as client:
        with pytest.raises(PermanentError) as caught:
            await client.fetch_window(START, END)

    encoded = base64.b64encode(f"{PRINCIPAL}:{SECRET}".encode()).decode()
    for text in (str(caught.value), caplog.text):
        assert SECRET not in text
        assert PRINCIPAL not in text
        assert encoded not in text


async def test_fetch_window_retry_is_logged_as_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    recorder = Recorder(
        httpx.Response(429, headers={"Retry-After": "1"}),
        httpx.Response(200, content=BODY),
    )
    caplog.set_level(logging.WARNING)

    async with client_for(recorder) as client:
        await client.fetch_window(START, END)

    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "retrying" in record.getMessage()


async def test_fetch_window_non_siem_body_is_permanent() -> None:
    recorder = Recorder(httpx.Response(200, text="<html>login</html>"))

    async with client_for(recorder) as client:
        with pytest.raises(PermanentError):
            await client.fetch_window(START, END)

    assert len(recorder.requests) == 1


@pytest.mark.parametrize(
    ("start", "end"),
    [
        (START, START + timedelta(hours=1, seconds=1)),
        (START, START + timedelta(seconds=29)),
        (END, START),
        (START + timedelta(milliseconds=5), END),
        (START.replace(tzinfo=None), END.replace(tzinfo=None)),
    ],
)
async def test_fetch_window_rejects_windows_tap_would_refuse(
    start: datetime, end: datetime
) -> None:
    recorder = Recorder()

    async with client_for(recorder) as client:
        with pytest.raises(ValueError):
            await client.fetch_window(start, end)

    assert recorder.requests == []


def test_client_without_credentials_is_rejected() -> None:
    with pytest.raises(ValueError) as caught:
        TapClient(TapSettings())

    assert "tap.principal" in str(caught.value)
