"""The worker process's Faust worker."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from autopull.streams.app import Pipeline
from autopull.streams.settings import Settings
from autopull.streams.worker import create_worker


@pytest.mark.parametrize("level", ["WARNING", "ERROR"])
def test_worker_keeps_root_logger_level(tmp_path: Path, level: str) -> None:
    settings = Settings(
        kafka_bootstrap="127.0.0.1:9",
        data_dir=tmp_path,
        web_enabled=False,
        log_level=level,
    )
    worker = create_worker(Pipeline(settings))
    root = logging.getLogger("autopull.test.root")
    root.setLevel(getattr(logging, level))

    worker.on_setup_root_logger(root, getattr(logging, level))

    assert root.level == getattr(logging, level)
    assert not root.isEnabledFor(logging.DEBUG)


def test_pipeline_builds_with_schema_registry(tmp_path: Path) -> None:
    from autopull.streams.api import IncidentReadModel
    from autopull.streams.watch import IncidentWatcher

    settings = Settings(
        kafka_bootstrap="127.0.0.1:9",
        data_dir=tmp_path,
        web_enabled=False,
        schema_registry_url="http://127.0.0.1:9",
    )
    pipe = Pipeline(settings)
    model = IncidentReadModel(pipe)
    assert model.codec is pipe.codecs["incidents"]
    watcher = IncidentWatcher(settings)
    try:
        assert watcher.codec.subject == "autopull.incidents-value"
    finally:
        watcher.close()
