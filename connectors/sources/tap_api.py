"""Client of the Proofpoint TAP SIEM API, and the window rules of its requests.

For `GET /v2/siem/all?format=json&interval=<start>/<end>`, the SIEM API returns an
object with `queryEndTime` and one array per event class. One request covers
at most one hour and at least 30 seconds, and its start may lie at most 7 days in
the past. An event is placed at its creation time, the later of its message (or
click) time and the time TAP recognised the threat. So a verdict reached hours
after delivery shows up in a later window, and an event indexed late shows up in a
window that was already read. Pollers therefore re-read an overlap.

HTTP errors are translated into `autopull.connectors.errors` classes in one place,
`error_for_response` and `map_tap_error`, and no httpx exception leaves this module.
The credentials are sent as HTTP Basic auth and never appear in logs or errors.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from autopull.connectors.errors import (
    ConnectorError,
    PermanentError,
    ThrottledError,
    TransientError,
)

logger = logging.getLogger(__name__)

PLATFORM = "tap"
SIEM_PATH = "/v2/siem/all"
MAX_WINDOW = timedelta(hours=1)
MIN_WINDOW = timedelta(seconds=30)
MAX_LOOKBACK = timedelta(days=7)
# The look-back limit is checked against TAP's clock when the request arrives, so a
# start exactly 7 days back by our clock would be rejected. NOTE: the margin is an
# estimate of clock skew plus request time, not a documented value.
LOOKBACK_MARGIN = timedelta(minutes=5)
ENVELOPE_ARRAYS = (
    "messagesDelivered",
    "messagesBlocked",
    "clicksPermitted",
    "clicksBlocked",
)
# Room for `queryEndTime`, the array names and the brackets of one envelope part.
_ENVELOPE_OVERHEAD = 256
_ERROR_TEXT_LIMIT = 300

ThreatStatusFilter = Literal["active", "cleared", "falsePositive"]
ALL_THREAT_STATUSES: tuple[ThreatStatusFilter, ...] = (
    "active",
    "cleared",
    "falsePositive",
)
Sleep = Callable[[float], Awaitable[None]]


class TapSettings(BaseModel):
    """Settings of the TAP SIEM API poller."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    enabled: bool = Field(default=False, description="Poll the TAP SIEM API.")
    url: str = Field(
        default="https://tap-api-v2.proofpoint.com",
        description="Base URL of the TAP API.",
    )
    principal: SecretStr | None = Field(
        default=None, description="Service principal of the TAP credentials."
    )
    secret: SecretStr | None = Field(
        default=None, description="Secret of the TAP credentials."
    )
    poll_interval_seconds: float = Field(
        default=60.0, gt=0, description="Pause between two polls, in seconds."
    )
    overlap_minutes: float = Field(
        default=30.0,
        ge=0,
        description="Minutes before the cursor that every poll reads again, so that "
        "events TAP indexes late are still seen.",
    )
    lookback_hours: float = Field(
        default=168.0,
        ge=1,
        le=168,
        description="Hours read on the first poll, before any cursor exists; TAP "
        "serves at most 168 hours (7 days).",
    )
    threat_statuses: list[ThreatStatusFilter] = Field(
        default_factory=lambda: list(ALL_THREAT_STATUSES),
        min_length=1,
        description="Threat statuses requested; TAP leaves out falsePositive unless "
        "it is asked for.",
    )
    request_timeout_seconds: float = Field(
        default=60.0, gt=0, description="Timeout of one HTTP request, in seconds."
    )
    max_attempts: int = Field(
        default=5, ge=1, description="Attempts of one request on throttling or 5xx."
    )
    max_retry_wait_seconds: float = Field(
        default=120.0,
        gt=0,
        description="Maximum wait between two attempts, in seconds, whatever "
        "Retry-After asks for.",
    )

    @model_validator(mode="after")
    def _check_enabled(self) -> TapSettings:
        if self.enabled and (self.principal is None or self.secret is None):
            raise ValueError(
                "TAP polling is enabled but the credentials are missing; set "
                "tap.principal and tap.secret (AUTOPULL_TAP__PRINCIPAL and "
                "AUTOPULL_TAP__SECRET) to the service principal and secret."
            )
        if not self.url.startswith(("https://", "http://")):
            raise ValueError(
                f"The TAP URL {self.url!r} is not an http(s) URL; set tap.url to "
                "https://tap-api-v2.proofpoint.com or your proxy's address."
            )
        return self

    @property
    def overlap(self) -> timedelta:
        """Return the overlap as a time span."""
        return timedelta(minutes=self.overlap_minutes)

    @property
    def lookback(self) -> timedelta:
        """Return the first poll's look-back as a time span."""
        return timedelta(hours=self.lookback_hours)


