"""The ``pdserve.v1.Generation`` servicer: the gRPC face of ``generation.Frontend``.

Each ``Generate`` call validates at the edge (INVALID_ARGUMENT on bad input, nothing
reaches a worker), then streams the frontend's chunks as ``GenerateResponse`` messages:
token ids, their text, and on the last message the finish reason and usage. When the
client cancels or the deadline passes, grpc.aio cancels this coroutine; closing the
frontend's generator then releases the request's KV on both workers.

Register the servicer with ``add_generation_service`` rather than the generated
``add_GenerationServicer_to_server``: the generated handler parses requests with
``GenerateRequest.FromString``, and gRPC answers a deserializer that raises (corrupt
bytes, invalid UTF-8 in a string field) with UNKNOWN and the exception's text.
"""

from __future__ import annotations

import contextlib
import time

import grpc

from pdserve.protos import pdserve_pb2, pdserve_pb2_grpc
from pdserve.router.generation import Frontend, OutputChunk
from pdserve.router.request_types import RequestValidationError
from pdserve.router.status import ServingError, abort_with
from pdserve.router.validation import parse_request

_FINISH = {
    "stop": pdserve_pb2.FINISH_REASON_STOP,
    "length": pdserve_pb2.FINISH_REASON_LENGTH,
    "abort": pdserve_pb2.FINISH_REASON_ABORT,
}


SERVICE_NAME = pdserve_pb2.DESCRIPTOR.services_by_name["Generation"].full_name


def _deserialize(data: bytes) -> pdserve_pb2.GenerateRequest | RequestValidationError:
    # Never raise here (gRPC would answer UNKNOWN): hand the error to Generate instead.
    try:
        return parse_request(data)
    except RequestValidationError as exc:
        return exc


def add_generation_service(service: GenerationService, server: grpc.aio.Server) -> None:
    """Register ``service`` on ``server`` like ``add_GenerationServicer_to_server`` does, except
    that unparsable request bytes reach ``Generate`` and get INVALID_ARGUMENT."""
    handlers = {"Generate": grpc.unary_stream_rpc_method_handler(
        service.Generate, request_deserializer=_deserialize,
        response_serializer=pdserve_pb2.GenerateResponse.SerializeToString)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


# A client whose deadline passes cancels the call itself, and that cancel reaches us before
# our own copy of the deadline expires: ours started when the call arrived, later than the
# client's, by the network and our accept queue (measured: up to ~25 ms on an idle host,
# more under load). A cancel this close to the deadline is counted as the deadline.
DEADLINE_SLACK_S = 0.5


def _deadline_passed(context) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= DEADLINE_SLACK_S


class GenerationService(pdserve_pb2_grpc.GenerationServicer):
    """The gRPC face of a ``Frontend``: protobuf in, ``GenerateResponse`` chunks out."""

    def __init__(self, frontend: Frontend):
        self.frontend = frontend

    async def Generate(self, request, context):  # noqa: N802 (gRPC method name)
        t0 = time.monotonic()
        try:
            req = self.frontend.validate(request)
        except ServingError as err:
            await abort_with(context, err)

        def interrupted() -> str:
            # gRPC cancels the handler both when the client goes away and when the call's
            # deadline passes; only the deadline leaves no time remaining.
            return "DEADLINE_EXCEEDED" if _deadline_passed(context) else "CANCELLED"

        try:
            async with contextlib.aclosing(
                    self.frontend.generate(req, t0, interrupted)) as chunks:
                async for chunk in chunks:
                    yield _message(req.request_id, chunk)
        except ServingError as err:
            await abort_with(context, err)


def _message(rid: str, chunk: OutputChunk) -> pdserve_pb2.GenerateResponse:
    msg = pdserve_pb2.GenerateResponse(request_id=rid, token_ids=chunk.token_ids,
                                       text=chunk.text)
    for lp in chunk.logprobs:
        msg.logprobs.add(token_id=lp.token_id, logprob=lp.logprob or 0.0,
                         top=[pdserve_pb2.TopLogprob(token_id=t, logprob=v)
                              for t, v in lp.top_logprobs])
    if chunk.finish_reason is not None:
        msg.finish_reason = _FINISH[chunk.finish_reason]
    if chunk.usage is not None:
        u = chunk.usage
        msg.usage.CopyFrom(pdserve_pb2.Usage(
            prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
            cached_tokens=u.cached_tokens, ttft_ms=u.ttft_ms, e2e_ms=u.e2e_ms,
            prefill_queue_ms=u.prefill_queue_ms, prefill_ms=u.prefill_ms,
            kv_transfer_wait_ms=u.kv_transfer_wait_ms))
        if u.timing is not None:
            msg.usage.timing.received_monotonic_s = u.timing.received
            msg.usage.timing.hops.extend(pdserve_pb2.Hop(name=name, ms=s * 1e3)
                                         for name, s in u.timing.hops)
            msg.usage.timing.concurrent.extend(pdserve_pb2.Hop(name=name, ms=s * 1e3)
                                               for name, s in u.timing.concurrent)
    return msg
