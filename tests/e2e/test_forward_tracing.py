"""Forward tracing end to end: generated hybrid worlds on the real broker.

One Graph simulator, one EWS simulator and one worker serve every scenario of the
module. Each scenario's alert names only the first recipients; the worker must find
and quarantine every other malicious copy (forwards, their Sent Items copies,
redirects, list expansions, inbox-rule copies) and leave every decoy in place. A
forward whose only evidence is medium shares the run: its copies wait for approval.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import Consumer

from autopull.schemas import AvroCodec
from autopull.sim.scenarios import (
    EWS_DOMAIN,
    GRAPH_DOMAIN,
    GRAPH_TENANT,
    Scenario,
    combine,
    generate,
    tracking_log,
)
from autopull.streams.forward_tree import trace_state
from autopull.streams.ingest import Input, RawSender, raw_alert
from autopull.streams.settings import Settings
from autopull.streams.topics import ensure_topics, full_name

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

SEEDS = range(1, 51)
HELD_SEED = 51
SERVICE_ACCOUNT = "svc-autopull@corp.example.org"
PASSWORD = "service-account-password"
QUARANTINE_FOLDER = "Autopull Quarantine"
QUARANTINE = {f"quarantine@{GRAPH_DOMAIN}", f"quarantine@{EWS_DOMAIN}"}
RUN_TIMEOUT = 420.0
READ_KEY = "trace-read-key"
ANALYST_KEY = "trace-analyst-key"
APPROVAL_TIMEOUT = 120.0


@dataclass
class TraceRun:
    """The finished run: scenarios, the last state of each incident, both sims.

    `held` is the scenario whose forward has only medium evidence; it is not in
    `scenarios`, whose copies must all be pulled without approval.
    """

    scenarios: list[Scenario]
    incidents: dict[str, dict[str, Any]]
    graph_url: str
    ews_url: str
    api_url: str
    environment: dict[str, str]
    held: Scenario
    settings: Settings

    def incident_of(self, scenario: Scenario) -> dict[str, Any]:
        return self.incidents[scenario.original_id]

    def mailbox(self, address: str) -> list[dict[str, Any]]:
        url = self.graph_url if address.endswith(GRAPH_DOMAIN) else self.ews_url
        response = httpx.get(f"{url}/_sim/mailboxes/{address}/messages", timeout=30)
        response.raise_for_status()
        rows: list[dict[str, Any]] = response.json()
        return rows


def start_sim(
    kind: str, world: Path, state: Path, log: Path, port: int
) -> tuple[str, Any]:
    command = [
        sys.executable,
        "-m",
        "autopull.sim",
        kind,
        "--world",
        str(world),
        "--state",
        str(state),
        "--port",
        str(port),
    ]
    if kind == "ews":
        command += ["--service-account", f"{SERVICE_ACCOUNT}:{PASSWORD}"]
    handle = log.open("wb")
    process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{url}/_sim/health", timeout=1).status_code == 200:
                return url, process
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"The {kind} simulator did not start: {log.read_text()}")
        time.sleep(0.1)


def read_incidents(settings: Settings) -> dict[str, dict[str, Any]]:
    """Return the latest record of every incident on the incidents topic."""
    codec = AvroCodec("Incident")
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"test-reader-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([full_name(settings, "incidents")])
    latest: dict[str, dict[str, Any]] = {}
    idle = 0
    try:
        while idle < 4:
            batch = consumer.consume(num_messages=500, timeout=0.5)
            idle = 0 if batch else idle + 1
            for message in batch:
                if message.error() is None and message.value() is not None:
                    record = codec.loads(message.value())
                    latest[record["incident_id"]] = record
    finally:
        consumer.close()
    return latest


def settled(incident: dict[str, Any]) -> bool:
    pending = [
        entry
        for entry in incident["pulls"]
        if entry["action"] == "pull" and entry["status"] in (None, "throttled")
    ]
    return not pending and trace_state(incident) == "finished"


def held_pairs(incident: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (entry["mailbox"], entry["message_id"])
        for entry in incident["pulls"]
        if entry["status"] == "held"
    }


def incidents_by_message(settings: Settings) -> dict[str, dict[str, Any]]:
    return {
        message_id: incident
        for incident in read_incidents(settings).values()
        for message_id in incident["message_ids"]
    }


@pytest.fixture(scope="module")
def trace_run(
    kafka_bootstrap: str,
    tmp_path_factory: pytest.TempPathFactory,
    worker_environment: Callable[[Settings], dict[str, str]],
    pick_port: Callable[[], int],
) -> Iterator[TraceRun]:
    folder = tmp_path_factory.mktemp("trace")
    scenarios = [generate(seed) for seed in SEEDS]
    held = generate(HELD_SEED, "medium_forward")
    world = folder / "world.json"
    world.write_text(json.dumps(combine([*scenarios, held])), encoding="utf-8")
    logs = folder / "tracking"
    logs.mkdir()
    (logs / "MSGTRK20261201-1.LOG").write_text(tracking_log(scenarios), "utf-8")

    graph_url, graph = start_sim(
        "graph", world, folder / "graph-state.json", folder / "graph.log", pick_port()
    )
    ews_url, ews = start_sim(
        "ews", world, folder / "ews-state.json", folder / "ews.log", pick_port()
    )
    web_port = pick_port()
    settings = Settings(
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=f"t{uuid.uuid4().hex[:8]}.",
        topic_partitions=4,
        store="memory://",
        data_dir=folder / "worker",
        web_enabled=True,
        web_port=web_port,
        api_keys={
            "reader": {
                "sha256": hashlib.sha256(READ_KEY.encode()).hexdigest(),
                "role": "read",
            },
            "analyst": {
                "sha256": hashlib.sha256(ANALYST_KEY.encode()).hexdigest(),
                "role": "analyst",
            },
        },
        session_timeout_seconds=6,
        pull_max_wait_seconds=5,
        policy={"excluded_mailboxes": sorted(QUARANTINE)},
        routing={GRAPH_DOMAIN: "graph", EWS_DOMAIN: "ews"},
        graph={
            "graph_url": f"{graph_url}/v1.0",
            "authority_url": graph_url,
            "tenant_id": GRAPH_TENANT["tenant_id"],
            "client_id": GRAPH_TENANT["client_id"],
            "client_secret": GRAPH_TENANT["client_secret"],
            "quarantine_mailbox": f"quarantine@{GRAPH_DOMAIN}",
        },
        ews={
            "service_endpoint": f"{ews_url}/EWS/Exchange.asmx",
            "username": SERVICE_ACCOUNT,
            "password": PASSWORD,
            "quarantine_mailbox": f"quarantine@{EWS_DOMAIN}",
            "tracking_log_dir": str(logs),
        },
    )
    ensure_topics(settings)
    environment = os.environ | worker_environment(settings)
    environment.pop("AUTOPULL_CONFIG", None)
    worker_log = (folder / "worker.log").open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "autopull.streams.cli", "worker"],
        env=environment,
        stdout=worker_log,
        stderr=subprocess.STDOUT,
    )
    try:
        sender = RawSender(settings)
        for scenario in [*scenarios, held]:
            body = json.dumps(scenario.alert).encode()
            sender.send(raw_alert(Input(f"s{scenario.seed}.json", body), None, "test"))
        sender.flush()

        by_message: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + RUN_TIMEOUT
        while time.monotonic() < deadline:
            by_message = incidents_by_message(settings)
            done = [
                s
                for s in scenarios
                if s.original_id in by_message and settled(by_message[s.original_id])
            ]
            held_incident = by_message.get(held.original_id)
            held_done = (
                held_incident is not None
                and settled(held_incident)
                and held.held <= held_pairs(held_incident)
            )
            if len(done) == len(scenarios) and held_done:
                break
            time.sleep(2)
        api_url = f"http://127.0.0.1:{web_port}"
        yield TraceRun(
            scenarios,
            by_message,
            graph_url,
            ews_url,
            api_url,
            environment,
            held,
            settings,
        )
    finally:
        for process in (worker, graph, ews):
            process.send_signal(signal.SIGTERM)
        for process in (worker, graph, ews):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        worker_log.close()


def copies_left(run: TraceRun, mailbox: str, message_id: str) -> list[dict[str, Any]]:
    """Return the copies of a message a user can still reach in `mailbox`."""
    return [
        row
        for row in run.mailbox(mailbox)
        if (row["internet_message_id"] or "").strip("<>") == message_id
        and not row["hidden_folder"]
        and row["well_known_folder"] != "recoverableitemsdeletions"
    ]


def test_every_incident_settles(trace_run: TraceRun) -> None:
    missing = [
        s.seed for s in trace_run.scenarios if s.original_id not in trace_run.incidents
    ]
    assert missing == []
    unsettled = [
        s.seed for s in trace_run.scenarios if not settled(trace_run.incident_of(s))
    ]
    assert unsettled == []


def test_every_malicious_copy_pulled(trace_run: TraceRun) -> None:
    left = [
        (mailbox, message_id)
        for scenario in trace_run.scenarios
        for mailbox, message_id in sorted(scenario.malicious)
        if copies_left(trace_run, mailbox, message_id)
    ]
    assert left == []


def test_no_innocent_message_touched(trace_run: TraceRun) -> None:
    touched = [
        (mailbox, message_id)
        for scenario in trace_run.scenarios
        for mailbox, message_id in sorted(scenario.innocent)
        if len(copies_left(trace_run, mailbox, message_id)) != 1
    ]
    assert touched == []
    pulled = {
        (entry["mailbox"], entry["message_id"])
        for scenario in trace_run.scenarios
        for entry in trace_run.incident_of(scenario)["pulls"]
        if entry["action"] == "pull"
    }
    innocent = {pair for s in trace_run.scenarios for pair in s.innocent}
    assert pulled & innocent == set()


def test_findings_record_evidence(trace_run: TraceRun) -> None:
    edges = [
        edge
        for scenario in trace_run.scenarios
        for edge in trace_run.incident_of(scenario)["forwards"]
    ]
    assert len(edges) >= 50
    assert all(edge["evidence"] for edge in edges)
    assert {edge["confidence"] for edge in edges} <= {"definitive", "strong"}


def test_external_forwards_reported(trace_run: TraceRun) -> None:
    for scenario in trace_run.scenarios:
        incident = trace_run.incident_of(scenario)
        reported = {e["to_mailbox"] for e in incident["forwards"] if e["external"]}
        assert reported == scenario.external
        assert not any(p["mailbox"] in scenario.external for p in incident["pulls"])


def test_cycle_across_platforms_finishes(trace_run: TraceRun) -> None:
    cycles = [s for s in trace_run.scenarios if s.kind == "cycle"]
    hybrid = [s for s in cycles if any(b.endswith(EWS_DOMAIN) for b, _ in s.malicious)]
    assert hybrid
    for scenario in cycles:
        incident = trace_run.incident_of(scenario)
        assert trace_state(incident) == "finished"
        pulled = {
            (p["mailbox"], p["message_id"])
            for p in incident["pulls"]
            if p["status"] in ("quarantined", "already_quarantined")
        }
        assert scenario.malicious <= pulled
        hops = {(e["from_mailbox"], e["to_mailbox"]) for e in incident["forwards"]}
        alice = f"s{scenario.seed}.alice@"
        assert any(a.startswith(alice) and not b.startswith(alice) for a, b in hops)
        assert any(b.startswith(alice) and not a.startswith(alice) for a, b in hops)


def test_three_hops_across_platforms(trace_run: TraceRun) -> None:
    chains = [s for s in trace_run.scenarios if s.kind == "hybrid_chain"]
    assert chains
    for scenario in chains:
        incident = trace_run.incident_of(scenario)
        depths = sorted({e["depth"] for e in incident["forwards"]})
        assert depths == [1, 2, 3]
        platforms = {p["platform"] for p in incident["pulls"] if p["platform"]}
        assert platforms == {"graph", "ews"}
        assert all(
            p["status"] in ("quarantined", "already_quarantined")
            for p in incident["pulls"]
            if (p["mailbox"], p["message_id"]) in scenario.malicious
        )


def test_rest_api_shows_forward_tree(trace_run: TraceRun) -> None:
    scenario = next(s for s in trace_run.scenarios if s.kind == "hybrid_chain")
    incident_id = trace_run.incident_of(scenario)["incident_id"]

    response = httpx.get(
        f"{trace_run.api_url}/api/incidents/{incident_id}",
        headers={"Authorization": f"Bearer {READ_KEY}"},
        timeout=30,
    )

    assert response.status_code == 200
    detail = response.json()
    assert detail["trace_state"] == "finished"
    hops = [
        (h["from_mailbox"], h["to_mailbox"], h["depth"]) for h in detail["forwards"]
    ]
    seed = scenario.seed
    assert hops == [
        (f"s{seed}.alice@{GRAPH_DOMAIN}", f"s{seed}.hop0@{EWS_DOMAIN}", 1),
        (f"s{seed}.hop0@{EWS_DOMAIN}", f"s{seed}.hop1@{GRAPH_DOMAIN}", 2),
        (f"s{seed}.hop1@{GRAPH_DOMAIN}", f"s{seed}.hop2@{EWS_DOMAIN}", 3),
    ]
    assert all(hop["evidence"] for hop in detail["forwards"])
    assert all(hop["action"] == "pull" for hop in detail["forwards"])


def test_cli_shows_forward_tree(trace_run: TraceRun) -> None:
    scenario = next(s for s in trace_run.scenarios if s.kind == "fan_out")
    incident_id = trace_run.incident_of(scenario)["incident_id"]

    result = subprocess.run(
        [sys.executable, "-m", "autopull.streams.cli", "incident", "show", incident_id],
        env=trace_run.environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert "Forwards (trace finished)" in result.stdout
    assert f"s{scenario.seed}.alice@{GRAPH_DOMAIN}" in result.stdout
    assert "external, reported" in result.stdout
    for address in scenario.external:
        assert address in result.stdout
    recipients = {m for m, _ in scenario.malicious if ".team" in m}
    assert recipients
    for address in recipients:
        assert address in result.stdout


def redirect_mailboxes(scenario: Scenario) -> tuple[str, str, str]:
    """Return the rule's mailbox, the redirect's target and the disabled target."""
    addresses = [box["address"] for box in scenario.mailboxes]
    prefix = f"s{scenario.seed}."
    alice, deputy, former = (
        next(a for a in addresses if a.startswith(f"{prefix}{name}@"))
        for name in ("alice", "deputy", "former")
    )
    return alice, deputy, former


def test_exchange_redirect_rule_pulls_target(trace_run: TraceRun) -> None:
    redirects = [s for s in trace_run.scenarios if s.kind == "redirect_rule"]
    on_exchange = [
        s for s in redirects if redirect_mailboxes(s)[0].endswith(f"@{EWS_DOMAIN}")
    ]
    assert on_exchange
    for scenario in on_exchange:
        alice, deputy, _ = redirect_mailboxes(scenario)
        incident = trace_run.incident_of(scenario)

        [edge] = [e for e in incident["forwards"] if e["to_mailbox"] == deputy]
        assert edge["from_mailbox"] == alice
        assert edge["message_id"] == scenario.original_id
        assert edge["confidence"] == "definitive"
        assert f"A redirect rule of {alice}" in edge["evidence"]
        assert edge["action"] == "pull"
        [entry] = [p for p in incident["pulls"] if p["mailbox"] == deputy]
        assert entry["status"] == "quarantined"
        assert copies_left(trace_run, deputy, scenario.original_id) == []


def test_disabled_redirect_rule_finds_nothing(trace_run: TraceRun) -> None:
    redirects = [s for s in trace_run.scenarios if s.kind == "redirect_rule"]
    assert {redirect_mailboxes(s)[2].split("@")[1] for s in redirects} == {
        GRAPH_DOMAIN,
        EWS_DOMAIN,
    }
    for scenario in redirects:
        _, _, former = redirect_mailboxes(scenario)
        incident = trace_run.incident_of(scenario)

        assert [e for e in incident["forwards"] if e["to_mailbox"] == former] == []
        assert [p for p in incident["pulls"] if p["mailbox"] == former] == []


def test_medium_forward_held_until_approved(trace_run: TraceRun) -> None:
    scenario = trace_run.held
    incident = trace_run.incident_of(scenario)
    assert held_pairs(incident) == scenario.held
    for entry in incident["pulls"]:
        if (entry["mailbox"], entry["message_id"]) in scenario.held:
            assert entry["action"] == "hold"
            assert entry["rule"] == "trace.medium"
    # The sender's own Sent Items copy gets a held entry but no hop of its own.
    edges = {(e["to_mailbox"], e["message_id"]): e for e in incident["forwards"]}
    received = scenario.held - scenario.sent
    assert received
    assert set(edges) & scenario.held == received
    for pair in received:
        assert edges[pair]["confidence"] == "medium"
        assert edges[pair]["action"] == "hold"
        assert "subject matches" in edges[pair]["evidence"]
    for pair in scenario.held:
        assert len(copies_left(trace_run, *pair)) == 1

    response = httpx.post(
        f"{trace_run.api_url}/api/incidents/{incident['incident_id']}/approve",
        json={},
        headers={"Authorization": f"Bearer {ANALYST_KEY}"},
        timeout=30,
    )
    assert response.status_code == 202, response.text

    statuses: dict[tuple[str, str], str | None] = {}
    deadline = time.monotonic() + APPROVAL_TIMEOUT
    while time.monotonic() < deadline:
        approved = incidents_by_message(trace_run.settings)[scenario.original_id]
        statuses = {
            (p["mailbox"], p["message_id"]): p["status"]
            for p in approved["pulls"]
            if (p["mailbox"], p["message_id"]) in scenario.held
        }
        if set(statuses.values()) == {"quarantined"}:
            break
        time.sleep(2)
    assert statuses == dict.fromkeys(scenario.held, "quarantined")
    for pair in scenario.held:
        assert copies_left(trace_run, *pair) == []
    for mailbox, message_id in scenario.innocent:
        assert len(copies_left(trace_run, mailbox, message_id)) == 1
