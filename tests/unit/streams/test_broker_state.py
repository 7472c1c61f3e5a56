"""The broker state that the readiness probe and the stall watchdog read."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from aiokafka.client import ConnectionGroup

from autopull.streams.broker_state import broker_problem


class FakeConnection:
    def __init__(self, is_open: bool) -> None:
        self.is_open = is_open

    def connected(self) -> bool:
        return self.is_open


def consumer_with(coordinator: int | None, connections: dict[Any, Any]) -> Any:
    client = SimpleNamespace(
        _coordinator=SimpleNamespace(coordinator_id=coordinator),
        _client=SimpleNamespace(_conns=connections),
    )
    return SimpleNamespace(_thread=SimpleNamespace(_consumer=client))


def test_unstarted_consumer_is_a_problem() -> None:
    problem = broker_problem(SimpleNamespace(_thread=SimpleNamespace(_consumer=None)))

    assert problem == "The Kafka consumer has not started yet."


def test_unknown_coordinator_is_a_problem() -> None:
    problem = broker_problem(consumer_with(None, {}))

    assert problem is not None
    assert "no group coordinator" in problem


def test_closed_coordinator_connection_is_a_problem() -> None:
    key = (3, ConnectionGroup.COORDINATION)

    closed = broker_problem(consumer_with(3, {key: FakeConnection(False)}))
    missing = broker_problem(consumer_with(3, {}))

    assert closed is not None
    assert "broker 3, is closed" in closed
    assert missing is not None
    assert "broker 3, is closed" in missing


def test_open_connection_to_other_group_is_a_problem() -> None:
    # An open fetch connection to the same broker does not show the coordinator's.
    key = (3, ConnectionGroup.DEFAULT)

    assert broker_problem(consumer_with(3, {key: FakeConnection(True)})) is not None


def test_open_coordinator_connection_is_fine() -> None:
    key = (3, ConnectionGroup.COORDINATION)

    assert broker_problem(consumer_with(3, {key: FakeConnection(True)})) is None
