"""``pdserve serve``: start (or join) a Ray cluster and serve the gRPC endpoint until Ctrl-C.

The pools come from ``--prefill``/``--decode`` (or ``--colocated``), or exactly from a
plan written by ``pdserve plan`` (``--plan``); SIGINT or SIGTERM shuts everything down.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

from pdserve.cluster.cli.autoscale_args import add_autoscale_args, autoscale_config
from pdserve.cluster.cli.common import add_gpu_engine_args, gpu_engine_kwargs, resolve_model


def _cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from pdserve.cluster.launch.launcher import ClusterSpec, PoolSpec, launch
    from pdserve.engine.config import EngineConfig
    from pdserve.engine.metrics import model_label
    from pdserve.kv_transfer.backend_config import KVTransferConfig
    from pdserve.router.auth import load_tokens
    from pdserve.router.config import RouterConfig
    from pdserve.router.local_prefill import LocalPrefillConfig
    from pdserve.router.server import ServerConfig
    from pdserve.router.slo import SloConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # Checked before anything starts (main prints a ValueError as one line).
    if args.placement_timeout < 0 or args.ready_timeout <= 0:
        raise ValueError("--placement-timeout must be >= 0 and --ready-timeout > 0")
    server = ServerConfig(
        host=args.host, port=args.port, http_port=args.http_port or None,
        metrics_host=args.metrics_host,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        tls_cert_file=args.tls_cert, tls_key_file=args.tls_key,
        tls_client_ca_file=args.tls_client_ca,
        auth_tokens=load_tokens(args.auth_token_file))  # and $PDSERVE_AUTH_TOKENS
    # Resolved once, here: the secret file or $PDSERVE_KV_SECRET, else (tcp) a fresh one.
    kv = KVTransferConfig(backend=args.kv_backend, bind_host=args.kv_bind_host,
                          secret_file=args.kv_secret_file,
                          checksum=args.kv_checksum).with_cluster_secret()
    model = resolve_model(args.model)
    engine = EngineConfig(model=model, device=args.device, dtype=args.dtype,
                          max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                          **gpu_engine_kwargs(args))
    gpus = worker_gpus(args.device, args.gpus_per_worker, args.address)
    slo = SloConfig(ttft_s=args.slo_ttft, tpot_s=args.slo_tpot, attainment=args.attainment)
    autoscale = autoscale_config(args, slo)
    spec = ClusterSpec(
        engine=engine,
        colocated=PoolSpec(count=args.prefill + args.decode, num_cpus=args.worker_cpus,
                           num_gpus=gpus) if args.colocated else None,
        prefill=PoolSpec(count=args.prefill, num_cpus=args.worker_cpus, num_gpus=gpus,
                         resources=((args.prefill_resource, 1.0),) if args.prefill_resource else (),
                         tp=args.prefill_tp),
        decode=PoolSpec(count=args.decode, num_cpus=args.worker_cpus, num_gpus=gpus,
                        resources=((args.decode_resource, 1.0),) if args.decode_resource else (),
                        tp=args.decode_tp),
        kv=kv,
        router=RouterConfig(model=model, server=server, served_model_name=args.served_model_name,
                            policy=args.policy,
                            max_model_len=args.max_model_len, slo=slo,
                            admission=args.admission, profile=args.profile,
                            prefill_channel=args.prefill_channel,
                            kv_aware_routing=args.kv_aware_routing,
                            local_prefill=LocalPrefillConfig(
                                max_local_tokens=args.local_prefill_tokens,
                                wait_factor=args.local_prefill_wait_factor),
                            decode_tp=args.decode_tp),
        autoscale=autoscale,
    )
    what = (f"{args.prefill + args.decode} colocated workers" if args.colocated
            else f"{args.prefill} prefill (tp {args.prefill_tp}) + {args.decode} decode "
                 f"(tp {args.decode_tp}) workers")
    if args.plan:
        from pdserve.cluster.launch.plan_launcher import launch_plan
        from pdserve.cluster.planning.plan import Plan

        plan = Plan.load(args.plan)
        print(f"pdserve: launching plan {args.plan} ({plan.mode}, {plan.affinity} affinity, "
              f"{plan.num_gpus} GPUs) on {model}", file=sys.stderr)
        cluster = launch_plan(plan, engine, spec.kv, spec.router_config(), address=args.address,
                              cpus_per_bundle=args.worker_cpus,
                              placement_timeout_s=args.placement_timeout,
                              ready_timeout_s=args.ready_timeout)
    else:
        print(f"pdserve: starting {what} on {model}", file=sys.stderr)
        cluster = launch(spec, address=args.address, placement_timeout_s=args.placement_timeout,
                         ready_timeout_s=args.ready_timeout)
    modes, flags = security_summary(server)
    print(f"pdserve: gRPC endpoint listening on {cluster.address} ({modes}; service "
          f"pdserve.v1.Generation; try: pdserve generate --address {cluster.address}{flags} "
          "\"Hello\")", flush=True)
    if cluster.http_address:
        scheme = "https" if server.tls else "http"
        model_name = args.served_model_name or model_label(model)
        print(f"pdserve: OpenAI-compatible HTTP API on {scheme}://{cluster.http_address}/v1 "
              f"(model {model_name!r}; /v1/completions, /v1/chat/completions, /v1/models, "
              "/health, /ready)", flush=True)
    if cluster.metrics_address:
        print(f"pdserve: Prometheus metrics (router + all workers) on "
              f"http://{cluster.metrics_address}/metrics", flush=True)
    wait_for_stop_signal()
    print("pdserve: shutting down", file=sys.stderr)
    cluster.shutdown()
    return 0


def wait_for_stop_signal(poll_s: float = 0.2) -> None:
    """Return once SIGINT or SIGTERM arrived. The handler only appends to a list: a handler
    that took a lock (``Event.set``) deadlocked when a second signal interrupted the first
    handler inside it (Ctrl-C twice, or a supervisor forwarding the signal it got)."""
    got: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: got.append(signum))
    while not got:
        time.sleep(poll_s)  # interrupted by the signal: the handler runs, the loop ends


def security_summary(server) -> tuple[str, str]:
    """How the endpoint is secured, and the client flags that match (for the banner)."""
    modes = ["TLS" if server.tls else "plaintext"]
    flags = " --tls-ca CA.pem" if server.tls else ""
    if server.mutual_tls:
        modes.append("mutual TLS")
        flags += " --tls-cert CLIENT.pem --tls-key CLIENT.key"
    if server.auth_tokens:
        modes.append("bearer tokens")
        flags += " --auth-token-file TOKEN"
    return ", ".join(modes), flags


def worker_gpus(device: str, gpus_per_worker: float | None, address: str | None) -> float:
    """GPUs each worker actor asks Ray for. The device itself is resolved by each worker on
    its own node, so a head node without a GPU can launch GPU workers.

    With ``device="auto"`` this must not start a local Ray: the launcher sizes that one for
    the workers it holds, and a Ray started here (sized to the machine) would stay as it is.
    So a local cluster, which is this machine, is asked through torch; a cluster being
    joined (``address``), or a Ray already running, through Ray."""
    if gpus_per_worker is not None:
        return gpus_per_worker
    if device == "cpu":
        return 0.0
    if device.startswith("cuda"):
        return 1.0
    import ray

    if address or ray.is_initialized():
        from pdserve.cluster.launch.launcher import init_ray  # auto: whatever the cluster has

        init_ray(address)
        return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    return 1.0 if local_gpu_count() > 0 else 0.0


def local_gpu_count() -> int:
    """CUDA devices this process can use (what a worker with device "auto" would pick)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _local_prefill_arg(field: str, parse):
    """An argparse type for one ``LocalPrefillConfig`` field: its own range check, reported
    by argparse against the flag that gave the value."""

    def check(text: str):
        from pdserve.router.local_prefill import LocalPrefillConfig

        try:
            value = parse(text)
            LocalPrefillConfig(**{field: value})
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return value

    check.__name__ = parse.__name__  # argparse names the type in its messages
    return check


