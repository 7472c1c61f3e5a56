"""Running the pipeline as a long-lived worker process."""

from __future__ import annotations

import logging

import faust

from autopull.streams.app import Pipeline
from autopull.streams.routing import routing_warning
from autopull.streams.settings import Settings
from autopull.streams.topics import ensure_changelog_topics, ensure_topics

log = logging.getLogger(__name__)


def run_worker(settings: Settings) -> int:
    """Create missing topics, then run the Faust worker until it is stopped."""
    (settings.data_dir / settings.faust_id).mkdir(parents=True, exist_ok=True)
    created = ensure_topics(settings)
    pipe = Pipeline(settings)
    created += ensure_changelog_topics(settings, pipe.changelog_topics())
    log.info(
        "Starting worker app_id=%s bootstrap=%s topics_created=%d",
        settings.faust_id,
        settings.kafka_bootstrap,
        len(created),
    )
    warning = routing_warning(settings)
    if warning is not None:
        log.warning("%s", warning)
    create_worker(pipe).execute_from_commandline()
    return 0


def create_worker(pipe: Pipeline) -> faust.Worker:
    """Return the Faust worker of `pipe`, logging at the configured level."""
    worker = faust.Worker(pipe.app, loglevel=pipe.settings.log_level.lower())
    # At WARNING and above, faust-streaming 0.15.3 keeps a terminal spinner that
    # sets the root logger to DEBUG, so every debug call of Faust and aiokafka
    # builds a log record. Without the spinner the root logger keeps the level.
    worker.spinner = None
    return worker
