"""The indicator index over the configured feeds, reloaded when a feed file changes.

A reload builds a complete new store aside and then replaces the index's one
reference to the store. Python assigns a reference atomically, so a lookup running
in another thread or task sees either the old store or the new one, never an empty
or half-built one. A feed that cannot be read keeps the current store in service
until the file is fixed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from autopull.connectors.intel import FeedSettings, IntelSettings
from autopull.connectors.intel.exceptions import FeedError
from autopull.connectors.intel.feeds import FeedReport, read_feed
from autopull.connectors.intel.indicators import IntelHit
from autopull.connectors.intel.store import Clock, IndicatorStore, StoreBuilder

logger = logging.getLogger(__name__)

# Identity of one version of a file: modification time, size and inode. The inode
# changes when a feed is replaced by renaming a new file over it.
FileSignature = tuple[int, int, int]


class IntelIndex:
    """Lookups over the current store of a set of feeds.

    `clock` returns epoch seconds; it decides which indicators have expired.
    """

    def __init__(self, feeds: Sequence[FeedSettings], *, clock: Clock = time.time):
        self._feeds = tuple(feeds)
        self._clock = clock
        self._store = IndicatorStore.empty(clock)
        self._signatures: dict[Path, FileSignature | None] = {}
        self._reports: list[FeedReport] = []
        self._reload_lock = threading.Lock()
        self.last_error: FeedError | None = None

    @classmethod
    def from_settings(
        cls, settings: IntelSettings, *, clock: Clock = time.time
    ) -> IntelIndex:
        """Return an index over the feeds of `settings`, not yet loaded."""
        return cls(settings.feeds, clock=clock)

    @property
    def store(self) -> IndicatorStore:
        """Return the store in service now."""
        return self._store

    @property
    def reports(self) -> list[FeedReport]:
        """Return the reports of the feeds behind the store in service."""
        return list(self._reports)

    def load(self) -> list[FeedReport]:
        """Read every feed, then put the new store in service.

        Raises `FeedError` when a feed file cannot be read as a whole; the store in
        service stays as it was.
        """
        with self._reload_lock:
            # Signatures first: a file changed while it is read differs next time.
            signatures = {feed.path: _signature(feed.path) for feed in self._feeds}
            builder = StoreBuilder()
            now = self._clock()
            reports = [read_feed(feed, builder, now=now) for feed in self._feeds]
            store = builder.build(self._clock)

            self._store = store
            self._signatures = signatures
            self._reports = reports
            self.last_error = None
        logger.info(
            "Loaded indicators: feeds=%d counts=%s", len(reports), store.counts()
        )
        return reports

    def changed(self) -> bool:
        """Return True when a feed file differs from the one last loaded."""
        return any(
            _signature(feed.path) != self._signatures.get(feed.path, ())
            for feed in self._feeds
        )

    def reload_if_changed(self) -> bool:
        """Reload when a feed file changed; return True when a new store is in service.

        A feed that cannot be read is logged and kept in `last_error`, and the
        current store stays in service; the next call tries again.
        """
        if not self.changed():
            return False
        try:
            self.load()
        except FeedError as error:
            if self.last_error is None or str(self.last_error) != str(error):
                logger.error(
                    "Feed reload failed, keeping the current indicators: %s", error
                )
            self.last_error = error
            return False
        return True

    def lookup_ip(self, value: str) -> list[IntelHit]:
        """Return the hits of an IP address (see `IndicatorStore.lookup_ip`)."""
        return self._store.lookup_ip(value)

    def lookup_host(self, value: str) -> list[IntelHit]:
        """Return the hits of a host name (see `IndicatorStore.lookup_host`)."""
        return self._store.lookup_host(value)

    def lookup_url(self, value: str) -> list[IntelHit]:
        """Return the hits of a URL (see `IndicatorStore.lookup_url`)."""
        return self._store.lookup_url(value)

    def lookup_hash(self, value: str) -> list[IntelHit]:
        """Return the hits of a hash (see `IndicatorStore.lookup_hash`)."""
        return self._store.lookup_hash(value)

    def lookup_alert(self, alert: dict[str, Any]) -> list[IntelHit]:
        """Return the hits of a NormalizedAlert (see `IndicatorStore.lookup_alert`)."""
        return self._store.lookup_alert(alert)


def _signature(path: Path) -> FileSignature | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return (status.st_mtime_ns, status.st_size, status.st_ino)


class FeedWatcher:
    """An asyncio task that reloads an index every `reload_seconds` if feeds changed.

    The reload runs in a worker thread, so lookups on the event loop go on meanwhile
    against the previous store.
    """

    def __init__(self, index: IntelIndex, reload_seconds: float) -> None:
        self._index = index
        self._reload_seconds = reload_seconds
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start checking on the running event loop."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="intel-feed-watcher")
            logger.info(
                "Feed watcher started: interval_seconds=%s", self._reload_seconds
            )

    async def stop(self) -> None:
        """Stop checking and wait for the task to end."""
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        logger.info("Feed watcher stopped")

    async def check(self) -> bool:
        """Reload now if a feed changed; return True when a new store is in service."""
        return await asyncio.to_thread(self._index.reload_if_changed)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._reload_seconds)
            try:
                await self.check()
            except Exception:
                logger.exception("Feed check failed; the next check follows as planned")