def register(sub) -> None:
    from pdserve.cluster.launch.placement_check import (
        DEFAULT_PLACEMENT_TIMEOUT_S,
        DEFAULT_READY_TIMEOUT_S,
    )

    p = sub.add_parser("serve", help="start (or join) a Ray cluster and serve the gRPC endpoint")
    p.add_argument("--model", default=None, help="local Hugging Face checkpoint (default: demo)")
    p.add_argument("--prefill", type=int, default=1, help="prefill workers")
    p.add_argument("--decode", type=int, default=1, help="decode workers")
    p.add_argument("--prefill-tp", type=int, default=1,
                   help="tensor parallel ranks per prefill worker (one actor and device each)")
    p.add_argument("--decode-tp", type=int, default=1,
                   help="tensor parallel ranks per decode worker")
    p.add_argument("--address", default=None, help="join an existing Ray cluster (ray://... or auto)")
    p.add_argument("--host", default="127.0.0.1", help="gRPC and HTTP bind address")
    p.add_argument("--port", type=int, default=50051, help="gRPC port")
    p.add_argument("--http-port", type=int, default=8000,
                   help="OpenAI-compatible HTTP API port (0 turns it off)")
    p.add_argument("--served-model-name", default=None,
                   help="the model's name in the HTTP API (default: the checkpoint "
                        "directory's name)")
    p.add_argument("--metrics-host", default="127.0.0.1", help="metrics HTTP bind address")
    p.add_argument("--metrics-port", type=int, default=9400,
                   help="aggregated Prometheus endpoint port (-1 disables)")
    p.add_argument("--kv-backend", default="shm", choices=["shm", "tcp", "cuda_ipc"])
    p.add_argument("--kv-bind-host", default="127.0.0.1",
                   help="TCP KV receivers listen here ('auto': the node's Ray address)")
    p.add_argument("--kv-secret-file", default=None,
                   help="shared secret of the TCP KV backend (default: $PDSERVE_KV_SECRET, "
                        "else a random one per cluster)")
    p.add_argument("--kv-checksum", default="auto", choices=["auto", "full", "sample", "off"],
                   help="end-to-end KV check verified by decode before it admits a request "
                        "(auto: full on shm/tcp, sample on cuda_ipc; docs/architecture.md)")
    p.add_argument("--tls-cert", default=None, help="server certificate PEM: serve TLS only")
    p.add_argument("--tls-key", default=None, help="private key PEM of --tls-cert")
    p.add_argument("--tls-client-ca", default=None,
                   help="CA PEM for client certificates: require them (mutual TLS)")
    p.add_argument("--auth-token-file", default=None,
                   help="accepted bearer tokens, one per line (also: $PDSERVE_AUTH_TOKENS, "
                        "comma-separated); health checks need none")
    p.add_argument("--policy", default="least_loaded",
                   choices=["least_loaded", "slo_aware", "round_robin"])
    p.add_argument("--profile", default=None, help="latency profile JSON (for --policy slo_aware)")
    p.add_argument("--slo-ttft", type=float, default=1.0, help="TTFT target, seconds")
    p.add_argument("--slo-tpot", type=float, default=0.1, help="TPOT target, seconds")
    p.add_argument("--attainment", type=float, default=0.9, help="share that must meet both")
    p.add_argument("--admission", default="reject", choices=["reject", "best_effort"],
                   help="when the TTFT target cannot be met: answer RESOURCE_EXHAUSTED or serve")
    p.add_argument("--kv-aware-routing", action="store_true",
                   help="send a prompt to the prefill worker that probably holds its prefix "
                        "when that beats the load (scored with --policy's prediction)")
    p.add_argument("--local-prefill-tokens", type=_local_prefill_arg("max_local_tokens", int),
                   default=0, metavar="N",
                   help="conditional disaggregation: prefill on the decode worker a prompt "
                        "whose uncached part is at most N tokens (0: off; docs/placement.md)")
    p.add_argument("--local-prefill-wait-factor", metavar="F",
                   type=_local_prefill_arg("wait_factor", float), default=None,
                   help="also prefill on the decode worker (prompts up to 2048 tokens) when "
                        "the prefill pool's predicted TTFT exceeds F times the local prefill "
                        "time (F >= 1; needs --profile)")
    p.add_argument("--prefill-channel", default="direct", choices=["direct", "ray"],
                   help="the request path to prefill workers on the router's node: a Unix "
                        "socket (direct) or Ray actor calls")
    p.add_argument("--plan", default=None,
                   help="launch exactly this plan (pdserve plan) with Ray placement groups")
    p.add_argument("--colocated", action="store_true",
                   help="baseline: prefill+decode workers each doing both phases")
    add_autoscale_args(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=None)
    add_gpu_engine_args(p)
    p.add_argument("--worker-cpus", type=float, default=1.0, help="Ray CPUs per worker actor")
    p.add_argument("--gpus-per-worker", type=float, default=None,
                   help="Ray GPUs per worker (default: 1 when the cluster has GPUs, else 0)")
    p.add_argument("--prefill-resource", default=None,
                   help="custom Ray resource prefill workers require (e.g. 'prefill' on nodes "
                        "started with --resources='{\"prefill\": 8}')")
    p.add_argument("--decode-resource", default=None, help="likewise for decode workers")
    p.add_argument("--placement-timeout", type=float, default=DEFAULT_PLACEMENT_TIMEOUT_S,
                   metavar="SECONDS",
                   help="how long a Ray cluster that cannot hold the workers may take to grow "
                        "(nodes joining, autoscaling) before serve fails, naming the pool and "
                        "the missing resource (default %(default)g; a local Ray started by "
                        "serve is not waited for)")
    p.add_argument("--ready-timeout", type=float, default=DEFAULT_READY_TIMEOUT_S,
                   metavar="SECONDS",
                   help="most time for every worker to be placed and load the model "
                        "(default %(default)g)")
    p.set_defaults(func=_cmd_serve)
