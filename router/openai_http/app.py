"""The OpenAI-compatible HTTP routes (aiohttp), in front of the shared ``Frontend``.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (streamed as server-sent
events ending with ``data: [DONE]`` when ``stream`` is true), ``GET /v1/models``,
``GET /health`` (liveness: the router answers) and ``GET /ready`` (503 while a pool has no
live worker). With bearer tokens configured, every route but the two probes needs
``Authorization: Bearer <token>`` (the gRPC endpoint's tokens; 401 otherwise).

Errors before the response starts get their own HTTP status (see ``errors.py``): the
stream's headers are sent only with the first output, so a request refused by admission
is a 429, not a 200 with an error inside. An error after that arrives as one
``data: {"error": ...}`` event, then ``data: [DONE]``. The server runs with aiohttp's
handler cancellation on: a client that disconnects cancels its handler, which closes
the frontend's generator and so releases the request's KV blocks on both pools.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from dataclasses import dataclass

from aiohttp import web
from pydantic import ValidationError

from pdserve.router.auth import TokenSet, bearer_token
from pdserve.router.generation import Frontend, OutputChunk
from pdserve.router.openai_http.errors import error_body, http_error, param_of
from pdserve.router.openai_http.protocol import (
    BadRequest,
    ChatCompletionRequest,
    CompletionRequest,
    to_generate_request,
)
from pdserve.router.openai_http.responses import ResponseWriter, TokenText
from pdserve.router.status import ServingError

OPEN_PATHS = frozenset({"/health", "/ready"})
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no"}


def _dumps(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _json_error(status: int, type_: str, message: str, param: str | None = None,
                headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=_dumps(error_body(status, type_, message, param)), status=status,
                        content_type="application/json", headers=headers)


def _serving_error(err: ServingError, param: str | None = None) -> web.Response:
    status, body, headers = http_error(err, param)
    return web.Response(body=_dumps(body), status=status, content_type="application/json",
                        headers=headers)


def _pydantic_error(exc: ValidationError) -> tuple[str, str | None]:
    first = exc.errors(include_url=False)[0]
    loc = [str(p) for p in first.get("loc", ())]
    if first.get("type") == "json_invalid":
        return f"request body is not valid JSON: {first.get('msg', '')}", None
    # Union members add their type names to the location; the field is its first part.
    field = loc[0] if loc else None
    where = ".".join(p for p in loc if not p.startswith(("list[", "str", "int", "dict")))
    return f"{where or 'body'}: {first.get('msg', 'invalid value')}", field


@dataclass(frozen=True)
class ServedModel:
    name: str
    max_model_len: int
    created: int


class OpenAIApp:
    """Builds the aiohttp application; see the module docstring."""

    def __init__(self, frontend: Frontend, model: ServedModel,
                 auth_tokens: tuple[str, ...] = (), max_body_bytes: int = 16 << 20):
        self.frontend = frontend
        self.model = model
        self.tokens = TokenSet(auth_tokens) if auth_tokens else None
        self.max_body_bytes = max_body_bytes
        self.text_of = TokenText(frontend.tokenizer)

    def build(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes,
                              middlewares=[self._auth] if self.tokens else [])
        app.add_routes([
            web.post("/v1/completions", self.completions),
            web.post("/v1/chat/completions", self.chat_completions),
            web.get("/v1/models", self.models),
            web.get("/health", self.health),
            web.get("/ready", self.ready),
        ])
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        if request.path in OPEN_PATHS:
            return await handler(request)
        presented = bearer_token([("authorization", v)
                                  for v in request.headers.getall("Authorization", [])])
        if presented is None or not self.tokens.matches(presented):
            what = "missing" if presented is None else "invalid"
            return _json_error(401, "AuthenticationError",
                               f"{what} bearer token (Authorization: Bearer <token>)",
                               headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    # -- probes and models ------------------------------------------------------------
    async def health(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def ready(self, _request: web.Request) -> web.Response:
        orch = self.frontend.orchestrator
        pools = {"decode": orch.decode_load}
        if not orch.colocated:
            pools["prefill"] = orch.prefill_load
        alive = {name: sum(1 for w in loads.values() if w.healthy)
                 for name, loads in pools.items()}
        ready = all(alive.values())
        return web.json_response({"status": "ready" if ready else "not ready",
                                  "alive_workers": alive}, status=200 if ready else 503)

    async def models(self, _request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{
            "id": self.model.name, "object": "model", "created": self.model.created,
            "owned_by": "pdserve", "root": self.model.name,
            "max_model_len": self.model.max_model_len}]})

    # -- generation -------------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, CompletionRequest, "completions")

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, ChatCompletionRequest, "chat")

    async def _generate(self, request: web.Request, body_type, kind: str) -> web.StreamResponse:
        t0 = time.monotonic()
        try:
            body = body_type.model_validate_json(await request.read())
        except ValidationError as exc:
            self.frontend.count("INVALID_ARGUMENT")
            message, param = _pydantic_error(exc)
            return _json_error(400, "BadRequestError", message, param)
        if body.model is not None and body.model != self.model.name:
            self.frontend.count("NOT_FOUND")
            return _json_error(404, "NotFoundError",
                               f"The model `{body.model[:200]}` does not exist; this server "
                               f"serves `{self.model.name}`", "model")
        rid = body.request_id or request.headers.get("X-Request-Id") or uuid.uuid4().hex
        try:
            req = self.frontend.validate(to_generate_request(body, rid))
        except BadRequest as exc:
            self.frontend.count("INVALID_ARGUMENT")
            return _json_error(400, "BadRequestError", str(exc), exc.param)
        except ServingError as err:
            return _serving_error(err, param_of(err.message, kind))
        writer = ResponseWriter(kind, req.request_id, self.model.name, self.text_of,
                                logprobs=req.params.logprobs is not None,
                                return_token_ids=body.return_token_ids)
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        chunks = self.frontend.generate(req, t0, lambda: "CANCELLED")
        async with contextlib.aclosing(chunks):
            if body.stream:
                return await self._stream(request, chunks, writer, include_usage)
            return await self._whole(chunks, writer)

    async def _whole(self, chunks, writer: ResponseWriter) -> web.Response:
        got: list[OutputChunk] = []
        try:
            async for c in chunks:
                got.append(c)
        except ServingError as err:
            return _serving_error(err)
        return web.Response(body=_dumps(writer.whole(got)), content_type="application/json")

    async def _stream(self, request: web.Request, chunks, writer: ResponseWriter,
                      include_usage: bool) -> web.StreamResponse:
        try:
            first = await anext(chunks)
        except ServingError as err:
            return _serving_error(err)
        resp = web.StreamResponse(headers=_SSE_HEADERS)
        await resp.prepare(request)

        async def send(obj: dict | bytes) -> None:
            data = obj if isinstance(obj, bytes) else _dumps(obj)
            await resp.write(b"data: " + data + b"\n\n")

        role = writer.role_chunk()
        if role is not None:
            await send(role)
        offset = 0
        c: OutputChunk | None = first
        try:
            while c is not None:
                out = writer.chunk(c, offset)
                offset += len(c.text)
                if out is not None:
                    await send(out)
                if c.finish_reason is not None:
                    if include_usage and c.usage is not None:
                        await send(writer.usage_chunk(c.usage))
                    break
                c = await anext(chunks, None)
        except ServingError as err:
            _status, body, _headers = http_error(err)
            await send(body)
        await send(b"[DONE]")
        await resp.write_eof()
        return resp
