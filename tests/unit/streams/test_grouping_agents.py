"""The group, link, exposure and incident agents under Faust's test_context.

The agents run on the memory store without a broker. Their sends are recorded
instead of produced, and each recorded value is fed, as its encoded bytes, to the
next agent, so the chain runs as it does on Kafka but in one process. Records for
topics no agent of the chain reads, such as exposures, stay in `Chain.sent`.

A test context's `put` returns once the agent has taken the value and the agent
first suspends, so the work that the agents run in a thread runs inline here.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from autopull.connectors.sources.detect import parse_alert
from autopull.streams import pipeline
from autopull.streams.app import Pipeline
from autopull.streams.enrich import enrich
from autopull.streams.settings import Settings

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "alerts"
# 2026-12-01 09:00 UTC, a whole hour, so window edges fall on round times.
OPENED = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
STAGES = ("alerts.enriched", "alerts.grouped", "alerts.by_mailbox", "incident.events")
AGENTS = {
    "alerts.enriched": "group",
    "alerts.grouped": "link",
    "alerts.by_mailbox": "exposure",
    "incident.events": "incident",
}


class Chain:
    """The agents of the chain in test contexts, fed in data-flow order."""

    def __init__(self, pipe: Pipeline, contexts: dict[str, Any]) -> None:
        self.pipe = pipe
        self.contexts = contexts
        self.sent: list[tuple[str, str, dict[str, Any]]] = []
        # Every record the agents sent, in order, also those fed to the next agent.
        self.history: list[tuple[str, str, dict[str, Any]]] = []
        # Headers of the latest record an agent encoded itself, by topic and key.
        self.headers: dict[tuple[str, str], dict[str, bytes]] = {}

    async def record(self, topic: str, key: str, value: dict[str, Any]) -> None:
        self.sent.append((topic, key, value))
        self.history.append((topic, key, value))

    async def record_encoded(
        self,
        topic: str,
        key: str,
        data: bytes,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        """Record a value that an agent encoded itself, decoded as a consumer would."""
        self.sent.append((topic, key, self.pipe.decode(topic, data)))
        self.headers[(topic, key)] = dict(headers or [])

    async def feed(self, enriched: dict[str, Any]) -> None:
        """Run one enriched alert through group, link, exposure and incident."""
        await self._put("alerts.enriched", enriched["campaign_key"], enriched)
        while pending := [item for item in self.sent if item[0] in self.contexts]:
            self.sent = [item for item in self.sent if item[0] not in self.contexts]
            for topic, key, value in pending:
                await self._put(topic, key, value)
        self.check_kept_incidents()

    def check_kept_incidents(self) -> None:
        """Assert that each incident the agent kept equals its stored record."""
        table = self.pipe.incidents
        for incident_id, (data, record) in table._kept.items():
            assert table.table.get(incident_id) == data
            assert record == table.codec.loads(data)

    async def _put(self, topic: str, key: str, value: dict[str, Any]) -> None:
        data = self.pipe.codecs[topic].dumps(value)
        await self.contexts[topic].put(data, key=key.encode())

    def incidents(self) -> dict[str, dict[str, Any]]:
        """Return every incident in the incidents table, by id."""
        table = self.pipe.incidents
        return {key: table.get(key) for key in table.table}


@pytest.fixture
def policy_file(request: pytest.FixtureRequest, tmp_path: Path) -> Path | None:
    """Return the policy file of the chain, written from a test's parameter.

    Without a parameter it is None, which stands for the default policy.
    """
    text = getattr(request, "param", None)
    if text is None:
        return None
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return path


async def run_inline(function: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    return function(*args, **kwargs)


@pytest.fixture
async def chain(
    tmp_path: Path, policy_file: Path | None, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Chain]:
    monkeypatch.setattr(pipeline, "to_thread", run_inline)
    settings = Settings(
        kafka_bootstrap="127.0.0.1:9",
        store="memory://",
        data_dir=tmp_path,
        web_enabled=False,
        topic_partitions=1,
        policy={"file": policy_file},
    )
    pipe = Pipeline(settings)
    pipe.app.loop = asyncio.get_running_loop()
    pipe.app.finalize()
    agents = {
        agent.name.rsplit(".", 1)[-1]: agent for agent in pipe.app.agents.values()
    }
    contexts: dict[str, Any] = {}
    managers = []
    for topic in STAGES:
        manager = agents[AGENTS[topic]].test_context()
        contexts[topic] = await manager.__aenter__()
        managers.append(manager)
    result = Chain(pipe, contexts)
    pipe.send = result.record  # type: ignore[method-assign]
    pipe.send_encoded = result.record_encoded  # type: ignore[method-assign]
    yield result
    for manager in reversed(managers):
        await manager.__aexit__(None, None, None)


async def enriched(name: str, at: datetime, **changes: Any) -> dict[str, Any]:
    alerts = parse_alert((EXAMPLES / name).read_bytes(), received_at=at)
    alert = {**alerts[0], "occurred_at": at, **changes}
    return await enrich(alert)


async def tap(at: datetime, number: int, **changes: Any) -> dict[str, Any]:
    """A TAP phish alert of one campaign, about its own message `number`."""
    return await enriched(
        "tap-delivered-phish.json",
        at,
        alert_id=f"tap:event-{number}",
        message_id=f"message-{number}@billing-example.net",
        **changes,
    )


def incident_of(chain: Chain, alert_id: str) -> str:
    found = [
        incident_id
        for incident_id, incident in chain.incidents().items()
        if alert_id in incident["alert_ids"]
    ]
    assert len(found) == 1, f"{alert_id} is in {len(found)} incidents"
    return found[0]


async def test_campaign_alerts_share_incident(chain: Chain) -> None:
    await chain.feed(await tap(OPENED + timedelta(minutes=5), 1))
    await chain.feed(await tap(OPENED + timedelta(hours=3), 2))

    assert len(chain.incidents()) == 1
    assert incident_of(chain, "tap:event-1") == incident_of(chain, "tap:event-2")


async def test_incident_record_says_nothing_untraced(chain: Chain) -> None:
    await chain.feed(await tap(OPENED + timedelta(minutes=5), 1))

    (incident_id,) = chain.incidents()
    assert chain.headers[("incidents", incident_id)] == {"autopull-untraced": b"0"}


async def test_incident_opens_one_window(chain: Chain) -> None:
    await chain.feed(await tap(OPENED + timedelta(minutes=5), 1))
    await chain.feed(await tap(OPENED + timedelta(hours=2), 2))

    campaign_windows = dict(chain.pipe.campaign_windows.raw.items())
    assert len(campaign_windows) == 1
    (key, window_range), entry = next(iter(campaign_windows.items()))
    assert key == "campaign:8a285c6c-bb1e-5f0e-9812-9944f7ba1765"
    assert window_range[0] == OPENED.timestamp()
    assert entry["opened_at"] == (OPENED + timedelta(minutes=5)).timestamp()
    # Each message opens its own message window.
    assert len(dict(chain.pipe.message_windows.raw.items())) == 2


async def test_window_edge_second_before_joins(chain: Chain) -> None:
    # The incident opened at 09:05 covers up to 09:00 the next day.
    await chain.feed(await tap(OPENED + timedelta(minutes=5), 1))
    await chain.feed(await tap(OPENED + timedelta(hours=24, seconds=-1), 2))

    assert len(chain.incidents()) == 1


async def test_window_edge_second_after_opens_new(chain: Chain) -> None:
    await chain.feed(await tap(OPENED + timedelta(minutes=5), 1))
    await chain.feed(await tap(OPENED + timedelta(hours=24, seconds=1), 2))

    assert len(chain.incidents()) == 2
    assert incident_of(chain, "tap:event-1") != incident_of(chain, "tap:event-2")


async def test_out_of_order_alert_joins_incident(chain: Chain) -> None:
    # The later alert arrives first, and the earlier one, 5 hours older, joins it.
    await chain.feed(await tap(OPENED + timedelta(hours=5), 2))
    await chain.feed(await tap(OPENED, 1))
    await chain.feed(await tap(OPENED + timedelta(hours=2), 3))

    assert len(chain.incidents()) == 1
    incident = next(iter(chain.incidents().values()))
    assert incident["alert_ids"] == ["tap:event-2", "tap:event-1", "tap:event-3"]


async def test_out_of_order_beyond_window_opens_new(chain: Chain) -> None:
    await chain.feed(await tap(OPENED + timedelta(hours=30), 2))
    await chain.feed(await tap(OPENED, 1))

    assert len(chain.incidents()) == 2


async def test_late_alert_two_days_later_opens_new(chain: Chain) -> None:
    await chain.feed(await tap(OPENED, 1))
    await chain.feed(await tap(OPENED + timedelta(hours=6), 2))
    await chain.feed(await tap(OPENED + timedelta(days=2), 3))

    first = incident_of(chain, "tap:event-1")
    assert incident_of(chain, "tap:event-2") == first
    assert incident_of(chain, "tap:event-3") != first
    assert len(chain.incidents()) == 2


async def test_tap_and_fireeye_one_incident(chain: Chain) -> None:
    # Both files report the message CAH7x+q/Lk=Zp'8#w%41&r@mail.example.net to
    # dave@example.com. TAP names a campaign here, FireEye never does.
    tap_alert = await enriched(
        "tap-delivered-malware.json", OPENED, campaign_id="tap-campaign-7"
    )
    fireeye_alert = await enriched(
        "fireeye-notification.json", OPENED + timedelta(minutes=20)
    )
    assert tap_alert["campaign_key"] != fireeye_alert["campaign_key"]

    await chain.feed(tap_alert)
    await chain.feed(fireeye_alert)

    incidents = chain.incidents()
    assert len(incidents) == 1
    incident = next(iter(incidents.values()))
    assert incident["sources"] == ["tap", "fireeye"]
    pulls = [(p["mailbox"], p["action"]) for p in incident["pulls"]]
    assert pulls == [("dave@example.com", "pull")]


async def test_fireeye_first_then_tap_one_incident(chain: Chain) -> None:
    fireeye_alert = await enriched("fireeye-notification.json", OPENED)
    tap_alert = await enriched(
        "tap-delivered-malware.json",
        OPENED + timedelta(hours=1),
        campaign_id="tap-campaign-7",
    )
    assert tap_alert["campaign_key"] != fireeye_alert["campaign_key"]

    await chain.feed(fireeye_alert)
    await chain.feed(tap_alert)

    incidents = chain.incidents()
    assert len(incidents) == 1
    assert next(iter(incidents.values()))["sources"] == ["fireeye", "tap"]


async def test_tap_and_generic_one_incident(chain: Chain) -> None:
    tap_alert = await enriched("tap-delivered-phish.json", OPENED)
    generic_alert = await enriched("generic-full.json", OPENED + timedelta(minutes=3))
    assert tap_alert["campaign_key"] != generic_alert["campaign_key"]

    await chain.feed(tap_alert)
    await chain.feed(generic_alert)

    incidents = chain.incidents()
    assert len(incidents) == 1
    assert next(iter(incidents.values()))["sources"] == ["tap", "generic"]


async def test_same_message_days_apart_two_incidents(chain: Chain) -> None:
    await chain.feed(
        await enriched("tap-delivered-malware.json", OPENED, campaign_id="c7")
    )
    await chain.feed(
        await enriched("fireeye-notification.json", OPENED + timedelta(days=2))
    )

    assert len(chain.incidents()) == 2


async def test_replayed_alert_changes_nothing(chain: Chain) -> None:
    alert = await tap(OPENED, 1)
    await chain.feed(alert)
    before = chain.incidents()
    await chain.feed(alert)

    after = chain.incidents()
    assert list(after) == list(before)
    assert after[next(iter(after))]["alert_ids"] == ["tap:event-1"]


def exposures(chain: Chain, mailbox: str) -> list[dict[str, Any]]:
    """Return the Exposure records sent for `mailbox`, in order, decoded."""
    codec = chain.pipe.codecs["exposures"]
    return [
        codec.loads(codec.dumps(value))
        for topic, key, value in chain.sent
        if topic == "exposures" and key == mailbox
    ]


async def test_exposure_counts_messages_per_mailbox(chain: Chain) -> None:
    await chain.feed(await tap(OPENED, 1))
    await chain.feed(await tap(OPENED + timedelta(hours=1), 2))

    for mailbox in ("alice@example.com", "bob@example.com", "carol@example.com"):
        assert len(exposures(chain, mailbox)) == 2
    first, second = exposures(chain, "alice@example.com")
    assert first["messages"] == 1
    assert second["messages"] == 2
    assert second["clicks"] == 0
    assert second["campaigns"] == 1
    assert second["window_start"] == datetime(2026, 12, 1, tzinfo=UTC)
    assert second["window_end"] == datetime(2026, 12, 2, tzinfo=UTC)


async def test_exposure_window_resets_next_day(chain: Chain) -> None:
    await chain.feed(await tap(OPENED, 1))
    await chain.feed(await tap(OPENED + timedelta(hours=20), 2))

    # 09:00 and 05:00 the next day fall in two tumbling windows of one day each.
    latest = exposures(chain, "alice@example.com")[-1]
    assert latest["window_start"] == datetime(2026, 12, 2, tzinfo=UTC)
    assert latest["messages"] == 1


async def test_exposure_counts_clicks(chain: Chain) -> None:
    await chain.feed(await tap(OPENED, 1))
    await chain.feed(
        await enriched(
            "tap-delivered-phish.json",
            OPENED + timedelta(minutes=30),
            alert_id="tap:click-1",
            message_id="message-1@billing-example.net",
            event_class="click_permitted",
            clicker="alice@example.com",
            recipients=["alice@example.com"],
        )
    )

    latest = exposures(chain, "alice@example.com")[-1]
    assert latest["messages"] == 1
    assert latest["clicks"] == 1


async def test_exposure_replay_sends_nothing(chain: Chain) -> None:
    alert = await tap(OPENED, 1)
    await chain.feed(alert)
    await chain.feed(alert)

    assert len(exposures(chain, "alice@example.com")) == 1


async def test_exposure_counts_distinct_campaigns(chain: Chain) -> None:
    await chain.feed(await enriched("tap-delivered-phish.json", OPENED))
    await chain.feed(
        await enriched(
            "tap-delivered-phish.json",
            OPENED + timedelta(hours=1),
            alert_id="tap:other-campaign",
            message_id="other@billing-example.net",
            campaign_id="another-campaign",
        )
    )

    assert len(chain.incidents()) == 2
    latest = exposures(chain, "alice@example.com")[-1]
    assert latest["campaigns"] == 2
    assert latest["messages"] == 2


CAMPAIGN_POLICY = """
version: 1
rules:
  - name: test.hold-high-score
    when:
      score: {at_least: 70}
    action: hold
    reason: The incident scores {score}, so its copies wait.
  - name: test.hold-campaign
    when:
      mailboxes: {above: 4}
    action: hold
    reason: The campaign reached {mailbox_count} mailboxes.
  - name: test.pull
    action: quarantine
    reason: Pulled.
