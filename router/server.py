"""The router's gRPC server: Generation service, standard health service, reflection.

Lifecycle: ``RouterServer(config, orchestrator, tokenizer)`` only wires; ``await
start()`` binds (127.0.0.1 by default; port 0 picks a free one), marks the health
service SERVING and starts the orchestrator's stream consumers; ``await stop()`` marks
NOT_SERVING, stops accepting, lets in-flight streams finish for ``grace_s`` and closes.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pdserve.engine.tokenizer import Tokenizer
from pdserve.protos import pdserve_pb2, pdserve_pb2_grpc
from pdserve.router.metrics import RouterMetrics
from pdserve.router.metrics_server import MetricsAggregator, serve_metrics
from pdserve.router.orchestrator import Orchestrator
from pdserve.router.service import GenerationService
from pdserve.router.validation import ValidationLimits

log = logging.getLogger(__name__)
SERVICE_NAME = pdserve_pb2.DESCRIPTOR.services_by_name["Generation"].full_name


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    # The aggregated Prometheus endpoint (router + every worker); None disables it.
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = 9400
    metrics_refresh_s: float = 1.0
    # Bound on any single message either way; prompts are limited far below this.
    max_message_bytes: int = 16 << 20
    grace_s: float = 5.0

    def __post_init__(self) -> None:
        if not (0 <= self.port <= 65535):
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_message_bytes < 1024:
            raise ValueError("max_message_bytes must be >= 1024")

    @property
    def bind_address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


class RouterServer:
    def __init__(self, config: ServerConfig, orchestrator: Orchestrator,
                 tokenizer: Tokenizer | None, limits: ValidationLimits,
                 metrics: RouterMetrics | None = None,
                 aggregator: MetricsAggregator | None = None):
        self.config = config
        self.orchestrator = orchestrator
        self.tokenizer = tokenizer
        self.limits = limits
        self.metrics = metrics
        self.aggregator = aggregator
        self.metrics_address: str | None = None
        self._metrics_http = None
        self._refresh_task: asyncio.Task | None = None
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer() if hasattr(health, "aio") else \
            health.HealthServicer()
        self.port: int | None = None

    async def start(self) -> str:
        opts = [("grpc.max_receive_message_length", self.config.max_message_bytes),
                ("grpc.max_send_message_length", self.config.max_message_bytes)]
        server = grpc.aio.server(options=opts)
        pdserve_pb2_grpc.add_GenerationServicer_to_server(
            GenerationService(self.orchestrator, self.tokenizer, self.limits, self.metrics), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        self.port = server.add_insecure_port(self.config.bind_address)
        if not self.port:
            raise OSError(f"cannot bind {self.config.bind_address}")
        self.orchestrator.start()
        self._start_metrics()
        await server.start()
        self._server = server
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"{host}:{self.port}"

    def _start_metrics(self) -> None:
        if self.metrics is None or self.config.metrics_port is None:
            return
        if self.aggregator is not None:
            self.metrics.registry.register(self.aggregator)
            self._refresh_task = asyncio.create_task(self._refresh_metrics())
        http, _thread = serve_metrics(self.metrics.registry, self.config.metrics_host,
                                      self.config.metrics_port)
        self._metrics_http = http
        host = self.config.metrics_host
        self.metrics_address = f"{host}:{http.server_port}"

    async def _refresh_metrics(self) -> None:
        while True:
            try:
                await self.aggregator.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("pulling worker metrics failed")
            await asyncio.sleep(self.config.metrics_refresh_s)

    async def _set_health(self, status) -> None:
        for name in ("", SERVICE_NAME):
            result = self._health.set(name, status)
            if hasattr(result, "__await__"):
                await result

    async def stop(self) -> None:
        if self._server is None:
            return
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._server.stop(self.config.grace_s)
        await self.orchestrator.close()
        if self._refresh_task is not None:
            self._refresh_task.cancel()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        self._server = None
