"""Metrics after a known run, and a release followed to its end from the CLI."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from autopull.streams.ingest import Input, RawSender, raw_alert
from autopull.streams.operate import load_incidents, run_command
from autopull.streams.settings import Settings
from autopull.streams.topics import ensure_topics

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

REPO_ROOT = Path(__file__).resolve().parents[2]
PHISH_ALERT = REPO_ROOT / "examples" / "alerts" / "tap-delivered-phish.json"
PHISH_HEADER = "<20261201093000.1234.invoice@billing-example.net>"
RECIPIENTS = ["alice@example.com", "bob@example.com", "carol@example.com"]
MALFORMED = b'{"messagesDelivered": [{"GUID": 5, "recipient": "not a list"'


@pytest.fixture
def metrics_settings(pipeline_settings: Settings) -> Settings:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return pipeline_settings.model_copy(update={"web_enabled": True, "web_port": port})


def wait_for(check: Any, timeout: float = 90.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = check()
        except httpx.HTTPError:
            result = None
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"Timed out waiting for {what}.")


def scrape(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Return every sample of /metrics by name and sorted labels."""
    text = httpx.get(f"{base}/metrics").text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            samples[(sample.name, labels)] = sample.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def copies_of(graph_sim: Any, mailbox: str) -> list[dict[str, Any]]:
    return [
        m
        for m in graph_sim.messages(mailbox)
        if m["internet_message_id"] == PHISH_HEADER
    ]


def test_metrics_count_known_run(
    metrics_settings: Settings, graph_sim: Any, start_api_worker: Any
) -> None:
    settings = metrics_settings
    ensure_topics(settings)
    # Two moves fail with a server error, so two quarantine attempts are repeated.
    fault = {"path": "/move$", "method": "POST", "count": 2, "status": 500}
    httpx.post(f"{graph_sim.url}/_sim/faults", json=fault).raise_for_status()
    # One throttled search, which msgraph's own retry handler repeats, so no pull
    # attempt is repeated for it.
    throttle = {
        "path": "^/v1.0/users/carol@example.com/messages$",
        "method": "GET",
        "count": 1,
        "status": 429,
        "retry_after": 1,
    }
    httpx.post(f"{graph_sim.url}/_sim/faults", json=throttle).raise_for_status()
    start_api_worker(settings)
    base = f"http://127.0.0.1:{settings.web_port}"
    wait_for(lambda: httpx.get(f"{base}/readyz").status_code == 200, what="readiness")

    phish = PHISH_ALERT.read_bytes()
    sender = RawSender(settings)
    sender.send(raw_alert(Input("malformed.json", MALFORMED), "tap", "test"))
    sender.send(raw_alert(Input("phish.json", phish), None, "test"))
    sender.flush()

    def quarantined() -> dict[Any, float] | None:
        samples = scrape(base)
        done = value(
            samples,
            "autopull_pulls_total",
            platform="graph",
            kind="quarantine",
            status="quarantined",
        )
        return samples if done >= len(RECIPIENTS) else None

    samples = wait_for(quarantined, what="three quarantined pulls in the metrics")
    alerts = "autopull_alerts_total"
    assert value(samples, alerts, source="tap", outcome="normalized") == 1
    assert value(samples, alerts, source="tap", outcome="dead") == 1
    assert value(samples, "autopull_dead_letters_total", stage="normalize") == 1
    assert (
        value(
            samples,
            "autopull_pulls_total",
            platform="graph",
            kind="quarantine",
            status="quarantined",
        )
        == 3
    )
    assert value(samples, "autopull_platform_retries_total", platform="graph") == 2
    assert value(samples, "autopull_platform_throttled_total", platform="graph") == 0
    throttled = "autopull_platform_throttled_responses_total"
    assert value(samples, throttled, platform="graph") == 1
    assert value(samples, "autopull_pull_latency_seconds_count", platform="graph") == 3
    assert value(samples, "autopull_table_keys", table="incidents") == 1
    assert value(samples, "autopull_table_keys", table="ledger") == 3

    def caught_up() -> bool:
        lag = {
            key: sample
            for key, sample in scrape(base).items()
            if key[0] == "autopull_consumer_lag"
        }
        return bool(lag) and all(sample == 0 for sample in lag.values())

    wait_for(caught_up, what="consumer lag of zero on every partition")
    topics = {
        dict(labels)["topic"]
        for name, labels in scrape(base)
        if name == "autopull_consumer_lag"
    }
    assert not [topic for topic in topics if topic.endswith("-changelog")]

    contained = wait_for(
        lambda: [
            incident
            for incident in load_incidents(settings).values()
            if incident["state"] == "contained"
        ],
        what="a contained incident",
    )
    incident_id = contained[0]["incident_id"]
    out = io.StringIO()
    code = run_command(
        settings, incident_id, "release", actor="carol", wait=True, timeout=90, out=out
    )
    assert code == 0, out.getvalue()
    lines = out.getvalue().splitlines()
    assert lines[0] == f"Sent release on {incident_id}."
    assert lines[-1] == "All 3 copies are done."
    assert f"Restoring copies of {incident_id}: 3/3 (100%)" in lines
    for mailbox in RECIPIENTS:
        assert [c["hidden_folder"] for c in copies_of(graph_sim, mailbox)] == [False]

    again = io.StringIO()
    code = run_command(
        settings, incident_id, "release", actor="carol", wait=True, out=again
    )
    assert code == 0, again.getvalue()
    assert again.getvalue().splitlines()[-1] == (
        f"Nothing to wait for: {incident_id} has no quarantined copies for this "
        f"command to act on; `autopull incident show {incident_id}` lists each "
        "copy's status."
    )

    samples = scrape(base)
    assert (
        value(
            samples,
            "autopull_pulls_total",
            platform="graph",
            kind="restore",
            status="restored",
        )
        == 3
    )
