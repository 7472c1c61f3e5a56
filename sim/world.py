"""The mail world every simulator serves: tenants, mailboxes, folders and messages.

A world starts from a scenario file (JSON, written by people) and lives on in a state
file (JSON, written by the simulator after every change), so a second run finds the
changes of the first. Each copy of a message in a mailbox is an `Item` with the full
raw MIME and a stable item id. Fields such as `malicious` and `verdict` are ground truth
for tests and the demo; no simulator serves them to a client.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from email.header import decode_header, make_header
from email.message import Message
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import compat32
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

logger = logging.getLogger(__name__)

STATE_VERSION = 1

# Well-known folder names (Microsoft Graph mailFolder names) and their display names.
# `msgfolderroot` is the top of the visible tree; Recoverable Items sit outside it.
WELL_KNOWN_FOLDERS: dict[str, str] = {
    "msgfolderroot": "Top of Information Store",
    "inbox": "Inbox",
    "drafts": "Drafts",
    "sentitems": "Sent Items",
    "deleteditems": "Deleted Items",
    "junkemail": "Junk Email",
    "archive": "Archive",
    "outbox": "Outbox",
    "conversationhistory": "Conversation History",
    "recoverableitemsdeletions": "Deletions",
}
ROOT_FOLDER = "msgfolderroot"
RECOVERABLE_FOLDER = "recoverableitemsdeletions"

Platform = Literal["graph", "ews", "gmail", "imap"]


class WorldError(Exception):
    """A request the world cannot carry out."""


class ScenarioError(WorldError):
    """The scenario or state file is invalid."""


class UnknownMailboxError(WorldError):
    """No mailbox has the given address."""


class FolderNotFoundError(WorldError):
    """No folder of the mailbox has the given id or well-known name."""


class FolderExistsError(WorldError):
    """A sibling folder already has the requested display name."""


class ItemNotFoundError(WorldError):
    """No item of the mailbox has the given id."""


# --- scenario file models -----------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TenantSpec(_Strict):
    """A mail domain, the platform hosting it and, for Graph, the app credentials."""

    domain: str
    platform: Platform
    tenant_id: str | None = None
    client_id: str | None = None
    client_secret: str | None = None
    permissions: list[str] = Field(default_factory=lambda: ["Mail.ReadWrite"])
    # Gmail: the service account allowed domain-wide delegation for this domain, the
    # PEM public key its JWT assertions are checked with, and the delegated scopes.
    service_account: str | None = None
    public_key_pem: str | None = None
    delegated_scopes: list[str] = Field(
        default_factory=lambda: ["https://mail.google.com/"]
    )


class FolderSpec(_Strict):
    """A user folder; `parent` is a well-known name or a path of display names."""

    name: str
    parent: str = ROOT_FOLDER
    hidden: bool = False


class MailboxSpec(_Strict):
    """A mailbox and its user folders; well-known folders are always created."""

    address: str
    display_name: str | None = None
    platform: Platform | None = None
    folders: list[FolderSpec] = Field(default_factory=list)


class DeliverySpec(_Strict):
    """One copy of a message in one folder of one mailbox."""

    mailbox: str
    folder: str = "inbox"
    read: bool = False
    received: datetime | None = None
    labels: list[str] = Field(default_factory=list)


class AttachmentSpec(_Strict):
    """A file attached to a message; give `text` or `content_base64`."""

    filename: str
    content_type: str = "application/octet-stream"
    text: str | None = None
    content_base64: str | None = None


class MessageSpec(_Strict):
    """A distinct message: either full `raw` MIME, or headers and body to build it."""

    key: str
    raw: str | None = None
    message_id: str | None = None
    sender: str | None = Field(default=None, alias="from")
    to: list[str] = Field(default_factory=list)
    cc: list[str] = Field(default_factory=list)
    subject: str | None = None
    date: datetime | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    body: str = ""
    html: str | None = None
    attachments: list[AttachmentSpec] = Field(default_factory=list)
    deliveries: list[DeliverySpec] = Field(default_factory=list)
    malicious: bool = False
    verdict: str | None = None
    note: str | None = None


class DistributionListSpec(_Strict):
    """A distribution list and its member addresses (which may be lists again)."""

    address: str
    members: list[str]


class ForwardingRuleSpec(_Strict):
    """A mailbox-level forward or an inbox rule that sends mail on.

    A rule with `enabled` false is listed by the rule APIs but sends nothing.
    """

    mailbox: str
    forward_to: list[str]
    kind: Literal["redirect", "forward", "forward_as_attachment"] = "redirect"
    keep_copy: bool = True
    enabled: bool = True


class ScenarioSpec(_Strict):
    """The whole scenario file."""

    name: str = "scenario"
    description: str | None = None
    tenants: list[TenantSpec]
    mailboxes: list[MailboxSpec]
    messages: list[MessageSpec] = Field(default_factory=list)
    distribution_lists: list[DistributionListSpec] = Field(default_factory=list)
    forwarding_rules: list[ForwardingRuleSpec] = Field(default_factory=list)


# --- live state -----------------------------------------------------------------------


@dataclass
class Folder:
    """A mail folder of one mailbox."""

    folder_id: str
    mailbox: str
    display_name: str
    parent_id: str | None
    well_known: str | None = None
    hidden: bool = False


@dataclass
class Mailbox:
    """A mailbox with its folders, keyed by folder id."""

    address: str
    display_name: str
    platform: Platform | None = None
    folders: dict[str, Folder] = field(default_factory=dict)


@dataclass(frozen=True)
class MimeSummary:
    """The fields an API shows from a raw MIME message."""

    internet_message_id: str | None
    subject: str
    sender: tuple[str, str] | None
    to: tuple[tuple[str, str], ...]
    cc: tuple[tuple[str, str], ...]
    sent_at: datetime | None
    has_attachments: bool
    body_type: Literal["text", "html"]
    body: str
    headers: tuple[tuple[str, str], ...]


@dataclass
class Item:
    """One copy of a message in one folder, with its raw MIME and its flags."""

    item_id: str
    mailbox: str
    folder_id: str
    mime: bytes
    received_at: datetime
    is_read: bool = False
    is_draft: bool = False
    created_at: datetime | None = None
    modified_at: datetime | None = None
    version: int = 1
    categories: list[str] = field(default_factory=list)
    flag_status: str = "notFlagged"
    importance: str = "normal"
    extended_properties: dict[str, str] = field(default_factory=dict)
    key: str | None = None
    malicious: bool = False
    verdict: str | None = None
    # Gmail labels beyond the one the folder stands for, such as STARRED.
    labels: list[str] = field(default_factory=list)

    @cached_property
    def summary(self) -> MimeSummary:
        """Header and body fields parsed from the raw MIME."""
        return summarize_mime(self.mime)


@dataclass
class CatalogEntry:
    """A distinct scenario message, delivered or not, with its ground truth."""

    key: str
    internet_message_id: str | None
    mime: bytes
    delivered_to: list[str]
    malicious: bool = False
    verdict: str | None = None
    note: str | None = None


class _ItemIndex(dict[str, Item]):
    """Items by id that also index their ids by mailbox, for per-mailbox lookups.

    An item never changes mailbox (a move stays inside one), so the index follows
    only additions and removals.
    """

    def __init__(self) -> None:
        super().__init__()
        self.by_mailbox: dict[str, dict[str, Item]] = {}

    def __setitem__(self, item_id: str, item: Item) -> None:
        previous = self.get(item_id)
        if previous is not None:
            self.by_mailbox[previous.mailbox].pop(item_id, None)
        super().__setitem__(item_id, item)
        self.by_mailbox.setdefault(item.mailbox, {})[item_id] = item

    def __delitem__(self, item_id: str) -> None:
        item = self[item_id]
        super().__delitem__(item_id)
        self.by_mailbox[item.mailbox].pop(item_id, None)

    def clear(self) -> None:
        super().clear()
        self.by_mailbox.clear()


class World:
    """The live mail world: mailboxes, folders and items, saved to a state file."""

    def __init__(
        self,
        scenario: ScenarioSpec,
        *,
        state_path: Path | None = None,
    ) -> None:
        self.scenario = scenario
        self.state_path = state_path
        self.tenants: dict[str, TenantSpec] = {
            tenant.domain.lower(): tenant for tenant in scenario.tenants
        }
        self.mailboxes: dict[str, Mailbox] = {}
        self.items: _ItemIndex = _ItemIndex()
        self.catalog: dict[str, CatalogEntry] = {}
        self.serial = 0

    # --- loading and saving -----------------------------------------------------------

    @classmethod
    def open(
        cls, scenario_path: Path, state_path: Path | None, *, reset: bool = False
    ) -> World:
        """Load the state file if it exists (and `reset` is false), else the scenario.

        The state is written back at once, so the state file exists from the start.
        """
        scenario = load_scenario(scenario_path)
        world = cls(scenario, state_path=state_path)
        if state_path is not None and state_path.exists() and not reset:
            world._load_state(state_path)
            logger.info("Loaded mail world state path=%s", state_path)
        else:
            world.populate()
            logger.info("Loaded mail world scenario path=%s", scenario_path)
        world.save()
        return world

    @classmethod
    def from_scenario(cls, scenario: ScenarioSpec | dict[str, Any]) -> World:
        """Build a world in memory from a scenario, without a state file."""
        if isinstance(scenario, dict):
            scenario = parse_scenario(scenario)
        world = cls(scenario)
        world.populate()
        return world

    def populate(self) -> None:
        """Fill the world from the scenario, dropping any current state."""
        self.mailboxes.clear()
        self.items.clear()
        self.catalog.clear()
        self.serial = 0
        for spec in self.scenario.mailboxes:
            self._add_mailbox(spec)
        for message in self.scenario.messages:
            self._add_scenario_message(message)

    def save(self) -> None:
        """Write the state file atomically: a temporary file, then a rename.

        NOTE: every save rewrites the whole world, so its cost grows with the number
        and size of messages. That suits demo and test worlds of a few hundred
        messages, not benchmark worlds of many thousands.
        """
        if self.state_path is None:
            return
        data = json.dumps(self.to_state(), indent=1, sort_keys=True)
        directory = self.state_path.parent
        directory.mkdir(parents=True, exist_ok=True)
        handle, temp_name = tempfile.mkstemp(
            dir=directory, prefix=f".{self.state_path.name}.", suffix=".tmp"
        )
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as stream:
                stream.write(data)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temp_name, self.state_path)
        except BaseException:
            Path(temp_name).unlink(missing_ok=True)
            raise

    def to_state(self) -> dict[str, Any]:
        """Return the live state as plain JSON data."""
        return {
            "version": STATE_VERSION,
            "scenario": self.scenario.name,
            "serial": self.serial,
            "mailboxes": [_mailbox_to_state(box) for box in self.mailboxes.values()],
            "items": [_item_to_state(item) for item in self.items.values()],
            "catalog": [_catalog_to_state(entry) for entry in self.catalog.values()],
        }

    def _load_state(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ScenarioError(
                f"The state file {path} could not be read ({exc}); delete it or start "
                "with --reset to begin again from the scenario."
            ) from exc
        if data.get("version") != STATE_VERSION:
            raise ScenarioError(
                f"The state file {path} has version {data.get('version')!r}, expected "
                f"{STATE_VERSION}; start with --reset to begin again from the scenario."
            )
        self.serial = int(data["serial"])
        for raw_box in data["mailboxes"]:
            box = _mailbox_from_state(raw_box)
            self.mailboxes[box.address.lower()] = box
        for raw_item in data["items"]:
            item = _item_from_state(raw_item)
            self.items[item.item_id] = item
        for raw_entry in data["catalog"]:
            entry = _catalog_from_state(raw_entry)
            self.catalog[entry.key] = entry

    # --- building from the scenario ---------------------------------------------------

    def _add_mailbox(self, spec: MailboxSpec) -> None:
        address = spec.address.lower()
        if self.tenant_for(address) is None:
            raise ScenarioError(
                f"Mailbox {spec.address} has a domain that no tenant lists; add a "
                "tenant for its domain."
            )
        display_name = spec.display_name or address.split("@", 1)[0].title()
        box = Mailbox(address, display_name, spec.platform)
        self.mailboxes[address] = box

        root = self._new_folder(box, WELL_KNOWN_FOLDERS[ROOT_FOLDER], None, ROOT_FOLDER)
        for name, display in WELL_KNOWN_FOLDERS.items():
            if name == ROOT_FOLDER:
                continue
            parent = None if name == RECOVERABLE_FOLDER else root.folder_id
            self._new_folder(box, display, parent, name)
        for folder_spec in spec.folders:
            parent_folder = self.resolve_folder_path(address, folder_spec.parent)
            self._new_folder(
                box,
                folder_spec.name,
                parent_folder.folder_id,
                hidden=folder_spec.hidden,
            )

    def _new_folder(
        self,
        box: Mailbox,
        display_name: str,
        parent_id: str | None,
        well_known: str | None = None,
        *,
        hidden: bool = False,
    ) -> Folder:
        path = f"{parent_id}/{display_name}" if parent_id else display_name
        folder_id = make_id("folder", box.address, path.lower())
        if folder_id in box.folders:
            raise ScenarioError(
                f"Mailbox {box.address} defines folder {display_name!r} twice under "
                "the same parent; give each folder its own name."
            )
        folder = Folder(
            folder_id, box.address, display_name, parent_id, well_known, hidden
        )
        box.folders[folder_id] = folder
        return folder

    def _add_scenario_message(self, spec: MessageSpec) -> None:
        if spec.key in self.catalog:
            raise ScenarioError(
                f"Message key {spec.key!r} is used twice; give each message its own "
                "key."
            )
        mime = build_mime(spec)
        summary = summarize_mime(mime)
        self.catalog[spec.key] = CatalogEntry(
            key=spec.key,
            internet_message_id=summary.internet_message_id,
            mime=mime,
            delivered_to=[delivery.mailbox.lower() for delivery in spec.deliveries],
            malicious=spec.malicious,
            verdict=spec.verdict,
            note=spec.note,
        )
        default_received = (summary.sent_at or datetime(2026, 1, 1, tzinfo=UTC)) + (
            timedelta(seconds=5)
        )
        for index, delivery in enumerate(spec.deliveries):
            address = delivery.mailbox.lower()
            if address not in self.mailboxes:
                raise ScenarioError(
                    f"Message {spec.key} is delivered to {delivery.mailbox}, which is "
                    "not in the mailboxes list; add the mailbox first."
                )
            folder = self.resolve_folder_path(address, delivery.folder)
            received = _as_utc(delivery.received or default_received)
            item = Item(
                item_id=make_id("item", address, spec.key, str(index)),
                mailbox=address,
                folder_id=folder.folder_id,
                mime=mime,
                received_at=received,
                is_read=delivery.read,
                created_at=received,
                modified_at=received,
                key=spec.key,
                malicious=spec.malicious,
                verdict=spec.verdict,
                labels=list(delivery.labels),
            )
            self.items[item.item_id] = item

    # --- queries ----------------------------------------------------------------------

    def tenant_for(self, address: str) -> TenantSpec | None:
        """Return the tenant whose domain the address belongs to."""
        domain = address.rsplit("@", 1)[-1].lower()
        return self.tenants.get(domain)

    def platform_of(self, address: str) -> Platform | None:
        """Return the platform that hosts a mailbox, or None for an unknown address."""
        box = self.mailboxes.get(address.lower())
        tenant = self.tenant_for(address)
        if box is None or tenant is None:
            return None
        return box.platform or tenant.platform

    def mailbox(self, address: str) -> Mailbox:
        """Return a mailbox by address, compared case-insensitively."""
        box = self.mailboxes.get(address.lower())
        if box is None:
            raise UnknownMailboxError(f"No mailbox has the address {address!r}.")
        return box

    def folder(self, address: str, ref: str) -> Folder:
        """Return a folder by id or by well-known name (case-insensitive)."""
        box = self.mailbox(address)
        found = box.folders.get(ref)
        if found is not None:
            return found
        for folder in box.folders.values():
            if folder.well_known is not None and folder.well_known == ref.lower():
                return folder
        raise FolderNotFoundError(f"Mailbox {address} has no folder {ref!r}.")

    def resolve_folder_path(self, address: str, path: str) -> Folder:
        """Return a folder by well-known name or by a `/`-separated display-name path.

        A path starts at the top of the folder tree, or at a well-known folder named
        as its first part, so `Projects` and `inbox/Projects` both work.
        """
        try:
            return self.folder(address, path)
        except FolderNotFoundError:
            pass
        parts = [part for part in path.split("/") if part]
        if not parts:
            raise FolderNotFoundError(f"Mailbox {address} has no folder {path!r}.")
        try:
            current = self.folder(address, parts[0])
            parts = parts[1:]
        except FolderNotFoundError:
            current = self.folder(address, ROOT_FOLDER)
        for name in parts:
            child = self.child_named(address, current.folder_id, name)
            if child is None:
                raise FolderNotFoundError(
                    f"Mailbox {address} has no folder {path!r}: {name!r} is missing "
                    f"under {current.display_name!r}."
                )
            current = child
        return current

    def children(self, address: str, folder_id: str) -> list[Folder]:
        """List the direct child folders of a folder, in creation order."""
        box = self.mailbox(address)
        return [f for f in box.folders.values() if f.parent_id == folder_id]

    def child_named(self, address: str, parent_id: str, name: str) -> Folder | None:
        """Return the child folder with that display name (case-insensitive)."""
        for folder in self.children(address, parent_id):
            if folder.display_name.lower() == name.lower():
                return folder
        return None

    def folder_path(self, folder: Folder) -> str:
        """Return the display-name path of a folder below the top of the tree."""
        box = self.mailbox(folder.mailbox)
        names: list[str] = []
        current: Folder | None = folder
        while current is not None and current.well_known != ROOT_FOLDER:
            names.append(current.display_name)
            current = box.folders.get(current.parent_id) if current.parent_id else None
        return "/".join(reversed(names))

    def items_of(self, address: str, folder_id: str | None = None) -> Iterator[Item]:
        """Iterate the items of a mailbox, or of one of its folders."""
        key = address.lower()
        for item in list(self.items.by_mailbox.get(key, {}).values()):
            if folder_id is not None and item.folder_id != folder_id:
                continue
            yield item

    def item(self, address: str, item_id: str) -> Item:
        """Return an item of a mailbox by id."""
        found = self.items.get(item_id)
        if found is None or found.mailbox != address.lower():
            raise ItemNotFoundError(f"Mailbox {address} has no item {item_id!r}.")
        return found

    # --- changes ----------------------------------------------------------------------

    def create_folder(
        self, address: str, parent_id: str, display_name: str, *, hidden: bool = False
    ) -> Folder:
        """Create a child folder, or raise FolderExistsError for a taken name."""
        box = self.mailbox(address)
        parent = self.folder(address, parent_id)
        if self.child_named(address, parent.folder_id, display_name) is not None:
            raise FolderExistsError(
                f"Mailbox {address} already has a folder {display_name!r} under "
                f"{parent.display_name!r}."
            )
        self.serial += 1
        folder_id = make_id("folder", box.address, str(self.serial), display_name)
        folder = Folder(
            folder_id, box.address, display_name, parent.folder_id, None, hidden
        )
        box.folders[folder_id] = folder
        return folder

    def add_item(
        self,
        address: str,
        folder_id: str,
        mime: bytes,
        *,
        received_at: datetime,
        is_draft: bool = False,
        is_read: bool = False,
    ) -> Item:
        """Store a new item with a fresh id in a folder of a mailbox."""
        box = self.mailbox(address)
        folder = self.folder(address, folder_id)
        item = Item(
            item_id=self._next_item_id(box.address),
            mailbox=box.address,
            folder_id=folder.folder_id,
            mime=mime,
            received_at=received_at,
            is_read=is_read,
            is_draft=is_draft,
            created_at=received_at,
            modified_at=received_at,
        )
        self.items[item.item_id] = item
        return item

    def move_item(
        self, address: str, item_id: str, folder_id: str, now: datetime
    ) -> Item:
        """Move an item to another folder of its mailbox, where it gets a new id."""
        item = self.item(address, item_id)
        folder = self.folder(address, folder_id)
        del self.items[item.item_id]
        item.item_id = self._next_item_id(item.mailbox)
        item.folder_id = folder.folder_id
        item.modified_at = now
        item.version += 1
        self.items[item.item_id] = item
        return item

    def copy_item(
        self, address: str, item_id: str, folder_id: str, now: datetime
    ) -> Item:
        """Copy an item into a folder of its mailbox; the copy has a new id."""
        source = self.item(address, item_id)
        folder = self.folder(address, folder_id)
        copy = Item(
            item_id=self._next_item_id(source.mailbox),
            mailbox=source.mailbox,
            folder_id=folder.folder_id,
            mime=source.mime,
            received_at=source.received_at,
            is_read=source.is_read,
            is_draft=source.is_draft,
            created_at=now,
            modified_at=now,
            categories=list(source.categories),
            flag_status=source.flag_status,
            importance=source.importance,
            extended_properties=dict(source.extended_properties),
            key=source.key,
            malicious=source.malicious,
            verdict=source.verdict,
            labels=list(source.labels),
        )
        self.items[copy.item_id] = copy
        return copy

    def remove_item(self, address: str, item_id: str) -> Item:
        """Remove an item from the mailbox for good."""
        item = self.item(address, item_id)
        del self.items[item.item_id]
        return item

    def _next_item_id(self, address: str) -> str:
        self.serial += 1
        return make_id("item", address, "serial", str(self.serial))

    # --- views for tests and the demo -------------------------------------------------

    def snapshot(self, address: str) -> list[dict[str, Any]]:
        """Describe every item of a mailbox: folder, read state, marker headers."""
        box = self.mailbox(address)
        rows = []
        for item in sorted(self.items_of(address), key=lambda i: i.received_at):
            folder = box.folders[item.folder_id]
            summary = item.summary
            marker_headers = {
                name: value
                for name, value in summary.headers
                if name.lower().startswith("x-autopull-")
            }
            rows.append(
                {
                    "id": item.item_id,
                    "key": item.key,
                    "internet_message_id": summary.internet_message_id,
                    "subject": summary.subject,
                    "folder_id": folder.folder_id,
                    "folder": folder.display_name,
                    "folder_path": self.folder_path(folder),
                    "well_known_folder": folder.well_known,
                    "hidden_folder": folder.hidden,
                    "is_read": item.is_read,
                    "is_draft": item.is_draft,
                    "received": _iso(item.received_at),
                    "extended_properties": dict(item.extended_properties),
                    "marker_headers": marker_headers,
                    "malicious": item.malicious,
                    "verdict": item.verdict,
                }
            )
        return rows

    def folders_snapshot(self, address: str) -> list[dict[str, Any]]:
        """Describe every folder of a mailbox with its path and item count."""
        box = self.mailbox(address)
        counts: dict[str, int] = {}
        for item in self.items_of(address):
            counts[item.folder_id] = counts.get(item.folder_id, 0) + 1
        return [
            {
                "id": folder.folder_id,
                "display_name": folder.display_name,
                "path": self.folder_path(folder),
                "parent_id": folder.parent_id,
                "well_known": folder.well_known,
                "hidden": folder.hidden,
                "items": counts.get(folder.folder_id, 0),
            }
            for folder in box.folders.values()
        ]


# --- scenario parsing and MIME ------------------------------------------------------


def load_scenario(path: Path) -> ScenarioSpec:
    """Read and validate a scenario file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ScenarioError(
            f"The scenario file {path} could not be read as JSON: {exc}."
        ) from exc
    try:
        return parse_scenario(data)
    except ScenarioError as exc:
        raise ScenarioError(f"The scenario file {path} is invalid: {exc}") from exc


