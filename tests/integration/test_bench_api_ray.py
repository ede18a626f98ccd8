"""``pdserve bench --api grpc,http`` against a real Ray cluster (1 prefill + 1 decode worker).

The command runs as a user would run it (a subprocess), on a small Mooncake trace written
here: both APIs serve every request, the side-by-side table and each API's files are
written, and the HTTP run, which sends exactly the prompts the gRPC run sent, finds
their shared blocks in the prefill worker's prefix cache.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pdserve.cluster.cli.replay.records import RunResult
from pdserve.cluster.launch.launcher import ClusterSpec, PoolSpec, launch
from pdserve.kv_transfer.backend_config import KVTransferConfig
from pdserve.router.config import RouterConfig
from pdserve.router.server import ServerConfig
from tests.cluster_helpers import engine_config

pytestmark = pytest.mark.integration

ONE = PoolSpec(1, num_cpus=1)


def test_bench_grpc_and_http_side_by_side(ray_cluster, demo_model_dir, tmp_path):
    trace = tmp_path / "mooncake.jsonl"
    # 600-token prompts of two 512-token blocks, the first shared by all; scaled by 0.05
    # below: 30 tokens in blocks of 26, so the first 16-token cache block is shared.
    trace.write_text("\n".join(json.dumps(
        {"timestamp": 250 * i, "input_length": 600, "output_length": 80,
         "hash_ids": [0, 1 + i]}) for i in range(6)) + "\n")
    spec = ClusterSpec(engine=engine_config(demo_model_dir), prefill=ONE, decode=ONE,
                       kv=KVTransferConfig(backend="shm"),
                       router=RouterConfig(model=str(demo_model_dir), server=ServerConfig(
                           port=0, http_port=0, metrics_port=0)),
                       torch_threads=1)
    cluster = launch(spec)
    try:
        assert cluster.http_address
        out_dir = tmp_path / "results"
        proc = subprocess.run(
            [sys.executable, "-m", "pdserve", "bench", "--api", "grpc,http",
             "--address", f"{cluster.address},http://{cluster.http_address}",
             "--trace", str(trace), "--length-scale", "0.05", "--rates", "4",
             "--slo-ttft", "60", "--slo-tpot", "60", "--label", "ray", "--out-dir",
             str(out_dir), "--quiet"],
            capture_output=True, text=True, timeout=300)
    finally:
        cluster.shutdown()
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| ray-grpc | grpc | 4 | 6 | 6 | 0 | 0 |" in proc.stdout
    assert "| ray-http | http | 4 | 6 | 6 | 0 | 0 |" in proc.stdout
    assert "| ray-http | http |" in (out_dir / "ray.md").read_text()
    grpc_run, http_run = (RunResult.from_dict(json.loads(
        (out_dir / f"ray-{api}_runs" / "rate_4.json").read_text())) for api in ("grpc", "http"))
    for g, h in zip(grpc_run.records, http_run.records, strict=True):
        assert g.outcome == h.outcome == "ok"
        assert g.num_tokens == h.num_tokens == h.usage.completion_tokens == 4
        assert g.usage.prompt_tokens == h.usage.prompt_tokens == 30
        assert h.usage.cached_tokens == 16
