"""Bursts of Graph quarantines: many mailboxes in JSON batches, phase by phase.

A campaign that reached thousands of mailboxes would cost thousands of separate
requests per step. A burst packs the requests of one step for up to 20 mailboxes
into each JSON `$batch` and runs the steps as phases over all mailboxes at once:

1. find the copies and list the top-level folders (hidden ones included);
2. mark each visible copy with its folder and read state, and create the hidden
   quarantine folder where it is missing;
3. move each copy into the hidden folder;
4. verify that no visible copy is left.

Every batch of a phase is fully parallel, because Graph rejects a batch that mixes
independent requests with a `dependsOn` chain. Each mailbox has at most two
requests in a phase and every inner request holds one of the mailbox's slots, so
no mailbox ever has more than `max_concurrency_per_mailbox` requests in flight.
A throttled inner request (429, 503, 504) is retried alone, in a later batch,
after its own Retry-After.

One evidence copy per distinct message goes to the quarantine mailbox through
the adapter's single-request path, which starts as soon as phase 1 has found a
source copy and runs beside phases 2 to 4; the source copy is moved only once
its MIME content has been read. The evidence copy is uploaded only after phase 2
has stored the marker of a pull of its message. So when a worker dies
mid-burst, the worker that takes over its pulls finds the marker and checks
the quarantine mailbox again. A pull that any step fails is returned as its
connector error: the caller retries it through `GraphPlatform.quarantine`,
which finishes whatever the burst left half done.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import quote

import httpx
from kiota_abstractions.method import Method
from kiota_abstractions.request_information import RequestInformation
from msgraph.generated.models.o_data_errors.main_error import MainError
from msgraph.generated.models.o_data_errors.o_data_error import ODataError

from ..errors import ConnectorError, NotFoundError, PermanentError, TransientError
from .base import QuarantineResult, required_message_id
from .graph import (
    MARKER_PROPERTY_ID,
    MAX_BATCH_REQUESTS,
    MESSAGE_FIELDS,
    PLATFORM,
    EvidenceSource,
    GraphPlatform,
    QuarantineMarker,
    _check_header_value,
    _Copy,
    _FolderInfo,
    _marked_for,
    _same_message_id,
    internet_message_id_filter,
    map_graph_error,
    parse_retry_after,
)

logger = logging.getLogger(__name__)

RETRIED_STATUSES = frozenset({429, 503, 504})
# Wait for a throttled inner request that carries no Retry-After: 1, 2, 4 ... s.
BACKOFF_BASE_SECONDS = 1.0

Outcome = QuarantineResult | ConnectorError


# --- JSON batches ---------------------------------------------------------------------


@dataclass(frozen=True)
class InnerRequest:
    """One request of a batch: its mailbox, method, relative URL and JSON body."""

    mailbox: str
    method: str
    url: str
    body: dict[str, Any] | None = None


@dataclass(frozen=True)
class InnerResponse:
    """The status, headers and decoded body of one response inside a batch."""

    status: int
    headers: httpx.Headers
    body: Any


class BatchSender:
    """A sender of parallel JSON batches that retries throttled requests alone."""

    def __init__(self, platform: GraphPlatform) -> None:
        self._platform = platform
        self._in_flight = asyncio.Semaphore(platform.settings.max_batches_in_flight)
        self.batches_sent = 0

    async def run(
        self, requests: Sequence[InnerRequest], attempt: int = 1
    ) -> list[InnerResponse | ConnectorError]:
        """Return one response or error per request, in order."""
        results: list[InnerResponse | ConnectorError | None] = [None] * len(requests)
        chunks = [
            list(range(start, min(start + MAX_BATCH_REQUESTS, len(requests))))
            for start in range(0, len(requests), MAX_BATCH_REQUESTS)
        ]
        responses = await asyncio.gather(
            *(self._send([requests[i] for i in chunk]) for chunk in chunks)
        )

        retry: dict[float, list[int]] = {}
        for chunk, chunk_responses in zip(chunks, responses, strict=True):
            for index, response in zip(chunk, chunk_responses, strict=True):
                wait = self._retry_wait(response, attempt)
                if wait is None:
                    results[index] = response
                else:
                    retry.setdefault(wait, []).append(index)

        await asyncio.gather(
            *(
                self._retry(requests, indices, wait, attempt, results)
                for wait, indices in retry.items()
            )
        )
        return [result for result in results if result is not None]

    def _retry_wait(
        self, response: InnerResponse | ConnectorError, attempt: int
    ) -> float | None:
        if not isinstance(response, InnerResponse):
            return None
        if response.status not in RETRIED_STATUSES:
            return None
        throttled = response.status == 429 or (
            response.status == 503 and "Retry-After" in response.headers
        )
        if throttled:
            self._platform.report_throttled()
        if attempt >= self._platform.settings.batch_max_attempts:
            return None
        requested = parse_retry_after(response.headers.get("Retry-After"))
        if requested is not None:
            return requested
        return float(BACKOFF_BASE_SECONDS * 2 ** (attempt - 1))

    async def _retry(
        self,
        requests: Sequence[InnerRequest],
        indices: list[int],
        wait: float,
        attempt: int,
        results: list[InnerResponse | ConnectorError | None],
    ) -> None:
        logger.info(
            "Retrying throttled batch requests count=%d attempt=%d wait_s=%s",
            len(indices),
            attempt + 1,
            wait,
        )
        await asyncio.sleep(wait)
        responses = await self.run([requests[i] for i in indices], attempt + 1)
        for index, response in zip(indices, responses, strict=True):
            results[index] = response

    async def _send(
        self, chunk: list[InnerRequest]
    ) -> list[InnerResponse | ConnectorError]:
        """POST one batch while holding a slot of each inner request's mailbox."""
        payload = {
            "requests": [
                _batch_entry(str(position), request)
                for position, request in enumerate(chunk)
            ]
        }
        # Slots are taken in one global order, so two batches never wait on each
        # other's slots.
        mailboxes = sorted(request.mailbox.lower() for request in chunk)
        async with self._in_flight:
            taken: list[asyncio.Semaphore] = []
            try:
                for mailbox in mailboxes:
                    slot = self._platform._slot(mailbox)
                    await slot.acquire()
                    taken.append(slot)
                self.batches_sent += 1
                raw = await self._post(payload, chunk[0].mailbox)
            except ConnectorError as error:
                return [error] * len(chunk)
            finally:
                for slot in taken:
                    slot.release()
        return _read_batch(raw, chunk)

    async def _post(self, payload: dict[str, Any], mailbox: str) -> bytes:
        info = RequestInformation(Method.POST, "{+baseurl}/$batch", {})
        info.headers.try_add("Accept", "application/json")
        info.set_stream_content(json.dumps(payload).encode("utf-8"), "application/json")
        errors: dict[str, Any] = {"XXX": ODataError}
        adapter = self._platform._adapter
        raw = await self._platform._call(
            mailbox,
            None,
            lambda: adapter.send_primitive_async(info, "bytes", errors),
            limited=False,
        )
        if not isinstance(raw, bytes) or not raw:
            raise TransientError(
                "Graph returned an empty response to a $batch request; the requests "
                "will be retried.",
                platform=PLATFORM,
            )
        return raw


