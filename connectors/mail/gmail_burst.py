"""Quarantine many Gmail mailboxes at once through Gmail's HTTP batch endpoint.

`GmailPlatform.quarantine` sends about a dozen requests per mailbox, one after
another. A burst runs the same steps as phases over every pull: find (labels.list
and messages.list), read each copy's labels (messages.get), create the record
labels, put them on the copies, trash or delete the originals, and verify. Each
phase packs its requests, one or more per mailbox, into batches of at most
`batch_size` parts, so a phase costs about one round trip however many mailboxes
it covers. The copy in the quarantine mailbox, one per distinct message and
incident, is made and verified by requests that ride in the same phases.

Every part carries its own mailbox's token and counts against that mailbox's
quota, as Gmail counts batch parts. A pull whose part fails, or whose search runs
over one page, leaves the burst and goes through `GmailPlatform.quarantine`, which
retries with the adapter's back-off, so the burst never reports less than the
one-mailbox path would.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from email import message_from_bytes
from email.policy import compat32
from typing import TYPE_CHECKING, Any

from ..errors import ConnectorError, NotFoundError, PermanentError, TransientError
from .base import QuarantineResult, required_message_id

if TYPE_CHECKING:
    from .gmail import GmailPlatform, RecordLabel, _Copy, _Located

# Gmail refuses batchModify and batchDelete with more than 1000 ids.
MAX_BATCH_IDS = 1000

logger = logging.getLogger(__name__)

# One request of a batch: the mailbox, users.<resource>.<method> and its parameters.
BatchCall = tuple[str, str, str, dict[str, Any]]


@dataclass
class _Pull:
    """One (mailbox, Message-ID, incident) pull as it moves through the phases."""

    mailbox: str
    bare: str
    incident: str
    located: _Located | None = None
    fresh: list[_Copy] = field(default_factory=list)
    pending: list[_Copy] = field(default_factory=list)
    records: dict[str, RecordLabel] = field(default_factory=dict)
    evidence: str | None = None
    result: QuarantineResult | ConnectorError | None = None
    slow: bool = False
    # The failure that sent the pull to the one-mailbox path, when Gmail named a
    # wait with it.
    throttled: TransientError | None = None

    @property
    def active(self) -> bool:
        return self.result is None and not self.slow


async def quarantine_burst(
    platform: GmailPlatform, pulls: Sequence[tuple[str, str, str]]
) -> list[QuarantineResult | ConnectorError]:
    """Quarantine (mailbox, Message-ID, incident id) pulls; one result each, in order.

    Step 1 finds the copies of every pull, step 2 records their labels, step 3
    makes sure each distinct message has its verified copy in the quarantine
    mailbox (from the end of step 2 on), step 4 removes the originals and step 5
    verifies.
    Pulls that fall out of a phase finish on the one-mailbox path, after the
    Retry-After that Gmail sent with the failure, or go back to the caller when
    that wait is longer than `max_retry_wait`.
    """
    from .gmail import _check_incident

    states: list[_Pull] = []
    for mailbox, message_id, incident in pulls:
        state = _Pull(mailbox.strip().lower(), "", incident)
        try:
            state.bare = required_message_id(message_id, platform.name)
            _check_incident(incident)
        except ConnectorError as error:
            state.result = error
        states.append(state)

    # Step 1: every copy of every pull, and what earlier runs recorded. The
    # quarantine mailbox's labels are listed beside it.
    copies = _Evidence(platform)
    listed = await _gather(_find_ids(platform, states), copies.list_labels())
    ids = listed[0]

    # Step 1 ends with each copy's labels, while step 3 starts: the raw MIME of
    # one copy per message, and the incident label or the search for a copy.
    await _gather(_read(platform, states, ids), copies.prepare(states, ids))
    for state in states:
        if state.active:
            _classify(platform, state)

    # Steps 2 and 3: record labels on the copies while the copy is imported, then
    # the copy is verified. The import waits for the record labels, so the retry
    # of a pull whose worker died after the import finds a record label and
    # checks the quarantine mailbox again.
    await _create_records(platform, states)
    await _gather(_mark(platform, states), copies.store(states))
    await copies.verify()
    copies.settle(states)

    # Step 4: the originals leave the users' reach.
    await _remove(platform, states)

    # Step 5: verify by id that none is left in place.
    await _verify(platform, states)

    slow = [state for state in states if state.slow]
    if slow:
        logger.info("Burst hands pulls to the one-mailbox path pulls=%d", len(slow))
        finished = await asyncio.gather(
            *(_one(platform, s) for s in slow), return_exceptions=False
        )
        for state, result in zip(slow, finished, strict=True):
            state.result = result
    results: list[QuarantineResult | ConnectorError] = []
    for state in states:
        assert state.result is not None
        results.append(state.result)
    return results


async def _one(
    platform: GmailPlatform, state: _Pull
) -> QuarantineResult | ConnectorError:
    wait = state.throttled.retry_after if state.throttled else None
    if state.throttled is not None and wait is not None:
        if wait > platform.settings.max_retry_wait:
            return state.throttled  # the caller parks the pull for that long
        await asyncio.sleep(wait)
    try:
        return await platform.quarantine(state.mailbox, state.bare, state.incident)
    except ConnectorError as error:
        return error


def _give_up(state: _Pull, error: ConnectorError) -> None:
    """Hand a pull to the one-mailbox path, or fail it when retrying cannot help."""
    if isinstance(error, PermanentError | NotFoundError):
        state.result = error
        return
    state.slow = True
    if not isinstance(error, TransientError) or error.retry_after is None:
        return
    # Of several failures with a wait, the longest wait counts.
    longest = state.throttled.retry_after if state.throttled is not None else None
    if longest is None or longest < error.retry_after:
        state.throttled = error


async def _run(
    platform: GmailPlatform,
    states: list[_Pull],
    make_calls: Callable[[int, _Pull], list[BatchCall]],
) -> list[list[Any]]:
    """Run the calls each active pull needs in batches; return responses per pull.

    A pull with a failed call leaves the burst, and its list of responses is empty.
    """
    owners: list[int] = []
    calls: list[BatchCall] = []
    for index, state in enumerate(states):
        if not state.active:
            continue
        for call in make_calls(index, state):
            owners.append(index)
            calls.append(call)
    answers: list[list[Any]] = [[] for _ in states]
    if not calls:
        return answers
    outcomes = await platform.batch(calls)
    for index, outcome in zip(owners, outcomes, strict=True):
        state = states[index]
        if isinstance(outcome, ConnectorError):
            # A pull with several failed calls in one batch leaves once, after the
            # longest wait that any of them named.
            if state.result is None:
                logger.warning(
                    "Burst call failed mailbox=%s message_id=%s error=%s",
                    state.mailbox,
                    state.bare,
                    outcome,
                )
                _give_up(state, outcome)
            continue
        answers[index].append(outcome)
    return [a if states[i].active else [] for i, a in enumerate(answers)]


async def _gather(*steps: Any) -> list[Any]:
    return list(await asyncio.gather(*steps))


async def _find_ids(
    platform: GmailPlatform, states: list[_Pull]
) -> dict[int, tuple[dict[str, str], list[str]]]:
    """List the labels and the ids of the copies of each pull."""
    from .gmail import search_query

    page_size = platform.settings.page_size

    def listing(index: int, state: _Pull) -> list[BatchCall]:
        query = {
            "q": search_query(state.bare),
            "includeSpamTrash": True,
            "maxResults": page_size,
        }
        return [
            (state.mailbox, "labels", "list", {}),
            (state.mailbox, "messages", "list", query),
        ]

    answers = await _run(platform, states, listing)
    found: dict[int, tuple[dict[str, str], list[str]]] = {}
    for index, (state, answer) in enumerate(zip(states, answers, strict=True)):
        if not state.active:
            continue
        labels, page = answer
        if page.get("nextPageToken"):
            state.slow = True  # more copies than one page: the slow path pages
            continue
        names = {
            str(x["id"]): str(x.get("name", x["id"])) for x in labels.get("labels", [])
        }
        found[index] = (names, [str(m["id"]) for m in page.get("messages", [])])
    return found


async def _read(
    platform: GmailPlatform,
    states: list[_Pull],
    found: dict[int, tuple[dict[str, str], list[str]]],
) -> None:
    """Read the labels of every copy found."""

    def metadata(index: int, state: _Pull) -> list[BatchCall]:
        ids = found[index][1] if index in found else []
        return [
            (
                state.mailbox,
                "messages",
                "get",
                {"id": i, "format": "metadata", "metadataHeaders": ["Message-ID"]},
            )
            for i in ids
        ]

    got = await _run(platform, states, metadata)
    for index, (state, messages) in enumerate(zip(states, got, strict=True)):
        if state.active and index in found:
            state.located = platform.located_from(
                state.bare, state.incident, found[index][0], messages
            )


def _classify(platform: GmailPlatform, state: _Pull) -> None:
    located = state.located
    if located is None:
        state.slow = True
        return
    recorded = {r.label_id for r in located.records}
    state.fresh = [c for c in located.copies if not recorded & set(c.labels)]
    state.pending = [
        c for c in located.copies if c not in state.fresh and platform.in_place(c)
    ]
    if len(state.fresh) + len(state.pending) > MAX_BATCH_IDS:
        state.slow = True  # batchModify takes 1000 ids: the slow path splits them
        return
    if state.fresh or state.pending:
        return
    if not located.records:
        state.result = NotFoundError(
            f"Mailbox {state.mailbox} has no copy of <{state.bare}>, in or out of "
            "quarantine.",
            mailbox=state.mailbox,
            message_id=state.bare,
            platform=platform.name,
        )
        return
    state.result = QuarantineResult(
        mailbox=state.mailbox,
        message_id=state.bare,
        copies=platform.recorded_copies(state.mailbox, state.bare, located),
        already_done=True,
    )


async def _create_records(platform: GmailPlatform, states: list[_Pull]) -> None:
    """Create the record labels the copies need and note them on each pull."""
    from .gmail import RecordLabel, message_digest, record_label_name

    prefix = platform.settings.label_prefix
    wanted: dict[int, dict[tuple[str, ...], str]] = {}
    for index, state in enumerate(states):
        if state.active and state.located is not None:
            groups = {tuple(sorted(c.labels)) for c in state.fresh}
            wanted[index] = {
                labels: record_label_name(prefix, state.incident, state.bare, labels)
                for labels in groups
            }

    def existing(state: _Pull, name: str) -> str | None:
        assert state.located is not None
        for label_id, label_name in state.located.label_names.items():
            if label_name.lower() == name.lower():
                return label_id
        return None

    def creations(index: int, state: _Pull) -> list[BatchCall]:
        names = wanted.get(index, {})
        body = {"labelListVisibility": "labelHide", "messageListVisibility": "hide"}
        return [
            (state.mailbox, "labels", "create", {"body": {**body, "name": name}})
            for name in names.values()
            if existing(state, name) is None
        ]

    created = await _run(platform, states, creations)
    for index, state in enumerate(states):
        if not state.active or index not in wanted:
            continue
        assert state.located is not None
        for label in created[index]:
            state.located.label_names[str(label["id"])] = str(label["name"])
        digest = message_digest(state.bare)
        for labels, name in wanted[index].items():
            label_id = existing(state, name)
            if label_id is None:
                state.slow = True
                break
            record = RecordLabel(label_id, state.incident, digest, labels)
            for copy in state.fresh:
                if tuple(sorted(copy.labels)) == labels:
                    state.records[copy.gmail_id] = record


async def _mark(platform: GmailPlatform, states: list[_Pull]) -> None:
    """Put each copy's record label on it."""

    def marking(index: int, state: _Pull) -> list[BatchCall]:
        by_label: dict[str, list[str]] = {}
        for gmail_id, record in state.records.items():
            by_label.setdefault(record.label_id, []).append(gmail_id)
        return [
            _modify_call(state.mailbox, ids, add=[label_id])
            for label_id, ids in by_label.items()
        ]

    await _run(platform, states, marking)


