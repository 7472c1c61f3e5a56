"""Topic names and configurations, and their explicit creation at start.

Topics are never auto-created: partition counts, compaction, retention and size
limits are set here, and a worker creates what is missing before it consumes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from autopull.streams.settings import Settings

log = logging.getLogger(__name__)
# The logger of librdkafka's own log lines, from every confluent-kafka client.
CLIENT_LOGGER = logging.getLogger("autopull.kafka")

DAY_MS = 24 * 3600 * 1000


class TopicError(RuntimeError):
    """A topic that exists with other settings, or that the broker did not create."""


@dataclass(frozen=True)
class TopicSpec:
    """One Autopull topic: its short name, value record and broker configuration."""

    name: str
    record: str
    config: dict[str, str] = field(default_factory=dict)


def topic_specs(settings: Settings) -> list[TopicSpec]:
    """Return the specs of every topic of the pipeline.

    Every topic takes records up to `Settings.max_record_bytes`, because an alert
    to many recipients, and the incident it grows, may exceed the broker's default.
    """
    retention = str(settings.raw_retention_days * DAY_MS)
    large = str(settings.max_record_bytes)
    specs = [
        TopicSpec(
            "alerts.raw",
            "RawAlert",
            {"retention.ms": retention, "max.message.bytes": large},
        ),
        TopicSpec("alerts.normalized", "NormalizedAlert"),
        TopicSpec("alerts.enriched", "EnrichedAlert"),
        # Alerts with their campaign's incident, keyed by Message-ID (or alert id),
        # and again once per recipient keyed by mailbox.
        TopicSpec("alerts.grouped", "IncidentEvent"),
        TopicSpec("alerts.by_mailbox", "IncidentEvent"),
        # The latest counts of each mailbox's recipient window, for SIEMs.
        TopicSpec("exposures", "Exposure", {"cleanup.policy": "compact"}),
        TopicSpec("incident.events", "IncidentEvent"),
        TopicSpec(
            "incidents",
            "Incident",
            {"cleanup.policy": "compact", "max.message.bytes": large},
        ),
        TopicSpec("pull.commands", "PullCommand"),
        TopicSpec("pull.outcomes", "PullOutcome"),
        TopicSpec("trace.findings", "ForwardFinding"),
        TopicSpec(
            "alerts.dead",
            "DeadLetter",
            {"retention.ms": retention, "max.message.bytes": large},
        ),
    ]
    for spec in specs:
        spec.config.setdefault("max.message.bytes", large)
        if "compact" in spec.config.get("cleanup.policy", ""):
            spec.config.setdefault(
                "segment.bytes", str(settings.compacted_segment_bytes)
            )
    return specs


@dataclass(frozen=True)
class ChangelogTopic:
    """The changelog topic of one table, as Faust would declare it."""

    name: str
    partitions: int
    config: dict[str, str]


def full_name(settings: Settings, name: str) -> str:
    """Return the topic name with the configured prefix."""
    return f"{settings.topic_prefix}{name}"


def client_config(
    settings: Settings, options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Return a confluent-kafka client configuration for the configured cluster.

    librdkafka's log lines go to the `autopull.kafka` logger instead of stderr, so
    the logging configuration applies to them: its format, its level and the
    filter that drops repeats. Without it, a command run against an unreachable
    broker printed a connection error about 20 times a second until it timed out.
    """
    return {
        "bootstrap.servers": settings.kafka_bootstrap,
        "logger": CLIENT_LOGGER,
        **(options or {}),
    }


def admin_client(settings: Settings) -> AdminClient:
    """Return an admin client for the configured cluster."""
    return AdminClient(client_config(settings))


def list_topics(
    admin: AdminClient, settings: Settings, timeout: float
) -> dict[str, Any]:
    """Return the cluster's topics by name, or raise TimeoutError naming the broker."""
    try:
        topics: dict[str, Any] = admin.list_topics(timeout=timeout).topics
    except KafkaException as error:
        reason = error.args[0].str() if error.args else str(error)
        raise TimeoutError(
            f"The broker at {settings.kafka_bootstrap} did not list its topics within "
            f"{timeout:g} s ({reason}). Check that it is reachable, or set "
            "AUTOPULL_KAFKA_BOOTSTRAP to its address."
        ) from error
    return topics


def ensure_topics(settings: Settings, timeout: float = 30.0) -> list[str]:
    """Create the pipeline's missing topics and return the names created.

    Raises `TopicError` naming the topic when the broker refuses one, for example
    because a topic of that name exists with a different partition count, and
    TimeoutError when the broker does not respond.
    """
    admin = admin_client(settings)
    existing = list_topics(admin, settings, timeout)
    wanted = [
        NewTopic(
            full_name(settings, spec.name),
            num_partitions=settings.topic_partitions,
            replication_factor=settings.topic_replication,
            config=spec.config,
        )
        for spec in topic_specs(settings)
        if full_name(settings, spec.name) not in existing
    ]
    for spec in topic_specs(settings):
        name = full_name(settings, spec.name)
        if (
            name in existing
            and len(existing[name].partitions) != settings.topic_partitions
        ):
            raise TopicError(
                f"Topic {name} has {len(existing[name].partitions)} partitions but the "
                f"settings ask for {settings.topic_partitions}; set "
                "AUTOPULL_TOPIC_PARTITIONS to match, or use another topic prefix."
            )
    return _create(admin, wanted, timeout)


def ensure_changelog_topics(
    settings: Settings, changelogs: list[ChangelogTopic], timeout: float = 30.0
) -> list[str]:
    """Create the missing changelog topics of the tables and wait until all are seen.

    Faust creates a changelog when the worker starts, without waiting until the
    broker's metadata lists its partitions. A table written in that gap has a
    changelog of 0 partitions, and every write to it fails. Creating them before
    the worker starts closes the gap. Returns the names created.
    """
    admin = admin_client(settings)
    existing = list_topics(admin, settings, timeout)
    wanted = [
        NewTopic(
            topic.name,
            num_partitions=topic.partitions,
            replication_factor=settings.topic_replication,
            config=topic.config,
        )
        for topic in changelogs
        if topic.name not in existing
    ]
    created = _create(admin, wanted, timeout)
    expected = {topic.name: topic.partitions for topic in changelogs}
    deadline = time.monotonic() + timeout
    while True:
        listed = list_topics(admin, settings, timeout)
        missing = sorted(
            name
            for name, partitions in expected.items()
            if name not in listed or len(listed[name].partitions) < partitions
        )
        if not missing:
            return created
        if time.monotonic() > deadline:
            raise TopicError(
                f"The broker did not list the changelog topics {', '.join(missing)} "
                f"within {timeout:g} s of creating them; check the broker's log."
            )
        time.sleep(0.2)


def _create(admin: AdminClient, wanted: list[NewTopic], timeout: float) -> list[str]:
    if not wanted:
        return []

    created = []
    for name, future in admin.create_topics(wanted, request_timeout=timeout).items():
        try:
            future.result()
        except KafkaException as exc:
            error = exc.args[0]
            if error.name() == "TOPIC_ALREADY_EXISTS":
                continue
            raise TopicError(f"Creating topic {name} failed: {error.str()}") from exc
        created.append(name)
        log.info("Created topic topic=%s", name)
    return created
