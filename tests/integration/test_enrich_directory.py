"""Enrichment against a real slapd: aliases, lists, VIPs, and a directory outage."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest

from autopull.connectors.directory import DirectorySettings
from autopull.connectors.directory.client import Directory
from autopull.streams.enrich import LIST_TOO_LARGE, enrich, enrich_until_done

pytestmark = pytest.mark.integration

VIP_GROUP = "cn=vip,ou=groups,dc=autopull,dc=test"


def settings_for(instance: Any, **overrides: Any) -> DirectorySettings:
    values: dict[str, Any] = {
        "url": instance.url,
        "bind_dn": instance.bind_dn,
        "password": instance.password,
        "base_dn": instance.base_dn,
        "flavor": "openldap",
        "vip_groups": (VIP_GROUP,),
        "paged_size": 4,
        "connect_timeout_seconds": 2.0,
        "receive_timeout_seconds": 5,
        "max_attempts": 2,
        "retry_backoff_seconds": 0.01,
        "max_retry_wait_seconds": 0.05,
    }
    values.update(overrides)
    return DirectorySettings(**values)


def alert(*recipients: str) -> dict[str, Any]:
    return {
        "alert_id": "tap:enrich-1",
        "message_id": "m1@example.net",
        "recipients": list(recipients),
        "clicker": None,
        "campaign_id": "c-1",
        "urls": [],
        "attachments": [],
        "sender": "billing@example.net",
        "received_at": datetime(2026, 12, 1, tzinfo=UTC),
    }


@pytest.fixture
async def directory(slapd: Any) -> AsyncIterator[Directory]:
    async with Directory(settings_for(slapd)) as client:
        yield client


async def test_alias_resolves_to_primary_mailbox(directory: Directory) -> None:
    enriched = await enrich(alert("Robert.Brown@autopull.test"), directory)
    (bob,) = enriched["recipients"]
    assert bob["mailbox"] == "bob.brown@autopull.test"
    assert bob["recipient_type"] == "alias"
    assert bob["path"] == ["robert.brown@autopull.test", "bob.brown@autopull.test"]


async def test_list_expands_to_members_with_paths(directory: Directory) -> None:
    enriched = await enrich(alert("all-staff@autopull.test"), directory)
    by_mailbox = {r["mailbox"]: r for r in enriched["recipients"]}
    assert "erin.evans@autopull.test" in by_mailbox
    erin = by_mailbox["erin.evans@autopull.test"]
    assert erin["recipient_type"] == "list_member"
    assert erin["path"][0] == "all-staff@autopull.test"
    assert erin["path"][-1] == "erin.evans@autopull.test"
    assert len(by_mailbox) == len(enriched["recipients"])


async def test_vip_member_is_flagged(directory: Directory) -> None:
    enriched = await enrich(alert("carol@autopull.test"), directory)
    assert enriched["recipients"][0]["vip"] is True
    assert enriched["recipients"][0]["mailbox"] == "carol.chen@autopull.test"


async def test_cycle_ends_with_each_member_once(directory: Directory) -> None:
    enriched = await enrich(alert("loop-a@autopull.test"), directory)
    mailboxes = sorted(r["mailbox"] for r in enriched["recipients"])
    assert mailboxes == ["alice.archer@autopull.test", "bob.brown@autopull.test"]


async def test_large_list_members_are_marked(slapd: Any) -> None:
    async with Directory(settings_for(slapd, max_list_members=3)) as client:
        enriched = await enrich(alert("all-staff@autopull.test"), client)
    assert enriched["recipients"]
    assert all(
        r["attributes"][LIST_TOO_LARGE] == "true" for r in enriched["recipients"]
    )


async def test_unknown_address_stands_for_itself(directory: Directory) -> None:
    enriched = await enrich(alert("*)(uid=*@autopull.test"), directory)
    (only,) = enriched["recipients"]
    assert only["mailbox"] == "*)(uid=*@autopull.test"
    assert only["recipient_type"] == "original"


async def test_outage_waits_then_completes(own_slapd: Any) -> None:
    async with Directory(settings_for(own_slapd)) as client:
        warm = await enrich(alert("bob@autopull.test"), client)
        assert warm["recipients"][0]["mailbox"] == "bob.brown@autopull.test"
        client.clear_cache()
        own_slapd.stop()

        task = asyncio.create_task(
            enrich_until_done(alert("bob@autopull.test"), client, max_wait_seconds=0.5)
        )
        await asyncio.sleep(2.0)
        assert not task.done()

        own_slapd.start()
        enriched = await asyncio.wait_for(task, timeout=60)
    assert [r["mailbox"] for r in enriched["recipients"]] == ["bob.brown@autopull.test"]
