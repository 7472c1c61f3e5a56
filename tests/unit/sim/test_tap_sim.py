"""The TAP SIEM API simulator: scenario, clock, windows, auth, throttling, admin."""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from autopull.sim.tap import (
    TapScenario,
    TapSimSettings,
    TapSimulator,
    VirtualClock,
    add_tap_arguments,
    build_events,
    load_tap_scenario,
)
from autopull.sim.world import ScenarioError

NOW = datetime(2026, 12, 8, 12, 0, 0, tzinfo=UTC)
AUTH = ("svc-principal", "svc-secret")
GUID = "bX4Ta9Lq2Wm7Rk1Yp8Vd3Nf6Hc0Zs5"


def delivered(
    event_id: str, message_time: str, threat_time: str | None = None
) -> dict[str, Any]:
    return {
        "id": event_id,
        "GUID": GUID,
        "messageID": f"<{event_id}@example.net>",
        "messageTime": message_time,
        "recipient": ["alice@example.com"],
        "sender": "billing@example.net",
        "threatsInfoMap": [
            {
                "threatID": "6d90",
                "classification": "phish",
                "threatStatus": "active",
                "threatTime": threat_time or message_time,
                "threatType": "url",
            }
        ],
    }


def click(event_id: str, click_time: str) -> dict[str, Any]:
    return {
        "id": event_id,
        "GUID": GUID,
        "clickTime": click_time,
        "threatTime": click_time,
        "threatStatus": "active",
        "recipient": "alice@example.com",
        "url": "http://billing-example.net/pay",
    }


