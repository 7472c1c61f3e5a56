"""Reading indicator feed files into a `StoreBuilder`, with a report per feed.

Formats:

- csv: columns `type,value,source,confidence,expires`, one indicator a line. A first
  line naming the columns (it has `type` and `value`) may put them in any order;
  without it the order above applies. `type` is ip (an address or CIDR range), host,
  url, md5, sha1, sha256 or hash (any of the three). `source`, `confidence` (0 to
  100) and `expires` (ISO 8601, UTC when no offset is given) may be empty, and then
  the feed's settings fill them in. Lines starting with `#` are comments.
- list: one indicator a line as abuse.ch publishes them (URLhaus URL and host file
  lists, Feodo Tracker and SSLBL IP lists, MalwareBazaar hash lists). `#` starts a
  comment; a hosts-file line (`0.0.0.0 evil.example.com`) lists its host name.
- stix: a STIX 2.1 bundle (see `stix`); misp: MISP event JSON (see `misp`).

A malformed line or object never aborts a feed: it is rejected with a reason in the
report. `FeedError` is raised only when the file as a whole cannot be read.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from autopull.connectors.intel import FeedFormat, FeedSettings, IndicatorKind
from autopull.connectors.intel.exceptions import FeedError, InvalidIndicatorError
from autopull.connectors.intel.indicators import (
    HashAlgorithm,
    guess_kind,
    normalize_hash,
)
from autopull.connectors.intel.store import StoreBuilder

logger = logging.getLogger(__name__)

# Rejections kept with their reasons per feed; all of them are counted.
MAX_KEPT_REJECTIONS = 100

CSV_COLUMNS = ("type", "value", "source", "confidence", "expires")

# CSV `type` values and the kind (and digest) each stands for.
TYPE_ALIASES: dict[str, tuple[IndicatorKind, HashAlgorithm | None]] = {
    "ip": ("ip", None),
    "ipv4": ("ip", None),
    "ipv6": ("ip", None),
    "cidr": ("ip", None),
    "host": ("host", None),
    "hostname": ("host", None),
    "domain": ("host", None),
    "url": ("url", None),
    "hash": ("hash", None),
    "md5": ("hash", "md5"),
    "sha1": ("hash", "sha1"),
    "sha-1": ("hash", "sha1"),
    "sha256": ("hash", "sha256"),
    "sha-256": ("hash", "sha256"),
}

_HOSTS_FILE_ADDRESSES = frozenset({"0.0.0.0", "127.0.0.1", "::", "::1"})
_INLINE_COMMENT = re.compile(r"\s+#.*$")


@dataclass(frozen=True)
class Rejection:
    """A line or object of a feed that was not used because it is malformed."""

    location: str
    value: str
    reason: str


@dataclass
class FeedReport:
    """Outcome of reading one feed file: counts, rejections and skip reasons."""

    path: Path
    format: FeedFormat
    source: str
    accepted: Counter[str] = field(default_factory=Counter)
    rejected: int = 0
    rejections: list[Rejection] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)

    @property
    def accepted_total(self) -> int:
        """Return the number of indicators added to the store."""
        return sum(self.accepted.values())

    def reject(self, location: str, value: str, reason: str) -> None:
        """Count a malformed line or object, keeping the first ones with reasons."""
        self.rejected += 1
        if len(self.rejections) < MAX_KEPT_REJECTIONS:
            self.rejections.append(Rejection(location, value, reason))

    def skip(self, reason: str) -> None:
        """Count a well-formed entry left out on purpose, by reason."""
        self.skipped[reason] += 1


class FeedReader:
    """Adds a feed's indicators to a builder and records the outcome in a report."""

    def __init__(
        self,
        feed: FeedSettings,
        builder: StoreBuilder,
        report: FeedReport,
        *,
        now: float,
    ) -> None:
        self.feed = feed
        self.source = feed.source_name
        self.report = report
        self.now = now
        self._builder = builder

    def offer(
        self,
        location: str,
        kind: IndicatorKind,
        value: str,
        *,
        algorithm: HashAlgorithm | None = None,
        source: str | None = None,
        confidence: int | None = None,
        expires: float | None = None,
    ) -> None:
        """Add one indicator, or count it as rejected or expired."""
        if expires is not None and expires <= self.now:
            self.report.skip("expired")
            return

        try:
            if algorithm is not None:
                value = normalize_hash(value, algorithm)
            stored = self._builder.add(
                kind,
                value,
                source=source or self.source,
                confidence=self.feed.confidence if confidence is None else confidence,
                expires=expires,
            )
        except InvalidIndicatorError as error:
            self.report.reject(location, value, error.reason)
            return
        self.report.accepted[stored] += 1


def read_feed(feed: FeedSettings, builder: StoreBuilder, *, now: float) -> FeedReport:
    """Read one feed file into `builder`; raise `FeedError` if it cannot be read."""
    text = _read_text(feed.path)
    data: Any = None
    feed_format = feed.format
    if feed_format in ("stix", "misp") or (
        feed_format == "auto" and feed.path.suffix.lower() == ".json"
    ):
        data = _load_json(text, feed.path)
        feed_format = (
            _json_format(data, feed.path) if feed_format == "auto" else feed_format
        )
    elif feed_format == "auto":
        feed_format = "csv" if feed.path.suffix.lower() == ".csv" else "list"

    report = FeedReport(path=feed.path, format=feed_format, source=feed.source_name)
    reader = FeedReader(feed, builder, report, now=now)
    _parse(feed_format, text, data, reader)
    _log_report(report)
    return report