class _Evidence:
    """The quarantine copy of each distinct message and incident, step by step.

    Each step adds at most two requests per message to a phase. The first lists
    the quarantine mailbox's labels. The second reads one original's raw MIME while
    the incident label is created, or the mailbox is searched for an earlier copy.
    The third, once a pull of the message has its record label, imports the MIME,
    or reads the earlier copy, and the fourth reads the import back and searches
    for duplicates. A message whose copy cannot be made or verified this way, or
    that has two copies, sends its pulls to the one-mailbox path, and so do the
    pulls found quarantined already.
    """

    def __init__(self, platform: GmailPlatform) -> None:
        self.platform = platform
        # Taken before the first search, so a verification noted with it never
        # seems newer than it is.
        self.check = platform.begin_evidence_check()
        self.quarantine = platform.settings.quarantine_mailbox.lower()
        self.label_names: dict[str, str] = {}
        self.labels: dict[str, str] = {}  # incident -> label id
        self.sources: dict[tuple[str, str], str] = {}  # key -> original mailbox
        self.raw: dict[tuple[str, str], bytes] = {}
        self.earlier: dict[tuple[str, str], list[str]] = {}
        self.imported: dict[tuple[str, str], str] = {}
        self.verified: dict[tuple[str, str], bool] = {}
        self.failed: set[tuple[str, str]] = set()
        # The failures that named a wait, by key. A label's key is ("", incident),
        # and the label list's is ("", "").
        self.waits: dict[tuple[str, str], TransientError] = {}

    def fail(self, key: tuple[str, str], error: ConnectorError | None = None) -> None:
        """Mark a key failed, keeping the longest wait that a failure named."""
        self.failed.add(key)
        if not isinstance(error, TransientError) or error.retry_after is None:
            return
        known = self.waits.get(key)
        if known is None or (known.retry_after or 0) < error.retry_after:
            self.waits[key] = error

    def label_name(self, incident: str) -> str:
        return f"{self.platform.settings.label_prefix}/{incident}"

    async def list_labels(self) -> None:
        answer = (await self.platform.batch([(self.quarantine, "labels", "list", {})]))[
            0
        ]
        if isinstance(answer, ConnectorError):
            self.fail(("", ""), answer)
            return
        self.label_names = {
            str(x["id"]): str(x.get("name", x["id"])) for x in answer.get("labels", [])
        }

    async def prepare(
        self,
        states: list[_Pull],
        found: dict[int, tuple[dict[str, str], list[str]]],
    ) -> None:
        """Read one raw original per message; create or search the incident label."""
        calls: list[BatchCall] = []
        kinds: list[tuple[str, tuple[str, str]]] = []
        for index, state in enumerate(states):
            key = (state.bare, state.incident)
            ids = found.get(index, ({}, []))[1]
            if state.active and ids and key not in self.sources:
                self.sources[key] = state.mailbox
                calls.append(
                    (state.mailbox, "messages", "get", {"id": ids[0], "format": "raw"})
                )
                kinds.append(("raw", key))
        incidents = {key[1] for key in self.sources}
        for incident in sorted(incidents):
            label_id = self._existing_label(incident)
            if label_id is None:
                body = {
                    "name": self.label_name(incident),
                    "labelListVisibility": "labelHide",
                    "messageListVisibility": "hide",
                }
                calls.append((self.quarantine, "labels", "create", {"body": body}))
                kinds.append(("label", ("", incident)))
            else:
                self.labels[incident] = label_id
        for key in self.sources:
            if key[1] in self.labels:
                calls.append(self._search_call(key))
                kinds.append(("search", key))
        for (kind, key), answer in zip(
            kinds, await self.platform.batch(calls), strict=True
        ):
            if isinstance(answer, ConnectorError):
                self.fail(key, answer)
            elif kind == "raw":
                self.raw[key] = _b64url_decode(str(answer.get("raw", "")))
            elif kind == "label":
                self.labels[key[1]] = str(answer["id"])
            else:
                self.earlier[key] = [str(m["id"]) for m in answer.get("messages", [])]

    async def store(self, states: list[_Pull]) -> None:
        """Import each message that has no earlier copy; read the earlier ones.

        A message is imported only when one of its pulls has its record label, so
        that a worker that dies after the import leaves a record label behind.
        """
        from .gmail import INCIDENT_HEADER, ORIGINAL_MAILBOX_HEADER, _b64url

        recorded = {
            (state.bare, state.incident)
            for state in states
            if state.records or (state.located is not None and state.located.records)
        }
        calls: list[BatchCall] = []
        kinds: list[tuple[str, tuple[str, str]]] = []
        for key, mailbox in self.sources.items():
            bare, incident = key
            if key in self.failed or incident not in self.labels:
                continue
            earlier = self.earlier.get(key, [])
            if len(earlier) > 1:
                self.found_doubles(key)
                continue
            if earlier:
                calls.append(self._check_call(earlier[0]))
                kinds.append(("earlier", key))
                continue
            if key not in recorded:
                continue  # every pull of the message left before its record label
            raw = self.raw.get(key)
            if raw is None or _message_id_of(raw) != bare:
                self.failed.add(key)  # the listed copy was another message
                continue
            headers = (
                f"{INCIDENT_HEADER}: {incident}\r\n"
                f"{ORIGINAL_MAILBOX_HEADER}: {mailbox}\r\n"
            ).encode("ascii")
            body = {"raw": _b64url(headers + raw), "labelIds": [self.labels[incident]]}
            params = {
                "body": body,
                "neverMarkSpam": True,
                "internalDateSource": "dateHeader",
            }
            calls.append((self.quarantine, "messages", "import_", params))
            kinds.append(("import", key))
        for (kind, key), answer in zip(
            kinds, await self.platform.batch(calls), strict=True
        ):
            if isinstance(answer, ConnectorError):
                self.fail(key, answer)
            elif kind == "import":
                self.imported[key] = str(answer.get("id", ""))
                logger.info(
                    "Imported quarantine copy mailbox=%s message_id=%s incident=%s",
                    self.quarantine,
                    key[0],
                    key[1],
                )
            elif self._carries(answer, key):
                self.verified[key] = True

    async def verify(self) -> None:
        """Read each imported copy back and search for duplicates of it.

        The copy must carry its Message-ID and incident. httplib2 sends a batch
        again, once, when the connection drops before the response, so one import
        part can store two copies. A message whose search lists a copy besides the
        imported one goes to the one-mailbox path, which keeps one.
        """
        keys = [k for k in self.imported if k not in self.failed]
        calls: list[BatchCall] = []
        for key in keys:
            calls += [self._check_call(self.imported[key]), self._search_call(key)]
        answers = await self.platform.batch(calls)
        for index, key in enumerate(keys):
            check, search = answers[2 * index], answers[2 * index + 1]
            if isinstance(check, ConnectorError):
                self.fail(key, check)
                continue
            if not self._carries(check, key):
                self.fail(key)
                continue
            if isinstance(search, ConnectorError):
                self.fail(key, search)
                continue
            listed = {str(m["id"]) for m in search.get("messages", [])}
            if listed - {self.imported[key]}:
                logger.warning(
                    "Burst found a second quarantine copy mailbox=%s message_id=%s "
                    "incident=%s copies=%d",
                    self.quarantine,
                    key[0],
                    key[1],
                    len(listed | {self.imported[key]}),
                )
                self.found_doubles(key)
                continue
            self.verified[key] = True

    def found_doubles(self, key: tuple[str, str]) -> None:
        """Send a message with two copies to the one-mailbox path, which keeps one.

        The adapter drops its note of a verified copy, so that path checks again
        even for a pull that is not repeated.
        """
        self.fail(key)
        self.platform.forget_evidence(*key)

    def settle(self, states: list[_Pull]) -> None:
        """Note each pull's verified copy, or send the pull to the one-mailbox path.

        A pull found quarantined already keeps its result only when the burst
        verified the copy. Otherwise the one-mailbox path checks the quarantine
        mailbox for it, because a worker that died after its import may have left
        a second copy there, or none.
        """
        for state in states:
            key = (state.bare, state.incident)
            verified = bool(self.verified.get(key)) and key not in self.failed
            location = f"{self.quarantine}/{self.label_name(state.incident)}"
            done = state.result
            if isinstance(done, QuarantineResult) and done.already_done:
                if verified:
                    state.result = replace(done, evidence_location=location)
                else:
                    state.result = None
                    self._leave(state, key)
                continue
            if not state.active or not (state.fresh or state.pending):
                continue
            if verified:
                self.platform.note_evidence(state.bare, state.incident, self.check)
                state.evidence = location
                continue
            self._leave(state, key)

    def _leave(self, state: _Pull, key: tuple[str, str]) -> None:
        # The one-mailbox path repeats the quarantine mailbox's requests, so it
        # waits for the longest wait that their failures named.
        waits = [
            self.waits[k]
            for k in (key, ("", state.incident), ("", ""))
            if k in self.waits
        ]
        if waits:
            _give_up(state, max(waits, key=lambda e: e.retry_after or 0))
        else:
            state.slow = True

    def _existing_label(self, incident: str) -> str | None:
        wanted = self.label_name(incident).lower()
        for label_id, name in self.label_names.items():
            if name.lower() == wanted:
                return label_id
        return None

    def _search_call(self, key: tuple[str, str]) -> BatchCall:
        """Search the quarantine mailbox for the copies of a message and incident."""
        from .gmail import search_query

        query = {
            "q": search_query(key[0]),
            "labelIds": [self.labels[key[1]]],
            "includeSpamTrash": True,
        }
        return (self.quarantine, "messages", "list", query)

    def _check_call(self, gmail_id: str) -> BatchCall:
        from .gmail import INCIDENT_HEADER

        params = {
            "id": gmail_id,
            "format": "metadata",
            "metadataHeaders": ["Message-ID", INCIDENT_HEADER],
        }
        return (self.quarantine, "messages", "get", params)

    def _carries(self, message: dict[str, Any], key: tuple[str, str]) -> bool:
        from .gmail import INCIDENT_HEADER, _bare, _header

        headers = message.get("payload", {}).get("headers", [])
        return (
            _bare(_header(headers, "Message-ID")) == key[0]
            and (_header(headers, INCIDENT_HEADER) or "").strip() == key[1]
        )


