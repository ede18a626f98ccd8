"""router_overhead's client-side hop split and its report (no cluster)."""

from __future__ import annotations

import pytest

from pdserve.benchmarks.router_overhead_probe import Sample, ServerFigures
from pdserve.benchmarks.router_overhead_report import (
    from_columns,
    markdown,
    markdown_ab,
    rows,
    summarize,
    to_columns,
)


def sample(sent=10.0, first=10.020, received=10.001, hops=(("validate", 1.0),
                                                              ("prefill_compute", 15.0),
                                                              ("to_stream", 2.0))):
    return Sample(sent, first, ServerFigures(17.5, 15.0, 0.1, 0.2, received, hops))


def test_client_hops_wrap_the_servers_on_one_clock():
    s = sample()
    hops = dict(s.hops_ms())
    assert list(hops) == ["client_to_router", "validate", "prefill_compute", "to_stream",
                          "router_to_client"]
    assert hops["client_to_router"] == pytest.approx(1.0)
    assert hops["router_to_client"] == pytest.approx(1.0)
    assert sum(hops.values()) == pytest.approx(s.client_ttft_ms)
    assert s.overhead_ms == pytest.approx(5.0)
    assert s.router_added_ms == pytest.approx(2.5)  # router TTFT 17.5 - compute 15.0


def test_a_router_clock_from_elsewhere_keeps_only_the_servers_hops():
    assert [h for h, _ in sample(received=5000.0).hops_ms()] == [
        "validate", "prefill_compute", "to_stream"]
    assert sample(hops=()).hops_ms() == ()  # an older server reports none


def test_summary_and_tables():
    table = rows([sample(), sample(first=10.030), sample(hops=())])
    summary = summarize(table)
    assert summary["summary_ms"]["client_ttft_ms"]["p50"] == pytest.approx(20.0)
    assert summary["hops_ms"]["validate"]["n"] == 2
    assert summary["hops_ms"]["(all but prefill_compute)"]["p50"] == pytest.approx(5.0)
    text = "\n".join(markdown("t", summary))
    assert "| router_to_client |" in text and "| overhead_ms |" in text
    assert "| router_added_ms |" in text
    ab = "\n".join(markdown_ab("t", {"old": summarize(rows([sample(hops=())])),
                                     "new": summary}))
    assert "| validate | - | - | 1.00 | 1.00 |" in ab


def test_rows_survive_the_compact_json_form():
    table = rows([sample(), sample(hops=()),
                  Sample(10.0, 10.02, ServerFigures(17.5, 15.0, 0.1, 0.2, 10.001,
                                                    (("validate", 1.0),), (("reserve_call", 2.5),)))])
    back = from_columns(to_columns(table))  # (rounded to the microsecond)
    for part in ("summary_ms", "hops_ms"):
        got, want = summarize(back)[part], summarize(table)[part]
        assert got.keys() == want.keys()
        assert all(got[k]["p50"] == pytest.approx(want[k]["p50"], abs=1e-3) for k in want)
    assert back[2]["concurrent_ms"] == {"reserve_call": 2.5} and back[1]["hops_ms"] == {}


def test_both_front_doors_report_the_same_hops(demo_model_dir):
    """The gRPC and HTTP probes against one in-process cluster: each sees its first token,
    the prefill worker's compute, and the router's hops wrapped by the client's own."""
    from pdserve.benchmarks.router_overhead_probe import GrpcProbe, HttpProbe
    from pdserve.cluster.launch.local import LocalCluster
    from pdserve.engine.config import EngineConfig
    from pdserve.router.config import RouterConfig
    from pdserve.router.server import ServerConfig

    engine = EngineConfig(model=str(demo_model_dir), device="cpu", num_kv_blocks=256)
    router = RouterConfig(model=engine.model,
                          server=ServerConfig(port=0, metrics_port=0, http_port=0))
    with LocalCluster(engine, router=router) as c:
        probes = [GrpcProbe(c.address), HttpProbe(c.server.http_address)]
        try:
            samples = {p.name: p.send(list(range(5, 45)), max_tokens=2) for p in probes}
        finally:
            for p in probes:
                p.close()
    assert set(samples) == {"grpc", "http"}
    for s in samples.values():
        names = [name for name, _ in s.hops_ms()]
        assert names[0] == "client_to_router" and names[-1] == "router_to_client"
        assert "prefill_compute" in names and "validate" in names
        assert s.server.prefill_ms > 0 and s.client_ttft_ms > s.server.prefill_ms
        assert sum(ms for _, ms in s.hops_ms()) == pytest.approx(s.client_ttft_ms, abs=0.05)
