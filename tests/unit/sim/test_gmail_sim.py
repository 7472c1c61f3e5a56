"""The Gmail simulator: token checks, quota accounting, refusals and label model.

The simulator runs on a free loopback port and is reached with httpx. JWT
assertions are built and signed here with cryptography, not with google-auth, so
these tests check the token endpoint on its own terms.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from autopull.sim.gmail import (
    GOOGLE_TOKEN_URL,
    JWT_BEARER,
    QUOTA_UNITS,
    GmailSimSettings,
    GmailSimulator,
    SearchQuery,
    SimClock,
    UserLimits,
)
from autopull.sim.world import World

ACCOUNT = "svc@proj.iam.gserviceaccount.com"
FULL = "https://mail.google.com/"
MESSAGE_ID = "<q1@mail.example.net>"


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def scenario(key: rsa.RSAPrivateKey) -> dict[str, Any]:
    public = (
        key.public_key()
        .public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        .decode()
    )
    return {
        "tenants": [
            {
                "domain": "example.org",
                "platform": "gmail",
                "service_account": ACCOUNT,
                "public_key_pem": public,
            },
            {"domain": "example.com", "platform": "graph"},
        ],
        "mailboxes": [
            {"address": "alice@example.org", "folders": [{"name": "Projects"}]},
            {"address": "bob@example.org"},
            {"address": "frank@example.com"},
        ],
        "messages": [
            {
                "key": "Q1",
                "message_id": MESSAGE_ID,
                "from": "x@mail.example.net",
                "to": ["alice@example.org"],
                "subject": "Quota",
                "date": "2026-12-01T08:00:00Z",
                "body": "Body\n",
                "deliveries": [
                    {"mailbox": "alice@example.org", "folder": "inbox"},
                    {"mailbox": "alice@example.org", "folder": "junkemail"},
                    {"mailbox": "bob@example.org", "folder": "inbox", "read": True},
                ],
            }
        ],
    }


def assertion(
    key: rsa.RSAPrivateKey, claims: dict[str, Any], *, alg: str = "RS256"
) -> str:
    def encode(data: dict[str, Any]) -> str:
        raw = json.dumps(data).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    signing_input = f"{encode({'alg': alg, 'typ': 'JWT'})}.{encode(claims)}"
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return (
        f"{signing_input}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"
    )


def claims(sub: str = "alice@example.org", **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    values: dict[str, Any] = {
        "iss": ACCOUNT,
        "scope": FULL,
        "aud": GOOGLE_TOKEN_URL,
        "iat": now,
        "exp": now + 3600,
        "sub": sub,
    }
    values.update(changes)
    return values


@pytest.fixture
async def sim(key: rsa.RSAPrivateKey) -> AsyncIterator[GmailSimulator]:
    simulator = GmailSimulator(World.from_scenario(scenario(key)))
    await simulator.start()
    yield simulator
    await simulator.stop()


@pytest.fixture
async def client(sim: GmailSimulator) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=str(sim.base_url)) as http:
        yield http


async def token_for(
    client: httpx.AsyncClient, key: rsa.RSAPrivateKey, **changes: Any
) -> httpx.Response:
    form = {"grant_type": JWT_BEARER, "assertion": assertion(key, claims(**changes))}
    return await client.post("/token", data=form)


async def bearer(
    client: httpx.AsyncClient, key: rsa.RSAPrivateKey, sub: str = "alice@example.org"
) -> dict[str, str]:
    response = await token_for(client, key, sub=sub)
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


def reason_of(response: httpx.Response) -> str:
    return str(response.json()["error"]["errors"][0]["reason"])


# --- the token endpoint ---------------------------------------------------------------


async def test_token_binds_subject(
    client: httpx.AsyncClient, key: rsa.RSAPrivateKey, sim: GmailSimulator
) -> None:
    response = await token_for(client, key)

    body = response.json()
    assert response.status_code == 200
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 3599
    assert [g.subject for g in sim.tokens.grants.values()] == ["alice@example.org"]


@pytest.mark.parametrize(
    ("changes", "status", "error"),
    [
        ({"sub": "frank@example.com"}, 401, "unauthorized_client"),
        ({"sub": ""}, 401, "unauthorized_client"),
        (
            {"scope": "https://www.googleapis.com/auth/drive"},
            401,
            "unauthorized_client",
        ),
        ({"sub": "nobody@example.org"}, 400, "invalid_grant"),
        ({"aud": "https://elsewhere.example/token"}, 400, "invalid_grant"),
        ({"exp": int(time.time()) + 7200}, 400, "invalid_grant"),
        ({"iss": "other@proj.iam.gserviceaccount.com"}, 401, "invalid_client"),
    ],
)
async def test_token_rejects_bad_assertion(
    client: httpx.AsyncClient,
    key: rsa.RSAPrivateKey,
    changes: dict[str, Any],
    status: int,
    error: str,
) -> None:
    response = await token_for(client, key, **changes)

    assert response.status_code == status
    assert response.json()["error"] == error


async def test_token_rejects_other_key(client: httpx.AsyncClient) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    response = await token_for(client, other)

    assert response.status_code == 400
    assert response.json()["error_description"] == "Invalid JWT Signature."


async def test_token_rejects_other_grant(
    client: httpx.AsyncClient, key: rsa.RSAPrivateKey
) -> None:
    form = {"grant_type": "client_credentials", "assertion": assertion(key, claims())}

    response = await client.post("/token", data=form)

    assert response.json()["error"] == "unsupported_grant_type"


# --- refusals -------------------------------------------------------------------------


async def test_missing_token_is_401(client: httpx.AsyncClient) -> None:
    response = await client.get("/gmail/v1/users/me/messages")

    assert response.status_code == 401
    assert reason_of(response) == "authError"


async def test_other_user_is_delegation_denied(
    client: httpx.AsyncClient, key: rsa.RSAPrivateKey
) -> None:
    headers = await bearer(client, key)

    response = await client.get(
        "/gmail/v1/users/bob@example.org/messages", headers=headers
    )

    assert response.status_code == 403
    assert (
        response.json()["error"]["message"] == "Delegation denied for alice@example.org"
    )


async def test_id_of_other_user_not_found(
    client: httpx.AsyncClient, key: rsa.RSAPrivateKey, sim: GmailSimulator
) -> None:
    bob_id = sim.snapshot("bob@example.org")[0]["id"]
    headers = await bearer(client, key)

    response = await client.get(
        f"/gmail/v1/users/me/messages/{bob_id}", headers=headers
    )

    assert response.status_code == 404
    assert reason_of(response) == "notFound"


@pytest.mark.parametrize(
    "query", ['"open', "(a b", "a )", "rfc822msgid:", "after:soon"]
)
async def test_bad_query_is_invalid(
    client: httpx.AsyncClient, key: rsa.RSAPrivateKey, query: str
) -> None:
    headers = await bearer(client, key)

    response = await client.get(
        "/gmail/v1/users/me/messages", params={"q": query}, headers=headers
    )

    assert response.status_code == 400
    assert reason_of(response) == "invalidArgument"


async def test_batch_modify_over_1000_ids(
    client: httpx.AsyncClient, key: rsa.RSAPrivateKey, sim: GmailSimulator
) -> None:
    headers = await bearer(client, key)
    real = sim.snapshot("alice@example.org")[0]["id"]
    body = {"ids": [real] * 1001, "addLabelIds": ["STARRED"]}

    response = await client.post(
        "/gmail/v1/users/me/messages/batchModify", json=body, headers=headers
    )

    assert response.status_code == 400
    assert "at most 1000" in response.json()["error"]["message"]
    assert "STARRED" not in sim.snapshot("alice@example.org")[0]["labels"]


async def test_import_without_raw(
    client: httpx.AsyncClient, key: rsa.RSAPrivateKey
) -> None:
    headers = await bearer(client, key)

    response = await client.post(
        "/gmail/v1/users/me/messages/import", json={"labelIds": []}, headers=headers
    )

    assert response.status_code == 400
    assert "'raw' RFC822 payload" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"addLabelIds": ["SENT"]}, "SENT"),
        ({"addLabelIds": ["Label_404"]}, "Invalid label: Label_404"),
        ({"addLabelIds": ["STARRED"], "removeLabelIds": ["STARRED"]}, "both"),
    ],
)
async def test_modify_rejects_bad_labels(
    client: httpx.AsyncClient,
    key: rsa.RSAPrivateKey,
    sim: GmailSimulator,
    body: dict[str, Any],
    fragment: str,
) -> None:
    headers = await bearer(client, key)
    gmail_id = sim.snapshot("alice@example.org")[0]["id"]

    response = await client.post(
        f"/gmail/v1/users/me/messages/{gmail_id}/modify", json=body, headers=headers
    )

    assert response.status_code == 400
    assert fragment in response.json()["error"]["message"]


async def test_delete_needs_full_scope(
    client: httpx.AsyncClient, key: rsa.RSAPrivateKey, sim: GmailSimulator
) -> None:
    modify = "https://www.googleapis.com/auth/gmail.modify"
    sim.world.scenario.tenants[0].delegated_scopes.append(modify)
    response = await token_for(client, key, scope=modify)
    headers = {"Authorization": f"Bearer {response.json()['access_token']}"}
    gmail_id = sim.snapshot("alice@example.org")[0]["id"]

    deleted = await client.delete(
        f"/gmail/v1/users/me/messages/{gmail_id}", headers=headers
    )

    assert deleted.status_code == 403
    assert reason_of(deleted) == "insufficientPermissions"
    assert len(sim.snapshot("alice@example.org")) == 2


async def test_label_clash_is_409(
    client: httpx.AsyncClient, key: rsa.RSAPrivateKey
) -> None:
    headers = await bearer(client, key)

    clash = await client.post(
        "/gmail/v1/users/me/labels", json={"name": "projects"}, headers=headers
    )
    system = await client.post(
        "/gmail/v1/users/me/labels", json={"name": "Inbox"}, headers=headers
    )

    assert clash.status_code == 409
    assert system.status_code == 409
    assert clash.json()["error"]["status"] == "ALREADY_EXISTS"


# --- search and labels ----------------------------------------------------------------


async def test_list_hides_spam_unless_asked(
    client: httpx.AsyncClient, key: rsa.RSAPrivateKey
) -> None:
    headers = await bearer(client, key)
    query = {"q": "rfc822msgid:q1@mail.example.net"}

    plain = await client.get(
        "/gmail/v1/users/me/messages", params=query, headers=headers
    )
    both = await client.get(
        "/gmail/v1/users/me/messages",
        params={**query, "includeSpamTrash": "true"},
        headers=headers,
    )
    none = await client.get(
        "/gmail/v1/users/me/messages", params={"q": "rfc822msgid:x@y"}, headers=headers
    )

    assert len(plain.json()["messages"]) == 1
    assert len(both.json()["messages"]) == 2
    assert "messages" not in none.json()
    assert none.json()["resultSizeEstimate"] == 0


def test_query_parses_groups_and_or() -> None:
    query = SearchQuery('(in:inbox OR label:spam) -is:unread subject:"a b"')

    assert query.names_location() is True
    assert len(query.tree) == 1
    assert len(query.tree[0]) == 3


async def test_labels_round_trip_through_folders(
    client: httpx.AsyncClient, key: rsa.RSAPrivateKey, sim: GmailSimulator
) -> None:
    headers = await bearer(client, key)
    inbox_copy = sim.snapshot("alice@example.org")[0]
    labels = (await client.get("/gmail/v1/users/me/labels", headers=headers)).json()
    projects = next(x["id"] for x in labels["labels"] if x["name"] == "Projects")

    await client.post(
        f"/gmail/v1/users/me/messages/{inbox_copy['id']}/modify",
        json={
            "addLabelIds": [projects, "STARRED", "TRASH"],
            "removeLabelIds": ["UNREAD"],
        },
        headers=headers,
    )
    await client.post(
        f"/gmail/v1/users/me/messages/{inbox_copy['id']}/untrash", headers=headers
    )

    row = sim.snapshot("alice@example.org")[0]
    assert sorted(row["labels"]) == sorted(["INBOX", projects, "STARRED"])
    assert row["id"] == inbox_copy["id"]


# --- quota ----------------------------------------------------------------------------


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_quota_charges_method_units() -> None:
    fake = FakeTime()
    limits = UserLimits(
        GmailSimSettings(user_quota_units=100), SimClock(1.0, fake, fake)
    )

    for method in ("messages.list", "messages.get", "messages.batchModify"):
        limits.acquire("alice@example.org", QUOTA_UNITS[method])
        limits.release("alice@example.org")

    assert limits.units_in_window("alice@example.org") == 60
    assert limits.units_total == {"alice@example.org": 60}


def test_quota_429_with_retry_after() -> None:
    fake = FakeTime()
    limits = UserLimits(
        GmailSimSettings(user_quota_units=50), SimClock(1.0, fake, fake)
    )
    limits.acquire("alice@example.org", 25)
    limits.release("alice@example.org")
    fake.now += 20
    limits.acquire("alice@example.org", 25)
    limits.release("alice@example.org")

    with pytest.raises(Exception) as caught:
        limits.acquire("alice@example.org", 5)

    error = caught.value
    assert getattr(error, "status", None) == 429
    assert getattr(error, "reason", None) == "userRateLimitExceeded"
    assert getattr(error, "headers", {})["Retry-After"] == "40"
    assert "Retry after" in str(error)
    limits.acquire("bob@example.org", 5)


def test_quota_window_slides() -> None:
    fake = FakeTime()
    limits = UserLimits(
        GmailSimSettings(user_quota_units=50), SimClock(1.0, fake, fake)
    )
    limits.acquire("alice@example.org", 50)
    limits.release("alice@example.org")
    fake.now += 60.5

    limits.acquire("alice@example.org", 50)

    assert limits.units_in_window("alice@example.org") == 50
    assert limits.units_total["alice@example.org"] == 100


def test_concurrency_limit_is_429() -> None:
    fake = FakeTime()
    limits = UserLimits(
        GmailSimSettings(concurrency_limit=2), SimClock(1.0, fake, fake)
    )
    limits.acquire("alice@example.org", 5)
    limits.acquire("alice@example.org", 5)

    with pytest.raises(Exception) as caught:
        limits.acquire("alice@example.org", 5)

    assert getattr(caught.value, "reason", None) == "rateLimitExceeded"
    assert limits.peak_in_flight == {"alice@example.org": 2}


def test_time_scale_shortens_retry_after() -> None:
    fake = FakeTime()
    clock = SimClock(100.0, fake, fake)
    limits = UserLimits(GmailSimSettings(user_quota_units=10), clock)
    limits.acquire("alice@example.org", 10)
    limits.release("alice@example.org")

    with pytest.raises(Exception) as caught:
        limits.acquire("alice@example.org", 5)

    assert getattr(caught.value, "headers", {})["Retry-After"] == "0.600"


async def test_http_quota_exhaustion(
    key: rsa.RSAPrivateKey,
) -> None:
    settings = GmailSimSettings(user_quota_units=10)
    simulator = GmailSimulator(World.from_scenario(scenario(key)), settings)
    await simulator.start()
    try:
        async with httpx.AsyncClient(base_url=str(simulator.base_url)) as http:
            headers = await bearer(http, key)
            first = await http.get("/gmail/v1/users/me/messages", headers=headers)
            second = await http.get("/gmail/v1/users/me/labels", headers=headers)
            third = await http.get("/gmail/v1/users/me/messages", headers=headers)
    finally:
        await simulator.stop()

    assert [first.status_code, second.status_code, third.status_code] == [200, 200, 429]
    assert reason_of(third) == "userRateLimitExceeded"
    assert third.json()["error"]["status"] == "RESOURCE_EXHAUSTED"
    assert int(third.headers["Retry-After"]) >= 59
    assert [e.units for e in simulator.log if e.api_method] == [5, 1, 0]


# --- the batch endpoint ---------------------------------------------------------------


def batch_body(parts: list[tuple[str, dict[str, str]]]) -> tuple[str, bytes]:
    boundary = "===============7330845974216740156=="
    chunks = []
    for number, (target, headers) in enumerate(parts):
        lines = "".join(f"{name}: {value}\n" for name, value in headers.items())
        chunks.append(
            f"--{boundary}\nContent-Type: application/http\n"
            f"Content-Transfer-Encoding: binary\nContent-ID: <part+{number}>\n\n"
            f"GET {target} HTTP/1.1\n{lines}\n"
        )
    body = "".join(chunks) + f"--{boundary}--\n"
    return f'multipart/mixed; boundary="{boundary}"', body.encode()


async def test_batch_parts_use_own_tokens(
    client: httpx.AsyncClient, key: rsa.RSAPrivateKey, sim: GmailSimulator
) -> None:
    alice = await bearer(client, key, "alice@example.org")
    bob = await bearer(client, key, "bob@example.org")
    content_type, body = batch_body(
        [
            ("/gmail/v1/users/alice@example.org/labels", alice),
            ("/gmail/v1/users/bob@example.org/labels", bob),
            ("/gmail/v1/users/bob@example.org/labels", alice),
        ]
    )

    response = await client.post(
        "/batch", content=body, headers={"Content-Type": content_type}
    )

    text = response.text
    assert response.status_code == 200
    assert text.count("Content-ID: <response-part+") == 3
    assert text.count("HTTP/1.1 200 OK") == 2
    assert text.count("HTTP/1.1 403 Forbidden") == 1
    assert [e.units for e in sim.log if e.api_method == "labels.list"] == [1, 1, 0]


async def test_batch_over_100_parts(
    client: httpx.AsyncClient, key: rsa.RSAPrivateKey, sim: GmailSimulator
) -> None:
    alice = await bearer(client, key)
    content_type, body = batch_body([("/gmail/v1/users/me/labels", alice)] * 101)

    response = await client.post(
        "/batch", content=body, headers={"Content-Type": content_type}
    )

    assert response.status_code == 400
    assert "at most 100" in response.json()["error"]["message"]
    assert [e for e in sim.log if e.api_method == "labels.list"] == []


# --- held requests --------------------------------------------------------------------


async def held_counts(client: httpx.AsyncClient) -> list[int]:
    """Return the `held` count of each fault rule, through the admin API."""
    return [rule["held"] for rule in (await client.get("/_sim/faults")).json()]


async def wait_for_held(client: httpx.AsyncClient, expected: list[int]) -> None:
    """Wait up to 5 s until the rules hold `expected` requests, or fail."""
    deadline = asyncio.get_running_loop().time() + 5
    while await held_counts(client) != expected:
        assert asyncio.get_running_loop().time() < deadline, await held_counts(client)
        await asyncio.sleep(0.02)


async def test_hold_waits_until_faults_cleared(
    client: httpx.AsyncClient, key: rsa.RSAPrivateKey, sim: GmailSimulator
) -> None:
    headers = await bearer(client, key)
    gmail_id = sim.snapshot("alice@example.org")[0]["id"]
    rule = {
        "method": "GET",
        "path": r"/users/alice@example\.org/messages/[^/]+$",
        "query": "format=raw",
        "hold": True,
    }
    added = await client.post("/_sim/faults", json=rule)
    target = f"/gmail/v1/users/alice@example.org/messages/{gmail_id}"

    held = asyncio.create_task(
        client.get(target, params={"format": "raw"}, headers=headers)
    )
    await wait_for_held(client, [1])
    other = await client.get(target, params={"format": "minimal"}, headers=headers)
    still_waiting = not held.done()
    cleared = await client.delete("/_sim/faults")
    response = await asyncio.wait_for(held, 5)

    assert added.status_code == 201
    assert added.json()["held"] == 0
    assert other.status_code == 200
    assert still_waiting
    assert cleared.status_code == 200
    assert response.status_code == 503
    assert reason_of(response) == "backendError"
    assert [e.fault_rule for e in sim.log if e.api_method == "messages.get"] == [
        1,
        None,
    ]


async def test_hold_after_effect_answers_after_release(
    client: httpx.AsyncClient, key: rsa.RSAPrivateKey, sim: GmailSimulator
) -> None:
    gmail_id = sim.snapshot("bob@example.org")[0]["id"]
    rule = {
        "method": "POST",
        "path": r"/users/bob@example\.org/messages/[^/]+/trash$",
        "hold": True,
        "after_effect": True,
    }
    await client.post("/_sim/faults", json=rule)
    bob = await bearer(client, key, "bob@example.org")

    held = asyncio.create_task(
        client.post(
            f"/gmail/v1/users/bob@example.org/messages/{gmail_id}/trash", headers=bob
        )
    )
    await wait_for_held(client, [1])
    labels_while_held = sim.snapshot("bob@example.org")[0]["labels"]
    still_waiting = not held.done()
    await client.delete("/_sim/faults")
    response = await asyncio.wait_for(held, 5)

    assert "TRASH" in labels_while_held
    assert still_waiting
    assert response.status_code == 200
    assert "TRASH" in response.json()["labelIds"]


async def test_hold_skip_lets_first_through(
    client: httpx.AsyncClient, key: rsa.RSAPrivateKey
) -> None:
    headers = await bearer(client, key)
    rule = {"method": "GET", "path": r"/labels$", "skip": 1, "hold": True}
    await client.post("/_sim/faults", json=rule)

    first = await client.get("/gmail/v1/users/me/labels", headers=headers)
    second = asyncio.create_task(
        client.get("/gmail/v1/users/me/labels", headers=headers)
    )
    await wait_for_held(client, [1])
    await client.delete("/_sim/faults")
    answer = await asyncio.wait_for(second, 5)

    assert first.status_code == 200
    assert answer.status_code == 503


async def test_hold_sets_reached_when_waiting(
    client: httpx.AsyncClient, key: rsa.RSAPrivateKey, sim: GmailSimulator
) -> None:
    headers = await bearer(client, key)
    rule = sim.faults.add({"method": "GET", "path": r"/labels$", "hold": True})
    reached_before = rule.reached.is_set()

    held = asyncio.create_task(client.get("/gmail/v1/users/me/labels", headers=headers))
    await asyncio.wait_for(rule.reached.wait(), 5)
    held_count = rule.held
    sim.faults.clear()
    response = await asyncio.wait_for(held, 5)

    assert reached_before is False
    assert held_count == 1
    assert response.status_code == 503


async def test_hold_released_when_simulator_stops(key: rsa.RSAPrivateKey) -> None:
    simulator = GmailSimulator(World.from_scenario(scenario(key)))
    await simulator.start()
    simulator.faults.add({"path": r"/labels$", "hold": True})
    try:
        async with httpx.AsyncClient(base_url=str(simulator.base_url)) as http:
            headers = await bearer(http, key)
            held = asyncio.create_task(
                http.get("/gmail/v1/users/me/labels", headers=headers)
            )
            await wait_for_held(http, [1])
            started = time.monotonic()
            await simulator.stop()
            stopped_after = time.monotonic() - started
            response = await asyncio.wait_for(held, 5)
    finally:
        await simulator.stop()

    assert stopped_after < 5
    assert response.status_code == 503
    assert simulator.faults.rules == []


async def test_hold_in_batch_holds_its_batch(
    client: httpx.AsyncClient, key: rsa.RSAPrivateKey, sim: GmailSimulator
) -> None:
    alice = await bearer(client, key, "alice@example.org")
    bob = await bearer(client, key, "bob@example.org")
    await client.post(
        "/_sim/faults", json={"path": r"/bob@example\.org/labels$", "hold": True}
    )
    content_type, body = batch_body(
        [
            ("/gmail/v1/users/alice@example.org/labels", alice),
            ("/gmail/v1/users/bob@example.org/labels", bob),
        ]
    )

    batch = asyncio.create_task(
        client.post("/batch", content=body, headers={"Content-Type": content_type})
    )
    await wait_for_held(client, [1])
    still_waiting = not batch.done()
    await client.delete("/_sim/faults")
    response = await asyncio.wait_for(batch, 5)

    assert still_waiting
    assert response.status_code == 200
    assert response.text.count("HTTP/1.1 200 OK") == 1
    assert response.text.count("HTTP/1.1 503 Service Unavailable") == 1


@pytest.mark.parametrize(
    ("rule", "fragment"),
    [
        ({"path": "/labels$", "held": 3}, "Unknown fault fields ['held']"),
        ({"path": "/labels$", "query": "("}, ""),
    ],
)
async def test_fault_rule_rejects_bad_fields(
    client: httpx.AsyncClient, rule: dict[str, Any], fragment: str
) -> None:
    response = await client.post("/_sim/faults", json=rule)

    assert response.status_code == 400
    assert fragment in response.json()["error"]
