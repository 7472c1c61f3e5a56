"""Helpers of the crash tests: topic readers, a mail world and a holding IMAP proxy.

The crash tests stop a worker at one request of a quarantine, kill it with SIGKILL
and start another. The Graph, EWS and Gmail simulators hold a request through a
fault rule with `hold`. For Dovecot, `HoldingProxy` sits between the worker and
the server and holds a command instead.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import Consumer

from autopull.schemas import decode
from autopull.streams.settings import Settings
from autopull.streams.topics import full_name

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_WORLD = REPO_ROOT / "examples" / "worlds" / "demo.json"
QUARANTINE = "quarantine@example.com"


# --- topics ---------------------------------------------------------------------------


class TopicReader:
    """Read a topic from its start, keeping every record seen so far."""

    def __init__(self, settings: Settings, topic: str, *, raw_name: bool = False):
        self.consumer = Consumer(
            {
                "bootstrap.servers": settings.kafka_bootstrap,
                "group.id": f"{settings.topic_prefix}reader-{uuid.uuid4().hex}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
        name = topic if raw_name else full_name(settings, topic)
        self.consumer.subscribe([name])
        self.records: list[tuple[bytes | None, bytes | None]] = []

    def poll(self, seconds: float) -> None:
        """Fetch what arrives within `seconds`."""
        for message in self.consumer.consume(num_messages=500, timeout=seconds):
            if message.error() is None:
                self.records.append((message.key(), message.value()))

    def close(self) -> None:
        self.consumer.close()


def decoded(reader: TopicReader, record: str) -> list[dict[str, Any]]:
    """Decode every value of `reader` as an Avro `record`, skipping tombstones."""
    return [decode(record, value) for _, value in reader.records if value is not None]


def ledger_entries(reader: TopicReader) -> dict[tuple[str, str], dict[str, Any]]:
    """Return the latest ledger entry per (mailbox, Message-ID) from its changelog."""
    entries: dict[tuple[str, str], dict[str, Any]] = {}
    for key, value in reader.records:
        if key is None:
            continue
        mailbox, _, message_id = json.loads(key).partition("\x1f")
        if value is None:
            entries.pop((mailbox, message_id), None)
            continue
        entries[(mailbox, message_id)] = json.loads(value)
    return entries


def latest_by(records: list[dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    """Return the last record for each value of `key`."""
    latest: dict[str, dict[str, Any]] = {}
    for record in records:
        latest[record[key]] = record
    return latest


def wait_until(
    condition: Callable[[], bool], seconds: float, step: Callable[[], None]
) -> bool:
    """Run `step` until `condition` is true or `seconds` pass, and return it."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        step()
    return True


# --- processes ------------------------------------------------------------------------


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_sim(kind: str, world: Path, state: Path, log: Path, *extra: str) -> Any:
    """Start a simulator of `kind`; return its process and base URL, or fail."""
    port = free_port()
    output = log.open("wb")
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "autopull.sim", kind, "--world", str(world)),
            *("--state", str(state), "--port", str(port), *extra),
        ],
        stdout=output,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{url}/_sim/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"The {kind} simulator did not start: {log.read_text()}")
        time.sleep(0.1)


# --- the mail world -------------------------------------------------------------------


def crash_world(
    platform: str,
    messages: dict[str, str],
    path: Path,
    tenant: dict[str, Any] | None = None,
) -> Path:
    """Write the demo world on `platform`, with one message per mailbox in its inbox.

    `messages` maps each mailbox to the bare Message-ID of its message, and
    `tenant` adds fields to the tenant, such as a Gmail service account.
    """
    world = json.loads(DEMO_WORLD.read_text())
    world["tenants"][0]["platform"] = platform
    world["tenants"][0].update(tenant or {})
    world["mailboxes"] += [{"address": mailbox} for mailbox in messages]
    world["messages"] = [
        {
            "key": f"CRASH{number}",
            "malicious": True,
            "message_id": f"<{message_id}>",
            "from": "Payroll <payroll@campaign.example.net>",
            "to": [mailbox],
            "subject": f"Salary adjustment {number}",
            "date": "2026-12-01T08:00:00Z",
            "body": "Review at http://campaign.example.net/salary\n",
            "deliveries": [{"mailbox": mailbox, "folder": "inbox", "read": False}],
        }
        for number, (mailbox, message_id) in enumerate(messages.items())
    ]
    path.write_text(json.dumps(world))
    return path


def generic_alert(mailbox: str, message_id: str) -> bytes:
    """Return a generic JSON phishing alert for one copy of a message."""
    alert = {
        "json_version": "2.0",
        "classification": "phish",
        "email": {"message_id": f"<{message_id}>", "recipient": mailbox},
    }
    return json.dumps(alert).encode()


# --- a holding IMAP proxy -------------------------------------------------------------


@dataclass
class ImapHold:
    """Hold the first command of `user`'s sessions that matches `pattern`.

    With `after_seen`, the command counts only once the session has sent that
    pattern before (in a command or a literal), so a hold can sit after a step.
    """

    user: str
    pattern: bytes
    after_seen: bytes | None = None
    reached: threading.Event = field(default_factory=threading.Event)

    def wants(self, user: str | None, sent: bytes, chunk: bytes) -> bool:
        if self.reached.is_set() or user is None or user.lower() != self.user.lower():
            return False
        if self.after_seen is not None and not re.search(self.after_seen, sent):
            return False
        return re.search(self.pattern, chunk) is not None


_LOGIN = re.compile(rb'LOGIN "?([^"*\s]+)\*')


class HoldingProxy:
    """A TCP proxy on 127.0.0.1 that stops an IMAP session at a held command.

    A held command is never sent to the server. `release` closes the sessions that
    wait, as a server would see a client that died mid-session.
    """

    def __init__(self, server_port: int) -> None:
        self.server_port = server_port
        self.holds: list[ImapHold] = []
        self._released = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def hold(self, hold: ImapHold) -> None:
        self.holds.append(hold)

    def all_reached(self) -> bool:
        return all(hold.reached.is_set() for hold in self.holds)

    def release(self) -> None:
        self._released.set()

    def close(self) -> None:
        self._closing = True
        self._released.set()
        self._listener.close()

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.server_port))
            threading.Thread(
                target=self._client_to_server, args=(client, server), daemon=True
            ).start()
            threading.Thread(
                target=self._pump, args=(server, client), daemon=True
            ).start()

    def _client_to_server(self, client: socket.socket, server: socket.socket) -> None:
        user: str | None = None
        sent = b""
        try:
            while chunk := client.recv(65536):
                login = _LOGIN.search(chunk)
                if login and user is None:
                    user = login.group(1).decode()
                held = next((h for h in self.holds if h.wants(user, sent, chunk)), None)
                if held is not None:
                    held.reached.set()
                    self._released.wait()
                    break
                sent += chunk
                server.sendall(chunk)
        except OSError:
            pass
        finally:
            for end in (client, server):
                end.close()

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                target.sendall(chunk)
        except OSError:
            pass
        finally:
            for end in (source, target):
                end.close()
