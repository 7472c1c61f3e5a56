"""Failed forward searches end to end: Graph fails the Sent Items reads, then recovers.

One Graph simulator and one worker on the real broker. The first incident's search
fails a few times and is retried without an analyst once Graph recovers. The second
incident's search fails its maximum number of attempts, and a retry command through
the REST API starts it again.
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
from test_forward_tracing import read_incidents, start_sim

from autopull.sim.scenarios import (
    GRAPH_DOMAIN,
    GRAPH_TENANT,
    Scenario,
    combine,
    generate,
)
from autopull.streams.forward_tree import trace_state
from autopull.streams.ingest import Input, RawSender, raw_alert
from autopull.streams.settings import Settings
from autopull.streams.topics import ensure_topics

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

RECOVERS_SEED = 10
EXHAUSTS_SEED = 20
MAX_ATTEMPTS = 5
ANALYST_KEY = "trace-retry-analyst-key"
WAIT_TIMEOUT = 300.0


@dataclass
class RetryRun:
    settings: Settings
    graph_url: str
    api_url: str
    sender: RawSender

    def send_alert(self, scenario: Scenario) -> None:
        body = json.dumps(scenario.alert).encode()
        self.sender.send(raw_alert(Input(f"s{scenario.seed}.json", body), None, "t"))
        self.sender.flush()

    def fail_sent_items(self, scenario: Scenario) -> None:
        # Every Sent Items read of the alert's first recipient gets a 503.
        rule = {"path": f"s{scenario.seed}\\.alice.*sentitems", "count": 100000}
        response = httpx.post(f"{self.graph_url}/_sim/faults", json=rule, timeout=10)
        assert response.status_code == 201

    def recover(self) -> None:
        response = httpx.delete(f"{self.graph_url}/_sim/faults", timeout=10)
        assert response.status_code == 200

    def copies_left(self, mailbox: str, message_id: str) -> int:
        response = httpx.get(
            f"{self.graph_url}/_sim/mailboxes/{mailbox}/messages", timeout=30
        )
        response.raise_for_status()
        return sum(
            1
            for row in response.json()
            if (row["internet_message_id"] or "").strip("<>") == message_id
            and not row["hidden_folder"]
            and row["well_known_folder"] != "recoverableitemsdeletions"
        )

    def wait_for(
        self, scenario: Scenario, done: Callable[[dict[str, Any]], bool]
    ) -> dict[str, Any]:
        """Return the scenario's incident once `done` holds for its latest record."""
        deadline = time.monotonic() + WAIT_TIMEOUT
        latest: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            for incident in read_incidents(self.settings).values():
                if scenario.original_id in incident["message_ids"]:
                    latest = incident
            if latest is not None and done(latest):
                return latest
        pytest.fail(
            f"Incident of seed {scenario.seed} never reached the state: {latest}"
        )


def first_copy(incident: dict[str, Any], scenario: Scenario) -> dict[str, Any]:
    mailbox = f"s{scenario.seed}.alice@{GRAPH_DOMAIN}"
    [entry] = [
        p
        for p in incident["pulls"]
        if p["mailbox"] == mailbox and p["message_id"] == scenario.original_id
    ]
    return entry


def forwarded(scenario: Scenario) -> set[tuple[str, str]]:
    """Return the forwarded copies, which only the forward search can find."""
    return {pair for pair in scenario.malicious if ".hop" in pair[0]}


def settled(incident: dict[str, Any]) -> bool:
    pending = [
        entry
        for entry in incident["pulls"]
        if entry["action"] == "pull" and entry["status"] in (None, "throttled")
    ]
    return not pending and trace_state(incident) == "finished"


