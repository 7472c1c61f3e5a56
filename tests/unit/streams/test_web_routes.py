"""The routes of the worker's web server, served in-process without a broker."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from autopull.streams.api import register_api
from autopull.streams.app import Pipeline
from autopull.streams.settings import Settings
from autopull.streams.webhook import WebhookSettings, register_webhook


@pytest.fixture
def pipe(tmp_path: Path) -> Pipeline:
    pipe = Pipeline(
        Settings(
            topic_prefix="unit.",
            store="memory://",
            data_dir=tmp_path,
            web_enabled=False,
            webhook=WebhookSettings(tokens={"tap": "tap-token-7"}),
        )
    )
    register_api(pipe)
    register_webhook(pipe)
    return pipe


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
