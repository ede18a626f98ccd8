"""AIPerf against pdserve's OpenAI-compatible HTTP API, next to ``pdserve bench --api http``.

One run:

1. AIPerf (NVIDIA's ``aiperf``, pinned to ``AIPERF_VERSION``) is installed into its own
   virtual environment, ``benchmarks/.venv-aiperf`` (git-ignored; created only when
   missing or holding another version). It is not a pdserve dependency.
2. Unless ``--url`` names a running endpoint, ``pdserve serve`` is started with its
   defaults (local Ray, 1 prefill + 1 decode worker, the demo model, CPU; extra flags
   with ``--serve-args``) and stopped at the end. Either way the script waits for
   ``GET /ready`` to answer 200 and takes the model name from ``GET /v1/models``.
3. For each concurrency, ``aiperf profile`` runs a closed loop of streaming chat
   requests (``--endpoint-type chat --streaming``): synthetic prompts of ``--isl``
   tokens (AIPerf's count, with the model's tokenizer; the server adds the chat
   template's tokens), ``--osl`` output tokens forced with ``ignore_eos`` and
   ``min_tokens``, greedy (``temperature: 0``), a few warm-up requests first.
   ``--use-server-token-count``: output lengths (hence ITL) come from the server's
   ``usage``, because re-tokenizing the demo model's random-token output on the client
   does not give back the tokens it generated (24 generated tokens re-tokenize to 26-37).
   ``--request-rate 1000 --arrival-pattern constant`` caps the concurrency loop's pace
   (``--rate-cap``; 0 drops it): in pure ``--concurrency`` mode AIPerf 0.13.0's timing
   manager polls for a free slot without sleeping and keeps a whole core busy, a third
   of the throughput on a 2-core host shared with the server. With the cap it checks
   once per millisecond; the loop stays closed at the concurrency.
4. For each concurrency, ``pdserve bench --api http`` drives the same load through
   ``/v1/completions``: the same number of requests, the prompt length the server
   counted for AIPerf's chat requests (``usage.prompt_tokens``), the same output length,
   all arriving at once and held to the concurrency by ``--max-in-flight``.
5. AIPerf's own artifacts (JSON/CSV exports, console table, log; per-request records with
   ``--export-level records`` or ``raw``) go to ``benchmarks/results/aiperf/c<N>/``,
   pdserve bench's to ``benchmarks/results/aiperf/pdserve_bench/``, the server's log (when
   started here) to ``benchmarks/results/aiperf/serve.log``; the summary (TTFT, ITL,
   request throughput, errors per concurrency and client) to
   ``benchmarks/results/aiperf_openai.{md,json}``. How to read it: benchmarks/README.md.

The script exits non-zero when any request failed, in either client.

    python benchmarks/aiperf_openai.py                            # about 5 minutes on 2 cores
    python benchmarks/aiperf_openai.py --concurrencies 1 --requests 10 --no-pdserve-bench
    python benchmarks/aiperf_openai.py --url http://127.0.0.1:8000 --tokenizer /path/to/model

AIPerf's definitions (aiperf ``docs/metrics_reference.md``): TTFT = first response with
content - request start; ITL = (request latency - TTFT) / (output tokens - 1); request
throughput = completed requests / benchmark duration. pdserve bench's: TTFT = first
token - send; TPOT = (last token - first token) / (tokens - 1); req/s = served / wall.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

AIPERF_VERSION = "0.13.0"
HERE = Path(__file__).resolve().parent
DEFAULT_VENV = HERE / ".venv-aiperf"
DEFAULT_OUT = HERE / "results" / "aiperf"
DEFAULT_SUMMARY = HERE / "results" / "aiperf_openai.md"
BENCH_DIR = "pdserve_bench"


def note(msg: str) -> None:
    print(f"aiperf_openai: {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None,
                    help="a running endpoint (http://HOST:PORT); default: start pdserve serve")
    ap.add_argument("--http-port", type=int, default=8000,
                    help="HTTP port of the pdserve serve started here")
    ap.add_argument("--serve-args", default="",
                    help="extra flags for the pdserve serve started here (one string)")
    ap.add_argument("--model", default=None, help="default: the first id GET /v1/models lists")
    ap.add_argument("--tokenizer", default=None,
                    help="tokenizer directory for AIPerf (default: the demo model's)")
    ap.add_argument("--concurrencies", default="1,2,4")
    ap.add_argument("--requests", type=int, default=200, help="measured requests per concurrency")
    ap.add_argument("--warmup", type=int, default=4, help="AIPerf warm-up requests per concurrency")
    ap.add_argument("--isl", type=int, default=96, help="prompt tokens (AIPerf's count)")
    ap.add_argument("--osl", type=int, default=24, help="output tokens")
    ap.add_argument("--rate-cap", type=float, default=1000.0,
                    help="AIPerf --request-rate beside --concurrency (req/s; 0: pure "
                         "concurrency mode, whose slot polling keeps a core busy)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--export-level", default="summary", choices=("summary", "records", "raw"),
                    help="AIPerf's --export-level: summary (aggregate JSON/CSV), records (also "
                         "per-request metrics), raw (also every request and response)")
    ap.add_argument("--server-metrics", default=None, metavar="URL",
                    help="let AIPerf also scrape this Prometheus endpoint (e.g. pdserve's "
                         "http://127.0.0.1:9400/metrics); default: no server metrics")
    ap.add_argument("--no-pdserve-bench", action="store_true",
                    help="skip the pdserve bench --api http runs")
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="AIPerf's virtual environment")
    ap.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--summary", type=Path, default=DEFAULT_SUMMARY,
                    help="Markdown summary (a .json with the same stem is written beside it)")
    ap.add_argument("--ready-timeout", type=float, default=300.0)
    args = ap.parse_args(argv)
    try:
        args.concurrency_list = [int(c) for c in args.concurrencies.split(",") if c.strip()]
    except ValueError:
        ap.error(f"--concurrencies must be comma-separated integers, got {args.concurrencies!r}")
    if not args.concurrency_list or min(args.concurrency_list) < 1:
        ap.error("--concurrencies must be positive")
    if args.requests < 1 or args.warmup < 0 or args.isl < 1 or args.osl < 2 or args.rate_cap < 0:
        ap.error("need --requests >= 1, --warmup >= 0, --isl >= 1, --osl >= 2 (ITL needs 2), "
                 "--rate-cap >= 0")
    return args


# -- AIPerf's environment ---------------------------------------------------------------
def aiperf_version(venv: Path) -> str | None:
    exe = venv / "bin" / "aiperf"
    if not exe.exists():
        return None
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=False)
    return out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout else None


def ensure_aiperf(venv: Path, version: str = AIPERF_VERSION) -> Path:
    """``venv/bin/aiperf`` at ``version``, installing it (only) when missing or different."""
    have = aiperf_version(venv)
    if have == version:
        return venv / "bin" / "aiperf"
    if not (venv / "bin" / "python").exists():
        note(f"creating {venv} for AIPerf")
        # The base interpreter, not this venv's: AIPerf's environment stays separate.
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
    note(f"installing aiperf=={version} into {venv} (AIPerf {have or 'absent'}; "
         "a few minutes the first time)")
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                    f"aiperf=={version}"], check=True)
    got = aiperf_version(venv)
    if got != version:
        raise RuntimeError(f"{venv}/bin/aiperf reports {got!r} after installing {version}")
    return venv / "bin" / "aiperf"


def aiperf_env() -> dict[str, str]:
    """AIPerf's environment. HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE are removed: AIPerf
    0.13.0 then resolves every tokenizer name, a local directory included, through the
    Hugging Face cache (``snapshot_download``), and a directory fails with
    HFValidationError. Online mode with a local directory touches no network (its alias
    lookup skips paths)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    return env


