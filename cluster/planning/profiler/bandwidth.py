"""Measuring KV transfer bandwidth per backend, with the sender in another process.

``measure_transfer_bandwidth`` times KV transfers of a model's KV shape for each backend:
the receiver (decode side) lives in this process, the sender in a spawned process for
``shm``, ``tcp`` and ``cuda_ipc`` (in this process for ``inprocess``), so the copy
crosses a process boundary as it does between workers. It reports bytes/s medians per
transfer size; the largest size's median is the bandwidth a profile stores.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing as mp
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from pdserve.cluster.planning.profiler.timing import Progress
from pdserve.engine.kv_cache import KVCacheSpec


@dataclass(frozen=True)
class TransferBandwidth:
    """One backend: median seconds and bytes/s per transfer size; ``bytes_per_s`` is the
    median of the largest size (the stored bandwidth)."""

    backend: str
    bytes_per_s: float
    sizes: tuple[tuple[int, int, float, float], ...]  # (tokens, bytes, median s, bytes/s)
    samples: tuple[tuple[int, tuple[float, ...]], ...] = ()  # (tokens, seconds per rep)


def default_backends(device: torch.device | str) -> tuple[str, ...]:
    cuda = torch.device(device).type == "cuda"
    return ("inprocess", "shm", "tcp") + (("cuda_ipc",) if cuda else ())


def _payload(spec: KVCacheSpec, tokens: int, device: torch.device | str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(tokens)
    n_blocks = -(-tokens // spec.block_size)
    shape = (2, n_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
    return [torch.randn(shape, generator=g).to(spec.dtype).to(device)
            for _ in range(spec.num_layers)]


def _transfer_child(backend: str, conn, threads: int, device: str) -> None:
    """Spawned sender: one transfer per command, answers (t_begin, t_finished)."""
    from pdserve.kv_transfer.base import KVDestination
    from pdserve.kv_transfer.registry import create_sender

    torch.set_num_threads(threads)
    sender = create_sender(backend)
    payloads: dict[int, list[torch.Tensor]] = {}
    try:
        while (cmd := conn.recv()) is not None:
            endpoint, tid, dst_ids, tokens = cmd
            try:
                spec = endpoint.spec.to_spec()
                layers = payloads.get(tokens) or payloads.setdefault(
                    tokens, _payload(spec, tokens, device))
                dest = KVDestination(tid, endpoint, tuple(dst_ids), tokens)
                t0 = time.perf_counter()
                t = sender.begin(dest, spec)
                for layer, kv in enumerate(layers):
                    sender.send_layer(t, layer, kv)
                sender.finish(t, timeout=120)
                conn.send((t0, time.perf_counter()))
            except Exception as exc:  # reported to the parent, which raises
                conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        sender.close()


class _SenderProcess:
    def __init__(self, backend: str, threads: int, device: str):
        ctx = mp.get_context("spawn")
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=_transfer_child, args=(backend, child_conn, threads,
                                                              device), daemon=True)
        self.proc.start()
        child_conn.close()

    def send(self, endpoint, tid: str, dst_ids: list[int], tokens: int) -> None:
        self.conn.send((endpoint, tid, dst_ids, tokens))

    def result(self, timeout: float = 300.0) -> tuple[float, float]:
        if not self.conn.poll(timeout):
            raise RuntimeError("the KV sender process did not answer")
        answer = self.conn.recv()
        if answer[0] == "error":
            raise RuntimeError(f"KV sender process: {answer[1]}")
        return answer

    def answered(self) -> bool:
        return self.conn.poll(0)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)


def _wait_delivered(receiver, tid: str, child: _SenderProcess, timeout: float = 300.0):
    """Block until the receiver sees ``tid`` finish; stop early if the sender gave up."""
    deadline = time.perf_counter() + timeout
    while True:
        state = receiver.wait(tid, 0.5)
        if state.terminal or time.perf_counter() > deadline:
            return state
        if child.answered() or not child.proc.is_alive():
            return receiver.wait(tid, 0.5)


class _BandwidthBench:
    """The receivers of every backend in this process and their senders (a spawned process
    each, ``inprocess``: this one). ``start`` creates them, ``close`` (or leaving the
    ``with``) stops whatever was started."""

    def __init__(self, rspec: KVCacheSpec):
        self.rspec = rspec
        self.receivers: dict = {}
        self.children: dict[str, _SenderProcess] = {}
        self.local_sender = None
        self.payloads: dict[int, list[torch.Tensor]] = {}
        self._ids = itertools.count()

    def start(self, backends: Sequence[str], sizes: Sequence[int], threads: int,
              device: torch.device) -> None:
        from pdserve.kv_transfer.registry import create_receiver, create_sender

        if "inprocess" in backends:
            self.payloads = {n: _payload(self.rspec, n, "cpu") for n in sizes}
        for b in backends:
            rdev = device if b == "cuda_ipc" else "cpu"
            self.receivers[b] = create_receiver(b, self.rspec, f"profile-{b}", rdev)[0]
            if b == "inprocess":
                self.local_sender = create_sender(b)
            else:
                self.children[b] = _SenderProcess(b, threads, str(rdev))

    def time_transfer(self, backend: str, tokens: int, dst: list[int]) -> float:
        """Seconds from the sender's ``begin`` to delivery of one ``tokens``-token transfer
        into blocks ``dst``."""
        receiver = self.receivers[backend]
        tid = f"profile-{backend}-{tokens}-{next(self._ids)}"
        receiver.expect(tid, dst)
        if backend == "inprocess":
            seconds = self._time_local(receiver, tid, dst, tokens)
        else:
            seconds = self._time_child(self.children[backend], backend, receiver, tid, dst,
                                       tokens)
        receiver.forget(tid)
        return seconds

    def _time_local(self, receiver, tid: str, dst: list[int], tokens: int) -> float:
        from pdserve.kv_transfer.base import KVDestination

        dest = KVDestination(tid, receiver.endpoint, tuple(dst), tokens)
        t0 = time.perf_counter()
        t = self.local_sender.begin(dest, self.rspec)
        for layer, kv in enumerate(self.payloads[tokens]):
            self.local_sender.send_layer(t, layer, kv)
        self.local_sender.finish(t)
        return time.perf_counter() - t0

    @staticmethod
    def _time_child(child: _SenderProcess, backend: str, receiver, tid: str, dst: list[int],
                    tokens: int) -> float:
        from pdserve.kv_transfer.base import TransferState

        child.send(receiver.endpoint, tid, dst, tokens)
        if backend != "tcp":
            # Direct-write backends: delivered when the sender's ``finish`` returns.
            t0, t1 = child.result()
            return t1 - t0
        # TCP: delivered when the receiver sees the transfer DONE.
        state = _wait_delivered(receiver, tid, child)
        done = time.perf_counter()
        t0, _ = child.result()
        if state is not TransferState.DONE:
            raise RuntimeError(f"tcp transfer {tid} ended {state}")
        return done - t0

    def close(self) -> None:
        for child in self.children.values():
            child.close()
        if self.local_sender is not None:
            self.local_sender.close()
        for receiver in self.receivers.values():
            receiver.close()

    def __enter__(self) -> _BandwidthBench:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def measure_transfer_bandwidth(spec: KVCacheSpec, backends: Sequence[str], *,
                               tokens: Sequence[int] = (512, 2048), reps: int = 7,
                               threads: int = 1, seed: int = 0,
                               device: torch.device | str = "cpu",
                               progress: Progress | None = None) -> dict[str, TransferBandwidth]:
    """Median bytes/s of moving ``tokens``-token KV transfers of ``spec``'s shape.

    The receiver (decode side) lives in this process with a cache of twice the largest
    transfer; destination blocks are a fresh random sample per repetition. Senders run
    in a spawned process (``inprocess``: in this process). Timed from the sender's
    ``begin`` to delivery: ``finish`` returning for direct-write backends, the receiver
    seeing DONE for ``tcp``. One discarded warm-up repetition, then ``reps``
    interleaved ones (backends in a rotating order).
    """
    from pdserve.kv_transfer.registry import backend_classes

    backends = tuple(backends)
    for b in backends:
        backend_classes(b)  # unknown names fail here, before anything starts
    if not backends:
        return {}
    sizes = tuple(sorted(set(tokens)))
    rspec = replace(spec, num_blocks=2 * -(-max(sizes) // spec.block_size))
    samples: dict[tuple[str, int], list[float]] = {(b, n): [] for b in backends for n in sizes}
    rng = random.Random(seed)
    with _BandwidthBench(rspec) as bench:
        bench.start(backends, sizes, threads, torch.device(device))
        for rep in range(-1, reps):
            order = backends[rep % len(backends):] + backends[:rep % len(backends)]
            for n in sizes:
                dst = rng.sample(range(rspec.num_blocks), -(-n // rspec.block_size))
                for b in order:
                    seconds = bench.time_transfer(b, n, dst)
                    if rep >= 0:
                        samples[(b, n)].append(seconds)
            if progress is not None and rep >= 0:
                progress(f"transfer rep {rep + 1}/{reps} done")
    return _summarise(rspec, backends, sizes, samples)


def _summarise(rspec: KVCacheSpec, backends: Sequence[str], sizes: Sequence[int],
               samples: dict[tuple[str, int], list[float]]) -> dict[str, TransferBandwidth]:
    out = {}
    for b in backends:
        rows = []
        for n in sizes:
            nbytes = rspec.tokens_to_bytes(-(-n // rspec.block_size) * rspec.block_size)
            med = statistics.median(samples[(b, n)])
            rows.append((n, nbytes, med, nbytes / med))
        out[b] = TransferBandwidth(b, rows[-1][3], tuple(rows),
                                   tuple((n, tuple(samples[(b, n)])) for n in sizes))
    return out