def _batch_entry(request_id: str, request: InnerRequest) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "id": request_id,
        "method": request.method,
        "url": request.url,
    }
    if request.body is not None:
        entry["headers"] = {"Content-Type": "application/json"}
        entry["body"] = request.body
    return entry


def _read_batch(
    raw: bytes, chunk: list[InnerRequest]
) -> list[InnerResponse | ConnectorError]:
    """Match the responses of a batch, which may come in any order, to its requests."""
    try:
        responses = json.loads(raw)["responses"]
        by_id = {str(item["id"]): item for item in responses}
    except (ValueError, KeyError, TypeError) as exc:
        error = TransientError(
            f"Graph returned a $batch response that is not valid ({exc}); the "
            "requests will be retried.",
            platform=PLATFORM,
        )
        return [error] * len(chunk)

    results: list[InnerResponse | ConnectorError] = []
    for position, request in enumerate(chunk):
        item = by_id.get(str(position))
        if item is None:
            results.append(
                TransientError(
                    f"Graph left request {position} out of a $batch response; it "
                    "will be retried.",
                    mailbox=request.mailbox,
                    platform=PLATFORM,
                )
            )
            continue
        results.append(
            InnerResponse(
                int(item.get("status", 0)),
                httpx.Headers(item.get("headers") or {}),
                item.get("body"),
            )
        )
    return results


