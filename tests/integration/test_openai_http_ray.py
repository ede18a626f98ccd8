"""The OpenAI-compatible HTTP API of a Ray cluster, driven by the official ``openai`` SDK.

One 1-prefill, 1-decode cluster on the demo model (shm KV), bearer tokens on, the router
holding at most 8 requests: chat and completions, streamed and whole, return the
single-process engine's greedy text; a seeded sampled request is reproducible; stop
strings, max_tokens, logprobs and usage hold; 400, 401, 404, 429 (with Retry-After) and
503 (while the only decode worker is down) come in OpenAI's error shape; clients that
disconnect mid-stream leave no block held on either pool.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from pdserve.cluster.launch.launcher import ClusterSpec, PoolSpec, launch
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.tokenizer import Tokenizer
from pdserve.kv_transfer.backend_config import KVTransferConfig
from pdserve.router.config import RouterConfig
from pdserve.router.reliability import ReliabilityConfig
from pdserve.router.server import ServerConfig
from tests.cluster_helpers import engine_config, ray_held, wait_until

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.integration

MODEL = "demo"
TOKEN = "test-token-0123456789"
PROMPTS = ["The kitchen smelled of", "A short note about", "Rain fell on the",
           "In the morning the router", "Tokens stream", "Once", "The cache was full of",
           "Seven decode workers"]


@pytest.fixture(scope="module")
def cluster(ray_cluster, demo_model_dir):
    spec = ClusterSpec(
        engine=engine_config(demo_model_dir, num_kv_blocks=2048),
        prefill=PoolSpec(1, num_cpus=1), decode=PoolSpec(1, num_cpus=1),
        kv=KVTransferConfig(backend="shm"),
        router=RouterConfig(
            model=str(demo_model_dir), served_model_name=MODEL,
            server=ServerConfig(port=0, http_port=0, metrics_port=None, auth_tokens=(TOKEN,)),
            reliability=ReliabilityConfig(max_in_flight=8, heartbeat_interval_s=0.2)),
        torch_threads=1)
    c = launch(spec)
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def engine(demo_model_dir):
    return LLMEngine.from_config(engine_config(demo_model_dir))


def sdk(cluster, key: str = TOKEN):
    return openai.OpenAI(base_url=f"http://{cluster.http_address}/v1", api_key=key,
                         max_retries=0, timeout=120)


def get(cluster, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://{cluster.http_address}{path}", timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


def test_concurrent_greedy_completions_and_chat_equal_the_engine(cluster, engine,
                                                                 demo_model_dir):
    max_tokens = [3, 17, 8, 12, 1, 20, 9, 15]
    want = engine.generate(PROMPTS, [SamplingParams(max_tokens=m) for m in max_tokens])
    client = sdk(cluster)

    def one(i):
        if i % 2:  # half streamed, with the usage chunk
            chunks = list(client.completions.create(
                model=MODEL, prompt=PROMPTS[i], max_tokens=max_tokens[i], temperature=0,
                stream=True, stream_options={"include_usage": True}))
            return ("".join(c.choices[0].text for c in chunks if c.choices),
                    chunks[-1].usage.completion_tokens)
        r = client.completions.create(model=MODEL, prompt=PROMPTS[i], max_tokens=max_tokens[i],
                                      temperature=0)
        return r.choices[0].text, r.usage.completion_tokens

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = list(pool.map(one, range(len(PROMPTS))))
    assert [g[0] for g in got] == [w.text for w in want]
    assert [g[1] for g in got] == [len(w.token_ids) for w in want]

    messages = [{"role": "user", "content": "Say something."}]
    ids = Tokenizer.from_pretrained(demo_model_dir).apply_chat_template(messages)
    chat_want = engine.generate([ids], SamplingParams(max_tokens=10))[0]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10,
                                           temperature=0)
    assert whole.choices[0].message.content == chat_want.text
    assert whole.usage.prompt_tokens == len(ids) and whole.usage.completion_tokens == 10
    stream = list(client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) \
        == chat_want.text
    assert stream[-1].usage.total_tokens == len(ids) + 10


def test_seed_stop_logprobs(cluster, engine):
    client = sdk(cluster)

    def sampled(seed):
        return client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Tell a story."}], max_tokens=16,
            temperature=0.9, top_p=0.95, seed=seed).choices[0].message.content

    first = sampled(7)
    assert sampled(7) == first
    full = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=16))[0].text
    stop = full[4:7]
    cut = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=16,
                                    temperature=0, stop=stop)
    assert cut.choices[0].text == full[:full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    lp = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=5, temperature=0,
                                   logprobs=2).choices[0].logprobs
    assert len(lp.token_logprobs) == 5 and all(len(t) == 2 for t in lp.top_logprobs)
    assert all(v <= 0 for v in lp.token_logprobs)


def test_error_statuses(cluster):
    client = sdk(cluster)
    with pytest.raises(openai.AuthenticationError):
        sdk(cluster, key="not-the-token-000").models.list()
    assert [m.id for m in client.models.list().data] == [MODEL]
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="llama-70b", prompt="x")
    assert err.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="x", max_tokens=10**6)
    assert err.value.body["param"] == "max_tokens" and err.value.status_code == 400
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=2)
    assert get(cluster, "/health") == 200 and get(cluster, "/ready") == 200


def test_overload_429_then_disconnects_leave_nothing_held(cluster):
    import aiohttp

    url = f"http://{cluster.http_address}/v1/chat/completions"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "go on " * 30}],
            "max_tokens": 1500, "ignore_eos": True, "temperature": 0, "stream": True}

    async def scenario():
        sessions = [aiohttp.ClientSession(headers=headers) for _ in range(8)]
        try:
            streams = [await s.post(url, json=body) for s in sessions]
            for resp in streams:
                assert resp.status == 200
                await resp.content.readuntil(b"\n\n")  # the role chunk
                await resp.content.readuntil(b"\n\n")  # first content: generating
            async with aiohttp.ClientSession(headers=headers) as s, s.post(url, json=body) as r:
                assert r.status == 429 and int(r.headers["Retry-After"]) >= 1
                assert (await r.json())["error"]["code"] == 429
        finally:
            for s in sessions:
                await s.close()

    asyncio.run(scenario())
    assert wait_until(lambda: ray_held(cluster) == 0, timeout=60), cluster.stats()


def test_no_live_decode_worker_is_503_until_it_restarts(cluster):
    import ray

    _, decode = cluster.decodes[0]
    os.kill(ray.get(decode.pid.remote()), signal.SIGKILL)
    assert wait_until(lambda: get(cluster, "/ready") == 503, timeout=30)
    req = urllib.request.Request(
        f"http://{cluster.http_address}/v1/completions", method="POST",
        data=json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 2}).encode(),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=60)
    assert err.value.code == 503
    assert json.loads(err.value.read())["error"]["type"] == "ServiceUnavailableError"
    # Ray restarts the worker; the heartbeat sees it back and the pool serves again.
    assert wait_until(lambda: get(cluster, "/ready") == 200, timeout=120)
    r = sdk(cluster).completions.create(model=MODEL, prompt="x", max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2
