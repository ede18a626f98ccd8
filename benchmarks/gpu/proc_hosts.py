"""Workers in their own processes, router in this one, no Ray: ``LocalCluster`` across processes.

``cluster/launch/local.py`` runs the real workers and router in ONE process. Disaggregation on
one GPU needs the prefill and decode workers in separate processes (each its own CUDA
context, KV moving by CUDA IPC), and the GPU hosts have no Ray. So:

* ``RemoteHost`` spawns a child process (``multiprocessing`` "spawn") that builds the
  very same host the Ray actors wrap (``build_prefill_host`` / ``build_decode_host`` /
  ``build_colocated_host``) and serves its async methods over a ``Pipe``. In this process
  the ``RemoteHost`` has the host's async interface (``prefill``, ``reserve``,
  ``start``, ``stream``, ...), which is all the router's ``PrefillClient`` /
  ``DecodeClient`` need from an in-process target.
* ``ProcCluster`` starts the hosts (decode first: its receiver publishes the KV
  endpoint), wires them into ``build_router`` and serves gRPC on a local port, exactly
  as ``LocalCluster`` does with in-process hosts.

Protocol: parent -> child ``(call_id, method, args)`` or ``None`` (shut down); child ->
parent ``(call_id, "ok" | "err", value)``, ``(None, "stream", TokenBatch)`` for every
decode step of a decode/colocated host, ``(None, "ready" | "fatal", info)`` once at
start. Only the workers' own typed messages (frozen dataclasses) travel, pickled over a
pipe between processes this module started: nothing from the network is unpickled.
Exceptions that cannot be pickled arrive as ``RuntimeError`` with their text.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import multiprocessing as mp
import pickle
import threading
import traceback
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

KINDS = ("prefill", "decode", "colocated")


class WorkerGone(RuntimeError):
    """The worker process died or closed its pipe."""


def _picklable(exc: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _child_main(kind: str, worker_id: str, engine, kv, torch_threads: int | None, conn) -> None:
    send_lock = threading.Lock()

    def send(msg) -> None:
        with send_lock:
            conn.send(msg)

    try:
        if kind == "prefill":
            from pdserve.prefill_worker.build import build_prefill_host

            host = build_prefill_host(worker_id, engine, kv, torch_threads)
        elif kind == "decode":
            from pdserve.decode_worker.build import build_decode_host

            host = build_decode_host(worker_id, engine, kv, torch_threads)
        else:
            from pdserve.decode_worker.build import build_colocated_host

            host = build_colocated_host(worker_id, engine, torch_threads)
    except BaseException:
        send((None, "fatal", traceback.format_exc()))
        return

    async def serve(cid: int, method: str, args: tuple) -> None:
        try:
            result = getattr(host, method)(*args)
            if hasattr(result, "__await__"):
                result = await result
            send((cid, "ok", result))
        except BaseException as exc:  # delivered to the caller, which re-raises it
            send((cid, "err", _picklable(exc)))

    async def pump() -> None:
        async for batch in host.stream():
            send((None, "stream", batch))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        tasks = set()
        if kind != "prefill":
            tasks.add(loop.create_task(pump()))
            await asyncio.sleep(0)  # subscribe before anyone can submit work
        send((None, "ready", worker_id))
        while (msg := await loop.run_in_executor(None, conn.recv)) is not None:
            task = loop.create_task(serve(*msg))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        for t in tasks:
            t.cancel()

    try:
        asyncio.run(main())
    except (EOFError, OSError):
        pass  # the parent went away
    finally:
        host.close()


class RemoteHost:
    """A prefill, decode or colocated host in a child process, with the host's async API."""

    def __init__(self, kind: str, worker_id: str, engine, kv=None, torch_threads: int | None = None,
                 start_timeout_s: float = 900.0):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.kind, self.worker_id = kind, worker_id
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_child_main, name=f"pdserve-{worker_id}",
                                args=(kind, worker_id, engine, kv, torch_threads, child),
                                daemon=True)
        self.proc.start()
        child.close()
        if not self._conn.poll(start_timeout_s):
            self.proc.kill()
            raise WorkerGone(f"{worker_id} did not start within {start_timeout_s} s")
        _, status, info = self._conn.recv()
        if status != "ready":
            self.proc.join(10)
            raise WorkerGone(f"{worker_id} failed to start:\n{info}")
        self._ids = itertools.count()
        self._futures: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._subscribers: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = []
        self._send_lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name=f"{worker_id}-reader", daemon=True)
        self._reader.start()

    # -- plumbing ------------------------------------------------------------------------
    def _read(self) -> None:
        while True:
            try:
                cid, status, value = self._conn.recv()
            except (EOFError, OSError):
                break
            if status == "stream":
                for loop, q in list(self._subscribers):
                    loop.call_soon_threadsafe(q.put_nowait, value)
                continue
            waiter = self._futures.pop(cid, None)
            if waiter is not None:
                loop, fut = waiter
                loop.call_soon_threadsafe(_settle, fut, status, value)
        gone = WorkerGone(f"{self.worker_id} exited (code {self.proc.exitcode})")
        for loop, fut in list(self._futures.values()):
            loop.call_soon_threadsafe(_settle, fut, "err", gone)
        self._futures.clear()

    async def _call(self, method: str, *args) -> Any:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        cid = next(self._ids)
        self._futures[cid] = (loop, fut)
        try:
            with self._send_lock:
                self._conn.send((cid, method, args))
        except (OSError, ValueError) as exc:
            self._futures.pop(cid, None)
            raise WorkerGone(f"{self.worker_id}: {exc}") from exc
        return await fut

    # -- the host interface the router's clients call -----------------------------------------
    async def prefill(self, msg):
        return await self._call("prefill", msg)

    async def set_destination(self, destination) -> None:
        return await self._call("set_destination", destination)

    async def abort(self, request_id: str) -> bool:
        return await self._call("abort", request_id)

    async def reserve(self, msg):
        return await self._call("reserve", msg)

    async def start(self, msg) -> None:
        return await self._call("start", msg)

    async def submit(self, msg) -> int:
        return await self._call("submit", msg)

    async def release(self, request_id: str) -> bool:
        return await self._call("release", request_id)

    async def stats(self):
        return await self._call("stats")

    async def step_log(self, last: int | None = None) -> list:
        return await self._call("step_log", last)

    async def metrics_text(self) -> str:
        return await self._call("metrics_text")

    async def stream(self) -> AsyncIterator:
        entry = (asyncio.get_running_loop(), asyncio.Queue())
        self._subscribers.append(entry)
        try:
            while True:
                yield await entry[1].get()
        finally:
            self._subscribers.remove(entry)

    def close(self, timeout_s: float = 30.0) -> None:
        with contextlib.suppress(OSError, ValueError), self._send_lock:
            self._conn.send(None)
        self.proc.join(timeout_s)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(10)
        self._conn.close()


