"""The Gmail adapter against the Gmail simulator, both over real HTTP on 127.0.0.1.

The adapter goes through google-api-python-client, google-auth and httplib2,
unpatched: a service account signs a JWT with a fresh RSA key, the simulator's
token endpoint checks it with the public key named in the scenario, and every
mailbox is reached with a token bound to that mailbox.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import ValidationError

from autopull.connectors.errors import (
    NotFoundError,
    PermanentError,
    ThrottledError,
    TransientError,
)
from autopull.connectors.mail.base import MessageSearch
from autopull.connectors.mail.gmail import (
    INCIDENT_HEADER,
    MAX_BATCH_IDS,
    ORIGINAL_MAILBOX_HEADER,
    GmailPlatform,
    GmailSettings,
)
from autopull.sim.clock import run_virtual
from autopull.sim.gmail import GmailSimSettings, GmailSimulator
from autopull.sim.world import World

pytestmark = pytest.mark.integration

SERVICE_ACCOUNT = "autopull@autopull-test.iam.gserviceaccount.com"
CLIENT_ID = "104512345678901234567"
QUARANTINE = "quarantine@example.org"
M1 = "m1.every-label@mail.example.net"
M2 = "CAH7x+q/Lk=Zp'8#w%41&r@mail.example.net"
M3 = "m3.twice@mail.example.net"
M4 = "m4.many@mail.example.net"
FORWARD = "fwd.1@example.org"
ATTACHMENT = b"%PDF-1.4 invoice payload\n"


def _pem_private(key: rsa.RSAPrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")


def _pem_public(key: rsa.RSAPrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(
            serialization.Encoding.PEM,
            serialization.PublicFormat.SubjectPublicKeyInfo,
        )
        .decode("ascii")
    )


@pytest.fixture(scope="module")
def service_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def make_scenario(key: rsa.RSAPrivateKey, *, many: int = 0) -> dict[str, Any]:
    """Return a world with one Gmail domain; `many` adds that many copies of M4."""
    mailboxes = [
        {"address": "alice@example.org", "folders": [{"name": "Projects"}]},
        {"address": "bob@example.org"},
        {"address": "carol@example.org"},
        {"address": "dave@example.org"},
        {"address": "erin@example.org"},
        {"address": QUARANTINE},
        {"address": "frank@example.com"},
    ]
    messages: list[dict[str, Any]] = [
        {
            "key": "M1",
            "message_id": f"<{M1}>",
            "from": "Billing <billing@mail.example.net>",
            "to": ["alice@example.org"],
            "subject": "Invoice overdue",
            "date": "2026-12-01T08:00:00Z",
            "body": "Pay at http://pay.example.net/x\n",
            "malicious": True,
            "deliveries": [
                {
                    "mailbox": "alice@example.org",
                    "folder": "inbox",
                    "read": False,
                    "labels": ["STARRED"],
                },
                {"mailbox": "alice@example.org", "folder": "junkemail", "read": True},
                {
                    "mailbox": "alice@example.org",
                    "folder": "deleteditems",
                    "read": True,
                },
                {"mailbox": "alice@example.org", "folder": "Projects", "read": False},
                {"mailbox": "bob@example.org", "folder": "inbox", "read": True},
            ],
        },
        {
            "key": "M2",
            "message_id": f"<{M2}>",
            "from": "x@mail.example.net",
            "to": ["bob@example.org"],
            "subject": "Odd id",
            "date": "2026-12-01T09:00:00Z",
            "body": "Hello\n",
            "deliveries": [{"mailbox": "bob@example.org", "folder": "inbox"}],
        },
        {
            "key": "M3",
            "message_id": f"<{M3}>",
            "from": "y@mail.example.net",
            "to": ["carol@example.org"],
            "subject": "Twice",
            "date": "2026-12-01T10:00:00Z",
            "body": "Twice\n",
            "malicious": True,
            "deliveries": [
                {"mailbox": "carol@example.org", "folder": "inbox", "read": False},
                {"mailbox": "carol@example.org", "folder": "archive", "read": True},
            ],
        },
        {
            "key": "BENIGN",
            "message_id": "<benign.1@mail.example.net>",
            "from": "friend@mail.example.net",
            "to": ["alice@example.org"],
            "subject": "Lunch",
            "date": "2026-12-01T07:00:00Z",
            "body": "Lunch?\n",
            "deliveries": [{"mailbox": "alice@example.org", "folder": "inbox"}],
        },
        {
            "key": "FWD",
            "message_id": f"<{FORWARD}>",
            "from": "dave@example.org",
            "to": ["erin@example.org"],
            "subject": "Fwd: Invoice overdue",
            "date": "2026-12-02T08:00:00Z",
            "headers": {
                "X-Forwarded-Message-Id": f"<{M1}>",
                "References": f"<{M1}>",
            },
            "body": "See below\n",
            "attachments": [
                {
                    "filename": "invoice.pdf",
                    "content_type": "application/pdf",
                    "content_base64": base64.b64encode(ATTACHMENT).decode(),
                }
            ],
            "deliveries": [
                {
                    "mailbox": "dave@example.org",
                    "folder": "sentitems",
                    "read": True,
                    "received": "2026-12-02T08:00:00Z",
                }
            ],
        },
        {
            "key": "OLD",
            "message_id": "<old.1@example.org>",
            "from": "dave@example.org",
            "to": ["erin@example.org"],
            "subject": "Old news",
            "date": "2026-11-01T08:00:00Z",
            "body": "Old\n",
            "deliveries": [
                {
                    "mailbox": "dave@example.org",
                    "folder": "sentitems",
                    "read": True,
                    "received": "2026-11-01T08:00:00Z",
                }
            ],
        },
    ]
    if many:
        messages.append(
            {
                "key": "M4",
                "message_id": f"<{M4}>",
                "from": "bomb@mail.example.net",
                "to": ["erin@example.org"],
                "subject": "Bomb",
                "date": "2026-12-01T11:00:00Z",
                "body": "Bomb\n",
                "deliveries": [
                    {"mailbox": "erin@example.org", "folder": "inbox"}
                    for _ in range(many)
                ],
            }
        )
    return {
        "name": "gmail-test",
        "tenants": [
            {
                "domain": "example.org",
                "platform": "gmail",
                "client_id": CLIENT_ID,
                "service_account": SERVICE_ACCOUNT,
                "public_key_pem": _pem_public(key),
            },
            {"domain": "example.com", "platform": "graph"},
        ],
        "mailboxes": mailboxes,
        "messages": messages,
    }


async def start_sim(
    tmp_path: Path,
    key: rsa.RSAPrivateKey,
    settings: GmailSimSettings | None = None,
    **kw: Any,
) -> GmailSimulator:
    import json

    scenario = tmp_path / "scenario.json"
    scenario.write_text(json.dumps(make_scenario(key, **kw)), encoding="utf-8")
    world = World.open(scenario, tmp_path / "state.json")
    simulator = GmailSimulator(world, settings, scenario_path=scenario)
    await simulator.start()
    return simulator


@pytest.fixture
async def gmail_sim(
    tmp_path: Path, service_key: rsa.RSAPrivateKey
) -> AsyncIterator[GmailSimulator]:
    simulator = await start_sim(tmp_path, service_key)
    yield simulator
    await simulator.stop()


def adapter_settings(
    sim: GmailSimulator, key: rsa.RSAPrivateKey, **changes: Any
) -> GmailSettings:
    values: dict[str, Any] = {
        "api_url": f"{sim.base_url}/",
        "token_uri": f"{sim.base_url}/token",
        "service_account_email": SERVICE_ACCOUNT,
        "client_id": CLIENT_ID,
        "private_key": _pem_private(key),
        "quarantine_mailbox": QUARANTINE,
        "page_size": 2,
        "max_retry_wait": 5.0,
    }
    values.update(changes)
    return GmailSettings(**values)


@pytest.fixture
async def gmail(
    gmail_sim: GmailSimulator, service_key: rsa.RSAPrivateKey
) -> AsyncIterator[GmailPlatform]:
    platform = GmailPlatform(adapter_settings(gmail_sim, service_key))
    yield platform
    await platform.close()


def rows_of(sim: GmailSimulator, mailbox: str, key: str) -> list[dict[str, Any]]:
    return [row for row in sim.snapshot(mailbox) if row["key"] == key]


def evidence_of(sim: GmailSimulator, message_id: str) -> list[dict[str, Any]]:
    return [
        row
        for row in sim.snapshot(QUARANTINE)
        if row["internet_message_id"] == f"<{message_id}>"
    ]


def calls(
    sim: GmailSimulator, api_method: str, mailbox: str | None = None
) -> list[Any]:
    return [
        e
        for e in sim.log
        if e.api_method == api_method and (mailbox is None or e.mailbox == mailbox)
    ]


def user_names(row: dict[str, Any]) -> list[str]:
    """Label names of a copy without the adapter's record labels."""
    return sorted(n for n in row["label_names"] if not n.startswith("Autopull "))


