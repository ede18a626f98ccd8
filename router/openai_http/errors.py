"""HTTP statuses and OpenAI's error JSON for the failures every front door shares.

``{"error": {"message", "type", "param", "code"}}`` with ``code`` the HTTP status, as
vLLM answers. The status follows the gRPC code of the ``ServingError`` (``status.py``
holds that mapping), so both protocols classify a failure alike:

=====================  ====  ===========================
gRPC code              HTTP  type
=====================  ====  ===========================
INVALID_ARGUMENT       400   BadRequestError
UNAUTHENTICATED        401   AuthenticationError
NOT_FOUND              404   NotFoundError
RESOURCE_EXHAUSTED     429   RateLimitError (+ Retry-After, whole seconds rounded up)
CANCELLED              499   ClientClosedRequest (nobody is left to read it)
UNAVAILABLE            503   ServiceUnavailableError
DEADLINE_EXCEEDED      504   TimeoutError
INTERNAL and the rest  500   InternalServerError
=====================  ====  ===========================
"""

from __future__ import annotations

import math

import grpc

from pdserve.router.status import Overloaded, ServingError

_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "BadRequestError"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "AuthenticationError"),
    grpc.StatusCode.NOT_FOUND: (404, "NotFoundError"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "RateLimitError"),
    grpc.StatusCode.CANCELLED: (499, "ClientClosedRequest"),
    grpc.StatusCode.UNAVAILABLE: (503, "ServiceUnavailableError"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "TimeoutError"),
}
_INTERNAL = (500, "InternalServerError")


# The field a shared validation message is about: its messages start with the field name.
_PARAM_PREFIXES = ("max_tokens", "min_tokens", "temperature", "top_p", "top_k", "seed",
                   "logprobs", "stop_token_ids", "request_id", "stop", "prompt", "token id",
                   "slo")


def param_of(message: str, kind: str) -> str | None:
    """OpenAI's ``param`` for a validation ``message`` on a ``kind`` ("completions" or
    "chat") request, or None when it names no single field."""
    if message.startswith("chat"):
        return "messages"
    for prefix in _PARAM_PREFIXES:
        if message.startswith(prefix):
            if prefix in ("prompt", "token id"):
                return "messages" if kind == "chat" else "prompt"
            return prefix
    return None


def error_body(status: int, type_: str, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": status}}


def http_error(err: ServingError, param: str | None = None) -> tuple[int, dict, dict[str, str]]:
    """(status, JSON body, extra headers) for ``err``."""
    status, type_ = _STATUS.get(err.code, _INTERNAL)
    headers = {}
    if isinstance(err, Overloaded):
        # HTTP counts whole seconds; without a hint from admission, 1 s.
        headers["Retry-After"] = str(max(1, math.ceil(err.retry_after_s or 0)))
    return status, error_body(status, type_, err.message, param), headers
