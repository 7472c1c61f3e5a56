"""Table changelog topics are created before the worker starts, as Faust sets them."""

from __future__ import annotations

from pathlib import Path

import pytest
from confluent_kafka.admin import ConfigResource

from autopull.connectors.directory import DirectorySettings
from autopull.streams.app import Pipeline
from autopull.streams.settings import Settings
from autopull.streams.topics import admin_client, ensure_changelog_topics

pytestmark = pytest.mark.integration


def test_changelogs_created_with_faust_config(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    settings = Settings(
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topic_prefix,
        topic_partitions=3,
        store="memory://",
        data_dir=tmp_path,
        web_enabled=False,
        recipient_window_hours=12,
    )
    pipe = Pipeline(settings)
    app_id = settings.faust_id

    created = ensure_changelog_topics(settings, pipe.changelog_topics())

    expected = {
        f"{app_id}-{table}-changelog"
        for table in (
            "campaign_windows",
            "message_windows",
            "recipient_windows",
            "incidents",
            "ledger",
        )
    }
    assert expected <= set(created)
    admin = admin_client(settings)
    listed = admin.list_topics(timeout=10).topics
    for name in created:
        assert len(listed[name].partitions) == 3, name

    resources = [
        ConfigResource(ConfigResource.Type.TOPIC, name)
        for name in (
            f"{app_id}-ledger-changelog",
            f"{app_id}-recipient_windows-changelog",
        )
    ]
    configs = {
        resource.name: future.result()
        for resource, future in admin.describe_configs(resources).items()
    }
    ledger = configs[f"{app_id}-ledger-changelog"]
    assert ledger["cleanup.policy"].value == "compact"
    windows = configs[f"{app_id}-recipient_windows-changelog"]
    assert windows["cleanup.policy"].value == "compact,delete"
    # Faust expires a tumbling window twice its size after it ends: 24 hours here.
    assert windows["retention.ms"].value == str(24 * 3600 * 1000)

    assert ensure_changelog_topics(settings, pipe.changelog_topics()) == []


def test_directory_cache_changelog_expires_with_ttl(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    settings = Settings(
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topic_prefix,
        topic_partitions=3,
        store="memory://",
        data_dir=tmp_path,
        web_enabled=False,
        directory=DirectorySettings(
            url="ldap://127.0.0.1:3890/",
            base_dn="dc=autopull,dc=test",
            flavor="openldap",
            cache_ttl_seconds=600,
            negative_cache_ttl_seconds=30,
        ),
    )
    pipe = Pipeline(settings)
    name = f"{settings.faust_id}-directory_cache-changelog"

    created = ensure_changelog_topics(settings, pipe.changelog_topics())

    assert name in created
    admin = admin_client(settings)
    assert len(admin.list_topics(timeout=10).topics[name].partitions) == 3
    resource = ConfigResource(ConfigResource.Type.TOPIC, name)
    config = admin.describe_configs([resource])[resource].result()
    assert config["cleanup.policy"].value == "compact,delete"
    # The longest TTL, 600 s, in milliseconds.
    assert config["retention.ms"].value == "600000"
    assert config["segment.ms"].value == "600000"


def test_directory_cache_table_absent_without_directory(tmp_path: Path) -> None:
    settings = Settings(store="memory://", data_dir=tmp_path, web_enabled=False)
    pipe = Pipeline(settings)

    names = [topic.name for topic in pipe.changelog_topics()]

    assert pipe.directory_cache is None
    assert not any("directory_cache" in name for name in names)
