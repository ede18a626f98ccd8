#!/usr/bin/env bash
# Set up (if needed) and serve pdserve on the embedded default: local Ray, the demo model, CPU.
# Extra arguments go to `pdserve serve` (e.g. --prefill 2 --decode 2 --model /path/to/hf-dir).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
exec pdserve serve "$@"
