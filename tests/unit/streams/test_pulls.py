import asyncio
import dataclasses
from datetime import UTC, datetime

import httpx
import pytest
from kiota_abstractions.api_error import APIError
from msgraph.generated.models.o_data_errors.main_error import MainError
from msgraph.generated.models.o_data_errors.o_data_error import ODataError

from autopull.connectors.errors import (
    NotFoundError,
    PermanentError,
    ThrottledError,
)
from autopull.connectors.mail.base import MailPlatform, MessageCopy, QuarantineResult
from autopull.connectors.mail.graph import map_graph_error
from autopull.streams.metrics import Metrics
from autopull.streams.pulls import RetryPolicy, execute, execute_many

FAST = RetryPolicy(max_attempts=3, max_wait_seconds=0.05, base_wait_seconds=0.001)


class ScriptedPlatform(MailPlatform):
    """Answers each quarantine call with the next scripted result or error."""

    name = "scripted"

    def __init__(self, *answers):
        self.answers = list(answers)
        self.calls = 0

    async def find(self, mailbox, message_id):
        return []

    async def quarantine(self, mailbox, message_id, incident_id):
        self.calls += 1
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def restore(self, mailbox, message_id, incident_id):
        return await self.quarantine(mailbox, message_id, incident_id)


def command(kind="quarantine"):
    return {
        "command_id": "cmd-1",
        "incident_id": "INC-1",
        "kind": kind,
        "mailbox": "alice@example.com",
        "message_id": "m1@example.net",
        "alert_id": "tap:1",
        "alert_received_at": datetime(2026, 12, 1, tzinfo=UTC),
        "issued_at": datetime(2026, 12, 1, tzinfo=UTC),
        "recipient_type": "original",
        "reason": "",
        "attempt": 1,
        "not_before": None,
    }


def done(already=False):
    copy = MessageCopy("alice@example.com", "m1@example.net", "id1", "Inbox", True)
    return QuarantineResult(
        "alice@example.com", "m1@example.net", (copy,), already_done=already
    )


async def test_quarantine_success_reports_copy_facts():
    platform = ScriptedPlatform(done())
    result = await execute(command(), lambda m: platform, FAST)
    assert result.outcome["status"] == "quarantined"
    assert result.outcome["original_folder"] == "Inbox"
    assert result.outcome["read"] is True
    assert result.outcome["copies"] == 1
    assert result.outcome["error_class"] == "none"
    assert result.parked is None


async def test_throttling_is_retried_then_succeeds():
    platform = ScriptedPlatform(ThrottledError("slow down", retry_after=0.01), done())
    result = await execute(command(), lambda m: platform, FAST)
    assert result.outcome["status"] == "quarantined"
    assert result.outcome["attempts"] == 2
    assert platform.calls == 2


async def test_throttling_past_attempts_parks_command():
    errors = [ThrottledError("slow down", retry_after=0.01) for _ in range(3)]
    platform = ScriptedPlatform(*errors)
    result = await execute(command(), lambda m: platform, FAST)
    assert result.outcome["status"] == "throttled"
    assert result.outcome["retry_at"] is not None
    assert result.parked is not None
    assert result.parked["attempt"] == 2
    assert result.parked["not_before"] == result.outcome["retry_at"]


def graph_error(status, code="", retry_after=None):
    """Return what msgraph-sdk raises for a status, with an OData body when coded."""
    if not code:
        return APIError("The error body could not be parsed", status, {})
    error = ODataError(error=MainError(code=code, message=f"{code} happened."))
    error.response_status_code = status
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    error.response_headers = httpx.Headers(headers)
    return error


REQUEST = httpx.Request("GET", "http://127.0.0.1:9/v1.0/users/alice@example.com")

# Upstream errors of a pull that keeps failing, the outcome's error class, and
# whether the throttled metric counts it.
PARKED_CASES = [
    ("429", graph_error(429, "TooManyRequests", "1"), "throttled", True),
    ("503 retry-after", graph_error(503, "ServiceUnavailable", "1"), "throttled", True),
    ("throttling code", graph_error(500, "ErrorServerBusy", "1"), "throttled", True),
    ("connect", httpx.ConnectError("refused", request=REQUEST), "transient", False),
    ("500 empty body", graph_error(500), "transient", False),
    ("503 plain", graph_error(503, "ServiceUnavailable"), "transient", False),
    ("read timeout", httpx.ReadTimeout("slow", request=REQUEST), "transient", False),
]


