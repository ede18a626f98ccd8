"""The gRPC driver: ``Generate`` on pdserve's gRPC endpoint (``protos/pdserve.proto``).

``num_channels`` channels are opened for the run, each with its own HTTP/2 connection,
and requests go to them in turn. The bearer token travels as per-call metadata; a
non-OK status becomes ``RequestFailed`` with its code name.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from dataclasses import fields

import grpc

from pdserve.cluster.cli.client import auth_metadata
from pdserve.cluster.cli.replay.driver import Driver, RequestFailed, StreamEvent
from pdserve.cluster.cli.replay.prompts import BenchRequest
from pdserve.cluster.cli.replay.records import UsageRecord
from pdserve.protos import pdserve_pb2, pdserve_pb2_grpc


def grpc_request(req: BenchRequest) -> pdserve_pb2.GenerateRequest:
    out = pdserve_pb2.GenerateRequest(request_id=req.request_id)
    if isinstance(req.prompt, str):
        out.text = req.prompt
    else:
        out.token_ids.ids.extend(req.prompt)
    out.sampling.temperature = 0.0
    out.sampling.max_tokens = req.max_tokens
    out.stop.ignore_eos = True
    if req.slo_ttft_s is not None:
        out.slo.ttft_ms = req.slo_ttft_s * 1e3
    if req.slo_tpot_s is not None:
        out.slo.tpot_ms = req.slo_tpot_s * 1e3
    return out


def usage_from_proto(u: pdserve_pb2.Usage) -> UsageRecord:
    """The proto's fields of the same names (the record mirrors ``Usage``)."""
    return UsageRecord(**{f.name: getattr(u, f.name) for f in fields(UsageRecord)})


def _finish_reason(value: int) -> str:
    return pdserve_pb2.FinishReason.Name(value).removeprefix("FINISH_REASON_").lower()


class GrpcDriver(Driver):
    async def open(self) -> None:
        cfg = self.config
        # A local subchannel pool per channel gives each channel its own HTTP/2 connection.
        options = [("grpc.use_local_subchannel_pool", 1)] if cfg.num_channels > 1 else []
        creds = cfg.security.credentials() if cfg.security is not None else None
        self._metadata = auth_metadata(cfg.security.token() if cfg.security is not None
                                       else None) or None
        self._channels = [grpc.aio.insecure_channel(self.address, options=options)
                          if creds is None else
                          grpc.aio.secure_channel(self.address, creds, options=options)
                          for _ in range(cfg.num_channels)]
        self._stubs = itertools.cycle([pdserve_pb2_grpc.GenerationStub(ch)
                                       for ch in self._channels])

    async def close(self) -> None:
        for ch in getattr(self, "_channels", ()):
            await ch.close()

    async def stream(self, req: BenchRequest) -> AsyncIterator[StreamEvent]:
        call = next(self._stubs).Generate(grpc_request(req), timeout=self.config.timeout_s,
                                          metadata=self._metadata)
        try:
            async for msg in call:
                yield StreamEvent(
                    len(msg.token_ids),
                    _finish_reason(msg.finish_reason) if msg.finish_reason else "",
                    usage_from_proto(msg.usage) if msg.HasField("usage") else None)
        except grpc.aio.AioRpcError as exc:
            raise RequestFailed(exc.code().name, exc.details() or "") from None
