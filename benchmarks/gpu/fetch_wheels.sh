#!/usr/bin/env bash
# Download, on a machine WITH registry access, the wheels the GPU host lacks, into wheels/
# (git-ignored). The device tool's `carry: ["wheels"]` then brings them to the GPU host,
# where benchmarks/gpu/run.sh installs them with --no-deps (that host reaches no registry).
#
# GPU host: Python 3.12, torch 2.11 + CUDA 13, x86-64, no Ray. What goes in wheels/:
#   required  flashinfer-python (pure python + JIT sources) and apache-tvm-ffi (what
#             `import flashinfer` loads compiled kernels through);
#             grpcio-health-checking, grpcio-reflection (the router's gRPC server imports
#             them; the GPU image has grpcio but not these two); xxhash (the KV
#             checksum, kv_transfer/checksum.py; a compiled wheel, cp312).
#   fallback  packaging, requests, urllib3, idna, certifi, nvidia-ml-py, tqdm, ninja,
#             typing-extensions (flashinfer's and tvm-ffi's import/JIT needs), pytest,
#             pluggy, iniconfig, pygments (the GPU tests),
#             protobuf, grpcio (our generated code needs protobuf >= 7.35.1 and
#             grpcio >= 1.85.1), msgspec (the router <-> prefill channel's frames),
#             pydantic with pydantic-core, annotated-types, typing-inspection (the OpenAI
#             HTTP front end's models; the GPU image has neither): run.sh installs one of these only if the host's own copy
#             is missing or too old, so a host copy is never shadowed needlessly.
#   data      wheels/data/azure_llm_2023_conv.csv, a copy of ../shared/data's trace for
#             the trace-replay benchmark (../shared does not travel; wheels/ is never
#             committed, so the trace stays out of the project).
#
# Usage: bash benchmarks/gpu/fetch_wheels.sh            # flashinfer 0.6.13 (default)
#        FLASHINFER_VERSION=0.5.3 bash benchmarks/gpu/fetch_wheels.sh
# Keep one version of each package in wheels/: the script removes older flashinfer wheels.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DEST="${WHEELS_DIR:-$REPO/wheels}"
PY="${PYTHON:-$REPO/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
FLASHINFER_VERSION="${FLASHINFER_VERSION:-0.6.13}"

# name==version, pinned so every GPU run installs the same bits.
REQUIRED=(
  "flashinfer-python==${FLASHINFER_VERSION}"
  "apache-tvm-ffi==0.1.15.post2"
  "grpcio-health-checking==1.85.1"
  "grpcio-reflection==1.85.1"
  "xxhash==4.1.0"
)
FALLBACK=(
  "packaging==26.3"
  "requests==2.34.2"
  "urllib3==2.8.0"
  "idna==3.20"
  "certifi==2026.10.19.post1"
  "nvidia-ml-py==13.615.71"
  "tqdm==4.70.1"
  "ninja==1.13.2"
  "pytest==9.2.0"
  "pluggy==1.7.0"
  "iniconfig==2.3.1"
  "pygments==2.21.0"
  "typing_extensions==4.16.0"
  "protobuf==7.36.2"
  "grpcio==1.85.3"
  "msgspec==0.23.0"
  "pydantic==2.14.4"
  "pydantic_core==2.50.5"
  "annotated_types==0.8.0"
  "typing_inspection==0.4.5"
)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux1_x86_64 --platform any)

mkdir -p "$DEST"
find "$DEST" -maxdepth 1 -name 'flashinfer_python-*.whl' ! -name "flashinfer_python-${FLASHINFER_VERSION}-*" -delete
for spec in "${REQUIRED[@]}" "${FALLBACK[@]}"; do
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${PLATFORMS[@]}" -d "$DEST" "$spec"
done

TRACE_SRC="${TRACE_SRC:-$REPO/../shared/data/azure_llm_2023_conv.csv}"
if [ -f "$TRACE_SRC" ]; then
  mkdir -p "$DEST/data"
  cp "$TRACE_SRC" "$DEST/data/azure_llm_2023_conv.csv"
else
  echo "note: no trace at $TRACE_SRC; pd_vs_colocated.py will fall back to a synthetic trace" >&2
fi

echo "wheels in $DEST:"
ls -l "$DEST"/*.whl | awk '{printf "  %8.2f MiB  %s\n", $5/1048576, $NF}'
total=$(du -cb "$DEST" | tail -1 | cut -f1)
awk -v t="$total" 'BEGIN { printf "total %.2f MiB (the device tool carries at most 64 MiB with the working tree)\n", t/1048576 }'
if [ "$total" -gt $((40 * 1048576)) ]; then
  echo "error: wheels/ is over 40 MiB" >&2
  exit 1
fi