# --- find -----------------------------------------------------------------------------


async def test_find_every_label_with_read_state(gmail: GmailPlatform) -> None:
    copies = await gmail.find("alice@example.org", M1)

    found = sorted((copy.folder, copy.read) for copy in copies)
    assert found == [
        ("INBOX, STARRED", False),
        ("Projects", False),
        ("SPAM", True),
        ("TRASH", True),
    ]
    assert {copy.message_id for copy in copies} == {M1}
    assert all(copy.mailbox == "alice@example.org" for copy in copies)


async def test_find_sends_rfc822msgid_with_spam_trash(
    gmail: GmailPlatform, gmail_sim: GmailSimulator
) -> None:
    await gmail.find("bob@example.org", f" <{M2}> ")

    lists = calls(gmail_sim, "messages.list", "bob@example.org")
    assert lists
    assert {e.query["q"][0] for e in lists} == {f"rfc822msgid:{M2}"}
    assert {e.query["includeSpamTrash"][0] for e in lists} == {"true"}


async def test_find_odd_message_id_exactly(gmail: GmailPlatform) -> None:
    copies = await gmail.find("bob@example.org", M2)

    assert [(c.message_id, c.folder) for c in copies] == [(M2, "INBOX")]


async def test_find_nothing_is_empty(gmail: GmailPlatform) -> None:
    assert await gmail.find("bob@example.org", "absent@mail.example.net") == []


async def test_find_reads_every_page(
    gmail: GmailPlatform, gmail_sim: GmailSimulator
) -> None:
    copies = await gmail.find("alice@example.org", M1)

    pages = calls(gmail_sim, "messages.list", "alice@example.org")
    assert len(copies) == 4
    assert len(pages) == 2
    assert "pageToken" in pages[1].query


# --- quarantine -----------------------------------------------------------------------


async def test_quarantine_trashes_and_imports_once(
    gmail: GmailPlatform, gmail_sim: GmailSimulator
) -> None:
    alice = await gmail.quarantine("alice@example.org", M1, "INC-1")
    bob = await gmail.quarantine("bob@example.org", M1, "INC-1")

    for row in rows_of(gmail_sim, "alice@example.org", "M1"):
        assert "TRASH" in row["labels"]
    assert [
        "TRASH" in r["labels"] for r in rows_of(gmail_sim, "bob@example.org", "M1")
    ] == [True]
    evidence = evidence_of(gmail_sim, M1)
    assert len(evidence) == 1
    assert evidence[0]["label_names"] == ["Autopull/INC-1"]
    assert evidence[0]["marker_headers"][INCIDENT_HEADER] == "INC-1"
    assert evidence[0]["marker_headers"][ORIGINAL_MAILBOX_HEADER] == "alice@example.org"
    assert len(calls(gmail_sim, "messages.import", QUARANTINE)) == 1
    assert alice.evidence_location == f"{QUARANTINE}/Autopull/INC-1"
    assert bob.evidence_location == alice.evidence_location


async def test_quarantine_reports_original_labels(gmail: GmailPlatform) -> None:
    result = await gmail.quarantine("alice@example.org", M1, "INC-1")

    assert sorted((c.folder, c.read) for c in result.copies) == [
        ("INBOX, STARRED", False),
        ("Projects", False),
        ("SPAM", True),
        ("TRASH", True),
    ]
    assert result.already_done is False


async def test_quarantine_records_labels_on_copy(
    gmail: GmailPlatform, gmail_sim: GmailSimulator
) -> None:
    await gmail.quarantine("bob@example.org", M1, "INC-1")

    row = rows_of(gmail_sim, "bob@example.org", "M1")[0]
    records = [n for n in row["label_names"] if n.startswith("Autopull ")]
    digest = hashlib.sha256(M1.encode()).hexdigest()[:12]
    assert records == [f"Autopull INC-1 {digest} INBOX"]


async def test_quarantine_again_does_nothing(
    gmail: GmailPlatform, gmail_sim: GmailSimulator
) -> None:
    await gmail.quarantine("alice@example.org", M1, "INC-1")
    before = gmail_sim.world.to_state()
    gmail_sim.log.clear()

    again = await gmail.quarantine("alice@example.org", M1, "INC-1")

    assert again.already_done is True
    assert len(again.copies) == 4
    assert gmail_sim.world.to_state() == before
    writes = [e for e in gmail_sim.log if e.method != "GET" and e.api_method]
    assert writes == []


async def test_quarantine_pulls_both_copies(
    gmail: GmailPlatform, gmail_sim: GmailSimulator
) -> None:
    result = await gmail.quarantine("carol@example.org", M3, "INC-3")

    rows = rows_of(gmail_sim, "carol@example.org", "M3")
    assert len(result.copies) == 2
    assert sorted((c.folder, c.read) for c in result.copies) == [
        ("All Mail", True),
        ("INBOX", False),
    ]
    assert [("TRASH" in r["labels"]) for r in rows] == [True, True]
    assert len(evidence_of(gmail_sim, M3)) == 1
    assert len(calls(gmail_sim, "messages.batchModify", "carol@example.org")) == 1


