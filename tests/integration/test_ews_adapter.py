"""The EWS adapter against the EWS simulator, with real exchangelib over HTTP.

Most tests run the simulator in-process on a free 127.0.0.1 port, with a state file
in the test's temporary folder. One runs it as a subprocess through its command-line
functions. exchangelib caches a protocol object per endpoint and credentials, so
every test starts and ends with an empty cache.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from defusedxml import ElementTree as SafeET
from exchangelib import IMPERSONATION, Account, Build, Configuration, Credentials, Q
from exchangelib import Version as EwsVersion
from exchangelib.errors import (
    ErrorAccessDenied,
    ErrorFolderExists,
    ErrorFolderNotFound,
    ErrorItemNotFound,
)
from exchangelib.folders import Folder, FolderCollection
from exchangelib.protocol import CachingProtocol, FailFast
from exchangelib.transport import BASIC

from autopull.connectors.errors import (
    ConnectorError,
    NotFoundError,
    PermanentError,
    ThrottledError,
    TransientError,
)
from autopull.connectors.mail.base import ForwardingRule
from autopull.connectors.mail.ews import (
    INCIDENT_HEADER,
    ORIGINAL_FOLDER_HEADER,
    ORIGINAL_MAILBOX_HEADER,
    ORIGINAL_READ_HEADER,
    EwsPlatform,
    EwsSettings,
)
from autopull.sim.ews import EwsSimSettings, EwsSimulator
from autopull.sim.world import World

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO = REPO_ROOT / "examples" / "worlds" / "demo.json"
SERVICE_ACCOUNT = "svc-autopull@example.com"
PASSWORD = "service-account-password"
QUARANTINE = "quarantine@example.com"
CONTAINER = "Autopull Quarantine"
M1 = "20261201093000.1234.invoice@billing-example.net"
M2 = "CAH7x+q/Lk=Zp'8#w%41&r@mail.example.net"
T1 = "t1.every-folder@example.net"
INCIDENT = "INC-0042"
SOAP = "http://schemas.xmlsoap.org/soap/envelope/"
MNS = "http://schemas.microsoft.com/exchange/services/2006/messages"
TNS = "http://schemas.microsoft.com/exchange/services/2006/types"


def make_scenario() -> dict[str, Any]:
    """Return the demo world on Exchange, plus grace@ with T1 in four folders.

    Alice has an inbox rule of each forwarding kind and a disabled redirect; Bob
    has only a disabled rule.
    """
    scenario: dict[str, Any] = json.loads(DEMO.read_text(encoding="utf-8"))
    scenario["tenants"][0]["platform"] = "ews"
    scenario["forwarding_rules"] = [
        {"mailbox": "alice@example.com", "forward_to": ["dave@example.com"]},
        {
            "mailbox": "alice@example.com",
            "forward_to": ["Erin@example.com", "partner@example.net"],
            "kind": "forward",
            "keep_copy": False,
        },
        {
            "mailbox": "alice@example.com",
            "forward_to": ["frank@example.com"],
            "kind": "forward_as_attachment",
        },
        {
            "mailbox": "alice@example.com",
            "forward_to": ["uma@example.com"],
            "enabled": False,
        },
        {
            "mailbox": "bob@example.com",
            "forward_to": ["tara@example.com"],
            "kind": "forward",
            "enabled": False,
        },
    ]
    scenario["mailboxes"].append(
        {"address": "grace@example.com", "folders": [{"name": "Projects"}]}
    )
    scenario["messages"].append(
        {
            "key": "T1",
            "message_id": f"<{T1}>",
            "from": "Sender <sender@example.net>",
            "to": ["grace@example.com"],
            "subject": "In every folder",
            "date": "2026-12-01T08:00:00Z",
            "body": "Test message.\n",
            "malicious": True,
            "deliveries": [
                {"mailbox": "grace@example.com", "folder": "inbox", "read": False},
                {"mailbox": "grace@example.com", "folder": "junkemail", "read": True},
                {"mailbox": "grace@example.com", "folder": "Projects", "read": False},
                {
                    "mailbox": "grace@example.com",
                    "folder": "deleteditems",
                    "read": True,
                },
            ],
        }
    )
    return scenario


@pytest.fixture(autouse=True)
def _fresh_protocol_cache() -> Iterator[None]:
    CachingProtocol.clear_cache()
    yield
    CachingProtocol.clear_cache()


@pytest.fixture
def scenario_path(tmp_path: Path) -> Path:
    path = tmp_path / "scenario.json"
    path.write_text(json.dumps(make_scenario()), encoding="utf-8")
    return path


def sim_settings(**changes: Any) -> EwsSimSettings:
    values: dict[str, Any] = {"service_accounts": {SERVICE_ACCOUNT: PASSWORD}}
    values.update(changes)
    return EwsSimSettings(**values)


@pytest.fixture
async def ews_sim(scenario_path: Path) -> AsyncIterator[EwsSimulator]:
    world = World.open(scenario_path, scenario_path.parent / "state.json")
    simulator = EwsSimulator(world, sim_settings(), scenario_path=scenario_path)
    await simulator.start()
    yield simulator
    await simulator.stop()


def adapter_settings(endpoint: str, **changes: Any) -> EwsSettings:
    values: dict[str, Any] = {
        "service_endpoint": endpoint,
        "username": SERVICE_ACCOUNT,
        "password": PASSWORD,
        "quarantine_mailbox": QUARANTINE,
    }
    values.update(changes)
    return EwsSettings(**values)


@pytest.fixture
async def ews(ews_sim: EwsSimulator) -> AsyncIterator[EwsPlatform]:
    platform = EwsPlatform(adapter_settings(ews_sim.endpoint))
    yield platform
    await platform.close()


def copies_of(sim: EwsSimulator, mailbox: str, message_id: str) -> list[dict[str, Any]]:
    return [
        row
        for row in sim.world.snapshot(mailbox)
        if row["internet_message_id"] == f"<{message_id}>"
    ]


def writes(sim: EwsSimulator) -> list[str]:
    reads = {"GetFolder", "FindFolder", "FindItem", "GetItem", "ConvertId"}
    return [
        f"{entry.operation} {entry.mailbox}"
        for entry in sim.log
        if entry.operation not in reads
    ]


def requests_for(sim: EwsSimulator, mailbox: str) -> list[float]:
    return [entry.at for entry in sim.log if entry.mailbox == mailbox]


def fault(sim: EwsSimulator, **rule: Any) -> None:
    sim.faults.add(rule)


# --- find -----------------------------------------------------------------------------


async def test_find_reports_every_folder(ews: EwsPlatform) -> None:
    copies = await ews.find("grace@example.com", T1)

    found = sorted((copy.folder, copy.read) for copy in copies)
    assert found == [
        ("Deleted Items", True),
        ("Inbox", False),
        ("Junk Email", True),
        ("Projects", False),
    ]
    assert {copy.message_id for copy in copies} == {T1}
    assert all(copy.subject == "In every folder" for copy in copies)


async def test_find_matches_odd_message_id(ews: EwsPlatform) -> None:
    copies = await ews.find("Dave@Example.com", f"  <{M2}> ")

    assert sorted(copy.folder for copy in copies) == ["Inbox", "Junk Email"]
    assert {copy.mailbox for copy in copies} == {"dave@example.com"}


async def test_find_uses_one_finditem_for_all_folders(
    ews: EwsPlatform, ews_sim: EwsSimulator
) -> None:
    await ews.find("grace@example.com", T1)

    operations = [entry.operation for entry in ews_sim.log]
    assert operations == ["GetFolder", "FindFolder", "FindItem", "GetItem"]
    assert ews_sim.log[2].items > 5


async def test_find_other_message_finds_nothing(ews: EwsPlatform) -> None:
    assert await ews.find("grace@example.com", "absent@example.net") == []


# --- quarantine -----------------------------------------------------------------------


async def test_quarantine_stores_marked_copy(
    ews: EwsPlatform, ews_sim: EwsSimulator
) -> None:
    result = await ews.quarantine("alice@example.com", f"<{M1}>", INCIDENT)

    stored = copies_of(ews_sim, QUARANTINE, M1)
    assert copies_of(ews_sim, "alice@example.com", M1) == []
    assert len(stored) == 1
    assert stored[0]["folder_path"] == f"{CONTAINER}/{INCIDENT}"
    assert stored[0]["is_draft"] is False
    assert stored[0]["marker_headers"][INCIDENT_HEADER] == INCIDENT
    assert stored[0]["marker_headers"][ORIGINAL_MAILBOX_HEADER] == "alice@example.com"
    assert stored[0]["marker_headers"][ORIGINAL_FOLDER_HEADER] == "Inbox"
    assert stored[0]["marker_headers"][ORIGINAL_READ_HEADER] == "false"
    assert [(c.folder, c.read) for c in result.copies] == [("Inbox", False)]
    assert result.already_done is False
    assert result.attempts == 1
    assert result.evidence_location == f"{QUARANTINE}/{CONTAINER}/{INCIDENT}"


async def test_quarantine_pulls_both_folders(
    ews: EwsPlatform, ews_sim: EwsSimulator
) -> None:
    result = await ews.quarantine("dave@example.com", M2, INCIDENT)

    stored = copies_of(ews_sim, QUARANTINE, M2)
    assert copies_of(ews_sim, "dave@example.com", M2) == []
    assert sorted(r["marker_headers"][ORIGINAL_FOLDER_HEADER] for r in stored) == [
        "Inbox",
        "Junk Email",
    ]
    assert sorted(copy.folder for copy in result.copies) == ["Inbox", "Junk Email"]


async def test_quarantine_twice_writes_nothing(
    ews: EwsPlatform, ews_sim: EwsSimulator
) -> None:
    await ews.quarantine("grace@example.com", T1, INCIDENT)
    ews_sim.log.clear()

    second = await ews.quarantine("grace@example.com", T1, INCIDENT)

    assert second.already_done is True
    assert sorted((c.folder, c.read) for c in second.copies) == [
        ("Deleted Items", True),
        ("Inbox", False),
        ("Junk Email", True),
        ("Projects", False),
    ]
    assert writes(ews_sim) == []
    assert len(copies_of(ews_sim, QUARANTINE, T1)) == 4


async def test_quarantine_under_other_incident_is_done(
    ews: EwsPlatform, ews_sim: EwsSimulator
) -> None:
    await ews.quarantine("alice@example.com", M1, INCIDENT)

    other = await ews.quarantine("alice@example.com", M1, "INC-0043")

    assert other.already_done is True
    assert len(copies_of(ews_sim, QUARANTINE, M1)) == 1


async def test_quarantine_absent_message_not_found(ews: EwsPlatform) -> None:
    with pytest.raises(NotFoundError) as caught:
        await ews.quarantine("alice@example.com", "absent@example.net", INCIDENT)

    assert caught.value.mailbox == "alice@example.com"
    assert caught.value.message_id == "absent@example.net"


async def test_quarantine_failed_delete_keeps_one_copy(
    ews: EwsPlatform, ews_sim: EwsSimulator
) -> None:
    fault(
        ews_sim,
        kind="fault",
        code="ErrorInternalServerError",
        operation="DeleteItem",
        mailbox="alice@example.com",
    )

    with pytest.raises(TransientError):
        await ews.quarantine("alice@example.com", M1, INCIDENT)
    assert len(copies_of(ews_sim, "alice@example.com", M1)) == 1
    assert len(copies_of(ews_sim, QUARANTINE, M1)) == 1

    result = await ews.quarantine("alice@example.com", M1, INCIDENT)

    assert result.already_done is False
    assert copies_of(ews_sim, "alice@example.com", M1) == []
    assert len(copies_of(ews_sim, QUARANTINE, M1)) == 1


async def test_quarantine_lost_reply_keeps_one_copy(
    ews: EwsPlatform, ews_sim: EwsSimulator
) -> None:
    fault(ews_sim, kind="drop", operation="CreateItem", mailbox=QUARANTINE, after=True)

    with pytest.raises(TransientError):
        await ews.quarantine("bob@example.com", M1, INCIDENT)
    assert len(copies_of(ews_sim, QUARANTINE, M1)) == 1
    await ews.quarantine("bob@example.com", M1, INCIDENT)

    assert copies_of(ews_sim, "bob@example.com", M1) == []
    assert len(copies_of(ews_sim, QUARANTINE, M1)) == 1


# --- restore --------------------------------------------------------------------------


async def test_restore_returns_folders_and_read_state(
    ews: EwsPlatform, ews_sim: EwsSimulator
) -> None:
    await ews.quarantine("grace@example.com", T1, INCIDENT)

    result = await ews.restore("grace@example.com", T1, INCIDENT)

    back = sorted(
        (row["folder"], row["is_read"], row["is_draft"])
        for row in copies_of(ews_sim, "grace@example.com", T1)
    )
    assert back == [
        ("Deleted Items", True, False),
        ("Inbox", False, False),
        ("Junk Email", True, False),
        ("Projects", False, False),
    ]
    assert copies_of(ews_sim, QUARANTINE, T1) == []
    assert len(result.copies) == 4
    assert result.already_done is False


async def test_restore_strips_marker_headers(
    ews: EwsPlatform, ews_sim: EwsSimulator
) -> None:
    await ews.quarantine("alice@example.com", M1, INCIDENT)

    await ews.restore("alice@example.com", M1, INCIDENT)

    [row] = copies_of(ews_sim, "alice@example.com", M1)
    assert row["marker_headers"] == {}
    assert row["folder"] == "Inbox"


async def test_restore_twice_writes_nothing(
    ews: EwsPlatform, ews_sim: EwsSimulator
) -> None:
    await ews.quarantine("dave@example.com", M2, INCIDENT)
    await ews.restore("dave@example.com", M2, INCIDENT)
    ews_sim.log.clear()

    second = await ews.restore("dave@example.com", M2, INCIDENT)

    assert second.already_done is True
    assert writes(ews_sim) == []
    assert len(copies_of(ews_sim, "dave@example.com", M2)) == 2


async def test_restore_interrupted_keeps_one_copy(
    ews: EwsPlatform, ews_sim: EwsSimulator
) -> None:
    await ews.quarantine("alice@example.com", M1, INCIDENT)
    fault(ews_sim, kind="fault", operation="DeleteItem", mailbox=QUARANTINE)

    with pytest.raises(TransientError):
        await ews.restore("alice@example.com", M1, INCIDENT)
    await ews.restore("alice@example.com", M1, INCIDENT)

    assert len(copies_of(ews_sim, "alice@example.com", M1)) == 1
    assert copies_of(ews_sim, QUARANTINE, M1) == []


async def test_restore_into_inbox_when_folder_is_gone(
    ews: EwsPlatform, ews_sim: EwsSimulator
) -> None:
    await ews.quarantine("carol@example.com", M1, INCIDENT)
    box = ews_sim.world.mailbox("carol@example.com")
    projects = next(f for f in box.folders.values() if f.display_name == "Projects")
    for item in list(ews_sim.world.items_of("carol@example.com", projects.folder_id)):
        ews_sim.world.remove_item("carol@example.com", item.item_id)
    del box.folders[projects.folder_id]

    result = await ews.restore("carol@example.com", M1, INCIDENT)

    [row] = copies_of(ews_sim, "carol@example.com", M1)
    assert row["folder"] == "Inbox"
    assert len(result.notes) == 1


async def test_restore_never_quarantined_not_found(ews: EwsPlatform) -> None:
    with pytest.raises(NotFoundError):
        await ews.restore("alice@example.com", "absent@example.net", INCIDENT)


# --- throttling (ErrorServerBusy with BackOffMilliseconds) ----------------------------


async def test_back_off_pauses_only_that_mailbox(
    ews: EwsPlatform, ews_sim: EwsSimulator
) -> None:
    fault(
        ews_sim,
        kind="server_busy",
        back_off_ms=2500,
        operation="FindItem",
        mailbox="dave@example.com",
    )

    dave, erin = await asyncio.gather(
        ews.quarantine("dave@example.com", M2, INCIDENT),
        ews.quarantine("erin@example.com", "spam-0001@promo.example.net", INCIDENT),
    )

    faulted = next(e for e in ews_sim.log if e.code == "ErrorServerBusy")
    dave_after = [
        at for at in requests_for(ews_sim, "dave@example.com") if at > faulted.at
    ]
    erin_during = [
        at
        for at in requests_for(ews_sim, "erin@example.com")
        if faulted.at < at < faulted.at + 2.5
    ]
    assert dave.attempts == 2
    assert erin.attempts == 1
    assert min(dave_after) - faulted.at >= 2.5
    assert erin_during != []
    assert not any(entry.early for entry in ews_sim.log)
    assert copies_of(ews_sim, "dave@example.com", M2) == []


async def test_back_off_without_value_uses_default(
    ews_sim: EwsSimulator,
) -> None:
    platform = EwsPlatform(adapter_settings(ews_sim.endpoint, max_back_off_wait=1.0))
    fault(ews_sim, kind="server_busy", operation="FindItem", mailbox="dave@example.com")
    try:
        with pytest.raises(ThrottledError) as caught:
            await platform.quarantine("dave@example.com", M2, INCIDENT)
    finally:
        await platform.close()

    assert caught.value.retry_after is not None
    assert caught.value.retry_after > 1.0
    assert caught.value.mailbox == "dave@example.com"


async def test_inner_server_busy_is_throttling(ews_sim: EwsSimulator) -> None:
    platform = EwsPlatform(adapter_settings(ews_sim.endpoint, max_back_off_wait=1.0))
    fault(
        ews_sim,
        kind="server_busy_inner",
        operation="FindItem",
        mailbox="dave@example.com",
    )
    try:
        with pytest.raises(ThrottledError) as caught:
            await platform.find("dave@example.com", M2)
    finally:
        await platform.close()

    assert caught.value.retry_after is not None
    assert [e.status for e in ews_sim.log if e.operation == "FindItem"] == [200]


async def test_huge_back_off_parks_without_sleeping(
    ews: EwsPlatform, ews_sim: EwsSimulator
) -> None:
    fault(
        ews_sim,
        kind="server_busy",
        back_off_ms=900_000,
        operation="FindItem",
        mailbox="dave@example.com",
    )
    started = time.monotonic()

    with pytest.raises(ThrottledError) as first:
        await ews.quarantine("dave@example.com", M2, INCIDENT)
    sent = len(ews_sim.log)
    with pytest.raises(ThrottledError) as second:
        await ews.quarantine("dave@example.com", M2, INCIDENT)

    assert first.value.retry_after == 900.0
    assert second.value.retry_after is not None
    assert 890 < second.value.retry_after <= 900
    assert len(ews_sim.log) == sent
    assert time.monotonic() - started < 10
    assert len(copies_of(ews_sim, "dave@example.com", M2)) == 2


async def test_unavailable_carries_retry_after(ews_sim: EwsSimulator) -> None:
    platform = EwsPlatform(adapter_settings(ews_sim.endpoint, max_back_off_wait=5.0))
    fault(ews_sim, kind="unavailable", retry_after=7, mailbox="alice@example.com")
    try:
        with pytest.raises(TransientError) as caught:
            await platform.find("alice@example.com", M1)
    finally:
        await platform.close()

    assert not isinstance(caught.value, ThrottledError)
    assert caught.value.retry_after == 7.0
    assert [e.status for e in ews_sim.log] == [503]


async def test_unavailable_retried_after_retry_after(
    ews: EwsPlatform, ews_sim: EwsSimulator
) -> None:
    fault(ews_sim, kind="unavailable", retry_after=1, mailbox="alice@example.com")

    copies = await ews.find("alice@example.com", M1)

    answered = next(e for e in ews_sim.log if e.status == 503)
    retried = next(e for e in ews_sim.log if e.seq > answered.seq)
    assert len(copies) == 1
    assert answered.retry_after == 1
    assert retried.at - answered.at >= 1.0


async def test_back_off_holds_requests_waiting_for_slot(
    ews_sim: EwsSimulator,
) -> None:
    # One request slot: the second find waits for it while the first one is
    # throttled, and must then wait out the back-off that began meanwhile.
    ews_sim.settings.latency_ms = 200
    platform = EwsPlatform(
        adapter_settings(ews_sim.endpoint, max_concurrency_per_mailbox=1)
    )
    fault(
        ews_sim,
        kind="server_busy",
        back_off_ms=1500,
        operation="FindItem",
        mailbox="dave@example.com",
    )
    try:
        first, second = await asyncio.gather(
            platform.find("dave@example.com", M2),
            platform.find("dave@example.com", M2),
        )
    finally:
        await platform.close()

    busy = next(e for e in ews_sim.log if e.code == "ErrorServerBusy")
    after = [e for e in ews_sim.log if e.seq > busy.seq]
    assert len(first) == len(second) == 2
    assert [e.seq for e in ews_sim.log if e.early] == []
    assert after[0].at - busy.at >= 1.5


async def test_connection_limit_is_transient(
    ews: EwsPlatform, ews_sim: EwsSimulator
) -> None:
    fault(
        ews_sim,
        kind="fault",
        code="ErrorExceededConnectionCount",
        mailbox="alice@example.com",
        count=10,
    )

    with pytest.raises(TransientError):
        await ews.find("alice@example.com", M1)


# --- access ---------------------------------------------------------------------------


async def test_impersonation_denied_is_permanent(
    ews: EwsPlatform, ews_sim: EwsSimulator
) -> None:
    ews_sim.settings.impersonation_denied = ["frank@example.com"]

    with pytest.raises(PermanentError) as caught:
        await ews.find("frank@example.com", M1)

    assert "ErrorImpersonateUserDenied" in str(caught.value)
    assert caught.value.mailbox == "frank@example.com"


async def test_unknown_mailbox_not_found(ews: EwsPlatform) -> None:
    with pytest.raises(NotFoundError):
        await ews.find("nobody@example.com", M1)


async def test_wrong_password_is_permanent(ews_sim: EwsSimulator) -> None:
    platform = EwsPlatform(adapter_settings(ews_sim.endpoint, password="wrong"))
    try:
        with pytest.raises(PermanentError):
            await platform.find("alice@example.com", M1)
    finally:
        await platform.close()

    assert [entry.status for entry in ews_sim.log] == [401]


async def test_missing_quarantine_mailbox_is_permanent(ews_sim: EwsSimulator) -> None:
    settings = adapter_settings(
        ews_sim.endpoint, quarantine_mailbox="vault@example.com"
    )
    platform = EwsPlatform(settings)
    try:
        with pytest.raises(PermanentError) as caught:
            await platform.quarantine("alice@example.com", M1, INCIDENT)
    finally:
        await platform.close()

    assert "vault@example.com" in str(caught.value)
    assert len(copies_of(ews_sim, "alice@example.com", M1)) == 1


# --- inbox rules ----------------------------------------------------------------------


async def test_rules_name_each_enabled_action(
    ews: EwsPlatform, ews_sim: EwsSimulator
) -> None:
    rules = await ews.forwarding_rules("Alice@example.com")

    assert rules == [
        ForwardingRule("alice@example.com", ("dave@example.com",), "redirect"),
        ForwardingRule(
            "alice@example.com",
            ("erin@example.com", "partner@example.net"),
            "forward",
        ),
        ForwardingRule(
            "alice@example.com", ("frank@example.com",), "forward_as_attachment"
        ),
    ]
    [request] = [entry for entry in ews_sim.log if entry.operation == "GetInboxRules"]
    assert request.mailbox == "alice@example.com"
    assert request.impersonated


async def test_rules_disabled_rule_gives_none(ews: EwsPlatform) -> None:
    assert await ews.forwarding_rules("bob@example.com") == []


async def test_rules_mailbox_without_rules(ews: EwsPlatform) -> None:
    assert await ews.forwarding_rules("carol@example.com") == []


async def test_rules_impersonation_denied_is_permanent(
    ews: EwsPlatform, ews_sim: EwsSimulator
) -> None:
    ews_sim.settings.impersonation_denied = ["alice@example.com"]

    with pytest.raises(PermanentError) as caught:
        await ews.forwarding_rules("alice@example.com")

    assert "ErrorImpersonateUserDenied" in str(caught.value)
    assert caught.value.mailbox == "alice@example.com"


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("ErrorAccessDenied", PermanentError),
        # exchangelib returns this one as an object in the rule list, not raised.
        ("ErrorInvalidOperation", PermanentError),
        ("ErrorMailboxStoreUnavailable", TransientError),
        ("ErrorNonExistentMailbox", NotFoundError),
    ],
)
async def test_rules_response_error_is_mapped(
    ews: EwsPlatform, ews_sim: EwsSimulator, code: str, expected: type[ConnectorError]
) -> None:
    fault(ews_sim, kind="error", operation="GetInboxRules", code=code)

    with pytest.raises(expected) as caught:
        await ews.forwarding_rules("alice@example.com")

    assert type(caught.value) is expected
    assert caught.value.mailbox == "alice@example.com"


async def test_rules_long_back_off_is_throttled(
    ews: EwsPlatform, ews_sim: EwsSimulator
) -> None:
    fault(ews_sim, kind="server_busy", operation="GetInboxRules", back_off_ms=90_000)

    with pytest.raises(ThrottledError) as caught:
        await ews.forwarding_rules("alice@example.com")

    assert caught.value.retry_after == 90.0


def inbox_rules_request(acting: str, requested: str) -> str:
    return f"""<?xml version="1.0" encoding="utf-8"?>
