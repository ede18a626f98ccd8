"""``pdserve trace``: make trace files. ``trace synth-prefix`` writes a synthetic
prefix-sharing trace in the Mooncake JSONL format (``workloads/prefix_sharing.py`` states
the model), which ``pdserve simulate``, ``plan`` and ``bench`` read like any trace file.

``register(sub)`` adds the subcommand to the ``pdserve`` parser; bad parameters raise
``ValueError`` (the CLI prints it, exit 2).
"""

from __future__ import annotations

import argparse
import sys


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    try:
        a, b = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad length range {text!r} (want LO-HI)") from None
    return a, b


def _cmd_synth_prefix(args: argparse.Namespace) -> int:
    from pdserve.workloads.mooncake import write_mooncake_jsonl
    from pdserve.workloads.prefix_sharing import (
        PrefixSharingSpec,
        prefix_sharing_trace,
        reusable_share,
    )

    spec = PrefixSharingSpec(args.requests, args.rate, args.prefixes, args.shared_share,
                             args.prefix_tokens, args.suffix_tokens, args.output_tokens,
                             args.skew, args.block_size, args.seed)
    trace = prefix_sharing_trace(spec)
    write_mooncake_jsonl(trace, args.out)
    print(f"{spec.describe()}\nreusable prompt share (unbounded single cache): "
          f"{reusable_share(trace):.1%}", file=sys.stderr)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def register(sub) -> None:
    p = sub.add_parser("trace", help="make trace files (synthetic prefix-sharing workloads)")
    tsub = p.add_subparsers(dest="trace_command", required=True)
    s = tsub.add_parser("synth-prefix", help="write a seeded prefix-sharing trace (Mooncake "
                                             "JSONL)")
    s.add_argument("--out", required=True, help="the JSONL file to write")
    s.add_argument("--requests", type=int, default=2000)
    s.add_argument("--rate", type=float, default=10.0, help="Poisson arrivals, req/s")
    s.add_argument("--prefixes", type=int, default=8, help="number of shared prefixes")
    s.add_argument("--shared-share", type=float, default=0.8,
                   help="share of requests opening with a shared prefix")
    s.add_argument("--prefix-tokens", type=int, default=2048,
                   help="shared prefix length (a multiple of --block-size)")
    s.add_argument("--suffix-tokens", type=_range, default=(64, 512), metavar="LO-HI",
                   help="unique suffix length, uniform")
    s.add_argument("--output-tokens", type=_range, default=(16, 256), metavar="LO-HI")
    s.add_argument("--skew", type=float, default=0.0,
                   help="prefix popularity: weight of prefix k is 1/(k+1)^skew (0 uniform)")
    s.add_argument("--block-size", type=int, default=512, help="tokens per hash id")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_synth_prefix)