async def test_quarantine_leaves_benign_mail(
    gmail: GmailPlatform, gmail_sim: GmailSimulator
) -> None:
    before = rows_of(gmail_sim, "alice@example.org", "BENIGN")

    await gmail.quarantine("alice@example.org", M1, "INC-1")

    assert rows_of(gmail_sim, "alice@example.org", "BENIGN") == before


async def test_quarantine_missing_is_not_found(gmail: GmailPlatform) -> None:
    with pytest.raises(NotFoundError) as caught:
        await gmail.quarantine("bob@example.org", M3, "INC-3")

    assert caught.value.mailbox == "bob@example.org"
    assert caught.value.message_id == M3


async def test_quarantine_delete_mode_deletes(
    gmail_sim: GmailSimulator, service_key: rsa.RSAPrivateKey
) -> None:
    platform = GmailPlatform(
        adapter_settings(gmail_sim, service_key, original_action="delete")
    )
    try:
        result = await platform.quarantine("carol@example.org", M3, "INC-3")
        again = await platform.quarantine("carol@example.org", M3, "INC-3")
    finally:
        await platform.close()

    assert rows_of(gmail_sim, "carol@example.org", "M3") == []
    assert len(result.copies) == 2
    assert len(calls(gmail_sim, "messages.batchDelete", "carol@example.org")) == 1
    assert len(evidence_of(gmail_sim, M3)) == 1
    assert again.already_done is True


async def test_quarantine_batches_at_most_1000(
    tmp_path: Path, service_key: rsa.RSAPrivateKey
) -> None:
    sim = await start_sim(tmp_path, service_key, many=MAX_BATCH_IDS + 5)
    platform = GmailPlatform(adapter_settings(sim, service_key, page_size=500))
    try:
        result = await platform.quarantine("erin@example.org", M4, "INC-4")
    finally:
        await platform.close()
        await sim.stop()

    batches = calls(sim, "messages.batchModify", "erin@example.org")
    sizes = [len(e.body["ids"]) for e in batches]
    assert len(result.copies) == MAX_BATCH_IDS + 5
    assert max(sizes) <= MAX_BATCH_IDS
    assert sum(sizes) == 2 * (MAX_BATCH_IDS + 5)
    assert all(e.status == 204 for e in batches)
    assert all("TRASH" in r["labels"] for r in rows_of(sim, "erin@example.org", "M4"))


# --- restore --------------------------------------------------------------------------


async def test_restore_puts_labels_and_read_back(
    gmail: GmailPlatform, gmail_sim: GmailSimulator
) -> None:
    before = sorted(
        (r["id"], tuple(sorted(r["labels"])))
        for r in rows_of(gmail_sim, "alice@example.org", "M1")
    )
    await gmail.quarantine("alice@example.org", M1, "INC-1")

    result = await gmail.restore("alice@example.org", M1, "INC-1")

    after = sorted(
        (r["id"], tuple(sorted(r["labels"])))
        for r in rows_of(gmail_sim, "alice@example.org", "M1")
    )
    assert after == before
    assert sorted((c.folder, c.read) for c in result.copies) == [
        ("INBOX, STARRED", False),
        ("Projects", False),
        ("SPAM", True),
        ("TRASH", True),
    ]
    labels = {
        e.body["name"] for e in calls(gmail_sim, "labels.create", "alice@example.org")
    }
    names = {r["label_names"][0] for r in gmail_sim.snapshot("alice@example.org")}
    assert not any(name in names for name in labels)


async def test_restore_after_delete_imports_back(
    gmail_sim: GmailSimulator, service_key: rsa.RSAPrivateKey
) -> None:
    platform = GmailPlatform(
        adapter_settings(gmail_sim, service_key, original_action="delete")
    )
    try:
        await platform.quarantine("carol@example.org", M3, "INC-3")
        await platform.restore("carol@example.org", M3, "INC-3")
        again = await platform.restore("carol@example.org", M3, "INC-3")
    finally:
        await platform.close()

    rows = [
        r
        for r in gmail_sim.snapshot("carol@example.org")
        if r["internet_message_id"] == f"<{M3}>"
    ]
    assert sorted(tuple(sorted(r["labels"])) for r in rows) == [(), ("INBOX", "UNREAD")]
    assert all(r["marker_headers"] == {} for r in rows)
    assert again.already_done is True


async def test_restore_without_quarantine_is_done(gmail: GmailPlatform) -> None:
    result = await gmail.restore("bob@example.org", M2, "INC-9")

    assert result.already_done is True
    assert [c.folder for c in result.copies] == ["INBOX"]


async def test_restore_nothing_is_not_found(gmail: GmailPlatform) -> None:
    with pytest.raises(NotFoundError):
        await gmail.restore("bob@example.org", M3, "INC-3")


# --- faults at each step --------------------------------------------------------------


def recoverable(sim: GmailSimulator, mailbox: str, key: str, message_id: str) -> int:
    """Count the copies a person can still recover the message from."""
    return len(rows_of(sim, mailbox, key)) + len(evidence_of(sim, message_id))


@pytest.mark.parametrize(
    ("step", "rule", "copies", "trashed"),
    [
        ("before copy", {"path": r"/messages/import$", "status": 500}, 0, False),
        (
            "after copy",
            {"path": r"/messages/import$", "status": 503, "after_effect": True},
            1,
            False,
        ),
        (
            "after verify",
            {"path": r"/bob@example.org/messages/[0-9a-f]+/trash$"},
            1,
            False,
        ),
        (
            "after delete",
            {
                "path": r"/bob@example.org/messages/[0-9a-f]+/trash$",
                "status": 500,
                "after_effect": True,
            },
            1,
            True,
        ),
    ],
)
async def test_fault_leaves_one_recoverable_copy(
    gmail_sim: GmailSimulator,
    service_key: rsa.RSAPrivateKey,
    step: str,
    rule: dict[str, Any],
    copies: int,
    trashed: bool,
) -> None:
    platform = GmailPlatform(
        adapter_settings(gmail_sim, service_key, request_retries=0, request_timeout=5)
    )
    gmail_sim.faults.add(dict(rule))
    try:
        with pytest.raises(TransientError):
            await platform.quarantine("bob@example.org", M2, "INC-2")
        # The original stays until a verified copy exists, and never two copies.
        originals = rows_of(gmail_sim, "bob@example.org", "M2")
        assert len(evidence_of(gmail_sim, M2)) == copies, step
        assert [("TRASH" in r["labels"]) for r in originals] == [trashed], step
        assert recoverable(gmail_sim, "bob@example.org", "M2", M2) >= 1, step

        result = await platform.quarantine("bob@example.org", M2, "INC-2")
    finally:
        await platform.close()

    rows = rows_of(gmail_sim, "bob@example.org", "M2")
    assert [("TRASH" in r["labels"]) for r in rows] == [True], step
    assert len(evidence_of(gmail_sim, M2)) == 1, step
    assert [(c.folder, c.read) for c in result.copies] == [("INBOX", False)], step
    imports = [e for e in calls(gmail_sim, "messages.import") if e.status == 200]
    assert len(imports) == (0 if step == "after copy" else 1), step


