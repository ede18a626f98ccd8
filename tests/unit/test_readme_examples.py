"""The README's grpcurl payloads are valid ``GenerateRequest`` JSON for the checked-in proto,
and its curl payloads valid OpenAI bodies for the HTTP API."""

from __future__ import annotations

import json
import re
from pathlib import Path

from google.protobuf import json_format

from pdserve.protos import pdserve_pb2

README = Path(__file__).resolve().parents[2] / "README.md"


def _payloads() -> tuple[list[str], list[dict]]:
    """(grpcurl payloads, OpenAI bodies): the OpenAI ones name a ``model``."""
    found = re.findall(r"-d '(\{.*?\})'", README.read_text())
    openai = [json.loads(p) for p in found if '"model"' in p]
    return [p for p in found if '"model"' not in p], openai


def test_readme_curl_payloads_are_openai_bodies():
    from pdserve.router.openai_http.protocol import (
        ChatCompletionRequest,
        CompletionRequest,
        to_generate_request,
    )

    bodies = _payloads()[1]
    assert {("messages" in b) for b in bodies} == {True, False}  # chat and completions
    for body in bodies:
        kind = ChatCompletionRequest if "messages" in body else CompletionRequest
        req = to_generate_request(kind.model_validate(body), "readme")
        assert req.sampling.HasField("max_tokens")


def test_readme_grpcurl_payloads_parse():
    payloads = _payloads()[0]
    assert len(payloads) >= 2
    for payload in payloads:
        req = json_format.Parse(payload, pdserve_pb2.GenerateRequest())
        assert req.WhichOneof("prompt") in ("text", "token_ids")
        assert req.sampling.HasField("max_tokens")
