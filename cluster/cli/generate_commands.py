"""``pdserve generate``: stream one completion from a running endpoint to the terminal."""

from __future__ import annotations

import argparse
import sys

from pdserve.cluster.cli.common import (
    add_client_security_args,
    add_sampling_args,
    client_security_from_args,
)


def _cmd_generate(args: argparse.Namespace) -> int:
    import grpc

    from pdserve.cluster.cli.client import Client, build_request

    req = build_request(args.prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                        top_p=args.top_p, seed=args.seed, stop=args.stop or ())
    with Client(args.address, timeout_s=args.timeout,
                security=client_security_from_args(args)) as client:
        try:
            usage = None
            for msg in client.stream(req):
                sys.stdout.write(msg.text)
                sys.stdout.flush()
                if msg.HasField("usage"):
                    usage = msg.usage
        except grpc.RpcError as exc:
            print(f"\npdserve: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    if usage is not None:
        print(f"\n[{usage.completion_tokens} tokens, ttft {usage.ttft_ms:.1f} ms, "
              f"total {usage.e2e_ms:.1f} ms]", file=sys.stderr)
    return 0


def register(sub) -> None:
    p = sub.add_parser("generate", help="stream a completion from a running pdserve endpoint")
    p.add_argument("prompt")
    p.add_argument("--address", default="127.0.0.1:50051")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--timeout", type=float, default=None)
    add_sampling_args(p)
    add_client_security_args(p)
    p.set_defaults(func=_cmd_generate)
