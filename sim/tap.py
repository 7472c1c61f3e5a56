"""A Proofpoint TAP SIEM API simulator over a scenario of events, served by aiohttp.

It serves `/v2/siem/all`, `/v2/siem/messages/delivered`, `/v2/siem/messages/blocked`,
`/v2/siem/clicks/permitted`, `/v2/siem/clicks/blocked` and `/v2/siem/issues` (permitted
clicks and delivered messages) the way TAP does. A request takes exactly one of
`interval`, `sinceTime` or `sinceSeconds` and spans 30 seconds to one hour, and its
start lies at most 7 days back. Otherwise it gets 400 with a message. Requests
without the right HTTP Basic credentials get 401. More than `burst_limit` requests
within one second get 429 with Retry-After. The response is an object with
`queryEndTime` (ISO 8601, whole seconds, `Z`) and one array for each event class
the endpoint serves. By default `threatStatus` selects active and cleared threats,
as TAP does, so false positives come only when asked for.

Each scenario event has a creation time, which places it in a window. By default the
creation time is the later of its message or click time and its latest threat time.
An event may be indexed late: it is served only once the clock reaches its
visibility time. Verdict changes re-emit the event, with a new event id, a new
threat status and the change's time as the creation time, so a late verdict
appears in a later window.

The clock is virtual: it starts at the scenario's `start` (default: now), runs at
`rate` times real time, and can be set through the admin API. Paths under `/_sim/`
are that admin API, not TAP: health, clock, events, settings, faults and the
request log.

Scenario file (JSON). Times are ISO 8601 with a zone, or numbers of seconds
relative to the clock when the events are loaded (negative is the past):

    {"credentials": {"principal": "...", "secret": "..."},
     "start": "2026-12-01T12:00:00Z",
     "events": [{"type": "messagesDelivered", "event": {...TAP event...},
                 "created": -7200, "visible": -600,
                 "verdicts": [{"at": -3600, "threatStatus": "falsePositive"}]}]}
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import copy
import hmac
import json
import logging
import re
import signal
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiohttp import web

from .world import ScenarioError

logger = logging.getLogger(__name__)

MESSAGES_DELIVERED = "messagesDelivered"
MESSAGES_BLOCKED = "messagesBlocked"
CLICKS_PERMITTED = "clicksPermitted"
CLICKS_BLOCKED = "clicksBlocked"
EVENT_ARRAYS = (MESSAGES_DELIVERED, MESSAGES_BLOCKED, CLICKS_PERMITTED, CLICKS_BLOCKED)
CLICK_ARRAYS = frozenset({CLICKS_PERMITTED, CLICKS_BLOCKED})
ENDPOINTS: dict[str, tuple[str, ...]] = {
    "/v2/siem/all": EVENT_ARRAYS,
    "/v2/siem/messages/delivered": (MESSAGES_DELIVERED,),
    "/v2/siem/messages/blocked": (MESSAGES_BLOCKED,),
    "/v2/siem/clicks/permitted": (CLICKS_PERMITTED,),
    "/v2/siem/clicks/blocked": (CLICKS_BLOCKED,),
    "/v2/siem/issues": (CLICKS_PERMITTED, MESSAGES_DELIVERED),
}
WINDOW_PARAMETERS = ("interval", "sinceTime", "sinceSeconds")
THREAT_STATUSES = {
    "active": "active",
    "cleared": "cleared",
    "falsepositive": "falsePositive",
}
DEFAULT_THREAT_STATUSES = frozenset({"active", "cleared"})
# The `threatType` filter spells messageText where events spell message.
THREAT_TYPES = {"url": "url", "attachment": "attachment", "messagetext": "message"}
# An event id of a verdict change is derived from the original id and its number.
VERDICT_NAMESPACE = uuid.UUID("5b7a2f4e-2d1c-4c4b-9f0e-0a8d6c3b1e27")
_DURATION = re.compile(r"^P(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+)S)?)$")
MAX_WINDOW = timedelta(hours=1)
MIN_WINDOW = timedelta(seconds=30)


class TapRequestError(Exception):
    """A request the simulator rejects with an error status and a plain message."""

    def __init__(
        self, status: int, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def bad_request(message: str) -> TapRequestError:
    return TapRequestError(400, message)


@dataclass
class TapSimSettings:
    """Behaviour knobs; the admin API can change them while the simulator runs.

    `burst_limit` is the number of SIEM requests served within any one second
    before 429 (0 turns the limit off), and `retry_after_seconds` is the
    Retry-After of that 429. `max_lookback_days` is how far back a window may
    start. `latency_ms` delays every SIEM response.
    """

    burst_limit: int = 10
    retry_after_seconds: int = 1
    max_lookback_days: float = 7.0
    latency_ms: float = 0.0
    request_log_size: int = 10_000


class VirtualClock:
    """A clock that starts at a given time and runs at `rate` times real time."""

    def __init__(
        self,
        start: datetime | None = None,
        rate: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._monotonic = monotonic
        self._anchor = start or datetime.now(UTC)
        self._anchor_monotonic = monotonic()
        self.rate = rate

    def now(self) -> datetime:
        """Return the virtual time."""
        elapsed = (self._monotonic() - self._anchor_monotonic) * self.rate
        return self._anchor + timedelta(seconds=elapsed)

    def set(self, moment: datetime, rate: float | None = None) -> None:
        """Jump to `moment`, and change the rate when one is given."""
        if moment.tzinfo is None:
            raise ValueError(f"The time {moment.isoformat()} has no time zone.")
        self._anchor = moment.astimezone(UTC)
        self._anchor_monotonic = self._monotonic()
        if rate is not None:
            self.rate = rate

    def advance(self, seconds: float) -> None:
        """Move the clock forward (or back, for a negative value)."""
        self.set(self.now() + timedelta(seconds=seconds))


# --- scenario -------------------------------------------------------------------------


@dataclass(frozen=True)
class SimEvent:
    """One event as TAP serves it: its array, body, creation and visibility time."""

    array: str
    data: dict[str, Any]
    created: datetime
    visible: datetime

    def summary(self) -> dict[str, Any]:
        """Return the admin view of the event."""
        return {
            "type": self.array,
            "id": self.data.get("id"),
            "GUID": self.data.get("GUID"),
            "created": format_time(self.created, fraction=True),
            "visible": format_time(self.visible, fraction=True),
            "statuses": sorted(_threat_statuses(self)),
        }


@dataclass
class TapScenario:
    """The credentials and events a simulator serves."""

    principal: str
    secret: str
    start: datetime | None = None
    events: list[dict[str, Any]] = field(default_factory=list)


def load_tap_scenario(path: Path) -> TapScenario:
    """Read a scenario file; raise `ScenarioError` naming the problem."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ScenarioError(
            f"The TAP scenario {path} cannot be read: {error}"
        ) from error
    return parse_tap_scenario(document, where=str(path))


