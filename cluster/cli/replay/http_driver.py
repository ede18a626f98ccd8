"""The HTTP driver: an OpenAI-compatible ``POST /v1/completions``, streamed as SSE.

Each request is ``{"model", "prompt" (token ids or text), "max_tokens", "temperature": 0,
"ignore_eos": true, "stream": true, "stream_options": {"include_usage": true},
"return_token_ids": true, "request_id"}``. Every ``data:`` event up to ``data: [DONE]``
is one message: a content chunk counts the ``token_ids`` of its choice (a server that
does not return ids counts one token per chunk with text, as vLLM's benchmark does), the
usage chunk (``choices: []``) gives the usage, and pdserve's ``timing`` extension next to
it the server-side TTFT, end-to-end and prefill figures gRPC's ``Usage`` carries.

Failures map onto gRPC code names, as the server maps them the other way
(router/openai_http/errors.py): an HTTP status before the stream starts (429's
``Retry-After`` goes into the error text), an ``{"error": {..., "code": status}}`` event
inside it, a connection that fails or drops (UNAVAILABLE), a stream that ends without
``[DONE]`` (UNAVAILABLE), or the per-request deadline (DEADLINE_EXCEEDED).

``address`` is ``HOST:PORT`` or a URL (``http://``, ``https://``; an OpenAI-style base
ending in ``/v1`` is accepted too). TLS and the bearer token come from the run's
``ClientSecurity``, as for gRPC. The model is ``LoadGenConfig.model``, else the first id
``GET /v1/models`` lists. One connection pool serves the whole run, as large as the
run's in-flight cap so streams never queue for a connection.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from pdserve.cluster.cli.client import ClientSecurity
from pdserve.cluster.cli.replay.driver import Driver, RequestFailed, StreamEvent
from pdserve.cluster.cli.replay.prompts import BenchRequest
from pdserve.cluster.cli.replay.records import UsageRecord
from pdserve.cluster.cli.replay.sse import SSEParser

HTTP_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
               404: "NOT_FOUND", 408: "DEADLINE_EXCEEDED", 429: "RESOURCE_EXHAUSTED",
               499: "CANCELLED", 500: "INTERNAL", 501: "UNIMPLEMENTED", 503: "UNAVAILABLE",
               504: "DEADLINE_EXCEEDED"}
TIMING_FIELDS = ("ttft_ms", "e2e_ms", "prefill_queue_ms", "prefill_ms", "kv_transfer_wait_ms")
DONE = "[DONE]"


def status_name(http_status: int) -> str:
    """The gRPC code name for an HTTP status (UNKNOWN for one nobody maps)."""
    return HTTP_STATUS.get(http_status, "UNKNOWN")


def base_url(address: str, security: ClientSecurity | None = None) -> str:
    """``scheme://host:port[/prefix]`` of the API, without a trailing ``/v1``."""
    tls = security is not None and security.tls
    if "://" not in address:
        return f"{'https' if tls else 'http'}://{address}"
    parts = urlsplit(address)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"HTTP address must be HOST:PORT or an http(s):// URL, got "
                         f"{address!r}")
    if tls and parts.scheme == "http":
        raise ValueError(f"TLS options given for a plain http:// address {address!r}")
    path = parts.path.rstrip("/").removesuffix("/v1")
    return f"{parts.scheme}://{parts.netloc}{path}"