# -- the endpoint ---------------------------------------------------------------------
def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def wait_ready(url: str, timeout_s: float, server: subprocess.Popen | None = None) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if server is not None and server.poll() is not None:
            raise RuntimeError(f"pdserve serve exited with {server.returncode} before "
                               f"{url}/ready answered 200")
        if http_get(f"{url}/ready")[0] == 200:
            return time.monotonic() - t0
        time.sleep(1.0)
    raise TimeoutError(f"{url}/ready did not answer 200 within {timeout_s:.0f} s")


def served_model(url: str) -> str:
    status, body = http_get(f"{url}/v1/models")
    if status != 200:
        raise RuntimeError(f"GET {url}/v1/models answered {status}: {body[:200]!r}")
    return str(json.loads(body)["data"][0]["id"])


def start_server(port: int, extra: str, log: Path) -> subprocess.Popen:
    url = f"http://127.0.0.1:{port}"
    if http_get(f"{url}/health")[0]:
        raise RuntimeError(f"something already answers on {url}; use --url to benchmark it, "
                           "or --http-port")
    cmd = [sys.executable, "-m", "pdserve.cluster.cli.main", "serve", "--http-port", str(port),
           *shlex.split(extra)]
    note(f"starting {shlex.join(cmd[2:])} (log: {log})")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)


