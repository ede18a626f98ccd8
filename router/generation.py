"""One request's generation below the protocol layer: what every front door shares.

The gRPC servicer (``service.py``) and the OpenAI HTTP handlers (``openai_http/``) differ
only in how a request arrives and how chunks and errors leave. Everything between is here:

* ``Frontend.validate(request)`` checks a ``GenerateRequest`` (the HTTP layer maps its JSON
  onto one first, so both protocols share every rule and message) and returns a
  ``ValidatedRequest``, or raises a ``ServingError`` (INVALID_ARGUMENT for bad input,
  INTERNAL when the tokenizer or chat template itself fails), counted in the metrics.
* ``Frontend.generate(req, t0, interrupted)`` drives the orchestrator and yields
  ``OutputChunk``s: token ids, their text (incremental detokenization and stop strings
  happen here, next to the client), and on the last chunk the finish reason and
  ``Usage``. Every failure leaves it as a ``ServingError``; anything else that escapes is
  logged and becomes INTERNAL. When the consumer is cancelled (client gone, deadline) or
  closes the generator early, closing the orchestrator's generator releases the
  request's KV on both pools; ``interrupted()`` names the status to count in that case
  (CANCELLED or DEADLINE_EXCEEDED: only the protocol layer knows which).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from pdserve.engine.messages import SampledToken
from pdserve.engine.output_processor import TextStream
from pdserve.engine.tokenizer import Tokenizer
from pdserve.protos import pdserve_pb2
from pdserve.router.hops import FirstTokenTiming, first_token_hops
from pdserve.router.metrics import RouterMetrics
from pdserve.router.orchestrator import Orchestrator
from pdserve.router.request_types import RequestValidationError, ValidatedRequest, ValidationLimits
from pdserve.router.status import ServingError, as_serving_error
from pdserve.router.validation import validate_request

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Usage:
    """Token counts and the router's timings of one request (the last chunk carries it)."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    ttft_ms: float
    e2e_ms: float
    prefill_queue_ms: float
    prefill_ms: float
    kv_transfer_wait_ms: float
    timing: FirstTokenTiming | None = None  # where the time to first token went


@dataclass(frozen=True)
class OutputChunk:
    """What one orchestrator event adds to the client's output."""

    token_ids: tuple[int, ...]
    text: str  # empty when the model is served without a tokenizer
    logprobs: tuple[SampledToken, ...]
    finish_reason: str | None  # "stop" | "length" | "abort" on the last chunk only
    usage: Usage | None = None  # on the last chunk only


class Frontend:
    """Validation and generation for one served model; see the module docstring."""

    def __init__(self, orchestrator: Orchestrator, tokenizer: Tokenizer | None,
                 limits: ValidationLimits, metrics: RouterMetrics | None = None):
        self.orchestrator = orchestrator
        self.tokenizer = tokenizer
        self.limits = limits
        self.metrics = metrics

    def count(self, code: str) -> None:
        """Count a request that ended before generation began (bad input, auth...)."""
        if self.metrics is not None:
            self.metrics.requests.labels(self.metrics.model, code).inc()

    def validate(self, request: pdserve_pb2.GenerateRequest | RequestValidationError
                 ) -> ValidatedRequest:
        """``request`` may be the error a wire parser produced (answered like bad input)."""
        try:
            if isinstance(request, RequestValidationError):
                raise request
            return validate_request(request, self.tokenizer, self.limits)
        except RequestValidationError as exc:
            self.count("INVALID_ARGUMENT")
            raise as_serving_error(exc) from None
        except Exception as exc:  # the tokenizer or a chat template failing: a server fault
            log.exception("validating a request failed")
            self.count("INTERNAL")
            raise as_serving_error(exc) from exc

    async def generate(self, req: ValidatedRequest, t0: float,
                       interrupted: Callable[[], str]) -> AsyncIterator[OutputChunk]:
        """Serve ``req`` (received at ``time.monotonic()`` ``t0``); see the module docstring."""
        validated = time.monotonic()
        timeline = None
        if self.metrics is not None:
            timeline = self.metrics.timeline(
                self.orchestrator.slo.with_overrides(req.slo.ttft_s, req.slo.tpot_s),
                custom=req.slo.ttft_s is not None or req.slo.tpot_s is not None)
            timeline.prompt_tokens = len(req.prompt_token_ids)
        code, rejected, completed = "OK", None, False
        text = (TextStream(self.tokenizer, req.prompt_token_ids, req.params.stop,
                           req.params.min_tokens) if self.tokenizer is not None else None)
        completion, ttft_ms, first, first_sent = 0, 0.0, None, 0.0
        try:
            async with contextlib.aclosing(self.orchestrator.generate(req)) as events:
                async for ev in events:
                    if first is None:
                        ttft_ms = (time.monotonic() - t0) * 1e3
                        first = ev
                        if timeline is not None and not ev.prefilled_locally:
                            timeline.queue_time("prefill", ev.prefill_queue_s)
                    completion += len(ev.token_ids)
                    if timeline is not None:
                        timeline.tokens_sent(len(ev.token_ids))
                        if ev.decode_queue_s is not None:
                            timeline.queue_time("decode", ev.decode_queue_s)
                    finish, new_text = ev.finish_reason, ""
                    if text is not None:
                        new_text = text.add(ev.token_ids)
                        if text.stopped:
                            finish = "stop"
                        if finish is not None:
                            new_text += text.flush()
                    usage = None
                    if ev is first:
                        first_sent = time.monotonic()
                    if finish is not None:
                        completed = True
                        usage = Usage(
                            prompt_tokens=len(req.prompt_token_ids),
                            completion_tokens=completion, cached_tokens=first.num_cached_tokens,
                            ttft_ms=ttft_ms, e2e_ms=(time.monotonic() - t0) * 1e3,
                            prefill_queue_ms=first.prefill_queue_s * 1e3,
                            prefill_ms=first.prefill_s * 1e3,
                            kv_transfer_wait_ms=first.transfer_wait_s * 1e3,
                            timing=first_token_hops(t0, validated, first.stamps, first_sent))
                    yield OutputChunk(ev.token_ids, new_text, ev.logprobs, finish, usage)
                    if finish is not None:
                        return
        except ServingError as exc:
            code, rejected = exc.code.name, getattr(exc, "reason", None)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            code = interrupted()
            raise
        except Exception as exc:  # a bug must still end the request with a status
            log.exception("request %s failed", req.request_id)
            err = as_serving_error(exc)
            code = err.code.name
            raise err from exc
        finally:
            if timeline is not None:
                if code == "OK" and not completed:  # the consumer went away mid-stream
                    code = interrupted()
                timeline.finish(code, rejected)
