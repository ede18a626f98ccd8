"""The protocol-specific part of the load generator: send one request, read its stream.

A ``Driver`` is an async context manager. Entering it opens what the run shares (gRPC
channels, an HTTP connection pool; the HTTP driver also learns the model name), and
leaving it closes them. ``stream(req)`` sends one ``BenchRequest`` and yields one
``StreamEvent`` per message the server streams (how many tokens it carried, the finish
reason, the final usage). A request the server refuses or fails raises
``RequestFailed`` with a gRPC status code name, so the report counts errors the same way
whatever the protocol; anything else a driver raises is a client-side bug. The load
generator stamps the time of each event, so drivers never see the run's clock.

``DRIVERS`` maps ``LoadGenConfig.api`` to a driver class, imported on first use (a gRPC
run never imports aiohttp).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pdserve.cluster.cli.replay.config import LoadGenConfig
from pdserve.cluster.cli.replay.prompts import BenchRequest
from pdserve.cluster.cli.replay.records import UsageRecord
from pdserve.engine.registry import Registry


@dataclass(frozen=True)
class StreamEvent:
    """One streamed message."""

    num_tokens: int  # generated tokens it carried (0 for a usage-only message)
    finish_reason: str = ""  # "stop" | "length" | "abort" on the message that ends it
    usage: UsageRecord | None = None


class RequestFailed(Exception):
    """The server refused or failed the request; ``status`` is a gRPC code name."""

    def __init__(self, status: str, message: str = ""):
        super().__init__(f"{status}: {message}" if message else status)
        self.status = status
        self.message = message


class Driver(ABC):
    """Constructors only keep their arguments; connections open in ``__aenter__``."""

    def __init__(self, address: str, config: LoadGenConfig):
        self.address = address
        self.config = config

    async def __aenter__(self) -> Driver:
        await self.open()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def open(self) -> None:  # noqa: B027 - a driver with nothing to open is fine
        """Open the connections the run shares."""

    async def close(self) -> None:  # noqa: B027
        """Close them; called even when ``open`` failed part way."""

    @abstractmethod
    def stream(self, req: BenchRequest) -> AsyncIterator[StreamEvent]:
        """Send ``req`` and yield its messages; raise ``RequestFailed`` on an error."""


def _grpc() -> type[Driver]:
    from pdserve.cluster.cli.replay.grpc_driver import GrpcDriver

    return GrpcDriver


def _http() -> type[Driver]:
    from pdserve.cluster.cli.replay.http_driver import HttpDriver

    return HttpDriver


DRIVERS: Registry[type[Driver]] = Registry("bench API", {"grpc": _grpc, "http": _http})