def stop_server(server: subprocess.Popen) -> None:
    if server.poll() is not None:
        return
    server.send_signal(signal.SIGINT)  # pdserve serve shuts the cluster and its Ray down
    try:
        server.wait(timeout=90)
    except subprocess.TimeoutExpired:
        note("pdserve serve did not stop within 90 s of SIGINT; sending SIGTERM")
        server.terminate()
        server.wait(timeout=30)


def demo_model_dir() -> str:
    from pdserve.engine.demo_model import create_demo_model

    return str(create_demo_model())


# -- the two clients ------------------------------------------------------------------
def aiperf_command(aiperf: Path, args: argparse.Namespace, url: str, model: str,
                   tokenizer: str, concurrency: int, out: Path) -> list[str]:
    return [
        str(aiperf), "profile", "--model", model, "--url", url,
        "--endpoint-type", "chat", "--streaming", "--tokenizer", tokenizer,
        "--concurrency", str(concurrency), "--request-count", str(args.requests),
        *(["--request-rate", f"{args.rate_cap:g}", "--arrival-pattern", "constant"]
          if args.rate_cap else []),
        "--warmup-request-count", str(args.warmup),
        "--isl", str(args.isl), "--isl-stddev", "0", "--osl", str(args.osl), "--osl-stddev", "0",
        "--extra-inputs", "ignore_eos:true", "--extra-inputs", f"min_tokens:{args.osl}",
        "--extra-inputs", "temperature:0",
        "--use-server-token-count", "--random-seed", str(args.seed),
        "--request-timeout-seconds", "300",
        "--output-artifact-dir", str(out), "--export-level", args.export_level,
        "--ui", "none", "--no-gpu-telemetry",
        *(["--server-metrics", args.server_metrics] if args.server_metrics
          else ["--no-server-metrics"]),
    ]


def bench_command(url: str, model: str, prompt_tokens: int, args: argparse.Namespace,
                  concurrency: int, out_dir: Path) -> list[str]:
    """``pdserve bench --api http`` for the load one AIPerf run made: its request count,
    the prompt length the server counted, its output length, and its concurrency (every
    request arrives at once; ``--max-in-flight`` holds the rest back, so the loop is
    closed as AIPerf's is; TTFT is measured from the actual send)."""
    n = args.requests
    return [sys.executable, "-m", "pdserve.cluster.cli.main", "bench", "--api", "http",
            "--address", url, "--model", model,
            "--trace", f"poisson:1000:{n}", "--num-requests", str(n),
            "--prompt-len", f"{prompt_tokens}-{prompt_tokens}",
            "--output-len", f"{args.osl}-{args.osl}",
            "--max-in-flight", str(concurrency), "--seed", str(args.seed),
            "--label", f"http_c{concurrency}", "--out-dir", str(out_dir), "--no-raw", "--quiet"]


def bench_has_http() -> bool:
    out = subprocess.run([sys.executable, "-m", "pdserve.cluster.cli.main", "bench", "--help"],
                         capture_output=True, text=True, check=False)
    return "--api" in out.stdout


# -- results --------------------------------------------------------------------------
@dataclass
class ClientResult:
    client: str  # "aiperf" | "pdserve bench"
    concurrency: int
    requests: int  # measured requests sent
    ok: int
    errors: int
    ttft_ms: dict[str, float] = field(default_factory=dict)  # p50 / p90 / p99 / mean
    itl_ms: dict[str, float] = field(default_factory=dict)  # AIPerf ITL; pdserve bench TPOT
    request_throughput: float = 0.0  # req/s
    output_token_throughput: float = 0.0  # tokens/s
    prompt_tokens: float = 0.0  # mean, as the server counted (usage)
    output_tokens: float = 0.0  # mean, as the server counted (usage)
    error_detail: list[str] = field(default_factory=list)
    artifacts: str = ""
    command: str = ""