def inner_error(
    response: InnerResponse | ConnectorError, mailbox: str, bare: str
) -> ConnectorError | None:
    """Return the connector error an inner response stands for, or None for success."""
    if isinstance(response, ConnectorError):
        if response.mailbox is None:
            response.mailbox = mailbox
        return response
    if response.status < 400:
        return None
    body: dict[str, Any] = response.body if isinstance(response.body, dict) else {}
    found = body.get("error")
    error_body: dict[str, Any] = found if isinstance(found, dict) else {}
    error = ODataError(
        error=MainError(
            code=str(error_body.get("code") or ""),
            message=str(error_body.get("message") or ""),
        )
    )
    error.response_status_code = response.status
    error.response_headers = response.headers
    return map_graph_error(error, mailbox=mailbox, message_id=bare)


# --- the phases -----------------------------------------------------------------------


@dataclass
class _Pull:
    """The state of one pull during a burst."""

    index: int
    mailbox: str
    bare: str
    incident_id: str
    visible: list[_Copy] = field(default_factory=list)
    quarantined: list[_Copy] = field(default_factory=list)
    hidden_folder: str | None = None
    moved_ids: list[str] = field(default_factory=list)
    outcome: Outcome | None = None
    # A hidden copy of this incident, when every copy was hidden already: the
    # evidence copy may still be missing, because a crash can stop a burst
    # between its moves and its evidence copy.
    hidden_source: _Copy | None = None

    @property
    def active(self) -> bool:
        return self.outcome is None


async def quarantine_burst(
    platform: GraphPlatform, pulls: Sequence[tuple[str, str, str]]
) -> list[Outcome]:
    """Quarantine every (mailbox, Message-ID, incident id) pull; see the module doc."""
    states, repeats = _prepare(pulls)
    sender = BatchSender(platform)
    burst = _Burst(platform, sender)

    evidence = burst.start_evidence(states)
    try:
        await burst.find(states)
        burst.settle_sources(states, evidence)
        await burst.mark(states)
        burst.settle_marked(states, evidence)
        await burst.move(states, evidence)
        await burst.verify(states)
        await burst.finish_evidence(states, evidence)
    finally:
        # Stop the evidence copies of a cancelled or failed burst, so that none is
        # written after the burst has returned.
        for started in evidence.values():
            started.task.cancel()
    logger.info(
        "Burst finished pulls=%d batches=%d quarantined=%d",
        len(states),
        sender.batches_sent,
        sum(1 for s in states if isinstance(s.outcome, QuarantineResult)),
    )

    outcomes: list[Outcome | None] = [None] * len(pulls)
    for state in states:
        outcomes[state.index] = state.outcome
    # A repeated (mailbox, Message-ID) runs after the burst, on the single path.
    for index, (mailbox, message_id, incident_id) in repeats:
        try:
            outcomes[index] = await platform.quarantine(
                mailbox, message_id, incident_id
            )
        except ConnectorError as error:
            outcomes[index] = error
    return [outcome for outcome in outcomes if outcome is not None]


def _prepare(
    pulls: Sequence[tuple[str, str, str]],
) -> tuple[list[_Pull], list[tuple[int, tuple[str, str, str]]]]:
    states: list[_Pull] = []
    repeats: list[tuple[int, tuple[str, str, str]]] = []
    seen: set[tuple[str, str]] = set()
    for index, (mailbox, message_id, incident_id) in enumerate(pulls):
        state = _Pull(index, mailbox, "", incident_id)
        try:
            state.bare = required_message_id(message_id, PLATFORM)
            _check_header_value(incident_id, "incident id")
        except PermanentError as error:
            error.mailbox = mailbox
            state.outcome = error
            states.append(state)
            continue
        key = (mailbox.lower(), state.bare)
        if key in seen:
            repeats.append((index, (mailbox, message_id, incident_id)))
            continue
        seen.add(key)
        states.append(state)
    return states, repeats


EvidenceKey = tuple[str, str]


@dataclass(frozen=True)
class _Evidence:
    """One evidence copy under way: its task, its source, and when it was read.

    `marked` returns whether phase 2 stored the marker of a pull of this message,
    or found one stored already. The evidence copy is written only after that, so
    a retry of a pull whose worker died mid-burst finds the marker and checks the
    quarantine mailbox again.
    """

    task: asyncio.Future[str]
    source: asyncio.Future[EvidenceSource]
    source_read: asyncio.Event
    marked: asyncio.Future[bool]


