"""The OpenAI-compatible HTTP API, in one process (real workers, router, aiohttp; no Ray).

Driven by the official ``openai`` SDK where it can be, and by raw HTTP where the test
looks at what the SDK hides (status codes, headers, the SSE framing, a dropped
connection). The Ray cluster version is tests/integration/test_openai_http_ray.py.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import openai
import pytest

from pdserve.cluster.launch.local import LocalCluster
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.tokenizer import Tokenizer
from pdserve.router.config import RouterConfig
from pdserve.router.openai_http.protocol import (
    BadRequest,
    ChatCompletionRequest,
    CompletionRequest,
    to_generate_request,
)
from pdserve.router.reliability import ReliabilityConfig
from pdserve.router.server import ServerConfig
from tests.cluster_helpers import engine_config, wait_until
from tests.cluster_helpers import local_idle as no_blocks_held

MODEL = "demo-model"


def _router(model_dir, **server) -> RouterConfig:
    return RouterConfig(model=str(model_dir), served_model_name=MODEL,
                        server=ServerConfig(port=0, metrics_port=None, http_port=0, **server),
                        reliability=ReliabilityConfig(max_in_flight=8))


@pytest.fixture(scope="module")
def cluster(demo_model_dir):
    # Room for eight long streams at once (the overload test holds them).
    with LocalCluster(engine_config(demo_model_dir, num_kv_blocks=2048),
                      router=_router(demo_model_dir)) as c:
        yield c


@pytest.fixture(scope="module")
def engine(demo_model_dir):
    return LLMEngine.from_config(engine_config(demo_model_dir))


def sdk(cluster, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{cluster.server.http_address}/v1", api_key=key,
                         max_retries=0, timeout=60)


def post(cluster, path: str, body: dict | bytes, token: str | None = None):
    """(status, headers, parsed JSON body) of a raw POST."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"http://{cluster.server.http_address}{path}", data=data,
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), json.loads(err.read())


# -- request mapping (no server) -------------------------------------------------------------
def test_completion_body_maps_onto_the_shared_request():
    body = CompletionRequest.model_validate({
        "prompt": [[5, 6, 7]], "max_tokens": 9, "temperature": 0.5, "top_p": 0.9, "top_k": -1,
        "seed": 3, "stop": "END", "min_tokens": 2, "ignore_eos": True, "logprobs": 2,
        "stop_token_ids": [4], "user": "u1", "some_future_field": {"x": 1},
        "slo": {"ttft_ms": 250.0, "tpot_ms": 50}})
    req = to_generate_request(body, "r1")
    assert list(req.token_ids.ids) == [5, 6, 7] and req.request_id == "r1"
    sp = req.sampling
    assert (sp.max_tokens, sp.min_tokens, sp.seed, sp.logprobs) == (9, 2, 3, 2)
    assert sp.temperature == pytest.approx(0.5) and sp.top_p == pytest.approx(0.9)
    assert not sp.HasField("top_k")  # -1 = off
    assert list(req.stop.stop) == ["END"] and list(req.stop.stop_token_ids) == [4]
    assert req.stop.ignore_eos
    assert (req.slo.ttft_ms, req.slo.tpot_ms) == (250.0, 50.0)


def test_chat_body_maps_messages_and_logprob_flags():
    body = ChatCompletionRequest.model_validate({
        "messages": [{"role": "system", "content": "be brief"},
                     {"role": "user", "content": [{"type": "text", "text": "hi "},
                                                  {"type": "text", "text": "there"}]}],
        "max_completion_tokens": 5, "max_tokens": 99, "logprobs": True, "top_logprobs": 3})
    req = to_generate_request(body, "r2")
    assert [(m.role, m.content) for m in req.chat.messages] == [("system", "be brief"),
                                                                 ("user", "hi there")]
    assert req.sampling.max_tokens == 5 and req.sampling.logprobs == 3


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "n": 2}, "n"),
    ({"prompt": "x", "echo": True}, "echo"),
    ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": [1, -2]}, "prompt"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "max_tokens": 1 << 40}, "max_tokens"),
])
def test_unsupported_or_malformed_completion_fields(body, param):
    with pytest.raises(BadRequest) as err:
        to_generate_request(CompletionRequest.model_validate(body), "r")
    assert err.value.param == param


def test_chat_top_logprobs_needs_logprobs_and_images_are_refused():
    with pytest.raises(BadRequest, match="logprobs"):
        to_generate_request(ChatCompletionRequest.model_validate(
            {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}), "r")
    with pytest.raises(BadRequest, match="image_url"):
        to_generate_request(ChatCompletionRequest.model_validate(
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}), "r")


