"""The README's grpcurl payloads are valid ``GenerateRequest`` JSON for the checked-in proto."""

from __future__ import annotations

import re
from pathlib import Path

from google.protobuf import json_format

from pdserve.protos import pdserve_pb2

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_grpcurl_payloads_parse():
    payloads = re.findall(r"-d '(\{.*?\})'", README.read_text())
    assert len(payloads) >= 2
    for payload in payloads:
        req = json_format.Parse(payload, pdserve_pb2.GenerateRequest())
        assert req.WhichOneof("prompt") in ("text", "token_ids")
        assert req.sampling.HasField("max_tokens")
