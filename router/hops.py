"""Where a request's time to its first token goes, hop by hop.

Lifecycle: the attempt that produces the first token records, in its ``AttemptStamps``,
when it sent each remote call and when the answer came back, together with the workers'
own timestamps that the answers carry (``Reservation.reserved_at``, ``PrefillTimes``).
The protocol layer adds when it received and validated the request and when it handed
the first token to its transport, and ``first_token_hops`` turns all of that into named
durations in path order (``HOPS``), which reach the client with the final message's usage.
When the decode reservation overlaps the prefill (the prompt goes out first, its
destination after it), the reservation's hops are reported apart (``CONCURRENT``): they
ran beside the path, and only a destination that came after the first token was sampled
puts a hop on it (``destination_wait``).

Clocks. Every stamp is ``time.monotonic()``: CLOCK_MONOTONIC on Linux, which is one clock
for all the processes of a host (seconds since boot), so the router can subtract a
worker's stamp from its own when both run on one host. On different hosts the clocks
share no origin: a worker's stamps that do not fall inside the router's own window for
that call (sent <= worker stamps <= returned) are dropped, and the hop that ends at the
call's return then spans the whole call.

Cost: a few ``time.monotonic()`` calls and floats per request; the durations are only
computed for the final message.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.prefill_worker.messages import PrefillTimes


@dataclass
class AttemptStamps:
    """The remote calls of one attempt (router clock), and the workers' stamps (their
    clocks) from the answers. None: that step did not happen (yet)."""

    started: float  # the attempt began: the request was admitted
    reserve_sent: float | None = None
    reserved_at: float | None = None  # decode worker: blocks reserved
    reserved: float | None = None  # the reservation reached the router
    prefill_sent: float | None = None
    destination_sent: float | None = None  # a destination that follows the prompt
    prefill: PrefillTimes | None = None  # prefill worker
    prefill_returned: float | None = None  # the first token reached the router
    # Prefilled on the decode worker (conditional disaggregation): reserve_sent/reserved
    # bracket its ``prefill_local`` call, and this is when its first token reached the router.
    local_first: float | None = None

    @property
    def overlapped(self) -> bool:
        """The reservation was made while the prompt was already at the prefill worker."""
        return (self.reserve_sent is not None and self.prefill_sent is not None
                and self.reserve_sent > self.prefill_sent)


# (stamp, name of the hop that ends there), in path order. A hop starts at the latest
# stamp before it that is set, so a step that did not happen (no decode reservation when
# the first token is also the last) leaves no gap.
HOPS: tuple[tuple[str, str], ...] = (
    ("validated", "validate"),  # parse, check, tokenize
    ("started", "admit"),  # admission (and earlier failed attempts, if any)
    ("reserve_sent", "route"),  # rank decode workers
    ("reserved_at", "reserve_call"),  # router -> decode worker, blocks reserved
    ("reserved", "reserve_reply"),  # decode worker -> router
    ("prefill_sent", "dispatch"),  # pick the prefill worker, send
    ("prefill_received", "prefill_call"),  # router -> prefill worker's event loop
    ("prefill_queued", "prefill_handoff"),  # event loop -> step loop thread
    ("prefill_scheduled", "prefill_queue"),  # waiting for a step
    ("prefill_sampled", "prefill_compute"),  # first chunk scheduled -> first token
    ("prefill_destination", "destination_wait"),  # computed, its destination not there yet
    ("prefill_kv_done", "kv_transfer_wait"),  # until the KV landed
    ("prefill_replied", "prefill_result"),  # step loop -> event loop
    ("prefill_returned", "prefill_reply"),  # prefill worker -> router
    ("local_first", "local_prefill"),  # or: prefilled on the decode worker, token streamed
    ("first_sent", "to_stream"),  # router: first token -> protocol message, handed over
)
HOP_NAMES = tuple(name for _, name in HOPS)
# When the reservation overlaps the prefill, its hops run beside the path, not on it:
# (name, from stamp, to stamp).
CONCURRENT: tuple[tuple[str, str, str], ...] = (
    ("reserve_call", "reserve_sent", "reserved_at"),
    ("reserve_reply", "reserved_at", "reserved"),
    ("destination_call", "destination_sent", "prefill_destination"),
)
RESERVATION_STAMPS = ("reserve_sent", "reserved_at", "reserved")


@dataclass(frozen=True)
class FirstTokenTiming:
    """``received``: the router's clock when it received the request (only a client on
    the router's host can compare it with its own); ``hops``: (name, seconds) in path
    order, summing to received -> first token handed to the transport; ``concurrent``:
    (name, seconds) of the calls that ran beside the path (the decode reservation, when
    it overlapped the prefill), which add nothing to it."""

    received: float
    hops: tuple[tuple[str, float], ...]
    concurrent: tuple[tuple[str, float], ...] = ()


def first_token_hops(received: float, validated: float, attempt: AttemptStamps | None,
                     first_sent: float) -> FirstTokenTiming:
    stamps: dict[str, float | None] = {"validated": validated, "first_sent": first_sent}
    if attempt is not None:
        stamps.update(started=attempt.started, reserve_sent=attempt.reserve_sent,
                      reserved=attempt.reserved, prefill_sent=attempt.prefill_sent,
                      destination_sent=attempt.destination_sent,
                      prefill_returned=attempt.prefill_returned,
                      local_first=attempt.local_first)
        if _inside(attempt.reserved_at, attempt.reserve_sent, attempt.reserved):
            stamps["reserved_at"] = attempt.reserved_at
        p = attempt.prefill
        if p is not None and _inside(p.received, attempt.prefill_sent, attempt.prefill_returned) \
                and _inside(p.replied, p.received, attempt.prefill_returned):
            stamps.update(prefill_received=p.received, prefill_queued=p.queued,
                          prefill_scheduled=p.scheduled, prefill_sampled=p.sampled,
                          prefill_destination=p.destination, prefill_kv_done=p.kv_done,
                          prefill_replied=p.replied)
    concurrent = []
    chain = dict(stamps)
    if attempt is not None and attempt.overlapped:
        concurrent = [(name, stamps[b] - stamps[a]) for name, a, b in CONCURRENT
                      if stamps.get(a) is not None and stamps.get(b) is not None]
        for stamp in RESERVATION_STAMPS:
            chain.pop(stamp, None)
    if (chain.get("prefill_destination") or 0.0) <= (chain.get("prefill_sampled") or 0.0):
        chain.pop("prefill_destination", None)  # it came in time: no wait on the path
    hops = []
    last = received
    for stamp, name in HOPS:
        t = chain.get(stamp)
        if t is not None:
            hops.append((name, t - last))
            last = t
    return FirstTokenTiming(received, tuple(hops), tuple(concurrent))


def _inside(t: float | None, start: float | None, end: float | None) -> bool:
    return t is not None and start is not None and end is not None and start <= t <= end
