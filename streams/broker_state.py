"""Whether the worker's Kafka consumer can reach the broker, read without a request.

The readiness probe and the stall watchdog check this every few seconds, so it
only reads the state of the consumer's aiokafka client and never sends a request
that could block. The consumer counts as connected while its consumer group has
a known coordinator and the connection to that broker is open. aiokafka 0.14
clears the coordinator when a heartbeat or another request to it fails, or when
no heartbeat succeeded for a whole session timeout. It sets the coordinator again
only after a lookup succeeded and a connection to it opened.

A broker that closes its connections, as a stopped one does, shows at once. A
broker that stops answering without closing them shows once a heartbeat to it
times out, after up to Faust's broker request timeout (90 s by default).
"""

from __future__ import annotations

from typing import Any

from aiokafka.client import ConnectionGroup


def broker_problem(consumer: Any) -> str | None:
    """Return why `consumer`, a Faust consumer, cannot reach Kafka, or None if it can.

    NOTE: faust-streaming 0.15.3 and aiokafka 0.14 expose no connection state, so
    this reads private attributes: the consumer thread's aiokafka consumer, its
    group coordinator and its client's connections. It only reads them, from the
    web server's thread, while the consumer thread changes them.
    """
    thread = getattr(consumer, "_thread", None)
    kafka_consumer = getattr(thread, "_consumer", None)
    if kafka_consumer is None:
        return "The Kafka consumer has not started yet."

    coordinator = getattr(kafka_consumer, "_coordinator", None)
    node = getattr(coordinator, "coordinator_id", None)
    if node is None:
        return (
            "The Kafka consumer has no group coordinator, so the broker is "
            "unreachable or the consumer group is still being set up."
        )

    client = getattr(kafka_consumer, "_client", None)
    connections = getattr(client, "_conns", {})
    connection = connections.get((node, ConnectionGroup.COORDINATION))
    if connection is None or not connection.connected():
        return (
            f"The Kafka consumer's connection to its group coordinator, broker "
            f"{node}, is closed."
        )
    return None
