"""The ``pdserve`` command line: one subcommand per user task.

Each ``*_commands`` module adds its subcommands with ``register(sub)`` so it lives next to
what it drives; this module only assembles the parser and maps errors to exit codes
(``ValueError`` and ``FileNotFoundError`` print one line and exit 2). Heavy imports
(torch, ray, grpc) happen inside the handlers, keeping ``pdserve --help`` instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pdserve.cluster.cli import (
    bench_commands,
    engine_commands,
    generate_commands,
    profile_commands,
    serve_commands,
    sim_commands,
    trace_commands,
)

# In the order `pdserve --help` lists them.
_COMMAND_MODULES = (engine_commands, serve_commands, generate_commands, bench_commands,
                    profile_commands, sim_commands, trace_commands)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for module in _COMMAND_MODULES:
        module.register(sub)
    return parser


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
