"""Windowed grouping of alerts into incidents, and per-mailbox exposure counts.

Campaign and message windows are hopping windows (24 hours in steps of 1 hour by
default). When the first alert of a key arrives at time t, its incident is written
into the window that starts at the hour of t, one table write. An alert at time t2
looks at every window that starts within one window size, less one step, of the
hour of t2, before or after it. So the incident covers the hour-aligned span from
`floor(t) - size + step` to `floor(t) + size`: a later alert inside that span joins
it, and so does an earlier one that arrives out of order. An alert outside it opens
a new incident. Joining alerts write nothing.

Recipient windows are tumbling windows keyed by mailbox that keep the distinct
messages, clicks and campaigns each person received.

Window values are plain JSON-compatible dicts. Faust's `on_window_close` is not
used: it receives the raw per-key value, and windows restored from the changelog
after a restart never fire it, so each change is sent when it happens instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

from autopull.streams.incidents import incident_id_for
from autopull.streams.records import Record

WindowRange = tuple[float, float]

# Each recipient window keeps at most this many ids of each kind, so a mail bomb of
# thousands of messages to one mailbox does not grow one value without bound.
MAX_IDS_PER_WINDOW = 500

CLICK_CLASSES = frozenset({"click_permitted", "click_blocked"})

# The maximum of copies per mailbox that one event of the link agent sends. Faust
# lets a rebalance go on only once the events in progress are done, and sending
# the 45,000 copies of one alert in one event kept a rebalance waiting for 9 to
# 14 s (docs/benchmarks.md).
RECIPIENTS_PER_EVENT = 1000


class WindowLike(Protocol):
    """The part of a Faust window (hopping or tumbling) that grouping reads."""

    size: float
    step: float

    def ranges(self, timestamp: float) -> list[WindowRange]: ...

    def current(self, timestamp: float) -> WindowRange: ...


class WindowedTableLike(Protocol):
    """A Faust windowed table: `table[key][window_range]` reads and writes a window."""

    def __getitem__(self, key: Any) -> Any: ...


class IncidentWindows:
    """Hopping windows that name the incident of a key (a campaign or a message)."""

    def __init__(
        self, windowed: WindowedTableLike, raw: Mapping[Any, Any], window: WindowLike
    ) -> None:
        # `windowed` is the Faust WindowWrapper, through which writes reach the
        # changelog; `raw` is its underlying table, read with (key, range) tuples.
        self.windowed = windowed
        self.raw = raw
        self.window = window

    def find(self, key: str, at: float) -> Record | None:
        """Return the entry of the earliest incident whose span contains `at`."""
        # A window holds at most one incident, opened within its first step, so the
        # first entry in the order of window starts is the earliest incident.
        for window_range in self._neighbours(at):
            entry: Record | None = self.raw.get((key, window_range))
            if entry is not None:
                return entry
        return None

    def open(self, key: str, at: float, incident_id: str) -> Record:
        """Write an incident into the window that starts at the step containing `at`."""
        entry = {"incident_id": incident_id, "opened_at": at}
        self.windowed[key][self.window.current(at)] = entry
        return entry

    def _neighbours(self, at: float) -> list[WindowRange]:
        # The windows that start up to one size less one step before or after the
        # window of `at`. Faust's own ranges() gives only the earlier half.
        size, step = self.window.size, self.window.step
        start = self.window.current(at)[0]
        count = round(size / step)
        return [
            self.window.current(start + offset * step)
            for offset in range(1 - count, count)
        ]

    def join(
        self, key: str, at: float, proposed: str | None = None
    ) -> tuple[str, bool]:
        """Return the incident id for an alert of `key` at `at`, and whether it is new.

        Without an incident in the windows, `proposed` opens one, or, when None, an
        id derived from the key and the hour of `at`.
        """
        entry = self.find(key, at)
        if entry is not None:
            return str(entry["incident_id"]), False

        incident_id = proposed or incident_id_for(key, hour_of(at))
        self.open(key, at, incident_id)
        return incident_id, True


def hour_of(at: float) -> datetime:
    """Return the start of the UTC hour that contains the epoch time `at`."""
    return datetime.fromtimestamp(math.floor(at / 3600) * 3600, UTC)


def grouped_key(alert: Record) -> str:
    """Return the key of an alert's event on alerts.grouped: its message key or id."""
    return message_key(alert) or str(alert["alert_id"])


def message_key(alert: Record) -> str | None:
    """Return the key under which alerts about one message meet, or None.

    An alert without a Message-ID, or with one the source made up, has none, so it
    stays in the incident of its campaign.
    """
    message_id = alert.get("message_id")
    if not message_id or alert.get("message_id_synthetic"):
        return None
    return f"message:{message_id}"


def count_exposure(
    counts: Record | None, mailbox: str, enriched: Record, window_range: WindowRange
) -> Record:
    """Return the recipient window value after one alert for `mailbox`.

    The value keeps the ids it counted, so a replayed alert counts once.
    """
    counts = dict(counts or {"messages": [], "clicks": [], "campaigns": []})
    alert = enriched["alert"]
    if alert.get("event_class") in CLICK_CLASSES:
        if alert.get("clicker") in (None, "", mailbox):
            counts["clicks"] = _add_bounded(counts["clicks"], alert["alert_id"])
    else:
        key = alert.get("message_id") or alert["alert_id"]
        counts["messages"] = _add_bounded(counts["messages"], key)
    counts["campaigns"] = _add_bounded(counts["campaigns"], enriched["campaign_key"])
    counts["window"] = list(window_range)
    return counts


def exposure_record(mailbox: str, counts: Record) -> Record:
    """Build the Exposure record of one mailbox from its recipient window value."""
    start, end = counts["window"]
    return {
        "mailbox": mailbox,
        "window_start": datetime.fromtimestamp(start, UTC),
        "window_end": datetime.fromtimestamp(math.ceil(end), UTC),
        "messages": len(counts["messages"]),
        "clicks": len(counts["clicks"]),
        "campaigns": len(counts["campaigns"]),
    }


def for_mailbox(change: Record, recipient: Record) -> Record:
    """Return a copy of an alert_joined event trimmed to one recipient.

    The recipient windows need only that mailbox, and a copy per recipient of a
    campaign that reached thousands must not carry every other recipient too.
    """
    enriched = dict(change["alert"])
    alert = dict(enriched["alert"])
    alert["recipients"] = [recipient["mailbox"]]
    enriched["alert"] = alert
    enriched["recipients"] = [recipient]
    return {**change, "alert": enriched}


def recipient_slices(change: Record, size: int) -> list[Record]:
    """Split an alert_joined event into `exposure` events of `size` recipients at most.

    The link agent sends these to itself and sends the copies per mailbox of each
    in an event of its own. Each slice names only its own mailboxes as the alert's
    recipients, so that the slices together are not much larger than the event.
    """
    enriched = change["alert"]
    recipients = enriched["recipients"]
    slices = []
    for start in range(0, len(recipients), size):
        part = recipients[start : start + size]
        alert = {**enriched["alert"], "recipients": [r["mailbox"] for r in part]}
        sliced = {**enriched, "alert": alert, "recipients": part}
        slices.append({**change, "kind": "exposure", "alert": sliced})
    return slices


def _add_bounded(values: list[str], value: str) -> list[str]:
    if value in values or len(values) >= MAX_IDS_PER_WINDOW:
        return values
    return [*values, value]
