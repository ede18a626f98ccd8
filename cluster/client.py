"""A small synchronous gRPC client for the ``Generate`` stream (CLI, tests, benchmarks)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import grpc

from pdserve.protos import pdserve_pb2, pdserve_pb2_grpc


@dataclass
class Completion:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: int = 0
    usage: pdserve_pb2.Usage | None = None


def build_request(prompt: str | Sequence[int], max_tokens: int | None = None,
                  temperature: float | None = 0.0, top_p: float | None = None,
                  top_k: int | None = None, seed: int | None = None,
                  stop: Sequence[str] = (), request_id: str = "") -> pdserve_pb2.GenerateRequest:
    req = pdserve_pb2.GenerateRequest(request_id=request_id)
    if isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.ids.extend(prompt)
    for name, value in (("max_tokens", max_tokens), ("temperature", temperature),
                        ("top_p", top_p), ("top_k", top_k), ("seed", seed)):
        if value is not None:
            setattr(req.sampling, name, value)
    req.stop.stop.extend(stop)
    return req


class Client:
    def __init__(self, address: str, timeout_s: float | None = None):
        self.channel = grpc.insecure_channel(address)
        self.stub = pdserve_pb2_grpc.GenerationStub(self.channel)
        self.timeout_s = timeout_s

    def stream(self, req: pdserve_pb2.GenerateRequest) -> Iterator[pdserve_pb2.GenerateResponse]:
        return self.stub.Generate(req, timeout=self.timeout_s)

    def generate(self, req: pdserve_pb2.GenerateRequest) -> Completion:
        out = Completion()
        for msg in self.stream(req):
            out.token_ids.extend(msg.token_ids)
            out.text += msg.text
            if msg.finish_reason:
                out.finish_reason = msg.finish_reason
            if msg.HasField("usage"):
                out.usage = msg.usage
        return out

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
