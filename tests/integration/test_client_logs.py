"""The command-line clients and the worker's start, with the broker away.

The log case runs in its own process, because librdkafka writes to file
descriptor 2 itself unless a Python logger is configured, and only a child's
stderr shows that.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

import pytest

READ_INCIDENTS = textwrap.dedent(
    """
    import logging.config
    from autopull.streams.logs import logging_config
    from autopull.streams.settings import Settings
    from autopull.streams.watch import IncidentWatcher

    settings = Settings(kafka_bootstrap="127.0.0.1:{port}")
    logging.config.dictConfig(logging_config("INFO", "text"))
    watcher = IncidentWatcher(settings)
    try:
        watcher.catch_up(timeout=4)
    except TimeoutError as error:
        print("timed out:", error)
    """
)


def closed_port() -> int:
    """Return a loopback port that nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_unreachable_broker_logs_once() -> None:
    port = closed_port()
    result = subprocess.run(
        [sys.executable, "-c", READ_INCIDENTS.format(port=port)],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert "timed out:" in result.stdout
    failures = [
        line for line in result.stderr.splitlines() if "Connection refused" in line
    ]
    # The repeat filter lets the first connection error through and drops the
    # repeats of the next 60 s; librdkafka retries about 20 times a second.
    assert len(failures) == 1, result.stderr
    assert " autopull.kafka " in failures[0]
    assert not any(line.startswith("%3|") for line in result.stderr.splitlines())


def test_unreachable_broker_at_start_names_setting(tmp_path) -> None:
    from autopull.streams.settings import Settings
    from autopull.streams.topics import ensure_topics

    port = closed_port()
    settings = Settings(kafka_bootstrap=f"127.0.0.1:{port}", data_dir=tmp_path)

    with pytest.raises(TimeoutError) as raised:
        ensure_topics(settings, timeout=2)
    message = str(raised.value)
    assert f"The broker at 127.0.0.1:{port} did not list its topics within 2 s" in (
        message
    )
    assert "Broker transport failure" in message
    assert "AUTOPULL_KAFKA_BOOTSTRAP" in message
