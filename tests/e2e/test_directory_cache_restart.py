"""A new worker enriches from the directory cache's changelog while slapd is down.

A first worker enriches an alert to an alias of a VIP and to a list alias, and
writes what the directory returned to the directory_cache table. It is killed
with SIGKILL and slapd is stopped. A second worker with an empty data folder
recovers the table from the changelog and enriches a new alert to the same
addresses with their directory attributes, without slapd. An alert to an address
that no worker looked up waits, retried, and is enriched once slapd is back.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from slapdkit import (
    Slapd,
    by_mailbox,
    changelog_keys,
    enriched_for,
    read_all,
    send_alert,
    wait_for,
)

from autopull.streams.settings import Settings
from autopull.streams.topics import ensure_topics

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

VIP_GROUP = "cn=vip,ou=groups,dc=autopull,dc=test"
# alice@ is an alias of alice.archer@, a VIP through the nested executives group.
# eng@ is an alias of the engineering list, whose members are bob and erin.
SEEN = ["alice@autopull.test", "eng@autopull.test"]
SEEN_MAILBOXES = [
    "alice.archer@autopull.test",
    "bob.brown@autopull.test",
    "erin.evans@autopull.test",
]
# carol@ is an alias of carol.chen@, which no worker looks up before the outage.
UNSEEN = "carol@autopull.test"
# How long the unseen address keeps failing before slapd starts again.
OUTAGE_SECONDS = 10.0


@pytest.fixture
def slapd(tmp_path: Path) -> Iterator[Slapd]:
    instance = Slapd(tmp_path / "slapd")
    instance.run("start")
    yield instance
    instance.run("stop")


def test_new_worker_enriches_from_changelog(
    pipeline_settings: Settings,
    start_worker: Any,
    slapd: Slapd,
    tmp_path: Path,
) -> None:
    directory = slapd.settings().model_copy(update={"vip_groups": (VIP_GROUP,)})
    settings = pipeline_settings.model_copy(
        update={"directory": directory, "data_dir": tmp_path / "first"}
    )
    ensure_topics(settings)
    first = start_worker(settings)

    send_alert(settings, "cache-1@billing-example.net", SEEN)
    before = wait_for(
        lambda: enriched_for(settings, "cache-1@billing-example.net"),
        120,
        "The first worker's enrichment",
    )[0]
    expected_keys = {f"person:{address}" for address in SEEN} | {
        "expansion:eng@autopull.test"
    }
    wait_for(
        lambda: expected_keys <= changelog_keys(settings),
        30,
        "The directory cache's changelog records",
    )
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    slapd.run("stop")

    restarted = settings.model_copy(update={"data_dir": tmp_path / "second"})
    start_worker(restarted)
    send_alert(restarted, "cache-2@billing-example.net", SEEN)
    after = wait_for(
        lambda: enriched_for(restarted, "cache-2@billing-example.net"),
        120,
        "The second worker's enrichment without slapd",
    )[0]

    assert sorted(by_mailbox(before)) == SEEN_MAILBOXES
    assert sorted(by_mailbox(after)) == SEEN_MAILBOXES
    for mailbox, recipient in by_mailbox(after).items():
        assert recipient == by_mailbox(before)[mailbox], mailbox
    alice = by_mailbox(after)["alice.archer@autopull.test"]
    assert alice["vip"] is True
    assert alice["recipient_type"] == "alias"
    assert alice["attributes"]["department"] == "Finance"
    bob = by_mailbox(after)["bob.brown@autopull.test"]
    assert bob["recipient_type"] == "list_member"
    assert bob["path"] == [
        "eng@autopull.test",
        "engineering@autopull.test",
        "bob.brown@autopull.test",
    ]
    assert bob["attributes"]["department"] == "Engineering"
    assert bob["attributes"]["list"] == "eng@autopull.test"

    # Every address of the second alert came from the table: none needed slapd.
    second_log = tmp_path / "worker-1.log"
    assert "Enrichment failed, retrying" not in second_log.read_text()

    send_alert(restarted, "cache-3@billing-example.net", [UNSEEN])
    wait_for(
        lambda: "Enrichment failed, retrying" in second_log.read_text(),
        120,
        "A failed lookup of the unseen address",
    )
    time.sleep(OUTAGE_SECONDS)
    assert enriched_for(restarted, "cache-3@billing-example.net") == []
    assert read_all(restarted, "alerts.dead", "DeadLetter") == []

    slapd.run("start")
    late = wait_for(
        lambda: enriched_for(restarted, "cache-3@billing-example.net"),
        120,
        "The enrichment of the unseen address once slapd is back",
    )[0]
    carol = by_mailbox(late)["carol.chen@autopull.test"]
    assert carol["vip"] is True
    assert carol["recipient_type"] == "alias"
    assert carol["attributes"]["department"] == "Executive Office"