async def test_dropped_import_answer_keeps_one_copy(
    gmail: GmailPlatform, gmail_sim: GmailSimulator
) -> None:
    # httplib2 sends the import again after the drop, so Gmail stores two copies.
    gmail_sim.faults.add(
        {"path": r"/messages/import$", "drop": True, "after_effect": True}
    )

    await gmail.quarantine("bob@example.org", M2, "INC-2")

    imports = calls(gmail_sim, "messages.import", QUARANTINE)
    assert [e.status for e in imports] == [0, 200]
    assert len(evidence_of(gmail_sim, M2)) == 1


QUARANTINE_MESSAGES = rf"/users/{re.escape(QUARANTINE)}/messages"


@pytest.mark.parametrize(
    ("other_mailbox", "survivor", "retry", "action"),
    [
        ("bob@example.org", "same", "alone", "trash"),
        ("bob@example.org", "same", "burst", "trash"),
        ("bob@example.org", "restarted", "alone", "trash"),
        ("alice@example.org", "same", "alone", "trash"),
        ("alice@example.org", "restarted", "alone", "trash"),
        ("alice@example.org", "restarted", "burst", "trash"),
        ("alice@example.org", "restarted", "alone", "delete"),
        ("alice@example.org", "same", "burst", "delete"),
    ],
)
async def test_killed_late_import_left_one(
    gmail_sim: GmailSimulator,
    service_key: rsa.RSAPrivateKey,
    other_mailbox: str,
    survivor: str,
    retry: str,
    action: str,
) -> None:
    """A worker killed right after its late import leaves one copy once retried.

    The killed worker searches the quarantine mailbox, finds nothing, and reads
    the original's MIME. Another worker then quarantines the message, in another
    mailbox or in the same one, and verifies its own copy. Only then does the
    killed worker's import land.
    The retry of the killed worker's pull, on the surviving worker or on a
    restarted one, alone or as a burst, must leave exactly one copy. When the
    other worker quarantined the same pull, the retry finds it done, and in the
    delete mode no original is left to import from.
    """
    settings = adapter_settings(gmail_sim, service_key, original_action=action)
    killed = GmailPlatform(settings)
    other = GmailPlatform(settings)
    restarted = GmailPlatform(settings)
    try:
        read = gmail_sim.faults.add(
            {
                "method": "GET",
                "path": r"/users/alice@example\.org/messages/[^/]+$",
                "query": "format=raw",
                "hold": True,
                "after_effect": True,
            }
        )
        pull = asyncio.create_task(killed.quarantine("alice@example.org", M1, "INC-1"))
        await read.reached.wait()
        await other.quarantine(other_mailbox, M1, "INC-1")

        # Clearing releases the held read, and the killed worker's next request
        # comes only after the new rule is in place.
        gmail_sim.faults.clear()
        imported = gmail_sim.faults.add(
            {
                "method": "POST",
                "path": QUARANTINE_MESSAGES + "/import$",
                "hold": True,
                "after_effect": True,
            }
        )
        await imported.reached.wait()
        pull.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pull
        gmail_sim.faults.clear()
        stranded = len(evidence_of(gmail_sim, M1))

        worker = other if survivor == "same" else restarted
        if retry == "alone":
            result = await worker.quarantine("alice@example.org", M1, "INC-1")
        else:
            (outcome,) = await worker.quarantine_many(
                [("alice@example.org", M1, "INC-1")]
            )
            assert not isinstance(outcome, Exception), outcome
            result = outcome
    finally:
        for platform in (killed, other, restarted):
            await platform.close()

    assert stranded == 2
    evidence = evidence_of(gmail_sim, M1)
    assert len(evidence) == 1
    assert evidence[0]["marker_headers"][INCIDENT_HEADER] == "INC-1"
    assert result.evidence_location == f"{QUARANTINE}/Autopull/INC-1"
    for mailbox in {"alice@example.org", other_mailbox}:
        rows = rows_of(gmail_sim, mailbox, "M1")
        if action == "delete":
            assert rows == [], mailbox
        else:
            assert rows != [], mailbox
            assert all("TRASH" in row["labels"] for row in rows), mailbox


async def test_fault_after_delete_mode_delete(
    gmail_sim: GmailSimulator, service_key: rsa.RSAPrivateKey
) -> None:
    platform = GmailPlatform(
        adapter_settings(
            gmail_sim, service_key, original_action="delete", request_retries=0
        )
    )
    gmail_sim.faults.add(
        {
            "path": r"/bob@example.org/messages/[0-9a-f]+$",
            "method": "DELETE",
            "status": 500,
            "after_effect": True,
        }
    )
    try:
        with pytest.raises(TransientError):
            await platform.quarantine("bob@example.org", M2, "INC-2")
        assert rows_of(gmail_sim, "bob@example.org", "M2") == []
        assert len(evidence_of(gmail_sim, M2)) == 1

        result = await platform.quarantine("bob@example.org", M2, "INC-2")
        await platform.restore("bob@example.org", M2, "INC-2")
    finally:
        await platform.close()

    assert result.already_done is True
    rows = rows_of(gmail_sim, "bob@example.org", "M2")
    assert rows == []  # a restored copy is imported, so it has no scenario key
    back = [
        r
        for r in gmail_sim.snapshot("bob@example.org")
        if r["internet_message_id"] == f"<{M2}>"
    ]
    assert [sorted(r["labels"]) for r in back] == [["INBOX", "UNREAD"]]


async def test_dropped_connection_is_retried(
    gmail: GmailPlatform, gmail_sim: GmailSimulator
) -> None:
    gmail_sim.faults.add({"path": r"/bob@example.org/messages$", "drop": True})

    copies = await gmail.find("bob@example.org", M2)

    assert len(copies) == 1
    assert [e.status for e in calls(gmail_sim, "messages.list", "bob@example.org")] == [
        0,
        200,
    ]


async def test_timeout_is_transient(
    gmail_sim: GmailSimulator, service_key: rsa.RSAPrivateKey
) -> None:
    platform = GmailPlatform(
        adapter_settings(gmail_sim, service_key, request_timeout=0.5, request_retries=0)
    )
    gmail_sim.faults.add({"path": r"/bob@example.org/messages$", "delay_ms": 1500})
    try:
        with pytest.raises(TransientError) as caught:
            await platform.find("bob@example.org", M2)
    finally:
        await platform.close()

    assert caught.value.mailbox == "bob@example.org"


# --- throttling -----------------------------------------------------------------------