def parse_scenario(data: dict[str, Any]) -> ScenarioSpec:
    """Validate scenario data; errors name the field at fault."""
    try:
        return ScenarioSpec.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
            for error in exc.errors()
        )
        raise ScenarioError(f"{problems}. Fix these fields and load it again.") from exc


def build_mime(spec: MessageSpec) -> bytes:
    """Return the raw MIME of a scenario message, with CRLF line ends.

    A `raw` message is used as given. Otherwise the headers are written verbatim
    (so odd Message-IDs reach the MIME unchanged) and the body parts are built with
    the standard library's MIME classes.
    """
    if spec.raw is not None:
        return _crlf(spec.raw.encode("utf-8"))

    if spec.message_id is None or spec.sender is None or spec.subject is None:
        raise ScenarioError(
            f"Message {spec.key} needs message_id, from and subject when raw is not "
            "given."
        )
    body = _text_part(spec.body, "plain")
    content: Message = body
    if spec.html is not None:
        alternative = MIMEMultipart("alternative")
        alternative.attach(body)
        alternative.attach(_text_part(spec.html, "html"))
        content = alternative
    if spec.attachments:
        mixed = MIMEMultipart("mixed")
        mixed.attach(content)
        for attachment in spec.attachments:
            mixed.attach(_attachment_part(spec.key, attachment))
        content = mixed

    date = _as_utc(spec.date or datetime(2026, 1, 1, tzinfo=UTC))
    headers = {
        "Message-ID": spec.message_id,
        "Date": email.utils.format_datetime(date),
        "From": spec.sender,
        "To": ", ".join(spec.to),
        "Subject": spec.subject,
    }
    if spec.cc:
        headers["Cc"] = ", ".join(spec.cc)
    headers.update(spec.headers)
    headers["MIME-Version"] = "1.0"
    del content["MIME-Version"]

    lines = []
    for name, value in headers.items():
        if "\r" in value or "\n" in value:
            raise ScenarioError(
                f"Header {name} of message {spec.key} contains a line break; write "
                "it on one line."
            )
        lines.append(f"{name}: {_encode_header(value)}\n")
    head = "".join(lines).encode("utf-8")
    return _crlf(head + content.as_bytes(policy=compat32))