def ssl_context(security: ClientSecurity | None) -> ssl.SSLContext | None:
    """The TLS context the security options ask for (None: aiohttp's default)."""
    if security is None or not security.tls:
        return None
    try:
        ctx = ssl.create_default_context(cafile=security.root_ca_file)
        if security.client_cert_file:
            ctx.load_cert_chain(security.client_cert_file, security.client_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load the TLS files: {exc}") from None
    return ctx


def error_of(body: Any, fallback: str) -> tuple[int | None, str]:
    """(code, message) of an OpenAI error object ``{"error": {...}}``."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return None, fallback
    code = err.get("code")
    return (code if isinstance(code, int) else None), str(err.get("message") or fallback)


def usage_of(chunk: dict) -> UsageRecord:
    usage, timing = chunk.get("usage") or {}, chunk.get("timing") or {}
    details = usage.get("prompt_tokens_details") or {}
    return UsageRecord(prompt_tokens=usage.get("prompt_tokens", 0),
                       completion_tokens=usage.get("completion_tokens", 0),
                       cached_tokens=details.get("cached_tokens", 0),
                       **{k: float(timing.get(k, 0.0)) for k in TIMING_FIELDS})


def event_of(data: str) -> StreamEvent:
    """The message one SSE event's data (not ``[DONE]``) carries."""
    try:
        chunk = json.loads(data)
    except ValueError:
        raise RequestFailed("INTERNAL", f"stream event is not JSON: {data[:80]!r}") from None
    if not isinstance(chunk, dict):
        raise RequestFailed("INTERNAL", f"stream event is not an object: {data[:80]!r}")
    if "error" in chunk:
        code, message = error_of(chunk, "error event")
        raise RequestFailed(status_name(code) if code is not None else "UNKNOWN", message)
    tokens, finish = 0, ""
    for choice in chunk.get("choices") or ():
        ids = choice.get("token_ids")
        tokens += len(ids) if ids is not None else int(bool(choice.get("text")))
        finish = choice.get("finish_reason") or finish
    usage = usage_of(chunk) if chunk.get("usage") else None
    return StreamEvent(tokens, finish, usage)


class HttpDriver(Driver):
    async def open(self) -> None:
        cfg = self.config
        self.base = base_url(self.address, cfg.security)
        token = cfg.security.token() if cfg.security is not None else None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # limit: a stream holds its connection throughout, so the pool must be as large as
        # the in-flight cap; aiohttp's default (100) would queue the rest unseen.
        connector = aiohttp.TCPConnector(limit=cfg.max_in_flight, ssl=ssl_context(cfg.security)
                                         or True)
        # timeout: aiohttp's default total of 5 minutes would cut long streams.
        self.session = aiohttp.ClientSession(
            connector=connector, headers=headers,
            timeout=aiohttp.ClientTimeout(total=cfg.timeout_s))
        self.model = cfg.model or await self._first_model()

    async def close(self) -> None:
        session = getattr(self, "session", None)
        if session is not None:
            await session.close()

    async def _first_model(self) -> str:
        url = f"{self.base}/v1/models"
        try:
            async with self.session.get(url) as resp:
                body = await resp.json(content_type=None)
                if resp.status != 200:
                    raise ValueError(error_of(body, f"HTTP {resp.status}")[1])
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            raise ValueError(f"cannot list the models at {url} (give --model?): "
                             f"{exc or type(exc).__name__}") from None
        data = body.get("data") if isinstance(body, dict) else None
        if not data or not isinstance(data[0], dict) or not data[0].get("id"):
            raise ValueError(f"{url} lists no model; give --model")
        return str(data[0]["id"])

    def body(self, req: BenchRequest) -> dict:
        body = {"model": self.model, "prompt": list(req.prompt)
                if isinstance(req.prompt, tuple) else req.prompt,
                "max_tokens": req.max_tokens, "temperature": 0.0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True},
                "return_token_ids": True, "request_id": req.request_id}
        slo = {k: v * 1e3 for k, v in (("ttft_ms", req.slo_ttft_s), ("tpot_ms", req.slo_tpot_s))
               if v is not None}
        if slo:
            body["slo"] = slo  # pdserve's extension
        return body

    async def stream(self, req: BenchRequest) -> AsyncIterator[StreamEvent]:
        try:
            async with self.session.post(f"{self.base}/v1/completions",
                                         json=self.body(req)) as resp:
                if resp.status != 200:
                    raise RequestFailed(status_name(resp.status), await _error_text(resp))
                parser, done = SSEParser(), False
                # Read on to the end of the body after [DONE] (the server closes it at
                # once): a body left unread closes the connection instead of returning it
                # to the pool, and every request would pay a new handshake in its TTFT.
                async for chunk in resp.content.iter_any():
                    for data in parser.feed(chunk):
                        if data.strip() == DONE:
                            done = True
                        elif not done:
                            yield event_of(data)
            if not done:
                raise RequestFailed("UNAVAILABLE", "the stream ended without data: [DONE]")
        except asyncio.TimeoutError:
            raise RequestFailed("DEADLINE_EXCEEDED",
                                f"no complete answer within {self.config.timeout_s} s") from None
        except aiohttp.ClientError as exc:
            raise RequestFailed("UNAVAILABLE", f"{type(exc).__name__}: {exc}") from None


async def _error_text(resp: aiohttp.ClientResponse) -> str:
    """The error message of a non-200 answer, with its HTTP status and any Retry-After."""
    raw = await resp.read()
    try:
        _, message = error_of(json.loads(raw), "")
    except ValueError:
        message = ""
    message = message or raw.decode("utf-8", errors="replace")[:200]
    retry = resp.headers.get("Retry-After")
    return f"HTTP {resp.status}: {message}" + (f" (Retry-After {retry} s)" if retry else "")
