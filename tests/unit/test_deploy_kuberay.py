"""The KubeRay manifests in deploy/kuberay: valid YAML with the fields KubeRay and
Kubernetes require, and consistent with each other and with `pdserve serve`.

The RayCluster is also checked against KubeRay itself:
- its CRD schema, from a pinned copy in tests/unit/data/kuberay (see the README there),
  validated strictly: a field the schema does not know is an error here, where the API
  server would silently prune it (CEL rules, `x-kubernetes-validations`, are not run);
- the way KubeRay reads `rayStartParams.resources` (`getResourcesMap` in
  ray-operator/controllers/ray/common/pod.go) and then pastes it into the `ray start`
  bash command line;
- the minimum KubeRay version the manifest's header states.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = ROOT / "deploy" / "kuberay"
RAYCLUSTER_YAML = KUBERAY / "pdserve-raycluster.yaml"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
RAY_VERSION = "2.60.0"
# The oldest KubeRay whose RayCluster CRD has every field the manifest uses
# (`authOptions.secretName`: 1.5.x rejects it, 1.5.0 rejects `authOptions`).
KUBERAY_MIN = (1, 6)


def documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


def of_kind(kind: str) -> list[dict]:
    return [d for _, d in documents() if d["kind"] == kind]


def raycluster() -> dict:
    (cluster,) = of_kind("RayCluster")
    return cluster


def service(name: str) -> dict:
    (svc,) = [s for s in of_kind("Service") if s["metadata"]["name"] == name]
    return svc


def head_containers() -> dict[str, dict]:
    spec = raycluster()["spec"]["headGroupSpec"]["template"]["spec"]
    return {c["name"]: c for c in spec["containers"]}


def serve_argv(text: str) -> list[list[str]]:
    """The arguments of every `pdserve serve` command in a shell snippet."""
    out = []
    for m in re.finditer(r"pdserve serve\b((?:[^\n\\]|\\\n)*)", text):
        out.append(["serve", *shlex.split(m.group(1).replace("\\\n", " "))])
    return out


def router_command() -> str:
    return "\n".join(head_containers()["pdserve-router"]["args"])


def test_every_manifest_parses_with_kind_and_name():
    docs = documents()
    assert docs
    for name, doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), name
        assert doc["metadata"]["name"], name


def test_raycluster_header():
    cluster = raycluster()
    assert cluster["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    assert spec["rayVersion"] == RAY_VERSION
    assert spec["authOptions"]["mode"] == "token"  # Ray token auth stays on


def _check_ray_start_params(params):
    assert isinstance(params, dict)
    for key, value in params.items():
        assert isinstance(key, str) and isinstance(value, str), (key, value)


def test_head_group():
    head = raycluster()["spec"]["headGroupSpec"]
    _check_ray_start_params(head["rayStartParams"])
    assert head["rayStartParams"]["num-cpus"] == "0"
    first = head["template"]["spec"]["containers"][0]
    assert first["name"] and first["image"]
    ports = {p["containerPort"] for c in head["template"]["spec"]["containers"]
             for p in c.get("ports", [])}
    assert {6379, 8265, 50051, 9400} <= ports
    names = [p["name"] for c in head["template"]["spec"]["containers"] for p in c.get("ports", [])]
    assert len(names) == len(set(names)) and all(len(n) <= 15 for n in names)


def test_worker_groups():
    groups = raycluster()["spec"]["workerGroupSpecs"]
    assert {g["groupName"] for g in groups} == {"prefill", "decode"}
    for g in groups:
        for key in ("replicas", "minReplicas", "maxReplicas"):
            assert isinstance(g[key], int), (g["groupName"], key)
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        _check_ray_start_params(g["rayStartParams"])
        # Each pool's nodes carry one unit of the resource named after the pool.
        assert group_custom_resources(g) == {g["groupName"]: 1}, g["groupName"]
        assert g["labels"]["pool"] == g["groupName"]
        spec = g["template"]["spec"]
        assert spec["containers"][0]["name"] and spec["containers"][0]["image"]
        limits = spec["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "1" and limits["cpu"] and limits["memory"]
        assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])


def test_every_container_has_resources_and_one_image():
    cluster = raycluster()["spec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"],
            *(g["template"]["spec"] for g in cluster["workerGroupSpecs"])]
    images = set()
    for pod in pods:
        volumes = {v["name"] for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            assert c["resources"]["limits"], c["name"]
            images.add(c["image"])
            for mount in c.get("volumeMounts", []):
                assert mount["name"] in volumes, (c["name"], mount["name"])
    assert len(images) == 1, images
    dockerfile = (KUBERAY / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{RAY_VERSION}" in dockerfile


def test_router_container_runs_pdserve_serve():
    (argv,) = serve_argv(router_command())
    for flag in ("--address", "--host", "--metrics-host", "--kv-backend", "--kv-bind-host"):
        assert flag in argv, flag
    value = dict(zip(argv, argv[1:], strict=False))
    assert value["--address"] == "auto"
    assert value["--host"] == "0.0.0.0" and value["--metrics-host"] == "0.0.0.0"
    assert value["--port"] == "50051" and value["--metrics-port"] == "9400"
    assert value["--kv-backend"] == "tcp" and value["--kv-bind-host"] == "auto"
    # One GPU per worker pod: the pool sizes match the worker groups.
    replicas = {g["groupName"]: g["replicas"] for g in raycluster()["spec"]["workerGroupSpecs"]}
    assert int(value["--prefill"]) == replicas["prefill"]
    assert int(value["--decode"]) == replicas["decode"]


def test_router_command_is_accepted_by_the_cli():
    cli = pytest.importorskip("pdserve.cluster.cli.main")
    for argv in serve_argv(router_command()):
        args = cli.build_parser().parse_args(argv)
        assert args.command == "serve"


def test_router_probes_and_auth():
    router = head_containers()["pdserve-router"]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert router[probe]["grpc"]["port"] == 50051, probe
    env = {e["name"]: e for e in router["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    secret = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert secret["name"] == raycluster()["spec"]["authOptions"]["secretName"]
    mounts = {m["mountPath"] for m in router["volumeMounts"]}
    assert "/tmp/ray" in mounts  # `--address auto` finds the head through /tmp/ray
    head_mounts = {m["mountPath"]: m["name"] for m in head_containers()["ray-head"]["volumeMounts"]}
    assert head_mounts["/tmp/ray"] == next(m["name"] for m in router["volumeMounts"]
                                           if m["mountPath"] == "/tmp/ray")


def _selects_head(svc: dict) -> None:
    selector = svc["spec"]["selector"]
    assert selector["ray.io/cluster"] == raycluster()["metadata"]["name"]
    assert selector["ray.io/node-type"] == "head"


def test_services():
    grpc = service("pdserve-grpc")
    _selects_head(grpc)
    assert [p["port"] for p in grpc["spec"]["ports"]] == [50051]
    metrics = service("pdserve-metrics")
    _selects_head(metrics)
    assert [p["port"] for p in metrics["spec"]["ports"]] == [9400]
    for svc in of_kind("Service"):
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] == port["port"]


def test_servicemonitor_selects_the_metrics_service():
    (monitor,) = of_kind("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    metrics = service("pdserve-metrics")
    labels = metrics["metadata"]["labels"]
    for key, value in monitor["spec"]["selector"]["matchLabels"].items():
        assert labels.get(key) == value, key
    # No other Service matches (the gRPC Service must not be scraped).
    others = [s for s in of_kind("Service") if s["metadata"]["name"] != "pdserve-metrics" and all(
        s["metadata"]["labels"].get(k) == v
        for k, v in monitor["spec"]["selector"]["matchLabels"].items())]
    assert not others
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in metrics["spec"]["ports"]}
    assert endpoint.get("path", "/metrics") == "/metrics"
    # The alert rules match up{job="pdserve"}: the job name comes from this label.
    assert labels[monitor["spec"]["jobLabel"]] == "pdserve"


def test_prometheusrule_present():
    (rule,) = of_kind("PrometheusRule")
    assert rule["spec"]["groups"]


# --- rayStartParams.resources, as KubeRay and bash read it ------------------------------

# The worker groups' value before it was fixed (deploy/kuberay/pdserve-raycluster.yaml):
# bash turns it into {"prefill": 1}, but KubeRay's own parser fails on it, logs an error
# and then skips adding --num-gpus from the container's nvidia.com/gpu limit.
OLD_WORKER_RESOURCES_YAML = r"""resources: '"{\"prefill\": 1}"'"""


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON (Go's encoding/json rejects it)")


def kuberay_resources_map(value: str) -> dict[str, float]:
    """KubeRay's getResourcesMap: strings.Trim(value, "'\"` ") then json.Unmarshal into a
    map[string]float64. Raises ValueError where KubeRay logs "failed to get resources map
    from rayStartParams" (and adds no --num-gpus). Stricter on one point: a JSON null,
    which Go reads as an empty map, is refused here too."""
    text = value.strip("'\"` ")
    try:
        parsed = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise ValueError(f"KubeRay cannot unmarshal resources {value!r}: {e}") from None
    if not isinstance(parsed, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in parsed.values()):
        raise ValueError(f"resources {value!r} is not a JSON object of numbers")
    return parsed


def ray_start_resources(value: str) -> dict:
    """What `ray start` receives: KubeRay writes ` --resources=<value> ` unquoted into the
    container's bash command line, so bash splits and unquotes it; Ray json-loads it."""
    words = shlex.split(f"--resources={value}")
    if len(words) != 1:
        raise ValueError(f"bash splits --resources={value} into {len(words)} words")
    try:
        return json.loads(words[0].split("=", 1)[1])
    except json.JSONDecodeError as e:
        raise ValueError(f"ray start gets --resources={words[0]!r}: {e}") from None


