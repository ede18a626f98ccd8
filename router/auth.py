"""Bearer-token authentication for the router's gRPC endpoint.

Contract:

- Tokens are loaded once, where the cluster is configured (``load_tokens``): from a file
  (one per line; blank lines and ``#`` comments ignored) and/or the ``PDSERVE_AUTH_TOKENS``
  environment variable (comma-separated). They end up in ``ServerConfig.auth_tokens``;
  an empty tuple turns authentication off.
- A client sends ``authorization: Bearer <token>`` metadata with every call. The
  ``BearerTokenInterceptor`` answers UNAUTHENTICATED, before the handler runs and without
  reading further, when it is missing, malformed, sent more than once or matches no
  configured token.
- Comparison is constant-time: the presented token and every configured one are hashed to
  fixed-length SHA-256 digests (so neither the length nor the content of a token leaks
  through timing) and compared with ``hmac.compare_digest`` against *all* configured
  tokens, without stopping at the first match.
- The standard health service (``grpc.health.v1.Health``) is open, so load-balancer and
  Kubernetes probes need no secret; it tells only SERVING / NOT_SERVING. Reflection and
  ``Generation`` need a token.
- Tokens are never logged, and kept out of every ``repr``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

TOKENS_ENV = "PDSERVE_AUTH_TOKENS"
# Short tokens could be guessed by brute force over the network.
MIN_TOKEN_CHARS = 16
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)
_MISSING = "missing bearer token: send metadata 'authorization: Bearer <token>'"
_INVALID = "invalid bearer token"


def validate_token(token: str) -> None:
    """Printable ASCII without spaces or commas (gRPC metadata values are ASCII; commas
    separate tokens in the environment variable), at least ``MIN_TOKEN_CHARS`` long."""
    if not isinstance(token, str) or not all("!" <= ch <= "~" and ch != "," for ch in token):
        raise ValueError("auth tokens must be printable ASCII without spaces or commas")
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"auth tokens must be at least {MIN_TOKEN_CHARS} characters "
                         "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")


def parse_token_lines(text: str) -> tuple[str, ...]:
    lines = (line.strip() for line in text.splitlines())
    return tuple(line for line in lines if line and not line.startswith("#"))


def load_tokens(token_file: str | os.PathLike | None = None,
                environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """Every token of ``token_file`` and of ``$PDSERVE_AUTH_TOKENS`` (the union, in that
    order, duplicates dropped), each validated. Both absent or empty: ``()``."""
    env = os.environ if environ is None else environ
    tokens: list[str] = []
    if token_file is not None:
        try:
            tokens += parse_token_lines(Path(token_file).read_text())
        except OSError as exc:
            raise ValueError(f"cannot read the auth token file {token_file}: "
                             f"{exc.strerror or exc}") from None
        if not tokens:
            raise ValueError(f"the auth token file {token_file} holds no token")
    tokens += [t.strip() for t in env.get(TOKENS_ENV, "").split(",") if t.strip()]
    for t in tokens:
        validate_token(t)
    return tuple(dict.fromkeys(tokens))


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


class TokenSet:
    """The accepted tokens, kept only as digests; ``matches`` takes the same time whatever
    is presented and whichever token (if any) it equals."""

    def __init__(self, tokens: Iterable[str]):
        self._digests = tuple(_digest(t.encode()) for t in tokens)
        if not self._digests:
            raise ValueError("a TokenSet needs at least one token")

    def __repr__(self) -> str:
        return f"TokenSet({len(self._digests)} tokens)"

    def matches(self, presented: bytes) -> bool:
        probe = _digest(presented)
        found = False
        for d in self._digests:  # no early exit: every token is compared every time
            found |= hmac.compare_digest(probe, d)
        return found


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> bytes | None:
    """The token of the single ``authorization: Bearer <token>`` entry; None when there is
    none, more than one, or another scheme."""
    values = [v for k, v in (metadata or ()) if k.lower() == "authorization"]
    if len(values) != 1:
        return None
    value = values[0].encode() if isinstance(values[0], str) else values[0]
    scheme, _, token = value.strip().partition(b" ")
    if scheme.lower() != b"bearer" or not token.strip():
        return None
    return token.strip()


def _deny(handler: grpc.RpcMethodHandler | None, details: str) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as the real one that only aborts. Requests are
    left undeserialized: nothing an unauthenticated peer sent is parsed."""

    async def abort(_request, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, details)

    if handler is None or not (handler.request_streaming or handler.response_streaming):
        return grpc.unary_unary_rpc_method_handler(abort)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    return grpc.unary_stream_rpc_method_handler(abort)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through when its bearer token is one of ``tokens`` or its method is open
    (``OPEN_METHOD_PREFIXES``); answers UNAUTHENTICATED otherwise."""

    def __init__(self, tokens: Iterable[str],
                 open_prefixes: Sequence[str] = OPEN_METHOD_PREFIXES):
        self._tokens = TokenSet(tokens)
        self._open = tuple(open_prefixes)

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if method.startswith(self._open):
            return await continuation(handler_call_details)
        presented = bearer_token(handler_call_details.invocation_metadata)
        if presented is not None and self._tokens.matches(presented):
            return await continuation(handler_call_details)
        # The method only: what was presented must never reach a log.
        log.info("refused an unauthenticated call to %s", method)
        handler = await continuation(handler_call_details)
        return _deny(handler, _MISSING if presented is None else _INVALID)
