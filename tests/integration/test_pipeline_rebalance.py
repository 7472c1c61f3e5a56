"""Rewinding partitions without a committed offset after a rebalance, on the broker.

Faust drops the records it fetched while a rebalance stops the flow and then seeks
each partition back to its committed offset. The test drops records the same way,
by reading them with aiokafka and never processing them, and checks where the
consumer reads next.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import OffsetAndMetadata
from confluent_kafka.admin import AdminClient, NewTopic

from autopull.streams.pipeline import rewind_uncommitted
from autopull.streams.stall import StallWatchdog

pytestmark = pytest.mark.integration

RECORDS_PER_PARTITION = 3


class FaustLikeConsumer:
    """The four calls of Faust's consumer that the rewind uses, over aiokafka."""

    def __init__(self, consumer: AIOKafkaConsumer) -> None:
        self.consumer = consumer

    def assignment(self) -> set[TopicPartition]:
        return set(self.consumer.assignment())

    async def seek_to_committed(self) -> Mapping[TopicPartition, Any]:
        return await self.consumer.seek_to_committed()

    async def earliest_offsets(
        self, *partitions: TopicPartition
    ) -> Mapping[TopicPartition, int]:
        return await self.consumer.beginning_offsets(list(partitions))

    async def seek_wait(self, partitions: Mapping[TopicPartition, int]) -> None:
        for partition, offset in partitions.items():
            self.consumer.seek(partition, offset)


@pytest.fixture
def topic(kafka_bootstrap: str, topic_prefix: str) -> Iterator[str]:
    name = f"{topic_prefix}pull.commands"
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    futures = admin.create_topics(
        [NewTopic(name, num_partitions=2, replication_factor=1)], operation_timeout=10
    )
    for future in futures.values():
        future.result(timeout=15)
    yield name


async def fill(bootstrap: str, topic: str) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for partition in (0, 1):
            for number in range(RECORDS_PER_PARTITION):
                await producer.send_and_wait(
                    topic, f"command-{number}".encode(), partition=partition
                )
    finally:
        await producer.stop()


async def read_offsets(consumer: AIOKafkaConsumer) -> dict[int, list[int]]:
    batches = await consumer.getmany(timeout_ms=5000)
    return {
        tp.partition: [record.offset for record in batch]
        for tp, batch in batches.items()
    }


@pytest.fixture
async def dropped(kafka_bootstrap: str, topic: str, topic_prefix: str) -> Any:
    """Return a consumer that has read and dropped every record.

    Partition 1 has offset 2 committed, and partition 0 has no committed offset.
    """
    await fill(kafka_bootstrap, topic)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka_bootstrap,
        group_id=f"{topic_prefix}pull",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    partitions = [TopicPartition(topic, 0), TopicPartition(topic, 1)]
    consumer.assign(partitions)
    read = await read_offsets(consumer)
    assert read == {0: [0, 1, 2], 1: [0, 1, 2]}
    await consumer.commit({partitions[1]: OffsetAndMetadata(2, "")})
    yield consumer
    await consumer.stop()


async def test_seek_to_committed_skips_uncommitted_partition(
    dropped: AIOKafkaConsumer, topic: str
) -> None:
    await dropped.seek_to_committed()
    assert await dropped.position(TopicPartition(topic, 0)) == RECORDS_PER_PARTITION
    assert await dropped.position(TopicPartition(topic, 1)) == 2


async def test_rewind_rereads_uncommitted_partition(
    dropped: AIOKafkaConsumer, topic: str
) -> None:
    rewound = await rewind_uncommitted(FaustLikeConsumer(dropped), {topic})
    await dropped.seek_to_committed()
    assert rewound == {TopicPartition(topic, 0): 0}
    assert await read_offsets(dropped) == {0: [0, 1, 2], 1: [2]}


async def test_rewind_ignores_other_topics(
    dropped: AIOKafkaConsumer, topic: str
) -> None:
    rewound = await rewind_uncommitted(FaustLikeConsumer(dropped), {"other.topic"})
    assert rewound == {}
    assert await dropped.position(TopicPartition(topic, 0)) == RECORDS_PER_PARTITION


class WatchedConsumer(FaustLikeConsumer):
    """The calls of Faust's consumer that the stall watchdog makes, over aiokafka."""

    def __init__(self, consumer: AIOKafkaConsumer, committed: dict[Any, int]) -> None:
        super().__init__(consumer)
        self._committed_offset = dict(committed)

    async def highwaters(
        self, *partitions: TopicPartition
    ) -> Mapping[TopicPartition, int]:
        return await self.consumer.end_offsets(list(partitions))

    async def perform_seek(self) -> None:
        committed = await self.consumer.seek_to_committed()
        self._committed_offset.update(
            {tp: offset for tp, offset in committed.items() if offset}
        )

    def resume_partitions(self, partitions: set[TopicPartition]) -> None:
        pass

    def resume_flow(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_watchdog_rereads_dropped_records(
    dropped: AIOKafkaConsumer, topic: str
) -> None:
    consumer = WatchedConsumer(dropped, {TopicPartition(topic, 1): 2})

    async def start_fetcher() -> None:
        pass

    app = SimpleNamespace(
        consumer=consumer,
        rebalancing=False,
        tables=SimpleNamespace(
            recovery=SimpleNamespace(completed=SimpleNamespace(is_set=lambda: True))
        ),
        monitor=SimpleNamespace(messages_received_total=6),
        flow_control=SimpleNamespace(resume=lambda: None),
        _fetcher=SimpleNamespace(maybe_start=start_fetcher),
    )
    clock = Clock()
    watchdog = StallWatchdog(app, {topic}, 10, clock=clock)

    assert (await watchdog.check()).action == "none"
    clock.now = 10
    verdict = await watchdog.check()

    assert verdict.action == "recover"
    assert verdict.waiting == {TopicPartition(topic, 0): 3, TopicPartition(topic, 1): 1}
    # The fetcher may return the two partitions in separate batches.
    reread: dict[int, list[int]] = {}
    for _ in range(3):
        for partition, offsets in (await read_offsets(dropped)).items():
            reread.setdefault(partition, []).extend(offsets)
    assert reread == {0: [0, 1, 2], 1: [2]}
