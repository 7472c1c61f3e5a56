"""The incidents-topic reader of the CLI, with records it cannot decode."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from autopull.streams.incidents import new_incident
from autopull.streams.settings import Settings
from autopull.streams.watch import IncidentWatcher

NOW = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)


class Message:
    """A consumed record with the calls of confluent-kafka's Message that are read."""

    def __init__(self, key: bytes, value: bytes | None, offset: int) -> None:
        self._key = key
        self._value = value
        self._offset = offset

    def error(self) -> None:
        return None

    def key(self) -> bytes:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset


class Batches:
    """A consumer stand-in that hands out one prepared batch per consume call."""

    def __init__(self, batches: list[list[Message]]) -> None:
        self.batches = batches

    def consume(self, num_messages: int, timeout: float) -> list[Message]:
        return self.batches.pop(0) if self.batches else []

    def close(self) -> None:
        pass


@pytest.fixture
def watcher(tmp_path: Path) -> Iterator[IncidentWatcher]:
    reader = IncidentWatcher(Settings(kafka_bootstrap="127.0.0.1:9", data_dir=tmp_path))
    real = reader.consumer
    yield reader
    real.close()


def encoded(watcher: IncidentWatcher, incident_id: str, title: str) -> bytes:
    incident: dict[str, Any] = new_incident(incident_id, "campaign:c1", NOW)
    incident["title"] = title
    data: bytes = watcher.codec.dumps(incident)
    return data


def test_unreadable_record_keeps_earlier_version(watcher: IncidentWatcher) -> None:
    watcher.consumer = Batches(
        [
            [
                Message(b"INC-1", encoded(watcher, "INC-1", "first"), 0),
                Message(b"INC-1", b'{"json":1}', 1),
                Message(b"INC-2", encoded(watcher, "INC-2", "second"), 2),
            ]
        ]
    )

    assert watcher.poll(0) == 2
    assert watcher.skipped == 1
    assert watcher.incidents["INC-1"]["title"] == "first"
    assert watcher.incidents["INC-2"]["title"] == "second"


def test_tombstone_deletes_incident(watcher: IncidentWatcher) -> None:
    watcher.consumer = Batches(
        [
            [Message(b"INC-1", encoded(watcher, "INC-1", "first"), 0)],
            [Message(b"INC-1", None, 1)],
        ]
    )

    watcher.poll(0)
    watcher.poll(0)

    assert "INC-1" not in watcher.incidents