def _message_id_of(raw: bytes) -> str:
    from .gmail import _bare

    message = message_from_bytes(raw, policy=compat32)
    return _bare(str(message.get("Message-ID", "")))


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


async def _remove(platform: GmailPlatform, states: list[_Pull]) -> None:
    trash = platform.settings.original_action == "trash"

    def removal(index: int, state: _Pull) -> list[BatchCall]:
        ids = [c.gmail_id for c in [*state.fresh, *state.pending]]
        if trash and len(ids) == 1:
            return [(state.mailbox, "messages", "trash", {"id": ids[0]})]
        if trash:
            return [_modify_call(state.mailbox, ids, add=["TRASH"])]
        if len(ids) == 1:
            return [(state.mailbox, "messages", "delete", {"id": ids[0]})]
        return [(state.mailbox, "messages", "batchDelete", {"body": {"ids": ids}})]

    await _run(platform, states, removal)


async def _verify(platform: GmailPlatform, states: list[_Pull]) -> None:
    """Read each handled original by id: it must be in the trash, or gone."""
    deleting = platform.settings.original_action == "delete"
    owners: list[int] = []
    calls: list[BatchCall] = []
    for index, state in enumerate(states):
        if state.active:
            for copy in [*state.fresh, *state.pending]:
                owners.append(index)
                params = {"id": copy.gmail_id, "format": "minimal"}
                calls.append((state.mailbox, "messages", "get", params))
    for index, answer in zip(owners, await platform.batch(calls), strict=True):
        state = states[index]
        if isinstance(answer, NotFoundError) and deleting:
            continue
        if isinstance(answer, ConnectorError):
            _give_up(state, answer)
        elif deleting or "TRASH" not in answer.get("labelIds", []):
            state.slow = True  # still in place: the one-mailbox path tries again
    for state in states:
        if not state.active:
            continue
        assert state.located is not None
        copies = [
            platform.public(
                state.mailbox,
                state.bare,
                copy,
                state.located,
                state.records.get(copy.gmail_id),
            )
            for copy in [*state.fresh, *state.pending]
        ]
        state.result = QuarantineResult(
            mailbox=state.mailbox,
            message_id=state.bare,
            copies=tuple(copies),
            evidence_location=state.evidence,
        )


def _modify_call(mailbox: str, ids: list[str], *, add: list[str]) -> BatchCall:
    body = {"addLabelIds": add, "removeLabelIds": []}
    if len(ids) == 1:
        return (mailbox, "messages", "modify", {"id": ids[0], "body": body})
    return (mailbox, "messages", "batchModify", {"body": {**body, "ids": ids}})
