"""Fuzzing a running router: random and malformed requests over real gRPC.

One in-process cluster (1 prefill + 1 decode worker, demo model, small context) serves
every test. Hypothesis generates batches of requests -- mostly malformed (one or more
fields out of range, NaN/inf, empty, oversized, unknown token ids, bytes that are not a
``GenerateRequest`` at all), some valid with 1-4 output tokens so the serving path runs
too -- and sends each batch concurrently. Every call must end, within a timeout, with OK
or a status a client can act on (INVALID_ARGUMENT, RESOURCE_EXHAUSTED) and a message;
INTERNAL, UNKNOWN or a deadline is a failure. Afterwards the server must still produce
the single-process engine's greedy output, and hold no request, block or reservation.
Examples are derandomized, so a CI failure reproduces locally.
"""

from __future__ import annotations

import random
import re
import string
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdserve.cluster.launch.local import LocalCluster
from pdserve.engine.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling_params import MAX_LOGPROBS, SamplingParams
from pdserve.protos import pdserve_pb2 as pb
from pdserve.router.config import RouterConfig
from pdserve.router.request_types import ValidationLimits
from pdserve.router.server import ServerConfig
from pdserve.router.validation import CHAT_ROLES, MAX_SEED
from tests.cluster_helpers import engine_config as small_engine
from tests.cluster_helpers import wait_until

MAX_MODEL_LEN = 128
# Small, so that oversized messages are cheap to build and send.
MAX_MESSAGE_BYTES = 256 << 10
METHOD = "/pdserve.v1.Generation/Generate"
CALL_TIMEOUT_S = 30.0  # a call still running after this is a hang
BATCH = 10  # requests per Hypothesis example, sent concurrently
MIN_REQUESTS = 2000
MIN_RAW_REQUESTS = 500
ACCEPTABLE = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT,
              grpc.StatusCode.RESOURCE_EXHAUSTED}
FUZZ_SETTINGS = dict(
    deadline=None, derandomize=True, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.large_base_example, HealthCheck.filter_too_much])
ID_RE = re.compile(r"[A-Za-z0-9._:-]+")


def engine_config(model) -> EngineConfig:
    return small_engine(model, num_kv_blocks=128, max_num_seqs=16, max_num_batched_tokens=512,
                        max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def cluster(demo_model_dir):
    router = RouterConfig(model=str(demo_model_dir), max_model_len=MAX_MODEL_LEN,
                          server=ServerConfig(port=0, metrics_port=0,
                                              max_message_bytes=MAX_MESSAGE_BYTES))
    with LocalCluster(engine_config(demo_model_dir), router=router) as c:
        yield c


@pytest.fixture(scope="module")
def reference(demo_model_dir):
    """A tiny greedy request and the single-process engine's answer to it."""
    prompt, max_tokens = [7, 8, 9, 10, 11], 4
    engine = LLMEngine.from_config(engine_config(demo_model_dir))
    want = engine.generate([prompt], [SamplingParams(max_tokens=max_tokens)])[0].token_ids
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt),
                             sampling=pb.SamplingParams(temperature=0.0, max_tokens=max_tokens))
    return req, list(want)


# ------------------------------------------------------------------------------ calls


@dataclass
class Case:
    """One request and what the server may answer.

    ``expect``: "ok"; "invalid" (INVALID_ARGUMENT, with ``fragment`` in the message when
    set); "too_big" (RESOURCE_EXHAUSTED from the transport); "any" (any acceptable code).
    """

    payload: pb.GenerateRequest | bytes
    expect: str = "any"
    fragment: str | None = None
    faults: list[str] = field(default_factory=list)
    unique_id: bool = False  # append a per-call suffix so concurrent ids never collide

    def __repr__(self) -> str:
        # Hypothesis prints failing examples; some payloads are hundreds of KiB.
        p = self.payload
        body = repr(p[:200]) if isinstance(p, bytes) else repr(str(p)[:400])
        size = len(p) if isinstance(p, bytes) else p.ByteSize()
        return f"Case({self.expect}, {self.faults}, {size} bytes: {body})"


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    messages: list[pb.GenerateResponse]
    seconds: float


