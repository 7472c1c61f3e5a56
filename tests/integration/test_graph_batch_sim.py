"""The Graph simulator's JSON $batch and limits, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from autopull.sim.campaign import (
    CAMPAIGN_MESSAGE_ID,
    CLIENT_ID,
    CLIENT_SECRET,
    QUARANTINE_MAILBOX,
    TENANT_ID,
    campaign_scenario,
    user_mailbox,
)
from autopull.sim.graph import GraphSimSettings, GraphSimulator
from autopull.sim.world import World

pytestmark = pytest.mark.integration

USER = user_mailbox(0)
FIND = (
    f"/users/{USER}/messages?$filter=internetMessageId eq "
    f"'<{CAMPAIGN_MESSAGE_ID}>'&$select=id,parentFolderId"
)


@pytest.fixture
async def sim() -> AsyncIterator[GraphSimulator]:
    world = World.from_scenario(campaign_scenario(30))
    simulator = GraphSimulator(world, GraphSimSettings())
    await simulator.start()
    yield simulator
    await simulator.stop()


@pytest.fixture
async def client(sim: GraphSimulator) -> AsyncIterator[httpx.AsyncClient]:
    assert sim.base_url is not None
    async with httpx.AsyncClient(base_url=sim.base_url) as anonymous:
        response = await anonymous.post(
            f"/{TENANT_ID}/oauth2/v2.0/token",
            data={
                "grant_type": "client_credentials",
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
                "scope": "https://graph.microsoft.com/.default",
            },
        )
    token = response.json()["access_token"]
    async with httpx.AsyncClient(
        base_url=sim.base_url, headers={"Authorization": f"Bearer {token}"}
    ) as authorized:
        yield authorized


def get(request_id: str, url: str, **extra: Any) -> dict[str, Any]:
    return {"id": request_id, "method": "GET", "url": url, **extra}


def inner_requests(sim: GraphSimulator) -> list[Any]:
    return [entry for entry in sim.log if entry.batch is not None]


async def test_batch_parallel_returns_each_response(
    client: httpx.AsyncClient, sim: GraphSimulator
) -> None:
    requests = [get(str(i), FIND.replace(USER, user_mailbox(i))) for i in range(3)]

    response = await client.post("/v1.0/$batch", json={"requests": requests})

    responses = {item["id"]: item for item in response.json()["responses"]}
    assert response.status_code == 200
    assert sorted(responses) == ["0", "1", "2"]
    for item in responses.values():
        assert item["status"] == 200
        assert len(item["body"]["value"]) == 1
    assert sorted(e.mailbox for e in inner_requests(sim)) == [
        user_mailbox(i) for i in range(3)
    ]


async def test_batch_over_twenty_rejected_whole(
    client: httpx.AsyncClient, sim: GraphSimulator
) -> None:
    requests = [get(str(i), FIND.replace(USER, user_mailbox(i))) for i in range(21)]

    response = await client.post("/v1.0/$batch", json={"requests": requests})

    error = response.json()["error"]
    assert response.status_code == 400
    assert error["code"] == "BadRequest"
    assert "21 requests, more than the limit of 20" in error["message"]
    assert inner_requests(sim) == []


async def test_batch_of_twenty_accepted(client: httpx.AsyncClient) -> None:
    requests = [get(str(i), FIND.replace(USER, user_mailbox(i))) for i in range(20)]

    response = await client.post("/v1.0/$batch", json={"requests": requests})

    assert response.status_code == 200
    assert len(response.json()["responses"]) == 20


@pytest.mark.parametrize(
    ("depends", "reason"),
    [
        ([None, ["1"], None], "fully parallel or one sequential chain"),
        ([None, ["1"], ["1"]], "both depend on 1"),
        ([None, ["1", "2"], None], "depends on several requests"),
        ([None, ["9"], ["2"]], "which is not in the batch"),
    ],
)
async def test_batch_mixed_dependencies_rejected(
    client: httpx.AsyncClient,
    sim: GraphSimulator,
    depends: list[list[str] | None],
    reason: str,
) -> None:
    requests = []
    for position, depends_on in enumerate(depends, start=1):
        request = get(str(position), FIND.replace(USER, user_mailbox(position)))
        if depends_on is not None:
            request["dependsOn"] = depends_on
        requests.append(request)

    response = await client.post("/v1.0/$batch", json={"requests": requests})

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "BadRequest"
    assert reason in response.json()["error"]["message"]
    assert inner_requests(sim) == []


async def test_batch_duplicate_ids_rejected(client: httpx.AsyncClient) -> None:
    requests = [get("1", FIND), get("1", FIND.replace(USER, user_mailbox(1)))]

    response = await client.post("/v1.0/$batch", json={"requests": requests})

    assert response.status_code == 400
    assert "unique" in response.json()["error"]["message"]


async def test_batch_body_needs_content_type(client: httpx.AsyncClient) -> None:
    request = {
        "id": "1",
        "method": "POST",
        "url": f"/users/{USER}/mailFolders",
        "body": {"displayName": "X"},
    }

    response = await client.post("/v1.0/$batch", json={"requests": [request]})

    assert response.status_code == 400
    assert "Content-Type" in response.json()["error"]["message"]


async def test_batch_chain_stops_at_failure(
    client: httpx.AsyncClient, sim: GraphSimulator
) -> None:
    requests = [
        get("1", f"/users/{USER}/mailFolders/inbox"),
        get("2", f"/users/{USER}/messages/AAAAAAAAAAAAAAAAAAAAAAAA", dependsOn=["1"]),
        get("3", f"/users/{USER}/mailFolders/inbox", dependsOn=["2"]),
    ]

    response = await client.post("/v1.0/$batch", json={"requests": requests})

    statuses = [(item["id"], item["status"]) for item in response.json()["responses"]]
    assert statuses == [("1", 200), ("2", 404), ("3", 424)]
    assert len(inner_requests(sim)) == 2


async def test_batch_fifth_request_to_mailbox_throttled(
    client: httpx.AsyncClient, sim: GraphSimulator
) -> None:
    sim.settings.latency_ms = 200
    requests = [get(str(i), f"/users/{USER}/mailFolders/inbox") for i in range(6)]

    response = await client.post("/v1.0/$batch", json={"requests": requests})

    items = response.json()["responses"]
    throttled = [item for item in items if item["status"] == 429]
    assert sorted(item["status"] for item in items) == [200] * 4 + [429] * 2
    assert throttled[0]["headers"]["Retry-After"] == "1"
    assert throttled[0]["body"]["error"]["code"] == "ApplicationThrottled"
    assert {e.limit for e in inner_requests(sim) if e.status == 429} == {"concurrency"}


async def test_batch_absolute_url_rejected_per_item(
    client: httpx.AsyncClient, sim: GraphSimulator
) -> None:
    assert sim.base_url is not None
    absolute = f"{sim.base_url}/v1.0/users/{USER}/mailFolders/inbox"
    requests = [get("1", absolute), get("2", f"/users/{USER}/mailFolders/inbox")]

    response = await client.post("/v1.0/$batch", json={"requests": requests})

    statuses = {item["id"]: item["status"] for item in response.json()["responses"]}
    assert statuses == {"1": 400, "2": 200}


async def test_batch_inner_fault_carries_retry_after(
    client: httpx.AsyncClient, sim: GraphSimulator
) -> None:
    sim.faults.add(
        {"path": f"/users/{user_mailbox(1)}/", "status": 503, "retry_after": 7}
    )
    requests = [get(str(i), FIND.replace(USER, user_mailbox(i))) for i in range(3)]

    response = await client.post("/v1.0/$batch", json={"requests": requests})

    items = {item["id"]: item for item in response.json()["responses"]}
    assert items["1"]["status"] == 503
    assert items["1"]["headers"]["Retry-After"] == "7"
    assert items["0"]["status"] == 200
    assert items["2"]["status"] == 200


async def test_batch_move_runs_inside(
    client: httpx.AsyncClient, sim: GraphSimulator
) -> None:
    found = await client.get(f"/v1.0{FIND}")
    item_id = found.json()["value"][0]["id"]
    move = {
        "id": "1",
        "method": "POST",
        "url": f"/users/{USER}/messages/{item_id}/move",
        "headers": {"Content-Type": "application/json"},
        "body": {"destinationId": "junkemail"},
    }

    response = await client.post("/v1.0/$batch", json={"requests": [move]})

    moved = response.json()["responses"][0]
    junk = sim.world.folder(USER, "junkemail")
    assert moved["status"] == 201
    assert moved["body"]["parentFolderId"] == junk.folder_id
    assert [i.folder_id for i in sim.world.items_of(USER)] == [junk.folder_id]


async def test_app_window_limits_all_mailboxes(
    client: httpx.AsyncClient, sim: GraphSimulator
) -> None:
    sim.settings.app_window_requests = 3
    requests = [
        get(str(i), f"/users/{user_mailbox(i)}/mailFolders/inbox") for i in range(5)
    ]

    response = await client.post("/v1.0/$batch", json={"requests": requests})
    quarantine = await client.get(f"/v1.0/users/{QUARANTINE_MAILBOX}/mailFolders/inbox")

    statuses = sorted(item["status"] for item in response.json()["responses"])
    assert statuses == [200, 200, 200, 429, 429]
    assert quarantine.status_code == 429
    assert {e.limit for e in sim.log if e.status == 429} == {"app_window"}


async def test_request_log_records_clock_and_batch(
    client: httpx.AsyncClient, sim: GraphSimulator
) -> None:
    await client.post("/v1.0/$batch", json={"requests": [get("1", FIND)]})

    outer, inner = list(sim.log)[-2:]
    assert outer.path == "/v1.0/$batch"
    assert inner.batch == outer.seq
    assert inner.at is not None
    assert outer.at is not None
    assert inner.at >= outer.at


async def test_concurrent_batches_share_mailbox_limit(
    client: httpx.AsyncClient, sim: GraphSimulator
) -> None:
    sim.settings.latency_ms = 100
    batch = {
        "requests": [get(str(i), f"/users/{USER}/mailFolders/inbox") for i in range(3)]
    }

    first, second = await asyncio.gather(
        client.post("/v1.0/$batch", json=batch), client.post("/v1.0/$batch", json=batch)
    )

    statuses = sorted(
        item["status"]
        for response in (first, second)
        for item in response.json()["responses"]
    )
    assert statuses == [200] * 4 + [429] * 2
    assert sim.throttle.peak_in_flight[USER] == 4
