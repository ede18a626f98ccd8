"""Hundreds of calls that cancel or time out, at every moment a request can be in.

Without waiting for any reservation lease (it is set to an hour here), every KV block and
reservation on every worker must be free once the storm is over, and the router's
``pdserve_requests_total`` must count each call under the code its client saw.

The moments that are hard to hit by chance are made certain by holding the workers: a
decode worker held inside ``reserve`` (its blocks already taken) has a reservation call in
flight that can no longer be called off, as a Ray actor call never can, while the router
gives up on it; the calls queued behind it wait for their reservation; with the prefill
workers held, every call is queued for prefill. The rest are cancelled mid-stream after a
random number of tokens, or run into random deadlines.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from pdserve.cluster.cli.client import build_request
from pdserve.cluster.launch.local import LocalCluster
from pdserve.protos import pdserve_pb2_grpc
from tests.cluster_helpers import engine_config, local_idle, wait_until

LONG = 3000  # max_tokens: no call can finish on its own before it is cancelled


def request(rng: random.Random):
    req = build_request([rng.randrange(3, 900) for _ in range(rng.randrange(8, 160))],
                        max_tokens=LONG)
    req.stop.ignore_eos = True
    return req


def outcome(call, got: int = 0) -> tuple[str, bool]:
    """The call's final code, and whether the server surely ran its handler (it is in
    flight at the router, or it streamed a message): a call whose deadline passes before
    the server's accept loop takes it never reaches the handler, and only the handler
    can count it."""
    try:
        for _ in call:
            got += 1
    except grpc.RpcError as exc:
        return exc.code().name, got > 0
    return "OK", True


def router_counts(c: LocalCluster) -> Counter:
    m = c.server.metrics
    return Counter({code: v for code in ("OK", "CANCELLED", "DEADLINE_EXCEEDED")
                    if (v := m.registry.get_sample_value(
                        "pdserve_requests_total", {"model": m.model, "code": code}))})


def _then_wait(method, gate: threading.Event):
    def stuck(*args):
        result = method(*args)
        gate.wait(30)
        return result

    return stuck


@contextlib.contextmanager
def held(hosts, inside: str | None = None):
    """Block every host's step loop until the block exits: at once (commands and steps
    queue up), or ``inside`` the worker method of that name, after it has run."""
    gate = threading.Event()
    for h in hosts:
        if inside is None:
            h._loop.post(lambda: gate.wait(30))
        else:
            setattr(h.worker, inside, _then_wait(getattr(h.worker, inside), gate))
    try:
        yield
    finally:
        gate.set()
        for h in hosts:
            if inside is not None:
                delattr(h.worker, inside)  # the class's method again


@pytest.fixture(scope="module")
def cluster(demo_model_dir):
    cfg = engine_config(demo_model_dir, num_kv_blocks=2048, max_num_seqs=64)
    with LocalCluster(cfg, num_prefill=2, num_decode=2) as c:
        for h in c.decodes:
            h.worker.lease_s = 3600.0  # nothing below may rely on a lease expiring
        yield c


def held_calls(cluster, stub, rng, hosts, n: int, inside: str | None = None) -> Counter:
    """``n`` calls stuck behind held ``hosts``; half are cancelled all at once, the other
    half run into their deadline, all while the hosts are held."""
    deadline_s = 4.0  # long enough for all n to arrive on a busy 2-core host
    with held(hosts, inside):
        start = time.monotonic()
        calls = [stub.Generate(request(rng), timeout=deadline_s if i % 2 else 60)
                 for i in range(n)]
        assert wait_until(lambda: cluster.server.orchestrator.in_flight() == n, deadline_s - 0.5)
        for call in calls[::2]:
            call.cancel()
        # the others' deadlines pass while the workers are still held
        time.sleep(max(0.0, start + deadline_s + 0.3 - time.monotonic()))
    return Counter((outcome(call)[0], True) for call in calls)  # all were in flight


def random_call(stub, seed: int) -> tuple[str, bool]:
    rng = random.Random(seed)
    kind = rng.choice(("mid_stream", "deadline", "deadline_short"))
    if kind == "mid_stream":
        call = stub.Generate(request(rng), timeout=60)
        want = rng.randrange(1, 12)
        for i, _ in enumerate(call, 1):
            if i == want:
                call.cancel()
                break
        return outcome(call, want)
    timeout = rng.uniform(0.6, 1.5) if kind == "deadline" else rng.uniform(0.3, 0.6)
    return outcome(stub.Generate(request(rng), timeout=timeout))


def test_cancel_and_deadline_storm_frees_everything_and_counts_every_code(cluster):
    rng = random.Random(2026)
    before = router_counts(cluster)
    seen: Counter = Counter()
    with grpc.insecure_channel(cluster.address) as channel:
        stub = pdserve_pb2_grpc.GenerationStub(channel)
        for _ in range(2):
            seen += held_calls(cluster, stub, rng, cluster.decodes, 24, inside="reserve")
            seen += held_calls(cluster, stub, rng, cluster.prefills, 24)  # queued for prefill
        with ThreadPoolExecutor(16) as pool:
            seen += Counter(pool.map(lambda s: random_call(stub, s), range(240)))
    codes, reached = Counter(), Counter()
    for (code, ok), n in seen.items():
        codes[code] += n
        reached[code] += n if ok else 0
    assert sum(codes.values()) == 2 * 48 + 240
    assert set(codes) <= {"CANCELLED", "DEADLINE_EXCEEDED"}, codes
    assert codes["CANCELLED"] >= 48 and reached["DEADLINE_EXCEEDED"] >= 48, seen
    # Everything is released by the router itself, long before any lease.
    assert wait_until(lambda: local_idle(cluster), 20), (cluster.decode_stats(),
                                                          cluster.prefill_stats())
    assert all(s.num_used_blocks == 0 for s in cluster.decode_stats())
    assert all(s.kv_usage == 0 for s in cluster.prefill_stats())
    # Every call the router's handler ran is counted under the code its client saw; only
    # deadline calls that never got past the server's accept queue may be missing.
    def counted():
        got = router_counts(cluster) - before
        return (got["CANCELLED"] == codes["CANCELLED"] and set(got) <= set(codes)
                and reached["DEADLINE_EXCEEDED"] <= got["DEADLINE_EXCEEDED"]
                <= codes["DEADLINE_EXCEEDED"])

    assert wait_until(counted, 10), (router_counts(cluster) - before, seen)