def _stats(metric: dict | None, scale: float = 1.0) -> dict[str, float]:
    if not metric:
        return {}
    return {k: float(metric[k]) * scale for k in ("p50", "p90", "p99", "avg", "mean")
            if metric.get(k) is not None}


def read_aiperf(art: Path, concurrency: int, requested: int) -> ClientResult:
    """The figures of one AIPerf run from its ``profile_export_aiperf.json``."""
    d = json.loads((art / "profile_export_aiperf.json").read_text())

    def avg(name: str) -> float:
        return float((d.get(name) or {}).get("avg") or 0.0)

    completed = int(avg("completed_request_count") or avg("request_count"))
    errors = sum(int(e.get("count", 0)) for e in d.get("error_summary") or [])
    good = int(avg("request_count"))
    # A run that stopped short (cancelled, incomplete) counts the missing requests too.
    errors = max(errors, completed - good, requested - good)
    detail = [f"{e.get('count')}x {json.dumps(e.get('error_details'))}"
              for e in d.get("error_summary") or []]
    if d.get("was_cancelled") or d.get("is_complete") is False:
        detail.append("AIPerf reports the run as cancelled or incomplete")
    return ClientResult(
        "aiperf", concurrency, requested, good, errors,
        ttft_ms=_stats(d.get("time_to_first_token")),
        itl_ms=_stats(d.get("inter_token_latency")),
        request_throughput=avg("request_throughput"),
        output_token_throughput=avg("output_token_throughput"),
        prompt_tokens=avg("usage_prompt_tokens"),
        output_tokens=avg("usage_completion_tokens"),
        error_detail=detail)


def read_bench(path: Path, concurrency: int) -> ClientResult:
    """The figures of one ``pdserve bench`` run (``<label>.json``: a one-point sweep)."""
    rep = json.loads(path.read_text())["points"][0]["report"]
    bad = rep["num_sent"] - rep["num_ok"]
    return ClientResult(
        "pdserve bench", concurrency, rep["num_sent"], rep["num_ok"], bad,
        ttft_ms=_stats(rep.get("ttft_s"), 1e3), itl_ms=_stats(rep.get("tpot_s"), 1e3),
        request_throughput=float(rep["requests_per_s"]),
        output_token_throughput=float(rep["output_tokens_per_s"]),
        error_detail=[f"{n}x {code}" for code, n in (rep.get("status_counts") or {}).items()
                      if code != "OK" and n])


def _pcts(s: dict[str, float]) -> str:
    return " / ".join(f"{s[k]:.1f}" if k in s else "-" for k in ("p50", "p90", "p99"))


def markdown(results: list[ClientResult], meta: dict[str, Any]) -> str:
    lines = [
        "# AIPerf vs pdserve bench on the OpenAI HTTP API",
        "",
        f"{meta['model']} served by {meta['server']}; {meta['host']}; pdserve "
        f"{meta['pdserve_commit']}, {meta['date']}.",
        "",
        f"- AIPerf {meta['aiperf_version']}: `--endpoint-type chat --streaming`, "
        f"{meta['aiperf_load']}, {meta['requests']} measured requests per concurrency after "
        f"{meta['warmup']} warm-up requests. Synthetic prompts of {meta['isl']} tokens by "
        f"AIPerf's count ({meta['prompt_tokens']} as the server counts them, with the chat "
        f"template), {meta['osl']} output tokens forced with `ignore_eos` and `min_tokens`, "
        "greedy; token counts from the server's `usage` (`--use-server-token-count`).",
        "- pdserve bench: `--api http` (`/v1/completions` streamed), the same number of "
        "requests, prompts of the server-counted length as token ids, the same output length, "
        "all arriving at once and held to the concurrency by `--max-in-flight`; run right "
        "after AIPerf at each concurrency.",
        "",
        "| concurrency | client | ok | errors | TTFT p50 / p90 / p99 ms | "
        "ITL p50 / p90 / p99 ms | req/s | output tok/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r.concurrency} | {r.client} | {r.ok} | {r.errors} | {_pcts(r.ttft_ms)} "
                     f"| {_pcts(r.itl_ms)} | {r.request_throughput:.2f} "
                     f"| {r.output_token_throughput:.1f} |")
    lines += [
        "",
        "TTFT: request sent to the first response carrying output. ITL: AIPerf's "
        "inter-token latency, (request latency - TTFT) / (output tokens - 1); for pdserve "
        "bench its TPOT, (last token - first token) / (tokens - 1). req/s: completed requests "
        "over AIPerf's benchmark duration, or over pdserve bench's wall time. Both clients run "
        "on the server's host; see benchmarks/README.md (AIPerf) for how that shows.",
    ]
    errs = [r for r in results if r.errors or r.error_detail]
    if errs:
        lines += ["", "## Errors", ""]
        lines += [f"- {r.client}, concurrency {r.concurrency}: {r.errors} failed; "
                  + "; ".join(r.error_detail) for r in errs]
    if meta.get("bench_hook"):
        lines += ["", f"pdserve bench: {meta['bench_hook']}"]
    lines += ["", "AIPerf's own artifacts (JSON/CSV exports, console table, log): "
              "`benchmarks/results/aiperf/c<N>/`; pdserve bench's: "
              f"`benchmarks/results/aiperf/{BENCH_DIR}/`.", "",
              f"Reproduce: `{meta['command']}`", ""]
    return "\n".join(lines)