def _settle(fut: asyncio.Future, status: str, value) -> None:
    if fut.done():
        return
    if status == "ok":
        fut.set_result(value)
    else:
        fut.set_exception(value if isinstance(value, BaseException) else RuntimeError(str(value)))


@dataclass
class ProcCluster:
    """``colocated=False``: ``num_prefill`` prefill + ``num_decode`` decode processes;
    ``colocated=True``: one process per colocated worker (``num_decode`` of them)."""

    model: str
    prefill_engine: Any  # EngineConfig
    decode_engine: Any  # EngineConfig (the colocated workers use this one)
    kv: Any = None  # KVTransferConfig; None for colocated
    colocated: bool = False
    num_prefill: int = 1
    num_decode: int = 1
    policy: str = "least_loaded"
    torch_threads: int | None = None
    hosts: list[RemoteHost] = field(default_factory=list)

    def __enter__(self) -> ProcCluster:
        from pdserve.router.build import build_router
        from pdserve.router.config import RouterConfig
        from pdserve.router.server import ServerConfig

        try:
            if self.colocated:
                self.decodes = [self._start("colocated", f"colocated-{i}", self.decode_engine)
                                for i in range(self.num_decode)]
                self.prefills = []
            else:
                self.decodes = [self._start("decode", f"decode-{i}", self.decode_engine)
                                for i in range(self.num_decode)]
                self.prefills = [self._start("prefill", f"prefill-{i}", self.prefill_engine)
                                 for i in range(self.num_prefill)]
            router = RouterConfig(model=self.model, policy=self.policy,
                                  server=ServerConfig(port=0, metrics_port=None),
                                  admission="best_effort")
            self.server = build_router(router, [(h.worker_id, h) for h in self.prefills],
                                       [(h.worker_id, h) for h in self.decodes])
            self.loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
            self._thread.start()
            self.address = self.run(self.server.start())
        except BaseException:
            self._close_hosts()
            raise
        return self

    def _start(self, kind: str, worker_id: str, engine) -> RemoteHost:
        host = RemoteHost(kind, worker_id, engine, self.kv, self.torch_threads)
        self.hosts.append(host)
        return host

    def run(self, coro, timeout: float = 120.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stats(self) -> list:
        return [self.run(h.stats()) for h in self.hosts]

    def step_logs(self, last: int | None = None) -> dict[str, list]:
        return {h.worker_id: self.run(h.step_log(last)) for h in self.hosts}

    def _close_hosts(self) -> None:
        for h in self.hosts:
            h.close()
        self.hosts.clear()

    def __exit__(self, *exc) -> None:
        try:
            self.run(self.server.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            # Prefill first: its senders map the decode process's cache (CUDA IPC).
            for h in sorted(self.hosts, key=lambda h: h.kind != "prefill"):
                h.close()
            self.hosts.clear()


def sequential_greedy(address: str, prompts: Sequence[Sequence[int]], max_tokens: int,
                      timeout_s: float = 300.0) -> list[list[int]]:
    """Each prompt alone (the next is sent when the last finished), greedy, EOS ignored by
    construction of the checkpoints (no EOS id): identical batch shapes in every mode."""
    from pdserve.cluster.cli.client import Client, build_request

    out = []
    with Client(address, timeout_s=timeout_s) as client:
        for p in prompts:
            out.append(list(client.generate(build_request(list(p), max_tokens=max_tokens)).token_ids))
    return out