def check_ray_start_resources(value: str) -> dict[str, float]:
    """Both readers must agree: KubeRay (for --num-gpus and accelerators) and Ray."""
    if not isinstance(value, str):
        raise ValueError(f"rayStartParams values are strings, got {value!r}")
    kuberay = kuberay_resources_map(value)
    ray = ray_start_resources(value)
    if kuberay != ray:
        raise ValueError(f"KubeRay reads {kuberay}, ray start gets {ray}")
    return kuberay


def group_custom_resources(group: dict) -> dict:
    """A group's Ray custom resources: the group-level `resources` field, or
    rayStartParams.resources checked as KubeRay and bash read it (not both)."""
    params = group.get("rayStartParams", {})
    if "resources" in group:
        assert "resources" not in params, "set resources in one place, not both"
        return {k: float(v) for k, v in group["resources"].items()}
    if "resources" not in params:
        return {}
    return check_ray_start_resources(params["resources"])


def check_worker_resources(cluster: dict) -> None:
    for g in cluster["spec"].get("workerGroupSpecs", []):
        group_custom_resources(g)


@pytest.mark.parametrize("value, expected", [
    ("'{\"prefill\": 1}'", {"prefill": 1}),        # the form KubeRay itself writes
    ("'{\"a\": 1, \"b\": 0.5}'", {"a": 1, "b": 0.5}),
    ('{"prefill":1}', None),                        # bash strips the bare quotes
    ('{"prefill": 1}', None),                       # ... and splits on the space
    ("'{\"prefill\": true}'", None),                # not a number
    ("'{\"prefill\": NaN}'", None),
    ("'[1]'", None),
])
def test_resources_string_forms(value, expected):
    if expected is None:
        with pytest.raises(ValueError):
            check_ray_start_resources(value)
    else:
        assert check_ray_start_resources(value) == expected


