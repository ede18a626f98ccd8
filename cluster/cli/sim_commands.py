"""``pdserve simulate`` and ``pdserve plan``: the simulator and the placement planner from the CLI.

``register(sub)`` adds both subcommands to the ``pdserve`` parser (``main`` calls
it). Handlers import the simulator lazily so ``pdserve --help`` stays instant; they
return an exit code and raise ``ValueError`` for bad input (the CLI prints it, exit 2).

Traces: a trace file (Azure or BurstGPT CSV, Mooncake JSONL, ShareGPT JSON; detected by
``load_trace``; ShareGPT's lengths come from ``--tokenizer`` and its arrivals are Poisson
at ``--trace-rate``), ``azure`` (the shared Azure conversation trace) or a synthetic spec
``poisson:RATE:N:PLO-PHI:OLO-OHI`` (``gamma:...:CV`` for bursty arrivals), lengths drawn
uniformly from the given ranges.

``simulate --dispatch`` picks the prefill routing (``kv_aware`` routes to the prefix
caches that ``--prefix-caching`` models, and implies it; only a trace with prefix hashes,
such as Mooncake JSONL or ``pdserve trace synth-prefix`` output, gets hits).

``plan`` replays the trace's own arrival times rescaled to each rate unless
``--arrivals poisson|gamma`` redraws them; it prints the claimed goodput, the long-window
check and the confidence figure, or, when nothing meets the SLO, why (docs/placement.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pdserve.cluster.cli.common import add_trace_file_args, load_trace_file
from pdserve.workloads.arrivals import ARRIVALS

DISTSERVE_PROFILE = "distserve-opt13b"
# SimConfig's dispatch policies (config.DISPATCH_POLICIES), listed here so that building
# the parser does not import the simulator.
DISPATCH_CHOICES = ("least_loaded", "round_robin", "slo_aware", "kv_aware")


def load_profile(spec: str):
    from pdserve.engine.latency_profile import LatencyProfile, distserve_opt13b_a100

    return distserve_opt13b_a100() if spec == DISTSERVE_PROFILE else LatencyProfile.load(spec)


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    a, b = int(lo), int(hi or lo)
    if not (1 <= a <= b):
        raise ValueError(f"bad length range {text!r} (want LO-HI, 1 <= LO <= HI)")
    return a, b


def load_trace_spec(spec: str, max_requests: int | None = None, *,
                    tokenizer: str | None = None, trace_rate: float = 1.0, seed: int = 0):
    """A trace from a file, ``azure``, or a ``poisson:``/``gamma:`` spec, optionally sliced
    to a representative window of ``max_requests`` (of a ShareGPT file, whose arrivals
    are drawn anyway, only the first ``max_requests`` conversations are read)."""
    from pdserve.cluster.planning.simulator import representative_slice
    from pdserve.workloads.synthetic import synthetic

    kind = spec.split(":", 1)[0]
    if kind in ("poisson", "gamma"):
        parts = spec.split(":")
        want = 5 if kind == "poisson" else 6
        if len(parts) != want:
            raise ValueError(f"bad trace spec {spec!r}: want {kind}:RATE:N:PLO-PHI:OLO-OHI"
                             + (":CV" if kind == "gamma" else ""))
        try:
            rate, n = float(parts[1]), int(parts[2])
            cv = float(parts[5]) if kind == "gamma" else 1.0
        except ValueError as exc:
            raise ValueError(f"bad trace spec {spec!r}: {exc}") from exc
        trace = synthetic(n, rate, _range(parts[3]), _range(parts[4]), cv=cv, seed=seed)
    else:
        trace = load_trace_file(spec, tokenizer=tokenizer, rate=trace_rate, seed=seed,
                                max_requests=max_requests)
    return representative_slice(trace, max_requests) if max_requests else trace


def _trace_file_options(args) -> dict:
    return {"tokenizer": args.tokenizer, "trace_rate": args.trace_rate, "seed": args.seed}


def _slo(args):
    from pdserve.router.slo import SloConfig

    return SloConfig(args.slo_ttft, args.slo_tpot, args.attainment)


def _sim_config(args):
    """The scheduler knobs; ``simulate`` also takes the prefill dispatch and prefix caching
    (``--dispatch kv_aware`` turns caching on: it routes to the caches)."""
    from pdserve.cluster.planning.simulator import SimConfig

    dispatch = getattr(args, "dispatch", "least_loaded")
    caching = getattr(args, "prefix_caching", False) or dispatch == "kv_aware"
    return SimConfig(args.prefill_token_budget, args.chunked_prefill, args.max_decode_batch,
                     args.request_overhead, args.step_overhead, dispatch=dispatch,
                     prefix_caching=caching)


def _plan_spec(args):
    from pdserve.cluster.planning.plan import Plan
    from pdserve.cluster.planning.simulator import ColocatedPlanSpec, DisaggPlanSpec, InstanceSpec

    if args.plan:
        return Plan.load(args.plan).spec()
    if args.colocated:
        return ColocatedPlanSpec(InstanceSpec(args.tp, args.pp, args.count))
    return DisaggPlanSpec(InstanceSpec(args.prefill_tp, args.prefill_pp, args.num_prefill),
                          InstanceSpec(args.decode_tp, args.decode_pp, args.num_decode),
                          args.bandwidth)


def _write(path: str | None, payload: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {path}", file=sys.stderr)


def _cmd_simulate(args: argparse.Namespace) -> int:
    from pdserve.cluster.planning.simulator import goodput, simulate

    profile, slo, cfg = load_profile(args.profile), _slo(args), _sim_config(args)
    trace = load_trace_spec(args.trace, args.max_requests, **_trace_file_options(args))
    spec = _plan_spec(args)
    out: dict = {"plan": spec.label(), "trace": trace.name, "requests": len(trace),
                 "dispatch": cfg.dispatch, "prefix_caching": cfg.prefix_caching,
                 "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s,
                         "attainment": slo.attainment}}
    print(f"{spec.label()} on {spec.num_gpus} GPUs; trace {trace.name} ({len(trace)} requests)")
    if args.goodput:
        g = goodput(spec, profile, trace, slo, cfg)
        out["goodput"] = {"rate": g.rate, "per_gpu_rate": g.per_gpu_rate,
                          "interpolated_rate": g.interpolated_rate,
                          "attainment_at_rate": g.attainment_at_rate,
                          "searched": [list(x) for x in g.searched]}
        print(f"goodput {g.rate:.3f} req/s ({g.per_gpu_rate:.3f} req/s/GPU; interpolated "
              f"{g.interpolated_rate:.3f}) after {g.num_sims} simulations")
        rate = g.rate if g.rate > 0 else None
    else:
        rate = args.rate
    if rate is not None or not args.goodput:
        res = simulate(spec, profile, trace.at_rate(rate) if rate else trace, cfg)
        s = res.summary(slo)
        out["simulation"] = s
        print(f"rate {s['rate']:.3f} req/s: attainment {s['attainment']:.3f} (TTFT "
              f"{s['ttft_attainment']:.3f}, TPOT {s['tpot_attainment']:.3f}); rejected "
              f"{s['num_rejected']}")
        print("TTFT p50/p90/p99 {:.3f}/{:.3f}/{:.3f} s; TPOT p50/p90/p99 {:.4f}/{:.4f}/{:.4f} s"
              .format(*(s[k] for k in ("ttft_p50", "ttft_p90", "ttft_p99", "tpot_p50",
                                       "tpot_p90", "tpot_p99"))))
        if res.prefix_hit_rate is not None:
            print(f"prefix cache hit rate {res.prefix_hit_rate:.1%} of prompt tokens "
                  f"({cfg.dispatch} dispatch)")
    _write(args.out, out)
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from pdserve.cluster.planning.cluster_desc import ClusterDesc
    from pdserve.cluster.planning.planner import Planner, PlannerConfig

    cluster = ClusterDesc.load(args.cluster) if args.cluster else ClusterDesc(
        args.nodes, args.gpus_per_node, args.gpu_memory_gb, args.intra_bw, args.inter_bw,
        args.gpu_type)
    from pdserve.workloads.arrivals import describe, with_arrivals

    trace = with_arrivals(load_trace_spec(args.trace, **_trace_file_options(args)),
                          args.arrivals, args.arrival_cv, args.seed)
    pc = PlannerConfig(max_requests=args.max_requests, max_pp=args.max_pp,
                       consider_colocated=args.consider_colocated, workers=args.workers,
                       replicates=args.replicates)
    planner = Planner(cluster, load_profile(args.profile), trace, _slo(args),
                      _sim_config(args), pc, describe(args.arrivals, args.arrival_cv))
    plan = planner.plan(args.affinity)
    what = (f"P={plan.prefill.label()} D={plan.decode.label()} units={plan.units}"
            if plan.mode == "disaggregated" else plan.colocated.label())
    print(f"{plan.mode} ({plan.affinity} affinity) {what}: goodput {plan.expected_rate:.3f} "
          f"req/s = {plan.expected_per_gpu_goodput:.3f} req/s/GPU on {plan.num_gpus} of "
          f"{cluster.num_gpus} GPUs ({plan.arrivals} arrivals); {plan.search.simulations} "
          f"simulations ({plan.search.requests_simulated} requests) in "
          f"{plan.search.runtime_s:.1f} s")
    if plan.check is not None:
        print(plan.check.summary(plan.slo.attainment))
    print(f"search: {plan.search.notes}")
    if args.out:
        plan.save(args.out)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default=DISTSERVE_PROFILE,
                   help=f"profile JSON, or {DISTSERVE_PROFILE} (DistServe's OPT-13B A100 model)")
    p.add_argument("--trace", required=True,
                   help="trace file (Azure/BurstGPT CSV, Mooncake JSONL, ShareGPT JSON), azure, "
                        "or poisson:RATE:N:PLO-PHI:OLO-OHI / gamma:...:CV")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of synthetic traces and ShareGPT arrivals")
    p.add_argument("--slo-ttft", type=float, default=0.25)
    p.add_argument("--slo-tpot", type=float, default=0.1)
    p.add_argument("--attainment", type=float, default=0.9)
    p.add_argument("--prefill-token-budget", type=int, default=4096)
    p.add_argument("--chunked-prefill", action="store_true")
    p.add_argument("--max-decode-batch", type=int, default=256)
    p.add_argument("--request-overhead", type=float, default=0.0, help="seconds added to TTFT")
    p.add_argument("--step-overhead", type=float, default=0.0, help="seconds added per step")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    add_trace_file_args(p)


def register(sub) -> None:
    p = sub.add_parser("simulate", help="simulate a plan on a trace: TTFT/TPOT, SLO attainment")
    _add_common(p)
    p.add_argument("--max-requests", type=int, default=None,
                   help="simulate a representative window of this many requests")
    p.add_argument("--plan", default=None, help="plan JSON written by `pdserve plan`")
    p.add_argument("--prefill-tp", type=int, default=1)
    p.add_argument("--prefill-pp", type=int, default=1)
    p.add_argument("--num-prefill", type=int, default=1)
    p.add_argument("--decode-tp", type=int, default=1)
    p.add_argument("--decode-pp", type=int, default=1)
    p.add_argument("--num-decode", type=int, default=1)
    p.add_argument("--bandwidth", type=float, default=25e9, help="KV transfer bytes/s")
    p.add_argument("--colocated", action="store_true", help="simulate the colocated baseline")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--dispatch", choices=DISPATCH_CHOICES, default="least_loaded",
                   help="prefill routing: least_loaded (fewest queued prompt tokens), "
                        "round_robin, slo_aware (lowest predicted TTFT) or kv_aware "
                        "(slo_aware on the prompt's part not expected in that instance's "
                        "prefix cache; implies --prefix-caching)")
    p.add_argument("--prefix-caching", action="store_true",
                   help="model each prefill instance's prefix cache (traces with prefix "
                        "hashes, e.g. Mooncake JSONL; others get no hits)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--rate", type=float, default=None, help="replay at this mean rate (req/s)")
    how.add_argument("--goodput", action="store_true", help="bisect the goodput")
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser("plan", help="search the placement with the best per-GPU goodput")
    _add_common(p)
    p.add_argument("--cluster", default=None, help="cluster JSON (pdserve-cluster-v1)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-memory-gb", type=float, default=80.0)
    p.add_argument("--intra-bw", type=float, default=300e9, help="intra-node bytes/s")
    p.add_argument("--inter-bw", type=float, default=25e9, help="inter-node bytes/s")
    p.add_argument("--gpu-type", default="")
    p.add_argument("--affinity", choices=("auto", "high", "low"), default="auto")
    p.add_argument("--max-requests", type=int, default=None,
                   help="plan on a representative slice of this many requests (default: the "
                        "whole trace; simulations use steady-state windows either way)")
    p.add_argument("--arrivals", choices=ARRIVALS, default="trace",
                   help="arrival model: the trace's own timestamps rescaled (default), or "
                        "Poisson / Gamma arrivals at the trace's mean rate")
    p.add_argument("--arrival-cv", type=float, default=2.0,
                   help="coefficient of variation of --arrivals gamma")
    p.add_argument("--replicates", type=int, default=4,
                   help="trace windows the claimed goodput is checked on (confidence)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes for independent simulations")
    p.add_argument("--max-pp", type=int, default=4)
    p.add_argument("--consider-colocated", action="store_true",
                   help="return a colocated plan when it beats disaggregation")
    p.set_defaults(func=_cmd_plan)
