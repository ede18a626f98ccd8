"""Where a KV transfer's time goes, in the sender: ``cuda_ipc_bandwidth.py --profile``.

A spawned sender process (as a prefill worker is) ships ``tokens``-token transfers into
a receiver in this process, two ways: ``per_layer`` (``send_layer`` once per layer, the
overlapped prefill path) and ``stacked`` (one ``send_layers`` with every layer, a parked
prompt's path). For each it times, on the sender's host clock, ``begin`` (incarnation
check, opening the handle, the destination index), the sends (validation, queueing,
stream waits, launches) and ``finish`` (the wait for the copies, the second incarnation
check), medians over ``reps``; and reports the copy launches and stream waits the CUDA
IPC sender made. With CUDA, one more transfer per way runs under ``torch.profiler`` and
its busiest host ops and device kernels come back as text tables: the device time of
the copies against the host time around them is the fixed cost's breakdown.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time

import torch


def _payloads(spec, tokens: int, device: str) -> torch.Tensor:
    """[L, 2, n, P, H, D]: every layer of one transfer, stacked (``[i]`` is layer i's)."""
    g = torch.Generator().manual_seed(tokens)
    n = -(-tokens // spec.block_size)
    shape = (spec.num_layers, 2, n, spec.block_size, spec.num_kv_heads, spec.head_dim)
    return torch.randn(shape, generator=g).to(spec.dtype).to(device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _one(sender, dest, spec, stacked: torch.Tensor, mode: str, device: str) -> dict:
    _sync(device)
    t0 = time.perf_counter()
    t = sender.begin(dest, spec)
    t1 = time.perf_counter()
    if mode == "stacked":
        sender.send_layers(t, 0, stacked)
    else:
        for layer in range(stacked.shape[0]):
            sender.send_layer(t, layer, stacked[layer])
    t2 = time.perf_counter()
    sender.finish(t, timeout=120)
    t3 = time.perf_counter()
    ctx = t.context
    return {"begin_s": t1 - t0, "send_s": t2 - t1, "finish_s": t3 - t2, "total_s": t3 - t0,
            "copy_launches": getattr(ctx, "launches", None),
            "stream_waits": getattr(ctx, "waits", None)}


def _child(backend: str, conn, device: str) -> None:
    from pdserve.kv_transfer.base import KVDestination
    from pdserve.kv_transfer.registry import create_sender

    sender = create_sender(backend)
    payloads: dict[int, torch.Tensor] = {}  # built once per size (1 GiB at 8k tokens)
    try:
        while (cmd := conn.recv()) is not None:
            endpoint, tid, dst, tokens, mode, traced = cmd
            try:
                spec = endpoint.spec.to_spec()
                stacked = payloads.get(tokens)
                if stacked is None:
                    stacked = payloads[tokens] = _payloads(spec, tokens, device)
                dest = KVDestination(tid, endpoint, tuple(dst), tokens)
                if not traced:
                    conn.send(_one(sender, dest, spec, stacked, mode, device))
                    continue
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    row = _one(sender, dest, spec, stacked, mode, device)
                ka = prof.key_averages()
                row["host_ops"] = ka.table(sort_by="self_cpu_time_total", row_limit=12)
                row["device_kernels"] = ka.table(sort_by="self_device_time_total", row_limit=8)
                conn.send(row)
            except Exception as exc:  # reported to the parent, which raises
                conn.send({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        sender.close()


def profile_sender(spec, backend: str, tokens: list[int], reps: int, device: torch.device,
                   log=print) -> dict:
    """{"<tokens>": {"per_layer": {...}, "stacked": {...}}}: median phase times (s), the
    launch counts, and (CUDA) the profiler tables of one traced transfer per way."""
    import random
    from dataclasses import replace

    from pdserve.kv_transfer.registry import create_receiver

    rspec = replace(spec, num_blocks=2 * -(-max(tokens) // spec.block_size))
    rdev = str(device) if backend == "cuda_ipc" else "cpu"
    receiver = create_receiver(backend, rspec, "ipc-profile", rdev)[0]
    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(backend, child_conn, rdev), daemon=True)
    proc.start()
    child_conn.close()
    rng, ids, out = random.Random(0), iter(range(10**9)), {}
    traced = device.type == "cuda"

    def transfer(n: int, mode: str, trace: bool) -> dict:
        tid = f"ipc-profile-{next(ids)}"
        dst = rng.sample(range(rspec.num_blocks), -(-n // rspec.block_size))
        receiver.expect(tid, dst)
        conn.send((receiver.endpoint, tid, dst, n, mode, trace))
        if not conn.poll(300):
            raise RuntimeError("the profiling sender did not answer")
        row = conn.recv()
        receiver.forget(tid)
        if "error" in row:
            raise RuntimeError(f"profiling sender: {row['error']}")
        return row

    try:
        for n in tokens:
            out[str(n)] = {}
            for mode in ("per_layer", "stacked"):
                transfer(n, mode, False)  # warm-up
                rows = [transfer(n, mode, False) for _ in range(reps)]
                summary = {k: statistics.median(r[k] for r in rows)
                           for k in ("begin_s", "send_s", "finish_s", "total_s")}
                summary.update(copy_launches=rows[-1]["copy_launches"],
                               stream_waits=rows[-1]["stream_waits"])
                if traced:
                    summary["traced"] = transfer(n, mode, True)
                out[str(n)][mode] = summary
                log(f"profile {n} tokens, {mode}: begin {summary['begin_s'] * 1e3:.3f} ms, "
                    f"sends {summary['send_s'] * 1e3:.3f} ms, finish {summary['finish_s'] * 1e3:.3f}"
                    f" ms, total {summary['total_s'] * 1e3:.3f} ms; "
                    f"{summary['copy_launches']} copy launches, {summary['stream_waits']} waits")
    finally:
        conn.send(None)
        proc.join(30)
        if proc.is_alive():
            proc.terminate()
        receiver.close()
    return out
