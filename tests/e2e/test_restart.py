"""A worker killed with SIGKILL while an incident is being built, then replays.

Two pipelines on their own topics and Graph simulators get the same alerts, one
every half second, each naming one more recipient of one campaign message. The
worker of the first is killed halfway and a new one recovers its tables from the
changelogs. Both incidents must end with the same content, and the simulator's
request log must show every original moved once and one evidence copy. Then the
same alerts are sent again, and nothing may be pulled a second time.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from crashkit import (
    QUARANTINE,
    TopicReader,
    decoded,
    generic_alert,
    latest_by,
    start_sim,
    wait_until,
)

from autopull.streams.ingest import Input, RawSender, raw_alert
from autopull.streams.settings import Settings
from autopull.streams.topics import ensure_topics

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_WORLD = REPO_ROOT / "examples" / "worlds" / "demo.json"
DEMO_CONFIG = REPO_ROOT / "examples" / "demo.yaml"
RECIPIENTS = [f"restart{number:02d}@example.com" for number in range(12)]
LATE = "restart-late@example.com"
MESSAGE_ID = "restart-0001@campaign.example.net"
KILL_AFTER = 6
FINAL = {"quarantined", "already_quarantined"}
# Fields that contain times or counts of tries, which differ from run to run.
VOLATILE = {
    "at",
    "created_at",
    "updated_at",
    "started_at",
    "finished_at",
    "seconds_from_alert",
    "attempts",
    "delivered_at",
    "found_at",
}


@pytest.fixture
def pipeline_settings(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> Settings:
    """Settings for `start_worker`; this module passes its own to each worker."""
    return settings_for(kafka_bootstrap, topic_prefix, "http://127.0.0.1:9", tmp_path)


def campaign_world(path: Path) -> Path:
    """Write the demo tenant with one campaign message in every recipient's inbox."""
    world = json.loads(DEMO_WORLD.read_text())
    mailboxes = [*RECIPIENTS, LATE]
    world["mailboxes"] += [{"address": address} for address in mailboxes]
    world["messages"] = [
        {
            "key": "RESTART",
            "malicious": True,
            "message_id": f"<{MESSAGE_ID}>",
            "from": "Payroll <payroll@campaign.example.net>",
            "to": mailboxes,
            "subject": "Salary adjustment",
            "date": "2026-12-01T08:00:00Z",
            "body": "Review at http://campaign.example.net/salary\n",
            "deliveries": [
                {"mailbox": address, "folder": "inbox", "read": False}
                for address in mailboxes
            ],
        }
    ]
    path.write_text(json.dumps(world))
    return path


def settings_for(
    kafka_bootstrap: str, prefix: str, url: str, tmp_path: Path
) -> Settings:
    demo = yaml.safe_load(DEMO_CONFIG.read_text())
    graph = dict(demo["graph"], graph_url=f"{url}/v1.0", authority_url=url)
    return Settings(
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=prefix,
        topic_partitions=4,
        store="memory://",
        data_dir=tmp_path / prefix / "worker",
        web_enabled=False,
        session_timeout_seconds=6,
        pull_max_wait_seconds=5,
        stall_timeout_seconds=20,
        policy=demo["policy"],
        graph=graph,
    )


def content(incident: dict[str, Any]) -> dict[str, Any]:
    """Return an incident without times and tries, with its lists in one order."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items() if k not in VOLATILE}
        if isinstance(value, list):
            return sorted(
                (plain(item) for item in value),
                key=lambda item: json.dumps(item, default=str),
            )
        return value

    result: dict[str, Any] = plain(incident)
    return result


def writes(url: str) -> list[str]:
    """List the simulator's successful writes, without tokens and batch envelopes."""
    rows = httpx.get(f"{url}/_sim/requests").json()
    return [
        f"{row['method']} {row['path']}"
        for row in rows
        if row["method"] in ("POST", "PATCH", "DELETE")
        and row["status"] in (200, 201, 204)
        and "/oauth2/" not in row["path"]
        and not row["path"].endswith("/$batch")
    ]


def moves_of(entries: list[str], mailbox: str) -> list[str]:
    return [
        entry
        for entry in entries
        if entry.startswith(f"POST /v1.0/users/{mailbox}/messages/")
        and entry.endswith("/move")
    ]


def uploads(entries: list[str]) -> list[str]:
    return [e for e in entries if e == f"POST /v1.0/users/{QUARANTINE}/messages"]


