"""``pdserve profile``: measure this host's latency profile for a model and write it.

``register(sub)`` adds the subcommand to the ``pdserve`` parser; ``main(argv)`` runs it
standalone (``python -m pdserve.cluster.cli.profile_commands ...``). The command runs
``profile_model`` (see ``pdserve.cluster.planning.profiler``), writes the ``LatencyProfile`` JSON
to ``--out``, prints a summary (coefficients, held-out errors, bandwidths) and, when
asked, a Markdown report (``--markdown``) and a measured-vs-predicted plot of the
held-out points (``--plot``, needs matplotlib). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pdserve.cluster.cli.common import add_gpu_engine_args, gpu_engine_kwargs, resolve_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="local checkpoint directory (default: demo)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor parallel ranks of the instance to time (local processes; "
                        "on CUDA one GPU each); the profile's entry is for this tp")
    add_gpu_engine_args(p)
    p.add_argument("--out", default="profile.json", help="where the profile JSON goes")
    p.add_argument("--quick", action="store_true", help="small grid, 3 reps (~30 s)")
    p.add_argument("--reps", type=int, default=None, help="timed passes over all points")
    p.add_argument("--decode-repeat", type=int, default=None,
                   help="times each decode point is timed per pass")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads while measuring (0: leave torch's default)")
    p.add_argument("--backends", default=None,
                   help="KV transfer backends to time, comma separated, or 'none' "
                        "(default: inprocess,shm,tcp, plus cuda_ipc on CUDA)")
    p.add_argument("--max-prompt-len", type=int, default=None)
    p.add_argument("--max-batch-tokens", type=int, default=None,
                   help="most tokens in one prefill batch")
    p.add_argument("--max-prefill-seqs", type=int, default=None,
                   help="most prompts in one prefill batch")
    p.add_argument("--max-batch", type=int, default=None, help="largest decode batch")
    p.add_argument("--max-context", type=int, default=None, help="longest decode context")
    p.add_argument("--prefill-points", type=int, default=None)
    p.add_argument("--decode-points", type=int, default=None)
    p.add_argument("--transfer-reps", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=None, help="engine max_model_len")
    p.add_argument("--max-num-seqs", type=int, default=64, help="engine max_num_seqs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--markdown", default=None, help="also write a Markdown report here")
    p.add_argument("--plot", default=None, help="also write a PNG of held-out points here")


def register(sub) -> None:
    p = sub.add_parser("profile", help="measure prefill/decode latency and KV transfer "
                       "bandwidth on this host and write a latency profile",
                       description=__doc__.split("\n", 1)[0])
    add_arguments(p)
    p.set_defaults(func=run_command)


def options_from_args(args: argparse.Namespace):
    from pdserve.cluster.planning.profiler.options import ProfileOptions

    overrides = {name: getattr(args, name) for name in (
        "reps", "decode_repeat", "max_prompt_len", "max_batch_tokens", "max_prefill_seqs", "max_batch",
        "max_context", "prefill_points", "decode_points", "transfer_reps")
        if getattr(args, name) is not None}
    overrides["threads"] = args.threads or None
    overrides["seed"] = args.seed
    if args.backends is not None:
        names = [] if args.backends.strip().lower() == "none" else args.backends.split(",")
        overrides["backends"] = tuple(b.strip() for b in names if b.strip())
    return ProfileOptions.quick(**overrides) if args.quick else ProfileOptions(**overrides)


def run_command(args: argparse.Namespace) -> int:
    from pdserve.cluster.planning.profiler.run import profile_model
    from pdserve.engine.config import EngineConfig

    options = options_from_args(args)
    config = EngineConfig(model=resolve_model(args.model), device=args.device, dtype=args.dtype,
                          max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                          tensor_parallel_size=args.tp, **gpu_engine_kwargs(args))
    run = profile_model(config, options,
                        progress=lambda msg: print(f"[profile] {msg}", file=sys.stderr,
                                                   flush=True))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    run.to_profile().save(out)
    if args.markdown:
        Path(args.markdown).write_text(markdown_report(run, out))
    if args.plot:
        plot_heldout(run, args.plot)
    print(summary(run))
    print(f"profile written to {out}")
    return 0


# -- reporting ------------------------------------------------------------------------------

def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _decode_formula(fit) -> str:
    text = f"{fit.a:.4g} + {fit.b:.4g}*sum(ctx+1) + {fit.c:.4g}*B"
    if fit.large is not None:
        a, b, c = fit.large
        text = (f"B < {fit.large_batch}: {text}; B >= {fit.large_batch}: "
                f"{a:.4g} + {b:.4g}*sum(ctx+1) + {c:.4g}*B")
    return text


def summary(run) -> str:
    pf, df = run.prefill_fit, run.decode_fit
    p = pf.fit
    lines = [
        f"{run.model} on {run.hardware} ({run.device}, {run.dtype}, {run.threads} thread(s)), "
        f"{run.elapsed_s:.0f} s",
        f"prefill ms = {p.a:.4g} + {p.b:.4g}*sum(l) + {p.c:.4g}*sum(l^2)",
        f"  held-out error: median {_pct(pf.heldout.median)}, p90 {_pct(pf.heldout.p90)} "
        f"({pf.heldout.n} of {len(run.prefill)} points)",
        f"decode ms = {_decode_formula(df.fit)}",
        f"  held-out error: median {_pct(df.heldout.median)}, p90 {_pct(df.heldout.p90)} "
        f"({df.heldout.n} of {len(run.decode)} points; single fit "
        f"{_pct(df.single_heldout.median)})",
    ]
    if run.wide_mix:
        w = run.wide_mix_error
        lines.append(f"  wide-mix decode batches (not fitted): median {_pct(w.median)}, "
                     f"p90 {_pct(w.p90)}")
    lines.append(f"kv capacity {run.kv_capacity_tokens} tokens, "
                 f"{run.kv_bytes_per_token} bytes/token")
    for name, bw in run.bandwidth.items():
        per = ", ".join(f"{n} tok {r / 1e9:.2f}" for n, _, _, r in bw.sizes)
        lines.append(f"transfer {name}: {bw.bytes_per_s / 1e9:.2f} GB/s ({per} GB/s)")
    return "\n".join(lines)


def markdown_report(run, profile_path: str | Path | None = None) -> str:
    pf, df, o = run.prefill_fit, run.decode_fit, run.options
    info = run.info
    lim = info.get("limits", {})
    p = pf.fit

    def err_row(name: str, e) -> str:
        return f"| {name} | {_pct(e.median)} | {_pct(e.p90)} | {_pct(e.max)} | {e.n} |"

    lines = [
        f"# Latency profile: {run.model} on {run.hardware}",
        "",
        f"{info.get('date_utc', '')} · torch {__import__('torch').__version__} · "
        f"{run.device} {run.dtype} · {run.threads} torch thread(s) · "
        f"{info.get('cpu_count')} CPUs · median of {o.reps} interleaved passes "
        f"(decode points x{o.decode_repeat} a pass), drift-corrected · "
        f"{run.elapsed_s:.0f} s",
        "",
        "Worker step = `runner.run(inputs)` + greedy `Sampler` (KV sends excluded). "
        f"Prefill: {len(run.prefill)} batches of 1-{o.max_prefill_seqs} prompts, "
        f"{o.min_prompt_len}-{lim.get('max_prompt_len')} tokens each, "
        f"<= {lim.get('max_batch_tokens')} per batch. Decode: {len(run.decode)} batches of "
        f"1-{lim.get('max_batch')} sequences, contexts {o.min_context}-"
        f"{lim.get('max_context')} (within x{o.context_spread:g} of each other per batch). "
        f"Fit on a random {100 * (1 - o.holdout):.0f}% (seed {o.seed}), errors on the "
        "held-out rest.",
        "",
        "## Fits (ms)",
        "",
        f"* prefill = {p.a:.4g} + {p.b:.4g}·sum(l) + {p.c:.4g}·sum(l²)",
        f"* decode = {_decode_formula(df.fit)}",
        "",
        "| held-out error (abs. relative) | median | p90 | max | points |",
        "|---|---:|---:|---:|---:|",
        err_row("prefill", pf.heldout),
        err_row("decode (stored fit)", df.heldout),
        err_row("decode, single fit", df.single_heldout),
    ]
    if df.two_regime_heldout is not None:
        lines.append(err_row("decode, best two-regime fit", df.two_regime_heldout))
    if run.wide_mix:
        lines.append(err_row("decode, wide-mix batches (not fitted)", run.wide_mix_error))
    lines += [
        "",
        f"Decode regimes: {'two, split at B = ' + str(df.threshold) if df.two_regime else 'one'}"
        " (threshold by 5-fold CV on the training split; kept only if it lowers CV and "
        "held-out error). Wide-mix batches draw every context independently over the whole "
        "range; the torch attention backend pads every decode row to the batch's longest "
        "context, which a model in sum(ctx) cannot see.",
        "",
        f"KV capacity {run.kv_capacity_tokens} tokens (engine config), "
        f"{run.kv_bytes_per_token} bytes/token.",
        "",
    ]
    if run.bandwidth:
        sizes = next(iter(run.bandwidth.values())).sizes
        head = " | ".join(f"{n} tok ({b / 2**20:.1f} MiB) GB/s" for n, b, _, _ in sizes)
        lines += ["## KV transfer bandwidth (median)", "",
                  f"| backend | {head} | stored (GB/s) |",
                  "|---|" + "---:|" * (len(sizes) + 1)]
        for name, bw in run.bandwidth.items():
            cells = " | ".join(f"{r / 1e9:.2f}" for _, _, _, r in bw.sizes)
            lines.append(f"| {name} | {cells} | {bw.bytes_per_s / 1e9:.2f} |")
        lines += ["", "shm/tcp senders run in a spawned process; timed from `begin` to "
                  "delivery. The stored bandwidth is the largest transfer's median.", ""]
    if profile_path is not None:
        lines += [f"Profile: `{Path(profile_path).name}` (raw measurements in its "
                  "`measurements`).", ""]
    return "\n".join(lines)


def plot_heldout(run, path: str | Path) -> None:
    """Measured vs predicted step time for the held-out points (log-log), per phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, name, points, res in ((axes[0], "prefill", run.prefill, run.prefill_fit),
                                  (axes[1], "decode", run.decode, run.decode_fit)):
        test = [points[i] for i in res.test]
        train = [points[i] for i in res.train]
        for group, style, label in ((train, dict(color="0.75", s=12), "training"),
                                    (test, dict(color="C0", s=24), "held-out")):
            ax.scatter([m.ms for m in group], [res.fit.ms(m.lens) for m in group],
                       label=label, **style)
        if name == "decode" and run.wide_mix:
            ax.scatter([m.ms for m in run.wide_mix], [res.fit.ms(m.lens) for m in run.wide_mix],
                       color="C3", marker="x", s=24, label="wide-mix (not fitted)")
        every = [m.ms for m in points] + [m.ms for m in run.wide_mix]
        lo, hi = min(every) * 0.8, max(every) * 1.25
        ax.plot([lo, hi], [lo, hi], color="k", lw=0.8)
        ax.fill_between([lo, hi], [lo * 0.9, hi * 0.9], [lo * 1.1, hi * 1.1], color="C2",
                        alpha=0.15, label="±10%")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_xlabel("measured step time (ms)")
        ax.set_ylabel("predicted (ms)")
        ax.set_title(f"{name}: held-out median error {100 * res.heldout.median:.1f}%, "
                     f"p90 {100 * res.heldout.p90:.1f}%")
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(f"{run.model} on {run.hardware} ({run.device}, {run.threads} thread(s))")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pdserve profile", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_command(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"pdserve profile: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
