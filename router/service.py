"""The ``pdserve.v1.Generation`` servicer: validate, orchestrate, detokenize, stream.

Each ``Generate`` call validates at the edge (INVALID_ARGUMENT on bad input, nothing
reaches a worker), then drives ``Orchestrator.generate`` and turns its token events
into ``GenerateResponse`` messages: token ids, their text (incremental detokenization
and stop strings happen here, next to the client), and on the last message the finish
reason and usage. When the client cancels or the deadline passes, grpc.aio cancels
this coroutine; closing the orchestrator's generator then releases the request's KV on
both workers. A stop string found here ends the stream the same way.

Register the servicer with ``add_generation_service`` rather than the generated
``add_GenerationServicer_to_server``: the generated handler parses requests with
``GenerateRequest.FromString``, and gRPC answers a deserializer that raises (corrupt
bytes, invalid UTF-8 in a string field) with UNKNOWN and the exception's text.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from pdserve.engine.output_processor import TextStream
from pdserve.engine.tokenizer import Tokenizer
from pdserve.protos import pdserve_pb2, pdserve_pb2_grpc
from pdserve.router.events import TokenEvent
from pdserve.router.metrics import RouterMetrics
from pdserve.router.orchestrator import Orchestrator
from pdserve.router.request_types import RequestValidationError, ValidationLimits
from pdserve.router.status import ServingError, abort_with, as_serving_error
from pdserve.router.validation import parse_request, validate_request

log = logging.getLogger(__name__)

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
    def __init__(self, orchestrator: Orchestrator, tokenizer: Tokenizer | None,
                 limits: ValidationLimits, metrics: RouterMetrics | None = None):
        self.orchestrator = orchestrator
        self.tokenizer = tokenizer
        self.limits = limits
        self.metrics = metrics

    async def Generate(self, request, context):  # noqa: N802 (gRPC method name)
        t0 = time.monotonic()
        try:
            if isinstance(request, RequestValidationError):  # unparsable, see _deserialize
                raise request
            req = validate_request(request, self.tokenizer, self.limits)
        except RequestValidationError as exc:
            if self.metrics is not None:
                self.metrics.requests.labels(self.metrics.model, "INVALID_ARGUMENT").inc()
            await abort_with(context, as_serving_error(exc))
        except Exception as exc:  # the tokenizer or a chat template failing: a server fault
            log.exception("validating a request failed")
            if self.metrics is not None:
                self.metrics.requests.labels(self.metrics.model, "INTERNAL").inc()
            await abort_with(context, as_serving_error(exc))
        timeline = None
        if self.metrics is not None:
            orch_slo = self.orchestrator.slo
            timeline = self.metrics.timeline(
                orch_slo.with_overrides(req.slo.ttft_s, req.slo.tpot_s),
                custom=req.slo.ttft_s is not None or req.slo.tpot_s is not None)
            timeline.prompt_tokens = len(req.prompt_token_ids)
        code, rejected, completed = "OK", None, False
        text = (TextStream(self.tokenizer, req.prompt_token_ids, req.params.stop)
                if self.tokenizer is not None else None)
        events = self.orchestrator.generate(req)
        completion = 0
        ttft_ms = 0.0
        first: TokenEvent | None = None
        try:
            async for ev in events:
                if completion == 0:
                    ttft_ms = (time.monotonic() - t0) * 1e3
                    first = ev
                completion += len(ev.token_ids)
                if timeline is not None:
                    timeline.tokens_sent(len(ev.token_ids))
                    if ev is first:
                        timeline.queue_time("prefill", ev.prefill_queue_s)
                    if ev.decode_queue_s is not None:
                        timeline.queue_time("decode", ev.decode_queue_s)
                msg, finished = self._message(req.request_id, ev, text)
                if finished:
                    msg.usage.CopyFrom(pdserve_pb2.Usage(
                        prompt_tokens=len(req.prompt_token_ids), completion_tokens=completion,
                        cached_tokens=first.num_cached_tokens, ttft_ms=ttft_ms,
                        e2e_ms=(time.monotonic() - t0) * 1e3,
                        prefill_queue_ms=first.prefill_queue_s * 1e3,
                        prefill_ms=first.prefill_s * 1e3,
                        kv_transfer_wait_ms=first.transfer_wait_s * 1e3))
                if finished:
                    completed = True
                yield msg
                if finished:
                    return
        except ServingError as exc:
            code, rejected = exc.code.name, getattr(exc, "reason", None)
            await abort_with(context, exc)
        except grpc.aio.AbortError:
            raise
        except asyncio.CancelledError:
            # gRPC cancels the handler both when the client goes away and when the call's
            # deadline passes; only the deadline leaves no time remaining.
            code = "DEADLINE_EXCEEDED" if _deadline_passed(context) else "CANCELLED"
            raise
        except Exception as exc:  # a bug must still end the RPC with a status, not hang it
            log.exception("request %s failed", req.request_id)
            err = as_serving_error(exc)
            code = err.code.name
            await abort_with(context, err)
        finally:
            await events.aclose()
            if timeline is not None:
                if code == "OK" and not completed:  # the client went away mid-stream
                    code = "DEADLINE_EXCEEDED" if _deadline_passed(context) else "CANCELLED"
                timeline.finish(code, rejected)

    def _message(self, rid: str, ev: TokenEvent, text: TextStream | None):
        finish = ev.finish_reason
        new_text = ""
        if text is not None:
            new_text = text.add(ev.token_ids)
            if text.stopped:
                finish = "stop"
            if finish is not None:
                new_text += text.flush()
        msg = pdserve_pb2.GenerateResponse(request_id=rid, token_ids=ev.token_ids, text=new_text)
        for lp in ev.logprobs:
            msg.logprobs.add(token_id=lp.token_id, logprob=lp.logprob or 0.0,
                             top=[pdserve_pb2.TopLogprob(token_id=t, logprob=v)
                                  for t, v in lp.top_logprobs])
        if finish is not None:
            msg.finish_reason = _FINISH[finish]
        return msg, finish is not None