def _text_part(text: str, subtype: str) -> Message:
    # ASCII bodies stay readable in the raw MIME (7bit); others are base64 in UTF-8.
    charset = "us-ascii" if text.isascii() else "utf-8"
    return MIMEText(text, subtype, charset)


def _attachment_part(key: str, spec: AttachmentSpec) -> Message:
    if spec.text is not None:
        data = spec.text.encode("utf-8")
    elif spec.content_base64 is not None:
        data = base64.b64decode(spec.content_base64)
    else:
        raise ScenarioError(
            f"Attachment {spec.filename!r} of message {key} needs text or "
            "content_base64."
        )
    maintype, _, subtype = spec.content_type.partition("/")
    part = MIMEApplication(data, subtype or "octet-stream")
    if maintype != "application":
        del part["Content-Type"]
        part["Content-Type"] = spec.content_type
    part.add_header("Content-Disposition", "attachment", filename=spec.filename)
    return part


def _encode_header(value: str) -> str:
    if value.isascii():
        return value
    return make_header([(value.encode("utf-8"), "utf-8")]).encode()


def _crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def summarize_mime(mime: bytes) -> MimeSummary:
    """Parse the fields APIs show from raw MIME, tolerating odd Message-IDs.

    Headers are read with the `compat32` policy, which keeps values as written, and
    unfolded by hand, so ids that break the strict parser come through whole.
    """
    message = message_from_bytes(mime, policy=compat32)
    headers = tuple((name, _unfold(str(value))) for name, value in message.items())
    raw_id = message.get("Message-ID")
    internet_message_id = _unfold(str(raw_id)).strip() if raw_id is not None else None

    senders = email.utils.getaddresses([_decode(message.get("From", ""))])
    sender = senders[0] if senders and senders[0][1] else None
    to = tuple(
        email.utils.getaddresses([_decode(v) for v in message.get_all("To", [])])
    )
    cc = tuple(
        email.utils.getaddresses([_decode(v) for v in message.get_all("Cc", [])])
    )

    sent_at = None
    if message.get("Date"):
        try:
            sent_at = _as_utc(email.utils.parsedate_to_datetime(str(message["Date"])))
        except (TypeError, ValueError):
            sent_at = None

    body_type, body = _first_body(message)
    has_attachments = any(
        part.get_content_disposition() == "attachment" for part in message.walk()
    )
    return MimeSummary(
        internet_message_id=internet_message_id,
        subject=_decode(message.get("Subject", "")),
        sender=sender,
        to=tuple(address for address in to if address[1]),
        cc=tuple(address for address in cc if address[1]),
        sent_at=sent_at,
        has_attachments=has_attachments,
        body_type=body_type,
        body=body,
        headers=headers,
    )