def host_info() -> str:
    try:
        from pdserve.cluster.planning.profiler.hostinfo import cpu_model

        cpu = cpu_model()
    except Exception:  # noqa: BLE001 - a description only
        cpu = "unknown CPU"
    return f"{cpu}, {os.cpu_count()} CPUs"


def repo_path(p: Path) -> str:
    return os.path.relpath(p, HERE.parent)


def git_rev() -> str:
    out = subprocess.run(["git", "-C", str(HERE), "describe", "--always", "--dirty"],
                         capture_output=True, text=True, check=False)
    return out.stdout.strip() or "unknown"


# -- one run --------------------------------------------------------------------------
def run_aiperf(aiperf: Path, args, url: str, model: str, tokenizer: str, c: int) -> ClientResult:
    art = args.out_dir / f"c{c}"
    if art.exists():
        shutil.rmtree(art)  # this script's own directory: no stale exports
    art.mkdir(parents=True)
    cmd = aiperf_command(aiperf, args, url, model, tokenizer, c, art)
    note(f"concurrency {c}: aiperf profile ({args.warmup} warm-up + {args.requests} requests)")
    t0 = time.monotonic()
    # Its output is its log (logs/aiperf.log) plus the console table
    # (profile_export_console.txt); kept apart only when the run went wrong.
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          env=aiperf_env(), check=False)
    rc = proc.returncode
    shown = shlex.join([Path(cmd[0]).name, *cmd[1:]])
    if rc != 0 or not (art / "profile_export_aiperf.json").exists():
        (art / "aiperf_stdout.log").write_bytes(proc.stdout)
    if not (art / "profile_export_aiperf.json").exists():
        tail = proc.stdout.decode(errors="replace")[-3000:]
        raise RuntimeError(f"aiperf exited {rc} without results; its output ends:\n{tail}")
    res = read_aiperf(art, c, args.requests)
    res.artifacts, res.command = repo_path(art), shown
    if rc != 0:
        res.error_detail.append(f"aiperf exited with status {rc}")
    note(f"concurrency {c}: aiperf done in {time.monotonic() - t0:.0f} s: {res.ok} ok, "
         f"{res.errors} errors, TTFT p50 {res.ttft_ms.get('p50', 0):.1f} ms, "
         f"ITL p50 {res.itl_ms.get('p50', 0):.1f} ms, {res.request_throughput:.2f} req/s")
    return res