<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"
  xmlns:m="http://schemas.microsoft.com/exchange/services/2006/messages"
  xmlns:t="http://schemas.microsoft.com/exchange/services/2006/types">
  <s:Header><t:RequestServerVersion Version="Exchange2010_SP1"/>
    <t:ExchangeImpersonation><t:ConnectingSID>
      <t:PrimarySmtpAddress>{acting}</t:PrimarySmtpAddress>
    </t:ConnectingSID></t:ExchangeImpersonation></s:Header>
  <s:Body><m:GetInboxRules>
    <m:MailboxSmtpAddress>{requested}</m:MailboxSmtpAddress>
  </m:GetInboxRules></s:Body>
</s:Envelope>"""


def soap_body(response: httpx.Response) -> Any:
    envelope = SafeET.fromstring(response.content)
    body = envelope.find(f"{{{SOAP}}}Body")
    assert body is not None
    return body


async def test_sim_inbox_rules_response_shape(ews_sim: EwsSimulator) -> None:
    response = await post_soap(
        ews_sim, inbox_rules_request("alice@example.com", "alice@example.com")
    )

    assert response.status_code == 200
    [answer] = list(soap_body(response))
    assert answer.tag == f"{{{MNS}}}GetInboxRulesResponse"
    assert answer.get("ResponseClass") == "Success"
    assert answer.findtext(f"{{{MNS}}}ResponseCode") == "NoError"
    assert answer.find(f"{{{MNS}}}ResponseMessages") is None
    rules = answer.findall(f"{{{MNS}}}InboxRules/{{{TNS}}}Rule")
    assert [rule.findtext(f"{{{TNS}}}IsEnabled") for rule in rules] == [
        "true",
        "true",
        "true",
        "false",
    ]
    assert [child.tag.split("}")[1] for child in rules[1]] == [
        "RuleId",
        "DisplayName",
        "Priority",
        "IsEnabled",
        "Actions",
    ]
    actions = rules[1].find(f"{{{TNS}}}Actions")
    assert actions is not None
    assert [child.tag.split("}")[1] for child in actions] == [
        "Delete",
        "ForwardToRecipients",
    ]
    addresses = actions.findall(f"{{{TNS}}}ForwardToRecipients/{{{TNS}}}Address")
    assert [a.findtext(f"{{{TNS}}}EmailAddress") for a in addresses] == [
        "erin@example.com",
        "partner@example.net",
    ]
    assert [a.findtext(f"{{{TNS}}}MailboxType") for a in addresses] == [
        "Mailbox",
        "OneOff",
    ]


async def test_sim_inbox_rules_omitted_when_none(ews_sim: EwsSimulator) -> None:
    response = await post_soap(
        ews_sim, inbox_rules_request("carol@example.com", "carol@example.com")
    )

    [answer] = list(soap_body(response))
    assert answer.get("ResponseClass") == "Success"
    assert answer.find(f"{{{MNS}}}InboxRules") is None


@pytest.mark.parametrize(
    ("requested", "full_access", "code"),
    [
        ("bob@example.com", [], "ErrorAccessDenied"),
        ("bob@example.com", ["alice@example.com"], "NoError"),
        ("nobody@example.com", [], "ErrorNonExistentMailbox"),
    ],
)
async def test_sim_inbox_rules_of_other_mailbox(
    ews_sim: EwsSimulator, requested: str, full_access: list[str], code: str
) -> None:
    ews_sim.settings.full_access = full_access

    response = await post_soap(
        ews_sim, inbox_rules_request("alice@example.com", requested)
    )

    assert response.status_code == 200
    [answer] = list(soap_body(response))
    assert answer.findtext(f"{{{MNS}}}ResponseCode") == code
    expected_class = "Success" if code == "NoError" else "Error"
    assert answer.get("ResponseClass") == expected_class


async def test_sim_inbox_rules_through_exchangelib(ews_sim: EwsSimulator) -> None:
    alice = service_account(ews_sim, "alice@example.com")

    rules = await asyncio.to_thread(lambda: alice.rules)

    assert [rule.priority for rule in rules] == [1, 2, 3, 4]
    assert [rule.is_enabled for rule in rules] == [True, True, True, False]
    assert rules[1].actions.delete is True
    assert [a.email_address for a in rules[0].actions.redirect_to_recipients] == [
        "dave@example.com"
    ]


# --- the simulator through exchangelib ------------------------------------------------


def service_account(sim: EwsSimulator, mailbox: str) -> Any:
    config = Configuration(
        service_endpoint=sim.endpoint,
        credentials=Credentials(SERVICE_ACCOUNT, PASSWORD),
        auth_type=BASIC,
        version=EwsVersion(build=Build(15, 1, 2507, 6)),
        retry_policy=FailFast(),
    )
    return Account(mailbox, config=config, access_type=IMPERSONATION)


async def test_sim_probes_version_with_convertid(ews_sim: EwsSimulator) -> None:
    config = Configuration(
        service_endpoint=ews_sim.endpoint,
        credentials=Credentials(SERVICE_ACCOUNT, PASSWORD),
        auth_type=BASIC,
    )
    account = Account("alice@example.com", config=config, access_type=IMPERSONATION)

    version = await asyncio.to_thread(lambda: account.version)

    assert version.build == Build(15, 1, 2507, 6)
    assert ews_sim.log[0].operation == "ConvertId"


async def test_sim_creates_folder_once(ews_sim: EwsSimulator) -> None:
    account = service_account(ews_sim, "alice@example.com")

    def create_twice() -> list[Any]:
        parent = account.msg_folder_root
        results = []
        for _ in range(2):
            try:
                results.append(Folder(parent=parent, name="Cases").save())
            except ErrorFolderExists as exc:
                results.append(exc)
        return results

    first, second = await asyncio.to_thread(create_twice)

    assert isinstance(first, Folder)
    assert isinstance(second, ErrorFolderExists)


async def test_sim_answers_each_folder_in_order(ews_sim: EwsSimulator) -> None:
    account = service_account(ews_sim, "grace@example.com")

    def find_in_three() -> list[Any]:
        folders = [account.inbox, account.junk, account.trash]
        return list(
            FolderCollection(account=account, folders=folders)
            .filter(message_id=f"<{T1}>")
            .only("is_read", "parent_folder_id")
        )

    items = await asyncio.to_thread(find_in_three)

    finds = [entry for entry in ews_sim.log if entry.operation == "FindItem"]
    assert len(items) == 3
    assert [entry.items for entry in finds] == [3]


async def test_sim_unknown_folder_is_per_id_error(ews_sim: EwsSimulator) -> None:
    account = service_account(ews_sim, "alice@example.com")

    def get_two() -> list[Any]:
        unknown = Folder(root=account.root, id="AAMkAFunknownfolderid0000")
        folders = [unknown, account.inbox]
        return list(FolderCollection(account=account, folders=folders).get_folders())

    first, second = await asyncio.to_thread(get_two)

    assert isinstance(first, ErrorFolderNotFound)
    assert second.name == "Inbox"


async def test_sim_fault_has_declaration_and_back_off(ews_sim: EwsSimulator) -> None:
    fault(ews_sim, kind="server_busy", back_off_ms=250)
    body = textwrap.dedent(
        """\
        <?xml version="1.0" encoding="utf-8"?>
        <s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"
          xmlns:m="http://schemas.microsoft.com/exchange/services/2006/messages"
          xmlns:t="http://schemas.microsoft.com/exchange/services/2006/types">
          <s:Header><t:RequestServerVersion Version="Exchange2016"/></s:Header>
          <s:Body><m:ConvertId DestinationFormat="EntryId"><m:SourceIds>
            <t:AlternateId Format="EwsId" Id="DUMMY" Mailbox="DUMMY"/>
          </m:SourceIds></m:ConvertId></s:Body>
        </s:Envelope>
        """
    )
    response = await post_soap(ews_sim, body)

    assert response.status_code == 500
    assert response.content.startswith(b"<?xml")
    assert b"ServerVersionInfo" in response.content
    assert b"<detail>" in response.content
    assert b'Name="BackOffMilliseconds">250<' in response.content


# --- the command line -----------------------------------------------------------------


@pytest.fixture
def ews_process(scenario_path: Path) -> Iterator[str]:
    """Run the simulator through its command-line functions; yield its endpoint."""
    script = (
        "import argparse, sys\n"
        "from autopull.sim.ews import add_ews_arguments, run_ews\n"
        "parser = argparse.ArgumentParser()\n"
        "add_ews_arguments(parser)\n"
        "sys.exit(run_ews(parser.parse_args(sys.argv[1:])))\n"
    )
    command = [
        sys.executable,
        "-c",
        script,
        "--world",
        str(scenario_path),
        "--state",
        str(scenario_path.parent / "cli-state.json"),
        "--port",
        "0",
        "--service-account",
        f"{SERVICE_ACCOUNT}:{PASSWORD}",
    ]
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost"}
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 30
        line = ""
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if "listening on" in line or not line:
                break
        assert "listening on" in line, f"The simulator did not start: {line!r}"
        yield line.rsplit(" ", 1)[-1].strip()
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


async def test_cli_simulator_serves_quarantine(
    ews_process: str, scenario_path: Path
) -> None:
    platform = EwsPlatform(adapter_settings(ews_process))
    try:
        result = await platform.quarantine("alice@example.com", M1, INCIDENT)
    finally:
        await platform.close()

    state = json.loads((scenario_path.parent / "cli-state.json").read_text())
    assert result.already_done is False
    assert ews_process.endswith("/EWS/Exchange.asmx")
    assert any(
        item["mailbox"] == QUARANTINE
        and M1 in base64.b64decode(item["mime_base64"]).decode()
        for item in state["items"]
    )


async def test_restore_non_ascii_folder_name(
    ews: EwsPlatform, ews_sim: EwsSimulator
) -> None:
    box = ews_sim.world.mailbox("carol@example.com")
    projects = next(f for f in box.folders.values() if f.display_name == "Projects")
    projects.display_name = "Geschäftsberichte"

    quarantined = await ews.quarantine("carol@example.com", M1, INCIDENT)
    [stored] = copies_of(ews_sim, QUARANTINE, M1)
    restored = await ews.restore("carol@example.com", M1, INCIDENT)

    [row] = copies_of(ews_sim, "carol@example.com", M1)
    assert quarantined.copies[0].folder == "Geschäftsberichte"
    assert stored["marker_headers"][ORIGINAL_FOLDER_HEADER].startswith("=?utf-8?")
    assert row["folder"] == "Geschäftsberichte"
    assert restored.copies[0].folder == "Geschäftsberichte"


# --- operations the adapter does not use ----------------------------------------------


async def test_sim_moves_across_mailboxes_without_id(ews_sim: EwsSimulator) -> None:
    ews_sim.settings.full_access = ["erin@example.com"]
    erin = service_account(ews_sim, "erin@example.com")
    vault = service_account(ews_sim, QUARANTINE)

    def move() -> tuple[Any, Any]:
        [item] = erin.inbox.filter(message_id="<spam-0001@promo.example.net>")
        item.move(to_folder=vault.inbox)
        return item.id, len(list(vault.inbox.filter(subject=item.subject)))

    new_id, arrived = await asyncio.to_thread(move)

    assert new_id is None
    assert arrived == 1
    assert copies_of(ews_sim, "erin@example.com", "spam-0001@promo.example.net") == []


async def test_sim_cross_mailbox_needs_access(ews_sim: EwsSimulator) -> None:
    erin = service_account(ews_sim, "erin@example.com")
    vault = service_account(ews_sim, QUARANTINE)

    def copy() -> Any:
        [item] = erin.inbox.filter(message_id="<spam-0001@promo.example.net>")
        return item.copy(to_folder=vault.inbox)

    with pytest.raises(ErrorAccessDenied):
        await asyncio.to_thread(copy)


async def test_sim_move_in_mailbox_changes_id(ews_sim: EwsSimulator) -> None:
    alice = service_account(ews_sim, "alice@example.com")

    def move() -> tuple[str, str, list[Any]]:
        [item] = alice.inbox.filter(message_id=f"<{M1}>")
        old_id = item.id
        item.move(to_folder=alice.junk)
        return old_id, item.id, list(alice.fetch(ids=[(old_id, None)]))

    old_id, new_id, stale = await asyncio.to_thread(move)

    assert new_id != old_id
    assert isinstance(stale[0], ErrorItemNotFound)


async def test_sim_export_upload_keeps_read_state(ews_sim: EwsSimulator) -> None:
    bob = service_account(ews_sim, "bob@example.com")
    vault = service_account(ews_sim, QUARANTINE)

    def round_trip() -> list[Any]:
        [item] = bob.inbox.filter(message_id=f"<{M1}>")
        [data] = bob.export([item])
        return list(vault.upload([(vault.inbox, (None, False, data))]))

    [(item_id, changekey)] = await asyncio.to_thread(round_trip)

    [row] = copies_of(ews_sim, QUARANTINE, M1)
    assert row["id"] == item_id
    assert changekey
    assert row["is_read"] is True
    assert row["is_draft"] is False


async def test_sim_update_sets_read_state(ews_sim: EwsSimulator) -> None:
    alice = service_account(ews_sim, "alice@example.com")

    def mark_read() -> None:
        [item] = alice.inbox.filter(message_id=f"<{M1}>")
        item.is_read = True
        item.save(update_fields=["is_read"])

    await asyncio.to_thread(mark_read)

    [row] = copies_of(ews_sim, "alice@example.com", M1)
    assert row["is_read"] is True


async def test_sim_pages_items_and_folders(ews_sim: EwsSimulator) -> None:
    alice = service_account(ews_sim, "alice@example.com")

    def page_through() -> tuple[int, int]:
        query = alice.inbox.all().only("subject")
        query.page_size = 1
        folders = list(
            FolderCollection(
                account=alice, folders=[alice.msg_folder_root]
            ).find_folders(depth="Deep", page_size=2)
        )
        return len(list(query)), len(folders)

    items, folders = await asyncio.to_thread(page_through)

    finds = [e for e in ews_sim.log if e.operation == "FindItem"]
    folder_finds = [e for e in ews_sim.log if e.operation == "FindFolder"]
    assert items == 3
    assert len(finds) == 3
    assert folders == 8
    assert len(folder_finds) == 4


async def test_sim_restriction_tree(ews_sim: EwsSimulator) -> None:
    alice = service_account(ews_sim, "alice@example.com")

    def search() -> list[str]:
        query = alice.inbox.filter(
            ~Q(is_read=True)
            & (Q(message_id=f"<{M1}>") | Q(subject__contains="nothing like this"))
        )
        return [item.subject for item in query.only("subject")]

    subjects = await asyncio.to_thread(search)

    assert subjects == ["Invoice 4471 overdue"]


async def test_sim_creates_into_other_mailbox_with_access(
    ews_sim: EwsSimulator,
) -> None:
    ews_sim.settings.full_access = ["alice@example.com"]
    mime = base64.b64encode(
        b"Message-ID: <upload-1@example.net>\r\nSubject: Evidence\r\n\r\nBody\r\n"
    ).decode()
    body = f"""<?xml version="1.0" encoding="utf-8"?>
