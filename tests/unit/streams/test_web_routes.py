"""The routes of the worker's web server, served in-process without a broker."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiokafka.client import ConnectionGroup

from autopull.streams.api import IncidentReadModel, register_api
from autopull.streams.app import Pipeline
from autopull.streams.settings import Settings
from autopull.streams.web_errors import MAX_FIELD_BYTES, MAX_LINE_BYTES
from autopull.streams.webhook import WebhookSettings, register_webhook


@pytest.fixture
def pipe_and_model(tmp_path: Path) -> tuple[Pipeline, IncidentReadModel]:
    pipe = Pipeline(
        Settings(
            topic_prefix="unit.",
            store="memory://",
            data_dir=tmp_path,
            web_enabled=False,
            webhook=WebhookSettings(tokens={"tap": "tap-token-7"}),
        )
    )
    model = register_api(pipe)
    register_webhook(pipe)
    return pipe, model


@pytest.fixture
def pipe(pipe_and_model: tuple[Pipeline, IncidentReadModel]) -> Pipeline:
    return pipe_and_model[0]


@pytest.fixture
def model(pipe_and_model: tuple[Pipeline, IncidentReadModel]) -> IncidentReadModel:
    return pipe_and_model[1]


@pytest.fixture
async def client(pipe: Pipeline) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(pipe.app.web.web_app)) as client:
        yield client


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ("/alerts/tap", "POST"),
        ("/api/incidents/INC-1/close", "POST"),
    ],
)
async def test_post_route_head_matches_allow(
    client: TestClient[Any, Any], path: str, allowed: str
) -> None:
    head = await client.head(path)
    get = await client.get(path)

    assert head.status == 405
    assert head.headers["Allow"] == allowed
    assert get.status == 405
    assert get.headers["Allow"] == allowed
    error = (await get.json())["error"]
    assert error["code"] == "method_not_allowed"
    assert f"Use {allowed}." in error["message"]


@pytest.mark.parametrize("path", ["/livez", "/metrics", "/api/incidents"])
async def test_get_route_serves_head(client: TestClient[Any, Any], path: str) -> None:
    get = await client.get(path)
    head = await client.head(path)

    assert head.status == get.status
    assert head.headers["Content-Type"] == get.headers["Content-Type"]
    assert await head.read() == b""
    put = await client.put(path)
    assert put.status == 405
    assert put.headers["Allow"] == "GET,HEAD"


async def test_url_within_limit_gets_json_error(
    client: TestClient[Any, Any],
) -> None:
    query = "x" * (MAX_LINE_BYTES - 200)
    response = await client.get(f"/api/incidents?state={query}")

    assert response.status == 401
    assert (await response.json())["error"]["code"] == "unauthorized"


async def test_url_over_limit_gets_plain_400(client: TestClient[Any, Any]) -> None:
    query = "x" * (MAX_LINE_BYTES + 1)
    response = await client.get(f"/api/incidents?state={query}")

    # aiohttp rejects the request line before any middleware runs (see the NOTE
    # in web_errors), so the reply is its own text, which names the limit.
    assert response.status == 400
    assert response.content_type == "text/plain"
    assert f"Got more than {MAX_LINE_BYTES} bytes" in await response.text()


async def test_header_over_limit_gets_plain_400(
    client: TestClient[Any, Any],
) -> None:
    headers = {"X-Note": "y" * (MAX_FIELD_BYTES + 1)}
    response = await client.get("/api/incidents", headers=headers)

    assert response.status == 400
    assert response.content_type == "text/plain"
    assert f"Got more than {MAX_FIELD_BYTES} bytes" in await response.text()


def test_app_sets_parser_limits(pipe: Pipeline) -> None:
    options = pipe.app.conf.web_application_options

    assert options["handler_args"]["max_line_size"] == MAX_LINE_BYTES
    assert options["handler_args"]["max_field_size"] == MAX_FIELD_BYTES


class FakeConnection:
    def __init__(self, is_open: bool) -> None:
        self.is_open = is_open

    def connected(self) -> bool:
        return self.is_open


def kafka_consumer(coordinator: int | None, is_open: bool = True) -> Any:
    """A Faust consumer whose aiokafka client has this coordinator and connection."""
    connections = {}
    if coordinator is not None:
        key = (coordinator, ConnectionGroup.COORDINATION)
        connections[key] = FakeConnection(is_open)
    client = SimpleNamespace(
        _coordinator=SimpleNamespace(coordinator_id=coordinator),
        _client=SimpleNamespace(_conns=connections),
    )
    return SimpleNamespace(_thread=SimpleNamespace(_consumer=client))


async def test_readiness_reports_broker_unreachable(
    pipe: Pipeline, model: IncidentReadModel, client: TestClient[Any, Any]
) -> None:
    pipe.app.tables.recovery.completed.set()
    model.caught_up.set()
    pipe.app.consumer = kafka_consumer(None)

    response = await client.get("/readyz")

    assert response.status == 503
    body = await response.json()
    assert body["ready"] is False
    assert body["broker_connected"] is False
    assert body["tables_recovered"] is True
    assert body["incidents_loaded"] is True
    assert len(body["reasons"]) == 1
    assert "no group coordinator" in body["reasons"][0]
    live = await client.get("/livez")
    assert live.status == 200
    assert await live.json() == {"status": "alive"}


async def test_readiness_returns_with_broker(
    pipe: Pipeline, model: IncidentReadModel, client: TestClient[Any, Any]
) -> None:
    pipe.app.tables.recovery.completed.set()
    model.caught_up.set()
    pipe.app.consumer = kafka_consumer(1, is_open=False)
    closed = await client.get("/readyz")
    pipe.app.consumer = kafka_consumer(1, is_open=True)
    reopened = await client.get("/readyz")

    assert closed.status == 503
    assert "broker 1, is closed" in (await closed.json())["reasons"][0]
    assert reopened.status == 200
    body = await reopened.json()
    assert body["ready"] is True
    assert body["broker_connected"] is True
    assert body["reasons"] == []


async def test_readiness_lists_every_reason(
    pipe: Pipeline, client: TestClient[Any, Any]
) -> None:
    pipe.app.consumer = kafka_consumer(None)

    response = await client.get("/readyz")

    assert response.status == 503
    reasons = (await response.json())["reasons"]
    assert len(reasons) == 3
    assert "tables are still recovering" in reasons[0]
    assert "incident read model" in reasons[1]
    assert "group coordinator" in reasons[2]
