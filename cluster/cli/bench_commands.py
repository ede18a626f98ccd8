"""``pdserve bench``: replay a trace against a running endpoint, report SLO attainment.

    pdserve bench --address localhost:50051 --trace poisson:4:200 --rates 1,2,4,8
    pdserve bench --address HOST:PORT --trace azure --length-scale 0.1 \\
        --max-prompt-len 512 --num-requests 300 --rates 0.5,1,2 --label 1p1d

Trace specs: a CSV path (Azure or BurstGPT, detected from the header), ``azure`` (the
shared Azure conversation trace), ``poisson:RATE:N`` or ``gamma:RATE:CV:N`` (synthetic,
lengths from ``--prompt-len``/``--output-len``). Heavy imports stay in the handler so
``pdserve --help`` remains instant.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pdserve.cluster.cli.common import (
    add_client_security_args,
    azure_trace_path,
    client_security_from_args,
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


def load_trace_spec(spec: str, prompt_len: tuple[int, int], output_len: tuple[int, int],
                    seed: int = 0):
    from pdserve.workloads.formats import load_trace
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
    path = azure_trace_path() if spec == "azure" else Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"trace file not found: {path}")
    return load_trace(path)


def _cmd_bench(args: argparse.Namespace) -> int:
    from pdserve.cluster.cli.replay.config import LoadGenConfig
    from pdserve.cluster.cli.replay.report import markdown_table
    from pdserve.cluster.cli.replay.sweep import SweepConfig, run_sweep
    from pdserve.router.slo import SloConfig

    trace = load_trace_spec(args.trace, parse_range(args.prompt_len),
                            parse_range(args.output_len), args.seed)
    rates = parse_rates(args.rates) if args.rates else (args.rate,) if args.rate else None
    slo = SloConfig(args.slo_ttft, args.slo_tpot, args.attainment)
    cfg = SweepConfig(
        label=args.label, rates=rates, slo=slo, time_scale=args.time_scale,
        length_scale=args.length_scale, max_prompt_len=args.max_prompt_len,
        max_output_len=args.max_output_len, num_requests=args.num_requests,
        duration_s=args.duration,
        loadgen=LoadGenConfig(vocab_size=args.vocab_size, seed=args.seed,
                              prompt_mode=args.prompt_mode,
                              slo_ttft_s=args.slo_ttft if args.send_slo else None,
                              slo_tpot_s=args.slo_tpot if args.send_slo else None,
                              max_in_flight=args.max_in_flight, num_channels=args.channels,
                              timeout_s=args.timeout, quiet=args.quiet,
                              security=client_security_from_args(args)),
        save_runs=not args.no_raw)
    print(f"pdserve bench: {trace.name}: {len(trace)} requests over {trace.duration_s:.0f} s "
          f"({trace.rate:.3g} req/s) -> {args.address}", file=sys.stderr)
    result = run_sweep(args.address, trace, cfg, args.out_dir)
    print(markdown_table([p.report for p in result.points]), end="")
    print(f"\ngoodput ({slo.attainment:.0%} within TTFT {slo.ttft_s * 1e3:g} ms, "
          f"TPOT {slo.tpot_s * 1e3:g} ms): {result.goodput:.3g} req/s")
    print(f"results: {Path(args.out_dir) / args.label}.{{json,md}} and plots", file=sys.stderr)
    return 0


def register(sub) -> None:
    p = sub.add_parser("bench", help="replay a request trace against a running endpoint",
                       description=__doc__.splitlines()[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", required=True, help="gRPC endpoint HOST:PORT")
    p.add_argument("--trace", required=True,
                   help="PATH.csv | azure | poisson:RATE:N | gamma:RATE:CV:N")
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
    p.set_defaults(func=_cmd_bench)
