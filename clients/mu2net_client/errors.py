"""One exception hierarchy for the SDK, mapped from gRPC status codes and HTTP statuses
(httpx ``_exceptions.py`` / ``map_exceptions`` style)."""

from __future__ import annotations

import contextlib
import datetime
import email.utils
import json
import math
import time
from typing import Iterator

import grpc
import httpx


class Mu2netError(Exception):
    """Base class of every SDK error."""


class NotFoundError(Mu2netError):
    """Unknown task (gRPC NOT_FOUND, HTTP 404)."""


class NotReadyError(Mu2netError):
    """The task has no served path yet (gRPC UNAVAILABLE, HTTP 503)."""


class InvalidArgumentError(Mu2netError, ValueError):
    """The request or dataset was rejected (gRPC INVALID_ARGUMENT, HTTP 400), or the SDK
    rejected an argument before sending it (also a ``ValueError``)."""


class ConflictError(Mu2netError):
    """A concurrent change won (gRPC ABORTED, HTTP 409 with ``code`` ABORTED): e.g. two
    rollbacks of one task at once; nothing changed. Read the state again and retry."""


class AlreadyExistsError(Mu2netError):
    """A task of that name exists (gRPC ALREADY_EXISTS, HTTP 409)."""


class TooLargeError(Mu2netError):
    """Message or body over the server's limit (gRPC RESOURCE_EXHAUSTED, HTTP 413)."""


class OverloadedError(Mu2netError):
    """The server has more queued work than its bound (gRPC RESOURCE_EXHAUSTED with
    ``mu2net-error: Overloaded``, HTTP 429); retry after :attr:`retry_after` seconds."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class AuthenticationError(Mu2netError):
    """Missing or wrong admin token (gRPC UNAUTHENTICATED, HTTP 401)."""


class ServerError(Mu2netError):
    """Any other server-side failure."""


class TransportError(Mu2netError):
    """The server could not be reached (connection refused, reset...), or, HTTP 502, a
    replica could not reach the evolver host's server it forwards writes to."""


class TimeoutError(Mu2netError):  # noqa: A001 - the SDK's own timeout
    """The call did not finish within its timeout."""


GRPC_ERRORS = {
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.ABORTED: ConflictError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: TooLargeError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.DEADLINE_EXCEEDED: TimeoutError,
}
HTTP_ERRORS: dict[int, type[Mu2netError]] = {404: NotFoundError, 503: NotReadyError, 400: InvalidArgumentError, 409: AlreadyExistsError,
               413: TooLargeError, 401: AuthenticationError, 429: OverloadedError, 504: TimeoutError,
               502: TransportError}


def from_grpc(error: grpc.RpcError) -> Mu2netError:
    """Maps a gRPC error. UNAVAILABLE is NotReadyError when the server said so (trailing
    metadata ``mu2net-error``), else a TransportError."""
    code, details = error.code(), error.details() or str(error.code())
    meta = dict(error.trailing_metadata() or ())
    pushback = meta.get("grpc-retry-pushback-ms")
    return from_status(code, details, meta.get("mu2net-error"), float(pushback) if pushback else None)


def from_status(code: grpc.StatusCode, details: str, error_type: str | None = None,
                retry_after_ms: float | None = None) -> Mu2netError:
    """Maps a gRPC status code with the server's error class (``mu2net-error``) and retry
    pushback in milliseconds: a failed call's (:func:`from_grpc`), or one answer of a
    ClassifyStream call (its ``error_code``, ``error_type`` and ``retry_after_ms``)."""
    if code == grpc.StatusCode.UNAVAILABLE:
        return NotReadyError(details) if error_type == "NotReady" else TransportError(details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and error_type == "Overloaded":
        return OverloadedError(details, retry_after_ms / 1000 if retry_after_ms is not None and retry_after_ms >= 0 else None)
    return GRPC_ERRORS.get(code, ServerError)(details)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from an HTTP ``Retry-After`` header (RFC 9110 section 10.2.3):
    delay-seconds (a decimal fraction is accepted too) or an HTTP-date, counted from ``now``
    (``time.time()``; a date in the past is 0). None for an absent or unreadable value."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # an HTTP-date is GMT (the asctime form carries no zone)
            when = when.replace(tzinfo=datetime.timezone.utc)
        return max(0.0, when.timestamp() - (time.time() if now is None else now))
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def from_http(response: httpx.Response) -> Mu2netError:
    """Maps an HTTP error response (JSON with an ``error`` member)."""
    try:
        body = json.loads(response.content)
        message, code = body.get("error", response.text), body.get("code")
    except (ValueError, AttributeError):
        message, code = response.text, None
    text = f"HTTP {response.status_code}: {message}"
    if response.status_code == 429:
        return OverloadedError(text, parse_retry_after(response.headers.get("retry-after")))
    if response.status_code == 409 and code == "ABORTED":
        return ConflictError(text)
    return HTTP_ERRORS.get(response.status_code, ServerError)(text)


@contextlib.contextmanager
def map_exceptions() -> Iterator[None]:
    """Re-raises transport exceptions as SDK exceptions."""
    try:
        yield
    except grpc.RpcError as e:
        raise from_grpc(e) from e
    except httpx.TimeoutException as e:
        raise TimeoutError(str(e)) from e
    except httpx.TransportError as e:
        raise TransportError(str(e)) from e
