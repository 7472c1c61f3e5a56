"""Burst defaults of the Graph and Gmail adapters, derived from published limits."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from autopull.connectors.mail.gmail import DEFAULT_THREADS, batch_parts
from autopull.connectors.mail.graph import GraphSettings


def graph_settings(**changes: Any) -> GraphSettings:
    values: dict[str, Any] = {
        "tenant_id": "tenant",
        "client_id": "client",
        "client_secret": "secret",
        "quarantine_mailbox": "quarantine@example.org",
    }
    values.update(changes)
    return GraphSettings(**values)


def test_graph_default_batches_fill_app_window() -> None:
    settings = graph_settings()

    # 130,000 requests per 10 s per app, in batches of 20.
    assert settings.max_batches_in_flight == 6_500
    assert settings.max_connections is None
    assert settings.connection_limit == 6_600


def test_graph_connections_follow_batches() -> None:
    assert graph_settings(max_batches_in_flight=50).connection_limit == 150
    limited = graph_settings(max_batches_in_flight=50, max_connections=400)
    assert limited.connection_limit == 400


@pytest.mark.parametrize("connections", [50, 49, 1])
def test_graph_connections_below_batches_rejected(connections: int) -> None:
    with pytest.raises(ValidationError, match="must exceed"):
        graph_settings(max_batches_in_flight=50, max_connections=connections)


def test_gmail_default_threads_cover_project_quota() -> None:
    # 1,200,000 units a minute at 31 units a mailbox is 38,709 mailboxes, whose
    # phases of 2 parts each fill 775 batches of 100.
    assert DEFAULT_THREADS == 775


@pytest.mark.parametrize(
    ("calls", "preferred", "threads", "parts"),
    [
        (8, 50, 16, 50),  # one small batch
        (20_000, 50, 775, 50),  # 400 batches of 50 fit 775 threads
        (20_000, 50, 16, 100),  # 16 threads: batches grow to Gmail's 100
        (1_000, 50, 16, 63),  # just enough to send 1,000 calls in 16 batches
        (100_000, 50, 775, 100),  # beyond 77,500 calls: more than one round
        (10, 1, 4, 3),
    ],
)
def test_gmail_batch_parts(
    calls: int, preferred: int, threads: int, parts: int
) -> None:
    assert batch_parts(calls, preferred, threads) == parts
