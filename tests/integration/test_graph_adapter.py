"""The Graph adapter against the Graph simulator, both over real HTTP on 127.0.0.1.

Most tests run the simulator in-process on a free port, with a state file in the
test's temporary folder. One test runs it as a subprocess through its command line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from kiota_abstractions.api_error import APIError
from msgraph.generated.models.o_data_errors.main_error import MainError
from msgraph.generated.models.o_data_errors.o_data_error import ODataError

from autopull.connectors.errors import (
    ConnectorError,
    NotFoundError,
    PermanentError,
    ThrottledError,
    TransientError,
)
from autopull.connectors.mail.graph import (
    MARKER_PROPERTY_ID,
    GraphPlatform,
    GraphSettings,
    internet_message_id_filter,
    map_graph_error,
    parse_retry_after,
)
from autopull.sim.graph import GraphSimSettings, GraphSimulator
from autopull.sim.world import World

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO = REPO_ROOT / "examples" / "worlds" / "demo.json"
M1 = "20261201093000.1234.invoice@billing-example.net"
M2 = "CAH7x+q/Lk=Zp'8#w%41&r@mail.example.net"
T1 = "t1.every-folder@example.net"
QUARANTINE = "quarantine@example.com"
HIDDEN = "Autopull Quarantine"
M2_FILTER = "internetMessageId eq '<CAH7x+q/Lk=Zp''8#w%41&r@mail.example.net>'"


def make_scenario() -> dict[str, Any]:
    """Return the demo world plus grace@, who has T1 in four kinds of folder."""
    scenario: dict[str, Any] = json.loads(DEMO.read_text(encoding="utf-8"))
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


@pytest.fixture
def scenario_path(tmp_path: Path) -> Path:
    path = tmp_path / "scenario.json"
    path.write_text(json.dumps(make_scenario()), encoding="utf-8")
    return path


@pytest.fixture
async def graph_sim(scenario_path: Path) -> AsyncIterator[GraphSimulator]:
    state = scenario_path.parent / "state.json"
    world = World.open(scenario_path, state)
    simulator = GraphSimulator(world, GraphSimSettings(), scenario_path=scenario_path)
    await simulator.start()
    yield simulator
    await simulator.stop()


def adapter_settings(url: str, **changes: Any) -> GraphSettings:
    tenant = make_scenario()["tenants"][0]
    values: dict[str, Any] = {
        "graph_url": f"{url}/v1.0",
        "authority_url": url,
        "tenant_id": tenant["tenant_id"],
        "client_id": tenant["client_id"],
        "client_secret": tenant["client_secret"],
        "quarantine_mailbox": QUARANTINE,
        "page_size": 1,
    }
    values.update(changes)
    return GraphSettings(**values)


@pytest.fixture
async def graph(graph_sim: GraphSimulator) -> AsyncIterator[GraphPlatform]:
    assert graph_sim.base_url is not None
    platform = GraphPlatform(adapter_settings(graph_sim.base_url))
    yield platform
    await platform.close()


def copies_of(sim: GraphSimulator, mailbox: str, key: str) -> list[dict[str, Any]]:
    return [row for row in sim.world.snapshot(mailbox) if row["key"] == key]


def evidence_of(sim: GraphSimulator, message_id: str) -> list[dict[str, Any]]:
    return [
        row
        for row in sim.world.snapshot(QUARANTINE)
        if row["internet_message_id"] == f"<{message_id}>"
    ]


def filters_sent(sim: GraphSimulator, mailbox: str) -> list[str]:
    return [
        entry.query["$filter"]
        for entry in sim.log
        if entry.mailbox == mailbox and "$filter" in entry.query
    ]


def writes_sent(sim: GraphSimulator) -> list[str]:
    return [
        f"{e.method} {e.path}"
        for e in sim.log
        if e.method != "GET" and e.path.startswith("/v1.0/")
    ]


def marker_of(row: dict[str, Any]) -> dict[str, Any]:
    key = MARKER_PROPERTY_ID.replace("C000", "c000")
    return dict(json.loads(row["extended_properties"][key]))


# --- find -----------------------------------------------------------------------------


async def test_find_reports_every_folder(graph: GraphPlatform) -> None:
    copies = await graph.find("grace@example.com", T1)

    found = sorted((copy.folder, copy.read) for copy in copies)
    assert found == [
        ("Deleted Items", True),
        ("Inbox", False),
        ("Junk Email", True),
        ("Projects", False),
    ]
    assert {copy.message_id for copy in copies} == {T1}
    assert all(copy.mailbox == "grace@example.com" for copy in copies)


async def test_find_p01_filter_decoded_exactly(
    graph: GraphPlatform, graph_sim: GraphSimulator
) -> None:
    copies = await graph.find("dave@example.com", f"<{M2}>")

    assert sorted(copy.folder for copy in copies) == ["Inbox", "Junk Email"]
    assert set(filters_sent(graph_sim, "dave@example.com")) == {M2_FILTER}


async def test_find_reads_every_page(
    graph: GraphPlatform, graph_sim: GraphSimulator
) -> None:
    copies = await graph.find("grace@example.com", T1)

    pages = [
        e for e in graph_sim.log if e.query.get("$filter") and e.query.get("$skip")
    ]
    assert len(copies) == 4
    assert len(pages) == 3


async def test_find_missing_mailbox_fails(graph: GraphPlatform) -> None:
    with pytest.raises(PermanentError) as caught:
        await graph.find("nobody@example.com", M1)

    assert caught.value.mailbox == "nobody@example.com"
    assert "found no user for mailbox nobody@example.com" in str(caught.value)


async def test_find_ignores_brackets_and_space(graph: GraphPlatform) -> None:
    copies = await graph.find("alice@example.com", f"  <{M1}> ")

    assert [copy.message_id for copy in copies] == [M1]


# --- quarantine -----------------------------------------------------------------------


async def test_quarantine_three_mailboxes_one_evidence(
    graph: GraphPlatform, graph_sim: GraphSimulator
) -> None:
    mailboxes = ["alice@example.com", "bob@example.com", "carol@example.com"]

    results = await asyncio.gather(
        *(graph.quarantine(mailbox, M1, "INC-1") for mailbox in mailboxes)
    )

    for mailbox, result in zip(mailboxes, results, strict=True):
        rows = copies_of(graph_sim, mailbox, "M1")
        assert [(r["folder"], r["hidden_folder"]) for r in rows] == [(HIDDEN, True)]
        assert result.already_done is False
        assert result.evidence_location == f"{QUARANTINE}/INC-1"
    evidence = evidence_of(graph_sim, M1)
    assert [row["folder"] for row in evidence] == ["INC-1"]
    assert evidence[0]["marker_headers"]["X-Autopull-Incident"] == "INC-1"
    assert evidence[0]["marker_headers"]["X-Autopull-Original-Mailbox"] in mailboxes


async def test_quarantine_evidence_requests_sent_once(
    graph: GraphPlatform, graph_sim: GraphSimulator
) -> None:
    def quarantine_requests() -> int:
        return sum(1 for e in graph_sim.log if e.mailbox == QUARANTINE)

    await graph.quarantine("alice@example.com", M1, "INC-1")
    after_first = quarantine_requests()
    await graph.quarantine("bob@example.com", M1, "INC-1")
    await graph.quarantine("carol@example.com", M1, "INC-1")

    assert after_first > 0
    assert quarantine_requests() == after_first
    assert [row["folder"] for row in evidence_of(graph_sim, M1)] == ["INC-1"]


async def test_quarantine_two_workers_keep_one_evidence(
    graph_sim: GraphSimulator,
) -> None:
    assert graph_sim.base_url is not None
    workers = [GraphPlatform(adapter_settings(graph_sim.base_url)) for _ in range(2)]
    mailboxes = ["alice@example.com", "bob@example.com"]

    try:
        await asyncio.gather(
            *(
                worker.quarantine(mailbox, M1, "INC-1")
                for worker, mailbox in zip(workers, mailboxes, strict=True)
            )
        )
    finally:
        for worker in workers:
            await worker.close()

    assert [row["folder"] for row in evidence_of(graph_sim, M1)] == ["INC-1"]
    for mailbox in mailboxes:
        rows = copies_of(graph_sim, mailbox, "M1")
        assert [row["folder"] for row in rows] == [HIDDEN], mailbox


@pytest.mark.parametrize(
    ("step", "stranded_in", "survivor"),
    [
        ("upload", "Drafts", "same"),
        ("upload", "Drafts", "restarted"),
        ("move", "INC-1", "same"),
    ],
)
async def test_quarantine_killed_evidence_write_left_one(
    graph_sim: GraphSimulator, step: str, stranded_in: str, survivor: str
) -> None:
    """A worker killed right after its late evidence write leaves one copy at last.

    The killed worker searches the quarantine mailbox and finds nothing. Another
    worker then files its own evidence copy, and only then does the killed worker
    upload (or file) its copy. The retry of the killed worker's pull, on the
    surviving worker or on a restarted one, must leave exactly one copy.
    """
    assert graph_sim.base_url is not None
    quarantine = re.escape(QUARANTINE)
    writes = {
        "upload": rf"^/v1\.0/users/{quarantine}/messages$",
        "move": rf"^/v1\.0/users/{quarantine}/messages/[^/]+/move$",
    }
    killed = GraphPlatform(adapter_settings(graph_sim.base_url))
    other = GraphPlatform(adapter_settings(graph_sim.base_url))
    restarted = GraphPlatform(adapter_settings(graph_sim.base_url))
    try:
        searched = graph_sim.faults.add(
            {
                "method": "GET",
                "path": rf"^/v1\.0/users/{quarantine}/messages$",
                "hold": True,
                "after": True,
            }
        )
        pull = asyncio.create_task(killed.quarantine("alice@example.com", M1, "INC-1"))
        await searched.reached.wait()
        await other.quarantine("bob@example.com", M1, "INC-1")

        # Clearing releases the held search, and the killed worker's next await
        # comes only after the new rule is in place.
        graph_sim.faults.clear()
        written = graph_sim.faults.add(
            {"method": "POST", "path": writes[step], "hold": True, "after": True}
        )
        await written.reached.wait()
        pull.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pull
        graph_sim.faults.clear()
        stranded = sorted(row["folder"] for row in evidence_of(graph_sim, M1))

        retry = other if survivor == "same" else restarted
        result = await retry.quarantine("alice@example.com", M1, "INC-1")
    finally:
        for worker in (killed, other, restarted):
            await worker.close()

    assert stranded == sorted(["INC-1", stranded_in])
    assert result.evidence_location == f"{QUARANTINE}/INC-1"
    assert [row["folder"] for row in evidence_of(graph_sim, M1)] == ["INC-1"]
    for mailbox in ("alice@example.com", "bob@example.com"):
        rows = copies_of(graph_sim, mailbox, "M1")
        assert [row["folder"] for row in rows] == [HIDDEN], mailbox


async def test_quarantine_reports_copies_as_they_were(graph: GraphPlatform) -> None:
    bob = await graph.quarantine("bob@example.com", M1, "INC-1")
    carol = await graph.quarantine("carol@example.com", M1, "INC-1")

    assert [(c.folder, c.read) for c in bob.copies] == [("Inbox", True)]
    assert [(c.folder, c.read) for c in carol.copies] == [("Projects", False)]


async def test_quarantine_marks_original_folder(
    graph: GraphPlatform, graph_sim: GraphSimulator
) -> None:
    before = copies_of(graph_sim, "carol@example.com", "M1")[0]

    await graph.quarantine("carol@example.com", M1, "INC-1")

    marker = marker_of(copies_of(graph_sim, "carol@example.com", "M1")[0])
    assert marker == {
        "incident": "INC-1",
        "folder_id": before["folder_id"],
        "folder_name": "Projects",
        "read": False,
    }


async def test_quarantine_again_changes_nothing(
    graph: GraphPlatform, graph_sim: GraphSimulator
) -> None:
    await graph.quarantine("alice@example.com", M1, "INC-1")
    state_before = graph_sim.world.to_state()
    graph_sim.log.clear()

    again = await graph.quarantine("alice@example.com", M1, "INC-1")

    assert again.already_done is True
    assert [(c.folder, c.read) for c in again.copies] == [("Inbox", False)]
    assert graph_sim.world.to_state() == state_before
    assert writes_sent(graph_sim) == []


async def test_quarantine_pulls_both_copies_of_dave(
    graph: GraphPlatform, graph_sim: GraphSimulator
) -> None:
    result = await graph.quarantine("dave@example.com", M2, "INC-2")

    rows = copies_of(graph_sim, "dave@example.com", "M2")
    assert sorted(c.folder for c in result.copies) == ["Inbox", "Junk Email"]
    assert [r["folder"] for r in rows] == [HIDDEN, HIDDEN]
    assert len(evidence_of(graph_sim, M2)) == 1
    assert await graph.find("dave@example.com", M2) == []
    assert len(await graph.find_quarantined("dave@example.com", M2)) == 2


async def test_quarantine_every_folder_of_grace(
    graph: GraphPlatform, graph_sim: GraphSimulator
) -> None:
    result = await graph.quarantine("grace@example.com", T1, "INC-3")

    assert len(result.copies) == 4
    assert {r["folder"] for r in copies_of(graph_sim, "grace@example.com", "T1")} == {
        HIDDEN
    }


async def test_quarantine_leaves_benign_mail_alone(
    graph: GraphPlatform, graph_sim: GraphSimulator
) -> None:
    benign_before = [
        row
        for mailbox in graph_sim.world.mailboxes
        for row in graph_sim.world.snapshot(mailbox)
        if row["verdict"] == "benign"
    ]

    await graph.quarantine("alice@example.com", M1, "INC-1")
    await graph.quarantine("dave@example.com", M2, "INC-2")

    benign_after = [
        row
        for mailbox in graph_sim.world.mailboxes
        for row in graph_sim.world.snapshot(mailbox)
        if row["verdict"] == "benign"
    ]
    assert benign_after == benign_before


async def test_quarantine_missing_id_touches_nothing(
    graph: GraphPlatform, graph_sim: GraphSimulator
) -> None:
    state_before = graph_sim.world.to_state()

    with pytest.raises(NotFoundError) as caught:
        await graph.quarantine("bob@example.com", "<a'or'b@example.net>", "INC-4")

    assert caught.value.message_id == "a'or'b@example.net"
    assert filters_sent(graph_sim, "bob@example.com") == [
        "internetMessageId eq '<a''or''b@example.net>'"
    ]
    assert graph_sim.world.to_state() == state_before
    assert writes_sent(graph_sim) == []


async def test_quarantine_hidden_folder_not_listed(graph_sim: GraphSimulator) -> None:
    assert graph_sim.base_url is not None
    platform = GraphPlatform(adapter_settings(graph_sim.base_url))
    await platform.quarantine("alice@example.com", M1, "INC-1")
    await platform.close()

    async with await sim_client(graph_sim) as client:
        plain = await client.get("/v1.0/users/alice@example.com/mailFolders?$top=50")
        hidden = await client.get(
            "/v1.0/users/alice@example.com/mailFolders?$top=50&includeHiddenFolders=true"
        )

    assert HIDDEN not in [f["displayName"] for f in plain.json()["value"]]
    assert [
        f["isHidden"] for f in hidden.json()["value"] if f["displayName"] == HIDDEN
    ] == [True]


async def test_quarantine_upload_retry_reuses_draft(
    graph: GraphPlatform, graph_sim: GraphSimulator
) -> None:
    graph_sim.faults.add(
        {
            "path": r"^/v1\.0/users/quarantine@example\.com/messages/[^/]+/move$",
            "status": 500,
        }
    )

    with pytest.raises(TransientError):
        await graph.quarantine("alice@example.com", M1, "INC-1")
    stranded = [r["folder"] for r in evidence_of(graph_sim, M1)]
    await graph.quarantine("alice@example.com", M1, "INC-1")

    assert stranded == ["Drafts"]
    assert [r["folder"] for r in evidence_of(graph_sim, M1)] == ["INC-1"]
    assert [r["folder"] for r in copies_of(graph_sim, "alice@example.com", "M1")] == [
        HIDDEN
    ]


async def test_quarantine_second_incident_gets_own_evidence(
    graph: GraphPlatform, graph_sim: GraphSimulator
) -> None:
    await graph.quarantine("alice@example.com", M1, "INC-1")
    await graph.quarantine("bob@example.com", M1, "INC-9")

    assert sorted(r["folder"] for r in evidence_of(graph_sim, M1)) == ["INC-1", "INC-9"]


# --- restore --------------------------------------------------------------------------


async def test_restore_puts_copies_back_with_read_state(
    graph: GraphPlatform, graph_sim: GraphSimulator
) -> None:
    await graph.quarantine("bob@example.com", M1, "INC-1")
    await graph.quarantine("carol@example.com", M1, "INC-1")
    for item in graph_sim.world.items.values():  # read states changed while hidden
        if item.key == "M1":
            item.is_read = not item.is_read

    bob = await graph.restore("bob@example.com", M1, "INC-1")
    carol = await graph.restore("carol@example.com", M1, "INC-1")

    bob_rows = copies_of(graph_sim, "bob@example.com", "M1")
    carol_rows = copies_of(graph_sim, "carol@example.com", "M1")
    assert [(r["folder"], r["is_read"]) for r in bob_rows] == [("Inbox", True)]
    assert [(r["folder"], r["is_read"]) for r in carol_rows] == [("Projects", False)]
    assert [(c.folder, c.read) for c in bob.copies] == [("Inbox", True)]
    assert [(c.folder, c.read) for c in carol.copies] == [("Projects", False)]


async def test_restore_clears_marker(
    graph: GraphPlatform, graph_sim: GraphSimulator
) -> None:
    await graph.quarantine("alice@example.com", M1, "INC-1")

    await graph.restore("alice@example.com", M1, "INC-1")

    row = copies_of(graph_sim, "alice@example.com", "M1")[0]
    assert set(row["extended_properties"].values()) == {""}


async def test_restore_twice_is_already_done(graph: GraphPlatform) -> None:
    await graph.quarantine("dave@example.com", M2, "INC-2")
    first = await graph.restore("dave@example.com", M2, "INC-2")

    second = await graph.restore("dave@example.com", M2, "INC-2")

    assert sorted(c.folder for c in first.copies) == ["Inbox", "Junk Email"]
    assert second.already_done is True


async def test_restore_other_incident_leaves_copy(
    graph: GraphPlatform, graph_sim: GraphSimulator
) -> None:
    await graph.quarantine("alice@example.com", M1, "INC-1")

    result = await graph.restore("alice@example.com", M1, "INC-7")

    assert result.already_done is True
    assert [r["folder"] for r in copies_of(graph_sim, "alice@example.com", "M1")] == [
        HIDDEN
    ]


async def test_restore_missing_folder_goes_to_inbox(
    graph: GraphPlatform, graph_sim: GraphSimulator
) -> None:
    await graph.quarantine("carol@example.com", M1, "INC-1")
    box = graph_sim.world.mailbox("carol@example.com")
    projects = next(f for f in box.folders.values() if f.display_name == "Projects")
    for item in graph_sim.world.items_of("carol@example.com", projects.folder_id):
        item.folder_id = graph_sim.world.folder("carol@example.com", "inbox").folder_id
    del box.folders[projects.folder_id]

    result = await graph.restore("carol@example.com", M1, "INC-1")

    assert [r["folder"] for r in copies_of(graph_sim, "carol@example.com", "M1")] == [
        "Inbox"
    ]
    assert "Projects" in result.notes[0]


# --- restarts and crashes -------------------------------------------------------------


async def test_restart_from_state_file_keeps_work(scenario_path: Path) -> None:
    state = scenario_path.parent / "state.json"
    first = GraphSimulator(World.open(scenario_path, state))
    url = await first.start()
    platform = GraphPlatform(adapter_settings(url))
    await platform.quarantine("alice@example.com", M1, "INC-1")
    await platform.close()
    await first.stop()

    second = GraphSimulator(World.open(scenario_path, state))
    url = await second.start()
    platform = GraphPlatform(adapter_settings(url))
    try:
        again = await platform.quarantine("alice@example.com", M1, "INC-1")
        await platform.quarantine("bob@example.com", M1, "INC-1")
    finally:
        await platform.close()
        await second.stop()

    assert again.already_done is True
    assert [r["folder"] for r in evidence_of(second, M1)] == ["INC-1"]
    assert [r["folder"] for r in copies_of(second, "bob@example.com", "M1")] == [HIDDEN]


async def test_crash_before_move_finished_after_restart(scenario_path: Path) -> None:
    state = scenario_path.parent / "state.json"
    first = GraphSimulator(World.open(scenario_path, state))
    url = await first.start()
    first.faults.add(
        {
            "path": r"^/v1\.0/users/alice@example\.com/messages/[^/]+/move$",
            "status": 500,
        }
    )
    platform = GraphPlatform(adapter_settings(url))
    with pytest.raises(TransientError):
        await platform.quarantine("alice@example.com", M1, "INC-1")
    await platform.close()
    await first.stop()

    second = GraphSimulator(World.open(scenario_path, state))
    interrupted = copies_of(second, "alice@example.com", "M1")
    url = await second.start()
    platform = GraphPlatform(adapter_settings(url))
    try:
        result = await platform.quarantine("alice@example.com", M1, "INC-1")
    finally:
        await platform.close()
        await second.stop()

    assert [r["folder"] for r in interrupted] == ["Inbox"]
    assert marker_of(interrupted[0])["incident"] == "INC-1"
    assert result.already_done is False
    assert [r["folder"] for r in copies_of(second, "alice@example.com", "M1")] == [
        HIDDEN
    ]
    assert [r["folder"] for r in evidence_of(second, M1)] == ["INC-1"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def sim_process(scenario_path: Path) -> Iterator[tuple[list[str], Path]]:
    state = scenario_path.parent / "cli-state.json"
    command = [
        sys.executable,
        "-m",
        "autopull.sim",
        "graph",
        "--world",
        str(scenario_path),
        "--state",
        str(state),
    ]
    yield command, state


def start_process(command: list[str], port: int) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [*command, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "NO_PROXY": "127.0.0.1"},
    )
    assert process.stdout is not None
    deadline = time.monotonic() + 30
    for line in process.stdout:
        if "listening on" in line:
            return process
        if time.monotonic() > deadline:
            break
    process.kill()
    code = process.wait()
    process.stdout.close()
    raise AssertionError(f"The simulator did not start; it exited with {code}.")


def stop_process(process: subprocess.Popen[str]) -> int:
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=30)
    if process.stdout is not None:
        process.stdout.close()
    return code


async def test_cli_simulator_restart_keeps_state(
    sim_process: tuple[list[str], Path],
) -> None:
    command, state = sim_process
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    process = start_process(command, port)
    platform = GraphPlatform(adapter_settings(url))
    try:
        await platform.quarantine("dave@example.com", M2, "INC-2")
    finally:
        await platform.close()
        first_exit = stop_process(process)

    process = start_process(command, port)
    platform = GraphPlatform(adapter_settings(url))
    try:
        hidden = await platform.find_quarantined("dave@example.com", M2)
        again = await platform.quarantine("dave@example.com", M2, "INC-2")
    finally:
        await platform.close()
        second_exit = stop_process(process)

    assert first_exit == 0
    assert second_exit == 0
    assert len(hidden) == 2
    assert again.already_done is True
    assert state.exists()


# --- throttling, concurrency, failures ------------------------------------------------


async def test_throttle_burst_raises_throttled_error(
    graph: GraphPlatform, graph_sim: GraphSimulator
) -> None:
    graph_sim.faults.add(
        {
            "path": r"^/v1\.0/users/erin@example\.com/messages$",
            "status": 429,
            "count": 4,
            "retry_after": 1,
        }
    )

    throttled: list[None] = []
    graph.throttle_listener = lambda: throttled.append(None)

    with pytest.raises(ThrottledError) as caught:
        await graph.find("erin@example.com", "spam-0001@promo.example.net")

    assert len(throttled) == 4
    attempts = [
        e.retry_attempt for e in graph_sim.log if e.mailbox == "erin@example.com"
    ]
    assert caught.value.retry_after == 1.0
    assert caught.value.mailbox == "erin@example.com"
    assert attempts == [None, "1", "2", "3"]


async def test_throttle_within_kiota_retries_recovers(
    graph: GraphPlatform, graph_sim: GraphSimulator
) -> None:
    graph_sim.faults.add(
        {
            "path": r"^/v1\.0/users/erin@example\.com/messages$",
            "status": 503,
            "retry_after": 1,
        }
    )

    throttled: list[None] = []
    graph.throttle_listener = lambda: throttled.append(None)

    copies = await graph.find("erin@example.com", "spam-0001@promo.example.net")

    assert [c.folder for c in copies] == ["Inbox"]
    assert len(throttled) == 1


async def test_adapter_keeps_mailbox_concurrency(
    graph: GraphPlatform, graph_sim: GraphSimulator
) -> None:
    graph_sim.settings.latency_ms = 20

    await asyncio.gather(*(graph.find("dave@example.com", M2) for _ in range(10)))

    assert [e.status for e in graph_sim.log if e.status == 429] == []
    assert 1 < graph_sim.throttle.peak_in_flight["dave@example.com"] <= 4


async def test_dropped_connection_is_transient(
    graph: GraphPlatform, graph_sim: GraphSimulator
) -> None:
    graph_sim.faults.add({"path": r"/users/frank@example\.com/messages$", "drop": True})

    with pytest.raises(TransientError) as caught:
        await graph.find("frank@example.com", M1)

    assert not isinstance(caught.value, ThrottledError)


async def test_gateway_page_without_body_is_transient(
    graph: GraphPlatform, graph_sim: GraphSimulator
) -> None:
    graph_sim.faults.add(
        {
            "path": r"/users/frank@example\.com/messages$",
            "status": 502,
            "empty_body": True,
        }
    )

    with pytest.raises(TransientError):
        await graph.find("frank@example.com", M1)


async def test_expired_token_fetched_again(
    graph: GraphPlatform, graph_sim: GraphSimulator
) -> None:
    await graph.find("frank@example.com", M1)
    graph_sim.tokens.wall_clock = lambda: time.time() + 7200

    copies = await graph.find("frank@example.com", M1)

    token_requests = [e for e in graph_sim.log if e.path.endswith("/token")]
    assert copies == []
    assert len(token_requests) == 2


async def test_bad_secret_permanent_and_not_shown(
    graph_sim: GraphSimulator, caplog: pytest.LogCaptureFixture
) -> None:
    assert graph_sim.base_url is not None
    secret = "wrong-secret-7f3a9c"
    platform = GraphPlatform(adapter_settings(graph_sim.base_url, client_secret=secret))
    caplog.set_level(logging.DEBUG)

    with pytest.raises(PermanentError) as caught:
        await platform.find("alice@example.com", M1)
    await platform.close()

    assert "invalid_client" in str(caught.value)
    assert secret not in str(caught.value)
    assert secret not in caplog.text
    assert secret not in repr(platform.settings)


async def test_token_never_logged(
    graph: GraphPlatform, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    await graph.find("alice@example.com", M1)

    token = graph._tokens._token
    assert token
    assert token not in caplog.text
    assert make_scenario()["tenants"][0]["client_secret"] not in caplog.text


@pytest.fixture
def read_only_scenario(tmp_path: Path) -> Path:
    scenario = make_scenario()
    scenario["tenants"][0]["permissions"] = ["Mail.Read"]
    path = tmp_path / "read-only.json"
    path.write_text(json.dumps(scenario), encoding="utf-8")
    return path


async def test_missing_permission_is_permanent(read_only_scenario: Path) -> None:
    simulator = GraphSimulator(World.open(read_only_scenario, None))
    url = await simulator.start()
    platform = GraphPlatform(adapter_settings(url))
    try:
        with pytest.raises(PermanentError, match="ErrorAccessDenied"):
            await platform.quarantine("alice@example.com", M1, "INC-1")
    finally:
        await platform.close()
        await simulator.stop()


async def test_plain_http_token_refused_off_loopback() -> None:
    settings = adapter_settings("http://graph.example.com")
    platform = GraphPlatform(settings)
    try:
        with pytest.raises(PermanentError, match="https"):
            await platform._tokens.get_authorization_token(
                "http://graph.example.com/v1.0/users"
            )
        token = await platform._tokens.get_authorization_token(
            "https://other.example.com/v1.0/users"
        )
    finally:
        await platform.close()

    assert token == ""


# --- the error mapping ----------------------------------------------------------------


def odata_error(status: int, code: str, retry_after: str | None = None) -> ODataError:
    error = ODataError(error=MainError(code=code, message=f"{code} happened."))
    error.response_status_code = status
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    error.response_headers = httpx.Headers(headers)  # type: ignore[assignment]
    return error


def api_error(status: int | None) -> APIError:
    return APIError("The error body could not be parsed", status, {})


REQUEST = httpx.Request("GET", "http://127.0.0.1/v1.0/users/a@example.com/messages")

MAPPING_CASES: list[tuple[str, BaseException, type[ConnectorError], float | None]] = [
    (
        "429 throttled",
        odata_error(429, "ApplicationThrottled", "7"),
        ThrottledError,
        7.0,
    ),
    ("429 no header", odata_error(429, "TooManyRequests"), ThrottledError, None),
    (
        "503 retry-after",
        odata_error(503, "ServiceUnavailable", "3"),
        ThrottledError,
        3.0,
    ),
    ("503 plain", odata_error(503, "ServiceUnavailable"), TransientError, None),
    ("504", odata_error(504, "GatewayTimeout"), TransientError, None),
    ("500", odata_error(500, "InternalServerError"), TransientError, None),
    ("server busy", odata_error(500, "ErrorServerBusy", "2"), ThrottledError, 2.0),
    ("401", odata_error(401, "InvalidAuthenticationToken"), PermanentError, None),
    ("403", odata_error(403, "ErrorAccessDenied"), PermanentError, None),
    ("404 item", odata_error(404, "ErrorItemNotFound"), NotFoundError, None),
    ("404 user", odata_error(404, "ErrorInvalidUser"), PermanentError, None),
    (
        "on-premises",
        odata_error(404, "MailboxNotEnabledForRESTAPI"),
        PermanentError,
        None,
    ),
    ("400", odata_error(400, "BadRequest"), PermanentError, None),
    ("400 bad id", odata_error(400, "ErrorInvalidIdMalformed"), PermanentError, None),
    ("413 too large", odata_error(413, "RequestEntityTooLarge"), PermanentError, None),
    (
        "409 conflict",
        odata_error(409, "ErrorIrresolvableConflict"),
        TransientError,
        None,
    ),
    ("502 no body", api_error(502), TransientError, None),
    ("no status", api_error(None), TransientError, None),
    ("400 no body", api_error(400), PermanentError, None),
    ("connect", httpx.ConnectError("refused", request=REQUEST), TransientError, None),
    ("read timeout", httpx.ReadTimeout("slow", request=REQUEST), TransientError, None),
    ("pool timeout", httpx.PoolTimeout("full", request=REQUEST), TransientError, None),
    (
        "dropped",
        httpx.RemoteProtocolError("closed", request=REQUEST),
        TransientError,
        None,
    ),
    (
        "bad scheme",
        httpx.UnsupportedProtocol("ftp", request=REQUEST),
        PermanentError,
        None,
    ),
    ("timeout", TimeoutError(), TransientError, None),
    ("unexpected", ValueError("bad value"), PermanentError, None),
]


@pytest.mark.parametrize(
    ("error", "expected", "retry_after"),
    [case[1:] for case in MAPPING_CASES],
    ids=[case[0] for case in MAPPING_CASES],
)
def test_map_graph_error_classifies(
    error: BaseException, expected: type[ConnectorError], retry_after: float | None
) -> None:
    mapped = map_graph_error(error, mailbox="a@example.com", message_id="m@example.net")

    assert type(mapped) is expected
    assert mapped.mailbox == "a@example.com"
    assert mapped.message_id == "m@example.net"
    assert mapped.platform == "graph"
    assert getattr(mapped, "retry_after", None) == retry_after


def test_map_graph_error_invalid_user_names_mailbox_once() -> None:
    error = odata_error(404, "ErrorInvalidUser")

    mapped = map_graph_error(error, mailbox="a@example.com")

    assert "mailbox a@example.com" in str(mapped)
    assert "mailbox mailbox" not in str(mapped)


def test_map_graph_error_invalid_user_marks_mailbox_missing() -> None:
    user = map_graph_error(odata_error(404, "ErrorInvalidUser"), mailbox="a@x.com")
    item = map_graph_error(odata_error(404, "ErrorItemNotFound"), mailbox="a@x.com")

    assert user.mailbox_missing is True
    assert item.mailbox_missing is False


def test_map_graph_error_passes_own_errors() -> None:
    own = PermanentError("Already classified.")

    assert map_graph_error(own) is own


def test_map_graph_error_message_names_mailbox() -> None:
    mapped = map_graph_error(
        odata_error(404, "ErrorItemNotFound"), mailbox="a@example.com"
    )

    assert "a@example.com" in str(mapped)
    assert "ErrorItemNotFound" in str(mapped)


def test_parse_retry_after_forms() -> None:
    now = datetime(2026, 12, 1, 10, 0, 0, tzinfo=UTC)

    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("0") == 0.0
    assert parse_retry_after("Tue, 01 Dec 2026 10:00:05 GMT", now) == 5.0
    assert parse_retry_after("Tue, 01 Dec 2026 09:00:00 GMT", now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_filter_doubles_quotes_and_adds_brackets() -> None:
    assert internet_message_id_filter("a'or'b@example.net") == (
        "internetMessageId eq '<a''or''b@example.net>'"
    )


# --- the simulator's protocol, as the adapter relies on it ----------------------------


async def sim_client(sim: GraphSimulator) -> httpx.AsyncClient:
    assert sim.base_url is not None
    tenant = make_scenario()["tenants"][0]
    async with httpx.AsyncClient(base_url=sim.base_url) as client:
        response = await client.post(
            f"/{tenant['tenant_id']}/oauth2/v2.0/token",
            data={
                "grant_type": "client_credentials",
                "client_id": tenant["client_id"],
                "client_secret": tenant["client_secret"],
                "scope": "https://graph.microsoft.com/.default",
            },
        )
    token = response.json()["access_token"]
    return httpx.AsyncClient(
        base_url=sim.base_url, headers={"Authorization": f"Bearer {token}"}
    )


async def test_sim_raw_plus_decoded_as_space(graph_sim: GraphSimulator) -> None:
    raw = "internetMessageId%20eq%20'<CAH7x+q/Lk=Zp''8%23w%2541%26r@mail.example.net>'"

    async with await sim_client(graph_sim) as client:
        response = await client.get(
            f"/v1.0/users/dave@example.com/messages?$filter={raw}"
        )

    assert response.json()["value"] == []
    assert graph_sim.log[-1].query["$filter"] == M2_FILTER.replace("+", " ")


async def test_sim_rejects_missing_token(graph_sim: GraphSimulator) -> None:
    assert graph_sim.base_url is not None
    async with httpx.AsyncClient(base_url=graph_sim.base_url) as client:
        response = await client.get("/v1.0/users/alice@example.com/messages")

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "InvalidAuthenticationToken"


async def test_sim_token_bad_secret_invalid_client(graph_sim: GraphSimulator) -> None:
    assert graph_sim.base_url is not None
    tenant = make_scenario()["tenants"][0]
    async with httpx.AsyncClient(base_url=graph_sim.base_url) as client:
        response = await client.post(
            f"/{tenant['tenant_id']}/oauth2/v2.0/token",
            data={
                "grant_type": "client_credentials",
                "client_id": tenant["client_id"],
                "client_secret": "nope",
                "scope": "https://graph.microsoft.com/.default",
            },
        )

    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("$filter=internetMessageId eq 'abc", "unterminated string"),
        ("$filter=isRead eq 'yes'", "incompatible types"),
        ("$filter=colour eq 'blue'", "Could not find a property named 'colour'"),
        ("$filter=internetMessageId eq", "Syntax error"),
        ("$top=1&%24top=2", "specified more than once"),
        ("$top=-1", "non-negative integer"),
    ],
)
async def test_sim_rejects_bad_query(
    graph_sim: GraphSimulator, query: str, message: str
) -> None:
    async with await sim_client(graph_sim) as client:
        response = await client.get(f"/v1.0/users/alice@example.com/messages?{query}")

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "BadRequest"
    assert message in response.json()["error"]["message"]


async def test_sim_concurrency_limit_answers_429(graph_sim: GraphSimulator) -> None:
    graph_sim.settings.latency_ms = 500

    async with await sim_client(graph_sim) as client:
        responses = await asyncio.gather(
            *(
                client.get("/v1.0/users/bob@example.com/mailFolders/inbox")
                for _ in range(6)
            )
        )

    throttled = [r for r in responses if r.status_code == 429]
    assert sorted(r.status_code for r in responses) == [200, 200, 200, 200, 429, 429]
    assert throttled[0].headers["Retry-After"] == "1"
    assert throttled[0].json()["error"]["message"] == (
        "Application is over its MailboxConcurrency limit."
    )


async def test_sim_request_window_answers_429(graph_sim: GraphSimulator) -> None:
    graph_sim.settings.window_requests = 3

    async with await sim_client(graph_sim) as client:
        statuses = [
            (
                await client.get("/v1.0/users/bob@example.com/mailFolders/inbox")
            ).status_code
            for _ in range(4)
        ]
        other = await client.get("/v1.0/users/alice@example.com/mailFolders/inbox")

    assert statuses == [200, 200, 200, 429]
    assert other.status_code == 200


async def test_sim_move_gives_201_and_new_id(graph_sim: GraphSimulator) -> None:
    old_id = copies_of(graph_sim, "alice@example.com", "M1")[0]["id"]

    async with await sim_client(graph_sim) as client:
        moved = await client.post(
            f"/v1.0/users/alice@example.com/messages/{old_id}/move",
            json={"destinationId": "junkemail"},
        )
        old = await client.get(f"/v1.0/users/alice@example.com/messages/{old_id}")

    assert moved.status_code == 201
    assert moved.json()["id"] != old_id
    assert old.status_code == 404
    assert old.json()["error"]["code"] == "ErrorItemNotFound"


async def test_sim_duplicate_folder_answers_folder_exists(
    graph_sim: GraphSimulator,
) -> None:
    graph_sim.settings.folder_exists_status = 409

    async with await sim_client(graph_sim) as client:
        response = await client.post(
            "/v1.0/users/carol@example.com/mailFolders",
            json={"displayName": "projects"},
        )

    assert response.status_code == 409
    assert response.json()["error"]["code"] == "ErrorFolderExists"


async def test_sim_mime_upload_becomes_draft(graph_sim: GraphSimulator) -> None:
    import base64

    mime = b"Message-ID: <up@example.net>\r\nSubject: Up\r\n\r\nbody\r\n"
    async with await sim_client(graph_sim) as client:
        response = await client.post(
            "/v1.0/users/frank@example.com/messages",
            content=base64.b64encode(mime),
            headers={"Content-Type": "text/plain"},
        )

    row = next(
        r
        for r in graph_sim.world.snapshot("frank@example.com")
        if r["internet_message_id"] == "<up@example.net>"
    )
    assert response.status_code == 201
    assert response.json()["isDraft"] is True
    assert row["folder"] == "Drafts"


async def test_sim_messages_skip_recoverable_items(graph_sim: GraphSimulator) -> None:
    old_id = copies_of(graph_sim, "alice@example.com", "M1")[0]["id"]

    async with await sim_client(graph_sim) as client:
        deleted = await client.delete(
            f"/v1.0/users/alice@example.com/messages/{old_id}"
        )
        listed = await client.get(
            "/v1.0/users/alice@example.com/messages",
            params={"$filter": f"internetMessageId eq '<{M1}>'"},
        )
        recoverable = await client.get(
            "/v1.0/users/alice@example.com/mailFolders/recoverableitemsdeletions/messages"
        )

    assert deleted.status_code == 204
    assert listed.json()["value"] == []
    assert [m["internetMessageId"] for m in recoverable.json()["value"]] == [f"<{M1}>"]


async def test_sim_expand_marker_by_id(graph_sim: GraphSimulator) -> None:
    item_id = copies_of(graph_sim, "alice@example.com", "M1")[0]["id"]
    expand = f"singleValueExtendedProperties($filter=id eq '{MARKER_PROPERTY_ID}')"

    async with await sim_client(graph_sim) as client:
        await client.patch(
            f"/v1.0/users/alice@example.com/messages/{item_id}",
            json={
                "singleValueExtendedProperties": [
                    {"id": MARKER_PROPERTY_ID, "value": "v1"},
                    {
                        "id": "String {11111111-2222-3333-4444-555555555555} Name X",
                        "value": "x",
                    },
                ]
            },
        )
        response = await client.get(
            f"/v1.0/users/alice@example.com/messages/{item_id}",
            params={"$expand": expand},
        )

    properties = response.json()["singleValueExtendedProperties"]
    assert [p["value"] for p in properties] == ["v1"]
    assert re.fullmatch(
        r"String \{[0-9a-f-]{36}\} Name AutopullQuarantine", properties[0]["id"]
    )
