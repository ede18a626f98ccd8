"""deploy/ray: the cluster launcher config validates against Ray's own schema, and every
`pdserve serve` command in the deployment docs is accepted by the CLI."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "deploy" / "ray" / "cluster.yaml"
DOCS = [ROOT / "deploy" / "ray" / "README.md", ROOT / "docs" / "deploy.md"]


def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_matches_rays_schema():
    jsonschema = pytest.importorskip("jsonschema")
    spec = importlib.util.find_spec("ray")
    if spec is None or spec.origin is None:
        pytest.skip("ray not installed")
    schema_path = Path(spec.origin).parent / "autoscaler" / "ray-schema.json"
    jsonschema.validate(config(), json.loads(schema_path.read_text()))


def test_node_types():
    cfg = config()
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    for pool in ("prefill", "decode"):
        (name,) = [n for n, t in types.items() if t.get("labels", {}).get("pool") == pool]
        node = types[name]
        assert node["resources"][pool] == 1 and node["resources"]["GPU"] >= 1
        assert node["min_workers"] == node["max_workers"] >= 1
    assert cfg["max_workers"] >= sum(t.get("max_workers", 0) for n, t in types.items()
                                     if n != cfg["head_node_type"])


def test_start_commands():
    cfg = config()
    head = " ".join(cfg["head_start_ray_commands"])
    assert "ray start --head" in head and "--metrics-export-port" in head
    assert "--num-cpus=0" in head
    worker = " ".join(cfg["worker_start_ray_commands"])
    assert "--address=$RAY_HEAD_IP:6379" in worker
    for cmd in (head, worker):
        assert "RAY_AUTH_MODE=token" in cmd  # token authentication stays on
    assert "~/.ray/auth_token" in cfg["file_mounts"]
    assert any("pip install" in c and "ray[default]==2.60.0" in c for c in cfg["setup_commands"])


def serve_commands(markdown: str) -> list[list[str]]:
    out = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", markdown, re.S):
        for m in re.finditer(r"pdserve serve\b((?:[^\n\\]|\\\n)*)", block):
            out.append(["serve", *shlex.split(m.group(1).replace("\\\n", " "))])
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_documented_serve_commands_parse(doc):
    cli = pytest.importorskip("pdserve.cluster.cli.main")
    commands = serve_commands(doc.read_text())
    assert commands, f"no pdserve serve command in {doc}"
    for argv in commands:
        args = cli.build_parser().parse_args(argv)
        assert args.command == "serve"
