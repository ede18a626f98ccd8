"""A whole cluster in one process, without Ray: real workers, hosts, router, gRPC server.

The same worker and router code as the Ray cluster, driven in-process: for tests, and
for hosts where Ray is not installed (the GPU benchmark machines). The router's event
loop runs in a background thread; callers talk to it over gRPC as any client would.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

from pdserve.decode_worker.build import build_colocated_host, build_decode_host
from pdserve.engine.config import EngineConfig
from pdserve.kv_transfer.backend_config import KVTransferConfig
from pdserve.prefill_worker.build import build_prefill_host
from pdserve.router.build import build_router
from pdserve.router.config import RouterConfig
from pdserve.router.server import ServerConfig


@dataclass
class LocalCluster:
    engine: EngineConfig
    num_prefill: int = 1
    num_decode: int = 1
    kv: KVTransferConfig = KVTransferConfig(backend="inprocess")
    policy: str = "least_loaded"
    router: RouterConfig | None = None  # overrides ``policy`` when given
    colocated: int = 0  # > 0: that many colocated workers instead of the two pools

    def __enter__(self) -> LocalCluster:
        if self.colocated:
            self.prefills = []
            self.decodes = [build_colocated_host(f"colocated-{i}", self.engine, 1)
                            for i in range(self.colocated)]
        else:
            self.prefills = [build_prefill_host(f"prefill-{i}", self.engine, self.kv, 1)
                             for i in range(self.num_prefill)]
            self.decodes = [build_decode_host(f"decode-{i}", self.engine, self.kv, 1)
                            for i in range(self.num_decode)]
        router = self.router or RouterConfig(model=self.engine.model, server=ServerConfig(port=0, metrics_port=0),
                                             policy=self.policy)
        self.server = build_router(
            router,
            [(h.worker.worker_id, h) for h in self.prefills],
            [(h.worker.worker_id, h) for h in self.decodes])
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.address = self.run(self.server.start())
        return self

    def run(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def decode_stats(self):
        return [self.run(h.stats()) for h in self.decodes]

    def prefill_stats(self):
        return [self.run(h.stats()) for h in self.prefills]

    def __exit__(self, *exc) -> None:
        self.run(self.server.stop())
        for h in (*self.prefills, *self.decodes):
            h.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
