"""Sent items, rules and tracking logs for forward tracing, through the real clients.

The Graph and EWS simulators run in-process over one generated hybrid world, and
msgraph-sdk and exchangelib reach them over HTTP on 127.0.0.1.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from exchangelib.protocol import CachingProtocol

from autopull.connectors.mail.base import ForwardingRule
from autopull.connectors.mail.ews import EwsPlatform, EwsSettings
from autopull.connectors.mail.graph import GraphPlatform, GraphSettings
from autopull.sim.ews import EwsSimSettings, EwsSimulator
from autopull.sim.graph import GraphSimSettings, GraphSimulator
from autopull.sim.scenarios import (
    GRAPH_TENANT,
    START,
    Scenario,
    combine,
    generate,
    tracking_log,
)
from autopull.sim.world import World

pytestmark = pytest.mark.integration

SERVICE_ACCOUNT = "svc-autopull@corp.example.org"
PASSWORD = "service-account-password"


@pytest.fixture(autouse=True)
def _fresh_protocol_cache() -> Iterator[None]:
    CachingProtocol.clear_cache()
    yield
    CachingProtocol.clear_cache()


# Each scenario's seed names its mailboxes, so no two share a seed. The seed of a
# redirect rule also chooses its platforms: 107 keeps it in Microsoft 365, and 109
# puts it on an Exchange mailbox that redirects to another one.
SCENARIOS = {
    "chain": ("chain", 100),
    "redirect_rule": ("redirect_rule", 107),
    "hybrid_chain": ("hybrid_chain", 102),
    "inbox_rule": ("inbox_rule", 103),
    "decoys": ("decoys", 104),
    "exchange_redirect": ("redirect_rule", 109),
}


@pytest.fixture
def scenarios() -> dict[str, Scenario]:
    return {name: generate(seed, kind) for name, (kind, seed) in SCENARIOS.items()}


@pytest.fixture
def world_path(tmp_path: Path, scenarios: dict[str, Scenario]) -> Path:
    path = tmp_path / "world.json"
    path.write_text(json.dumps(combine(list(scenarios.values()))), encoding="utf-8")
    logs = tmp_path / "tracking"
    logs.mkdir()
    (logs / "MSGTRK20261201-1.LOG").write_text(
        tracking_log(list(scenarios.values())), encoding="utf-8"
    )
    return path


@pytest.fixture
async def graph(world_path: Path) -> AsyncIterator[GraphPlatform]:
    world = World.open(world_path, world_path.parent / "graph-state.json")
    simulator = GraphSimulator(world, GraphSimSettings(), scenario_path=world_path)
    url = await simulator.start()
    platform = GraphPlatform(
        GraphSettings(
            graph_url=f"{url}/v1.0",
            authority_url=url,
            tenant_id=str(GRAPH_TENANT["tenant_id"]),
            client_id=str(GRAPH_TENANT["client_id"]),
            client_secret=str(GRAPH_TENANT["client_secret"]),
            quarantine_mailbox="quarantine@example.com",
        )
    )
    yield platform
    await platform.close()
    await simulator.stop()


@pytest.fixture
async def ews(world_path: Path) -> AsyncIterator[EwsPlatform]:
    world = World.open(world_path, world_path.parent / "ews-state.json")
    settings = EwsSimSettings(service_accounts={SERVICE_ACCOUNT: PASSWORD})
    simulator = EwsSimulator(world, settings, scenario_path=world_path)
    url = await simulator.start()
    platform = EwsPlatform(
        EwsSettings(
            service_endpoint=f"{url}/EWS/Exchange.asmx",
            username=SERVICE_ACCOUNT,
            password=PASSWORD,
            quarantine_mailbox="quarantine@corp.example.org",
            tracking_log_dir=world_path.parent / "tracking",
        )
    )
    yield platform
    await platform.close()
    await simulator.stop()


def forwards_of(scenario: Scenario, sender: str) -> set[str]:
    return {message_id for mailbox, message_id in scenario.sent if mailbox == sender}


async def test_graph_sent_since_reads_mime(
    graph: GraphPlatform, scenarios: dict[str, Scenario]
) -> None:
    chain = scenarios["chain"]
    alice = f"s{chain.seed}.alice@example.com"

    sent = await graph.sent_since(alice, START)

    assert {message.message_id for message in sent} == forwards_of(chain, alice)
    message = sent[0]
    assert message.mailbox == alice
    assert message.recipients == (f"s{chain.seed}.hop0@example.com",)
    assert message.subject is not None
    assert message.subject.endswith("overdue")
    has_evidence = (
        chain.original_id in message.attached_message_ids
        or message.attachment_hashes
        or message.headers.get("References")
    )
    assert has_evidence


async def test_graph_sent_since_skips_earlier(
    graph: GraphPlatform, scenarios: dict[str, Scenario]
) -> None:
    chain = scenarios["chain"]
    alice = f"s{chain.seed}.alice@example.com"

    assert await graph.sent_since(alice, START + timedelta(days=30)) == []


async def test_graph_decoys_are_listed(
    graph: GraphPlatform, scenarios: dict[str, Scenario]
) -> None:
    decoys = scenarios["decoys"]
    alice = f"s{decoys.seed}.alice@example.com"

    sent = await graph.sent_since(alice, START)

    listed = {message.message_id for message in sent}
    holds = {m for box, m in decoys.innocent | decoys.malicious if box == alice}
    assert listed <= holds
    assert forwards_of(decoys, alice) <= listed
    assert any(message_id.startswith("decoy.") for message_id in listed)
    assert any(message_id.startswith("reply.") for message_id in listed)


async def test_graph_rules_name_redirects(
    graph: GraphPlatform, scenarios: dict[str, Scenario]
) -> None:
    scenario = scenarios["redirect_rule"]
    alice = f"s{scenario.seed}.alice@example.com"

    rules = await graph.forwarding_rules(alice)

    assert [(rule.kind, rule.targets) for rule in rules] == [
        ("redirect", (f"s{scenario.seed}.deputy@example.com",))
    ]
    assert await graph.forwarding_rules(f"s{scenario.seed}.deputy@example.com") == []


async def test_ews_rules_name_redirects(
    ews: EwsPlatform, scenarios: dict[str, Scenario]
) -> None:
    seed = scenarios["exchange_redirect"].seed
    alice = f"s{seed}.alice@corp.example.org"

    rules = await ews.forwarding_rules(alice)

    # The disabled redirect to the former assistant is left out.
    assert rules == [
        ForwardingRule(alice, (f"s{seed}.deputy@corp.example.org",), "redirect")
    ]
    assert await ews.forwarding_rules(f"s{seed}.deputy@corp.example.org") == []


async def test_ews_rules_name_inbox_rule_forward(
    ews: EwsPlatform, scenarios: dict[str, Scenario]
) -> None:
    seed = scenarios["inbox_rule"].seed
    alice = f"s{seed}.alice@corp.example.org"

    rules = await ews.forwarding_rules(alice)

    assert rules == [
        ForwardingRule(
            alice, (f"s{seed}.backup@corp.example.org",), "forward_as_attachment"
        )
    ]


async def test_ews_sent_since_reads_mime(
    ews: EwsPlatform, scenarios: dict[str, Scenario]
) -> None:
    hybrid = scenarios["hybrid_chain"]
    hop = f"s{hybrid.seed}.hop0@corp.example.org"

    sent = await ews.sent_since(hop, START)

    assert {message.message_id for message in sent} == forwards_of(hybrid, hop)
    assert sent[0].recipients == (f"s{hybrid.seed}.hop1@example.com",)


async def test_ews_message_trace_reads_logs(
    ews: EwsPlatform, scenarios: dict[str, Scenario]
) -> None:
    scenario = scenarios["inbox_rule"]

    events = await ews.message_trace(scenario.original_id, START)

    generated = {e.message_id for e in events if e.source == "MAILBOXRULE"}
    expected = {m for box, m in scenario.malicious if m != scenario.original_id}
    assert generated == expected
    assert all(e.message_id in {scenario.original_id, *expected} for e in events)


async def test_graph_message_trace_lists_deliveries(
    graph: GraphPlatform, scenarios: dict[str, Scenario]
) -> None:
    scenario = scenarios["redirect_rule"]

    events = await graph.message_trace(scenario.original_id, START)

    delivered = {event.recipients for event in events if event.event == "DELIVER"}
    assert delivered == {
        (f"s{scenario.seed}.alice@example.com",),
        (f"s{scenario.seed}.deputy@example.com",),
    }
    assert {event.message_id for event in events} == {scenario.original_id}
    assert {event.sender for event in events} == {"billing@billing-example.net"}


async def test_graph_message_trace_window_ends(
    graph: GraphPlatform, scenarios: dict[str, Scenario]
) -> None:
    scenario = scenarios["redirect_rule"]

    later = await graph.message_trace(scenario.original_id, START + timedelta(days=1))

    assert later == []