<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"
  xmlns:m="http://schemas.microsoft.com/exchange/services/2006/messages"
  xmlns:t="http://schemas.microsoft.com/exchange/services/2006/types">
  <s:Header><t:RequestServerVersion Version="Exchange2016"/>
    <t:ExchangeImpersonation><t:ConnectingSID>
      <t:PrimarySmtpAddress>alice@example.com</t:PrimarySmtpAddress>
    </t:ConnectingSID></t:ExchangeImpersonation></s:Header>
  <s:Body><m:CreateItem MessageDisposition="SaveOnly">
    <m:SavedItemFolderId><t:DistinguishedFolderId Id="inbox">
      <t:Mailbox><t:EmailAddress>{QUARANTINE}</t:EmailAddress></t:Mailbox>
    </t:DistinguishedFolderId></m:SavedItemFolderId>
    <m:Items><t:Message><t:MimeContent>{mime}</t:MimeContent></t:Message></m:Items>
  </m:CreateItem></s:Body>
</s:Envelope>"""

    response = await post_soap(ews_sim, body)

    assert response.status_code == 200
    assert b'ResponseClass="Success"' in response.content
    assert len(copies_of(ews_sim, QUARANTINE, "upload-1@example.net")) == 1


async def post_soap(sim: EwsSimulator, body: str) -> httpx.Response:
    token = base64.b64encode(f"{SERVICE_ACCOUNT}:{PASSWORD}".encode()).decode()
    async with httpx.AsyncClient() as client:
        return await client.post(
            sim.endpoint,
            content=body.encode(),
            headers={
                "Authorization": f"Basic {token}",
                "Content-Type": "text/xml; charset=utf-8",
            },
        )