@pytest.fixture(scope="module")
def retry_run(
    kafka_bootstrap: str,
    tmp_path_factory: pytest.TempPathFactory,
    worker_environment: Callable[[Settings], dict[str, str]],
    pick_port: Callable[[], int],
) -> Iterator[RetryRun]:
    folder: Path = tmp_path_factory.mktemp("trace-retry")
    scenarios = [generate(RECOVERS_SEED, "chain"), generate(EXHAUSTS_SEED, "chain")]
    world = folder / "world.json"
    world.write_text(json.dumps(combine(scenarios)), encoding="utf-8")
    graph_url, graph = start_sim(
        "graph", world, folder / "graph-state.json", folder / "graph.log", pick_port()
    )
    web_port = pick_port()
    settings = Settings(
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=f"t{uuid.uuid4().hex[:8]}.",
        topic_partitions=2,
        store="memory://",
        data_dir=folder / "worker",
        web_enabled=True,
        web_port=web_port,
        api_keys={
            "analyst": {
                "sha256": hashlib.sha256(ANALYST_KEY.encode()).hexdigest(),
                "role": "analyst",
            },
        },
        pull_max_wait_seconds=1,
        policy={"excluded_mailboxes": [f"quarantine@{GRAPH_DOMAIN}"]},
        routing={GRAPH_DOMAIN: "graph"},
        trace={
            "search_max_attempts": MAX_ATTEMPTS,
            "search_retry_seconds": 0.5,
            "search_retry_max_seconds": 2,
        },
        graph={
            "graph_url": f"{graph_url}/v1.0",
            "authority_url": graph_url,
            "tenant_id": GRAPH_TENANT["tenant_id"],
            "client_id": GRAPH_TENANT["client_id"],
            "client_secret": GRAPH_TENANT["client_secret"],
            "quarantine_mailbox": f"quarantine@{GRAPH_DOMAIN}",
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
        yield RetryRun(
            settings, graph_url, f"http://127.0.0.1:{web_port}", RawSender(settings)
        )
    finally:
        for process in (worker, graph):
            process.send_signal(signal.SIGTERM)
        for process in (worker, graph):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        worker_log.close()


def test_failed_search_retried_after_recovery(retry_run: RetryRun) -> None:
    scenario = generate(RECOVERS_SEED, "chain")
    copies = forwarded(scenario)
    assert copies
    retry_run.fail_sent_items(scenario)
    retry_run.send_alert(scenario)

    failing = retry_run.wait_for(
        scenario, lambda i: first_copy(i, scenario)["trace_attempts"] >= 2
    )
    entry = first_copy(failing, scenario)
    assert entry["traced"] is False
    assert entry["trace_failed"] is False
    assert "503" in entry["trace_error"]
    assert trace_state(failing) == "running"
    assert any(line["what"] == "trace failed" for line in failing["history"])
    for mailbox, message_id in copies:
        assert retry_run.copies_left(mailbox, message_id) == 1

    retry_run.recover()
    done = retry_run.wait_for(scenario, settled)

    assert first_copy(done, scenario)["traced"] is True
    for mailbox, message_id in copies:
        assert retry_run.copies_left(mailbox, message_id) == 0


def test_retry_restarts_exhausted_search(retry_run: RetryRun) -> None:
    scenario = generate(EXHAUSTS_SEED, "chain")
    copies = forwarded(scenario)
    assert copies
    retry_run.fail_sent_items(scenario)
    retry_run.send_alert(scenario)

    failed = retry_run.wait_for(
        scenario, lambda i: first_copy(i, scenario)["trace_failed"]
    )
    assert first_copy(failed, scenario)["trace_attempts"] == MAX_ATTEMPTS
    assert trace_state(failed) == "failed"
    for mailbox, message_id in copies:
        assert retry_run.copies_left(mailbox, message_id) == 1

    retry_run.recover()
    response = httpx.post(
        f"{retry_run.api_url}/api/incidents/{failed['incident_id']}/retry",
        json={},
        headers={"Authorization": f"Bearer {ANALYST_KEY}"},
        timeout=30,
    )
    assert response.status_code in (200, 202), response.text

    done = retry_run.wait_for(scenario, settled)
    assert first_copy(done, scenario)["trace_round"] == 1
    assert any(
        "restarted the forward search" in line["detail"] for line in done["history"]
    )
    for mailbox, message_id in copies:
        assert retry_run.copies_left(mailbox, message_id) == 0