class Sender:
    """Sends cases over one raw channel (bytes in, bytes out) from a small thread pool."""

    def __init__(self, address: str, workers: int = BATCH):
        self.channel = grpc.insecure_channel(address)
        self.call = self.channel.unary_stream(
            METHOD, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        self.pool = ThreadPoolExecutor(workers)
        self.sent = 0
        self._ids = iter(range(10**9))
        self._lock = threading.Lock()

    def one(self, payload: pb.GenerateRequest | bytes) -> Outcome:
        data = payload if isinstance(payload, bytes) else payload.SerializeToString()
        t0 = time.monotonic()
        try:
            raw = list(self.call(data, timeout=CALL_TIMEOUT_S))
        except grpc.RpcError as err:
            return Outcome(err.code(), err.details() or "", [], time.monotonic() - t0)
        msgs = [pb.GenerateResponse.FromString(r) for r in raw]
        return Outcome(grpc.StatusCode.OK, "", msgs, time.monotonic() - t0)

    def batch(self, cases: list[Case]) -> list[Outcome]:
        for case in cases:
            if case.unique_id:
                with self._lock:
                    n = next(self._ids)
                case.payload.request_id = f"{case.payload.request_id[:100]}.{n}"
        futures = [self.pool.submit(self.one, c.payload) for c in cases]
        # The gRPC deadline bounds each call; this bounds a client-side wedge too.
        outcomes = [f.result(timeout=CALL_TIMEOUT_S + 30) for f in futures]
        self.sent += len(cases)
        return outcomes

    def close(self) -> None:
        self.pool.shutdown()
        self.channel.close()


def check(case: Case, out: Outcome, limits: ValidationLimits) -> None:
    what = f"{case.faults or case.expect}: {out.code.name} {out.details[:300]!r}"
    assert out.code in ACCEPTABLE, f"unacceptable status (a hang if DEADLINE_EXCEEDED) {what}"
    if out.code != grpc.StatusCode.OK:
        assert out.details.strip(), f"error without a message: {what}"
    if case.expect == "ok":
        assert out.code == grpc.StatusCode.OK, what
    elif case.expect == "invalid":
        assert out.code == grpc.StatusCode.INVALID_ARGUMENT, what
        if case.fragment:
            assert case.fragment in out.details, f"message should name {case.fragment!r}: {what}"
    elif case.expect == "too_big":
        assert out.code == grpc.StatusCode.RESOURCE_EXHAUSTED, what
    if out.code == grpc.StatusCode.OK:
        req = case.payload
        if isinstance(req, bytes):
            req = pb.GenerateRequest.FromString(req)
        check_stream(req, out.messages, limits)


def check_stream(req: pb.GenerateRequest, msgs: list[pb.GenerateResponse],
                 limits: ValidationLimits) -> None:
    """The stream contract of ``protos/pdserve.proto`` for a request that succeeded."""
    assert msgs, "OK stream without a message"
    rid = msgs[0].request_id
    assert rid == req.request_id if req.request_id else re.fullmatch(r"[0-9a-f]{32}", rid)
    assert all(m.request_id == rid for m in msgs)
    assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in msgs[:-1])
    assert msgs[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
    assert msgs[-1].HasField("usage") and not any(m.HasField("usage") for m in msgs[:-1])
    tokens = [t for m in msgs for t in m.token_ids]
    assert all(0 <= t < limits.vocab_size for t in tokens)
    usage = msgs[-1].usage
    assert usage.completion_tokens == len(tokens) >= 1
    assert usage.prompt_tokens >= 1 and usage.prompt_tokens + len(tokens) <= MAX_MODEL_LEN
    if req.sampling.HasField("max_tokens"):
        assert len(tokens) <= req.sampling.max_tokens
    if req.sampling.HasField("logprobs"):
        k = req.sampling.logprobs
        for m in msgs:
            assert [lp.token_id for lp in m.logprobs] == list(m.token_ids)
            assert all(len(lp.top) == k for lp in m.logprobs)
    else:
        assert not any(m.logprobs for m in msgs)


def router_idle(cluster: LocalCluster) -> bool:
    """No request, block or reservation held anywhere (workers and the router's books)."""
    orch = cluster.server.orchestrator
    return (all(s.num_used_blocks == 0 and s.num_reserved == 0 for s in cluster.decode_stats())
            and all(s.num_running == 0 and s.num_waiting == 0 for s in cluster.prefill_stats())
            and orch.in_flight() == 0
            and all(w.in_flight == 0 and not w.decode_contexts
                    for w in orch.decode_load.values())
            and all(w.in_flight == 0 and w.queued_tokens == 0 and not w.prefill_queue
                    for w in orch.prefill_load.values()))




def assert_still_serving(cluster: LocalCluster, address: str, reference) -> None:
    req, want = reference
    assert wait_until(lambda: router_idle(cluster), 20.0), (
        cluster.decode_stats(), cluster.prefill_stats(), cluster.server.orchestrator.in_flight())
    sender = Sender(address, workers=1)
    try:
        out = sender.one(req)
    finally:
        sender.close()
    assert out.code == grpc.StatusCode.OK, out.details
    assert [t for m in out.messages for t in m.token_ids] == want
    assert wait_until(lambda: router_idle(cluster), 20.0)


# ------------------------------------------------------------------------- strategies

f32 = st.floats(width=32)  # NaN, +-inf, subnormals, signed zeros included
BAD_FLOATS = [float("nan"), float("inf"), float("-inf")]


def valid_requests(limits: ValidationLimits) -> st.SearchStrategy[Case]:
    """Requests that must be served: short prompts, 1-4 output tokens."""
    vocab_ids = st.integers(0, limits.vocab_size - 1)
    prompt_kind = st.sampled_from(["ids", "ids", "text", "chat"])

    @st.composite
    def build(draw) -> Case:
        req = pb.GenerateRequest()
        rid = draw(st.sampled_from(["none", "unique", "unique"]))
        if rid == "unique":
            req.request_id = draw(st.from_regex(r"[A-Za-z0-9._:-]{1,24}", fullmatch=True))
        kind = draw(prompt_kind)
        if kind == "ids":
            req.token_ids.ids.extend(draw(st.lists(vocab_ids, min_size=1, max_size=24)))
        elif kind == "text":  # <= 12 characters <= 48 UTF-8 bytes: well inside the context
            req.text = draw(st.text(min_size=1, max_size=12))
        else:
            req.chat.SetInParent()
            for _ in range(draw(st.integers(1, 2))):
                req.chat.messages.add(role=draw(st.sampled_from(sorted(CHAT_ROLES))),
                                      content=draw(st.text(max_size=6)))
        if kind != "ids" and draw(st.booleans()):
            req.add_special_tokens = draw(st.booleans())
        sp = req.sampling
        sp.max_tokens = draw(st.integers(1, 4))
        optional = {
            "temperature": st.one_of(st.just(0.0), st.floats(0.0, 2.0, width=32)),
            "top_p": st.floats(0.0625, 1.0, width=32),
            "top_k": st.integers(0, 50),
            "seed": st.integers(0, MAX_SEED),
            "logprobs": st.integers(0, MAX_LOGPROBS),
        }
        for name, values in optional.items():
            if draw(st.booleans()):
                setattr(sp, name, draw(values))
        req.stop.stop.extend(draw(st.lists(st.text(min_size=1, max_size=4), max_size=3)))
        req.stop.stop_token_ids.extend(draw(st.lists(vocab_ids, max_size=3)))
        req.stop.ignore_eos = draw(st.booleans())
        for name in ("ttft_ms", "tpot_ms"):
            if draw(st.booleans()):  # generous targets: admission must not refuse them
                setattr(req.slo, name, draw(st.floats(1e5, 1e9)))
        return Case(req, "ok", unique_id=rid == "unique")

    return build()


def _random_text(draw, lo: int, hi: int) -> str:
    # Drawn from a seeded RNG: Hypothesis itself is slow at building long strings.
    rng = random.Random(draw(st.integers(0, 2**32)))
    return "".join(rng.choices(string.printable, k=draw(st.integers(lo, hi))))


def _bad_id(draw) -> str:
    return draw(st.one_of(
        st.text(min_size=1, max_size=20).filter(lambda s: not ID_RE.fullmatch(s)),
        st.from_regex(r"[A-Za-z0-9._:-]{129,300}", fullmatch=True),
    ))


def _fault(draw, name: str, req: pb.GenerateRequest, limits: ValidationLimits) -> str | None:
    """Make ``req`` invalid in one way; returns the fragment the error message must contain
    (None when only the status matters). Every fault leaves its field invalid whatever
    other faults do later, so a request with several faults is still invalid."""
    vocab = limits.vocab_size
    sp, stop, slo = req.sampling, req.stop, req.slo
    if name == "request_id":
        req.request_id = _bad_id(draw)
        return "request_id"
    if name == "no_prompt":
        if req.WhichOneof("prompt"):
            req.ClearField(req.WhichOneof("prompt"))
        return "prompt"
    if name == "empty_prompt":
        which = draw(st.sampled_from(["text", "ids", "chat"]))
        if which == "text":
            req.text = ""
        elif which == "ids":
            req.token_ids.Clear()
            req.token_ids.SetInParent()
        else:
            req.chat.Clear()
            req.chat.SetInParent()
        return "empty"
    if name == "unknown_token_id":
        ids = draw(st.lists(st.integers(0, vocab - 1), max_size=10))
        bad = draw(st.one_of(st.integers(vocab, vocab + 10), st.integers(vocab, 2**32 - 1)))
        ids.insert(draw(st.integers(0, len(ids))), bad)
        req.token_ids.Clear()
        req.token_ids.ids.extend(ids)
        return "vocabulary"
    if name == "prompt_too_long":
        n = draw(st.one_of(st.integers(MAX_MODEL_LEN, 4 * MAX_MODEL_LEN),
                           st.integers(MAX_MODEL_LEN, 50_000)))
        req.token_ids.Clear()
        req.token_ids.ids.extend([draw(st.integers(0, vocab - 1))] * n)
        return "context"
    if name == "text_too_long":  # >= 600 random printable chars: hundreds of tokens
        req.text = _random_text(draw, 600, 20_000)
        return "context"
    if name == "chat_too_long":
        req.chat.Clear()
        req.chat.messages.add(role="user", content=_random_text(draw, 600, 20_000))
        return "context"
    if name == "chat_role":
        req.chat.Clear()
        role = draw(st.one_of(st.text(max_size=30).filter(lambda r: r not in CHAT_ROLES),
                              st.integers(20_000, 100_000).map(lambda n: "r" * n)))
        req.chat.messages.add(role="user", content="hi")
        req.chat.messages.add(role=role, content="hi")
        return "role"
    if name == "chat_count":
        req.chat.Clear()
        for _ in range(draw(st.integers(257, 400))):
            req.chat.messages.add(role="user")
        return "messages"
    if name == "temperature":
        sp.temperature = draw(st.one_of(st.sampled_from(BAD_FLOATS),
                                        st.floats(max_value=-(2.0**-149), width=32),
                                        st.floats(min_value=100.0, exclude_min=True, width=32)))
        return "temperature"
    if name == "top_p":
        sp.top_p = draw(st.one_of(st.sampled_from([*BAD_FLOATS, 0.0, -0.0]),
                                  st.floats(max_value=0.0, width=32),
                                  st.floats(min_value=1.0, exclude_min=True, width=32)))
        return "top_p"
    if name == "top_k":
        sp.top_k = draw(st.one_of(st.integers(-(2**31), -1), st.integers(vocab + 1, 2**31 - 1)))
        return "top_k"
    if name == "seed":
        sp.seed = draw(st.integers(MAX_SEED + 1, 2**64 - 1))
        return "seed"
    if name == "max_tokens":
        sp.max_tokens = draw(st.one_of(st.just(0), st.integers(MAX_MODEL_LEN, 2**32 - 1)))
        return "max_tokens"
    if name == "logprobs":
        sp.logprobs = draw(st.integers(MAX_LOGPROBS + 1, 2**32 - 1))
        return "logprobs"
    if name == "stop_count":
        stop.stop.extend(["s"] * draw(st.integers(17, 5000)))
        return "stop"
    if name == "stop_empty":
        stop.stop.insert(draw(st.integers(0, len(stop.stop))), "")
        return "stop string"
    if name == "stop_long":
        stop.stop.append(draw(st.sampled_from("xé€😀")) * draw(st.integers(257, 5000)))
        return "stop string"
    if name == "stop_ids_count":
        stop.stop_token_ids.extend([3] * draw(st.integers(65, 5000)))
        return "stop_token_ids"
    if name == "stop_ids_vocab":
        stop.stop_token_ids.append(draw(st.integers(vocab, 2**32 - 1)))
        return "stop_token_ids"
    if name in ("ttft_ms", "tpot_ms"):
        setattr(slo, name, draw(st.one_of(st.sampled_from([*BAD_FLOATS, 0.0, -0.0, 5e-324]),
                                          st.floats(max_value=0.0))))
        return f"slo.{name}"
    if name == "huge_prompt":  # just under the message limit: passes gRPC, fails on length
        req.text = "a" * (MAX_MESSAGE_BYTES - 1024)
        return "context"
    if name == "oversized":  # over the limit: gRPC refuses it before the servicer runs
        req.text = "a" * draw(st.integers(MAX_MESSAGE_BYTES, 2 * MAX_MESSAGE_BYTES))
        return None
    raise AssertionError(name)


# Rare faults are expensive (big messages, tokenizing long text); the rest are cheap.
FAULTS = (["request_id", "no_prompt", "empty_prompt", "unknown_token_id", "prompt_too_long",
           "chat_role", "temperature", "top_p", "top_k", "seed", "max_tokens", "logprobs",
           "stop_empty", "stop_long", "stop_ids_vocab", "ttft_ms", "tpot_ms"] * 4
          + ["text_too_long", "chat_too_long", "chat_count", "stop_count", "stop_ids_count"] * 2
          + ["huge_prompt", "oversized"])


def faulty_requests(limits: ValidationLimits) -> st.SearchStrategy[Case]:
    @st.composite
    def build(draw) -> Case:
        case = draw(valid_requests(limits))
        names = draw(st.lists(st.sampled_from(FAULTS), min_size=1, max_size=3)
                     if draw(st.integers(0, 3)) == 0 else st.sampled_from(FAULTS).map(
                         lambda f: [f]))
        fragments = [_fault(draw, name, case.payload, limits) for name in names]
        case.faults = names
        case.unique_id = case.unique_id and "request_id" not in names
        # Several faults can add up past the message limit; gRPC then refuses it first.
        if case.payload.ByteSize() > MAX_MESSAGE_BYTES:
            case.expect, case.fragment = "too_big", None
        else:
            case.expect = "invalid"
            case.fragment = fragments[0] if len(names) == 1 else None
        return case

    return build()


def chaos_requests(limits: ValidationLimits) -> st.SearchStrategy[Case]:
    """Every field from its whole wire type; any acceptable status will do. max_tokens is
    always set (to a tiny or an invalid value) so that accepted requests stay cheap."""
    uint32 = st.one_of(st.integers(0, limits.vocab_size + 5), st.integers(0, 2**32 - 1))
    ids = st.from_regex(r"[A-Za-z0-9._:-]{0,8}", fullmatch=True)  # collisions welcome

    @st.composite
    def build(draw) -> Case:
        req = pb.GenerateRequest(request_id=draw(st.one_of(ids, st.text(max_size=10))))
        kind = draw(st.sampled_from(["text", "ids", "chat", "none"]))
        if kind == "text":
            req.text = draw(st.text(max_size=30))
        elif kind == "ids":
            req.token_ids.SetInParent()
            req.token_ids.ids.extend(draw(st.lists(uint32, max_size=40)))
        elif kind == "chat":
            req.chat.SetInParent()
            for _ in range(draw(st.integers(0, 4))):
                req.chat.messages.add(role=draw(st.sampled_from([*sorted(CHAT_ROLES), "", "bot"])),
                                      content=draw(st.text(max_size=10)))
        if draw(st.booleans()):
            req.add_special_tokens = draw(st.booleans())
        sp = req.sampling
        sp.max_tokens = draw(st.one_of(st.integers(0, 4), st.integers(MAX_MODEL_LEN, 2**32 - 1)))
        for name, values in {"temperature": f32, "top_p": f32,
                             "top_k": st.integers(-(2**31), 2**31 - 1),
                             "seed": st.integers(0, 2**64 - 1), "logprobs": uint32}.items():
            if draw(st.booleans()):
                setattr(sp, name, draw(values))
        req.stop.stop.extend(draw(st.lists(st.text(max_size=8), max_size=20)))
        req.stop.stop_token_ids.extend(draw(st.lists(uint32, max_size=70)))
        req.stop.ignore_eos = draw(st.booleans())
        for name in ("ttft_ms", "tpot_ms"):
            if draw(st.booleans()):
                setattr(req.slo, name, draw(st.floats()))
        return Case(req, "any", faults=["chaos"])

    return build()


def cases(limits: ValidationLimits) -> st.SearchStrategy[Case]:
    # Mostly malformed (60% faulty, 20% chaos), 20% valid.
    return st.one_of(valid_requests(limits), faulty_requests(limits), faulty_requests(limits),
                     faulty_requests(limits), chaos_requests(limits))


# --- raw bytes: the wire format itself


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _ld(field_no: int, payload: bytes) -> bytes:
    """A length-delimited field (string, bytes, message)."""
    return _varint(field_no << 3 | 2) + _varint(len(payload)) + payload


BAD_UTF8 = [b"\xff", b"\xc3\x28", b"\xc0\xaf", b"\xe2\x82", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
            b"\x80"]
# Where a string sits in a GenerateRequest: request_id, text, chat role / content, stop.
STRING_SLOTS = [
    lambda s: _ld(1, s),
    lambda s: _ld(2, s),
    lambda s: _ld(4, _ld(1, _ld(1, s) + _ld(2, b"hi"))),
    lambda s: _ld(4, _ld(1, _ld(1, b"user") + _ld(2, s))),
    lambda s: _ld(6, _ld(1, s)),
]
WIRE_TRICKS = [
    b"\x2a\x05",  # sampling (field 5) as a varint: wrong wire type
    b"\x12\x7f" + b"a" * 10,  # length past the end
    b"\x1a\x05\x08" + b"\xff" * 10,  # a varint longer than 10 bytes inside token_ids
    b"\x0b" * 200,  # unterminated groups
    # Unknown groups (field 1000) nested within and past upb's depth limit of 100.
    _varint(8003) * 100 + _varint(8004) * 100,
    _varint(8003) * 5000 + _varint(8004) * 5000,
    b"\x07",  # field number 0 / wire type 7
    b"\x12\xff\xff\xff\xff\x0f",  # 4 GiB length
]


def _serialized_without_id(case: Case) -> bytes:
    # Raw requests are not given unique ids; concurrent duplicates would be refused.
    case.payload.ClearField("request_id")
    return case.payload.SerializeToString()


def raw_cases(limits: ValidationLimits) -> st.SearchStrategy[Case]:
    valid = valid_requests(limits).map(_serialized_without_id)

    @st.composite
    def mutated(draw) -> bytes:
        data = bytearray(draw(valid))
        for _ in range(draw(st.integers(1, 3))):
            op = draw(st.sampled_from(["flip", "truncate", "insert", "append"]))
            i = draw(st.integers(0, len(data)))
            if op == "flip" and data:
                data[min(i, len(data) - 1)] ^= 1 << draw(st.integers(0, 7))
            elif op == "truncate":
                del data[i:]
            elif op == "insert":
                data[i:i] = draw(st.binary(min_size=1, max_size=8))
            else:
                data += draw(st.binary(min_size=1, max_size=16))
        return bytes(data)

    @st.composite
    def bad_utf8(draw) -> bytes:
        s = (draw(st.text(max_size=4)).encode() + draw(st.sampled_from(BAD_UTF8))
             + draw(st.text(max_size=4)).encode())
        return draw(valid) + draw(st.sampled_from(STRING_SLOTS))(s)

    # Unknown fields (number 1000+) are skipped by the parser: the request stays valid.
    unknown_field = st.tuples(valid, st.integers(1000, 2**29 - 1), st.binary(max_size=16)).map(
        lambda t: t[0] + _ld(t[1], t[2]))

    @st.composite
    def build(draw) -> Case:
        kind = draw(st.sampled_from(["random", "mutated", "mutated", "utf8", "utf8", "tricks",
                                     "unknown"]))
        if kind == "random":
            data = draw(st.binary(max_size=64))
        elif kind == "mutated":
            data = draw(mutated())
        elif kind == "utf8":
            data = draw(bad_utf8())
        elif kind == "tricks":
            data = draw(valid) + draw(st.sampled_from(WIRE_TRICKS))
        else:
            data = draw(unknown_field)
        try:
            req = pb.GenerateRequest.FromString(data)
        except DecodeError:
            return Case(data, "invalid", "malformed GenerateRequest", faults=[f"raw:{kind}"])
        if kind == "unknown":
            return Case(data, "ok", faults=["raw:unknown"])
        # Parsed: it may even be valid; only keep it cheap.
        if req.sampling.max_tokens > 4 or not req.sampling.HasField("max_tokens"):
            req.sampling.max_tokens = 4
            data = req.SerializeToString()
        return Case(data, "any", faults=[f"raw:{kind}"])

    return build()


# ------------------------------------------------------------------------------ tests


def _fuzz(sender: Sender, strategy, examples: int, limits: ValidationLimits) -> dict[str, int]:
    seen: dict[str, int] = {}

    @settings(max_examples=examples, **FUZZ_SETTINGS)
    @given(batch=st.lists(strategy, min_size=BATCH, max_size=BATCH))
    def run(batch: list[Case]) -> None:
        for case, out in zip(batch, sender.batch(batch), strict=True):
            check(case, out, limits)
            seen[out.code.name] = seen.get(out.code.name, 0) + 1

    run()
    return seen


def test_fuzz_generate_requests(cluster, reference):
    """Well-formed protobuf, hostile values: >= 2,000 requests, no bad status, no leak."""
    limits = cluster.server.limits
    sender = Sender(cluster.address)
    t0 = time.monotonic()
    try:
        seen = _fuzz(sender, cases(limits), MIN_REQUESTS // BATCH + 5, limits)
    finally:
        sender.close()
    print(f"\n{sender.sent} requests in {time.monotonic() - t0:.1f}s: {seen}")
    assert sender.sent >= MIN_REQUESTS
    # The mix really covers both paths (guards against a strategy that drifted).
    assert seen.get("OK", 0) >= MIN_REQUESTS // 10
    assert seen.get("INVALID_ARGUMENT", 0) >= MIN_REQUESTS // 2
    assert_still_serving(cluster, cluster.address, reference)


def test_fuzz_raw_bytes(cluster, reference):
    """Bytes that may not parse as a GenerateRequest at all: INVALID_ARGUMENT, not UNKNOWN."""
    limits = cluster.server.limits
    sender = Sender(cluster.address)
    t0 = time.monotonic()
    try:
        seen = _fuzz(sender, raw_cases(limits), MIN_RAW_REQUESTS // BATCH + 5, limits)
    finally:
        sender.close()
    print(f"\n{sender.sent} raw requests in {time.monotonic() - t0:.1f}s: {seen}")
    assert sender.sent >= MIN_RAW_REQUESTS
    assert_still_serving(cluster, cluster.address, reference)


def test_router_server_answers_unparsable_bytes_with_invalid_argument(cluster):
    sender = Sender(cluster.address, workers=1)
    try:
        for data in (b"\xff\xff\xff", _ld(2, b"\xc3\x28"), b"\x0b" * 200):
            out = sender.one(data)
            assert out.code == grpc.StatusCode.INVALID_ARGUMENT, (out.code, out.details)
            assert "malformed GenerateRequest" in out.details
    finally:
        sender.close()


def test_message_size_limit(cluster, reference):
    """A message over ServerConfig.max_message_bytes: RESOURCE_EXHAUSTED, and the server
    stays up; just under it, the request reaches validation."""
    limit = cluster.server.config.max_message_bytes
    over = pb.GenerateRequest(text="a" * limit)
    under_text = pb.GenerateRequest(text="a" * (limit - 16))
    under_ids = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5] * (limit - 16)))
    assert len(over.SerializeToString()) > limit
    assert len(under_text.SerializeToString()) <= limit >= len(under_ids.SerializeToString())
    sender = Sender(cluster.address, workers=1)
    try:
        out = sender.one(over)
        assert out.code == grpc.StatusCode.RESOURCE_EXHAUSTED and out.details, out
        for req in (under_text, under_ids):
            out = sender.one(req)
            assert out.code == grpc.StatusCode.INVALID_ARGUMENT, (out.code, out.details)
            assert "context" in out.details
    finally:
        sender.close()
    assert_still_serving(cluster, cluster.address, reference)


def test_long_client_strings_are_not_echoed_in_full(cluster):
    """An error message quoting a client string must fit the client's metadata limit
    (16 KiB), or the client sees a transport error instead of INVALID_ARGUMENT."""
    req = pb.GenerateRequest(chat=pb.ChatPrompt(messages=[pb.ChatMessage(role="r" * 100_000)]))
    sender = Sender(cluster.address, workers=1)
    try:
        out = sender.one(req)
    finally:
        sender.close()
    assert out.code == grpc.StatusCode.INVALID_ARGUMENT, (out.code, out.details)
    assert "role" in out.details and len(out.details) < 1000
