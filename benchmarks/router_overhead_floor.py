"""The floor under router_overhead: what the transports alone cost on this host.

The router's path to the first token crosses gRPC twice (client -> router, router ->
client) and, on Ray, one actor call to the prefill worker (out and back). This measures
each with no pdserve code in between, in one run:

* ``grpc``: a ``grpc.aio`` server (in a thread of this process, as the in-process cluster
  runs the router) whose ``Generate`` yields one message stamped with when it was called,
  and the project's synchronous client (``cluster/cli/client.py``), a 128-token request:
  the way in and the way out, on the same CLOCK_MONOTONIC.
* ``ray``: one async actor awaiting another's trivial async method, with a
  ``PrefillRequest``-sized argument: the call's way out (until the callee runs) and back.
* ``unix socket``: the same two actor processes, a 64-byte request and reply over a Unix
  domain socket with asyncio streams: what a direct channel between router and worker
  would cost instead of a Ray call.

    flock /tmp/pdserve-ray.lock python benchmarks/router_overhead_floor.py --calls 300
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

import grpc
import ray

from pdserve.cluster.cli.client import Client, build_request
from pdserve.engine.sampling_params import SamplingParams
from pdserve.prefill_worker.messages import PrefillRequest
from pdserve.protos import pdserve_pb2


def p50_p90(xs: list[float]) -> dict[str, float]:
    xs = sorted(x * 1e3 for x in xs)
    return {"p50": round(statistics.median(xs), 4),
            "p90": round(xs[min(len(xs) - 1, int(0.9 * (len(xs) - 1)))], 4), "n": len(xs)}


def grpc_floor(calls: int) -> dict:
    async def generate(request, context):
        yield pdserve_pb2.GenerateResponse(usage=pdserve_pb2.Usage(e2e_ms=time.monotonic()))

    async def serve(box: list, ready: threading.Event):
        server = grpc.aio.server()
        handlers = {"Generate": grpc.unary_stream_rpc_method_handler(
            generate, request_deserializer=pdserve_pb2.GenerateRequest.FromString,
            response_serializer=pdserve_pb2.GenerateResponse.SerializeToString)}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "pdserve.v1.Generation", handlers),))
        box.append(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        ready.set()
        await server.wait_for_termination()

    box: list = []
    ready = threading.Event()
    threading.Thread(target=lambda: asyncio.run(serve(box, ready)), daemon=True).start()
    ready.wait(10)
    rng = random.Random(0)
    ins, outs = [], []
    with Client(f"127.0.0.1:{box[0]}", timeout_s=10) as client:
        for i in range(calls + 20):
            req = build_request([rng.randrange(3, 900) for _ in range(128)], max_tokens=2)
            sent = time.monotonic()
            for msg in client.stream(req):
                got = time.monotonic()
                if i >= 20:
                    ins.append(msg.usage.e2e_ms - sent)
                    outs.append(got - msg.usage.e2e_ms)
    return {"way_in": p50_p90(ins), "way_out": p50_p90(outs),
            "both": p50_p90([a + b for a, b in zip(ins, outs, strict=True)])}


@ray.remote(max_concurrency=1000)
class Callee:
    async def call(self, msg) -> float:
        return time.monotonic()

    async def listen(self, path: str) -> None:
        async def echo(reader, writer):
            while True:
                data = await reader.readexactly(64)
                writer.write(data)

        self.server = await asyncio.start_unix_server(echo, path)


@ray.remote(max_concurrency=1000)
class Caller:
    async def ray_calls(self, callee, msg, calls: int) -> tuple[list, list]:
        out, back = [], []
        for i in range(calls + 20):
            t0 = time.monotonic()
            t1 = await callee.call.remote(msg)
            t2 = time.monotonic()
            if i >= 20:
                out.append(t1 - t0)
                back.append(t2 - t1)
        return out, back

    async def socket_calls(self, path: str, calls: int) -> list:
        reader, writer = await asyncio.open_unix_connection(path)
        rts = []
        for i in range(calls + 20):
            t0 = time.monotonic()
            writer.write(b"x" * 64)
            await reader.readexactly(64)
            if i >= 20:
                rts.append(time.monotonic() - t0)
        writer.close()
        return rts


def ray_floor(calls: int) -> dict:
    ray.init(num_cpus=4, include_dashboard=False)
    try:
        callee, caller = Callee.remote(), Caller.remote()
        msg = PrefillRequest("bench", tuple(range(3, 131)), SamplingParams(max_tokens=2), None)
        out, back = ray.get(caller.ray_calls.remote(callee, msg, calls))
        with tempfile.TemporaryDirectory(prefix="pdserve-floor-") as tmp:
            path = os.path.join(tmp, "echo.sock")
            ray.get(callee.listen.remote(path))
            rts = ray.get(caller.socket_calls.remote(path, calls))
    finally:
        ray.shutdown()
    return {"ray_call": {"way_out": p50_p90(out), "way_back": p50_p90(back),
                         "both": p50_p90([a + b for a, b in zip(out, back, strict=True)])},
            "unix_socket_round_trip": p50_p90(rts)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    result = {"benchmark": "router_overhead_floor", "calls": args.calls,
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpus": os.cpu_count(),
              "grpc": grpc_floor(args.calls), **ray_floor(args.calls)}
    g, r, u = result["grpc"], result["ray_call"], result["unix_socket_round_trip"]
    rows = [("gRPC way in (client -> handler)", g["way_in"]),
            ("gRPC way out (yield -> client)", g["way_out"]),
            ("gRPC in + out", g["both"]),
            ("Ray actor call, way out (caller -> callee runs)", r["way_out"]),
            ("Ray actor call, way back (callee returns -> caller)", r["way_back"]),
            ("Ray actor call, round trip", r["both"]),
            ("Unix socket round trip between the same two actors", u)]
    lines = [f"# What the transports cost alone ({args.calls} calls each, {os.cpu_count()} "
             "CPUs)", "", "| ms | p50 | p90 |", "|---|---|---|"]
    lines += [f"| {name} | {s['p50']:.3f} | {s['p90']:.3f} |" for name, s in rows]
    lines += ["", "Floor of router_overhead on Ray: gRPC in + out + one Ray call's round trip "
              "(the prefill call; the decode reservation overlaps it)."]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "router_overhead_floor.json").write_text(json.dumps(result, indent=1))
    (out / "router_overhead_floor.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
