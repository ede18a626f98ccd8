"""``pdserve serve --autoscale``: the SLO autoscaler's flags and their configuration.

Bad values fail before anything starts, with ``AutoscaleConfig``'s own messages (bounds
out of order, a headroom outside (0, 1], no ``--profile``) or the cluster spec's (a pool
that starts outside its bounds).
"""

from __future__ import annotations

import argparse


def add_autoscale_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("SLO autoscaler (docs/placement.md)")
    g.add_argument("--autoscale", action="store_true",
                   help="resize the prefill and decode pools to the load (needs --profile)")
    for pool in ("prefill", "decode"):
        g.add_argument(f"--{pool}-min", type=int, default=1, metavar="N",
                       help=f"fewest {pool} workers (default 1)")
        g.add_argument(f"--{pool}-max", type=int, default=None, metavar="N",
                       help=f"most {pool} workers (default: the --{pool} count)")
    g.add_argument("--autoscale-interval", type=float, default=30.0, metavar="S",
                   help="seconds between decisions, and the window observed (default 30)")
    g.add_argument("--autoscale-cooldown", type=float, default=120.0, metavar="S",
                   help="no second growth of a pool within this many seconds (default 120)")
    g.add_argument("--autoscale-window", type=float, default=300.0, metavar="S",
                   help="a pool shrinks only after its target stayed lower this long "
                        "(default 300)")
    g.add_argument("--autoscale-headroom", type=float, default=0.8, metavar="F",
                   help="share of an instance's sustainable rate to plan for (default 0.8)")


def autoscale_config(args: argparse.Namespace, slo):
    """The ``AutoscaleConfig`` the flags ask for, or None without ``--autoscale``."""
    if not args.autoscale:
        return None
    from pdserve.cluster.autoscale.config import AutoscaleConfig, PoolBounds
    from pdserve.engine.latency_profile import LatencyProfile

    if args.colocated or args.plan:
        raise ValueError("--autoscale resizes the --prefill and --decode pools; it does not "
                         "combine with --colocated or --plan")
    return AutoscaleConfig(
        prefill=PoolBounds(args.prefill_min, args.prefill_max or args.prefill, role="prefill"),
        decode=PoolBounds(args.decode_min, args.decode_max or args.decode, role="decode"),
        profile=LatencyProfile.load(args.profile) if args.profile else None,
        slo=slo, interval_s=args.autoscale_interval,
        upscale_cooldown_s=args.autoscale_cooldown,
        downscale_window_s=args.autoscale_window, headroom=args.autoscale_headroom,
        prefill_tp=args.prefill_tp, decode_tp=args.decode_tp)
