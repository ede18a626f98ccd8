#!/usr/bin/env bash
# The one script for the GPU host (H100/H200 lent through the device tool): installs the
# carried wheels, runs the GPU tests and benchmarks, writes results to $OUT.
#
#   bash benchmarks/gpu/run.sh [STAGE ...]          (default: all)
#
# Stages run in this order (most wanted first, so that what a short budget skips is the
# least wanted), whatever order they are given in:
#   setup        always runs first: install wheels/ (--no-deps, into $WORK/site), build the
#                pdserve import shim, print the device, check `import flashinfer`; then, if
#                any stage below needs the GPU, jit_warmup.py compiles every FlashInfer
#                variant in parallel (minutes on a fresh machine, seconds once cached)
#   tests        python -m pytest -m gpu tests/gpu (CUDA graphs vs eager, disaggregated
#                greedy over CUDA IPC, FlashInfer vs torch, model vs transformers, ...)
#   micro        cuda_ipc_bandwidth.py --profile (8B KV, two processes; sender phases timed)
#   model        make_checkpoint.py (8B), decode_floor.py (CUDA graphs and eager), and
#                prefill_flops.py
#   hf           vs_hf_generate.py (8B; engine with graphs, engine eager, transformers)
#   correctness  attention_correctness.py, model_vs_hf.py (Llama-3.2-1B shape)
#   prefill      make_checkpoint.py (8B), prefill_flops.py (only)
#   serve        pd_vs_colocated.py (8B, Azure trace, separate processes vs colocated)
#   all          every stage above: the one call of a device session
# Every call ends by merging everything in $WORK/results into $OUT/gpu_results.{json,md}
# (report.py), so on a machine kept warm between calls the last call returns all results.
#
# A device session has 15 minutes for all its calls (start-up included) and one call may
# run 600 s, so `all` is sized for one call of about 8 minutes: the script keeps a budget
# (BUDGET_S, default 470 s from its start) and sizes the long benchmarks down when it runs
# them all (SIZE=quick, the default for `all`: fewer repetitions, a shorter trace); a
# benchmark that would not fit what is left is skipped and named in the summary, for the
# reserve call (e.g. `run.sh serve`). SIZE=full gives every benchmark its full size.
#   run(carry=["wheels"], command="bash benchmarks/gpu/run.sh all", timeout_s=540)
#
# Environment: GPU_TESTS (test files/ids under tests/gpu to run instead of all of them),
# OUT (default ./gpu-results), PDSERVE_GPU_WORK (default /tmp/pdserve-gpu:
# site packages, shim, checkpoints, FlashInfer JIT cache, per-benchmark JSON), PYTHON
# (default python3), BUDGET_S, TESTS_MAX_S (default 200), SIZE (quick | full),
# PDSERVE_GPU_PREFILL_BACKEND (FlashInfer prefill kernels for every test and benchmark,
# default fa2; passed to each as a flag and from there into
# EngineConfig.flashinfer_prefill_backend), DRY_RUN=1 (CPU smoke test of this script: no
# wheels, every benchmark with --dry-run).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
OUT="${OUT:-$REPO/gpu-results}"
WORK="${PDSERVE_GPU_WORK:-/tmp/pdserve-gpu}"
SITE="$WORK/site"
SHIM="$WORK/shim"
RESULTS="$WORK/results"
PY="${PYTHON:-python3}"
# Absolute, since some steps run from $WORK (a venv's python must keep its own path).
[[ "$PY" == */* && "$PY" != /* ]] && PY="$REPO/$PY"
BUDGET_S="${BUDGET_S:-470}"
DRY_RUN="${DRY_RUN:-0}"
START=$(date +%s)
mkdir -p "$OUT" "$WORK" "$RESULTS"

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PDSERVE_GPU_WORK="$WORK"
export FLASHINFER_CUDA_ARCH_LIST="${FLASHINFER_CUDA_ARCH_LIST:-9.0a}"   # H100 and H200: SM90
export FLASHINFER_WORKSPACE_BASE="${FLASHINFER_WORKSPACE_BASE:-$WORK/flashinfer-jit}"
# FlashInfer's prefill kernels: "fa2" unless told otherwise. On Hopper FlashInfer's "auto"
# picks FA3, whose modules take nvcc minutes of CPU per kernel file (8 variants x 10 files:
# more than one 10-minute call); FA2 modules build in about a minute each, here or ahead of
# time (flashinfer_aot.py). PDSERVE_GPU_PREFILL_BACKEND=auto or fa3 to compare. The engine
# reads no environment for this: every script gets it as --prefill-backend, pytest as
# --flashinfer-prefill-backend, and passes it into EngineConfig.
PREFILL_BACKEND="${PDSERVE_GPU_PREFILL_BACKEND:-fa2}"
PB=(--prefill-backend "$PREFILL_BACKEND")
DRY=()
[ "$DRY_RUN" = 1 ] && DRY=(--dry-run)

elapsed() { echo $(( $(date +%s) - START )); }
remaining() { echo $(( BUDGET_S - $(elapsed) )); }
STATUS=()
note() { STATUS+=("$1"); echo "== $1"; }

# bench NAME SECONDS_NEEDED command... : run under the remaining budget, record the outcome.
bench() {
  local name="$1" need="$2"; shift 2
  local left; left=$(remaining)
  if [ "$left" -lt "$need" ]; then
    note "$name: SKIPPED (needs ~${need}s, ${left}s left): run it in another call"
    return 0
  fi
  echo "== $name (t=$(elapsed)s, ${left}s left): $*"
  local t0=$SECONDS
  timeout --kill-after=10 $(( left - 5 )) "$@"
  local rc=$?
  case $rc in
    0) note "$name: ok ($(( SECONDS - t0 ))s)" ;;
    124|137) note "$name: TIMED OUT after $(( SECONDS - t0 ))s" ;;
    *) note "$name: exit $rc ($(( SECONDS - t0 ))s)" ;;
  esac
}

install_wheels() {
  if [ -f "$SITE/.installed" ]; then
    echo "wheels already installed in $SITE"
    return 0
  fi
  local w="$REPO/wheels"
  if ! ls "$w"/flashinfer_python-*.whl >/dev/null 2>&1; then
    echo "ERROR: no wheels/flashinfer_python-*.whl: run benchmarks/gpu/fetch_wheels.sh on a" \
         "machine with registry access and pass carry=[\"wheels\"] to the device tool" >&2
    return 1
  fi
  local pick=("$w"/flashinfer_python-*.whl "$w"/apache_tvm_ffi-*.whl
              "$w"/grpcio_health_checking-*.whl "$w"/grpcio_reflection-*.whl
              "$w"/xxhash-*cp312*.whl)
  # The fallbacks only where the host's own copy is missing or too old (never shadow it
  # needlessly): "wheel-prefix import-name distribution minimum-version".
  local missing
  missing=$("$PY" - <<'EOF'
import importlib.metadata as md, importlib.util
def ver(v):
    return tuple(int(x) for x in v.split("+")[0].split(".")[:3] if x.isdigit())
rows = [("packaging", "packaging", "packaging", None), ("requests", "requests", "requests", None),
        ("urllib3", "urllib3", "urllib3", None), ("idna", "idna", "idna", None),
        ("certifi", "certifi", "certifi", None), ("nvidia_ml_py", "pynvml", "nvidia-ml-py", None),
        ("tqdm", "tqdm", "tqdm", None), ("ninja", "ninja", "ninja", None),
        ("pytest", "pytest", "pytest", None), ("pluggy", "pluggy", "pluggy", None),
        ("pygments", "pygments", "pygments", None),
        ("iniconfig", "iniconfig", "iniconfig", None),
        ("typing_extensions", "typing_extensions", "typing-extensions", "4.16"),
        ("msgspec", "msgspec", "msgspec", "0.18"),
        ("annotated_types", "annotated_types", "annotated-types", "0.6"),
        ("typing_inspection", "typing_inspection", "typing-inspection", "0.4.4"),
        # pydantic and its compiled core only as a pair (pydantic pins the core's version)
        ("pydantic pydantic_core", "pydantic", "pydantic", "2.6"),
        ("protobuf", "google.protobuf", "protobuf", "7.35.1"),
        ("grpcio", "grpc", "grpcio", "1.85.1")]
for prefix, mod, dist, least in rows:
    try:
        found = importlib.util.find_spec(mod) is not None
    except ModuleNotFoundError:
        found = False
    if found and least:
        try:
            found = ver(md.version(dist)) >= ver(least)
        except md.PackageNotFoundError:
            found = False
    if not found:
        print(prefix)
EOF
)
  for p in $missing; do   # word-split: the row "pydantic pydantic_core" gives both
    echo "host lacks $p (or it is too old): installing the carried wheel"
    pick+=("$w/$p"-*.whl)
  done
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "${pick[@]}" || return 1
  touch "$SITE/.installed"
}

setup() {
  echo "== setup (repo $REPO, work $WORK, out $OUT)"
  if [ "$DRY_RUN" != 1 ]; then
    install_wheels || { note "setup: wheel install FAILED"; return 1; }
    # FlashInfer modules built ahead of time here (flashinfer_aot.py build), carried in
    # wheels/: loaded as they are, so no call pays nvcc for them.
    if ls "$REPO"/wheels/flashinfer_aot/*.so >/dev/null 2>&1; then
      "$PY" benchmarks/gpu/flashinfer_aot.py install --src "$REPO/wheels/flashinfer_aot" \
        --site "$SITE" || echo "WARNING: AOT install failed; FlashInfer will compile on use"
    fi
  fi
  export PATH="$SITE/bin:$PATH"
  export PYTHONPATH="$SHIM:$SITE${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" benchmarks/gpu/pdserve_path.py "$SHIM" >/dev/null || {
    note "setup: pdserve shim FAILED"; return 1; }
  # FlashInfer's JIT finds nvcc and the CUDA headers through CUDA_HOME.
  if [ -z "${CUDA_HOME:-}" ]; then
    for c in /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc || echo /x/x)")")")"; do
      if [ -x "$c/bin/nvcc" ] && [ -f "$c/include/cuda_runtime.h" ]; then export CUDA_HOME="$c"; break; fi
    done
  fi
  command -v nvidia-smi >/dev/null && nvidia-smi
  command -v nvcc >/dev/null && nvcc --version | tail -2
  echo "ninja: $(command -v ninja || echo missing)  CUDA_HOME=${CUDA_HOME:-unset}"
  # From $WORK, not the repo root: `python -c/-m/-` put the current directory first on
  # sys.path, where the repo's bare pdserve/ folder would hide the shim's full package.
  (cd "$WORK" && SHIM="$SHIM" "$PY" - <<'EOF') || { note "setup: imports FAILED"; return 1; }
import importlib, os, sys, torch
import pdserve
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| pdserve from", os.path.dirname(pdserve.__file__))
if not pdserve.__file__.startswith(os.environ["SHIM"]):
    sys.exit(f"pdserve was imported from {pdserve.__file__}, not from the shim")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device:", torch.cuda.get_device_name(0), f"sm_{p.major}{p.minor}", p.multi_processor_count,
          "SMs", round(p.total_memory / 2**30, 1), "GiB")
for m in ("pdserve.engine.llm_engine", "pdserve.cluster.launch.local", "pdserve.router.server",
          "pdserve.cluster.cli.replay.loadgen", "transformers"):
    importlib.import_module(m)
if os.environ.get("DRY_RUN") != "1":
    import flashinfer
    print("flashinfer", flashinfer.__version__, "from", os.path.dirname(flashinfer.__file__))
print("imports ok")
EOF
  note "setup: ok ($(elapsed)s)"
}

want() { [[ " $STAGES " == *" $1 "* || " $STAGES " == *" all "* ]]; }
STAGES="${*:-all}"
# quick: the sizes that let `all` fit one call (see the header); full: each script's own.
SIZE="${SIZE:-$([[ " $STAGES " == *" all "* ]] && echo quick || echo full)}"
QUICK_HF=() QUICK_DECODE=() QUICK_PREFILL=() QUICK_SERVE=()
if [ "$SIZE" = quick ]; then
  QUICK_HF=(--reps 2)
  QUICK_DECODE=(--warmup 3 --reps 20)
  QUICK_PREFILL=(--warmup 2 --reps 5)
  QUICK_SERVE=(--num-requests 80 --check-prompts 2)
fi

main() {
echo "pdserve GPU run: stages [$STAGES], size $SIZE, budget ${BUDGET_S}s, prefill kernels" \
     "$PREFILL_BACKEND, dry run $DRY_RUN, $(date -u +%FT%TZ)"

G=benchmarks/gpu
if setup; then
  if [ "$DRY_RUN" != 1 ] && { want tests || want correctness || want model || want prefill || want hf || want serve; }; then
    # Compile every FlashInfer variant at once (parallel ninja runs); cached afterwards.
    bench jit_warmup 60 "$PY" $G/jit_warmup.py --out "$RESULTS" "${PB[@]}"
  fi
  if want tests; then
    # Run from $WORK for the same reason as the import check in setup.
    # GPU_TESTS="test_a.py test_b.py::name" runs only those (files under tests/gpu/).
    TEST_ARGS=()
    for t in ${GPU_TESTS:-}; do TEST_ARGS+=("$REPO/tests/gpu/$t"); done
    [ "${#TEST_ARGS[@]}" -gt 0 ] || TEST_ARGS=("$REPO/tests/gpu")
    # At most TESTS_MAX_S (default 200 s): a hung test must not eat the benchmarks' budget.
    bench tests 150 timeout --kill-after=10 "${TESTS_MAX_S:-200}" \
      bash -c 'cd "$0" && exec "$@"' "$WORK" "$PY" -m pytest -q -m gpu \
      "${TEST_ARGS[@]}" --rootdir "$REPO" -c "$REPO/pyproject.toml" -p no:cacheprovider \
      --flashinfer-prefill-backend "$PREFILL_BACKEND" --junitxml="$RESULTS/pytest.xml"
  fi
  if want micro; then
    bench cuda_ipc_bandwidth 60 "$PY" $G/cuda_ipc_bandwidth.py --out "$RESULTS" --profile \
      "${DRY[@]}"
  fi
  if want model || want prefill || want hf; then
    bench make_checkpoint_8b 60 "$PY" $G/make_checkpoint.py --shape llama3-8b "${DRY[@]}"
  fi
  if want model; then
    bench decode_floor 90 "$PY" $G/decode_floor.py --out "$RESULTS" "${PB[@]}" \
      "${QUICK_DECODE[@]}" "${DRY[@]}"
  fi
  if want hf; then
    bench vs_hf_generate 100 "$PY" $G/vs_hf_generate.py --out "$RESULTS" "${PB[@]}" \
      "${QUICK_HF[@]}" "${DRY[@]}"
  fi
  if want correctness; then
    bench attention_correctness 40 "$PY" $G/attention_correctness.py --out "$RESULTS" \
      "${PB[@]}" "${DRY[@]}"
    bench model_vs_hf 60 "$PY" $G/model_vs_hf.py --out "$RESULTS" "${PB[@]}" "${DRY[@]}"
  fi
  if want model || want prefill; then
    # FA3 beside FA2 where its 8B module was carried (compiling it here takes minutes);
    # not in a quick run (measured before: within 5% of FA2).
    CMP=()
    if [ "$DRY_RUN" != 1 ] && [ "$SIZE" = full ] && [ "$PREFILL_BACKEND" = fa2 ] && ls \
        "$REPO"/wheels/flashinfer_aot/*dtype_q_bf16_*head_dim_qk_128_*_sm90.so >/dev/null 2>&1; then
      CMP=(--compare-backends fa3)
    fi
    bench prefill_flops 50 "$PY" $G/prefill_flops.py --out "$RESULTS" "${PB[@]}" "${CMP[@]}" \
      "${QUICK_PREFILL[@]}" "${DRY[@]}"
  fi
  if want serve; then
    bench pd_vs_colocated 150 "$PY" $G/pd_vs_colocated.py --out "$RESULTS" "${PB[@]}" \
      "${QUICK_SERVE[@]}" "${DRY[@]}"
  fi
fi

# Modules FlashInfer compiled here (none were carried for them): send them back, so that
# they can be added to wheels/flashinfer_aot/ for the next call.
if [ "$DRY_RUN" != 1 ] && [ -d "$FLASHINFER_WORKSPACE_BASE" ]; then
  mapfile -t NEW_SO < <(find "$FLASHINFER_WORKSPACE_BASE" -path '*cached_ops*' -name '*.so' 2>/dev/null)
  if [ "${#NEW_SO[@]}" -gt 0 ]; then
    tar -cf "$OUT/flashinfer_jit_built.tar" -C / "${NEW_SO[@]#/}" 2>/dev/null
    echo "== ${#NEW_SO[@]} FlashInfer module(s) compiled on this host: $OUT/flashinfer_jit_built.tar ($(du -m "$OUT/flashinfer_jit_built.tar" | cut -f1) MiB)"
  fi
fi

echo "== report"
"$PY" $G/report.py --out "$OUT" "$RESULTS" >/dev/null || note "report: FAILED"
# The same report named after the device (gpu_nvidia_h200...), as committed under
# benchmarks/results/.
"$PY" $G/report.py --out "$OUT" --stem auto "$RESULTS" >/dev/null || note "report (device name): FAILED"
[ -f "$OUT/gpu_results.md" ] && cat "$OUT/gpu_results.md"
echo
echo "== summary ($(elapsed)s of ${BUDGET_S}s)"
for s in "${STATUS[@]}"; do echo "  $s"; done
echo "results: $OUT/gpu_results.json, $OUT/gpu_results.md, log $OUT/run.log"
for s in "${STATUS[@]}"; do
  case "$s" in *FAILED*|*"TIMED OUT"*|*": exit "*) return 1 ;; esac
done
}

main 2>&1 | tee -a "$OUT/run.log"
