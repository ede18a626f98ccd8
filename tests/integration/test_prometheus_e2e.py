"""End to end: a real Prometheus scrapes a running cluster under load through the one
aggregated endpoint; every dashboard panel query and every recording rule returns data,
and the TTFT percentile Prometheus reports agrees with the client's own measurement.
"""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pdserve.cluster.cli.client import Client, build_request
from pdserve.cluster.launch.launcher import ClusterSpec, PoolSpec, launch
from pdserve.engine.config import EngineConfig
from pdserve.kv_transfer.backend_config import KVTransferConfig
from pdserve.router.config import RouterConfig
from pdserve.router.server import ServerConfig
from pdserve.router.slo import SloConfig

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("prometheus") is None,
                                 reason="needs the prometheus binary (Debian package)")]

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "rules"


def _generate_module():
    spec = importlib.util.spec_from_file_location(
        "pdserve_grafana_generate", ROOT / "deploy" / "grafana" / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def query(base: str, expr: str) -> list:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    body = json.loads(urllib.request.urlopen(url, timeout=10).read())
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


@pytest.fixture(scope="module")
def loaded_cluster(ray_cluster, demo_model_dir, tmp_path_factory):
    spec = ClusterSpec(
        engine=EngineConfig(model=str(demo_model_dir), device="cpu", num_kv_blocks=1024),
        prefill=PoolSpec(1), decode=PoolSpec(1), kv=KVTransferConfig(backend="shm"),
        router=RouterConfig(model=str(demo_model_dir), slo=SloConfig(ttft_s=0.05, tpot_s=0.05),
                            server=ServerConfig(port=0, metrics_port=0, metrics_refresh_s=0.5)),
        torch_threads=1)
    cluster = launch(spec)
    tmp = tmp_path_factory.mktemp("prom")
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(p) for p in sorted(RULES.glob("*.yml"))],
        "scrape_configs": [{"job_name": "pdserve",
                            "static_configs": [{"targets": [cluster.metrics_address]}]}],
    }
    (tmp / "prometheus.yml").write_text(json.dumps(config))  # JSON is valid YAML
    prom = subprocess.Popen(
        ["prometheus", f"--config.file={tmp / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{base}/-/ready", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        ttfts = run_load(cluster.address, seconds=40)
        time.sleep(6)  # last scrapes and rule evaluations
        yield base, ttfts
    finally:
        prom.terminate()
        prom.wait(10)
        cluster.shutdown()


def run_load(address: str, seconds: float) -> list[float]:
    """Four closed-loop clients with mixed prompts; returns client-side TTFTs (s)."""
    deadline = time.monotonic() + seconds

    def client(seed: int) -> list[float]:
        rng = random.Random(seed)
        out = []
        with Client(address, timeout_s=60) as c:
            while time.monotonic() < deadline:
                prompt = [rng.randrange(3, 900) for _ in range(rng.randrange(20, 300))]
                t0 = time.perf_counter()
                first = None
                for msg in c.stream(build_request(prompt, max_tokens=rng.randrange(4, 24))):
                    if first is None and msg.token_ids:
                        first = time.perf_counter() - t0
                out.append(first)
                time.sleep(rng.uniform(0, 0.05))
        return out

    with ThreadPoolExecutor(4) as pool:
        return [t for ts in pool.map(client, range(4)) for t in ts]


def test_every_dashboard_query_and_recording_rule_returns_series(loaded_cluster):
    base, _ = loaded_cluster
    gen = _generate_module()
    queries = gen.all_queries()
    rules = sorted(gen.recording_rule_names())
    assert len(rules) > 20
    # The long-window rules (1d, 30d) are evaluated once a minute: wait for a pass that
    # comes after the load rather than racing it.
    deadline = time.monotonic() + 90
    while True:
        empty = [(uid, title, expr) for uid, title, expr in queries if not query(base, expr)]
        missing = [r for r in rules if not query(base, r)]
        if not (empty or missing) or time.monotonic() > deadline:
            break
        time.sleep(5)
    print(f"{len(queries)} panel queries, {len(empty)} empty")
    assert not empty, f"{len(empty)} panel queries returned nothing: {empty[:5]}"
    print(f"{len(rules)} recording rules, {len(missing)} without series")
    assert not missing, f"recording rules without series: {missing}"


def test_prometheus_ttft_percentiles_match_the_client(loaded_cluster):
    base, ttfts = loaded_cluster
    ttfts = sorted(ttfts)
    assert len(ttfts) > 50
    for q, rule in ((0.5, "pdserve:time_to_first_token_seconds:p50_5m"),
                    (0.9, "pdserve:time_to_first_token_seconds:p90_5m")):
        client = ttfts[int(q * (len(ttfts) - 1))]
        (series,) = [s for s in query(base, rule)
                     if s["metric"].get("slo_class", "default") == "default"]
        prom = float(series["value"][1])
        print(f"TTFT p{int(q * 100)}: prometheus {prom * 1e3:.1f} ms, client {client * 1e3:.1f} ms "
              f"({(prom - client) / client:+.1%}, {len(ttfts)} requests)")
        assert abs(prom - client) / client <= 0.20, (q, prom, client)
