"""One request through a front door, timed from the client: the router_overhead probes.

A ``Probe`` sends one request and returns a ``Sample``: when the client sent it and got
the first token (its own ``time.monotonic()``), and the figures the server reported with
the final message (``ServerFigures``: the router's TTFT, the prefill worker's compute,
and the router's hop breakdown). Each front door (gRPC, HTTP/SSE) is one
``Probe`` subclass; the benchmark and its report know nothing of the protocol.

Clocks: CLOCK_MONOTONIC is one clock for every process of a host, so when the client
runs on the router's host, ``ServerFigures.received_monotonic_s`` splits the client's
TTFT into the way in (client -> router), the router's hops and the way out.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ServerFigures:
    """What the server reported about one request (milliseconds, except the timestamp)."""

    ttft_ms: float  # measured at the router: received -> first token handed over
    prefill_ms: float  # the prefill worker's compute for the prompt
    prefill_queue_ms: float
    kv_transfer_wait_ms: float
    received_monotonic_s: float | None = None  # router's clock; None: not reported
    hops: tuple[tuple[str, float], ...] = ()  # (name, ms), path order; () if not reported
    concurrent: tuple[tuple[str, float], ...] = ()  # (name, ms) beside the path


@dataclass(frozen=True)
class Sample:
    sent: float  # client clock: the request left
    first_token: float  # client clock: the first token arrived
    server: ServerFigures

    @property
    def client_ttft_ms(self) -> float:
        return (self.first_token - self.sent) * 1e3

    @property
    def overhead_ms(self) -> float:
        """What the path adds to the prefill compute: client TTFT - prefill_ms."""
        return self.client_ttft_ms - self.server.prefill_ms

    @property
    def router_added_ms(self) -> float:
        """What the router adds: from the router receiving the request to its first token
        leaving, minus the prefill compute (the client's own transport excluded)."""
        return self.server.ttft_ms - self.server.prefill_ms

    def hops_ms(self) -> tuple[tuple[str, float], ...]:
        """The whole way to the first token, hop by hop (ms): client -> router, the
        router's hops, router -> client. Only the router's hops when the router's clock is
        not this host's (its received stamp falls outside the client's window)."""
        received = self.server.received_monotonic_s
        if not self.server.hops:
            return ()
        if received is None or not self.sent <= received <= self.first_token:
            return self.server.hops
        handed_over = received + sum(ms for _, ms in self.server.hops) / 1e3
        return (("client_to_router", (received - self.sent) * 1e3), *self.server.hops,
                ("router_to_client", (self.first_token - handed_over) * 1e3))


class Probe(ABC):
    """One front door, seen from a client. ``send`` is called for one request at a time."""

    name: str = ""

    @abstractmethod
    def send(self, prompt: Sequence[int], max_tokens: int) -> Sample:
        """Send one greedy request for ``prompt``; return when its stream has ended."""

    @abstractmethod
    def close(self) -> None:
        """Release the connection."""


class GrpcProbe(Probe):
    name = "grpc"

    def __init__(self, address: str, timeout_s: float = 120.0):
        from pdserve.cluster.cli.client import Client

        self.client = Client(address, timeout_s=timeout_s)

    def send(self, prompt: Sequence[int], max_tokens: int) -> Sample:
        from pdserve.cluster.cli.client import build_request

        req = build_request(list(prompt), max_tokens=max_tokens)
        sent = time.monotonic()
        first = None
        usage = None
        for msg in self.client.stream(req):
            if first is None:
                first = time.monotonic()
            if msg.HasField("usage"):
                usage = msg.usage
        if first is None or usage is None:
            raise RuntimeError("the stream ended without a token or without usage")
        return Sample(sent, first, _grpc_figures(usage))

    def close(self) -> None:
        self.client.close()


def _grpc_figures(usage) -> ServerFigures:
    received, hops, concurrent = None, (), ()
    # (an older server's proto has no timing: A/B runs against earlier revisions)
    if "timing" in usage.DESCRIPTOR.fields_by_name and usage.HasField("timing"):
        received = usage.timing.received_monotonic_s
        hops = tuple((h.name, h.ms) for h in usage.timing.hops)
        concurrent = tuple((h.name, h.ms) for h in getattr(usage.timing, "concurrent", ()))
    return ServerFigures(usage.ttft_ms, usage.prefill_ms, usage.prefill_queue_ms,
                         usage.kv_transfer_wait_ms, received, hops, concurrent)


class HttpProbe(Probe):
    """The OpenAI-compatible endpoint: a streamed ``/v1/completions`` of token ids, on one
    kept-alive connection. The first token is the first SSE chunk that carries text or
    token ids; the router's figures come with the usage chunk (``timing``)."""

    name = "http"

    def __init__(self, address: str, timeout_s: float = 120.0):
        import http.client

        host, _, port = address.rpartition(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=timeout_s)
        self.model = self._json("GET", "/v1/models", None)["data"][0]["id"]

    def _json(self, method: str, path: str, body: dict | None) -> dict:
        import json

        self.conn.request(method, path, body=None if body is None else json.dumps(body),
                          headers={"Content-Type": "application/json"})
        resp = self.conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{method} {path}: HTTP {resp.status}: {data[:300]!r}")
        return json.loads(data)

    def send(self, prompt: Sequence[int], max_tokens: int) -> Sample:
        import json

        from pdserve.cluster.cli.replay.sse import SSEParser

        body = {"model": self.model, "prompt": list(prompt), "max_tokens": max_tokens,
                "temperature": 0.0, "stream": True, "return_token_ids": True,
                "stream_options": {"include_usage": True}}
        sent = time.monotonic()
        self.conn.request("POST", "/v1/completions", body=json.dumps(body),
                          headers={"Content-Type": "application/json"})
        resp = self.conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"POST /v1/completions: HTTP {resp.status}: "
                               f"{resp.read()[:300]!r}")
        parser, first, timing = SSEParser(), None, None
        while (chunk := resp.read1(65536)):
            for data in parser.feed(chunk):
                if data == "[DONE]":
                    continue
                event = json.loads(data)
                if first is None and any(c.get("token_ids") or c.get("text")
                                         for c in event.get("choices", ())):
                    first = time.monotonic()
                timing = event.get("timing", timing)
        if first is None or timing is None:
            raise RuntimeError("the stream ended without a token or without timing")
        return Sample(sent, first, _http_figures(timing))

    def close(self) -> None:
        self.conn.close()


def _http_figures(timing: dict) -> ServerFigures:
    """``timing`` of the usage chunk (router/openai_http/responses.timing_json)."""
    def pairs(key: str) -> tuple[tuple[str, float], ...]:
        return tuple((h["name"], h["ms"]) for h in timing.get(key, ()))

    return ServerFigures(timing["ttft_ms"], timing["prefill_ms"], timing["prefill_queue_ms"],
                         timing["kv_transfer_wait_ms"], timing.get("received_monotonic_s"),
                         pairs("hops"), pairs("concurrent"))
