"""The KubeRay manifests in deploy/kuberay: valid YAML with the fields KubeRay and
Kubernetes require, and consistent with each other and with `pdserve serve`."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = ROOT / "deploy" / "kuberay"
RAY_VERSION = "2.60.0"


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
        assert g["groupName"] in g["rayStartParams"]["resources"]
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
    cli = pytest.importorskip("pdserve.cluster.cli")
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