def parse_tap_scenario(document: object, where: str = "the scenario") -> TapScenario:
    """Check a decoded scenario document and return it as a `TapScenario`."""
    if not isinstance(document, dict):
        raise ScenarioError(f"{where} must be a JSON object.")
    credentials = document.get("credentials") or {}
    if not isinstance(credentials, dict):
        raise ScenarioError(f"{where}: credentials must be an object.")
    start = document.get("start")
    events = document.get("events") or []
    if not isinstance(events, list):
        raise ScenarioError(f"{where}: events must be an array.")
    return TapScenario(
        principal=str(credentials.get("principal") or ""),
        secret=str(credentials.get("secret") or ""),
        start=_absolute_time(start, "start") if start is not None else None,
        events=events,
    )


def build_events(entries: Iterable[object], now: datetime) -> list[SimEvent]:
    """Turn scenario entries into served events, verdict changes included.

    Relative times count from `now`. Raises `ScenarioError` naming the entry.
    """
    events: list[SimEvent] = []
    for index, entry in enumerate(entries):
        where = f"events[{index}]"
        if not isinstance(entry, dict):
            raise ScenarioError(f"{where} must be an object.")
        events.extend(_entry_events(entry, now, where))
    return events


def _entry_events(entry: dict[str, Any], now: datetime, where: str) -> list[SimEvent]:
    array = entry.get("type")
    if array not in EVENT_ARRAYS:
        raise ScenarioError(
            f"{where}.type is {array!r}; expected one of {', '.join(EVENT_ARRAYS)}."
        )
    data = entry.get("event")
    if not isinstance(data, dict):
        raise ScenarioError(f"{where}.event must be an object (the TAP event).")

    created = _scenario_time(entry.get("created"), now, f"{where}.created")
    created = created or _creation_time(data, where)
    visible = _scenario_time(entry.get("visible"), now, f"{where}.visible") or created
    if visible < created:
        raise ScenarioError(f"{where}.visible is before its creation time.")
    events = [SimEvent(array, copy.deepcopy(data), created, visible)]

    verdicts = entry.get("verdicts") or []
    if not isinstance(verdicts, list):
        raise ScenarioError(f"{where}.verdicts must be an array.")
    for number, change in enumerate(verdicts, 1):
        change_where = f"{where}.verdicts[{number - 1}]"
        if not isinstance(change, dict):
            raise ScenarioError(f"{change_where} must be an object.")
        events.append(_verdict_event(events[0], change, number, now, change_where))
    return events