def run_bench(args, url: str, model: str, prompt_tokens: int, c: int) -> ClientResult:
    out = args.out_dir / BENCH_DIR
    out.mkdir(parents=True, exist_ok=True)
    cmd = bench_command(url, model, prompt_tokens, args, c, out)
    note(f"concurrency {c}: pdserve bench --api http ({args.requests} requests)")
    t0 = time.monotonic()
    with open(out / f"http_c{c}.log", "wb") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False).returncode
    path = out / f"http_c{c}.json"
    if rc != 0 or not path.exists():
        tail = (out / f"http_c{c}.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"pdserve bench exited {rc}; its output ends:\n{tail}")
    res = read_bench(path, c)
    res.artifacts, res.command = repo_path(path), shlex.join(["pdserve", *cmd[3:]])
    note(f"concurrency {c}: pdserve bench done in {time.monotonic() - t0:.0f} s: {res.ok} ok, "
         f"{res.errors} errors, TTFT p50 {res.ttft_ms.get('p50', 0):.1f} ms, "
         f"TPOT p50 {res.itl_ms.get('p50', 0):.1f} ms, {res.request_throughput:.2f} req/s")
    return res


def main(argv=None) -> int:
    args = parse_args(argv)
    aiperf = ensure_aiperf(args.venv)
    load_start = os.getloadavg()[0]
    tokenizer = args.tokenizer or demo_model_dir()
    server = None
    if args.url:
        url = args.url.rstrip("/").removesuffix("/v1")
        url = url if "://" in url else f"http://{url}"
        where = f"the endpoint at {url}"
    else:
        url = f"http://127.0.0.1:{args.http_port}"
        server = start_server(args.http_port, args.serve_args, args.out_dir / "serve.log")
        where = ("pdserve serve " + args.serve_args).strip() + " (local Ray, CPU; " + \
            ("defaults: 1 prefill + 1 decode)" if not args.serve_args else "as given)")
    try:
        waited = wait_ready(url, args.ready_timeout, server)
        note(f"{url}/ready answered 200 after {waited:.0f} s")
        model = args.model or served_model(url)
        use_bench = not args.no_pdserve_bench and bench_has_http()
        if not args.no_pdserve_bench and not use_bench:
            note("HOOK: this checkout's pdserve bench has no --api; its runs are skipped")
        if use_bench and (args.out_dir / BENCH_DIR).exists():
            shutil.rmtree(args.out_dir / BENCH_DIR)  # this script's own: no stale runs
        results: list[ClientResult] = []
        prompt_tokens = []
        for c in args.concurrency_list:
            a = run_aiperf(aiperf, args, url, model, tokenizer, c)
            results.append(a)
            prompt_tokens.append(a.prompt_tokens)
            if use_bench:
                results.append(run_bench(args, url, model, round(a.prompt_tokens) or args.isl, c))
        if server is not None and server.poll() is not None:
            raise RuntimeError(f"pdserve serve exited with {server.returncode} during the run")
        hook = None
        if not args.no_pdserve_bench and not use_bench:
            # HOOK (pdserve bench --api http): the command each concurrency will run.
            c = args.concurrency_list[0]
            example = shlex.join(["pdserve", *bench_command(
                url, model, round(prompt_tokens[0]) or args.isl, args, c, args.out_dir / BENCH_DIR
            )[3:]])
            hook = (f"not run: this checkout's `pdserve bench` has no `--api` yet; per "
                    f"concurrency it will run (here for {c}): `{example}`")
            note(f"pdserve bench {hook}")
    finally:
        if server is not None:
            stop_server(server)

    shown_argv = list(argv if argv is not None else sys.argv[1:])
    meta = {
        "model": model, "server": where,
        "host": f"{host_info()}, 1-min load average {load_start:.1f} at the start and "
                f"{os.getloadavg()[0]:.1f} at the end", "pdserve_commit": git_rev(),
        "aiperf_version": aiperf_version(args.venv), "requests": args.requests,
        "warmup": args.warmup, "isl": args.isl, "osl": args.osl,
        "prompt_tokens": " / ".join(sorted({f"{p:g}" for p in prompt_tokens})),
        "concurrencies": args.concurrency_list, "url": url, "tokenizer": tokenizer,
        "aiperf_load": ("`--concurrency N --request-rate "
                        f"{args.rate_cap:g} --arrival-pattern constant` (closed loop; the rate "
                        "only paces AIPerf's slot checks)" if args.rate_cap
                        else "`--concurrency N` (closed loop)"),
        "command": shlex.join(["python", "benchmarks/aiperf_openai.py", *shown_argv]),
        "bench_hook": hook, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    text = markdown(results, meta)
    args.summary.parent.mkdir(parents=True, exist_ok=True)
    args.summary.write_text(text)
    args.summary.with_suffix(".json").write_text(json.dumps(
        {"meta": meta, "results": [asdict(r) for r in results]}, indent=2) + "\n")
    print(text)
    failed = sum(r.errors for r in results)
    note(f"summary: {args.summary} (+ .json); AIPerf artifacts under {args.out_dir}")
    if failed:
        note(f"{failed} requests failed; see the Errors section and the artifacts")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