def _first_body(message: Message) -> tuple[Literal["text", "html"], str]:
    html: str | None = None
    for part in message.walk():
        if part.get_content_disposition() == "attachment":
            continue
        content_type = part.get_content_type()
        if content_type not in ("text/plain", "text/html"):
            continue
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            continue
        charset = part.get_content_charset() or "utf-8"
        text = payload.decode(charset, errors="replace")
        if content_type == "text/plain":
            return "text", text
        html = html or text
    if html is not None:
        return "html", html
    return "text", ""


def _decode(value: object) -> str:
    text = _unfold(str(value))
    try:
        return str(make_header(decode_header(text)))
    except (LookupError, ValueError):
        return text


def _unfold(value: str) -> str:
    # RFC 5322 unfolding removes each line break that comes before white space.
    return re.sub(r"\r?\n(?=[ \t])", "", value).strip()


def make_id(kind: str, *parts: str) -> str:
    """Return a stable opaque id, shaped like an Exchange id (base64 with padding)."""
    digest = hashlib.sha256("\x1f".join((kind, *parts)).encode("utf-8")).digest()
    body = base64.urlsafe_b64encode(digest[:33]).decode("ascii")
    prefix = "AAMkAF" if kind == "folder" else "AAMkAG"
    return f"{prefix}{body}AAA="