# -- against a running router ----------------------------------------------------------------
def test_models_health_ready(cluster):
    models = sdk(cluster).models.list()
    assert [m.id for m in models.data] == [MODEL]
    for path in ("/health", "/ready"):
        with urllib.request.urlopen(f"http://{cluster.server.http_address}{path}") as r:
            assert r.status == 200
    orch = cluster.server.orchestrator
    orch.decode_load["decode-0"].healthy = False
    try:
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://{cluster.server.http_address}/ready")
        assert err.value.code == 503
        assert json.loads(err.value.read())["alive_workers"]["decode"] == 0
        # No decode worker can take a request: 503 in OpenAI's error shape.
        status, _, body = post(cluster, "/v1/completions",
                               {"model": MODEL, "prompt": "hello", "max_tokens": 2})
        assert status == 503 and body["error"]["code"] == 503
        assert "decode" in body["error"]["message"]
    finally:
        orch.decode_load["decode-0"].healthy = True


def test_completions_greedy_equal_engine_streamed_and_whole(cluster, engine):
    prompt = "The kitchen smelled of"
    want = engine.generate([prompt], SamplingParams(max_tokens=12))[0]
    client = sdk(cluster)
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert whole.choices[0].text == want.text
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 12
    assert whole.usage.prompt_tokens == len(want.prompt_token_ids)
    chunks = list(client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"return_token_ids": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    ids = [t for c in chunks if c.choices for t in c.choices[0].model_extra["token_ids"]]
    assert tuple(ids) == want.token_ids
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-2].choices[0].finish_reason == "length"
    # the timing extension carries the hops to the first token, as gRPC's ServerTiming
    timing = chunks[-1].model_extra["timing"]
    assert [h["name"] for h in timing["hops"]][-1] == "to_stream"
    assert timing["received_monotonic_s"] > 0
    # Token-id prompts go through unchanged.
    ids_prompt = list(want.prompt_token_ids)
    again = client.completions.create(model=MODEL, prompt=ids_prompt, max_tokens=12,
                                      temperature=0)
    assert again.choices[0].text == want.text


def test_chat_uses_the_chat_template_and_matches_engine(cluster, engine, demo_model_dir):
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Name a colour."}]
    ids = Tokenizer.from_pretrained(demo_model_dir).apply_chat_template(messages)
    want = engine.generate([ids], SamplingParams(max_tokens=10))[0]
    client = sdk(cluster)
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10,
                                           temperature=0)
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == want.text
    assert whole.usage.prompt_tokens == len(ids)
    stream = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10,
                                                 temperature=0, stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == want.text
    assert stream[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in stream)  # no stream_options: no usage chunk


def test_seeded_sampling_is_reproducible(cluster):
    client = sdk(cluster)

    def run(seed):
        return client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=16,
                                         temperature=1.0, top_p=0.95, seed=seed).choices[0].text

    first = run(1234)
    assert run(1234) == first
    assert any(run(s) != first for s in (1, 2, 3))


def test_stop_strings_logprobs_and_min_tokens(cluster, engine):
    client = sdk(cluster)
    prompt = "The kitchen smelled of"
    full = engine.generate([prompt], SamplingParams(max_tokens=16))[0]
    # A stop string taken from the greedy text ends it there, excluded from the output.
    stop = full.text[5:8]
    cut = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0,
                                    stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == full.text[:full.text.index(stop)]
    # Completions logprobs: one entry per token, top alternatives, the chosen one among them.
    lp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0,
                                   logprobs=3).choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(len(top) <= 3 and max(top.values()) == pytest.approx(chosen, abs=1e-5)
               for top, chosen in zip(lp.top_logprobs, lp.token_logprobs, strict=True))
    # Chat logprobs.
    chat = client.chat.completions.create(model=MODEL, max_tokens=3, temperature=0,
                                          messages=[{"role": "user", "content": "hi"}],
                                          logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 for c in content)
    # min_tokens: with the first greedy token as a stop id the request ends after one
    # token; asked for at least 3 it cannot stop before them (nor pick that token).
    first = full.token_ids[0]
    short = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                      extra_body={"stop_token_ids": [first]})
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens == 1
    held = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                     extra_body={"stop_token_ids": [first], "min_tokens": 3,
                                                 "return_token_ids": True})
    got = held.choices[0].model_extra["token_ids"]
    assert held.usage.completion_tokens >= 3 and first not in got[:3]