@dataclass(frozen=True)
class SiemWindow:
    """One SIEM API response: the raw body and what the poller needs from it."""

    start: datetime
    end: datetime
    query_end_time: datetime
    body: bytes
    events: int


@dataclass(frozen=True)
class PollRange:
    """The span one poll reads, and the span lost to the look-back limit, if any."""

    start: datetime
    end: datetime
    lost_from: datetime | None = None


# --- windows --------------------------------------------------------------------------


def whole_seconds(moment: datetime) -> datetime:
    """Return `moment` in UTC without its fraction of a second."""
    return moment.astimezone(UTC).replace(microsecond=0)


def format_time(moment: datetime) -> str:
    """Format a time the way TAP writes it: UTC, whole seconds, `Z`."""
    return whole_seconds(moment).strftime("%Y-%m-%dT%H:%M:%SZ")


def poll_range(
    cursor: datetime | None,
    now: datetime,
    *,
    overlap: timedelta,
    lookback: timedelta,
) -> PollRange:
    """Return the span a poll reads: from the cursor minus the overlap up to now.

    Without a cursor the span starts `lookback` before now. A start older than
    TAP's look-back limit (7 days less a safety margin) is moved up to the limit.
    When the cursor itself is older than that, the events between the cursor and
    the limit can no longer be read, and `lost_from` is the cursor.
    """
    end = whole_seconds(now)
    start = end - lookback if cursor is None else whole_seconds(cursor) - overlap
    earliest = end - MAX_LOOKBACK + LOOKBACK_MARGIN
    if start >= earliest:
        return PollRange(start, end)

    lost_from = cursor if cursor is not None and cursor < earliest else None
    return PollRange(earliest, end, lost_from)


def plan_windows(start: datetime, end: datetime) -> list[tuple[datetime, datetime]]:
    """Split [start, end) into request windows of at most one hour, in order.

    Windows follow each other without a gap. A last window shorter than TAP's
    30-second minimum starts earlier instead, overlapping its predecessor. A span
    shorter than 30 seconds gives no window.
    """
    start, end = whole_seconds(start), whole_seconds(end)
    if end - start < MIN_WINDOW:
        return []

    windows = []
    cursor = start
    while cursor < end:
        window_end = min(cursor + MAX_WINDOW, end)
        window_start = min(cursor, window_end - MIN_WINDOW)
        windows.append((window_start, window_end))
        cursor = window_end
    return windows


# --- responses ------------------------------------------------------------------------


def parse_siem_body(body: bytes) -> tuple[datetime, int]:
    """Return the `queryEndTime` and the number of events of a SIEM JSON body.

    Raises `PermanentError` when the body is not such an object, which means the
    URL points at something other than the TAP API.
    """
    try:
        document = json.loads(body)
    except ValueError as error:
        raise _not_siem(f"it is not JSON ({error})") from error
    if not isinstance(document, dict):
        raise _not_siem("it is not a JSON object")

    value = document.get("queryEndTime")
    if not isinstance(value, str):
        raise _not_siem("it has no queryEndTime string")
    try:
        query_end_time = datetime.fromisoformat(value)
    except ValueError as error:
        raise _not_siem(f"its queryEndTime {value!r} is not a time") from error
    if query_end_time.tzinfo is None:
        raise _not_siem(f"its queryEndTime {value!r} has no time zone")

    events = 0
    for name in ENVELOPE_ARRAYS:
        array = document.get(name)
        if isinstance(array, list):
            events += len(array)
    return query_end_time.astimezone(UTC), events


def _not_siem(detail: str) -> PermanentError:
    return PermanentError(
        f"The TAP API returned a body that is not a SIEM response: {detail}. Check "
        "that tap.url points at the TAP API.",
        platform=PLATFORM,
    )