def _as_utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _iso(moment: datetime) -> str:
    return _as_utc(moment).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(text: str) -> datetime:
    return _as_utc(datetime.fromisoformat(text.replace("Z", "+00:00")))


# --- state (de)serialization ----------------------------------------------------------


def _mailbox_to_state(box: Mailbox) -> dict[str, Any]:
    return {
        "address": box.address,
        "display_name": box.display_name,
        "platform": box.platform,
        "folders": [
            {
                "id": f.folder_id,
                "display_name": f.display_name,
                "parent_id": f.parent_id,
                "well_known": f.well_known,
                "hidden": f.hidden,
            }
            for f in box.folders.values()
        ],
    }


def _mailbox_from_state(data: dict[str, Any]) -> Mailbox:
    box = Mailbox(data["address"], data["display_name"], data.get("platform"))
    for raw in data["folders"]:
        folder = Folder(
            raw["id"],
            box.address,
            raw["display_name"],
            raw["parent_id"],
            raw["well_known"],
            raw["hidden"],
        )
        box.folders[folder.folder_id] = folder
    return box


def _item_to_state(item: Item) -> dict[str, Any]:
    return {
        "id": item.item_id,
        "mailbox": item.mailbox,
        "folder_id": item.folder_id,
        "mime_base64": base64.b64encode(item.mime).decode("ascii"),
        "received_at": _iso(item.received_at),
        "created_at": _iso(item.created_at or item.received_at),
        "modified_at": _iso(item.modified_at or item.received_at),
        "is_read": item.is_read,
        "is_draft": item.is_draft,
        "version": item.version,
        "categories": item.categories,
        "flag_status": item.flag_status,
        "importance": item.importance,
        "extended_properties": item.extended_properties,
        "key": item.key,
        "malicious": item.malicious,
        "verdict": item.verdict,
        "labels": item.labels,
    }


