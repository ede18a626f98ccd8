"""Helpers more than one ``pdserve`` subcommand uses: the model to load, the engine's GPU
switches, sampling and client-security flags, and trace files (where the shared Azure trace is, and loading any
trace file the workloads package reads).

Imported by the ``*_commands`` modules (never the reverse), and light: anything heavy
is imported inside the function that needs it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

AZURE_CONV = Path("shared") / "data" / "azure_llm_2023_conv.csv"


def resolve_model(model: str | None) -> str:
    """The named local checkpoint, or the demo model (created on first use)."""
    if model:
        return model
    from pdserve.engine.demo_model import create_demo_model

    return str(create_demo_model())


def _sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_gpu_engine_args(p: argparse.ArgumentParser) -> None:
    """``EngineConfig``'s GPU switches (CUDA graphs for decode, FlashInfer's prefill
    kernels); read back with ``gpu_engine_kwargs``. Ignored on the CPU."""
    p.add_argument("--enforce-eager", action="store_true",
                   help="never replay CUDA graphs for decode steps")
    p.add_argument("--cuda-graph-sizes", type=_sizes, default=None, metavar="N,N,...",
                   help="decode batch sizes to capture a CUDA graph for (those up to "
                        "--max-num-seqs; default: 1,2,4,8,16,24,32,48,64,96,128,192,256)")
    p.add_argument("--flashinfer-prefill-backend", default="auto", choices=("auto", "fa2", "fa3"),
                   help="FlashInfer's prefill kernel family (auto: FA3 on Hopper)")


def gpu_engine_kwargs(args: argparse.Namespace) -> dict:
    """The ``EngineConfig`` keyword arguments ``add_gpu_engine_args`` parsed."""
    kw = {"enforce_eager": args.enforce_eager,
          "flashinfer_prefill_backend": args.flashinfer_prefill_backend}
    if args.cuda_graph_sizes is not None:
        kw["cuda_graph_sizes"] = args.cuda_graph_sizes
    return kw


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)


def add_client_security_args(p: argparse.ArgumentParser) -> None:
    """Flags of every command that talks to an endpoint (generate, bench)."""
    g = p.add_argument_group("secured endpoints (docs/security.md)")
    g.add_argument("--tls", action="store_true",
                   help="use TLS, trusting the system's root CAs (implied by --tls-ca)")
    g.add_argument("--tls-ca", default=None, help="PEM CA that signed the server's certificate")
    g.add_argument("--tls-cert", default=None, help="client certificate PEM (mutual TLS)")
    g.add_argument("--tls-key", default=None, help="client private key PEM (mutual TLS)")
    g.add_argument("--auth-token-file", default=None,
                   help="file holding the bearer token (default: $PDSERVE_AUTH_TOKEN)")


def client_security_from_args(args: argparse.Namespace):
    from pdserve.cluster.cli.client import TOKEN_ENV, ClientSecurity

    return ClientSecurity(tls=args.tls, root_ca_file=args.tls_ca,
                          client_cert_file=args.tls_cert, client_key_file=args.tls_key,
                          token_file=args.auth_token_file, token_env=TOKEN_ENV)


def azure_trace_path() -> Path:
    """The shared Azure conversation trace, looked for beside the checkout (``../shared``,
    relative to the working directory, then to this source tree)."""
    here = Path(__file__).resolve().parents[2]  # cluster/cli/ -> the checkout
    candidates = [Path.cwd().parent / AZURE_CONV, here.parent / AZURE_CONV, Path.cwd() / AZURE_CONV]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(f"Azure trace not found (looked in {', '.join(map(str, candidates))})")


def add_trace_file_args(p: argparse.ArgumentParser) -> None:
    """Flags of every command that reads a trace file (bench, simulate, plan)."""
    g = p.add_argument_group("trace files without token counts or timestamps (ShareGPT)")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer directory that counts ShareGPT's tokens (default: the "
                        "demo model's; use the served model's)")
    g.add_argument("--trace-rate", type=float, default=1.0,
                   help="ShareGPT arrivals: Poisson at this rate (req/s), seeded by --seed")


def token_counter(tokenizer_dir: str | None) -> Callable[[str], int]:
    """Counts a text's tokens (no special tokens) with the tokenizer in ``tokenizer_dir``
    (default: the demo model's), loaded on the first call: only a trace that needs
    counting pays for importing transformers."""
    loaded = []

    def count(text: str) -> int:
        if not loaded:
            from pdserve.engine.tokenizer import Tokenizer

            loaded.append(Tokenizer.from_pretrained(resolve_model(tokenizer_dir)))
        return len(loaded[0].encode(text, add_special_tokens=False))

    return count


def load_trace_file(spec: str, *, tokenizer: str | None = None, rate: float = 1.0,
                    seed: int = 0, max_requests: int | None = None):
    """The trace in file ``spec`` (``azure``: the shared Azure trace), any format
    ``workloads.formats.load_trace`` knows. ShareGPT lengths are counted with
    ``tokenizer``, its arrivals Poisson at ``rate`` with ``seed``, and only its first
    ``max_requests`` usable conversations are read when given."""
    from pdserve.workloads.formats import load_trace
    from pdserve.workloads.sharegpt import ShareGPTOptions

    path = azure_trace_path() if spec == "azure" else Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"trace file not found: {path}")
    return load_trace(path, ShareGPTOptions(token_counter(tokenizer), rate, seed, max_requests))
