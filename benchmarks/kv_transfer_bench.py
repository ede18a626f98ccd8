"""One timed KV transfer per case, for benchmarks/kv_transfer.py: the KV shape
(Llama-3.2-1B's), the cases, the sender child process, and ``Bench``, which owns the
receivers (this process) and the senders (in-process, or a spawned child per backend).

Lifecycle: ``Bench(sizes, threads)`` creates every receiver and starts the children;
``run(case, tokens, dst_ids)`` moves one request's KV into ``dst_ids`` and returns the
seconds it took (what is timed per case: see ``CASE_TIMING``), after checking every block
landed and zeroing them again outside the timing; ``close()`` stops the children and
closes the receivers. A failed or wrong transfer raises ``RuntimeError``.
"""

from __future__ import annotations

import multiprocessing as mp
import time

import torch

from pdserve.engine.kv_cache import KVCacheSpec
from pdserve.kv_transfer.base import KVDestination, KVEndpoint, TransferState
from pdserve.kv_transfer.checksum import checksum_blocks
from pdserve.kv_transfer.registry import create_receiver, create_sender

LAYERS, KV_HEADS, HEAD_DIM, BLOCK, DTYPE = 16, 8, 64, 16, torch.bfloat16  # Llama-3.2-1B
CASES = ("memcpy", "index_copy_", "inprocess", "shm", "shm+sample", "shm+full", "tcp",
         "tcp+full", "verify:sample", "verify:full")
CHILD_BACKENDS = ("shm", "tcp")
CHECKSUM_BACKENDS = ("shm", "tcp")  # each has "<backend>+full" (and maybe "+sample") cases
# What each case times (recorded in the JSON).
CASE_TIMING = {
    "memcpy": "dst.copy_(src), same bytes, this process",
    "index_copy_": "per-layer cache[layer].index_copy_(1, idx, kv), this process",
    "inprocess": "begin..finish of the inprocess backend, this process",
    "shm": "child sender's begin..finish (synchronous copies into the shared segment)",
    "tcp": "child sender's begin .. receiver.wait()==DONE in this process",
    "shm+sample": "as shm, sender checksum in sample mode",
    "shm+full": "as shm, sender checksum in full mode",
    "tcp+full": "as tcp, sender checksum in full mode",
    "verify:sample": "checksum_blocks(cache, dst blocks, 'sample'), this process",
    "verify:full": "checksum_blocks(cache, dst blocks, 'full'), this process",
}


def spec_for(num_blocks: int) -> KVCacheSpec:
    return KVCacheSpec(LAYERS, num_blocks, BLOCK, KV_HEADS, HEAD_DIM, DTYPE)


def make_layers(tokens: int) -> list[torch.Tensor]:
    """One prefill's K/V per layer, [2, n_blocks, P, H, D]; same values in every process."""
    g = torch.Generator().manual_seed(tokens)
    shape = (2, tokens // BLOCK, BLOCK, KV_HEADS, HEAD_DIM)
    return [torch.randn(shape, generator=g).to(DTYPE) for _ in range(LAYERS)]


# -- the sender child ---------------------------------------------------------------------

def sender_child(backend: str, conn, threads: int) -> None:
    """Spawned: sends a transfer per command, answers (t_begin, t_finished)."""
    torch.set_num_threads(threads)
    sender = create_sender(backend)
    layers: dict[int, list[torch.Tensor]] = {}
    try:
        while (cmd := conn.recv()) is not None:
            endpoint, tid, dst_ids, tokens, checksum = cmd
            kv = layers.get(tokens) or layers.setdefault(tokens, make_layers(tokens))
            dest = KVDestination(tid, endpoint, tuple(dst_ids), tokens)
            t0 = time.perf_counter()
            t = sender.begin(dest, endpoint.spec.to_spec(), checksum)
            for layer, x in enumerate(kv):
                sender.send_layer(t, layer, x)
            sender.finish(t, timeout=120)
            conn.send((t0, time.perf_counter()))
    finally:
        sender.close()


class Child:
    def __init__(self, backend: str, threads: int):
        ctx = mp.get_context("spawn")
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=sender_child, args=(backend, child_conn, threads),
                                daemon=True)
        self.proc.start()

    def send(self, endpoint: KVEndpoint, tid: str, dst_ids: list[int], tokens: int,
             checksum: str) -> None:
        self.conn.send((endpoint, tid, dst_ids, tokens, checksum))

    def result(self, timeout: float = 300) -> tuple[float, float]:
        if not self.conn.poll(timeout):
            raise RuntimeError("sender child did not answer")
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(30)