def _verdict_event(
    original: SimEvent,
    change: dict[str, Any],
    number: int,
    now: datetime,
    where: str,
) -> SimEvent:
    """Re-emit `original` with the changed verdict, created at the change's time."""
    at = _scenario_time(change.get("at"), now, f"{where}.at")
    if at is None:
        raise ScenarioError(f"{where}.at is required: the time of the new verdict.")
    visible = _scenario_time(change.get("visible"), now, f"{where}.visible") or at
    data = copy.deepcopy(original.data)
    if data.get("id"):
        data["id"] = str(uuid.uuid5(VERDICT_NAMESPACE, f"{data['id']}:{number}"))

    updates = {"threatTime": format_time(at, fraction=True)}
    for name in ("threatStatus", "classification"):
        if change.get(name) is not None:
            updates[name] = str(change[name])
    if original.array in CLICK_ARRAYS:
        data.update(updates)
    else:
        for threat in data.get("threatsInfoMap") or []:
            threat_id = change.get("threatID")
            if isinstance(threat, dict) and threat_id in (None, threat.get("threatID")):
                threat.update(updates)
    return SimEvent(original.array, data, at, max(visible, at))


def _creation_time(data: dict[str, Any], where: str) -> datetime:
    """Return the later of the message (or click) time and the latest threat time."""
    times = []
    for name in ("messageTime", "clickTime", "threatTime"):
        if isinstance(data.get(name), str):
            times.append(_absolute_time(data[name], f"{where}.event.{name}"))
    for threat in data.get("threatsInfoMap") or []:
        if isinstance(threat, dict) and isinstance(threat.get("threatTime"), str):
            times.append(_absolute_time(threat["threatTime"], f"{where}.threatTime"))
    if not times:
        raise ScenarioError(
            f"{where} has no created time and no messageTime, clickTime or "
            "threatTime to derive it from."
        )
    return max(times)


def _scenario_time(value: object, now: datetime, where: str) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return now + timedelta(seconds=value)
    return _absolute_time(value, where)


def _absolute_time(value: object, where: str) -> datetime:
    if not isinstance(value, str):
        raise ScenarioError(f"{where} must be an ISO 8601 time or a number of seconds.")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as error:
        raise ScenarioError(f"{where} is not an ISO 8601 time: {value!r}.") from error
    if moment.tzinfo is None:
        raise ScenarioError(f"{where} has no time zone: {value!r}.")
    return moment.astimezone(UTC)


def format_time(moment: datetime, *, fraction: bool = False) -> str:
    """Format a UTC time as TAP does: `Z`, with milliseconds when `fraction`."""
    moment = moment.astimezone(UTC)
    if fraction:
        return (
            moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
        )
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _threat_statuses(event: SimEvent) -> set[str]:
    """Return the statuses of an event's threats, spelled as the filter spells them.

    A threat without a status counts as active.
    """
    if event.array in CLICK_ARRAYS:
        threats = [event.data]
    else:
        threats = [
            threat
            for threat in event.data.get("threatsInfoMap") or []
            if isinstance(threat, dict)
        ]
    statuses = set()
    for threat in threats:
        status = str(threat.get("threatStatus") or "active")
        statuses.add(THREAT_STATUSES.get(status.lower(), status))
    return statuses or {"active"}


def _threat_types(event: SimEvent) -> set[str]:
    if event.array in CLICK_ARRAYS:
        return {"url"}
    threats = event.data.get("threatsInfoMap") or []
    return {
        str(threat.get("threatType") or "").lower()
        for threat in threats
        if isinstance(threat, dict)
    }


# --- requests -------------------------------------------------------------------------