class _Burst:
    def __init__(self, platform: GraphPlatform, sender: BatchSender) -> None:
        self.platform = platform
        self.sender = sender
        self.hidden_name = platform.settings.hidden_folder_name

    # --- phase 1 ----------------------------------------------------------------------

    async def find(self, states: list[_Pull]) -> None:
        """Find the copies of each pull and the mailbox's top-level folders."""
        active = [s for s in states if s.active]
        requests: list[InnerRequest] = []
        for state in active:
            requests.append(self._search_request(state))
            requests.append(self._folders_request(state.mailbox))
        responses = await self.sender.run(requests)

        nested: list[tuple[_Pull, str]] = []
        for position, state in enumerate(active):
            found, folders = responses[2 * position], responses[2 * position + 1]
            messages = self._messages(state, found)
            listing = self._folders(state, folders)
            if messages is None or listing is None:
                continue
            hidden = next(
                (
                    f
                    for f in listing.values()
                    if f.hidden and f.name == self.hidden_name
                ),
                None,
            )
            state.hidden_folder = hidden.folder_id if hidden else None
            copies = [
                (message, listing.get(_text(message, "parentFolderId")))
                for message in messages
            ]
            nested.extend(
                (state, _text(message, "parentFolderId"))
                for message, folder in copies
                if folder is None
            )
            self._classify(state, copies)
        if nested:
            await self._name_nested(nested)
        for state in active:
            if state.active:
                self._settle_found(state)

    def _search_request(self, state: _Pull) -> InnerRequest:
        select = ",".join([*MESSAGE_FIELDS, "receivedDateTime"])
        expand = f"singleValueExtendedProperties($filter=id eq '{MARKER_PROPERTY_ID}')"
        query = {
            "$filter": internet_message_id_filter(state.bare),
            "$select": select,
            "$top": str(self.platform.settings.page_size),
            "$expand": expand,
        }
        return InnerRequest(
            state.mailbox, "GET", _url(state.mailbox, "messages", query)
        )

    def _folders_request(self, mailbox: str) -> InnerRequest:
        query = {
            "includeHiddenFolders": "true",
            "$select": "id,displayName,isHidden",
            "$top": "1000",
        }
        return InnerRequest(mailbox, "GET", _url(mailbox, "mailFolders", query))

    def _messages(
        self, state: _Pull, response: InnerResponse | ConnectorError
    ) -> list[dict[str, Any]] | None:
        error = inner_error(response, state.mailbox, state.bare)
        if error is not None:
            state.outcome = error
            return None
        assert isinstance(response, InnerResponse)
        body = response.body if isinstance(response.body, dict) else {}
        if body.get("@odata.nextLink"):
            state.outcome = TransientError(
                f"Mailbox {state.mailbox} has more copies of <{state.bare}> than one "
                "page; it is quarantined on its own.",
                mailbox=state.mailbox,
                message_id=state.bare,
                platform=PLATFORM,
            )
            return None
        return [
            message
            for message in body.get("value") or []
            if isinstance(message, dict)
            and _same_message_id(message.get("internetMessageId"), state.bare)
        ]

    def _folders(
        self, state: _Pull, response: InnerResponse | ConnectorError
    ) -> dict[str, _FolderInfo] | None:
        error = inner_error(response, state.mailbox, state.bare)
        if error is not None:
            state.outcome = error
            return None
        assert isinstance(response, InnerResponse)
        body = response.body if isinstance(response.body, dict) else {}
        listing: dict[str, _FolderInfo] = {}
        for folder in body.get("value") or []:
            if isinstance(folder, dict) and folder.get("id"):
                info = _FolderInfo(
                    str(folder["id"]),
                    str(folder.get("displayName") or ""),
                    bool(folder.get("isHidden")),
                )
                listing[info.folder_id] = info
        return listing

    def _classify(
        self, state: _Pull, copies: list[tuple[dict[str, Any], _FolderInfo | None]]
    ) -> None:
        for message, folder in copies:
            folder_id = _text(message, "parentFolderId")
            copy = _Copy(
                item_id=_text(message, "id"),
                folder_id=folder_id,
                folder_name=folder.name if folder else "",
                read=bool(message.get("isRead")),
                subject=message.get("subject"),
                received_at=None,
                marker=_marker_of_json(message),
            )
            if state.hidden_folder is not None and folder_id == state.hidden_folder:
                state.quarantined.append(copy)
            else:
                state.visible.append(copy)

    async def _name_nested(self, nested: list[tuple[_Pull, str]]) -> None:
        """Look up the names of folders below the top level that hold copies."""
        requests = [
            InnerRequest(
                state.mailbox,
                "GET",
                _url(
                    state.mailbox,
                    f"mailFolders/{quote(folder_id, safe='')}",
                    {"$select": "id,displayName,isHidden"},
                ),
            )
            for state, folder_id in nested
        ]
        responses = await self.sender.run(requests)
        for (state, folder_id), response in zip(nested, responses, strict=True):
            error = inner_error(response, state.mailbox, state.bare)
            if error is not None:
                state.outcome = state.outcome or error
                continue
            assert isinstance(response, InnerResponse)
            name = str((response.body or {}).get("displayName") or "")
            state.visible = [
                _renamed(copy, name) if copy.folder_id == folder_id else copy
                for copy in state.visible
            ]

    def _settle_found(self, state: _Pull) -> None:
        if not state.visible and not state.quarantined:
            state.outcome = NotFoundError(
                f"Mailbox {state.mailbox} has no copy of <{state.bare}>, in or out of "
                "quarantine.",
                mailbox=state.mailbox,
                message_id=state.bare,
                platform=PLATFORM,
            )
        elif not state.visible:
            state.outcome = QuarantineResult(
                mailbox=state.mailbox,
                message_id=state.bare,
                copies=tuple(
                    c.original(state.mailbox, state.bare) for c in state.quarantined
                ),
                already_done=True,
            )
            state.hidden_source = next(
                (c for c in state.quarantined if _marked_for(c, state.incident_id)),
                None,
            )
        elif state.hidden_folder is not None:
            self.platform._hidden_folders[state.mailbox.lower()] = state.hidden_folder

    # --- evidence ---------------------------------------------------------------------

    def start_evidence(self, states: list[_Pull]) -> dict[EvidenceKey, _Evidence]:
        """Start one evidence copy per (incident, message), before any source is found.

        The quarantine mailbox's lookups run beside phase 1; `settle_sources`
        hands each evidence copy its source once phase 1 has found one.
        """
        loop = asyncio.get_running_loop()
        started: dict[EvidenceKey, _Evidence] = {}
        for state in states:
            key = (state.incident_id, state.bare)
            if not state.active or key in started:
                continue
            source: asyncio.Future[EvidenceSource] = loop.create_future()
            source_read = asyncio.Event()
            marked: asyncio.Future[bool] = loop.create_future()
            task = asyncio.ensure_future(
                self.platform._ensure_evidence(
                    source, state.bare, state.incident_id, source_read, marked
                )
            )
            started[key] = _Evidence(task, source, source_read, marked)
        return started

    def settle_sources(
        self, states: list[_Pull], evidence: dict[EvidenceKey, _Evidence]
    ) -> None:
        """Give each evidence copy the first visible copy that phase 1 found.

        A message whose copies are all hidden already gets a hidden copy of its
        incident as the source, so a burst run again after a crash still makes
        the evidence copy.
        """
        repeated = {
            (state.incident_id, state.bare)
            for state in states
            if any(
                _marked_for(copy, state.incident_id)
                for copy in [*state.visible, *state.quarantined]
            )
        }
        for state in states:
            key = (state.incident_id, state.bare)
            started = evidence.get(key)
            if started is not None and state.active and not started.source.done():
                started.source.set_result(
                    EvidenceSource(state.mailbox, state.visible[0], key in repeated)
                )
        for state in states:
            key = (state.incident_id, state.bare)
            started = evidence.get(key)
            source = state.hidden_source
            if started is not None and source is not None and not started.source.done():
                started.source.set_result(EvidenceSource(state.mailbox, source, True))
        for started in evidence.values():
            if not started.source.done():
                # No pull of this message needs an evidence copy any more.
                started.source.cancel()
                started.source_read.set()

    def settle_marked(
        self, states: list[_Pull], evidence: dict[EvidenceKey, _Evidence]
    ) -> None:
        """Tell each evidence copy whether a pull of its message is marked now.

        A pull still active after phase 2 had its markers stored, and a pull
        whose copies were all hidden already carries its marker from an earlier
        run.
        """
        marked = {
            (state.incident_id, state.bare)
            for state in states
            if (state.active and state.visible) or state.hidden_source is not None
        }
        for key, started in evidence.items():
            if not started.marked.done():
                started.marked.set_result(key in marked)

    async def finish_evidence(
        self,
        states: list[_Pull],
        evidence: dict[EvidenceKey, _Evidence],
    ) -> None:
        """Wait for the evidence copies; a pull without one is not complete."""
        locations: dict[EvidenceKey, str | ConnectorError] = {}
        for key, started in evidence.items():
            try:
                locations[key] = await started.task
            except ConnectorError as error:
                locations[key] = error
            except asyncio.CancelledError:
                if not started.source.cancelled():
                    raise
        for state in states:
            location = locations.get((state.incident_id, state.bare))
            if state.hidden_source is not None and isinstance(
                state.outcome, QuarantineResult
            ):
                state.outcome = self._hidden_outcome(state, state.outcome, location)
                continue
            if not state.active:
                continue
            if isinstance(location, ConnectorError):
                state.outcome = TransientError(
                    f"The copies of <{state.bare}> in mailbox {state.mailbox} are in "
                    "quarantine, but the evidence copy failed "
                    f"({location}); the quarantine will be retried.",
                    mailbox=state.mailbox,
                    message_id=state.bare,
                    platform=PLATFORM,
                )
                continue
            state.outcome = QuarantineResult(
                mailbox=state.mailbox,
                message_id=state.bare,
                copies=tuple(
                    c.public(state.mailbox, state.bare) for c in state.visible
                ),
                evidence_location=location,
            )

    @staticmethod
    def _hidden_outcome(
        state: _Pull,
        done: QuarantineResult,
        location: str | ConnectorError | None,
    ) -> Outcome:
        """Report a pull whose copies were hidden already, with its evidence copy."""
        if isinstance(location, ConnectorError):
            return TransientError(
                f"The copies of <{state.bare}> in mailbox {state.mailbox} are in "
                f"quarantine, but the evidence copy failed ({location}); the "
                "quarantine will be retried.",
                mailbox=state.mailbox,
                message_id=state.bare,
                platform=PLATFORM,
            )
        if location is None:
            return done
        return replace(done, evidence_location=location)

    # --- phase 2 ----------------------------------------------------------------------

    async def mark(self, states: list[_Pull]) -> None:
        """Mark each visible copy and create missing hidden folders."""
        active = [s for s in states if s.active]
        requests: list[InnerRequest] = []
        owners: list[tuple[_Pull, str]] = []
        # Two pulls of one mailbox share its hidden folder, and Graph refuses to
        # create it twice (ErrorFolderExists), so the first pull creates it and the
        # others wait for its id.
        creators: dict[str, _Pull] = {}
        sharers: list[_Pull] = []
        body: dict[str, Any]
        for state in active:
            for copy in state.visible:
                marker = QuarantineMarker(
                    state.incident_id, copy.folder_id, copy.folder_name, copy.read
                )
                body = {
                    "singleValueExtendedProperties": [
                        {"id": MARKER_PROPERTY_ID, "value": marker.to_json()}
                    ]
                }
                path = f"messages/{quote(copy.item_id, safe='')}"
                requests.append(
                    InnerRequest(
                        state.mailbox, "PATCH", _url(state.mailbox, path), body
                    )
                )
                owners.append((state, "marker"))
            if state.hidden_folder is None and state.mailbox.lower() in creators:
                sharers.append(state)
            elif state.hidden_folder is None:
                creators[state.mailbox.lower()] = state
                body = {"displayName": self.hidden_name, "isHidden": True}
                requests.append(
                    InnerRequest(
                        state.mailbox, "POST", _url(state.mailbox, "mailFolders"), body
                    )
                )
                owners.append((state, "folder"))
        responses = await self.sender.run(requests)

        for (state, kind), response in zip(owners, responses, strict=True):
            if not state.active:
                continue
            error = inner_error(response, state.mailbox, state.bare)
            if error is not None:
                state.outcome = _retry_alone(state, error)
                continue
            if kind == "folder":
                assert isinstance(response, InnerResponse)
                folder_id = str((response.body or {}).get("id") or "")
                if not folder_id:
                    state.outcome = _retry_alone(
                        state,
                        TransientError(
                            f"Graph created the hidden folder of mailbox "
                            f"{state.mailbox} without returning its id.",
                            mailbox=state.mailbox,
                            platform=PLATFORM,
                        ),
                    )
                    continue
                state.hidden_folder = folder_id
                self.platform._hidden_folders[state.mailbox.lower()] = folder_id

        for state in sharers:
            if not state.active:
                continue
            created = creators[state.mailbox.lower()].hidden_folder
            if created is None:
                state.outcome = _retry_alone(
                    state,
                    TransientError(
                        f"The hidden folder of mailbox {state.mailbox} was not "
                        "created in this burst.",
                        mailbox=state.mailbox,
                        platform=PLATFORM,
                    ),
                )
            else:
                state.hidden_folder = created

    # --- phase 3 ----------------------------------------------------------------------

    async def move(
        self,
        states: list[_Pull],
        evidence: dict[EvidenceKey, _Evidence],
    ) -> None:
        """Move every visible copy into its mailbox's hidden folder."""
        # An evidence source is moved only after its MIME content was read.
        for started in evidence.values():
            await started.source_read.wait()
        active = [s for s in states if s.active]
        requests: list[InnerRequest] = []
        owners: list[_Pull] = []
        for state in active:
            assert state.hidden_folder is not None
            for copy in state.visible:
                path = f"messages/{quote(copy.item_id, safe='')}/move"
                body = {"destinationId": state.hidden_folder}
                requests.append(
                    InnerRequest(state.mailbox, "POST", _url(state.mailbox, path), body)
                )
                owners.append(state)
        responses = await self.sender.run(requests)

        for state, response in zip(owners, responses, strict=True):
            if not state.active:
                continue
            error = inner_error(response, state.mailbox, state.bare)
            if error is not None:
                state.outcome = _retry_alone(state, error)
                continue
            assert isinstance(response, InnerResponse)
            state.moved_ids.append(str((response.body or {}).get("id") or ""))

    # --- phase 4 ----------------------------------------------------------------------

    async def verify(self, states: list[_Pull]) -> None:
        """Search again: every copy must now sit in the hidden folder."""
        active = [s for s in states if s.active]
        responses = await self.sender.run([self._search_request(s) for s in active])
        for state, response in zip(active, responses, strict=True):
            messages = self._messages(state, response)
            if messages is None:
                state.outcome = _retry_alone(state, state.outcome)
                continue
            places = {_text(m, "id"): _text(m, "parentFolderId") for m in messages}
            left = [i for i, folder in places.items() if folder != state.hidden_folder]
            missing = [
                i for i in state.moved_ids if places.get(i) != state.hidden_folder
            ]
            if left or missing:
                state.outcome = TransientError(
                    f"Quarantine of <{state.bare}> in mailbox {state.mailbox} is not "
                    f"complete: {len(left)} copies still visible and {len(missing)} "
                    "moved copies not found in the hidden folder; run the quarantine "
                    "again.",
                    mailbox=state.mailbox,
                    message_id=state.bare,
                    platform=PLATFORM,
                )


