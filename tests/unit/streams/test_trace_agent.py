"""The trace agent's skip of `incidents` records that name no copy to search.

The agent runs under Faust's test_context on the memory store. A value that does
not decode shows whether the agent decoded a record: decoding it sends a dead
letter, skipping it sends nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from autopull.streams.app import Pipeline
from autopull.streams.settings import Settings

NOT_AVRO = b"not an incident"


class TraceAgent:
    """The trace agent in a test context, with the records it sent."""

    def __init__(self, context: Any) -> None:
        self.context = context
        self.sent: list[tuple[str, str, dict[str, Any]]] = []

    async def record(self, topic: str, key: str, value: dict[str, Any]) -> None:
        self.sent.append((topic, key, value))

    async def put(self, data: bytes, headers: dict[str, bytes] | None) -> None:
        await self.context.put(data, key=b"INC-1", headers=headers)

    def dead_letters(self) -> list[dict[str, Any]]:
        return [value for topic, _, value in self.sent if topic == "alerts.dead"]


@pytest.fixture
async def trace_agent(tmp_path: Path) -> AsyncIterator[TraceAgent]:
    settings = Settings(
        kafka_bootstrap="127.0.0.1:9",
        store="memory://",
        data_dir=tmp_path,
        web_enabled=False,
        topic_partitions=1,
    )
    pipe = Pipeline(settings)
    pipe.app.loop = asyncio.get_running_loop()
    pipe.app.finalize()
    (agent,) = [a for a in pipe.app.agents.values() if a.name == "trace"]
    async with agent.test_context() as context:
        result = TraceAgent(context)
        pipe.send = result.record  # type: ignore[method-assign]
        yield result


async def test_trace_skips_record_without_untraced(trace_agent: TraceAgent) -> None:
    await trace_agent.put(NOT_AVRO, {"autopull-untraced": b"0"})

    assert trace_agent.dead_letters() == []


async def test_trace_decodes_record_with_untraced(trace_agent: TraceAgent) -> None:
    await trace_agent.put(NOT_AVRO, {"autopull-untraced": b"2"})

    (letter,) = trace_agent.dead_letters()
    assert letter["stage"] == "trace"
    assert letter["body"] == NOT_AVRO


async def test_trace_decodes_record_without_header(trace_agent: TraceAgent) -> None:
    await trace_agent.put(NOT_AVRO, None)

    (letter,) = trace_agent.dead_letters()
    assert letter["stage"] == "trace"
