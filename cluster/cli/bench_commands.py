"""``pdserve bench``: replay a trace against a running endpoint, report SLO attainment.

    pdserve bench --address localhost:50051 --trace poisson:4:200 --rates 1,2,4,8
    pdserve bench --address HOST:PORT --trace azure --length-scale 0.1 \\
        --max-prompt-len 512 --num-requests 300 --rates 0.5,1,2 --label 1p1d
    pdserve bench --api grpc,http --address localhost:50051,localhost:8000 \\
        --trace mooncake_trace.jsonl --length-scale 0.1 --num-requests 200 --rates 1,2

Trace specs: a trace file (Azure or BurstGPT CSV, Mooncake JSONL, ShareGPT JSON; the
format is detected from the content), ``azure`` (the shared Azure conversation trace),
``poisson:RATE:N`` or ``gamma:RATE:CV:N`` (synthetic, lengths from
``--prompt-len``/``--output-len``). ShareGPT has text and no timestamps: its lengths are
counted with ``--tokenizer`` and its arrivals are Poisson at ``--trace-rate``
(re-timed by ``--rates`` like any trace); ``--prompt-mode text`` sends its real prompts.

``--api`` picks the protocol: ``grpc`` (pdserve's endpoint), ``http`` (the
OpenAI-compatible ``/v1/completions``; ``--address`` may be a URL, ``--model`` names the
model, else the first one ``/v1/models`` lists), or ``grpc,http`` to run the same trace
and rates through both, one after the other (``--address`` then gives one address per
API, in the same order). Each API's sweep is saved as ``<label>-<api>.json`` and the
reports are printed and saved side by side in ``<label>.md``. Heavy imports stay in the
handler so ``pdserve --help`` remains instant.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pdserve.cluster.cli.common import (
    add_client_security_args,
    add_trace_file_args,
    client_security_from_args,
    load_trace_file,
)


def parse_range(text: str) -> tuple[int, int]:
    """``"LO-HI"`` (or a single ``"N"``) as an inclusive integer range."""
    lo, _, hi = text.partition("-")
    try:
        pair = (int(lo), int(hi or lo))
    except ValueError:
        raise ValueError(f"expected LO-HI, got {text!r}") from None
    if not 1 <= pair[0] <= pair[1]:
        raise ValueError(f"need 1 <= LO <= HI, got {text!r}")
    return pair


def parse_rates(text: str) -> tuple[float, ...]:
    try:
        rates = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--rates must be comma-separated numbers, got {text!r}") from None
    if not rates or any(not r > 0 for r in rates):
        raise ValueError(f"--rates must be positive, got {text!r}")
    return rates


def parse_apis(text: str) -> tuple[str, ...]:
    from pdserve.cluster.cli.replay.config import APIS

    apis = tuple(a.strip() for a in text.split(",") if a.strip())
    if not apis or any(a not in APIS for a in apis) or len(set(apis)) != len(apis):
        raise ValueError(f"--api must be {', '.join(APIS)} or several of them, each once, "
                         f"comma-separated; got {text!r}")
    return apis


def load_trace_spec(spec: str, prompt_len: tuple[int, int], output_len: tuple[int, int],
                    seed: int = 0, *, tokenizer: str | None = None, trace_rate: float = 1.0,
                    max_requests: int | None = None):
    from pdserve.workloads.synthetic import synthetic

    kind, *params = spec.split(":")
    try:
        if kind == "poisson" and len(params) == 2:
            return synthetic(int(params[1]), float(params[0]), prompt_len, output_len, seed=seed)
        if kind == "gamma" and len(params) == 3:
            return synthetic(int(params[2]), float(params[0]), prompt_len, output_len,
                             cv=float(params[1]), seed=seed)
    except ValueError as exc:
        raise ValueError(f"bad trace spec {spec!r}: {exc}") from None
    if kind in ("poisson", "gamma"):
        raise ValueError(f"bad trace spec {spec!r}: use poisson:RATE:N or gamma:RATE:CV:N")
    return load_trace_file(spec, tokenizer=tokenizer, rate=trace_rate, seed=seed,
                           max_requests=max_requests)


def _cmd_bench(args: argparse.Namespace) -> int:
    from pdserve.cluster.cli.replay.config import LoadGenConfig
    from pdserve.cluster.cli.replay.report import markdown_table
    from pdserve.cluster.cli.replay.sweep import SweepConfig, compare, run_sweep
    from pdserve.router.slo import SloConfig

    apis = parse_apis(args.api)
    addresses = [a.strip() for a in args.address.split(",")]
    if len(addresses) != len(apis):
        raise ValueError(f"--address needs one address per --api entry ({', '.join(apis)}), "
                         f"comma-separated in the same order; got {args.address!r}")
    trace = load_trace_spec(args.trace, parse_range(args.prompt_len),
                            parse_range(args.output_len), args.seed, tokenizer=args.tokenizer,
                            trace_rate=args.trace_rate, max_requests=args.num_requests)
    rates = parse_rates(args.rates) if args.rates else (args.rate,) if args.rate else None
    slo = SloConfig(args.slo_ttft, args.slo_tpot, args.attainment)
    configs = [SweepConfig(
        label=args.label if len(apis) == 1 else f"{args.label}-{api}", rates=rates, slo=slo,
        time_scale=args.time_scale, length_scale=args.length_scale,
        max_prompt_len=args.max_prompt_len, max_output_len=args.max_output_len,
        num_requests=args.num_requests, duration_s=args.duration,
        loadgen=LoadGenConfig(vocab_size=args.vocab_size, seed=args.seed,
                              prompt_mode=args.prompt_mode,
                              slo_ttft_s=args.slo_ttft if args.send_slo else None,
                              slo_tpot_s=args.slo_tpot if args.send_slo else None,
                              max_in_flight=args.max_in_flight, num_channels=args.channels,
                              timeout_s=args.timeout, quiet=args.quiet,
                              security=client_security_from_args(args), api=api,
                              model=args.model),
        save_runs=not args.no_raw) for api in apis]  # all validated before any run starts
    results = []
    for cfg, address in zip(configs, addresses, strict=True):
        print(f"pdserve bench: {trace.name}: {len(trace)} requests over {trace.duration_s:.0f} s "
              f"({trace.rate:.3g} req/s) -> {cfg.loadgen.api} {address}", file=sys.stderr)
        results.append(run_sweep(address, trace, cfg, args.out_dir))
    print(markdown_table([p.report for r in results for p in r.points]), end="")
    goodputs = "; ".join(f"{r.label} {r.goodput:.3g} req/s" if len(results) > 1
                         else f"{r.goodput:.3g} req/s" for r in results)
    print(f"\ngoodput ({slo.attainment:.0%} within TTFT {slo.ttft_s * 1e3:g} ms, "
          f"TPOT {slo.tpot_s * 1e3:g} ms): {goodputs}")
    if len(results) > 1:
        compare({r.label: r for r in results}, args.out_dir, name=args.label)
    names = ",".join(r.label for r in results)
    print(f"results: {Path(args.out_dir)}/{{{names}}}.{{json,md}} and plots"
          + (f"; side by side: {Path(args.out_dir) / args.label}.md" if len(results) > 1
             else ""), file=sys.stderr)
    return 0


def register(sub) -> None:
    p = sub.add_parser("bench", help="replay a request trace against a running endpoint",
                       description=__doc__.splitlines()[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", required=True,
                   help="endpoint HOST:PORT (for http also a URL); with --api grpc,http one "
                        "per API, comma-separated")
    p.add_argument("--api", default="grpc",
                   help="grpc | http (OpenAI /v1/completions) | grpc,http (both in turn)")
    p.add_argument("--model", default=None,
                   help="model name for --api http (default: the first /v1/models lists)")
    p.add_argument("--trace", required=True,
                   help="trace file (Azure/BurstGPT CSV, Mooncake JSONL, ShareGPT JSON) | "
                        "azure | poisson:RATE:N | gamma:RATE:CV:N")
    p.add_argument("--prompt-len", default="32-256", help="synthetic prompt lengths LO-HI")
    p.add_argument("--output-len", default="16-128", help="synthetic output lengths LO-HI")
    rate = p.add_mutually_exclusive_group()
    rate.add_argument("--rates", default=None, help="comma-separated offered rates (req/s)")
    rate.add_argument("--rate", type=float, default=None, help="a single offered rate")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="multiply arrival times (before --rate re-timing)")
    p.add_argument("--length-scale", type=float, default=1.0,
                   help="multiply prompt and output lengths (e.g. 0.1 for the demo model)")
    p.add_argument("--max-prompt-len", type=int, default=None)
    p.add_argument("--max-output-len", type=int, default=None)
    p.add_argument("--num-requests", type=int, default=None, help="keep the first N requests")
    p.add_argument("--duration", type=float, default=None,
                   help="keep the first S seconds at each rate")
    p.add_argument("--slo-ttft", type=float, default=1.0, help="TTFT target, seconds")
    p.add_argument("--slo-tpot", type=float, default=0.1, help="TPOT target, seconds")
    p.add_argument("--attainment", type=float, default=0.9, help="attainment target (0-1]")
    p.add_argument("--send-slo", action="store_true",
                   help="also send the targets in each request (the router may reject)")
    p.add_argument("--label", default="bench", help="configuration name for files and plots")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--vocab-size", type=int, default=512, help="prompt ids in [3, N)")
    p.add_argument("--prompt-mode", choices=("tokens", "text"), default="tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-in-flight", type=int, default=4096)
    p.add_argument("--channels", type=int, default=1, help="gRPC channels (connections)")
    p.add_argument("--timeout", type=float, default=None, help="per-request deadline, seconds")
    p.add_argument("--no-raw", action="store_true", help="skip the per-request records files")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    add_client_security_args(p)
    add_trace_file_args(p)
    p.set_defaults(func=_cmd_bench)