def entry(array: str, event: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": array, "event": event, **extra}


def scenario(*entries: dict[str, Any]) -> TapScenario:
    return TapScenario(
        principal=AUTH[0], secret=AUTH[1], start=NOW, events=list(entries)
    )


class Running:
    """A started simulator and an HTTP client pointed at it."""

    def __init__(self, simulator: TapSimulator, http: httpx.AsyncClient) -> None:
        self.simulator = simulator
        self.http = http

    async def siem(
        self, path: str = "/v2/siem/all", auth: Any = AUTH, **params: Any
    ) -> httpx.Response:
        return await self.http.get(path, params=params, auth=auth)


@pytest.fixture
async def sim_factory() -> AsyncIterator[Any]:
    started: list[Running] = []

    async def start(
        *entries: dict[str, Any], settings: TapSimSettings | None = None
    ) -> Running:
        clock = VirtualClock(NOW, rate=0.0)
        simulator = TapSimulator(
            scenario(*entries), settings or TapSimSettings(burst_limit=0), clock=clock
        )
        url = await simulator.start("127.0.0.1", 0)
        running = Running(simulator, httpx.AsyncClient(base_url=url))
        started.append(running)
        return running

    yield start
    for running in started:
        await running.http.aclose()
        await running.simulator.stop()


# --- clock ----------------------------------------------------------------------------


class FakeMonotonic:
    def __init__(self) -> None:
        self.value = 100.0

    def __call__(self) -> float:
        return self.value


def test_virtual_clock_runs_at_its_rate() -> None:
    monotonic = FakeMonotonic()
    clock = VirtualClock(NOW, rate=60.0, monotonic=monotonic)

    monotonic.value += 10

    assert clock.now() == NOW + timedelta(minutes=10)


def test_virtual_clock_set_and_advance() -> None:
    monotonic = FakeMonotonic()
    clock = VirtualClock(NOW, monotonic=monotonic)

    clock.set(NOW + timedelta(days=2), rate=0.0)
    monotonic.value += 50
    clock.advance(30)

    assert clock.now() == NOW + timedelta(days=2, seconds=30)
    assert clock.rate == 0.0


def test_virtual_clock_rejects_naive_time() -> None:
    with pytest.raises(ValueError):
        VirtualClock(NOW).set(datetime(2026, 12, 8))


# --- scenario -------------------------------------------------------------------------


def test_build_events_default_creation_time() -> None:
    event = delivered("e1", "2026-12-08T09:30:00.000Z", "2026-12-08T11:40:00.000Z")

    [built] = build_events([entry("messagesDelivered", event)], NOW)

    assert built.created == datetime(2026, 12, 8, 11, 40, tzinfo=UTC)
    assert built.visible == built.created


def test_build_events_relative_times_count_from_now() -> None:
    event = delivered("e1", "2026-12-08T09:30:00.000Z")

    [built] = build_events(
        [entry("messagesDelivered", event, created=-600, visible=300)], NOW
    )

    assert built.created == NOW - timedelta(minutes=10)
    assert built.visible == NOW + timedelta(minutes=5)


def test_build_events_verdict_change_reemits_event() -> None:
    event = delivered("e1", "2026-12-08T09:30:00.000Z")
    change = {"at": "2026-12-08T11:45:00Z", "threatStatus": "falsePositive"}

    original, verdict = build_events(
        [entry("messagesDelivered", event, verdicts=[change])], NOW
    )

    assert verdict.created == datetime(2026, 12, 8, 11, 45, tzinfo=UTC)
    assert verdict.data["id"] != original.data["id"]
    assert verdict.data["GUID"] == original.data["GUID"]
    assert verdict.data["messageTime"] == original.data["messageTime"]
    threat = verdict.data["threatsInfoMap"][0]
    assert threat["threatStatus"] == "falsePositive"
    assert threat["threatTime"] == "2026-12-08T11:45:00.000Z"
    assert original.data["threatsInfoMap"][0]["threatStatus"] == "active"


def test_build_events_verdict_ids_are_stable() -> None:
    event = delivered("e1", "2026-12-08T09:30:00.000Z")
    entries = [entry("messagesDelivered", event, verdicts=[{"at": -60}])]

    first = build_events(entries, NOW)[1].data["id"]
    second = build_events(entries, NOW)[1].data["id"]

    assert first == second


def test_build_events_click_verdict_changes_the_click() -> None:
    event = click("c1", "2026-12-08T09:30:00.000Z")
    change = {"at": -60, "threatStatus": "cleared", "classification": "spam"}

    _, verdict = build_events([entry("clicksPermitted", event, verdicts=[change])], NOW)

    assert verdict.data["threatStatus"] == "cleared"
    assert verdict.data["classification"] == "spam"


@pytest.mark.parametrize(
    ("bad_entry", "detail"),
    [
        ({"type": "messages", "event": {}}, "type"),
        ({"type": "messagesDelivered", "event": []}, "event must be an object"),
        ({"type": "messagesDelivered", "event": {"id": "x"}}, "no created time"),
        (
            entry(
                "messagesDelivered",
                delivered("e1", "2026-12-08T09:30:00Z"),
                visible="2026-12-08T09:00:00Z",
            ),
            "visible is before",
        ),
        (
            entry(
                "messagesDelivered",
                delivered("e1", "2026-12-08T09:30:00Z"),
                created="2026-12-08T09:30:00",
            ),
            "no time zone",
        ),
        (
            entry(
                "messagesDelivered",
                delivered("e1", "2026-12-08T09:30:00Z"),
                verdicts=[{"threatStatus": "cleared"}],
            ),
            "at is required",
        ),
    ],
)
def test_build_events_invalid_entries_name_the_field(
    bad_entry: dict[str, Any], detail: str
) -> None:
    with pytest.raises(ScenarioError) as caught:
        build_events([bad_entry], NOW)

    assert "events[0]" in str(caught.value)
    assert detail in str(caught.value)


def test_load_tap_scenario_reads_credentials_and_start(tmp_path: Path) -> None:
    path = tmp_path / "tap.json"
    path.write_text(
        json.dumps(
            {
                "credentials": {"principal": "p", "secret": "s"},
                "start": "2026-12-08T12:00:00Z",
                "events": [],
            }
        )
    )

    loaded = load_tap_scenario(path)

    assert (loaded.principal, loaded.secret) == ("p", "s")
    assert loaded.start == NOW


def test_load_tap_scenario_invalid_json_raises(tmp_path: Path) -> None:
    path = tmp_path / "tap.json"
    path.write_text("{not json")

    with pytest.raises(ScenarioError) as caught:
        load_tap_scenario(path)

    assert str(path) in str(caught.value)


def test_simulator_without_credentials_is_rejected() -> None:
    with pytest.raises(ScenarioError):
        TapSimulator(TapScenario(principal="", secret=""))


def test_add_tap_arguments_defaults() -> None:
    parser = argparse.ArgumentParser()
    add_tap_arguments(parser)

    args = parser.parse_args(["--port", "8800"])

    assert args.port == 8800
    assert args.host == "127.0.0.1"
    assert args.burst_limit == TapSimSettings().burst_limit
    assert args.clock_rate == 1.0


# --- SIEM API -------------------------------------------------------------------------


async def test_siem_all_returns_envelope_with_every_array(sim_factory: Any) -> None:
    sim = await sim_factory(
        entry("messagesDelivered", delivered("e1", "2026-12-08T11:10:00.123Z")),
        entry("clicksPermitted", click("c1", "2026-12-08T11:20:00.000Z")),
    )

    response = await sim.siem(interval="2026-12-08T11:00:00Z/2026-12-08T12:00:00Z")

    assert response.status_code == 200
    body = response.json()
    assert list(body) == [
        "queryEndTime",
        "messagesDelivered",
        "messagesBlocked",
        "clicksPermitted",
        "clicksBlocked",
    ]
    assert body["queryEndTime"] == "2026-12-08T12:00:00Z"
    assert [event["id"] for event in body["messagesDelivered"]] == ["e1"]
    assert [event["id"] for event in body["clicksPermitted"]] == ["c1"]


@pytest.mark.parametrize(
    ("path", "arrays"),
    [
        ("/v2/siem/messages/delivered", ["messagesDelivered"]),
        ("/v2/siem/messages/blocked", ["messagesBlocked"]),
        ("/v2/siem/clicks/permitted", ["clicksPermitted"]),
        ("/v2/siem/clicks/blocked", ["clicksBlocked"]),
        ("/v2/siem/issues", ["clicksPermitted", "messagesDelivered"]),
    ],
)
async def test_siem_endpoints_return_only_their_arrays(
    sim_factory: Any, path: str, arrays: list[str]
) -> None:
    sim = await sim_factory()

    response = await sim.siem(path, sinceSeconds=3600)

    assert response.status_code == 200
    assert list(response.json()) == ["queryEndTime", *arrays]


async def test_siem_window_is_half_open(sim_factory: Any) -> None:
    sim = await sim_factory(
        entry("messagesDelivered", delivered("at-start", "2026-12-08T11:00:00.000Z")),
        entry("messagesDelivered", delivered("at-end", "2026-12-08T11:30:00.000Z")),
    )

    response = await sim.siem(interval="2026-12-08T11:00:00Z/2026-12-08T11:30:00Z")

    ids = [event["id"] for event in response.json()["messagesDelivered"]]
    assert ids == ["at-start"]


async def test_siem_late_indexed_event_appears_later(
    sim_factory: Any,
) -> None:
    late = entry(
        "messagesDelivered",
        delivered("late", "2026-12-08T11:55:00.000Z"),
        visible="2026-12-08T12:20:00Z",
    )
    sim = await sim_factory(late)
    interval = "2026-12-08T11:30:00Z/2026-12-08T12:00:00Z"

    before = await sim.siem(interval=interval)
    await sim.http.post("/_sim/clock", json={"advance_seconds": 20 * 60})
    after = await sim.siem(interval=interval)

    assert before.json()["messagesDelivered"] == []
    assert [e["id"] for e in after.json()["messagesDelivered"]] == ["late"]


async def test_siem_late_verdict_appears_in_a_later_window(sim_factory: Any) -> None:
    event = delivered("e1", "2026-12-08T09:10:00.000Z")
    change = {"at": "2026-12-08T11:40:00Z", "threatStatus": "cleared"}
    sim = await sim_factory(entry("messagesDelivered", event, verdicts=[change]))

    first = await sim.siem(interval="2026-12-08T09:00:00Z/2026-12-08T10:00:00Z")
    middle = await sim.siem(interval="2026-12-08T10:00:00Z/2026-12-08T11:00:00Z")
    last = await sim.siem(interval="2026-12-08T11:00:00Z/2026-12-08T12:00:00Z")

    assert [e["id"] for e in first.json()["messagesDelivered"]] == ["e1"]
    assert middle.json()["messagesDelivered"] == []
    [verdict] = last.json()["messagesDelivered"]
    assert verdict["GUID"] == GUID
    assert verdict["threatsInfoMap"][0]["threatStatus"] == "cleared"


async def test_siem_status_filter_default(
    sim_factory: Any,
) -> None:
    event = delivered("e1", "2026-12-08T11:10:00.000Z")
    event["threatsInfoMap"][0]["threatStatus"] = "falsePositive"
    sim = await sim_factory(entry("messagesDelivered", event))
    interval = "2026-12-08T11:00:00Z/2026-12-08T12:00:00Z"

    default = await sim.siem(interval=interval)
    asked = await sim.http.get(
        "/v2/siem/all",
        params=[
            ("interval", interval),
            ("threatStatus", "active"),
            ("threatStatus", "falsePositive"),
        ],
        auth=AUTH,
    )

    assert default.json()["messagesDelivered"] == []
    assert [e["id"] for e in asked.json()["messagesDelivered"]] == ["e1"]


async def test_siem_threat_type_filter(sim_factory: Any) -> None:
    sim = await sim_factory(
        entry("messagesDelivered", delivered("e1", "2026-12-08T11:10:00.000Z"))
    )
    interval = "2026-12-08T11:00:00Z/2026-12-08T12:00:00Z"

    urls = await sim.siem(interval=interval, threatType="url")
    attachments = await sim.siem(interval=interval, threatType="attachment")

    assert len(urls.json()["messagesDelivered"]) == 1
    assert attachments.json()["messagesDelivered"] == []


@pytest.mark.parametrize(
    ("interval", "start", "end"),
    [
        ("PT30M/2026-12-08T12:00:00Z", "2026-12-08T11:30:00Z", "2026-12-08T12:00:00Z"),
        ("2026-12-08T11:00:00Z/PT1H", "2026-12-08T11:00:00Z", "2026-12-08T12:00:00Z"),
        (
            "2026-12-08T12:30:00+01:00/2026-12-08T12:00:00Z",
            "2026-12-08T11:30:00Z",
            "2026-12-08T12:00:00Z",
        ),
    ],
)
async def test_siem_interval_forms(
    sim_factory: Any, interval: str, start: str, end: str
) -> None:
    sim = await sim_factory()

    response = await sim.siem(interval=interval)

    assert response.status_code == 200
    [logged] = sim.simulator.log
    assert (logged.window_start, logged.window_end) == (start, end)
    assert response.json()["queryEndTime"] == end


async def test_siem_since_time_ends_at_the_minute(sim_factory: Any) -> None:
    sim = await sim_factory()
    sim.simulator.clock.set(NOW + timedelta(seconds=42), rate=0.0)

    response = await sim.siem(sinceTime="2026-12-08T11:30:00Z")

    assert response.json()["queryEndTime"] == "2026-12-08T12:00:00Z"


async def test_siem_since_seconds_ends_now(sim_factory: Any) -> None:
    sim = await sim_factory()

    response = await sim.siem(sinceSeconds=600)

    assert response.json()["queryEndTime"] == "2026-12-08T12:00:00Z"
    assert sim.simulator.log[0].window_start == "2026-12-08T11:50:00Z"


@pytest.mark.parametrize(
    ("params", "detail"),
    [
        ({}, "Exactly one"),
        (
            {
                "interval": "2026-12-08T11:00:00Z/2026-12-08T12:00:00Z",
                "sinceSeconds": 60,
            },
            "Exactly one",
        ),
        ({"interval": "2026-12-08T10:59:59Z/2026-12-08T12:00:00Z"}, "one hour"),
        ({"interval": "2026-12-08T11:59:40Z/2026-12-08T12:00:00Z"}, "30 seconds"),
        ({"interval": "2026-12-08T12:00:00Z/2026-12-08T11:00:00Z"}, "ends before"),
        ({"interval": "2026-12-01T11:59:59Z/2026-12-01T12:30:00Z"}, "7 days"),
        ({"interval": "2026-12-08T12:00:01Z/2026-12-08T12:30:00Z"}, "future"),
        ({"interval": "yesterday"}, "ISO 8601"),
        ({"interval": "2026-12-08T11:00:00/2026-12-08T12:00:00"}, "time zone"),
        ({"sinceSeconds": 3601}, "30 to 3600"),
        ({"sinceSeconds": 29}, "30 to 3600"),
        ({"sinceSeconds": "ten"}, "whole number"),
        ({"sinceTime": "2026-12-08T10:00:00Z"}, "one hour"),
        ({"sinceSeconds": 60, "format": "syslog"}, "json only"),
        ({"sinceSeconds": 60, "threatStatus": "expired"}, "threatStatus"),
        ({"sinceSeconds": 60, "threatType": "macro"}, "threatType"),
    ],
)
async def test_siem_rejects_invalid_requests_with_400(
    sim_factory: Any, params: dict[str, Any], detail: str
) -> None:
    sim = await sim_factory()

    response = await sim.siem(**params)

    assert response.status_code == 400
    assert detail in response.text


async def test_siem_lookback_limit_allows_exactly_seven_days(sim_factory: Any) -> None:
    sim = await sim_factory()

    response = await sim.siem(interval="2026-12-01T12:00:00Z/2026-12-01T13:00:00Z")

    assert response.status_code == 200


@pytest.mark.parametrize(
    "auth", [None, ("svc-principal", "wrong"), ("other", "svc-secret")]
)
async def test_siem_without_valid_credentials_is_401(
    sim_factory: Any, auth: Any
) -> None:
    sim = await sim_factory()

    response = await sim.siem(auth=auth, sinceSeconds=60)

    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Basic")


async def test_siem_malformed_basic_header_is_401(sim_factory: Any) -> None:
    sim = await sim_factory()

    response = await sim.http.get(
        "/v2/siem/all",
        params={"sinceSeconds": 60},
        headers={"Authorization": "Basic !!!"},
    )

    assert response.status_code == 401


async def test_siem_burst_over_limit_is_429(sim_factory: Any) -> None:
    sim = await sim_factory(
        settings=TapSimSettings(burst_limit=2, retry_after_seconds=3)
    )

    statuses = [(await sim.siem(sinceSeconds=60)).status_code for _ in range(3)]
    throttled = await sim.siem(sinceSeconds=60)

    assert statuses == [200, 200, 429]
    assert throttled.headers["Retry-After"] == "3"


async def test_siem_unknown_endpoint_is_404(sim_factory: Any) -> None:
    sim = await sim_factory()

    response = await sim.siem("/v2/siem/everything", sinceSeconds=60)

    assert response.status_code == 404


# --- admin API ------------------------------------------------------------------------


async def test_admin_clock_get_and_set(sim_factory: Any) -> None:
    sim = await sim_factory()

    before = (await sim.http.get("/_sim/clock")).json()
    changed = await sim.http.post(
        "/_sim/clock", json={"now": "2026-12-10T00:00:00Z", "advance_seconds": 90}
    )

    assert before == {"now": "2026-12-08T12:00:00.000Z", "rate": 0.0}
    assert changed.json()["now"] == "2026-12-10T00:01:30.000Z"


async def test_admin_clock_replays_days_for_the_lookback(sim_factory: Any) -> None:
    sim = await sim_factory()
    interval = "2026-12-08T11:00:00Z/2026-12-08T12:00:00Z"

    await sim.http.post("/_sim/clock", json={"advance_seconds": 8 * 24 * 3600})
    response = await sim.siem(interval=interval)

    assert response.status_code == 400
    assert "7 days" in response.text


async def test_admin_requests_log_windows_and_statuses(sim_factory: Any) -> None:
    sim = await sim_factory(
        entry("messagesDelivered", delivered("e1", "2026-12-08T11:10:00.000Z"))
    )
    await sim.siem(interval="2026-12-08T11:00:00Z/2026-12-08T12:00:00Z")
    await sim.siem(interval="2026-12-08T10:00:00Z/2026-12-08T12:00:00Z")

    log = (await sim.http.get("/_sim/requests")).json()
    since = (await sim.http.get("/_sim/requests", params={"since": 1})).json()

    assert [entry["status"] for entry in log] == [200, 400]
    assert log[0]["window_start"] == "2026-12-08T11:00:00Z"
    assert log[0]["window_end"] == "2026-12-08T12:00:00Z"
    assert log[0]["events"] == 1
    assert "one hour" in log[1]["error"]
    assert [entry["seq"] for entry in since] == [2]


async def test_admin_events_added_at_runtime_are_served(sim_factory: Any) -> None:
    sim = await sim_factory()
    event = delivered("added", "2026-12-08T11:50:00.000Z")

    added = await sim.http.post(
        "/_sim/events", json={"events": [entry("messagesDelivered", event)]}
    )
    response = await sim.siem(sinceSeconds=1800)

    assert added.status_code == 200
    assert added.json()[0]["id"] == "added"
    assert [e["id"] for e in response.json()["messagesDelivered"]] == ["added"]


async def test_admin_invalid_events_are_400(sim_factory: Any) -> None:
    sim = await sim_factory()

    response = await sim.http.post(
        "/_sim/events", json={"events": [{"type": "nothing"}]}
    )

    assert response.status_code == 400
    assert "events[0].type" in response.json()["error"]


async def test_admin_fault_answers_next_requests(sim_factory: Any) -> None:
    sim = await sim_factory()

    await sim.http.post(
        "/_sim/faults", json={"status": 503, "count": 2, "retry_after": 4}
    )
    statuses = [(await sim.siem(sinceSeconds=60)).status_code for _ in range(3)]
    faults = (await sim.http.get("/_sim/faults")).json()

    assert statuses == [503, 503, 200]
    assert faults == []


async def test_admin_settings_change_the_burst_limit(sim_factory: Any) -> None:
    sim = await sim_factory()

    changed = await sim.http.patch("/_sim/settings", json={"burst_limit": 1})
    statuses = [(await sim.siem(sinceSeconds=60)).status_code for _ in range(2)]

    assert changed.json()["burst_limit"] == 1
    assert statuses == [200, 429]


async def test_admin_unknown_route_is_404(sim_factory: Any) -> None:
    sim = await sim_factory()

    response = await sim.http.get("/_sim/nothing")

    assert response.status_code == 404