async def test_retry_after_is_honoured(
    gmail: GmailPlatform, gmail_sim: GmailSimulator
) -> None:
    gmail_sim.faults.add(
        {"path": r"/bob@example.org/messages$", "status": 429, "retry_after": "1"}
    )

    started = time.monotonic()
    copies = await gmail.find("bob@example.org", M2)
    elapsed = time.monotonic() - started

    lists = calls(gmail_sim, "messages.list", "bob@example.org")
    assert len(copies) == 1
    assert [e.status for e in lists] == [429, 200]
    assert lists[1].time - lists[0].time >= 1.0
    assert elapsed >= 1.0


async def test_quota_exhaustion_waits_then_completes(
    tmp_path: Path, service_key: rsa.RSAPrivateKey
) -> None:
    settings = GmailSimSettings(user_quota_units=60, quota_window_seconds=2.0)
    sim = await start_sim(tmp_path, service_key, settings)
    platform = GmailPlatform(adapter_settings(sim, service_key, request_retries=10))
    try:
        result = await platform.quarantine("alice@example.org", M1, "INC-1")
    finally:
        await platform.close()
        await sim.stop()

    throttled = [e for e in sim.log if e.status == 429]
    assert len(result.copies) == 4
    assert throttled
    assert {e.reason for e in throttled} == {"userRateLimitExceeded"}
    for entry in throttled:
        retried = [
            e
            for e in sim.log
            if e.seq > entry.seq and e.mailbox == entry.mailbox and e.status != 429
        ]
        assert retried, entry
    assert all("TRASH" in r["labels"] for r in rows_of(sim, "alice@example.org", "M1"))


async def test_long_retry_after_goes_to_caller(
    gmail: GmailPlatform, gmail_sim: GmailSimulator
) -> None:
    gmail_sim.faults.add(
        {"path": r"/bob@example.org/messages$", "status": 429, "retry_after": "120"}
    )

    with pytest.raises(ThrottledError) as caught:
        await gmail.find("bob@example.org", M2)

    assert caught.value.retry_after == pytest.approx(120.0)
    assert len(calls(gmail_sim, "messages.list", "bob@example.org")) == 1


@pytest.mark.parametrize(
    ("status", "reason", "expected"),
    [
        (403, "rateLimitExceeded", ThrottledError),
        (403, "userRateLimitExceeded", ThrottledError),
        (403, "quotaExceeded", ThrottledError),
        (403, "insufficientPermissions", PermanentError),
        (500, "backendError", TransientError),
        (400, "invalidArgument", PermanentError),
    ],
)
async def test_gmail_answers_are_classified(
    gmail_sim: GmailSimulator,
    service_key: rsa.RSAPrivateKey,
    status: int,
    reason: str,
    expected: type[Exception],
) -> None:
    platform = GmailPlatform(
        adapter_settings(gmail_sim, service_key, request_retries=0)
    )
    gmail_sim.faults.add(
        {"path": r"/bob@example.org/messages$", "status": status, "reason": reason}
    )
    try:
        with pytest.raises(expected) as caught:
            await platform.find("bob@example.org", M2)
    finally:
        await platform.close()

    assert type(caught.value) is expected
    assert reason in str(caught.value)


# --- delegation and secrets -----------------------------------------------------------


