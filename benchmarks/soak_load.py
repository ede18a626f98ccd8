"""The soak's traffic (benchmarks/soak.py): the steady trace it replays, and the failure
paths it sends on the side, cancelled and invalid requests.

``soak_trace`` is pure (tests/unit/test_soak_helpers.py). ``side_traffic`` runs an open
loop of Poisson arrivals for a fixed time and appends one dict per side request to the
caller's list (``kind``, ``status`` as a gRPC code name, ``end_unix``); an unexpected
client error is recorded there too, never raised.
"""

from __future__ import annotations

import math
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import grpc

from pdserve.cluster.cli.client import Client, build_request
from pdserve.cluster.cli.replay.config import FIRST_PROMPT_TOKEN_ID
from pdserve.workloads.trace import Trace

VOCAB = 900  # prompt ids are drawn from [3, VOCAB), as in the other demo-model benchmarks


def soak_trace(base: Trace, rate: float, duration_s: float) -> Trace:
    """The first ``rate * duration_s`` requests of ``base`` (looped, one mean gap between
    copies, when it is shorter), rescaled to a mean of ``rate`` req/s over ``duration_s``."""
    n = max(2, math.ceil(rate * duration_s))
    gap = base.duration_s / max(1, len(base) - 1)
    reqs, offset = [], 0.0
    while len(reqs) < n:
        reqs += [replace(r, arrival_s=r.arrival_s + offset) for r in base.requests[:n - len(reqs)]]
        offset = reqs[-1].arrival_s + gap
    if reqs[-1].arrival_s == 0:  # all at once (a one-request base): spread them evenly
        reqs = [replace(r, arrival_s=float(i)) for i, r in enumerate(reqs)]
    return Trace(f"{base.name}-soak", tuple(reqs)).at_rate(rate)


def cancelled_request(client: Client, i: int, prompt_len: int, rng: random.Random) -> dict:
    """Stream a long request and cancel it: half after a random 0-200 ms, half after 1-16
    tokens. Status CANCELLED is the expected outcome."""
    req = build_request([rng.randrange(FIRST_PROMPT_TOKEN_ID, VOCAB) for _ in range(prompt_len)],
                        max_tokens=256, request_id=f"soak-cancel-{i}")
    req.stop.ignore_eos = True
    after_tokens = rng.randint(1, 16) if rng.random() < 0.5 else None
    call = client.stream(req)
    timer = None
    if after_tokens is None:
        timer = threading.Timer(rng.uniform(0, 0.2), call.cancel)
        timer.start()
    tokens = 0
    try:
        for msg in call:
            tokens += len(msg.token_ids)
            if after_tokens is not None and tokens >= after_tokens:
                call.cancel()
                break
    except grpc.RpcError:
        pass
    if timer is not None:
        timer.cancel()
    return {"kind": "cancelled", "when": "after_tokens" if after_tokens else "after_delay",
            "status": call.code().name, "tokens": tokens, "end_unix": time.time()}


def invalid_request(client: Client, i: int) -> dict:
    """An empty prompt or an out-of-vocabulary token id: INVALID_ARGUMENT is expected."""
    what = ("empty_prompt", "bad_token_id")[i % 2]
    prompt = [] if what == "empty_prompt" else [5, 10**7]
    status = "OK"
    try:
        client.generate(build_request(prompt, max_tokens=8, request_id=f"soak-invalid-{i}"))
    except grpc.RpcError as exc:
        status = exc.code().name
    return {"kind": "invalid", "what": what, "status": status, "end_unix": time.time()}


def side_traffic(address: str, base: Trace, cancel_rate: float, invalid_rate: float,
                 duration_s: float, seed: int, out: list[dict]) -> None:
    """Open loop: Poisson arrivals of cancelled and invalid requests for ``duration_s``."""
    rate = cancel_rate + invalid_rate
    if rate <= 0:
        return
    rng = random.Random(seed)
    start = time.perf_counter()
    with Client(address, timeout_s=120) as client, ThreadPoolExecutor(16) as pool:
        futures, t, i = [], 0.0, 0
        while True:
            t += rng.expovariate(rate)
            if t >= duration_s:
                break
            time.sleep(max(0.0, t - (time.perf_counter() - start)))
            if rng.random() < cancel_rate / rate:
                plen = rng.choice(base.requests).prompt_len
                futures.append(pool.submit(cancelled_request, client, i, plen,
                                           random.Random(rng.random())))
            else:
                futures.append(pool.submit(invalid_request, client, i))
            i += 1
        for f in futures:
            try:
                out.append(f.result())
            except Exception as exc:  # noqa: BLE001 - recorded, not fatal
                out.append({"kind": "client_error", "status": repr(exc), "end_unix": time.time()})
