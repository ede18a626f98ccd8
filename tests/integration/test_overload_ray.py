"""Overload: 5x the sustainable rate for 60 s against a 1-prefill, 1-decode Ray cluster.

The sustainable rate is measured first (closed loop, a few seconds). Then requests
arrive open-loop at 5x that rate for ``OVERLOAD_S`` seconds. Every request must end
with OK or RESOURCE_EXHAUSTED (the router's bounded queues, or a full KV cache, with a
``retry-after-ms`` hint); nothing else, and no hang. The resident memory of the router
and both workers is sampled every second: it must stop growing (the second half's peak
within a small margin of the first half's). When the load drops, the cluster serves a
normal request with the single-process engine's tokens and holds no KV blocks.
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import threading
import time

import grpc
import pytest

from pdserve.cluster.cli.client import build_request
from pdserve.cluster.launch.launcher import ClusterSpec, PoolSpec, launch
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.kv_transfer.backend_config import KVTransferConfig
from pdserve.protos import pdserve_pb2_grpc
from pdserve.router.config import RouterConfig
from pdserve.router.server import ServerConfig
from pdserve.router.status import RETRY_AFTER_METADATA_KEY
from tests.cluster_helpers import engine_config

ray = pytest.importorskip("ray")

OVERLOAD_S = float(os.environ.get("PDSERVE_OVERLOAD_S", "60"))
FACTOR = 5.0
GROWTH_MARGIN_MIB = 48.0




def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_request(rng: random.Random):
    return build_request([rng.randrange(3, 900) for _ in range(rng.randrange(16, 96))],
                         max_tokens=rng.randrange(4, 24))


UNEXPECTED: list[str] = []


async def call(stub, req, timeout_s: float) -> tuple[str, bool]:
    """(status code name, whether a RESOURCE_EXHAUSTED carried a retry hint)."""
    try:
        async for _ in stub.Generate(req, timeout=timeout_s):
            pass
        return "OK", False
    except grpc.aio.AioRpcError as exc:
        hint = any(k == RETRY_AFTER_METADATA_KEY for k, _ in (exc.trailing_metadata() or ()))
        if exc.code() not in (grpc.StatusCode.RESOURCE_EXHAUSTED,):
            UNEXPECTED.append(f"{exc.code().name}: {exc.details()}")
        return exc.code().name, hint


async def closed_loop_rate(address: str, seconds: float, concurrency: int) -> float:
    rng = random.Random(1)
    done = 0
    deadline = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pdserve_pb2_grpc.GenerationStub(ch)

        async def worker():
            nonlocal done
            while time.monotonic() < deadline:
                code, _ = await call(stub, make_request(rng), 60)
                assert code == "OK", code
                done += 1

        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done / (time.monotonic() - t0)


async def open_loop(address: str, rate: float, seconds: float):
    rng = random.Random(2)
    codes: collections.Counter = collections.Counter()
    hints = 0
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pdserve_pb2_grpc.GenerationStub(ch)
        tasks = []
        t0 = time.monotonic()
        i = 0
        while (t := time.monotonic() - t0) < seconds:
            target = i / rate
            if target > t:
                await asyncio.sleep(target - t)
            tasks.append(asyncio.create_task(call(stub, make_request(rng), 300)))
            i += 1
        for code, hint in await asyncio.gather(*tasks):
            codes[code] += 1
            hints += hint
    return codes, hints


def test_five_times_sustainable_rate_is_answered_with_bounded_memory(ray_cluster,
                                                                      demo_model_dir):
    spec = ClusterSpec(engine=engine_config(demo_model_dir), prefill=PoolSpec(1, num_cpus=1),
                       decode=PoolSpec(1, num_cpus=1), kv=KVTransferConfig(backend="shm"),
                       router=RouterConfig(model=str(demo_model_dir),
                                           server=ServerConfig(port=0, metrics_port=0)),
                       torch_threads=1)
    cluster = launch(spec)
    try:
        pids = {"router": ray.get(cluster.router.pid.remote()),
                **{w: ray.get(h.pid.remote()) for w, h in (*cluster.prefills, *cluster.decodes)}}
        sustainable = asyncio.run(closed_loop_rate(cluster.address, 8.0, 8))
        samples: list[tuple[float, dict[str, float]]] = []
        stop = threading.Event()

        def sample():
            t0 = time.monotonic()
            while not stop.is_set():
                samples.append((time.monotonic() - t0, {k: rss_mib(p) for k, p in pids.items()}))
                stop.wait(1.0)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            codes, hints = asyncio.run(open_loop(cluster.address, FACTOR * sustainable,
                                                 OVERLOAD_S))
        finally:
            stop.set()
            sampler.join()

        total = sum(codes.values())
        half = [s for t, s in samples if t <= OVERLOAD_S / 2]
        late = [s for t, s in samples if OVERLOAD_S / 2 < t <= OVERLOAD_S]
        growth = {k: max(s[k] for s in late) - max(s[k] for s in half) for k in pids}
        peak = {k: max(s[k] for _, s in samples) for k in pids}
        print(f"\noverload: sustainable {sustainable:.1f} req/s, offered {FACTOR * sustainable:.1f}"
              f" req/s for {OVERLOAD_S:.0f}s = {total} requests: {dict(codes)}, "
              f"{hints} RESOURCE_EXHAUSTED with retry-after-ms; peak RSS MiB "
              f"{ {k: round(v) for k, v in peak.items()} }, second-half minus first-half peak "
              f"{ {k: round(v, 1) for k, v in growth.items()} }")
        assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, (codes, UNEXPECTED[:5])
        assert codes["OK"] > 0 and codes["RESOURCE_EXHAUSTED"] > 0
        assert hints == codes["RESOURCE_EXHAUSTED"]
        for k, g in growth.items():
            assert g < GROWTH_MARGIN_MIB, (k, growth, peak)

        # The load is gone: back to normal service, nothing held anywhere.
        prompt = [5, 6, 7, 8, 9, 10]
        engine = LLMEngine.from_config(engine_config(demo_model_dir))
        want = engine.generate([prompt], [SamplingParams(max_tokens=8)])[0].token_ids

        async def normal():
            async with grpc.aio.insecure_channel(cluster.address) as ch:
                toks = []
                async for m in pdserve_pb2_grpc.GenerationStub(ch).Generate(
                        build_request(prompt, max_tokens=8), timeout=60):
                    toks.extend(m.token_ids)
                return toks

        assert asyncio.run(normal()) == list(want)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            stats = cluster.stats().values()
            if all(getattr(s, "num_used_blocks", 0) == 0 and getattr(s, "num_reserved", 0) == 0
                   for s in stats) and ray.get(cluster.router.in_flight.remote()) == 0:
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"blocks or requests still held: {cluster.stats()}")
    finally:
        cluster.shutdown()