@pytest.mark.parametrize(
    ("upstream", "error_class", "counted"),
    [case[1:] for case in PARKED_CASES],
    ids=[case[0] for case in PARKED_CASES],
)
async def test_parked_pull_error_class(upstream, error_class, counted):
    errors = [map_graph_error(upstream, mailbox="alice@example.com") for _ in range(3)]
    platform = ScriptedPlatform(*errors)
    metrics = Metrics()

    result = await execute(command(), lambda m: platform, FAST)
    metrics.record_outcome(result.outcome)

    assert result.outcome["status"] == "throttled"
    assert result.outcome["error_class"] == error_class
    assert result.parked is not None
    throttled = metrics.registry.get_sample_value(
        "autopull_platform_throttled_total", {"platform": "scripted"}
    )
    assert throttled == (1.0 if counted else None)


async def test_permanent_error_fails_without_retry():
    platform = ScriptedPlatform(PermanentError("no rights"))
    result = await execute(command(), lambda m: platform, FAST)
    assert result.outcome["status"] == "failed"
    assert result.outcome["error_class"] == "permanent"
    assert result.outcome["error"] == "no rights"
    assert platform.calls == 1


async def test_missing_message_is_not_found():
    platform = ScriptedPlatform(NotFoundError("gone"))
    result = await execute(command(), lambda m: platform, FAST)
    assert result.outcome["status"] == "not_found"
    assert result.outcome["mailbox_missing"] is False


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (PermanentError("no such user", mailbox_missing=True), "failed"),
        (NotFoundError("no such mailbox", mailbox_missing=True), "not_found"),
    ],
)
async def test_missing_mailbox_reaches_outcome(error, status):
    platform = ScriptedPlatform(error)
    result = await execute(command(), lambda m: platform, FAST)
    assert result.outcome["status"] == status
    assert result.outcome["mailbox_missing"] is True


async def test_ledger_hit_skips_platform():
    platform = ScriptedPlatform()
    ledger = {"status": "quarantined"}
    result = await execute(command(), lambda m: platform, FAST, ledger)
    assert result.outcome["status"] == "already_quarantined"
    assert platform.calls == 0


async def test_unrouted_mailbox_fails_with_reason():
    result = await execute(command(), lambda m: None, FAST)
    assert result.outcome["status"] == "failed"
    assert "alice@example.com" in result.outcome["error"]


@pytest.mark.parametrize(
    ("already", "status"), [(False, "restored"), (True, "restored")]
)
async def test_restore_reports_restored(already, status):
    platform = ScriptedPlatform(done(already))
    result = await execute(command("restore"), lambda m: platform, FAST)
    assert result.outcome["status"] == status


async def test_unknown_kind_touches_nothing():
    platform = ScriptedPlatform(done())
    result = await execute(command("unknown"), lambda m: platform, FAST)
    assert result.outcome["status"] == "failed"
    assert result.outcome["error_class"] == "permanent"
    assert platform.calls == 0


async def test_unfinished_removal_is_not_quarantined():
    copy = MessageCopy("alice@example.com", "m1@example.net", "7", "INBOX", False)
    result = QuarantineResult(
        "alice@example.com",
        "m1@example.net",
        (copy,),
        notes=("The server supports neither MOVE nor UIDPLUS.",),
        unfinished=(copy,),
    )
    platform = ScriptedPlatform(result)
    pulled = await execute(command(), lambda m: platform, FAST)
    assert pulled.outcome["status"] == "failed"
    assert pulled.outcome["error_class"] == "permanent"
    assert "neither MOVE nor UIDPLUS" in pulled.outcome["error"]
    assert pulled.outcome["copies"] == 1
    assert pulled.outcome["original_folder"] == "INBOX"


async def test_broken_platform_setup_fails_the_pull():
    def route(mailbox):
        raise ValueError("Allowed host value cannot be empty")

    result = await execute(command(), route, FAST)
    assert result.outcome["status"] == "failed"
    assert "could not be set up" in result.outcome["error"]
    assert "Allowed host value cannot be empty" in result.outcome["error"]


async def test_restore_without_marked_copy_is_not_found():
    platform = ScriptedPlatform(
        QuarantineResult("alice@example.com", "m1@example.net", (), already_done=True)
    )
    result = await execute(command("restore"), lambda m: platform, FAST)
    assert result.outcome["status"] == "not_found"
    assert result.outcome["error_class"] == "not_found"


class StalledPlatform(ScriptedPlatform):
    """Never answers the first `stalls` calls, then answers like ScriptedPlatform."""

    def __init__(self, stalls, *answers):
        super().__init__(*answers)
        self.stalls = stalls

    async def quarantine(self, mailbox, message_id, incident_id):
        if self.stalls > 0:
            self.stalls -= 1
            self.calls += 1
            await asyncio.Event().wait()
        return await super().quarantine(mailbox, message_id, incident_id)


