"""The checked-in generated code matches pdserve.proto, and the API has the agreed shape."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from pdserve.protos import pdserve_pb2, pdserve_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[2]
GEN_SCRIPT = REPO_ROOT / "scripts" / "gen_protos.py"


def _load_gen_script():
    spec = importlib.util.spec_from_file_location("gen_protos", GEN_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_current():
    pytest.importorskip("grpc_tools")
    problems = _load_gen_script().check()
    assert problems == [], "run scripts/gen_protos.py:\n" + "\n".join(problems)


def test_check_detects_stale_files(tmp_path):
    pytest.importorskip("grpc_tools")
    gen = _load_gen_script()
    (tmp_path / "pdserve.proto").write_text(
        (REPO_ROOT / "protos" / "pdserve.proto").read_text(encoding="utf-8"), encoding="utf-8"
    )
    assert any("missing" in p for p in gen.check(tmp_path))
    gen.write(tmp_path)
    assert gen.check(tmp_path) == []
    stale = tmp_path / "pdserve_pb2.py"
    stale.write_text(stale.read_text(encoding="utf-8") + "# edited\n", encoding="utf-8")
    problems = gen.check(tmp_path)
    assert len(problems) == 1 and problems[0].startswith("pdserve_pb2.py: stale")


def test_check_cli_exit_code():
    pytest.importorskip("grpc_tools")
    result = subprocess.run(
        [sys.executable, str(GEN_SCRIPT), "--check"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_modules_use_package_imports():
    text = (REPO_ROOT / "protos" / "pdserve_pb2_grpc.py").read_text(encoding="utf-8")
    assert "from pdserve.protos import pdserve_pb2" in text
    assert pdserve_pb2.DESCRIPTOR.package == "pdserve.v1"


def test_request_round_trip():
    req = pdserve_pb2.GenerateRequest(
        request_id="req-1",
        chat=pdserve_pb2.ChatPrompt(
            messages=[pdserve_pb2.ChatMessage(role="user", content="héllo ✓")]
        ),
        sampling=pdserve_pb2.SamplingParams(temperature=0.5, top_k=40, seed=2**64 - 1),
        stop=pdserve_pb2.StopConditions(stop=["\n\n"], stop_token_ids=[2], ignore_eos=True),
        slo=pdserve_pb2.SloTargets(ttft_ms=250.0),
        add_special_tokens=False,
    )
    back = pdserve_pb2.GenerateRequest.FromString(req.SerializeToString())
    assert back == req
    assert back.WhichOneof("prompt") == "chat"
    assert back.chat.messages[0].content == "héllo ✓"
    assert back.sampling.seed == 2**64 - 1
    assert back.HasField("add_special_tokens") and back.add_special_tokens is False


def test_response_round_trip():
    resp = pdserve_pb2.GenerateResponse(
        request_id="r",
        token_ids=[5, 6],
        text="ab",
        logprobs=[
            pdserve_pb2.TokenLogprob(
                token_id=5, logprob=-0.5, top=[pdserve_pb2.TopLogprob(token_id=5, logprob=-0.5)]
            ),
            pdserve_pb2.TokenLogprob(token_id=6, logprob=-1.0),
        ],
        finish_reason=pdserve_pb2.FINISH_REASON_LENGTH,
        usage=pdserve_pb2.Usage(prompt_tokens=3, completion_tokens=2, ttft_ms=1.5, e2e_ms=9.0),
    )
    back = pdserve_pb2.GenerateResponse.FromString(resp.SerializeToString())
    assert back == resp
    assert back.finish_reason == pdserve_pb2.FinishReason.Value("FINISH_REASON_LENGTH")
    # Non-final chunks leave finish_reason at its zero value and usage unset.
    chunk = pdserve_pb2.GenerateResponse(token_ids=[1])
    assert chunk.finish_reason == pdserve_pb2.FINISH_REASON_UNSPECIFIED
    assert not chunk.HasField("usage")


def test_finish_reason_values():
    assert dict(pdserve_pb2.FinishReason.items()) == {
        "FINISH_REASON_UNSPECIFIED": 0,
        "FINISH_REASON_STOP": 1,
        "FINISH_REASON_LENGTH": 2,
        "FINISH_REASON_ABORT": 3,
    }


def test_optional_presence():
    sp = pdserve_pb2.SamplingParams()
    for name in ("temperature", "top_p", "top_k", "seed", "max_tokens", "logprobs"):
        assert not sp.HasField(name)
    # An explicit zero is distinguishable from unset, and survives the wire.
    sp.temperature = 0.0
    sp.logprobs = 0
    back = pdserve_pb2.SamplingParams.FromString(sp.SerializeToString())
    assert back.HasField("temperature") and back.temperature == 0.0
    assert back.HasField("logprobs") and back.logprobs == 0
    assert not back.HasField("top_p")
    back.ClearField("temperature")
    assert not back.HasField("temperature")

    slo = pdserve_pb2.SloTargets(tpot_ms=0.0)
    assert slo.HasField("tpot_ms") and not slo.HasField("ttft_ms")
    assert not pdserve_pb2.GenerateRequest().HasField("add_special_tokens")


def test_prompt_oneof_is_exclusive():
    req = pdserve_pb2.GenerateRequest(text="hi")
    assert req.WhichOneof("prompt") == "text"
    req.token_ids.ids.append(3)
    assert req.WhichOneof("prompt") == "token_ids"
    assert not req.HasField("text")
    assert pdserve_pb2.GenerateRequest().WhichOneof("prompt") is None


def test_service_descriptor():
    service = pdserve_pb2.DESCRIPTOR.services_by_name["Generation"]
    assert service.full_name == "pdserve.v1.Generation"
    assert [m.name for m in service.methods] == ["Generate"]
    method = service.methods_by_name["Generate"]
    assert method.input_type.full_name == "pdserve.v1.GenerateRequest"
    assert method.output_type.full_name == "pdserve.v1.GenerateResponse"
    assert method.server_streaming and not method.client_streaming
    assert hasattr(pdserve_pb2_grpc, "GenerationStub")
    assert hasattr(pdserve_pb2_grpc, "GenerationServicer")
    assert hasattr(pdserve_pb2_grpc, "add_GenerationServicer_to_server")
