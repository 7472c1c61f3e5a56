"""Generated forward-tracing worlds: rule placement and held ground truth."""

from __future__ import annotations

from email import message_from_string
from email.policy import compat32

import pytest

from autopull.sim.scenarios import (
    EWS_DOMAIN,
    GRAPH_DOMAIN,
    REDIRECT_LAYOUTS,
    Scenario,
    combine,
    generate,
)
from autopull.sim.world import ScenarioSpec


def domain(address: str) -> str:
    return address.split("@", 1)[1]


def mailbox_named(scenario: Scenario, name: str) -> str:
    prefix = f"s{scenario.seed}.{name}@"
    return next(
        box["address"]
        for box in scenario.mailboxes
        if box["address"].startswith(prefix)
    )


def test_redirect_rule_uses_every_layout() -> None:
    layouts = set()
    for seed in range(1, 61):
        scenario = generate(seed, "redirect_rule")
        alice = mailbox_named(scenario, "alice")
        deputy = mailbox_named(scenario, "deputy")
        layouts.add((domain(alice), domain(deputy)))

    assert layouts == set(REDIRECT_LAYOUTS)


@pytest.mark.parametrize("seed", range(1, 11))
def test_redirect_rule_ground_truth(seed: int) -> None:
    scenario = generate(seed, "redirect_rule")
    alice = mailbox_named(scenario, "alice")
    deputy = mailbox_named(scenario, "deputy")
    former = mailbox_named(scenario, "former")

    assert scenario.forwarding_rules == [
        {"mailbox": alice, "forward_to": [deputy], "kind": "redirect"},
        {
            "mailbox": alice,
            "forward_to": [former],
            "kind": "redirect",
            "enabled": False,
        },
    ]
    assert (deputy, scenario.original_id) in scenario.malicious
    assert not any(mailbox == former for mailbox, _ in scenario.malicious)
    assert domain(former) == domain(alice)


def test_inbox_rule_lists_its_forward_rule() -> None:
    scenario = generate(7, "inbox_rule")
    alice = mailbox_named(scenario, "alice")
    backup = mailbox_named(scenario, "backup")

    assert scenario.forwarding_rules == [
        {"mailbox": alice, "forward_to": [backup], "kind": "forward_as_attachment"}
    ]
    assert domain(alice) == EWS_DOMAIN


def test_medium_forward_copies_are_held() -> None:
    scenario = generate(51, "medium_forward")
    alice = mailbox_named(scenario, "alice")
    bob = mailbox_named(scenario, "bob")
    [(sender, forward_id)] = scenario.sent

    assert sender == alice
    assert scenario.held == {(alice, forward_id), (bob, forward_id)}
    assert scenario.held & scenario.malicious == set()
    assert scenario.malicious == {(alice, scenario.original_id)}


def test_medium_forward_carries_only_subject_and_url() -> None:
    scenario = generate(51, "medium_forward")
    [raw] = [m["raw"] for m in scenario.messages if m["note"] == "forward inline_text"]
    message = message_from_string(raw, policy=compat32)

    assert message["Subject"].endswith(": Invoice 4051 overdue")
    for header in ("References", "In-Reply-To", "X-Forwarded-Message-Id"):
        assert message[header] is None
    assert message["Thread-Index"] is None
    parts = [part.get_content_type() for part in message.walk()]
    assert parts == ["multipart/mixed", "text/plain"]
    assert "pay-51.billing-example.net" in raw


def test_combined_world_loads_disabled_rules() -> None:
    scenarios = [generate(seed, "redirect_rule") for seed in range(1, 4)]

    spec = ScenarioSpec.model_validate(combine(scenarios))

    assert [rule.enabled for rule in spec.forwarding_rules] == [True, False] * 3
    assert {domain(rule.mailbox) for rule in spec.forwarding_rules} <= {
        GRAPH_DOMAIN,
        EWS_DOMAIN,
    }


def test_unknown_kind_names_held_kinds() -> None:
    with pytest.raises(ValueError, match="medium_forward"):
        generate(1, "no_such_kind")