@dataclass
class LoggedRequest:
    """One SIEM request as the admin API shows it."""

    seq: int
    at: str
    path: str
    query: dict[str, list[str]]
    status: int = 0
    window_start: str | None = None
    window_end: str | None = None
    events: int = 0
    error: str | None = None


@dataclass
class Fault:
    """Fail the next `count` SIEM requests with `status` (after authentication)."""

    status: int
    count: int = 1
    retry_after: int | None = None


@dataclass(frozen=True)
class Window:
    """The window of a request; its end is the `queryEndTime`."""

    start: datetime
    end: datetime


def parse_window(
    query: dict[str, list[str]], now: datetime, settings: TapSimSettings
) -> Window:
    """Return the window of a SIEM request, raising 400 for what TAP rejects."""
    present = [name for name in WINDOW_PARAMETERS if name in query]
    if len(present) != 1:
        raise bad_request(
            "Exactly one of the parameters interval, sinceTime or sinceSeconds is "
            f"required, but {len(present)} were given."
        )
    name = present[0]
    values = query[name]
    if len(values) != 1:
        raise bad_request(f"The parameter {name} was given {len(values)} times.")

    if name == "interval":
        window = _interval_window(values[0])
    elif name == "sinceTime":
        start = _parse_request_time(values[0], "sinceTime")
        window = Window(start, now.replace(second=0, microsecond=0))
    else:
        window = _since_seconds_window(values[0], now)
    _check_window(window, now, settings)
    return window


def _interval_window(text: str) -> Window:
    first, separator, second = text.partition("/")
    if not separator:
        raise bad_request(
            f"The interval {text!r} is not an ISO 8601 interval such as "
            "2016-05-01T12:00:00Z/2016-05-01T13:00:00Z."
        )
    if first.startswith("P"):
        end = _parse_request_time(second, "interval")
        return Window(end - _parse_duration(first), end)
    start = _parse_request_time(first, "interval")
    if second.startswith("P"):
        return Window(start, start + _parse_duration(second))
    return Window(start, _parse_request_time(second, "interval"))


def _since_seconds_window(text: str, now: datetime) -> Window:
    try:
        seconds = int(text)
    except ValueError as error:
        raise bad_request(f"sinceSeconds {text!r} is not a whole number.") from error
    if not 30 <= seconds <= 3600:
        raise bad_request(f"sinceSeconds is {seconds}, but it must be 30 to 3600.")
    end = now.replace(microsecond=0)
    return Window(end - timedelta(seconds=seconds), end)


def _check_window(window: Window, now: datetime, settings: TapSimSettings) -> None:
    span = window.end - window.start
    if span <= timedelta(0):
        raise bad_request("The requested interval ends before it starts.")
    if span > MAX_WINDOW:
        raise bad_request(
            f"The requested interval spans {span}, more than the maximum of one hour."
        )
    if span < MIN_WINDOW:
        raise bad_request(
            f"The requested interval spans {span}, less than the minimum of 30 seconds."
        )
    if window.start > now:
        raise bad_request("The requested start time is in the future.")
    if window.start < now - timedelta(days=settings.max_lookback_days):
        raise bad_request(
            f"The requested start time {format_time(window.start)} is more than "
            f"{settings.max_lookback_days:g} days in the past."
        )