def _item_from_state(data: dict[str, Any]) -> Item:
    return Item(
        item_id=data["id"],
        mailbox=data["mailbox"],
        folder_id=data["folder_id"],
        mime=base64.b64decode(data["mime_base64"]),
        received_at=_parse_time(data["received_at"]),
        is_read=data["is_read"],
        is_draft=data["is_draft"],
        created_at=_parse_time(data["created_at"]),
        modified_at=_parse_time(data["modified_at"]),
        version=data["version"],
        categories=list(data["categories"]),
        flag_status=data["flag_status"],
        importance=data["importance"],
        extended_properties=dict(data["extended_properties"]),
        key=data["key"],
        malicious=data["malicious"],
        verdict=data["verdict"],
        labels=list(data.get("labels", [])),
    )


def _catalog_to_state(entry: CatalogEntry) -> dict[str, Any]:
    return {
        "key": entry.key,
        "internet_message_id": entry.internet_message_id,
        "mime_base64": base64.b64encode(entry.mime).decode("ascii"),
        "delivered_to": entry.delivered_to,
        "malicious": entry.malicious,
        "verdict": entry.verdict,
        "note": entry.note,
    }


def _catalog_from_state(data: dict[str, Any]) -> CatalogEntry:
    return CatalogEntry(
        key=data["key"],
        internet_message_id=data["internet_message_id"],
        mime=base64.b64decode(data["mime_base64"]),
        delivered_to=list(data["delivered_to"]),
        malicious=data["malicious"],
        verdict=data["verdict"],
        note=data["note"],
    )