def test_restart_mid_incident_keeps_content(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path, start_worker: Any
) -> None:
    world = campaign_world(tmp_path / "world.json")
    killed_sim, killed_url = start_sim(
        "graph", world, tmp_path / "killed.json", tmp_path / "killed-sim.log"
    )
    reference_sim, reference_url = start_sim(
        "graph", world, tmp_path / "reference.json", tmp_path / "reference-sim.log"
    )
    killed = settings_for(kafka_bootstrap, topic_prefix, killed_url, tmp_path)
    # The topic prefix fixture deletes every topic and group below its prefix.
    reference = settings_for(
        kafka_bootstrap, f"{topic_prefix}ref.", reference_url, tmp_path
    )
    try:
        run_and_replay(killed, reference, killed_url, reference_url, start_worker)
    finally:
        for process in (killed_sim, reference_sim):
            process.terminate()
            process.wait(timeout=10)


def run_and_replay(
    killed: Settings,
    reference: Settings,
    killed_url: str,
    reference_url: str,
    start_worker: Any,
) -> None:
    for settings in (killed, reference):
        ensure_topics(settings)
    first = start_worker(killed)
    start_worker(reference)
    senders = {id(s): RawSender(s) for s in (killed, reference)}
    killed_outcomes = TopicReader(killed, "pull.outcomes")
    reference_outcomes = TopicReader(reference, "pull.outcomes")
    killed_incidents = TopicReader(killed, "incidents")
    reference_incidents = TopicReader(reference, "incidents")
    readers = [
        killed_outcomes,
        reference_outcomes,
        killed_incidents,
        reference_incidents,
    ]

    def send(settings: Settings, mailboxes: list[str]) -> None:
        sender = senders[id(settings)]
        for mailbox in mailboxes:
            body = generic_alert(mailbox, MESSAGE_ID)
            sender.send(raw_alert(Input(f"{mailbox}.json", body), None, "test"))
        sender.flush()

    def read_all() -> None:
        for reader in readers:
            reader.poll(0.2)

    def final(reader: TopicReader, mailboxes: list[str]) -> bool:
        done = latest_by(decoded(reader, "PullOutcome"), "mailbox")
        return all(done.get(m, {}).get("status") in FINAL for m in mailboxes)

    try:
        # The incident grows by one recipient every half second.
        for number, mailbox in enumerate(RECIPIENTS):
            if number == KILL_AFTER:
                # Kill as soon as the pulls so far have their outcomes, while the
                # incident still folds them in.
                reached = wait_until(
                    lambda: final(killed_outcomes, RECIPIENTS[:KILL_AFTER]),
                    120,
                    read_all,
                )
                assert reached, "the first pulls did not finish before the kill"
                first.send_signal(signal.SIGKILL)
                first.wait(timeout=10)
                start_worker(killed)
            send(killed, [mailbox])
            send(reference, [mailbox])
            time.sleep(0.5)

        def both_contained() -> bool:
            incidents = [
                list(latest_by(decoded(r, "Incident"), "incident_id").values())
                for r in (killed_incidents, reference_incidents)
            ]
            return all(
                len(found) == 1
                and found[0]["state"] == "contained"
                and len(found[0]["pulls"]) == len(RECIPIENTS)
                for found in incidents
            ) and all(final(r, RECIPIENTS) for r in readers[:2])

        # NOTE: now and then the worker started after the kill loses the first
        # records of partitions without a committed offset and then reads nothing
        # (see autopull.streams.stall). Its watchdog seeks them back after the
        # 20 s stall timeout, which this wait covers.
        assert wait_until(both_contained, 180, read_all), "the incidents did not end"
        time.sleep(3)
        read_all()

        (after_kill,) = latest_by(
            decoded(killed_incidents, "Incident"), "incident_id"
        ).values()
        (without_kill,) = latest_by(
            decoded(reference_incidents, "Incident"), "incident_id"
        ).values()
        expected = content(without_kill)
        found = content(after_kill)
        for field in sorted(expected.keys() | found.keys()):
            assert found.get(field) == expected.get(field), field

        # Every original moved once, and one evidence copy for the incident.
        done = writes(killed_url)
        for mailbox in RECIPIENTS:
            assert len(moves_of(done, mailbox)) == 1, mailbox
        assert len(uploads(done)) == 1
        assert len(uploads(writes(reference_url))) == 1

        # Replays: the same alerts again, then one new recipient, whose pull shows
        # that the worker has read past them.
        outcomes_before = len(decoded(killed_outcomes, "PullOutcome"))
        send(killed, RECIPIENTS)
        send(killed, [LATE])
        assert wait_until(lambda: final(killed_outcomes, [LATE]), 120, read_all)
        time.sleep(5)
        read_all()
    finally:
        for reader in readers:
            reader.close()

    replayed = writes(killed_url)
    for mailbox in RECIPIENTS:
        assert len(moves_of(replayed, mailbox)) == 1, mailbox
    assert len(moves_of(replayed, LATE)) == 1
    assert len(uploads(replayed)) == 1
    later = decoded(killed_outcomes, "PullOutcome")[outcomes_before:]
    assert [o for o in later if o["mailbox"] != LATE and o["status"] not in FINAL] == []
    assert [o["mailbox"] for o in later if o["status"] == "quarantined"] == [LATE]
