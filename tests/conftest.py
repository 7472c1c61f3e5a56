"""Fixtures shared by all test folders."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient
from hypothesis import settings

REPO_ROOT = Path(__file__).resolve().parent.parent

# Property tests have no per-example deadline: on a loaded machine one slow
# example would fail a run in which every example held.
settings.register_profile("autopull", deadline=None)
settings.load_profile("autopull")

# ---------------------------------------------------------------------------
# Kafka broker
# ---------------------------------------------------------------------------

KAFKA_SCRIPT = REPO_ROOT / "dev" / "kafka.sh"
# Tests use their own port, so they never share a broker with a demo on 9092.
DEFAULT_TEST_KAFKA_PORT = 19092
# Covers the first Maven download of the broker jars plus the script's own
# 90 s start timeout.
KAFKA_START_TIMEOUT_S = 600


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    """Start the test broker unless it is running, and return ``127.0.0.1:<port>``.

    The port comes from AUTOPULL_TEST_KAFKA_PORT (default 19092), the controller
    port is the next one, and the data directory is .cache/kafka/run-<port>.
    The broker keeps running after the session, so the next run reuses it
    instead of waiting for a start. Stop it with
    ``AUTOPULL_KAFKA_PORT=19092 bash dev/kafka.sh stop``.
    """
    port = int(os.environ.get("AUTOPULL_TEST_KAFKA_PORT", DEFAULT_TEST_KAFKA_PORT))
    env = {
        **os.environ,
        "AUTOPULL_KAFKA_PORT": str(port),
        "AUTOPULL_KAFKA_DATA": str(REPO_ROOT / ".cache" / "kafka" / f"run-{port}"),
        # The interpreter running pytest has confluent_kafka, which the script
        # uses for its metadata health check.
        "AUTOPULL_PYTHON": sys.executable,
    }
    # A controller port meant for a demo broker must not leak into the test broker.
    env.pop("AUTOPULL_KAFKA_CONTROLLER_PORT", None)

    command = ["bash", str(KAFKA_SCRIPT), "start"]
    try:
        result = subprocess.run(
            command,
            env=env,
            capture_output=True,
            text=True,
            timeout=KAFKA_START_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(
            f"dev/kafka.sh start timed out after {KAFKA_START_TIMEOUT_S}s "
            f"for port {port}:\n{exc.stdout or ''}{exc.stderr or ''}",
            pytrace=False,
        )
    if result.returncode != 0:
        pytest.fail(
            f"dev/kafka.sh start failed with exit code {result.returncode} "
            f"for port {port} (set AUTOPULL_TEST_KAFKA_PORT to use another port):\n"
            f"{result.stdout}{result.stderr}",
            pytrace=False,
        )
    return f"127.0.0.1:{port}"


@pytest.fixture
def topic_prefix(kafka_bootstrap: str) -> Iterator[str]:
    """Return a prefix such as ``t1a2b3c4d.`` that only the calling test uses.

    Name every topic, consumer group and Faust app id of the test with it.
    After the test, the topics and groups whose names start with it are
    deleted, so the broker that outlives the session does not collect them run
    after run. Deleting a group fails while it still has members, which means
    the test left a consumer or Faust app running.
    """
    prefix = f"t{uuid.uuid4().hex[:8]}."
    yield prefix

    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    topics = [
        name for name in admin.list_topics(timeout=10).topics if name.startswith(prefix)
    ]
    if topics:
        for future in admin.delete_topics(topics, operation_timeout=10).values():
            future.result(timeout=15)

    listing = admin.list_consumer_groups(request_timeout=10).result(timeout=15)
    groups = [
        group.group_id for group in listing.valid if group.group_id.startswith(prefix)
    ]
    if groups:
        for future in admin.delete_consumer_groups(groups).values():
            future.result(timeout=15)