# --- helpers --------------------------------------------------------------------------


def _url(mailbox: str, path: str, query: dict[str, str] | None = None) -> str:
    """Build a batch URL relative to the API version, every value percent-encoded."""
    url = f"/users/{quote(mailbox, safe='@')}/{path}"
    if query:
        url += "?" + "&".join(
            f"{name}={quote(value, safe='')}" for name, value in query.items()
        )
    return url


def _text(message: dict[str, Any], name: str) -> str:
    return str(message.get(name) or "")


def _marker_of_json(message: dict[str, Any]) -> QuarantineMarker | None:
    for prop in message.get("singleValueExtendedProperties") or []:
        if not isinstance(prop, dict):
            continue
        if str(prop.get("id") or "").lower() == MARKER_PROPERTY_ID.lower():
            return QuarantineMarker.from_json(prop.get("value"))
    return None


def _renamed(copy: _Copy, name: str) -> _Copy:
    return _Copy(
        copy.item_id,
        copy.folder_id,
        name,
        copy.read,
        copy.subject,
        copy.received_at,
        copy.marker,
    )


def _retry_alone(state: _Pull, error: Outcome | None) -> ConnectorError:
    """Turn a failed step into an error that makes the caller retry the pull alone."""
    if isinstance(error, ConnectorError) and not isinstance(error, NotFoundError):
        return error
    # A copy that vanished between phases is found afresh by the single path.
    return TransientError(
        f"A copy of <{state.bare}> in mailbox {state.mailbox} changed while it was "
        "being quarantined; the quarantine will be retried.",
        mailbox=state.mailbox,
        message_id=state.bare,
        platform=PLATFORM,
    )