# -- one measurement -----------------------------------------------------------------------

class Bench:
    def __init__(self, sizes: tuple[int, ...], threads: int):
        self.sizes = sizes
        self.num_blocks = 2 * max(sizes) // BLOCK
        spec = spec_for(self.num_blocks)
        self.layers = {n: make_layers(n) for n in sizes}
        self.flat = {n: (torch.randn(n * spec.tokens_to_bytes(1) // 2).to(DTYPE),
                         torch.empty(n * spec.tokens_to_bytes(1) // 2, dtype=DTYPE))
                     for n in sizes}
        self.local = torch.zeros(spec.shape, dtype=DTYPE)  # index_copy_ baseline target
        self.receivers = {b: create_receiver(b, spec, f"bench-{b}") for b in
                          ("inprocess", *CHILD_BACKENDS)}
        self.inprocess_sender = create_sender("inprocess")
        self.children = {b: Child(b, threads) for b in CHILD_BACKENDS}
        self._ids = 0

    def close(self) -> None:
        for child in self.children.values():
            child.close()
        self.inprocess_sender.close()
        for receiver, _ in self.receivers.values():
            receiver.close()

    def run(self, case: str, tokens: int, dst_ids: list[int]) -> float:
        layers = self.layers[tokens]
        if case == "memcpy":
            src, dst = self.flat[tokens]
            t0 = time.perf_counter()
            dst.copy_(src)
            return time.perf_counter() - t0
        if case == "index_copy_":
            idx = torch.tensor(dst_ids)
            t0 = time.perf_counter()
            for layer, kv in enumerate(layers):
                self.local[layer].index_copy_(1, idx, kv)
            return time.perf_counter() - t0
        if case.startswith("verify:"):
            _, cache = self.receivers["shm"]
            t0 = time.perf_counter()
            checksum_blocks(cache.data, dst_ids, case.split(":")[1])
            return time.perf_counter() - t0
        backend, _, checksum = case.partition("+")
        receiver, cache = self.receivers[backend]
        self._ids += 1
        tid = f"{case}-{tokens}-{self._ids}"
        receiver.expect(tid, dst_ids)
        if backend == "inprocess":
            dest = KVDestination(tid, receiver.endpoint, tuple(dst_ids), tokens)
            t0 = time.perf_counter()
            t = self.inprocess_sender.begin(dest, cache.spec)
            for layer, kv in enumerate(layers):
                self.inprocess_sender.send_layer(t, layer, kv)
            self.inprocess_sender.finish(t)
            seconds = time.perf_counter() - t0
            receiver.mark_delivered(tid)
        else:
            child = self.children[backend]
            child.send(receiver.endpoint, tid, dst_ids, tokens, checksum or "off")
            if backend == "tcp":
                state = receiver.wait(tid, 300)
                t_done = time.perf_counter()
                t0, _ = child.result()
            else:
                t0, t_done = child.result()
                receiver.mark_delivered(tid)
                state = receiver.state(tid)
            if state is not TransferState.DONE:
                raise RuntimeError(f"{tid} ended {state}")
            seconds = t_done - t0
        self._check(cache.data, dst_ids, layers, tid)
        # Back to zeros, so no later check can pass on stale data. Done here rather than
        # just before the next transfer, which would find those lines hot in this core's
        # cache (an advantage the in-process case would get and the others would not).
        cache.data[:, :, dst_ids] = 0
        receiver.forget(tid)
        return seconds

    @staticmethod
    def _check(data: torch.Tensor, dst_ids: list[int], layers, tid: str) -> None:
        idx = torch.tensor(dst_ids)
        for layer, kv in enumerate(layers):
            if not torch.equal(data[layer].index_select(1, idx), kv):
                raise RuntimeError(f"{tid}: layer {layer} landed wrong")

