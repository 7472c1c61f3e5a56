"""The request body of Graph's JSON `$batch`, checked the way Graph checks it.

A batch holds at most 20 requests, each with a unique `id`, a `method` and a `url`
relative to the API version (`/users/u/messages`). A request with a `body` needs
a `Content-Type` header. Graph runs a batch either fully in parallel (no request
has `dependsOn`) or as one sequential chain (each request but the first depends
on the one before). Graph rejects a batch that mixes both, or that holds two
chains, with 400 before any request runs, and so does this module.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

MAX_BATCH_REQUESTS = 20
BATCH_METHODS = frozenset({"GET", "POST", "PATCH", "PUT", "DELETE"})


class BatchError(Exception):
    """A batch that Graph rejects as a whole with 400 BadRequest."""


@dataclass(frozen=True)
class BatchItem:
    """One request of a batch, with its body already encoded as bytes."""

    request_id: str
    method: str
    url: str
    headers: dict[str, str]
    body: bytes | None
    depends_on: tuple[str, ...]


@dataclass(frozen=True)
class BatchPlan:
    """The requests of a batch in the order they run, and whether they form a chain."""

    items: tuple[BatchItem, ...]
    sequential: bool


def parse_batch(body: Any, max_requests: int = MAX_BATCH_REQUESTS) -> BatchPlan:
    """Check a `$batch` body and return its plan, or raise `BatchError`."""
    if not isinstance(body, dict) or not isinstance(body.get("requests"), list):
        raise BatchError("Invalid batch payload format: 'requests' must be a list.")
    raw_items: list[Any] = body["requests"]
    if not raw_items:
        raise BatchError("Invalid batch payload format: the batch has no requests.")
    if len(raw_items) > max_requests:
        raise BatchError(
            f"The batch has {len(raw_items)} requests, more than the limit of "
            f"{max_requests}."
        )

    items = [_parse_item(raw, position) for position, raw in enumerate(raw_items)]
    ids = [item.request_id for item in items]
    duplicates = sorted({request_id for request_id in ids if ids.count(request_id) > 1})
    if duplicates:
        raise BatchError(f"Request ids must be unique; repeated: {duplicates}.")
    if not any(item.depends_on for item in items):
        return BatchPlan(tuple(items), sequential=False)
    return BatchPlan(_chain_order(items), sequential=True)


def _parse_item(raw: Any, position: int) -> BatchItem:
    if not isinstance(raw, dict):
        raise BatchError(f"Request {position} of the batch is not a JSON object.")
    request_id = raw.get("id")
    method = raw.get("method")
    url = raw.get("url")
    if not isinstance(request_id, str) or not request_id:
        raise BatchError(f"Request {position} of the batch has no string 'id'.")
    if not isinstance(method, str) or method.upper() not in BATCH_METHODS:
        raise BatchError(
            f"Request {request_id} has method {method!r}; use one of "
            f"{sorted(BATCH_METHODS)}."
        )
    if not isinstance(url, str) or not url:
        raise BatchError(f"Request {request_id} has no 'url'.")

    headers = raw.get("headers") or {}
    if not isinstance(headers, dict):
        raise BatchError(f"The headers of request {request_id} are not an object.")
    headers = {str(name): str(value) for name, value in headers.items()}
    body = _encode_body(raw, request_id, headers)

    depends_on = raw.get("dependsOn") or []
    if not isinstance(depends_on, list) or not all(
        isinstance(other, str) for other in depends_on
    ):
        raise BatchError(f"The dependsOn of request {request_id} is not a list of ids.")
    return BatchItem(request_id, method.upper(), url, headers, body, tuple(depends_on))


def _encode_body(
    raw: dict[str, Any], request_id: str, headers: dict[str, str]
) -> bytes | None:
    if "body" not in raw or raw["body"] is None:
        return None
    content_type = next(
        (value for name, value in headers.items() if name.lower() == "content-type"),
        None,
    )
    if content_type is None:
        raise BatchError(
            f"Request {request_id} has a body but no Content-Type header; a batch "
            "request with a body needs one."
        )
    body = raw["body"]
    if isinstance(body, dict | list):
        return json.dumps(body).encode("utf-8")
    if not isinstance(body, str):
        raise BatchError(f"The body of request {request_id} is not JSON or a string.")
    if content_type.lower().startswith("application/json"):
        return body.encode("utf-8")
    # Other bodies travel base64-encoded inside the JSON batch.
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise BatchError(
            f"The body of request {request_id} is not valid base64."
        ) from None


def _chain_order(items: list[BatchItem]) -> tuple[BatchItem, ...]:
    """Order the items of a one-chain batch, or raise for any other shape."""
    by_id = {item.request_id: item for item in items}
    roots = [item for item in items if not item.depends_on]
    for item in items:
        if len(item.depends_on) > 1:
            raise BatchError(
                f"Request {item.request_id} depends on several requests; a batch "
                "must be fully parallel or one sequential chain."
            )
        for other in item.depends_on:
            if other not in by_id:
                raise BatchError(
                    f"Request {item.request_id} depends on {other!r}, which is not "
                    "in the batch."
                )
    if len(roots) != 1:
        raise BatchError(
            "A batch must be fully parallel or one sequential chain, but this one "
            f"has {len(roots)} requests without dependsOn among requests with it."
        )
    next_of: dict[str, BatchItem] = {}
    for item in items:
        if item.depends_on:
            parent = item.depends_on[0]
            if parent in next_of:
                raise BatchError(
                    f"Requests {next_of[parent].request_id} and {item.request_id} "
                    f"both depend on {parent}; a batch must be one sequential chain."
                )
            next_of[parent] = item
    order = [roots[0]]
    while order[-1].request_id in next_of:
        order.append(next_of[order[-1].request_id])
    if len(order) != len(items):
        raise BatchError("The dependsOn of the batch form a cycle.")
    return tuple(order)
