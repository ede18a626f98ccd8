"""The ``pdserve`` command line: one subcommand per user task.

Subcommands are registered by small ``add_*`` functions so each lives next to what it
drives; heavy imports (torch, ray, grpc) happen inside the handlers, keeping
``pdserve --help`` instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _cmd_demo_model(args: argparse.Namespace) -> int:
    from pdserve.engine.demo_model import create_demo_model

    path = create_demo_model(args.path, seed=args.seed, overwrite=args.overwrite)
    print(path)
    return 0


def resolve_model(model: str | None) -> str:
    """The named local checkpoint, or the demo model (created on first use)."""
    if model:
        return model
    from pdserve.engine.demo_model import create_demo_model

    return str(create_demo_model())


def _cmd_complete(args: argparse.Namespace) -> int:
    from pdserve.engine.config import EngineConfig
    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.engine.sampling_params import SamplingParams

    engine = LLMEngine.from_config(EngineConfig(model=resolve_model(args.model), device=args.device))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, seed=args.seed)
    req = engine.add_request(args.prompt, params)
    sys.stdout.write(args.prompt)
    while not req.is_finished:
        for out in engine.step():
            sys.stdout.write(out.new_text)
            sys.stdout.flush()
    print(f"\n[{len(req.output_token_ids)} tokens, finish_reason={req.finish_reason.value}]")
    return 0


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo-model", help="create the tiny random-weight demo checkpoint")
    p.add_argument("--path", default=None, help="where to write it (default: the cache dir)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_demo_model)

    p = sub.add_parser("complete", help="complete a prompt with the single-process engine")
    p.add_argument("prompt")
    p.add_argument("--model", default=None, help="local Hugging Face checkpoint (default: demo)")
    p.add_argument("--device", default="auto")
    add_sampling_args(p)
    p.set_defaults(func=_cmd_complete)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


def _register_cluster_commands(sub) -> None:
    from pdserve.cluster.commands import register

    register(sub)


def _register_bench_commands(sub) -> None:
    from pdserve.cluster.bench_commands import register

    register(sub)


def _register_profile_commands(sub) -> None:
    from pdserve.cluster.profile_commands import register

    register(sub)


def _register_sim_commands(sub) -> None:
    from pdserve.cluster.sim_commands import register

    register(sub)


_EXTRA_COMMANDS = [_register_cluster_commands, _register_bench_commands,
                   _register_profile_commands, _register_sim_commands]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError) as exc:
        print(f"pdserve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