def test_old_resources_string_is_rejected():
    (value,) = yaml.safe_load(OLD_WORKER_RESOURCES_YAML).values()
    assert value == '"{\\"prefill\\": 1}"'
    assert ray_start_resources(value) == {"prefill": 1}  # bash and Ray were fine ...
    with pytest.raises(ValueError, match="KubeRay cannot unmarshal"):
        kuberay_resources_map(value)  # ... KubeRay's getResourcesMap was not
    # The manifest check catches it: the RayCluster with the old string fails.
    cluster = copy.deepcopy(raycluster())
    for g in cluster["spec"]["workerGroupSpecs"]:
        g["rayStartParams"]["resources"] = value.replace("prefill", g["groupName"])
    with pytest.raises(ValueError):
        check_worker_resources(cluster)
    check_worker_resources(raycluster())  # and the manifest as it is passes


# --- the minimum KubeRay version --------------------------------------------------------

def header_kuberay_min() -> tuple[int, int]:
    first = RAYCLUSTER_YAML.read_text().splitlines()[0]
    m = re.search(r"KubeRay \(>= (\d+)\.(\d+)\b", first)
    assert m, f"no 'KubeRay (>= X.Y' in the header: {first!r}"
    return int(m.group(1)), int(m.group(2))


def test_header_states_the_minimum_kuberay_version():
    assert header_kuberay_min() == KUBERAY_MIN
    major, minor = KUBERAY_MIN
    assert f"KubeRay >= {major}.{minor} " in DEPLOY_DOC.read_text()
    spec = raycluster()["spec"]
    assert spec["authOptions"]["secretName"]  # the field that needs KubeRay 1.6