@pytest.mark.parametrize("body, status, param", [
    ({"model": MODEL, "prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "temperature": -1.0}, 400, "temperature"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": [5] * 5000}, 400, "prompt"),
    ({"model": MODEL, "prompt": "x", "n": 3}, 400, "n"),
    ({"model": MODEL, "prompt": "x", "slo": {"ttft_ms": -5.0}}, 400, "slo"),
    ({"model": MODEL}, 400, "prompt"),
    ({"model": "gpt-4o", "prompt": "x"}, 404, "model"),
])
def test_errors_in_openai_shape(cluster, body, status, param):
    got, _, err = post(cluster, "/v1/completions", body)
    assert got == status
    assert set(err["error"]) == {"message", "type", "param", "code"}
    assert err["error"]["code"] == status and err["error"]["param"] == param
    # The server keeps serving.
    assert sdk(cluster).completions.create(model=MODEL, prompt="x", max_tokens=2,
                                           temperature=0).usage.completion_tokens == 2


def test_invalid_json_is_400(cluster):
    status, _, err = post(cluster, "/v1/chat/completions", b"{not json")
    assert status == 400 and "JSON" in err["error"]["message"]


def finished(cluster, code: str) -> float:
    """Requests the router counted as finished with ``code``."""
    m = cluster.server.metrics
    return m.registry.get_sample_value("pdserve_requests_total",
                                       {"model": m.model, "code": code}) or 0.0


def test_overload_is_429_with_retry_after_and_disconnect_frees_blocks(cluster):
    """max_in_flight is 8: eight held streams fill the router, the ninth gets 429. Then the
    streams' connections are dropped mid-generation: every block on both pools is freed."""
    import aiohttp

    url = f"http://{cluster.server.http_address}/v1/completions"
    body = {"model": MODEL, "prompt": [11] * 40, "max_tokens": 1500, "temperature": 0,
            "ignore_eos": True, "stream": True}

    async def scenario():
        sessions = [aiohttp.ClientSession() for _ in range(8)]
        try:
            streams = [await s.post(url, json=body) for s in sessions]
            for resp in streams:
                assert resp.status == 200
                assert (await resp.content.readuntil(b"\n\n")).startswith(b"data: {")
            async with aiohttp.ClientSession() as s, s.post(url, json=body) as resp:
                assert resp.status == 429
                assert int(resp.headers["Retry-After"]) >= 1
                assert (await resp.json())["error"]["type"] == "RateLimitError"
        finally:
            for s in sessions:  # drops the connections mid-stream
                await s.close()

    cancelled = finished(cluster, "CANCELLED")
    asyncio.run(scenario())
    assert wait_until(lambda: no_blocks_held(cluster) and cluster.server.orchestrator
                      .in_flight() == 0, timeout=60), (cluster.decode_stats(),
                                                       cluster.prefill_stats())
    assert finished(cluster, "CANCELLED") == cancelled + 8  # not run to their end


def test_non_streamed_request_cancelled_when_client_goes(cluster):
    import aiohttp

    url = f"http://{cluster.server.http_address}/v1/completions"

    async def scenario():
        async with aiohttp.ClientSession() as s:
            with pytest.raises(asyncio.TimeoutError):
                await s.post(url, json={"model": MODEL, "prompt": [12] * 30, "max_tokens": 3000,
                                        "ignore_eos": True},
                             timeout=aiohttp.ClientTimeout(total=1.0))

    cancelled = finished(cluster, "CANCELLED")
    asyncio.run(scenario())
    assert wait_until(lambda: no_blocks_held(cluster) and cluster.server.orchestrator
                      .in_flight() == 0, timeout=60)
    assert finished(cluster, "CANCELLED") == cancelled + 1  # not run to its end


def test_bearer_tokens_shared_with_grpc(demo_model_dir):
    with LocalCluster(engine_config(demo_model_dir, num_kv_blocks=64),
                      router=_router(demo_model_dir, auth_tokens=("s3cret-token-123",))) as c:
        with pytest.raises(openai.AuthenticationError):
            sdk(c).models.list()
        with pytest.raises(openai.AuthenticationError):
            sdk(c, key="wrong-token-xyz").completions.create(model=MODEL, prompt="x")
        status, headers, _ = post(c, "/v1/completions", {"prompt": "x"})
        assert status == 401 and headers.get("WWW-Authenticate") == "Bearer"
        ok = sdk(c, key="s3cret-token-123").completions.create(model=MODEL, prompt="x",
                                                                max_tokens=2)
        assert ok.usage.completion_tokens == 2
        with urllib.request.urlopen(f"http://{c.server.http_address}/health") as r:
            assert r.status == 200  # probes need no token