def split_envelope(body: bytes, max_bytes: int) -> list[bytes]:
    """Split a SIEM JSON body into envelopes of at most about `max_bytes` each.

    Each part keeps `queryEndTime` and carries a share of the events in their
    arrays, re-encoded as compact JSON. A body within the limit is returned as it
    is. A single event larger than the limit gets a part of its own. The events of
    one array that share a GUID stay in one part, next to each other, unless they
    exceed the limit together, because the parser merges them into one alert whose
    mailboxes the policy counts together.
    """
    if len(body) <= max_bytes:
        return [body]

    document = json.loads(body)
    parts: list[dict[str, object]] = []
    current: dict[str, list[object]] = {}
    size = _ENVELOPE_OVERHEAD
    for name in ENVELOPE_ARRAYS:
        events = document.get(name)
        if not isinstance(events, list):
            continue
        for chunk, chunk_size in _chunks(events, max_bytes):
            if current and size + chunk_size > max_bytes:
                parts.append({"queryEndTime": document["queryEndTime"], **current})
                current, size = {}, _ENVELOPE_OVERHEAD
            current.setdefault(name, []).extend(chunk)
            size += chunk_size
    if current or not parts:
        parts.append({"queryEndTime": document["queryEndTime"], **current})
    return [_compact_json(part) for part in parts]


def _chunks(events: list[object], max_bytes: int) -> list[tuple[list[object], int]]:
    """Return the events in runs that one part keeps together, with their sizes.

    A run is the events of one GUID, or a single event when those exceed the limit.
    """
    chunks: list[tuple[list[object], int]] = []
    for group in _guid_groups(events):
        sizes = [len(_compact_json(event)) + 1 for event in group]
        if sum(sizes) <= max_bytes - _ENVELOPE_OVERHEAD:
            chunks.append((group, sum(sizes)))
            continue
        chunks.extend(
            ([event], event_size)
            for event, event_size in zip(group, sizes, strict=True)
        )
    return chunks


def _guid_groups(events: list[object]) -> list[list[object]]:
    """Group events by GUID in the order of each GUID's first event.

    An event without a GUID is a group of its own.
    """
    groups: dict[str, list[object]] = {}
    ordered: list[list[object]] = []
    for event in events:
        guid = event.get("GUID") if isinstance(event, dict) else None
        if not isinstance(guid, str) or not guid:
            ordered.append([event])
            continue
        if guid not in groups:
            groups[guid] = []
            ordered.append(groups[guid])
        groups[guid].append(event)
    return ordered


def _compact_json(value: object) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


# --- errors ---------------------------------------------------------------------------


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Return the wait a Retry-After header requests, in seconds, or None.

    Accepts delta-seconds and an HTTP date; a date in the past gives 0.
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        return _retry_after_date(text, now)
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds


def _retry_after_date(text: str, now: datetime | None) -> float | None:
    try:
        moment = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max((moment - (now or datetime.now(UTC))).total_seconds(), 0.0)


def error_for_response(response: httpx.Response, interval: str) -> ConnectorError:
    """Translate a TAP error response into a connector error.

    429 is throttling, with the server's Retry-After. 5xx is transient. 401 and
    403 mean wrong credentials. Any other status, 400 included, is permanent and
    quotes the server's message.
    """
    status = response.status_code
    text = _short_text(response)
    retry_after = parse_retry_after(response.headers.get("Retry-After"))
    where = f"the TAP SIEM request for {interval}"

    if status == 429:
        return ThrottledError(
            f"TAP throttled {where} (429: {text}); it will be retried after "
            f"{retry_after if retry_after is not None else 'a back-off'} s.",
            retry_after=retry_after,
            platform=PLATFORM,
        )
    if status >= 500:
        error_class = ThrottledError if retry_after is not None else TransientError
        return error_class(
            f"TAP failed {where} ({status}: {text}); it will be retried.",
            retry_after=retry_after,
            platform=PLATFORM,
        )
    if status in (401, 403):
        return PermanentError(
            f"TAP rejected the credentials of {where} ({status}: {text}). Check "
            "tap.principal and tap.secret: they must be a service principal and its "
            "secret from the TAP dashboard (Settings > Connected Applications).",
            platform=PLATFORM,
        )
    if status == 404:
        url = response.request.url.copy_with(query=None)
        return PermanentError(
            f"TAP found no SIEM API for {where} at {url} (404: {text}); check tap.url.",
            platform=PLATFORM,
        )
    return PermanentError(
        f"TAP rejected {where} ({status}: {text}); the window or a parameter is "
        "invalid, so the request is not retried.",
        platform=PLATFORM,
    )


def _short_text(response: httpx.Response) -> str:
    text = " ".join(response.text.split()) or response.reason_phrase
    if len(text) > _ERROR_TEXT_LIMIT:
        return text[: _ERROR_TEXT_LIMIT - 3] + "..."
    return text


