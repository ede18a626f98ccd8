#!/usr/bin/env bash
# Set up (if needed) and run the test suite: lint, then pytest (unit + integration; GPU tests
# skip without a GPU). Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$ROOT"
# Prometheus/promtool (Debian package) for the rules tests and the end-to-end metrics test;
# those tests skip cleanly if this is not possible (not root, no apt).
if ! command -v promtool >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
    && [ "$(id -u)" = 0 ]; then
  echo "pdserve: installing prometheus (Debian package) for the metrics tests" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus) \
    >/dev/null 2>&1 || echo "pdserve: could not install prometheus; its tests will skip" >&2
fi
ruff check .
# pytest exits 5 when it collects no test; that counts as a failure here too.
exec python -m pytest -q "$@"
