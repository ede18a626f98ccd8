"""Map serving failures to gRPC status codes, in one place.

Contract:

* Router code raises a ``ServingError`` subclass where it knows what went wrong; the
  servicer catches it and calls ``abort_with(context, err)``, which ends the RPC with
  ``err.code`` and ``err.message`` (the message is sent to the client, so it must not
  leak internals). ``as_serving_error`` converts anything else that escapes (validation
  errors, cancellation, timeouts, bugs) so every failure leaves with a deliberate code.
* The mapping, also documented on the ``Generate`` RPC in ``protos/pdserve.proto``:

  ==================  ===================  ==========
  class               gRPC code            retryable
  ==================  ===================  ==========
  InvalidArgument     INVALID_ARGUMENT     no
  Overloaded          RESOURCE_EXHAUSTED   yes
  NoWorkerAvailable   UNAVAILABLE          yes
  TransferFailed      UNAVAILABLE          yes
  DeadlineExceeded    DEADLINE_EXCEEDED    no
  Cancelled           CANCELLED            no
  Internal            INTERNAL             no
  ==================  ===================  ==========

* ``Overloaded(retry_after_s=...)`` travels as trailing metadata ``retry-after-ms``: a
  decimal integer of milliseconds, rounded up (so a client never retries too early).
  gRPC metadata keys must be lowercase ASCII, hence not HTTP's ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import math
from typing import ClassVar, NoReturn, Protocol

import grpc

from pdserve.router.request_types import RequestValidationError

RETRY_AFTER_METADATA_KEY = "retry-after-ms"


class ServingError(Exception):
    """A failure with a client-facing ``message`` and the gRPC ``code`` to end the RPC with."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL
    # Whether the same request may succeed if sent again later (clients, load balancers).
    retryable: ClassVar[bool] = False
    default_message: ClassVar[str] = "internal server error"

    def __init__(self, message: str | None = None) -> None:
        self.message = self.default_message if message is None else message
        super().__init__(self.message)

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        """Extra trailing metadata to send with the status (none by default)."""
        return ()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class InvalidArgument(ServingError):
    """The request is malformed; sending it again unchanged will fail again."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    default_message = "invalid request"


class Overloaded(ServingError):
    """Admission control refused the request: queue full, or its SLO cannot be met now.

    ``retry_after_s`` (finite, >= 0) is a hint for when to retry, if known.
    """

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    retryable = True
    default_message = "server overloaded"

    def __init__(self, message: str | None = None, *, retry_after_s: float | None = None) -> None:
        if retry_after_s is not None and not (
            isinstance(retry_after_s, (int, float))
            and not isinstance(retry_after_s, bool)
            and math.isfinite(retry_after_s)
            and retry_after_s >= 0
        ):
            raise ValueError(f"retry_after_s must be finite and >= 0, got {retry_after_s!r}")
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        if self.retry_after_s is None:
            return ()
        return ((RETRY_AFTER_METADATA_KEY, str(math.ceil(self.retry_after_s * 1000))),)


class NoWorkerAvailable(ServingError):
    """No healthy prefill or decode worker can take the request right now."""

    code = grpc.StatusCode.UNAVAILABLE
    retryable = True
    default_message = "no worker available"


class TransferFailed(ServingError):
    """Moving the KV cache from the prefill to the decode worker failed.

    UNAVAILABLE rather than INTERNAL: the cause is usually a lost or restarting worker,
    and a retry is routed to a different pair.
    """

    code = grpc.StatusCode.UNAVAILABLE
    retryable = True

    def __init__(self, detail: str = "unknown error") -> None:
        super().__init__(f"KV transfer failed: {detail}")
        self.detail = detail


class DeadlineExceeded(ServingError):
    """The client's deadline passed before generation finished."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_message = "deadline exceeded"


class Cancelled(ServingError):
    """The client (or server shutdown) cancelled the request."""

    code = grpc.StatusCode.CANCELLED
    default_message = "request cancelled"


class Internal(ServingError):
    """A bug. The message stays generic; details belong in the server log."""

    code = grpc.StatusCode.INTERNAL


def as_serving_error(exc: BaseException) -> ServingError:
    """The ``ServingError`` to report for ``exc`` (returned unchanged if it already is one).

    Only ``RequestValidationError`` becomes INVALID_ARGUMENT: a bare ``ValueError`` from
    deeper in the stack is a server bug, not the client's fault, and its text may leak
    internals, so it becomes a generic INTERNAL.
    """
    if isinstance(exc, ServingError):
        return exc
    if isinstance(exc, RequestValidationError):
        return InvalidArgument(str(exc))
    if isinstance(exc, asyncio.CancelledError):
        return Cancelled()
    # asyncio.TimeoutError only became an alias of TimeoutError in 3.11.
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return DeadlineExceeded()
    return Internal()


class _AbortableContext(Protocol):
    """The slice of ``grpc.aio.ServicerContext`` that ``abort_with`` uses."""

    def set_trailing_metadata(self, trailing_metadata: tuple[tuple[str, str], ...]) -> None: ...

    async def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn: ...


async def abort_with(
    context: grpc.aio.ServicerContext | _AbortableContext, err: ServingError
) -> NoReturn:
    """End the RPC with ``err``'s code and message (and trailing metadata, if any).

    Like ``context.abort`` this never returns: grpc.aio raises to unwind the handler, so
    call it last. Metadata is set first because ``abort`` sends whatever trailing
    metadata is recorded on the context at that point.
    """
    metadata = err.trailing_metadata()
    if metadata:
        context.set_trailing_metadata(metadata)
    await context.abort(err.code, err.message)
    # A conforming context raised above; a broken one must not let the handler go on
    # as if the RPC had succeeded.
    raise RuntimeError("context.abort() returned instead of raising")
