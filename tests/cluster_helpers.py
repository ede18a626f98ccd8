"""Helpers shared by the tests that run a whole cluster (in-process or on Ray)."""

from __future__ import annotations

import time

from pdserve.engine.config import EngineConfig


def engine_config(model, **overrides) -> EngineConfig:
    """A small CPU engine for the demo model: 512 blocks of 16, 32 sequences, 1024-token
    steps (``overrides`` changes any field)."""
    fields = dict(model=str(model), device="cpu", num_kv_blocks=512, block_size=16,
                  max_num_seqs=32, max_num_batched_tokens=1024)
    return EngineConfig(**(fields | overrides))


def wait_until(pred, timeout: float = 15.0, interval: float = 0.05) -> bool:
    """Poll ``pred`` until it holds or ``timeout`` seconds pass; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


def local_idle(cluster) -> bool:
    """A ``LocalCluster`` holds no KV blocks, reservations or queued prefill work."""
    return (all(s.num_used_blocks == 0 and s.num_reserved == 0 for s in cluster.decode_stats())
            and all(s.num_running == 0 and s.num_waiting == 0 for s in cluster.prefill_stats()))


def ray_held(cluster) -> int:
    """Blocks, reservations and requests still held by a Ray ``Cluster``'s workers."""
    from pdserve.router.drain import work_held

    return sum(work_held(s) for s in cluster.stats().values())


def generate_through(prefill: tuple[str, object], decode: tuple[str, object], prompt,
                     max_tokens: int) -> tuple[int, ...]:
    """Greedy tokens of one request served by exactly this (prefill, decode) pair of Ray
    worker handles, through the router's own orchestrator code driven from the test process
    (the cluster's router picks pairs by load; a test that must cover every pair cannot)."""
    import asyncio
    import uuid

    from pdserve.engine.sampling_params import SamplingParams
    from pdserve.router.clients import DecodeClient, PrefillClient
    from pdserve.router.orchestrator import Orchestrator
    from pdserve.router.policies import create_policy
    from pdserve.router.request_types import SloTargets, ValidatedRequest

    async def run():
        orch = Orchestrator([PrefillClient(*prefill)], [DecodeClient(*decode)],
                            create_policy("least_loaded"))
        orch.start()
        try:
            req = ValidatedRequest(f"pair-{uuid.uuid4().hex[:8]}", tuple(prompt),
                                   SamplingParams(max_tokens=max_tokens), SloTargets(), None)
            return tuple(t for ev in [e async for e in orch.generate(req)] for t in ev.token_ids)
        finally:
            await orch.close()

    return asyncio.run(run())


def chaos_spec(model, num_prefill: int, num_decode: int, backend: str):
    """A Ray ``ClusterSpec`` for the failure tests: the demo engine, one CPU and one torch
    thread per worker, a fast heartbeat (0.2 s) so deaths and rejoins are seen quickly."""
    from pdserve.cluster.launch.launcher import ClusterSpec, PoolSpec
    from pdserve.kv_transfer.backend_config import KVTransferConfig
    from pdserve.router.config import RouterConfig
    from pdserve.router.reliability import ReliabilityConfig
    from pdserve.router.server import ServerConfig

    return ClusterSpec(
        engine=engine_config(model), prefill=PoolSpec(num_prefill, num_cpus=1),
        decode=PoolSpec(num_decode, num_cpus=1), kv=KVTransferConfig(backend=backend),
        router=RouterConfig(model=str(model), server=ServerConfig(port=0, metrics_port=0),
                            reliability=ReliabilityConfig(heartbeat_interval_s=0.2)),
        torch_threads=1)