def map_tap_error(error: BaseException, interval: str) -> ConnectorError:
    """Translate an exception raised while calling TAP into a connector error."""
    where = f"The TAP SIEM request for {interval}"
    if isinstance(error, ConnectorError):
        return error
    if isinstance(error, httpx.TimeoutException | TimeoutError):
        return TransientError(
            f"{where} timed out ({type(error).__name__}); it will be retried.",
            platform=PLATFORM,
        )
    if isinstance(error, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return PermanentError(
            f"{where} could not be sent ({type(error).__name__}: "
            f"{error}); check tap.url.",
            platform=PLATFORM,
        )
    if isinstance(error, httpx.HTTPError):
        return TransientError(
            f"{where} failed in transport ({type(error).__name__}: "
            f"{error}); it will be retried.",
            platform=PLATFORM,
        )
    return PermanentError(
        f"{where} failed unexpectedly ({type(error).__name__}: "
        f"{error}); report this as a bug if it repeats.",
        platform=PLATFORM,
    )


# --- client ---------------------------------------------------------------------------


class TapClient:
    """An async client of the TAP SIEM API that reads one window per call.

    Throttling (429, honouring Retry-After) and 5xx answers are retried up to
    `max_attempts` times with a random exponential back-off. `transport` and
    `sleep` replace the network and the waits in tests.
    """

    def __init__(
        self,
        settings: TapSettings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if settings.principal is None or settings.secret is None:
            raise ValueError(
                "The TAP client needs tap.principal and tap.secret; set both."
            )
        self.settings = settings
        self._sleep = sleep
        self._http = httpx.AsyncClient(
            base_url=settings.url.rstrip("/"),
            auth=httpx.BasicAuth(
                settings.principal.get_secret_value(),
                settings.secret.get_secret_value(),
            ),
            timeout=settings.request_timeout_seconds,
            transport=transport,
        )

    async def __aenter__(self) -> TapClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def fetch_window(self, start: datetime, end: datetime) -> SiemWindow:
        """Read the events of [start, end) from `/v2/siem/all`, retrying as needed.

        The window must span 30 seconds to one hour, in whole seconds. Raises a
        `ConnectorError` subclass when TAP or the network fails for good.
        """
        _check_window(start, end)
        interval = f"{format_time(start)}/{format_time(end)}"
        statuses = [
            ("threatStatus", status) for status in self.settings.threat_statuses
        ]
        params = httpx.QueryParams(
            [("format", "json"), ("interval", interval), *statuses]
        )

        retrying = AsyncRetrying(
            retry=retry_if_exception_type(TransientError),
            stop=stop_after_attempt(self.settings.max_attempts),
            wait=self._wait,
            sleep=self._sleep,
            before_sleep=_log_retry,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                body = await self._get(params, interval)

        query_end_time, events = parse_siem_body(body)
        logger.debug(
            "TAP window read interval=%s events=%d bytes=%d",
            interval,
            events,
            len(body),
        )
        return SiemWindow(start, end, query_end_time, body, events)

    async def _get(self, params: httpx.QueryParams, interval: str) -> bytes:
        try:
            response = await self._http.get(SIEM_PATH, params=params)
        except httpx.HTTPError as error:
            raise map_tap_error(error, interval) from error
        if response.status_code != 200:
            raise error_for_response(response, interval)
        return response.content

    def _wait(self, state: RetryCallState) -> float:
        limit = self.settings.max_retry_wait_seconds
        error = state.outcome.exception() if state.outcome else None
        requested = getattr(error, "retry_after", None)
        if requested is not None:
            return min(float(requested), limit)
        backoff = wait_random_exponential(multiplier=1, max=limit)
        return float(backoff(state))


def _check_window(start: datetime, end: datetime) -> None:
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError("The window start and end must be timezone-aware datetimes.")
    if start.microsecond or end.microsecond:
        raise ValueError(
            f"The window {start.isoformat()}/{end.isoformat()} has fractions of a "
            "second; TAP reads whole seconds, so pass whole_seconds() values."
        )
    span = end - start
    if not MIN_WINDOW <= span <= MAX_WINDOW:
        raise ValueError(
            f"The window {format_time(start)}/{format_time(end)} spans {span}, but "
            "a TAP request must span 30 seconds to one hour; use plan_windows()."
        )


def _log_retry(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    wait = state.next_action.sleep if state.next_action else 0.0
    logger.warning(
        "TAP request failed, retrying attempt=%d wait_seconds=%.1f error=%s",
        state.attempt_number,
        wait,
        error,
    )
