from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from autopull.connectors.errors import PermanentError, TransientError
from autopull.connectors.intel import FeedSettings, HttpProviderSettings
from autopull.connectors.intel.enricher import IntelEnricher
from autopull.connectors.intel.exceptions import ProviderUnavailableError
from autopull.connectors.intel.index import IntelIndex
from autopull.connectors.intel.providers import CircuitBreaker, HttpProvider, TtlCache


class Clock:
    """A settable monotonic clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class IntelServer:
    """A lookup service on 127.0.0.1 whose responses the test sets."""

    def __init__(self) -> None:
        self.requests: list[dict[str, str]] = []
        self.status = 200
        self.delay = 0.0
        self.body: Any = {"hits": []}
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(
            {**request.query, "authorization": request.headers.get("Authorization", "")}
        )
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.status != 200:
            return web.Response(status=self.status)
        if isinstance(self.body, str):
            return web.Response(text=self.body)
        return web.json_response(self.body)


@pytest.fixture
async def server() -> AsyncIterator[IntelServer]:
    intel = IntelServer()
    app = web.Application()
    app.router.add_get("/lookup", intel.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    intel.url = f"http://{host}:{port}/lookup"
    yield intel
    await runner.cleanup()


def make_provider(server: IntelServer, clock: Clock, **options: Any) -> HttpProvider:
    settings = HttpProviderSettings(name="reputation", url=server.url, **options)
    return HttpProvider(settings, clock=clock)


async def test_http_provider_hits_from_answer(server: IntelServer) -> None:
    server.body = {"hits": [{"indicator": "evil.example.com", "confidence": 88}]}
    provider = make_provider(server, Clock(), api_key="s3cret")

    hits = await provider.lookup("host", "a.evil.example.com")
    await provider.aclose()

    assert hits == [
        {
            "indicator": "evil.example.com",
            "kind": "host",
            "source": "reputation",
            "confidence": 88,
        }
    ]
    assert server.requests == [
        {
            "kind": "host",
            "value": "a.evil.example.com",
            "authorization": "Bearer s3cret",
        }
    ]


async def test_http_provider_not_found_no_hits(server: IntelServer) -> None:
    server.status = 404
    provider = make_provider(server, Clock())

    assert await provider.lookup("ip", "198.51.100.1") == []
    await provider.aclose()


async def test_http_provider_answer_cached_until_ttl(server: IntelServer) -> None:
    clock = Clock()
    server.body = {"hits": [{"confidence": 60}]}
    provider = make_provider(server, clock, cache_seconds=60)

    first = await provider.lookup("ip", "198.51.100.1")
    second = await provider.lookup("ip", "198.51.100.1")
    clock.now += 61
    await provider.lookup("ip", "198.51.100.1")
    await provider.aclose()

    assert first == second
    assert first[0]["indicator"] == "198.51.100.1"
    assert len(server.requests) == 2


@pytest.mark.parametrize(
    ("status", "error"),
    [(500, TransientError), (429, TransientError), (401, PermanentError)],
)
async def test_http_provider_error_status_classified(
    server: IntelServer, status: int, error: type[Exception]
) -> None:
    server.status = status
    provider = make_provider(server, Clock())

    with pytest.raises(error, match=str(status)):
        await provider.lookup("ip", "198.51.100.1")
    await provider.aclose()


async def test_http_provider_timeout_is_transient(server: IntelServer) -> None:
    server.delay = 0.3
    provider = make_provider(server, Clock(), timeout_seconds=0.05)

    with pytest.raises(TransientError, match="timed out"):
        await provider.lookup("ip", "198.51.100.1")
    await provider.aclose()


async def test_http_provider_bad_json_is_transient(server: IntelServer) -> None:
    server.body = "<html>maintenance</html>"
    provider = make_provider(server, Clock())

    with pytest.raises(TransientError, match="expected JSON"):
        await provider.lookup("ip", "198.51.100.1")
    await provider.aclose()


async def test_http_provider_circuit_opens_after_failures(server: IntelServer) -> None:
    server.status = 503
    provider = make_provider(server, Clock(), failure_threshold=3)

    for _ in range(3):
        with pytest.raises(TransientError):
            await provider.lookup("ip", "198.51.100.1")
    with pytest.raises(ProviderUnavailableError) as caught:
        await provider.lookup("ip", "198.51.100.1")
    await provider.aclose()

    assert len(server.requests) == 3
    assert provider.breaker.state == "open"
    assert caught.value.retry_after == 30.0


async def test_http_provider_half_open_trial_closes(server: IntelServer) -> None:
    clock = Clock()
    server.status = 503
    provider = make_provider(server, clock, failure_threshold=1, cooldown_seconds=10)
    with pytest.raises(TransientError):
        await provider.lookup("ip", "198.51.100.1")

    clock.now += 10
    server.status = 200
    hits = await provider.lookup("ip", "198.51.100.2")
    await provider.aclose()

    assert hits == []
    assert provider.breaker.state == "closed"


async def test_http_provider_failed_trial_reopens(server: IntelServer) -> None:
    clock = Clock()
    server.status = 503
    provider = make_provider(server, clock, failure_threshold=2, cooldown_seconds=10)
    for _ in range(2):
        with pytest.raises(TransientError):
            await provider.lookup("ip", "198.51.100.1")

    clock.now += 10
    with pytest.raises(TransientError):
        await provider.lookup("ip", "198.51.100.1")
    await provider.aclose()

    assert provider.breaker.state == "open"
    assert len(server.requests) == 3


def test_circuit_breaker_half_open_allows_one_trial() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=1, cooldown=5, clock=clock)
    breaker.record_failure()

    clock.now += 5

    assert breaker.state == "half_open"
    assert breaker.allow() is True
    assert breaker.allow() is False


def test_circuit_breaker_success_resets_count() -> None:
    breaker = CircuitBreaker(threshold=2, cooldown=5, clock=Clock())

    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()

    assert breaker.state == "closed"


def test_ttl_cache_drops_oldest_when_full() -> None:
    cache = TtlCache(ttl=60, max_entries=2, clock=Clock())

    cache.put(("ip", "a"), [])
    cache.put(("ip", "b"), [])
    cache.put(("ip", "c"), [])

    assert cache.get(("ip", "a")) is None
    assert cache.get(("ip", "c")) == []


@pytest.fixture
def index(tmp_path: Path) -> IntelIndex:
    path = tmp_path / "local.csv"
    path.write_text("ip,198.51.100.1,local,70,\n")
    index = IntelIndex([FeedSettings(path=path)])
    index.load()
    return index


async def test_enricher_provider_down_returns_local_hits_and_name(
    server: IntelServer, index: IntelIndex
) -> None:
    server.status = 500
    provider = make_provider(server, Clock())
    enricher = IntelEnricher(index, [provider])

    result = await enricher.lookup_alert(
        {"sender_ip": "198.51.100.1", "urls": ["http://evil.example.com/a"]}
    )
    await provider.aclose()

    assert [hit["source"] for hit in result.hits] == ["local"]
    assert result.unavailable == ["reputation"]


async def test_enricher_combines_local_and_provider_hits(
    server: IntelServer, index: IntelIndex
) -> None:
    server.body = {"hits": [{"confidence": 90, "source": "reputation-db"}]}
    provider = make_provider(server, Clock())
    enricher = IntelEnricher(index, [provider])

    result = await enricher.lookup_alert({"sender_ip": "198.51.100.1"})
    await provider.aclose()

    assert sorted(hit["source"] for hit in result.hits) == ["local", "reputation-db"]
    assert result.unavailable == []


async def test_enricher_without_providers_local_only(index: IntelIndex) -> None:
    result = await IntelEnricher(index).lookup_alert({"sender_ip": "198.51.100.1"})

    assert len(result.hits) == 1
    assert result.unavailable == []
