"""JSON error replies for every error under `/api` and `/alerts`.

The views build their own errors with `json_error`. The middleware turns the
errors that aiohttp raises itself, before or around a view (unknown path, method
not allowed, body over the server's size limit), and any unexpected exception
into the same `{"error": {"code": ..., "message": ...}}` body.

NOTE: a request line longer than MAX_LINE_BYTES or a header longer than
MAX_FIELD_BYTES gets aiohttp's own plain-text 400, whatever its path. aiohttp
3.14 rejects such a request while parsing it, before routing and middleware,
and writes that reply in its private request handler (`handle_error`), which no
application option replaces. The worker's log of such a request leaves out the
request's bytes (`RequestParseErrorFilter` in `autopull.streams.logs`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

log = logging.getLogger(__name__)

# Paths whose errors are JSON. The probes and /metrics keep aiohttp's replies.
JSON_ERROR_PREFIXES = ("/api", "/alerts")
# Limits of aiohttp's request parser in bytes, given to every connection through
# the application's handler_args: the request line (method, URL and version), and
# each header name or value. Both are aiohttp's defaults, set here so that the
# documented limits stay true if those defaults change.
MAX_LINE_BYTES = 8190
MAX_FIELD_BYTES = 8190
# The code of each status that aiohttp raises on its own.
HTTP_ERROR_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def application_options() -> dict[str, object]:
    """Build the aiohttp application options: JSON error middleware, parser limits."""
    return {
        "middlewares": [json_errors],
        "handler_args": {
            "max_line_size": MAX_LINE_BYTES,
            "max_field_size": MAX_FIELD_BYTES,
        },
    }


def json_error(
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """Build the JSON error reply, with `WWW-Authenticate: Bearer` on a 401."""
    all_headers = dict(headers or {})
    if status == 401:
        all_headers["WWW-Authenticate"] = "Bearer"
    body = {"error": {"code": code, "message": message}}
    return web.json_response(body, status=status, headers=all_headers or None)


def has_json_errors(path: str) -> bool:
    """Return True when errors on `path` get the JSON error body."""
    return any(
        path == prefix or path.startswith(prefix + "/")
        for prefix in JSON_ERROR_PREFIXES
    )


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Reply to errors under `/api` and `/alerts` with the JSON error body."""
    if not has_json_errors(request.path):
        return await handler(request)
    try:
        return await handler(request)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        log.info(
            "Rejected request method=%s path=%s status=%d",
            request.method,
            request.path,
            error.status,
        )
        return _from_http_error(request, error)
    except Exception:
        log.exception("Request failed method=%s path=%s", request.method, request.path)
        return json_error(
            500,
            "internal_error",
            "The worker failed to handle the request; its log has the error. "
            "Send it again later.",
        )


def _from_http_error(request: web.Request, error: web.HTTPException) -> web.Response:
    status = error.status
    code = HTTP_ERROR_CODES.get(
        status, "bad_request" if status < 500 else "unavailable"
    )
    if isinstance(error, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(error.allowed_methods))
        message = (
            f"The method {error.method} is not allowed on {request.path}. "
            f"Use {allowed}."
        )
        return json_error(status, code, message, {"Allow": error.headers["Allow"]})
    if isinstance(error, web.HTTPNotFound):
        message = (
            f"No resource is at {request.path}. See docs/openapi.yaml for the paths."
        )
    elif isinstance(error, web.HTTPRequestEntityTooLarge):
        message = (
            f"The request body is larger than the limit of "
            f"{request.client_max_size} bytes. Send a smaller body."
        )
    else:
        message = f"{error.reason}: {error.text or 'the request failed'}."
    return json_error(status, code, message)