BOUNDED = dataclasses.replace(FAST, attempt_timeout_seconds=0.05)


async def test_stalled_attempt_is_retried():
    platform = StalledPlatform(1, done())
    result = await asyncio.wait_for(execute(command(), lambda m: platform, BOUNDED), 5)
    assert result.outcome["status"] == "quarantined"
    assert result.outcome["attempts"] == 2
    assert platform.calls == 2


async def test_always_stalled_pull_is_parked():
    platform = StalledPlatform(3)
    result = await asyncio.wait_for(execute(command(), lambda m: platform, BOUNDED), 5)
    assert result.outcome["status"] == "throttled"
    assert result.outcome["error_class"] == "transient"
    assert "timed out after 0.05 s" in result.outcome["error"]
    assert result.outcome["attempts"] == 3
    assert result.parked is not None
    assert result.parked["attempt"] == 2


# --- execute_many: bursts ---------------------------------------------------------


class BurstPlatform(ScriptedPlatform):
    """A platform with burst outcomes from a table by mailbox, singles scripted."""

    name = "burst"

    def __init__(self, burst, *answers):
        super().__init__(*answers)
        self.burst = burst
        self.bursts = []

    async def quarantine_many(self, pulls):
        self.bursts.append([mailbox for mailbox, _, _ in pulls])
        return [self.burst[mailbox] for mailbox, _, _ in pulls]


def command_for(mailbox, kind="quarantine"):
    return dict(command(kind), mailbox=mailbox, command_id=f"cmd-{mailbox}")


def copy_of(mailbox):
    copy = MessageCopy(mailbox, "m1@example.net", "id1", "Inbox", False)
    return QuarantineResult(mailbox, "m1@example.net", copies=(copy,))


async def test_execute_many_sends_quarantines_as_burst():
    platform = BurstPlatform({"a@x": copy_of("a@x"), "b@x": copy_of("b@x")})
    commands = [command_for("a@x"), command_for("b@x")]

    results = await execute_many(commands, lambda m: platform, FAST)

    assert platform.bursts == [["a@x", "b@x"]]
    assert platform.calls == 0
    assert [r.outcome["status"] for r in results] == ["quarantined", "quarantined"]
    assert [r.outcome["mailbox"] for r in results] == ["a@x", "b@x"]
    assert [r.outcome["attempts"] for r in results] == [1, 1]


async def test_execute_many_retries_transient_alone():
    throttled = ThrottledError("slow down", retry_after=0.01, mailbox="b@x")
    platform = BurstPlatform({"a@x": copy_of("a@x"), "b@x": throttled}, copy_of("b@x"))
    commands = [command_for("a@x"), command_for("b@x")]

    results = await execute_many(commands, lambda m: platform, FAST)

    assert platform.calls == 1
    assert results[1].outcome["status"] == "quarantined"
    assert results[1].outcome["attempts"] == 2


async def test_execute_many_reports_permanent_from_burst():
    denied = PermanentError("denied", mailbox="b@x")
    platform = BurstPlatform({"a@x": copy_of("a@x"), "b@x": denied})
    commands = [command_for("a@x"), command_for("b@x")]

    results = await execute_many(commands, lambda m: platform, FAST)

    assert platform.calls == 0
    assert results[1].outcome["status"] == "failed"
    assert results[1].outcome["error"] == "denied"


async def test_execute_many_runs_restores_and_single_alone():
    platform = BurstPlatform({}, copy_of("a@x"), copy_of("b@x"))
    commands = [command_for("a@x"), command_for("b@x", kind="restore")]

    results = await execute_many(commands, lambda m: platform, FAST)

    assert platform.bursts == []
    assert platform.calls == 2
    assert [r.outcome["kind"] for r in results] == ["quarantine", "restore"]


async def test_execute_many_skips_ledger_done_copies():
    platform = BurstPlatform({"a@x": copy_of("a@x"), "c@x": copy_of("c@x")})
    commands = [command_for("a@x"), command_for("b@x"), command_for("c@x")]
    entries = [None, {"status": "quarantined"}, None]

    results = await execute_many(commands, lambda m: platform, FAST, entries)

    assert platform.bursts == [["a@x", "c@x"]]
    assert results[1].outcome["status"] == "already_quarantined"


# --- searched commands ------------------------------------------------------------


class SearchPlatform(BurstPlatform):
    """A burst platform whose search returns copies from a table by mailbox."""

    def __init__(self, found, *answers):
        super().__init__({}, *answers)
        self.found = found
        self.quarantined = []

    async def search(self, mailbox, search):
        return self.found[mailbox]

    async def quarantine(self, mailbox, message_id, incident_id):
        self.quarantined.append((mailbox, message_id))
        return await super().quarantine(mailbox, message_id, incident_id)


