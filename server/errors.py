"""Domain errors of the service, defined once and mapped once to gRPC and HTTP codes.

Core errors (:mod:`mu2net.store`, :mod:`mu2net.datasets`) are translated by
:func:`to_service_error`; every handler maps a :class:`ServiceError` through :data:`TABLE`
(starlette ``_exception_handler.py`` style).
"""

from __future__ import annotations

import grpc

from mu2net.datasets import DatasetError
from mu2net.store import TaskExists, TaskNotFound


class ServiceError(Exception):
    """Base class; the message names the bad value and what is allowed."""


class NotFound(ServiceError):
    """Unknown task (or route)."""


class NotReady(ServiceError):
    """The task exists but has no served path yet, or the server is loading."""


class InvalidArgument(ServiceError):
    """Bad request: undecodable image, wrong shape, bad parameter, rejected dataset."""


class AlreadyExists(ServiceError):
    """A task of that name already exists."""


class TooLarge(ServiceError):
    """A message or body exceeds the configured limit."""


class Overloaded(ServiceError):
    """The server has more queued work than its bound; retry after ``retry_after`` seconds."""

    retry_after = 1


class DeadlineExceeded(ServiceError):
    """The request's deadline passed before its images were computed (dropped unrun)."""


class Cancelled(ServiceError):
    """The caller went away (HTTP client disconnected) before the answer; its images were not
    computed if they had not started. HTTP 499 (Client Closed Request), as google.rpc.Code
    maps CANCELLED; only metrics and logs see it."""


class Unauthenticated(ServiceError):
    """An admin call without the configured bearer token."""


class FailedPrecondition(ServiceError):
    """The system is not in a state the call needs (e.g. a rollback without a model
    repository, or to a path whose components were deleted with a task). HTTP 400, as
    google.rpc.Code maps FAILED_PRECONDITION."""


class Aborted(ServiceError):
    """A concurrent change won: the state the call was decided on changed before its
    commit (e.g. two rollbacks of one task at once), and nothing changed. Retry after
    reading the state again. HTTP 409, as google.rpc.Code maps ABORTED."""


class BadGateway(ServiceError):
    """A replica could not reach the evolver host it forwards uploads, deletes, evolve and
    rollback requests to (``mu2net serve --no-evolver --repository URL --ingest-url URL``)."""


class RepositoryUnavailable(ServiceError):
    """The model repository could not be read whole (unreachable, or a manifest or array
    in it is malformed or does not match its digest); the message names its URL."""


#: ServiceError subclass -> (gRPC status code, HTTP status).
TABLE: dict[type[ServiceError], tuple[grpc.StatusCode, int]] = {
    NotFound: (grpc.StatusCode.NOT_FOUND, 404),
    NotReady: (grpc.StatusCode.UNAVAILABLE, 503),
    InvalidArgument: (grpc.StatusCode.INVALID_ARGUMENT, 400),
    AlreadyExists: (grpc.StatusCode.ALREADY_EXISTS, 409),
    TooLarge: (grpc.StatusCode.RESOURCE_EXHAUSTED, 413),
    Unauthenticated: (grpc.StatusCode.UNAUTHENTICATED, 401),
    Overloaded: (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    DeadlineExceeded: (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    Cancelled: (grpc.StatusCode.CANCELLED, 499),
    BadGateway: (grpc.StatusCode.UNAVAILABLE, 502),
    RepositoryUnavailable: (grpc.StatusCode.UNAVAILABLE, 503),
    FailedPrecondition: (grpc.StatusCode.FAILED_PRECONDITION, 400),  # google.rpc.Code's HTTP mapping
    Aborted: (grpc.StatusCode.ABORTED, 409),  # google.rpc.Code's HTTP mapping
}


def codes(error: ServiceError) -> tuple[grpc.StatusCode, int]:
    """The (gRPC code, HTTP status) of an error (INTERNAL/500 if unmapped)."""
    for cls in type(error).__mro__:
        if issubclass(cls, ServiceError) and cls in TABLE:
            return TABLE[cls]
    return grpc.StatusCode.INTERNAL, 500


def to_service_error(error: Exception) -> ServiceError | None:
    """Translates core errors into service errors; None if ``error`` is not a known one."""
    if isinstance(error, ServiceError):
        return error
    if isinstance(error, TaskNotFound):
        return NotFound(str(error.args[0]) if error.args else str(error))
    if isinstance(error, TaskExists):
        return AlreadyExists(str(error))
    if isinstance(error, DatasetError):
        return InvalidArgument(str(error))
    return None
