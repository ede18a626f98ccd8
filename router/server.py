"""The router's gRPC server: Generation service, standard health service, reflection.

Lifecycle: ``RouterServer(config, orchestrator, tokenizer)`` only wires; ``await
start()`` binds (127.0.0.1 by default; port 0 picks a free one), marks the health
service SERVING and starts the orchestrator's stream consumers; ``await stop()`` marks
NOT_SERVING, stops accepting, lets in-flight streams finish for ``grace_s`` and closes.

Security (docs/security.md): with ``tls_cert_file``/``tls_key_file`` the port speaks TLS
only, and with ``tls_client_ca_file`` as well every client must present a certificate
signed by that CA (mutual TLS); otherwise the port is plaintext. Non-empty
``auth_tokens`` put ``auth.BearerTokenInterceptor`` in front of every service but health.
The PEM files are read by ``start``, on the node where the router runs.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pdserve.engine.tokenizer import Tokenizer
from pdserve.protos import pdserve_pb2
from pdserve.router.auth import BearerTokenInterceptor, validate_token
from pdserve.router.generation import Frontend
from pdserve.router.metrics import RouterMetrics
from pdserve.router.metrics_server import MetricsAggregator, serve_metrics
from pdserve.router.openai_http.app import OpenAIApp, ServedModel
from pdserve.router.openai_http.server import HttpServer, tls_context
from pdserve.router.orchestrator import Orchestrator
from pdserve.router.request_types import ValidationLimits
from pdserve.router.service import GenerationService, add_generation_service

log = logging.getLogger(__name__)
SERVICE_NAME = pdserve_pb2.DESCRIPTOR.services_by_name["Generation"].full_name


@dataclass(frozen=True)
class ServerConfig:
    """Where and how the gRPC endpoint listens. Paths are plain strings so the config stays
    picklable (it crosses Ray to the router actor); ``auth_tokens`` come from
    ``auth.load_tokens`` and are kept out of ``repr``."""

    host: str = "127.0.0.1"
    port: int = 50051
    # The OpenAI-compatible HTTP endpoint on the same host; None = off, 0 = a free port.
    # (`pdserve serve --http-port` defaults to 8000, and its 0 means off.)
    http_port: int | None = None
    # The aggregated Prometheus endpoint (router + every worker); None disables it.
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = 9400
    metrics_refresh_s: float = 1.0
    # Bound on any single message either way; prompts are limited far below this.
    max_message_bytes: int = 16 << 20
    # Calls gRPC may hold that the router's loop has not picked up yet. Under overload the
    # loop answers RESOURCE_EXHAUSTED at its own pace; gRPC's default bound on this queue
    # (about a thousand) made it cancel the excess instead, so clients saw CANCELLED they
    # never asked for. Each waiting call holds at most its stream's flow-control window.
    max_pending_calls: int = 4096
    grace_s: float = 5.0
    # TLS: server certificate chain and its private key (PEM). A client CA as well turns on
    # mutual TLS: clients without a certificate signed by it are refused in the handshake.
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None
    # Accepted bearer tokens; empty = no token needed (see router/auth.py).
    auth_tokens: tuple[str, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if not (0 <= self.port <= 65535):
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.http_port is not None and not (0 <= self.http_port <= 65535):
            raise ValueError(f"http_port must be in [0, 65535] or None, got {self.http_port}")
        if self.max_message_bytes < 1024:
            raise ValueError("max_message_bytes must be >= 1024")
        if self.max_pending_calls < 1:
            raise ValueError("max_pending_calls must be >= 1")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("TLS needs both a certificate (--tls-cert) and its private key "
                             "(--tls-key); got only the "
                             + ("certificate" if self.tls_key_file is None else "key"))
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("a client CA (--tls-client-ca, mutual TLS) needs the server's "
                             "own certificate and key (--tls-cert, --tls-key)")
        for what, path in (("TLS certificate", self.tls_cert_file),
                           ("TLS private key", self.tls_key_file),
                           ("TLS client CA", self.tls_client_ca_file)):
            if path is not None:
                _check_readable(what, path)
        if not isinstance(self.auth_tokens, tuple):
            raise ValueError("auth_tokens must be a tuple of strings")
        for token in self.auth_tokens:
            validate_token(token)

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

    @property
    def mutual_tls(self) -> bool:
        return self.tls_client_ca_file is not None

    @property
    def bind_address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def tls_credentials(config: ServerConfig) -> grpc.ServerCredentials:
    """TLS credentials from the config's PEM files, read now (on the router's node)."""
    cert = _read_pem("TLS certificate", config.tls_cert_file)
    key = _read_pem("TLS private key", config.tls_key_file)
    ca = (_read_pem("TLS client CA", config.tls_client_ca_file)
          if config.tls_client_ca_file is not None else None)
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                       require_client_auth=ca is not None)


def _check_readable(what: str, path: str) -> None:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{what} file {path} does not exist or is not a file")
    if not os.access(p, os.R_OK):
        raise ValueError(f"{what} file {path} is not readable")


def _read_pem(what: str, path: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise OSError(f"cannot read the {what} file {path} on this node: "
                      f"{exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"{what} file {path} is not PEM")
    return data


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RouterServer:
    """``model_name``: the name the HTTP API serves the model under (``/v1/models``)."""

    def __init__(self, config: ServerConfig, orchestrator: Orchestrator,
                 tokenizer: Tokenizer | None, limits: ValidationLimits,
                 metrics: RouterMetrics | None = None,
                 aggregator: MetricsAggregator | None = None, model_name: str = "pdserve"):
        self.config = config
        self.orchestrator = orchestrator
        self.tokenizer = tokenizer
        self.limits = limits
        self.metrics = metrics
        self.aggregator = aggregator
        self.frontend = Frontend(orchestrator, tokenizer, limits, metrics)
        self.model_name = model_name
        self.metrics_address: str | None = None
        self.http_address: str | None = None
        self._http: HttpServer | None = None
        self._metrics_http = None
        self._refresh_task: asyncio.Task | None = None
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer() if hasattr(health, "aio") else \
            health.HealthServicer()
        self.port: int | None = None
        # Pools that change while serving (router/membership.py); set by build_router.
        self.membership = None

    async def start(self) -> str:
        cfg = self.config
        opts = [("grpc.max_receive_message_length", cfg.max_message_bytes),
                ("grpc.max_send_message_length", cfg.max_message_bytes),
                ("grpc.server.max_pending_requests", cfg.max_pending_calls),
                ("grpc.server.max_pending_requests_hard_limit", cfg.max_pending_calls)]
        interceptors = [BearerTokenInterceptor(cfg.auth_tokens)] if cfg.auth_tokens else []
        server = grpc.aio.server(options=opts, interceptors=interceptors)
        # (not the generated add_GenerationServicer_to_server: its parser makes gRPC answer
        # UNKNOWN to bytes that are no GenerateRequest; this one answers INVALID_ARGUMENT)
        add_generation_service(GenerationService(self.frontend), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        if cfg.tls:
            self.port = server.add_secure_port(cfg.bind_address, tls_credentials(cfg))
        else:
            self.port = server.add_insecure_port(cfg.bind_address)
        self._warn_if_exposed()
        if not self.port:
            raise OSError(f"cannot bind {self.config.bind_address}")
        self.orchestrator.start()
        self._start_metrics()
        await server.start()
        self._server = server
        await self._start_http()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"{host}:{self.port}"

    async def _start_http(self) -> None:
        cfg = self.config
        if cfg.http_port is None:
            return
        model = ServedModel(self.model_name, self.limits.max_model_len, int(time.time()))
        app = OpenAIApp(self.frontend, model, cfg.auth_tokens, cfg.max_message_bytes).build()
        tls = (tls_context(cfg.tls_cert_file, cfg.tls_key_file, cfg.tls_client_ca_file)
               if cfg.tls else None)
        self._http = HttpServer(app, cfg.host, cfg.http_port, tls, backlog=cfg.max_pending_calls,
                                grace_s=cfg.grace_s)
        self.http_address = await self._http.start()

    def _warn_if_exposed(self) -> None:
        cfg = self.config
        if _is_loopback(cfg.host):
            return
        missing = []
        if not cfg.tls:
            missing.append("TLS")
        if not (cfg.mutual_tls or cfg.auth_tokens):
            missing.append("client authentication (bearer tokens or mTLS)")
        if missing:
            log.warning("the gRPC and HTTP endpoints on %s are open to the network without "
                        "%s; see docs/security.md", cfg.host, " or ".join(missing))

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
        http, self._http = self._http, None
        await asyncio.gather(self._server.stop(self.config.grace_s),
                             *([http.stop()] if http is not None else []))
        await self.orchestrator.close()
        if self._refresh_task is not None:
            self._refresh_task.cancel()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        self._server = None