# --- KubeRay's CRD schema -----------------------------------------------------------------

def strict_schema(node):
    """A copy of a CRD structural schema for jsonschema: objects with `properties` reject
    unknown fields (the API server prunes them) unless the schema keeps unknown fields
    (`x-kubernetes-preserve-unknown-fields`) or says what they may be
    (`additionalProperties`); `x-kubernetes-int-or-string` allows an integer or a string."""
    if isinstance(node, list):
        return [strict_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = dict(node)
    if "properties" in out:
        out["properties"] = {k: strict_schema(v) for k, v in out["properties"].items()}
        if "additionalProperties" not in out and not out.get(
                "x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = strict_schema(out["additionalProperties"])
    for key in ("items", "not"):
        if isinstance(out.get(key), dict):
            out[key] = strict_schema(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = strict_schema(out[key])
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    return out


def schema_errors(doc: dict, schema: dict) -> list[str]:
    validator = jsonschema.Draft4Validator(strict_schema(schema))
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
                  for e in validator.iter_errors(doc))


def test_strict_schema_rejects_unknown_fields_and_allows_int_or_string():
    # A CRD-style schema (made up for this test): the rules strict_schema applies.
    schema = {"type": "object", "properties": {
        "spec": {"type": "object", "properties": {
            "port": {"anyOf": [{"type": "integer"}, {"type": "string"}],
                     "x-kubernetes-int-or-string": True},
            "target": {"x-kubernetes-int-or-string": True},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                     "properties": {"known": {"type": "string"}}},
            "list": {"type": "array", "items": {"type": "object",
                                                "properties": {"name": {"type": "string"}}}},
        }}}}
    good = {"spec": {"port": 80, "target": "http", "labels": {"a": "b"},
                     "free": {"known": "x", "other": 1}, "list": [{"name": "n"}]}}
    assert schema_errors(good, schema) == []
    assert schema_errors({"spec": {"port": "http", "target": 8080}}, schema) == []
    for bad in ({"spec": {"typo": 1}}, {"spec": {"list": [{"name": "n", "typo": 1}]}},
                {"spec": {"labels": {"a": 1}}}, {"spec": {"port": 1.5}}, {"extra": {}}):
        assert schema_errors(bad, schema), bad
