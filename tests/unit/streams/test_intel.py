"""The enrich step with intel providers set up from the worker's settings."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from autopull.streams.enrich import enrich
from autopull.streams.intel import IntelLookups, load_intel
from autopull.streams.settings import Settings

EVIL_URL = "http://billing-example.net/pay/4471"


class LookupService:
    """An intel lookup service on 127.0.0.1 whose responses the test sets."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self.status = 200
        self.delay_seconds = 0.0
        self.bad_urls: set[str] = set()
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        kind, value = request.query["kind"], request.query["value"]
        self.requests.append((kind, value))
        if self.delay_seconds:
            await asyncio.sleep(self.delay_seconds)
        if self.status != 200:
            return web.Response(status=self.status)
        if kind == "url" and value in self.bad_urls:
            return web.json_response({"hits": [{"confidence": 90}]})
        return web.Response(status=404)


async def start_service(path: str) -> tuple[LookupService, web.AppRunner]:
    service = LookupService()
    app = web.Application()
    app.router.add_get(path, service.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    service.url = f"http://127.0.0.1:{port}{path}"
    return service, runner


@pytest.fixture
async def services() -> AsyncIterator[tuple[LookupService, LookupService]]:
    first, first_runner = await start_service("/first")
    second, second_runner = await start_service("/second")
    yield first, second
    await first_runner.cleanup()
    await second_runner.cleanup()


def settings_with(
    *providers: dict[str, Any], feeds: list[Path] | None = None
) -> Settings:
    return Settings(intel={"providers": list(providers), "feeds": feeds or []})


def alert() -> dict[str, Any]:
    return {
        "alert_id": "generic:a1",
        "message_id": "a1@billing-example.net",
        "received_at": datetime(2026, 12, 1, 9, 30, tzinfo=UTC),
        "sender": "billing@billing-example.net",
        "sender_ip": "192.0.2.17",
        "urls": [EVIL_URL],
        "recipients": ["alice@example.com"],
    }


async def enrich_with(lookups: IntelLookups) -> dict[str, Any]:
    try:
        return await enrich(alert(), None, lookups)
    finally:
        await lookups.aclose()


def test_load_intel_nothing_configured_none() -> None:
    assert load_intel(Settings()) is None


async def test_enrich_provider_hit_in_intel_hits(
    services: tuple[LookupService, LookupService],
) -> None:
    first, _ = services
    first.bad_urls.add(EVIL_URL)
    lookups = load_intel(settings_with({"name": "first", "url": first.url}))
    assert lookups is not None

    enriched = await enrich_with(lookups)

    assert enriched["intel_hits"] == [
        {"indicator": EVIL_URL, "kind": "url", "source": "first", "confidence": 90}
    ]
    assert enriched["unavailable"] == []
    assert ("url", EVIL_URL) in first.requests
    assert ("ip", "192.0.2.17") in first.requests


async def test_enrich_failing_provider_named_unavailable(
    services: tuple[LookupService, LookupService],
) -> None:
    first, second = services
    first.bad_urls.add(EVIL_URL)
    second.status = 503
    lookups = load_intel(
        settings_with(
            {"name": "first", "url": first.url},
            {"name": "second", "url": second.url},
        )
    )
    assert lookups is not None

    enriched = await enrich_with(lookups)

    assert [hit["source"] for hit in enriched["intel_hits"]] == ["first"]
    assert enriched["unavailable"] == ["second"]
    assert enriched["recipients"][0]["mailbox"] == "alice@example.com"


async def test_enrich_slow_provider_times_out(
    services: tuple[LookupService, LookupService],
) -> None:
    first, _ = services
    first.delay_seconds = 5.0
    lookups = load_intel(
        settings_with({"name": "slow", "url": first.url, "timeout_seconds": 0.2})
    )
    assert lookups is not None
    started = time.monotonic()

    enriched = await enrich_with(lookups)

    assert enriched["unavailable"] == ["slow"]
    assert enriched["intel_hits"] == []
    assert time.monotonic() - started < 3.0


async def test_enrich_open_circuit_sends_nothing(
    services: tuple[LookupService, LookupService],
) -> None:
    first, _ = services
    first.status = 500
    lookups = load_intel(
        settings_with(
            {
                "name": "flaky",
                "url": first.url,
                "failure_threshold": 1,
                "cooldown_seconds": 600,
            }
        )
    )
    assert lookups is not None

    try:
        opened = await enrich(alert(), None, lookups)
        requested = len(first.requests)
        again = await enrich(alert(), None, lookups)
    finally:
        await lookups.aclose()

    assert opened["unavailable"] == ["flaky"]
    assert again["unavailable"] == ["flaky"]
    assert requested >= 1
    assert len(first.requests) == requested


async def test_enrich_cached_response_not_requested(
    services: tuple[LookupService, LookupService],
) -> None:
    first, _ = services
    first.bad_urls.add(EVIL_URL)
    lookups = load_intel(settings_with({"name": "first", "url": first.url}))
    assert lookups is not None

    try:
        await enrich(alert(), None, lookups)
        requested = len(first.requests)
        again = await enrich(alert(), None, lookups)
    finally:
        await lookups.aclose()

    assert len(first.requests) == requested
    assert [hit["source"] for hit in again["intel_hits"]] == ["first"]


async def test_enrich_feed_hits_kept_when_provider_down(
    tmp_path: Path, services: tuple[LookupService, LookupService]
) -> None:
    first, _ = services
    first.status = 502
    feed = tmp_path / "ips.txt"
    feed.write_text("192.0.2.17\n")
    lookups = load_intel(
        settings_with({"name": "first", "url": first.url}, feeds=[feed])
    )
    assert lookups is not None

    enriched = await enrich_with(lookups)

    assert [(hit["kind"], hit["indicator"]) for hit in enriched["intel_hits"]] == [
        ("ip", "192.0.2.17")
    ]
    assert enriched["unavailable"] == ["first"]
