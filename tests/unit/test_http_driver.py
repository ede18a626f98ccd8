"""The load generator's OpenAI HTTP driver against a fake SSE server in this file.

The fake (an aiohttp app on the test's own event loop) answers ``/v1/models`` and
``/v1/completions`` the way pdserve's router does, and misbehaves on purpose for some
requests: refused with 429 + Retry-After or 400, an error event mid-stream, a stream cut
before ``[DONE]``, a non-JSON 500, a stream written in 7-byte pieces with CRLF line ends.
It records every body and header it gets, so the tests check what the driver sends as
well as what it records. The real server is exercised in test_loadgen.py.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web

from pdserve.cluster.cli.client import ClientSecurity
from pdserve.cluster.cli.replay.config import LoadGenConfig
from pdserve.cluster.cli.replay.http_driver import HttpDriver, base_url, status_name
from pdserve.cluster.cli.replay.loadgen import run_trace_async
from pdserve.cluster.cli.replay.prompts import build_bench_request
from pdserve.cluster.cli.replay.sse import SSEParser
from pdserve.workloads.trace import Trace, TraceRequest

TOKEN = "s3cret-token"
TIMING = {"ttft_ms": 12.5, "e2e_ms": 40.0, "prefill_queue_ms": 1.5, "prefill_ms": 9.0,
          "kv_transfer_wait_ms": 0.5}


class FakeOpenAI:
    """What each request index does: "ok" (default), "crlf" (ok, written in small pieces
    with CRLF), "429", "400", "500-text", "error-mid-stream", "cut"."""

    def __init__(self, behaviour: dict[int, str], token: str | None = None):
        self.behaviour = behaviour
        self.token = token
        self.bodies: list[dict] = []
        self.auth: list[str | None] = []
        self.model_lists = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.add_routes([web.get("/v1/models", self.models),
                        web.post("/v1/completions", self.completions)])
        return app

    def _unauthorized(self, request: web.Request) -> web.Response | None:
        self.auth.append(request.headers.get("Authorization"))
        if self.token and request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"error": {"message": "invalid bearer token", "type":
                                                "AuthenticationError", "param": None,
                                                "code": 401}}, status=401)
        return None

    async def models(self, request: web.Request) -> web.Response:
        self.model_lists += 1
        return self._unauthorized(request) or web.json_response(
            {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        denied = self._unauthorized(request)
        if denied:
            return denied
        body = await request.json()
        self.bodies.append(body)
        index = int(body["request_id"].rsplit("-", 1)[1])
        how = self.behaviour.get(index, "ok")
        if how == "429":
            return web.json_response({"error": {"message": "overloaded", "type": "RateLimitError",
                                                "param": None, "code": 429}},
                                     status=429, headers={"Retry-After": "2"})
        if how == "400":
            return web.json_response({"error": {"message": "prompt is too long", "type":
                                                "BadRequestError", "param": "prompt",
                                                "code": 400}}, status=400)
        if how == "500-text":
            return web.Response(text="Internal Server Error", status=500)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        eol = "\r\n" if how == "crlf" else "\n"

        async def send(obj) -> None:
            data = ("data: " + (obj if isinstance(obj, str) else json.dumps(obj)) + eol + eol)
            raw = data.encode()
            step = 7 if how == "crlf" else len(raw)
            for i in range(0, len(raw), step):
                await resp.write(raw[i:i + step])

        n = body["max_tokens"]
        # Two tokens in the first chunk, then one per chunk; the text is "é" per token
        # (two UTF-8 bytes, so 7-byte pieces cut characters in half).
        sizes = [min(2, n)] + [1] * (n - min(2, n))
        made = 0
        for i, k in enumerate(sizes):
            if how == "error-mid-stream" and i == 1:
                await send({"error": {"message": "KV transfer failed", "type":
                                      "ServiceUnavailableError", "param": None, "code": 503}})
                break
            if how == "cut" and i == 1:
                return resp  # the connection closes with no [DONE]
            last = i == len(sizes) - 1
            await send({"id": "cmpl-x", "object": "text_completion", "created": 0,
                        "model": "fake-model", "choices": [{
                            "index": 0, "text": "é" * k, "token_ids": list(range(made, made + k)),
                            "logprobs": None, "finish_reason": "length" if last else None}]})
            made += k
        else:
            await send({"id": "cmpl-x", "object": "text_completion", "created": 0,
                        "model": "fake-model", "choices": [],
                        "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": n,
                                  "total_tokens": len(body["prompt"]) + n,
                                  "prompt_tokens_details": {"cached_tokens": 16}},
                        "timing": TIMING})
        await send("[DONE]")
        await resp.write_eof()
        return resp


async def serve_and_run(fake: FakeOpenAI, trace: Trace, cfg: LoadGenConfig,
                        address_form: str = "{host}:{port}"):
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        return await run_trace_async(address_form.format(host="127.0.0.1", port=port), trace,
                                     cfg)
    finally:
        await runner.cleanup()


def trace_of(n: int, output_len: int = 4) -> Trace:
    return Trace("fake", tuple(TraceRequest(0.001 * i, 10 + i, output_len) for i in range(n)))


def test_streams_are_recorded_like_grpc_ones():
    fake = FakeOpenAI({1: "crlf"})
    cfg = LoadGenConfig(api="http", quiet=True, seed=3, vocab_size=100)
    trace = trace_of(2)
    run = asyncio.run(serve_and_run(fake, trace, cfg, "http://{host}:{port}/v1"))
    for rec in run.records:
        assert rec.outcome == "ok", (rec.status, rec.error)
        # Messages: 2 + 1 + 1 tokens, then the token-less usage chunk.
        assert rec.message_tokens == (2, 1, 1, 0) and rec.num_tokens == 4
        assert rec.finish_reason == "length"
        assert rec.usage.completion_tokens == 4 and rec.usage.cached_tokens == 16
        assert rec.usage.prompt_tokens == rec.prompt_len
        assert (rec.usage.ttft_ms, rec.usage.kv_transfer_wait_ms) == (12.5, 0.5)
        assert rec.send_s <= rec.first_token_s <= rec.last_token_s <= rec.end_s
    # What was sent: the model /v1/models named, the seeded prompt ids, greedy, ignore_eos,
    # streamed with usage and token ids.
    by_id = {b["request_id"]: b for b in fake.bodies}
    for i, tr in enumerate(trace.requests):
        body = by_id[f"fake-{i}"]
        assert body["prompt"] == list(build_bench_request(i, tr, cfg, "x").prompt)
        assert body == {"model": "fake-model", "prompt": body["prompt"], "max_tokens": 4,
                        "temperature": 0.0, "ignore_eos": True, "stream": True,
                        "stream_options": {"include_usage": True}, "return_token_ids": True,
                        "request_id": f"fake-{i}"}
    assert fake.auth == [None, None, None]  # no token configured: no header


def test_errors_map_to_grpc_status_names():
    behaviour = {0: "429", 1: "400", 2: "500-text", 3: "error-mid-stream", 4: "cut"}
    fake = FakeOpenAI(behaviour)
    run = asyncio.run(serve_and_run(fake, trace_of(6), LoadGenConfig(api="http", quiet=True,
                                                                      model="fake-model")))
    recs = run.records
    assert [r.status for r in recs] == ["RESOURCE_EXHAUSTED", "INVALID_ARGUMENT", "INTERNAL",
                                        "UNAVAILABLE", "UNAVAILABLE", "OK"]
    assert [r.outcome for r in recs] == ["rejected"] + ["failed"] * 4 + ["ok"]
    assert recs[0].error == "HTTP 429: overloaded (Retry-After 2 s)"
    assert recs[1].error == "HTTP 400: prompt is too long"
    assert recs[2].error == "HTTP 500: Internal Server Error"
    assert recs[3].error == "KV transfer failed" and recs[3].num_tokens == 2
    assert "without data: [DONE]" in recs[4].error and recs[4].num_tokens == 2
    assert fake.model_lists == 0  # --model given: no need to ask


def test_bearer_token_from_the_client_security_options(monkeypatch):
    monkeypatch.setenv("BENCH_TEST_TOKEN", TOKEN)
    fake = FakeOpenAI({}, token=TOKEN)
    secured = LoadGenConfig(api="http", quiet=True,
                            security=ClientSecurity(token_env="BENCH_TEST_TOKEN"))
    run = asyncio.run(serve_and_run(fake, trace_of(2), secured))
    assert [r.outcome for r in run.records] == ["ok", "ok"]
    assert fake.auth == [f"Bearer {TOKEN}"] * 3
    # Without the token the model list is refused: the run cannot start, and says why.
    with pytest.raises(ValueError, match="cannot list the models .*invalid bearer token"):
        asyncio.run(serve_and_run(FakeOpenAI({}, token=TOKEN), trace_of(1),
                                  LoadGenConfig(api="http", quiet=True)))
    # With --model the requests themselves are refused, as UNAUTHENTICATED.
    run = asyncio.run(serve_and_run(FakeOpenAI({}, token=TOKEN), trace_of(1),
                                    LoadGenConfig(api="http", quiet=True, model="fake-model")))
    assert run.records[0].status == "UNAUTHENTICATED"


def test_unreachable_server_is_unavailable():
    async def run():
        # A port nobody listens on: bind one, note it, close it.
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        return await run_trace_async(f"127.0.0.1:{port}", trace_of(1),
                                     LoadGenConfig(api="http", quiet=True, model="m"))

    rec = asyncio.run(run()).records[0]
    assert rec.status == "UNAVAILABLE" and rec.outcome == "failed"


def test_addresses_statuses_and_config():
    assert base_url("localhost:8000") == "http://localhost:8000"
    assert base_url("localhost:8000", ClientSecurity(tls=True)) == "https://localhost:8000"
    assert base_url("https://h:1/v1/") == "https://h:1"
    assert base_url("http://h:1/proxy") == "http://h:1/proxy"
    with pytest.raises(ValueError, match="http\\(s\\)://"):
        base_url("grpc://h:1")
    with pytest.raises(ValueError, match="TLS options"):
        base_url("http://h:1", ClientSecurity(tls=True))
    assert [status_name(s) for s in (401, 404, 429, 503, 504, 418)] == [
        "UNAUTHENTICATED", "NOT_FOUND", "RESOURCE_EXHAUSTED", "UNAVAILABLE",
        "DEADLINE_EXCEEDED", "UNKNOWN"]
    with pytest.raises(ValueError, match="api must be"):
        LoadGenConfig(api="websocket")


def test_body_is_what_the_server_maps_including_slo_targets():
    from pdserve.cluster.cli.replay.prompts import BenchRequest
    from pdserve.router.openai_http.protocol import CompletionRequest, to_generate_request

    driver = HttpDriver("h:1", LoadGenConfig(api="http", slo_ttft_s=1.0, slo_tpot_s=0.05))
    driver.model = "m"
    body = driver.body(BenchRequest("run-1", (5, 6, 7), 9, 1.0, 0.05))
    req = to_generate_request(CompletionRequest.model_validate(body), "run-1")
    assert list(req.token_ids.ids) == [5, 6, 7] and req.sampling.max_tokens == 9
    assert req.sampling.temperature == 0.0 and req.stop.ignore_eos
    assert (req.slo.ttft_ms, req.slo.tpot_ms) == (1000.0, 50.0)
    plain = driver.body(BenchRequest("run-2", "text", 4))
    assert "slo" not in plain and plain["prompt"] == "text"


def test_sse_parser_handles_split_lines_and_fields():
    p = SSEParser()
    raw = ": comment\r\ndata: {\"a\": \"\xc3\xa9\"}\r\n\r\nevent: x\r\ndata:one\r\ndata: two\r\n\r\nid: 3\n\n"
    out = []
    for i in range(len(raw)):  # one byte at a time: every split point
        out += p.feed(raw.encode("latin-1")[i:i + 1])
    assert out == ['{"a": "é"}', "one\ntwo"]
    assert SSEParser().feed(b"data: x\r\rdata: y\n\n") == ["x", "y"]
    assert SSEParser().feed(b"data: [DONE]\n") == []  # not ended by a blank line yet