def searched_command(mailbox):
    moment = datetime(2026, 12, 1, tzinfo=UTC)
    search = {
        "senders": ["billing@example.net"],
        "subject": "Invoice",
        "received_after": moment,
        "received_before": moment,
    }
    return dict(command_for(mailbox), message_id="q1@no-message-id", search=search)


def found(mailbox, message_id, folder="Inbox"):
    return MessageCopy(mailbox, message_id, f"id-{folder}", folder, False)


async def test_execute_many_runs_searched_alone():
    platform = SearchPlatform(
        {"a@x": [found("a@x", "real-a")], "b@x": [found("b@x", "real-b")]},
        copy_of("a@x"),
        copy_of("b@x"),
    )
    commands = [searched_command("a@x"), searched_command("b@x")]

    results = await execute_many(commands, lambda m: platform, FAST)

    assert platform.bursts == []
    assert platform.quarantined == [("a@x", "real-a"), ("b@x", "real-b")]
    assert [r.outcome["resolved_message_id"] for r in results] == ["real-a", "real-b"]
    assert [r.outcome["message_id"] for r in results] == ["q1@no-message-id"] * 2


async def test_searched_one_message_two_folders_pulls():
    platform = SearchPlatform(
        {"a@x": [found("a@x", "real-a"), found("a@x", "real-a", "Archive")]},
        copy_of("a@x"),
    )

    result = await execute(searched_command("a@x"), lambda m: platform, FAST)

    assert result.outcome["status"] == "quarantined"
    assert platform.quarantined == [("a@x", "real-a")]


@pytest.mark.parametrize(
    ("copies", "reason"),
    [
        ([], "No message in a@x"),
        ([found("a@x", "one"), found("a@x", "two")], "2 different messages"),
        ([found("a@x", "")], "has no Message-ID"),
        ([found("a@x", ""), found("a@x", "")], "2 messages in a@x match"),
    ],
)
async def test_searched_not_unique_held(copies, reason):
    platform = SearchPlatform({"a@x": copies})

    result = await execute(searched_command("a@x"), lambda m: platform, FAST)

    assert result.outcome["status"] == "held"
    assert reason in result.outcome["error"]
    assert platform.quarantined == []
    assert [c["message_id"] for c in result.outcome["candidates"]] == [
        copy.message_id for copy in copies
    ]


async def test_searched_without_search_support_held():
    platform = ScriptedPlatform()

    result = await execute(searched_command("a@x"), lambda m: platform, FAST)

    assert result.outcome["status"] == "held"
    assert "cannot search" in result.outcome["error"]
    assert platform.calls == 0


async def test_quarantine_mailbox_never_touched():
    platform = ScriptedPlatform(done())
    evidence = dict(command(), mailbox="Quarantine@Example.com")
    result = await execute(
        evidence, lambda m: platform, FAST, None, frozenset({"quarantine@example.com"})
    )
    assert platform.calls == 0
    assert result.outcome["status"] == "skipped"
    assert result.outcome["error_class"] == "permanent"
    assert "quarantine mailbox" in result.outcome["error"]


async def test_burst_leaves_quarantine_mailbox_out():
    class BurstPlatform(ScriptedPlatform):
        def __init__(self):
            super().__init__()
            self.burst_mailboxes = []

        async def quarantine_many(self, pulls):
            self.burst_mailboxes += [mailbox for mailbox, _, _ in pulls]
            return [
                QuarantineResult(mailbox, message_id, already_done=True)
                for mailbox, message_id, _ in pulls
            ]

    platform = BurstPlatform()
    commands = [
        dict(command(), command_id=f"cmd-{n}", mailbox=mailbox)
        for n, mailbox in enumerate(
            ["alice@example.com", "quarantine@example.com", "bob@example.com"]
        )
    ]
    results = await execute_many(
        commands,
        lambda m: platform,
        FAST,
        None,
        frozenset({"quarantine@example.com"}),
    )
    assert platform.burst_mailboxes == ["alice@example.com", "bob@example.com"]
    assert platform.calls == 0
    assert [r.outcome["status"] for r in results] == [
        "already_quarantined",
        "skipped",
        "already_quarantined",
    ]


async def test_execute_many_leaves_searches_to_execute():
    platform = BurstPlatform({"a@x": copy_of("a@x"), "c@x": copy_of("c@x")})
    searched = dict(command_for("b@x"), search={"senders": ["s@x"]})
    commands = [command_for("a@x"), searched, command_for("c@x")]

    await execute_many(commands, lambda m: platform, FAST)

    assert platform.bursts == [["a@x", "c@x"]]