def _parse_request_time(text: str, name: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError as error:
        raise bad_request(f"The {name} time {text!r} is not ISO 8601.") from error
    if moment.tzinfo is None:
        raise bad_request(f"The {name} time {text!r} has no time zone.")
    return moment.astimezone(UTC)


def _parse_duration(text: str) -> timedelta:
    match = _DURATION.match(text)
    if not match or not any(match.groups()):
        raise bad_request(
            f"The duration {text!r} is not of the form PT1H, PT30M or PT90S."
        )
    hours, minutes, seconds = (int(group or 0) for group in match.groups())
    return timedelta(hours=hours, minutes=minutes, seconds=seconds)


def _status_filter(query: dict[str, list[str]]) -> frozenset[str]:
    values = query.get("threatStatus")
    if not values:
        return DEFAULT_THREAT_STATUSES
    statuses = set()
    for value in values:
        status = THREAT_STATUSES.get(value.strip().lower())
        if status is None:
            raise bad_request(
                f"threatStatus {value!r} is invalid; use active, cleared or "
                "falsePositive."
            )
        statuses.add(status)
    return frozenset(statuses)


def _type_filter(query: dict[str, list[str]]) -> frozenset[str] | None:
    values = query.get("threatType")
    if not values:
        return None
    types = set()
    for value in values:
        kind = THREAT_TYPES.get(value.strip().lower())
        if kind is None:
            raise bad_request(
                f"threatType {value!r} is invalid; use url, attachment or messageText."
            )
        types.add(kind)
    return frozenset(types)


def _check_format(query: dict[str, list[str]]) -> None:
    value = (query.get("format") or ["json"])[0].lower()
    if value == "json":
        return
    if value == "syslog":
        raise bad_request("The simulator serves format=json only, not syslog.")
    raise bad_request(f"format {value!r} is invalid; use json or syslog.")


# --- server ---------------------------------------------------------------------------


class TapSimulator:
    """The TAP SIEM API over a list of events, with a virtual clock and an admin API."""

    def __init__(
        self,
        scenario: TapScenario,
        settings: TapSimSettings | None = None,
        *,
        clock: VirtualClock | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if not scenario.principal or not scenario.secret:
            raise ScenarioError(
                "The TAP simulator needs credentials: a principal and a secret in the "
                "scenario or on the command line."
            )
        self.scenario = scenario
        self.settings = settings or TapSimSettings()
        self.clock = clock or VirtualClock(scenario.start, monotonic=monotonic)
        self.events = build_events(scenario.events, self.clock.now())
        self.faults: list[Fault] = []
        self.log: deque[LoggedRequest] = deque(maxlen=self.settings.request_log_size)
        self._monotonic = monotonic
        self._recent: deque[float] = deque()
        self._seq = 0
        self._runner: web.AppRunner | None = None
        self.base_url: str | None = None

    # --- lifecycle --------------------------------------------------------------------

    def make_app(self) -> web.Application:
        """Build the aiohttp application; every path goes through one dispatcher."""
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on host:port (0 picks a free port) and return the base URL."""
        self._runner = web.AppRunner(self.make_app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound_port = self._runner.addresses[0][1]
        self.base_url = f"http://{host}:{bound_port}"
        logger.info(
            "TAP simulator started url=%s events=%d", self.base_url, len(self.events)
        )
        return self.base_url

    async def stop(self) -> None:
        """Stop serving."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            logger.info("TAP simulator stopped url=%s", self.base_url)

    def add_events(self, entries: Iterable[object]) -> list[SimEvent]:
        """Add scenario entries, relative times counting from the clock's now."""
        added = build_events(entries, self.clock.now())
        self.events.extend(added)
        return added

    # --- SIEM API ---------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.path.startswith("/_sim/"):
            return await self._admin(request)

        entry = self._log_request(request)
        try:
            response = await self._serve(request, entry)
        except TapRequestError as error:
            entry.error = error.message
            response = web.Response(
                status=error.status, text=error.message, headers=error.headers
            )
        entry.status = response.status
        return response

    async def _serve(self, request: web.Request, entry: LoggedRequest) -> web.Response:
        arrays = ENDPOINTS.get(request.path.rstrip("/"))
        if arrays is None:
            raise TapRequestError(404, f"No SIEM API endpoint at {request.path}.")
        if request.method != "GET":
            raise TapRequestError(405, "The SIEM API serves GET requests only.")
        self._authenticate(request)
        self._throttle()
        self._inject_fault()
        if self.settings.latency_ms:
            await asyncio.sleep(self.settings.latency_ms / 1000)

        now = self.clock.now()
        query = entry.query
        _check_format(query)
        window = parse_window(query, now, self.settings)
        entry.window_start = format_time(window.start)
        entry.window_end = format_time(window.end)
        statuses, types = _status_filter(query), _type_filter(query)

        served = self._served(window, now, statuses, types)
        body: dict[str, Any] = {"queryEndTime": format_time(window.end)}
        for array in arrays:
            body[array] = [event.data for event in served if event.array == array]
            entry.events += len(body[array])
        return web.json_response(body)

    def _served(
        self,
        window: Window,
        now: datetime,
        statuses: frozenset[str],
        types: frozenset[str] | None,
    ) -> list[SimEvent]:
        """Return the events created in [start, end) and visible by `now`."""
        return [
            event
            for event in sorted(self.events, key=lambda item: item.created)
            if window.start <= event.created < window.end
            and event.visible <= now
            and _threat_statuses(event) & statuses
            and (types is None or _threat_types(event) & types)
        ]

    def _authenticate(self, request: web.Request) -> None:
        challenge = {"WWW-Authenticate": 'Basic realm="TAP SIEM API"'}
        header = request.headers.get("Authorization", "")
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            raise TapRequestError(401, "Authentication is required.", challenge)
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise TapRequestError(
                401, "The credentials are invalid.", challenge
            ) from None
        principal, _, secret = decoded.partition(":")
        valid = hmac.compare_digest(
            principal.encode(), self.scenario.principal.encode()
        ) & hmac.compare_digest(secret.encode(), self.scenario.secret.encode())
        if not valid:
            raise TapRequestError(401, "The credentials are invalid.", challenge)

    def _throttle(self) -> None:
        limit = self.settings.burst_limit
        if limit <= 0:
            return
        now = self._monotonic()
        while self._recent and now - self._recent[0] >= 1.0:
            self._recent.popleft()
        if len(self._recent) >= limit:
            retry_after = str(self.settings.retry_after_seconds)
            raise TapRequestError(
                429,
                f"Too many requests: more than {limit} within one second.",
                {"Retry-After": retry_after},
            )
        self._recent.append(now)

    def _inject_fault(self) -> None:
        if not self.faults:
            return
        fault = self.faults[0]
        fault.count -= 1
        if fault.count <= 0:
            self.faults.pop(0)
        headers = {}
        if fault.retry_after is not None:
            headers["Retry-After"] = str(fault.retry_after)
        raise TapRequestError(fault.status, f"Injected fault {fault.status}.", headers)

    def _log_request(self, request: web.Request) -> LoggedRequest:
        self._seq += 1
        query: dict[str, list[str]] = {}
        for name, value in request.query.items():
            query.setdefault(name, []).append(value)
        entry = LoggedRequest(
            seq=self._seq,
            at=format_time(self.clock.now(), fraction=True),
            path=request.path,
            query=query,
        )
        self.log.append(entry)
        return entry

    # --- admin API --------------------------------------------------------------------

    async def _admin(self, request: web.Request) -> web.Response:
        routes: dict[tuple[str, str], Callable[[web.Request], Awaitable[Any]]] = {
            ("GET", "health"): self._admin_health,
            ("GET", "clock"): self._admin_clock,
            ("POST", "clock"): self._admin_set_clock,
            ("GET", "events"): self._admin_events,
            ("POST", "events"): self._admin_add_events,
            ("GET", "requests"): self._admin_requests,
            ("DELETE", "requests"): self._admin_clear_requests,
            ("GET", "settings"): self._admin_settings,
            ("PATCH", "settings"): self._admin_update_settings,
            ("GET", "faults"): self._admin_faults,
            ("POST", "faults"): self._admin_add_fault,
            ("DELETE", "faults"): self._admin_clear_faults,
        }
        path = request.path.removeprefix("/_sim/").strip("/")
        handler = routes.get((request.method, path))
        if handler is None:
            message = f"No admin route {request.method} /_sim/{path}."
            return web.json_response({"error": message}, status=404)
        try:
            return web.json_response(await handler(request))
        except (ValueError, KeyError, TypeError, ScenarioError) as error:
            return web.json_response({"error": str(error)}, status=400)

    async def _admin_health(self, request: web.Request) -> Any:
        return {"status": "ok"}

    async def _admin_clock(self, request: web.Request) -> Any:
        return {
            "now": format_time(self.clock.now(), fraction=True),
            "rate": self.clock.rate,
        }

    async def _admin_set_clock(self, request: web.Request) -> Any:
        body = await _json_object(request)
        rate = body.get("rate")
        if rate is not None and (not isinstance(rate, int | float) or rate < 0):
            raise ValueError(f"rate {rate!r} must be a number of 0 or more.")
        if body.get("now") is not None:
            moment = datetime.fromisoformat(str(body["now"]))
            self.clock.set(moment, None if rate is None else float(rate))
        elif rate is not None:
            self.clock.set(self.clock.now(), float(rate))
        if body.get("advance_seconds") is not None:
            self.clock.advance(float(body["advance_seconds"]))
        logger.info(
            "TAP simulator clock set now=%s rate=%s", self.clock.now(), self.clock.rate
        )
        return await self._admin_clock(request)

    async def _admin_events(self, request: web.Request) -> Any:
        return [event.summary() for event in self.events]

    async def _admin_add_events(self, request: web.Request) -> Any:
        body = await _json_object(request)
        entries = body.get("events")
        if not isinstance(entries, list):
            raise ValueError("The body must be an object with an events array.")
        return [event.summary() for event in self.add_events(entries)]

    async def _admin_requests(self, request: web.Request) -> Any:
        since = int(request.query.get("since", "0"))
        return [asdict(entry) for entry in self.log if entry.seq > since]

    async def _admin_clear_requests(self, request: web.Request) -> Any:
        self.log.clear()
        return {"status": "cleared"}

    async def _admin_settings(self, request: web.Request) -> Any:
        return asdict(self.settings)

    async def _admin_update_settings(self, request: web.Request) -> Any:
        body = await _json_object(request)
        known = {item.name for item in fields(TapSimSettings)}
        for name, value in body.items():
            if name not in known or name == "request_log_size":
                raise ValueError(f"{name!r} is not a setting that can be changed.")
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise ValueError(f"The setting {name} must be a number, not {value!r}.")
            setattr(self.settings, name, type(getattr(self.settings, name))(value))
        return asdict(self.settings)

    async def _admin_faults(self, request: web.Request) -> Any:
        return [asdict(fault) for fault in self.faults]

    async def _admin_add_fault(self, request: web.Request) -> Any:
        body = await _json_object(request)
        fault = Fault(
            status=int(body["status"]),
            count=int(body.get("count", 1)),
            retry_after=None
            if body.get("retry_after") is None
            else int(body["retry_after"]),
        )
        if not 400 <= fault.status <= 599 or fault.count < 1:
            raise ValueError(
                "A fault needs a status from 400 to 599 and a count of 1 or more."
            )
        self.faults.append(fault)
        return asdict(fault)

    async def _admin_clear_faults(self, request: web.Request) -> Any:
        self.faults.clear()
        return {"status": "cleared"}


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError as error:
        raise ValueError(f"The body is not JSON: {error}") from error
    if not isinstance(body, dict):
        raise ValueError("The body must be a JSON object.")
    return body


# --- command line ---------------------------------------------------------------------


def add_tap_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the TAP simulator's options."""
    defaults = TapSimSettings()
    parser.add_argument(
        "--scenario", type=Path, help="scenario file (JSON) with credentials and events"
    )
    parser.add_argument(
        "--principal", help="service principal; overrides the scenario's"
    )
    parser.add_argument(
        "--secret", help="secret of the principal; overrides the scenario's"
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"
    )
    parser.add_argument("--port", type=int, required=True, help="TCP port to listen on")
    parser.add_argument(
        "--clock",
        help="start time of the virtual clock, ISO 8601 (default: the scenario's "
        "start, else now)",
    )
    parser.add_argument(
        "--clock-rate",
        type=float,
        default=1.0,
        help="speed of the virtual clock relative to real time (default 1)",
    )
    parser.add_argument(
        "--burst-limit",
        type=int,
        default=defaults.burst_limit,
        help="requests within one second before 429; 0 turns it off "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--retry-after",
        type=int,
        default=defaults.retry_after_seconds,
        help="Retry-After of a 429, in seconds (default %(default)s)",
    )
    parser.add_argument(
        "--latency-ms",
        type=float,
        default=0.0,
        help="delay added to every SIEM request, in milliseconds (default 0)",
    )


def run_tap(args: argparse.Namespace) -> int:
    """Serve the TAP simulator until SIGINT or SIGTERM."""
    scenario = (
        load_tap_scenario(args.scenario)
        if args.scenario
        else TapScenario(principal="", secret="")
    )
    scenario.principal = args.principal or scenario.principal
    scenario.secret = args.secret or scenario.secret
    start = _absolute_time(args.clock, "--clock") if args.clock else scenario.start
    settings = TapSimSettings(
        burst_limit=args.burst_limit,
        retry_after_seconds=args.retry_after,
        latency_ms=args.latency_ms,
    )
    clock = VirtualClock(start, rate=args.clock_rate)
    simulator = TapSimulator(scenario, settings, clock=clock)
    asyncio.run(_serve_until_stopped(simulator, args.host, args.port))
    return 0


async def _serve_until_stopped(simulator: TapSimulator, host: str, port: int) -> None:
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopped.set)
    url = await simulator.start(host, port)
    print(f"TAP simulator listening on {url}", flush=True)
    try:
        await stopped.wait()
    finally:
        await simulator.stop()
