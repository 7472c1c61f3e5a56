from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

from autopull.connectors.intel import FeedSettings, IntelSettings
from autopull.connectors.intel.exceptions import FeedError
from autopull.connectors.intel.index import FeedWatcher, IntelIndex

CSV_HEADER = "type,value,source,confidence,expires\n"


def write_feed(path: Path, *lines: str, mtime_step: int = 0) -> None:
    """Replace the feed as producers do: write a new file, then rename it over."""
    staging = path.with_suffix(".tmp")
    staging.write_text(CSV_HEADER + "".join(f"{line}\n" for line in lines))
    if mtime_step:
        stat = path.stat() if path.exists() else staging.stat()
        later = stat.st_mtime_ns + mtime_step * 1_000_000_000
        os.utime(staging, ns=(later, later))
    staging.replace(path)


@pytest.fixture
def feed(tmp_path: Path) -> Path:
    path = tmp_path / "blocklist.csv"
    write_feed(path, "ip,198.51.100.1,,,", "host,evil.example.com,,,")
    return path


def test_index_before_load_is_empty(feed: Path) -> None:
    index = IntelIndex([FeedSettings(path=feed)])

    assert index.lookup_ip("198.51.100.1") == []
    assert index.changed() is True


def test_index_load_merges_feeds(tmp_path: Path, feed: Path) -> None:
    other = tmp_path / "other.txt"
    other.write_text("198.51.100.1\nhttp://evil.example.com/x\n")
    index = IntelIndex.from_settings(
        IntelSettings.model_validate({"feeds": [feed, other]})
    )

    reports = index.load()

    assert [report.accepted_total for report in reports] == [2, 2]
    assert {hit["source"] for hit in index.lookup_ip("198.51.100.1")} == {
        "blocklist",
        "other",
    }
    assert len(index.lookup_url("http://evil.example.com/x")) == 1
    assert index.reports == reports


def test_reload_if_changed_unchanged_does_nothing(feed: Path) -> None:
    index = IntelIndex([FeedSettings(path=feed)])
    index.load()
    store = index.store

    assert index.reload_if_changed() is False
    assert index.store is store


def test_reload_if_changed_picks_up_new_file(feed: Path) -> None:
    index = IntelIndex([FeedSettings(path=feed)])
    index.load()

    write_feed(feed, "ip,203.0.113.9,,,", mtime_step=1)

    assert index.reload_if_changed() is True
    assert index.lookup_ip("198.51.100.1") == []
    assert len(index.lookup_ip("203.0.113.9")) == 1


def test_reload_broken_feed_keeps_current_store(feed: Path) -> None:
    index = IntelIndex([FeedSettings(path=feed)])
    index.load()

    feed.unlink()

    assert index.reload_if_changed() is False
    assert isinstance(index.last_error, FeedError)
    assert len(index.lookup_ip("198.51.100.1")) == 1


def test_reload_after_fix_clears_error(feed: Path) -> None:
    index = IntelIndex([FeedSettings(path=feed)])
    index.load()
    feed.unlink()
    index.reload_if_changed()

    write_feed(feed, "ip,203.0.113.9,,,")

    assert index.reload_if_changed() is True
    assert index.last_error is None


def test_load_missing_feed_raises(tmp_path: Path) -> None:
    index = IntelIndex([FeedSettings(path=tmp_path / "absent.csv")])

    with pytest.raises(FeedError):
        index.load()


def test_reload_no_empty_moment_for_concurrent_lookups(tmp_path: Path) -> None:
    path = tmp_path / "big.csv"
    filler = [f"ip,10.{n // 65536}.{n // 256 % 256}.{n % 256},,," for n in range(20000)]
    write_feed(path, "ip,198.51.100.1,,,", *filler)
    index = IntelIndex([FeedSettings(path=path)])
    index.load()
    stop = threading.Event()
    misses: list[int] = []
    lookups: list[int] = [0]

    def look_up_constantly() -> None:
        while not stop.is_set():
            lookups[0] += 1
            if not index.lookup_ip("198.51.100.1"):
                misses.append(lookups[0])

    reader = threading.Thread(target=look_up_constantly)
    reader.start()
    try:
        for step in range(1, 6):
            write_feed(path, "ip,198.51.100.1,,,", *filler[step:], mtime_step=step)
            assert index.reload_if_changed() is True
    finally:
        stop.set()
        reader.join()

    assert misses == []
    assert lookups[0] > 100


async def test_feed_watcher_reloads_on_change(feed: Path) -> None:
    index = IntelIndex([FeedSettings(path=feed)])
    index.load()
    watcher = FeedWatcher(index, reload_seconds=0.02)
    watcher.start()
    try:
        write_feed(feed, "ip,203.0.113.9,,,", mtime_step=1)
        for _ in range(200):
            if index.lookup_ip("203.0.113.9"):
                break
            await asyncio.sleep(0.01)
    finally:
        await watcher.stop()

    assert len(index.lookup_ip("203.0.113.9")) == 1


async def test_feed_watcher_lookups_during_reload_see_hits(tmp_path: Path) -> None:
    path = tmp_path / "big.csv"
    filler = [f"ip,10.0.{n // 256}.{n % 256},,," for n in range(20000)]
    write_feed(path, "host,evil.example.com,,,", *filler)
    index = IntelIndex([FeedSettings(path=path)])
    index.load()
    watcher = FeedWatcher(index, reload_seconds=60)

    write_feed(path, "host,evil.example.com,,,", *filler[1:], mtime_step=1)
    check = asyncio.create_task(watcher.check())
    results = []
    while not check.done():
        results.append(bool(index.lookup_host("a.evil.example.com")))
        await asyncio.sleep(0)

    assert await check is True
    assert all(results)
    assert len(results) > 1