def _parse(feed_format: FeedFormat, text: str, data: Any, reader: FeedReader) -> None:
    # Imported here because stix and misp use FeedReader from this module.
    from autopull.connectors.intel.misp import read_misp
    from autopull.connectors.intel.stix import read_bundle

    if feed_format == "csv":
        read_csv(text, reader)
    elif feed_format == "list":
        read_list(text, reader)
    elif feed_format == "stix":
        read_bundle(data, reader)
    else:
        read_misp(data, reader)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except OSError as error:
        raise FeedError(
            f"The feed file {str(path)!r} cannot be read ({error.strerror}); check "
            "that it exists and is readable.",
            path=path,
        ) from error
    except UnicodeDecodeError as error:
        raise FeedError(
            f"The feed file {str(path)!r} is not UTF-8 text (byte {error.start} is "
            "invalid).",
            path=path,
        ) from error


def _load_json(text: str, path: Path) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise FeedError(
            f"The feed file {str(path)!r} is not valid JSON: {error.msg} at line "
            f"{error.lineno}, column {error.colno}.",
            path=path,
        ) from error


def _json_format(data: Any, path: Path) -> FeedFormat:
    if isinstance(data, dict) and data.get("type") == "bundle":
        return "stix"
    if isinstance(data, list) or (
        isinstance(data, dict) and ("Event" in data or "response" in data)
    ):
        return "misp"
    raise FeedError(
        f"The feed file {str(path)!r} is neither a STIX bundle (type 'bundle') nor "
        "MISP event JSON (an 'Event' object); set the feed's format explicitly.",
        path=path,
    )


def _log_report(report: FeedReport) -> None:
    logger.info(
        "Read feed: path=%s format=%s accepted=%d rejected=%d skipped=%d",
        report.path,
        report.format,
        report.accepted_total,
        report.rejected,
        sum(report.skipped.values()),
    )
    for rejection in report.rejections[:5]:
        logger.warning(
            "Rejected feed entry: path=%s location=%s reason=%s",
            report.path,
            rejection.location,
            rejection.reason,
        )


def parse_time(text: object) -> float:
    """Parse an ISO 8601 time or date (UTC when it has no offset) to epoch seconds."""
    if not isinstance(text, str):
        raise ValueError(
            f"{text!r} is not an ISO 8601 time such as 2025-01-31T12:00:00Z."
        )
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{text!r} is not an ISO 8601 time such as 2025-01-31T12:00:00Z."
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def parse_confidence(value: object) -> int:
    """Return a confidence from 0 to 100 given as a whole number or its text."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"The confidence {value!r} is not a whole number.")
    try:
        confidence = int(value)
    except ValueError:
        raise ValueError(f"The confidence {value!r} is not a whole number.") from None
    if not 0 <= confidence <= 100:
        raise ValueError(f"The confidence {value!r} is outside 0 to 100.")
    return confidence


def read_csv(text: str, reader: FeedReader) -> None:
    """Read CSV lines `type,value,source,confidence,expires` (see the module).

    Each line is parsed alone, so a line with an unbalanced quote is rejected
    instead of swallowing the lines after it.
    """
    columns: dict[str, int] = {name: index for index, name in enumerate(CSV_COLUMNS)}
    first = True
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue

        location = f"line {number}"
        cells = _split_csv_line(line)
        if cells is None:
            reader.report.reject(location, line[:80], "The line is not valid CSV.")
            continue
        if first and _is_header(cells):
            columns = {name.lower(): index for index, name in enumerate(cells)}
        else:
            _read_csv_row(cells, columns, location, reader)
        first = False


def _split_csv_line(line: str) -> list[str] | None:
    if '"' not in line:
        return [cell.strip() for cell in line.split(",")]
    try:
        rows = list(csv.reader([line], strict=True))
    except csv.Error:
        return None
    return [cell.strip() for cell in rows[0]] if len(rows) == 1 else None


def _is_header(cells: list[str]) -> bool:
    names = {cell.lower() for cell in cells}
    return "type" in names and "value" in names


def _read_csv_row(
    cells: list[str], columns: dict[str, int], location: str, reader: FeedReader
) -> None:
    type_name, value, source, confidence_text, expires_text = (
        cells[columns[name]] if name in columns and columns[name] < len(cells) else ""
        for name in CSV_COLUMNS
    )
    type_name = type_name.lower()
    if type_name not in TYPE_ALIASES:
        reason = (
            f"The type {type_name!r} is unknown; use one of {sorted(TYPE_ALIASES)}."
        )
        reader.report.reject(location, value, reason)
        return
    try:
        confidence = parse_confidence(confidence_text) if confidence_text else None
        expires = parse_time(expires_text) if expires_text else None
    except ValueError as error:
        reader.report.reject(location, value, str(error))
        return

    kind, algorithm = TYPE_ALIASES[type_name]
    reader.offer(
        location,
        kind,
        value,
        algorithm=algorithm,
        source=source or None,
        confidence=confidence,
        expires=expires,
    )


def read_list(text: str, reader: FeedReader) -> None:
    """Read one indicator a line; the feed's `kind`, else each line's shape, decides."""
    for line_number, line in enumerate(text.splitlines(), start=1):
        value = _INLINE_COMMENT.sub("", line).strip()
        if not value or value.startswith("#"):
            continue

        fields = value.split()
        if len(fields) == 2 and fields[0] in _HOSTS_FILE_ADDRESSES:
            fields = fields[1:]
        location = f"line {line_number}"
        if len(fields) != 1:
            reader.report.reject(
                location, value, "A list line must hold one indicator and no spaces."
            )
            continue
        reader.offer(location, reader.feed.kind or guess_kind(fields[0]), fields[0])
