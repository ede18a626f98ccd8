#!/usr/bin/env bash
# Set up (if needed) and run the test suite: lint, then pytest (unit + integration; GPU tests
# skip without a GPU). Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$ROOT"
ruff check .
# pytest exits 5 when it collects no test; that counts as a failure here too.
exec python -m pytest -q "$@"