"""


@pytest.mark.parametrize("policy_file", [CAMPAIGN_POLICY], indirect=True)
async def test_policy_sees_incident_mailboxes(chain: Chain) -> None:
    # Three mailboxes each, one shared: the first alert is pulled, and the second
    # brings the incident to five mailboxes, more than the rule allows.
    await chain.feed(await tap(OPENED, 1))
    await chain.feed(
        await tap(
            OPENED + timedelta(hours=1),
            2,
            recipients=["dan@example.com", "erin@example.com", "alice@example.com"],
        )
    )

    incident = next(iter(chain.incidents().values()))
    rules = {(p["mailbox"], p["alert_id"]): p["rule"] for p in incident["pulls"]}
    assert rules[("alice@example.com", "tap:event-1")] == "test.pull"
    assert rules[("dan@example.com", "tap:event-2")] == "test.hold-campaign"
    assert rules[("alice@example.com", "tap:event-2")] == "test.hold-campaign"


@pytest.mark.parametrize("policy_file", [CAMPAIGN_POLICY], indirect=True)
async def test_policy_sees_incident_score(chain: Chain) -> None:
    # phish 30 + active 10 + three mailboxes 5 = 45, then a permitted click by
    # alice adds 15 and malware raises the class to 40: 70.
    await chain.feed(await tap(OPENED, 1))
    await chain.feed(
        await tap(
            OPENED + timedelta(minutes=10),
            2,
            classification="malware",
            event_class="click_permitted",
            clicker="alice@example.com",
            recipients=["alice@example.com"],
        )
    )

    incident = next(iter(chain.incidents().values()))
    assert incident["score"] == 70
    held = [p for p in incident["pulls"] if p["alert_id"] == "tap:event-2"]
    assert [p["rule"] for p in held] == ["test.hold-high-score"]
    assert held[0]["reason"] == "The incident scores 70, so its copies wait."


def generic_body(recipients: list[str]) -> dict[str, Any]:
    return {
        "json_version": "2.0",
        "classification": "phish",
        "email": {
            "message_id": "<invoice-4471@billing-example.net>",
            "recipient": recipients,
        },
    }


def tap_body(recipients: list[str]) -> dict[str, Any]:
    # One event per recipient with one GUID, as TAP may report a message.
    events = [
        {
            "GUID": "bX4Ta9Lq2Wm7Rk1Yp8Vd3Nf6Hc0Zs5",
            "id": f"event-{index}",
            "messageID": "<invoice-4471@billing-example.net>",
            "messageTime": "2026-12-01T09:00:00.000Z",
            "recipient": [recipient],
            "threatsInfoMap": [
                {
                    "classification": "phish",
                    "threatStatus": "active",
                    "threatType": "url",
                    "threat": "http://billing-example.net/pay/4471",
                }
            ],
        }
        for index, recipient in enumerate(recipients)
    ]
    return {"queryEndTime": "2026-12-01T09:05:00Z", "messagesDelivered": events}


BODIES = {"generic": generic_body, "tap": tap_body}


async def feed_one_body(chain: Chain, shape: str, count: int) -> dict[str, Any]:
    """Parse and feed one alert body about one message; return its incident."""
    recipients = [f"user{index}@example.com" for index in range(count)]
    body = json.dumps(BODIES[shape](recipients)).encode()
    for alert in parse_alert(body, received_at=OPENED):
        await chain.feed(await enrich({**alert, "occurred_at": OPENED}))
    incidents = list(chain.incidents().values())
    assert len(incidents) == 1
    return incidents[0]


@pytest.mark.parametrize("shape", BODIES)
async def test_one_alert_above_limit_held(chain: Chain, shape: str) -> None:
    # 60 mailboxes of one message, above the default limit of 50.
    incident = await feed_one_body(chain, shape, 60)

    assert len(incident["pulls"]) == 60
    assert {pull["action"] for pull in incident["pulls"]} == {"hold"}
    assert {pull["rule"] for pull in incident["pulls"]} == {
        "default.hold-large-campaign"
    }
    commands = [item for item in chain.sent if item[0] == "pull.commands"]
    assert commands == []


@pytest.mark.parametrize("shape", BODIES)
async def test_one_alert_at_limit_pulled(chain: Chain, shape: str) -> None:
    incident = await feed_one_body(chain, shape, 50)

    assert len(incident["pulls"]) == 50
    assert {pull["action"] for pull in incident["pulls"]} == {"pull"}
    commands = [item for item in chain.sent if item[0] == "pull.commands"]
    assert len(commands) == 50


async def test_incident_agent_keeps_written_incident(chain: Chain) -> None:
    await chain.feed(await enriched("tap-delivered-phish.json", OPENED))
    (incident_id,) = chain.incidents()
    kept = chain.pipe.incidents._kept[incident_id][1]

    taken = chain.pipe.incidents.take(incident_id)

    assert taken is kept
    assert incident_id not in chain.pipe.incidents._kept


async def test_changed_table_bytes_decode_again(chain: Chain) -> None:
    await chain.feed(await enriched("tap-delivered-phish.json", OPENED))
    (incident_id,) = chain.incidents()
    table = chain.pipe.incidents
    stored = table.get(incident_id)
    assert stored is not None
    stored["title"] = "Changed elsewhere"
    # A changelog recovery writes the store without the agent.
    table.table.data[incident_id] = table.codec.dumps(stored)

    taken = table.take(incident_id)

    assert taken is not None
    assert taken["title"] == "Changed elsewhere"


def sent_to(chain: Chain, topic: str) -> list[tuple[str, dict[str, Any]]]:
    return [(key, value) for name, key, value in chain.history if name == topic]


async def test_large_alert_copies_go_in_slices(
    chain: Chain, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline, "RECIPIENTS_PER_EVENT", 2)
    mailboxes = [f"user{index}@example.com" for index in range(5)]
    await chain.feed(await tap(OPENED, 1, recipients=mailboxes))

    (incident_id,) = chain.incidents()
    grouped = sent_to(chain, "alerts.grouped")
    kinds = [value["kind"] for _, value in grouped]
    assert kinds == ["alert_joined", "exposure", "exposure", "exposure"]
    assert {key for key, _ in grouped} == {"message:message-1@billing-example.net"}
    slices = [value["alert"] for _, value in grouped[1:]]
    slice_mailboxes = [[r["mailbox"] for r in part["recipients"]] for part in slices]
    assert slice_mailboxes == [mailboxes[0:2], mailboxes[2:4], mailboxes[4:]]
    assert [part["alert"]["recipients"] for part in slices] == slice_mailboxes
    assert {value["incident_id"] for _, value in grouped[1:]} == {incident_id}

    events = sent_to(chain, "incident.events")
    assert len(events) == 1
    assert len(events[0][1]["alert"]["recipients"]) == 5

    copies = sent_to(chain, "alerts.by_mailbox")
    assert [key for key, _ in copies] == mailboxes
    for key, copy in copies:
        assert copy["kind"] == "alert_joined"
        assert copy["incident_id"] == incident_id
        assert copy["alert"]["alert"]["recipients"] == [key]
        assert [r["mailbox"] for r in copy["alert"]["recipients"]] == [key]
    for mailbox in mailboxes:
        assert [e["messages"] for e in exposures(chain, mailbox)] == [1]
    incident = chain.incidents()[incident_id]
    assert [pull["mailbox"] for pull in incident["pulls"]] == mailboxes


async def test_alert_at_slice_size_not_sliced(
    chain: Chain, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline, "RECIPIENTS_PER_EVENT", 3)
    await chain.feed(await tap(OPENED, 1))

    kinds = [value["kind"] for _, value in sent_to(chain, "alerts.grouped")]
    assert kinds == ["alert_joined"]
    assert len(sent_to(chain, "alerts.by_mailbox")) == 3
