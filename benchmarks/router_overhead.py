"""Time the router and the prefill->decode handoff add to each request, at low load.

Sends requests one at a time (no queueing) to a running 1-prefill, 1-decode cluster
and, for each, takes the client-side time to first token minus the prefill worker's
own compute time for that request (``Usage.prefill_ms``, first chunk scheduled ->
first token sampled). What remains is the cost of the path itself: the front door in
and out, validation and tokenization, the decode reservation, dispatch to the prefill
worker, its queueing, the wait for the KV transfer, and Ray's actor calls. The server
reports its hops to the first token (``router/hops.py``) with each request's usage; the
report gives percentiles of the overhead and of every hop, client side included.

    python benchmarks/router_overhead.py                 # Ray cluster, shm transfer
    python benchmarks/router_overhead.py --no-ray        # same workers in one process
    python benchmarks/router_overhead.py --kv-backend tcp --requests 200
    python benchmarks/router_overhead.py --ab main --rounds 2   # main's code vs this one

``--ab REV [REV...]`` measures each revision's serving code (``code_at.py``) and this
checkout's, alternating whole runs (in that order) ``--rounds`` times, each in a fresh
process and cluster, and writes one side-by-side table
(``router_overhead_ab_<mode>_<backend>``). Run
anything that starts Ray under the shared lock: ``flock /tmp/pdserve-ray.lock python ...``.

A front door is a ``Probe`` (``router_overhead_probe.py``). ``--protocol`` picks them
(default ``grpc,http``): several are measured in one run on one cluster, taking turns
request by request with the same prompts, and reported side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pdserve.benchmarks.router_overhead_probe import GrpcProbe, HttpProbe, Probe, Sample
from pdserve.benchmarks.router_overhead_report import (
    from_columns,
    markdown,
    markdown_ab,
    rows,
    summarize,
    to_columns,
)
from pdserve.cluster.cli.progress import bar

# protocol -> probe factory, given the cluster that is up (``LocalCluster`` or ``Cluster``)
PROBES = {"grpc": lambda cluster: GrpcProbe(cluster.address),
          "http": lambda cluster: HttpProbe(_http_address(cluster))}


def _http_address(cluster) -> str:
    address = getattr(cluster, "http_address", None) or cluster.server.http_address
    if not address:
        raise RuntimeError("the router serves no HTTP endpoint")
    return address


def protocols(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = sorted(set(names) - set(PROBES))
    if not names or unknown or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"--protocol: a comma-separated list of distinct {sorted(PROBES)}, got {text!r}")
    return names


def run(probes: dict[str, Probe], n: int, prompt_len: int, seed: int,
        what: str) -> dict[str, list[Sample]]:
    """``n`` requests per front door, taking turns request by request, so the front doors
    see the same host noise. Every request has its own random prompt of the same length
    (one prompt sent twice would be a prefix-cache hit the second time)."""
    rng = random.Random(seed)
    out: dict[str, list[Sample]] = {name: [] for name in probes}
    for _ in bar(range(n), desc=f"router_overhead {what}", unit="req"):
        for name, probe in probes.items():
            prompt = [rng.randrange(3, 900) for _ in range(prompt_len)]
            out[name].append(probe.send(prompt, max_tokens=2))
    return out


def start_cluster(args, model: str):
    """(cluster, stop, mode) for the arguments."""
    from pdserve.engine.config import EngineConfig
    from pdserve.kv_transfer.backend_config import KVTransferConfig
    from pdserve.router.config import RouterConfig
    from pdserve.router.server import ServerConfig

    engine = EngineConfig(model=model, device="cpu", num_kv_blocks=1024, max_num_seqs=16)
    kv = KVTransferConfig(backend=args.kv_backend)
    router = RouterConfig(model=model, server=ServerConfig(
        port=0, metrics_port=0, http_port=0 if "http" in args.protocol else None))
    if args.no_ray:
        from pdserve.cluster.launch.local import LocalCluster

        ctx = LocalCluster(engine, kv=kv, router=router)
        return ctx.__enter__(), lambda: ctx.__exit__(None, None, None), "in-process"
    from pdserve.cluster.launch.launcher import ClusterSpec, PoolSpec, launch

    cluster = launch(ClusterSpec(engine=engine, prefill=PoolSpec(1), decode=PoolSpec(1), kv=kv,
                                 router=router))
    return cluster, cluster.shutdown, "ray"


def measure(args) -> dict:
    import torch

    import pdserve.router
    from pdserve.engine.demo_model import create_demo_model

    model = args.model or str(create_demo_model())
    cluster, stop, mode = start_cluster(args, model)
    probes: dict[str, Probe] = {}
    try:
        for name in args.protocol:
            probes[name] = PROBES[name](cluster)
        run(probes, args.warmup, args.prompt_len, seed=1, what=f"{args.label} warm-up")
        samples = run(probes, args.requests, args.prompt_len, seed=2, what=args.label)
    finally:
        for probe in probes.values():
            probe.close()
        stop()
    head = {
        "benchmark": "router_overhead", "mode": mode, "kv_backend": args.kv_backend,
        "label": args.label, "model": model,
        "prompt_len": args.prompt_len, "requests": args.requests,
        "code": str(Path(pdserve.router.__file__).parent),  # which tree served (A/B runs)
        "host": {"platform": platform.platform(), "python": platform.python_version(),
                 "torch": torch.__version__, "cpus": torch.get_num_threads()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if len(samples) == 1:  # one front door: the flat layout the A/B runs read back
        (name, only), = samples.items()
        return {**head, "protocol": name, **summarize(rows(only)),
                "requests_ms": to_columns(rows(only))}
    return {**head, "protocol": ",".join(samples), "protocols": {
        name: {**summarize(rows(s)), "requests_ms": to_columns(rows(s))}
        for name, s in samples.items()}}


def stem(mode: str, args) -> str:
    proto = "" if args.protocol == ["grpc"] else "_" + "_".join(args.protocol)
    return f"{mode.replace('-', '_')}_{args.kv_backend}{proto}"


def title(mode: str, args, what: str) -> str:
    return (f"{what} ({mode}, {args.kv_backend}, {' vs '.join(args.protocol)}, prompt "
            f"{args.prompt_len} tokens, {args.requests} sequential requests"
            f"{' per front door, taking turns' if len(args.protocol) > 1 else ''})")


def child_args(args) -> list[str]:
    """The arguments of one measured run of ``--ab``: this run's, without ``--ab``."""
    out = ["--requests", str(args.requests), "--warmup", str(args.warmup),
           "--prompt-len", str(args.prompt_len), "--kv-backend", args.kv_backend,
           "--protocol", ",".join(args.protocol)]
    if args.model:
        out += ["--model", args.model]
    return out + (["--no-ray"] if args.no_ray else [])


