"""``pdserve demo-model`` and ``pdserve complete``: the single-process engine, no cluster."""

from __future__ import annotations

import argparse
import sys

from pdserve.cluster.cli.common import (
    add_gpu_engine_args,
    add_sampling_args,
    gpu_engine_kwargs,
    resolve_model,
)


def _cmd_demo_model(args: argparse.Namespace) -> int:
    from pdserve.engine.demo_model import create_demo_model

    path = create_demo_model(args.path, seed=args.seed, overwrite=args.overwrite)
    print(path)
    return 0


def _cmd_complete(args: argparse.Namespace) -> int:
    from pdserve.engine.config import EngineConfig
    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.engine.loader import load_model
    from pdserve.engine.parallel.local_instance import LocalTPInstance, rank_config

    config = EngineConfig(model=resolve_model(args.model), device=args.device,
                          tensor_parallel_size=args.tp, **gpu_engine_kwargs(args))
    if args.tp == 1:
        return _complete(LLMEngine.from_config(config), args)
    # ranks 1..tp-1 as child processes, this one is rank 0 and drives them
    instance = LocalTPInstance.start(config)
    try:
        config = rank_config(config, 0)
        engine = LLMEngine.from_config(config, load_model(config, group=instance.group))
        try:
            return _complete(engine, args)
        finally:
            engine.runner.close()
    finally:
        instance.close()


def _complete(engine, args: argparse.Namespace) -> int:
    from pdserve.engine.sampling_params import SamplingParams

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


def register(sub) -> None:
    p = sub.add_parser("demo-model", help="create the tiny random-weight demo checkpoint")
    p.add_argument("--path", default=None, help="where to write it (default: the cache dir)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_demo_model)

    p = sub.add_parser("complete", help="complete a prompt with the single-process engine")
    p.add_argument("prompt")
    p.add_argument("--model", default=None, help="local Hugging Face checkpoint (default: demo)")
    p.add_argument("--device", default="auto")
    add_gpu_engine_args(p)
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel ranks (one process each, on this host)")
    add_sampling_args(p)
    p.set_defaults(func=_cmd_complete)