async def test_mailbox_outside_domain_fails_permanently(
    gmail: GmailPlatform, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    with pytest.raises(PermanentError) as caught:
        await gmail.find("frank@example.com", M1)

    message = str(caught.value)
    assert "unauthorized_client" in message
    assert CLIENT_ID in message
    assert "domain-wide delegation" in message
    assert "PRIVATE KEY" not in message
    assert "PRIVATE KEY" not in caplog.text


async def test_wrong_key_fails_and_stays_secret(
    gmail_sim: GmailSimulator, caplog: pytest.LogCaptureFixture
) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    settings = adapter_settings(gmail_sim, other)
    platform = GmailPlatform(settings)
    caplog.set_level(logging.DEBUG)
    try:
        with pytest.raises(PermanentError) as caught:
            await platform.find("bob@example.org", M2)
    finally:
        await platform.close()

    pem = settings.private_key.get_secret_value()
    body = pem.splitlines()[1]
    assert "invalid_grant" in str(caught.value)
    assert body not in str(caught.value)
    assert body not in caplog.text
    assert body not in repr(settings)


@pytest.mark.parametrize(
    "key",
    [
        "not a key 9c1f",
        "-----BEGIN PRIVATE KEY-----\n9c1f9c1f\n-----END PRIVATE KEY-----\n",
    ],
)
async def test_bad_private_key_names_the_fix(
    gmail_sim: GmailSimulator, key: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        GmailSettings(
            api_url=f"{gmail_sim.base_url}/",
            token_uri=f"{gmail_sim.base_url}/token",
            service_account_email=SERVICE_ACCOUNT,
            client_id=CLIENT_ID,
            private_key=key,
            quarantine_mailbox=QUARANTINE,
        )

    assert "private_key is not an unencrypted PEM private key" in str(caught.value)
    assert "9c1f" not in str(caught.value)


async def test_one_token_per_mailbox(
    gmail: GmailPlatform, gmail_sim: GmailSimulator
) -> None:
    await gmail.find("bob@example.org", M2)
    await gmail.find("bob@example.org", M2)
    await gmail.find("alice@example.org", M1)

    subjects = sorted(grant.subject for grant in gmail_sim.tokens.grants.values())
    assert subjects == ["alice@example.org", "bob@example.org"]


# --- forward tracing ------------------------------------------------------------------


async def test_sent_since_lists_forward_headers(gmail: GmailPlatform) -> None:
    sent = await gmail.sent_since("dave@example.org", datetime(2026, 12, 1, tzinfo=UTC))

    assert [s.message_id for s in sent] == [FORWARD]
    forward = sent[0]
    assert forward.headers["X-Forwarded-Message-Id"] == f"<{M1}>"
    assert forward.headers["References"] == f"<{M1}>"
    assert forward.recipients == ("erin@example.org",)
    assert forward.attachment_hashes == (hashlib.sha256(ATTACHMENT).hexdigest(),)
    assert forward.sent_at == datetime(2026, 12, 2, 8, 0, tzinfo=UTC)


# --- the command line -----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def start_process(scenario: Path, state: Path, port: int) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "autopull.sim", "gmail", "--world", str(scenario)]
    command += ["--state", str(state), "--port", str(port)]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


async def test_simulator_runs_from_command_line(
    tmp_path: Path, service_key: rsa.RSAPrivateKey
) -> None:
    import json

    scenario = tmp_path / "scenario.json"
    scenario.write_text(json.dumps(make_scenario(service_key)), encoding="utf-8")
    port = _free_port()
    process = start_process(scenario, tmp_path / "state.json", port)
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 30
        line = ""
        while "listening" not in line and time.monotonic() < deadline:
            line = await asyncio.wait_for(
                asyncio.to_thread(process.stdout.readline), timeout=30
            )
        assert f"Gmail simulator listening on http://127.0.0.1:{port}" in line
        settings = GmailSettings(
            api_url=f"http://127.0.0.1:{port}/",
            token_uri=f"http://127.0.0.1:{port}/token",
            service_account_email=SERVICE_ACCOUNT,
            client_id=CLIENT_ID,
            private_key=_pem_private(service_key),
            quarantine_mailbox=QUARANTINE,
        )
        platform = GmailPlatform(settings)
        try:
            result = await platform.quarantine("bob@example.org", M2, "INC-2")
        finally:
            await platform.close()
        assert [c.folder for c in result.copies] == ["INBOX"]
    finally:
        process.terminate()
        process.wait(timeout=10)
    assert process.returncode == 0


# --- many mailboxes at once -----------------------------------------------------------


async def test_burst_quarantines_in_batches(
    gmail: GmailPlatform, gmail_sim: GmailSimulator
) -> None:
    pulls = [
        ("alice@example.org", M1, "INC-1"),
        ("bob@example.org", M1, "INC-1"),
        ("carol@example.org", M3, "INC-3"),
        ("bob@example.org", M3, "INC-3"),
        ("dave@example.org", " ", "INC-1"),
    ]

    results = await gmail.quarantine_many(pulls)

    alice, bob, carol, missing, empty = results
    assert not isinstance(alice, Exception)
    assert not isinstance(bob, Exception)
    assert not isinstance(carol, Exception)
    assert sorted((c.folder, c.read) for c in alice.copies) == [
        ("INBOX, STARRED", False),
        ("Projects", False),
        ("SPAM", True),
        ("TRASH", True),
    ]
    assert [(c.folder, c.read) for c in bob.copies] == [("INBOX", True)]
    assert len(carol.copies) == 2
    assert isinstance(missing, NotFoundError)
    assert isinstance(empty, PermanentError)
    for mailbox, key in [("alice@example.org", "M1"), ("carol@example.org", "M3")]:
        assert all("TRASH" in r["labels"] for r in rows_of(gmail_sim, mailbox, key))
    assert len(evidence_of(gmail_sim, M1)) == 1
    assert len(evidence_of(gmail_sim, M3)) == 1
    batches = [e for e in gmail_sim.log if e.api_method == "batch"]
    assert batches
    assert all(e.status == 200 for e in batches)


async def test_burst_outside_domain_fails_alone(
    gmail: GmailPlatform, gmail_sim: GmailSimulator
) -> None:
    pulls = [
        ("alice@example.org", M1, "INC-1"),
        ("frank@example.com", M1, "INC-1"),
        ("bob@example.org", M1, "INC-1"),
    ]

    alice, frank, bob = await gmail.quarantine_many(pulls)

    assert isinstance(frank, PermanentError)
    assert "unauthorized_client" in str(frank)
    assert frank.mailbox == "frank@example.com"
    assert not isinstance(alice, Exception), alice
    assert not isinstance(bob, Exception), bob
    assert len(alice.copies) == 4
    assert [(c.folder, c.read) for c in bob.copies] == [("INBOX", True)]
    for mailbox in ("alice@example.org", "bob@example.org"):
        assert all("TRASH" in r["labels"] for r in rows_of(gmail_sim, mailbox, "M1"))


async def test_burst_again_is_already_done(
    gmail: GmailPlatform, gmail_sim: GmailSimulator
) -> None:
    pulls = [("alice@example.org", M1, "INC-1"), ("bob@example.org", M2, "INC-2")]
    await gmail.quarantine_many(pulls)
    before = gmail_sim.world.to_state()

    again = await gmail.quarantine_many(pulls)

    assert [getattr(r, "already_done", None) for r in again] == [True, True]
    assert gmail_sim.world.to_state() == before


async def test_burst_failed_part_takes_slow_path(
    gmail: GmailPlatform, gmail_sim: GmailSimulator
) -> None:
    gmail_sim.faults.add(
        {"path": r"/bob@example.org/messages/[0-9a-f]+/trash$", "status": 503}
    )

    results = await gmail.quarantine_many(
        [("alice@example.org", M1, "INC-1"), ("bob@example.org", M2, "INC-2")]
    )

    assert all(not isinstance(r, Exception) for r in results)
    assert [
        "TRASH" in r["labels"] for r in rows_of(gmail_sim, "bob@example.org", "M2")
    ] == [True]
    trashes = calls(gmail_sim, "messages.trash", "bob@example.org")
    assert [e.status for e in trashes] == [503, 200]


async def test_burst_dropped_import_keeps_one_copy(
    gmail: GmailPlatform, gmail_sim: GmailSimulator
) -> None:
    # The drop closes the batch's connection after an import ran, and httplib2
    # sends the whole batch again, so that import stores a second copy.
    gmail_sim.faults.add(
        {"path": r"/messages/import$", "drop": True, "after_effect": True}
    )

    results = await gmail.quarantine_many(
        [("alice@example.org", M1, "INC-1"), ("bob@example.org", M2, "INC-2")]
    )

    assert [r for r in results if isinstance(r, Exception)] == []
    stored = [
        e
        for e in calls(gmail_sim, "messages.import", QUARANTINE)
        if e.status in (0, 200)
    ]
    deleted = calls(gmail_sim, "messages.delete", QUARANTINE)
    assert len(stored) > 2
    assert [e.status for e in deleted] == [204] * (len(stored) - 2)
    assert len(evidence_of(gmail_sim, M1)) == 1
    assert len(evidence_of(gmail_sim, M2)) == 1


async def test_burst_retry_deletes_duplicates(
    gmail_sim: GmailSimulator, service_key: rsa.RSAPrivateKey
) -> None:
    pulls = [("alice@example.org", M1, "INC-1"), ("bob@example.org", M2, "INC-2")]
    gmail_sim.faults.add(
        {"path": r"/messages/import$", "drop": True, "after_effect": True}
    )
    # The duplicates outlive the first attempt, because deleting them fails.
    gmail_sim.faults.add(
        {
            "method": "DELETE",
            "path": r"/quarantine@example\.org/messages/",
            "status": 500,
            "count": 10,
        }
    )
    first = GmailPlatform(adapter_settings(gmail_sim, service_key, request_retries=0))
    try:
        failed = await first.quarantine_many(pulls)
    finally:
        await first.close()
    doubled = [m for m in (M1, M2) if len(evidence_of(gmail_sim, m)) == 2]
    gmail_sim.faults.clear()

    again = GmailPlatform(adapter_settings(gmail_sim, service_key))
    try:
        results = await again.quarantine_many(pulls)
    finally:
        await again.close()

    assert any(isinstance(r, TransientError) for r in failed), failed
    assert doubled != []
    assert [r for r in results if isinstance(r, Exception)] == []
    assert len(evidence_of(gmail_sim, M1)) == 1
    assert len(evidence_of(gmail_sim, M2)) == 1
    for mailbox, key in [("alice@example.org", "M1"), ("bob@example.org", "M2")]:
        assert all("TRASH" in r["labels"] for r in rows_of(gmail_sim, mailbox, key))
    imports = calls(gmail_sim, "messages.import", QUARANTINE)
    assert len([e for e in imports if e.status in (0, 200)]) == 2 + len(doubled)


@pytest.mark.parametrize(
    ("survivor", "retry"),
    [
        ("same", "alone"),
        ("same", "burst"),
        ("restarted", "alone"),
        ("restarted", "burst"),
    ],
)
async def test_burst_killed_late_import_left_one(
    gmail_sim: GmailSimulator,
    service_key: rsa.RSAPrivateKey,
    survivor: str,
    retry: str,
) -> None:
    """A burst killed right after its late imports leaves one copy once retried.

    The killed burst creates the incident's label in the quarantine mailbox, so
    it searches for no earlier copy. Another worker quarantines M1 in bob's
    mailbox and verifies its copy, and only then do the killed burst's imports
    land. The retry of the burst's pulls must leave one copy of each message.
    """
    # Every copy of alice's fits on one page, so her pull stays in the burst.
    settings = adapter_settings(gmail_sim, service_key, page_size=100)
    killed = GmailPlatform(settings)
    other = GmailPlatform(settings)
    restarted = GmailPlatform(settings)
    pulls = [("alice@example.org", M1, "INC-1"), ("carol@example.org", M3, "INC-1")]
    try:
        created = gmail_sim.faults.add(
            {
                "method": "POST",
                "path": rf"/users/{re.escape(QUARANTINE)}/labels$",
                "hold": True,
                "after_effect": True,
            }
        )
        burst = asyncio.create_task(killed.quarantine_many(pulls))
        await created.reached.wait()
        await other.quarantine("bob@example.org", M1, "INC-1")

        # Clearing releases the held label, and the killed burst's next batch
        # comes only after the new rule is in place.
        gmail_sim.faults.clear()
        imported = gmail_sim.faults.add(
            {
                "method": "POST",
                "path": QUARANTINE_MESSAGES + "/import$",
                "hold": True,
                "after_effect": True,
                "count": 2,
            }
        )
        await imported.reached.wait()
        burst.cancel()
        with pytest.raises(asyncio.CancelledError):
            await burst
        gmail_sim.faults.clear()
        stranded = [len(evidence_of(gmail_sim, m)) for m in (M1, M3)]

        worker = other if survivor == "same" else restarted
        if retry == "alone":
            results: list[Any] = [await worker.quarantine(*pull) for pull in pulls]
        else:
            results = await worker.quarantine_many(pulls)
    finally:
        for platform in (killed, other, restarted):
            await platform.close()

    assert stranded == [2, 1]
    assert [len(evidence_of(gmail_sim, m)) for m in (M1, M3)] == [1, 1]
    for result in results:
        assert not isinstance(result, Exception), result
        assert result.evidence_location == f"{QUARANTINE}/Autopull/INC-1"
    for mailbox, key in [
        ("alice@example.org", "M1"),
        ("bob@example.org", "M1"),
        ("carol@example.org", "M3"),
    ]:
        rows = rows_of(gmail_sim, mailbox, key)
        assert all("TRASH" in row["labels"] for row in rows), mailbox


async def test_burst_without_records_imports_nothing(
    gmail_sim: GmailSimulator, service_key: rsa.RSAPrivateKey
) -> None:
    """A burst imports a copy only once a pull's record label exists.

    A retry then finds the record label and checks the quarantine mailbox again,
    even on a worker that verified a copy of the message earlier.
    """
    gmail_sim.faults.add(
        {
            "method": "POST",
            "path": r"/users/(alice|bob)@example\.org/labels$",
            "status": 500,
            "count": 9,
        }
    )
    mailboxes = ("alice@example.org", "bob@example.org")
    before = {m: [r["labels"] for r in rows_of(gmail_sim, m, "M1")] for m in mailboxes}
    platform = GmailPlatform(
        adapter_settings(gmail_sim, service_key, page_size=100, request_retries=0)
    )
    try:
        results = await platform.quarantine_many([(m, M1, "INC-1") for m in mailboxes])
    finally:
        await platform.close()

    for result in results:
        assert isinstance(result, TransientError), result
    assert calls(gmail_sim, "messages.import") == []
    assert evidence_of(gmail_sim, M1) == []
    for mailbox in mailboxes:
        after = [row["labels"] for row in rows_of(gmail_sim, mailbox, "M1")]
        assert after == before[mailbox], mailbox


async def test_burst_restores_like_one_mailbox(
    gmail: GmailPlatform, gmail_sim: GmailSimulator
) -> None:
    before = sorted(
        tuple(sorted(r["labels"]))
        for r in rows_of(gmail_sim, "alice@example.org", "M1")
    )
    await gmail.quarantine_many([("alice@example.org", M1, "INC-1")])

    await gmail.restore("alice@example.org", M1, "INC-1")

    after = sorted(
        tuple(sorted(r["labels"]))
        for r in rows_of(gmail_sim, "alice@example.org", "M1")
    )
    assert after == before


async def test_burst_delete_mode_deletes(
    gmail_sim: GmailSimulator, service_key: rsa.RSAPrivateKey
) -> None:
    platform = GmailPlatform(
        adapter_settings(gmail_sim, service_key, original_action="delete")
    )
    try:
        results = await platform.quarantine_many(
            [("carol@example.org", M3, "INC-3"), ("bob@example.org", M2, "INC-2")]
        )
    finally:
        await platform.close()

    carol, bob = results
    assert not isinstance(carol, Exception)
    assert not isinstance(bob, Exception)
    assert len(carol.copies) == 2
    assert rows_of(gmail_sim, "carol@example.org", "M3") == []
    assert rows_of(gmail_sim, "bob@example.org", "M2") == []
    assert len(calls(gmail_sim, "messages.batchDelete", "carol@example.org")) == 1
    assert len(evidence_of(gmail_sim, M3)) == 1
    assert len(evidence_of(gmail_sim, M2)) == 1


async def test_burst_rejected_token_retries_alone(
    gmail: GmailPlatform, gmail_sim: GmailSimulator
) -> None:
    # googleapiclient sends a part that got 401 again once, in a second batch.
    gmail_sim.faults.add(
        {
            "path": r"/bob@example.org/messages/[0-9a-f]+/trash$",
            "status": 401,
            "reason": "authError",
            "count": 2,
        }
    )

    results = await gmail.quarantine_many(
        [("alice@example.org", M1, "INC-1"), ("bob@example.org", M2, "INC-2")]
    )

    assert all(not isinstance(r, Exception) for r in results)
    trashes = calls(gmail_sim, "messages.trash", "bob@example.org")
    assert [e.status for e in trashes] == [401, 401, 200]
    subjects = [g.subject for g in gmail_sim.tokens.grants.values()]
    assert subjects.count("bob@example.org") == 2


async def test_burst_429_part_waits_retry_after(
    gmail: GmailPlatform, gmail_sim: GmailSimulator
) -> None:
    gmail_sim.faults.add(
        {
            "path": r"/bob@example.org/messages/[0-9a-f]+/trash$",
            "status": 429,
            "retry_after": "1",
        }
    )

    results = await gmail.quarantine_many(
        [("alice@example.org", M1, "INC-1"), ("bob@example.org", M2, "INC-2")]
    )

    trashes = calls(gmail_sim, "messages.trash", "bob@example.org")
    alice_trashes = calls(gmail_sim, "messages.batchModify", "alice@example.org")
    assert all(not isinstance(r, Exception) for r in results)
    assert [e.status for e in trashes] == [429, 200]
    assert trashes[1].time - trashes[0].time >= 1.0
    assert len(alice_trashes) == 1  # her four copies, trashed once


async def test_burst_long_retry_after_goes_back(
    gmail: GmailPlatform, gmail_sim: GmailSimulator
) -> None:
    gmail_sim.faults.add(
        {
            "path": r"/bob@example.org/messages/[0-9a-f]+/trash$",
            "status": 429,
            "retry_after": "120",
        }
    )

    alice, bob = await gmail.quarantine_many(
        [("alice@example.org", M1, "INC-1"), ("bob@example.org", M2, "INC-2")]
    )

    assert not isinstance(alice, Exception)
    assert isinstance(bob, ThrottledError)
    assert bob.retry_after == pytest.approx(120.0)
    assert len(calls(gmail_sim, "messages.trash", "bob@example.org")) == 1


async def test_burst_two_failures_wait_longest(
    gmail: GmailPlatform, gmail_sim: GmailSimulator
) -> None:
    # Both calls of bob's first step fail in one batch: the labels with a 1 s
    # Retry-After before the search with a 2 s one.
    gmail_sim.faults.add(
        {"path": r"/bob@example.org/labels$", "status": 503, "retry_after": "1"}
    )
    gmail_sim.faults.add(
        {
            "path": r"/bob@example.org/messages$",
            "method": "GET",
            "status": 429,
            "reason": "userRateLimitExceeded",
            "retry_after": "2",
        }
    )

    results = await gmail.quarantine_many(
        [("alice@example.org", M1, "INC-1"), ("bob@example.org", M2, "INC-2")]
    )

    searches = calls(gmail_sim, "messages.list", "bob@example.org")
    assert all(not isinstance(r, Exception) for r in results)
    assert [e.status for e in searches[:2]] == [429, 200]
    assert searches[1].time - searches[0].time >= 2.0


async def test_burst_quarantine_mailbox_wait_kept(
    gmail: GmailPlatform, gmail_sim: GmailSimulator
) -> None:
    # The burst cannot create the incident label in the quarantine mailbox, and
    # the pulls that then go one mailbox at a time must keep its Retry-After.
    gmail_sim.faults.add(
        {
            "path": rf"/{QUARANTINE}/labels$",
            "method": "POST",
            "status": 429,
            "reason": "userRateLimitExceeded",
            "retry_after": "2",
        }
    )

    results = await gmail.quarantine_many(
        [("alice@example.org", M1, "INC-1"), ("bob@example.org", M2, "INC-1")]
    )

    creations = calls(gmail_sim, "labels.create", QUARANTINE)
    assert all(not isinstance(r, Exception) for r in results)
    assert [e.status for e in creations] == [429, 200]
    assert creations[1].time - creations[0].time >= 2.0


# --- search by sender, subject and time -----------------------------------------------


def window_search(
    sender: str, subject: str, at: str, minutes: int = 10
) -> MessageSearch:
    moment = datetime.fromisoformat(at.replace("Z", "+00:00"))
    return MessageSearch(
        senders=(sender,),
        subject=subject,
        received_after=moment - timedelta(minutes=minutes),
        received_before=moment + timedelta(minutes=minutes),
    )


async def test_search_finds_copies_in_every_label(gmail: GmailPlatform) -> None:
    search = window_search(
        "billing@mail.example.net", "Invoice overdue", "2026-12-01T08:00:05Z"
    )

    copies = await gmail.search("alice@example.org", search)

    assert {copy.message_id for copy in copies} == {M1}
    assert len(copies) == 4
    assert {copy.sender for copy in copies} == {"billing@mail.example.net"}
    assert {copy.subject for copy in copies} == {"Invoice overdue"}
    assert sorted(copy.read for copy in copies) == [False, False, True, True]


async def test_search_subject_compared_exactly(gmail: GmailPlatform) -> None:
    search = window_search(
        "billing@mail.example.net", "invoice overdue", "2026-12-01T08:00:05Z"
    )

    assert await gmail.search("alice@example.org", search) == []


async def test_search_outside_window_finds_nothing(gmail: GmailPlatform) -> None:
    search = window_search(
        "billing@mail.example.net", "Invoice overdue", "2026-12-01T09:00:00Z"
    )

    assert await gmail.search("alice@example.org", search) == []


async def test_search_other_sender_finds_nothing(gmail: GmailPlatform) -> None:
    search = window_search("other@example.net", "Odd id", "2026-12-01T09:00:05Z")

    assert await gmail.search("bob@example.org", search) == []
    found = await gmail.search(
        "bob@example.org",
        window_search("x@mail.example.net", "Odd id", "2026-12-01T09:00:05Z"),
    )
    assert [copy.message_id for copy in found] == [M2]


# --- bursts on the virtual clock ------------------------------------------------------


def test_burst_takes_seven_latencies_with_defaults(
    tmp_path: Path, service_key: rsa.RSAPrivateKey
) -> None:
    # Find, read the labels, create the record labels, import beside marking the
    # copies, verify the import, trash, verify the trash: one latency each when
    # every phase goes out at once.
    async def main() -> float:
        loop = asyncio.get_running_loop()
        settings = GmailSimSettings(latency_ms=100, close_connections=True)
        sim = await start_sim(tmp_path, service_key, settings)
        platform = GmailPlatform(adapter_settings(sim, service_key, page_size=100))
        try:
            started = loop.time()
            results = await platform.quarantine_many(
                [("bob@example.org", M1, "INC-1"), ("carol@example.org", M3, "INC-3")]
            )
            elapsed = loop.time() - started
        finally:
            await platform.close()
            await sim.stop()
        assert all(not isinstance(r, Exception) for r in results)
        return elapsed

    assert run_virtual(main) == pytest.approx(0.7)


async def test_batch_grows_when_threads_run_short(
    gmail_sim: GmailSimulator, service_key: rsa.RSAPrivateKey
) -> None:
    settings = adapter_settings(gmail_sim, service_key, max_threads=2, batch_size=2)
    platform = GmailPlatform(settings)
    mailboxes = ["alice", "bob", "carol", "dave", "erin"]
    calls_sent = [
        (f"{name}@example.org", "labels", "list", {}) for name in mailboxes * 2
    ]
    try:
        answers = await platform.batch(calls_sent)
    finally:
        await platform.close()

    batches = [e for e in gmail_sim.log if e.api_method == "batch"]
    assert len(answers) == 10
    assert all(not isinstance(a, Exception) for a in answers)
    # Ten calls on two threads: two batches of five, not five of two.
    assert len(batches) == 2