def ab(args) -> dict:
    """Alternate whole runs of the revisions ``args.ab`` and of this checkout."""
    from pdserve.benchmarks.code_at import export_revision, revision_name

    with tempfile.TemporaryDirectory(prefix="pdserve-ab-") as tmp:
        trees: dict[str, Path | None] = {}
        for i, rev in enumerate(args.ab):
            short = revision_name(rev)
            label = short if rev.startswith(short) else f"{rev}@{short}"
            trees[label] = export_revision(rev, Path(tmp) / f"code{i}")
        trees["this"] = None
        results: dict[str, list[dict]] = {label: [] for label in trees}
        for r in range(args.rounds):
            for i, (label, tree) in enumerate(trees.items()):
                env = dict(os.environ)
                if tree is not None:
                    env["PYTHONPATH"] = os.pathsep.join(
                        p for p in (str(tree), env.get("PYTHONPATH")) if p)
                out = Path(tmp) / f"round{r}-{i}.json"
                # (not from the repository root: Ray puts the driver's working directory
                # on its workers' sys.path, and the root's pdserve/ would shadow the tree)
                subprocess.run([sys.executable, __file__, *child_args(args), "--label", label,
                                "--json-to", str(out)], env=env, cwd=tmp, check=True)
                results[label].append(json.loads(out.read_text()))
    merged = {}
    for label, runs in results.items():
        table = [row for run_ in runs for row in from_columns(run_["requests_ms"])]
        merged[label] = {"runs": [{k: v for k, v in run_.items() if k != "requests_ms"}
                                  for run_ in runs], **summarize(table),
                         "requests_ms": to_columns(table)}
    return {"benchmark": "router_overhead_ab", "mode": results["this"][0]["mode"],
            "kv_backend": args.kv_backend, "protocol": args.protocol[0], "rounds": args.rounds,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "labels": merged}


def _dumps(result: dict) -> str:
    """Indented JSON, except each request's row on one line."""
    text = json.dumps(result, indent=1)
    return re.sub(r"\[\n\s+([^\[\]{}]*?)\n\s+\]",
                  lambda m: "[" + re.sub(r",\n\s+", ", ", m.group(1)) + "]", text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="local HF checkpoint (default: demo model)")
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--kv-backend", default="shm", choices=["shm", "tcp"])
    ap.add_argument("--protocol", type=protocols, default=None,
                    help="front doors, comma-separated, measured side by side "
                         f"(of {sorted(PROBES)}; default grpc,http, and grpc with --ab)")
    ap.add_argument("--no-ray", action="store_true", help="run the workers in this process")
    ap.add_argument("--ab", metavar="REV", nargs="+", default=None,
                    help="also measure these git revisions' serving code, alternating runs")
    ap.add_argument("--rounds", type=int, default=2, help="--ab: runs of each revision")
    ap.add_argument("--label", default="this", help="names this run in the results")
    ap.add_argument("--json-to", default=None, help=argparse.SUPPRESS)  # --ab's child runs
    ap.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    args.protocol = args.protocol or (["grpc"] if args.ab else ["grpc", "http"])
    if args.ab and len(args.protocol) > 1:
        ap.error("--ab compares revisions through one front door: give one --protocol")

    if args.ab:
        result = ab(args)
        name = f"router_overhead_ab_{stem(result['mode'], args)}"
        lines = markdown_ab(title(result["mode"], args, "Router overhead A/B, "
                                  f"{args.rounds} alternating runs each"),
                            {k: v for k, v in result["labels"].items()})
    else:
        result = measure(args)
        if args.json_to:
            Path(args.json_to).write_text(json.dumps(result))
            return 0
        name = f"router_overhead_{stem(result['mode'], args)}"
        what = "Router + handoff overhead"
        lines = (markdown(title(result["mode"], args, what), result)
                 if "protocols" not in result else
                 markdown_ab(title(result["mode"], args, what), result["protocols"]))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(_dumps(result))
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
