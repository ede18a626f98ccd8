"""Generate pdserve's Grafana dashboards, and list every PromQL query they run.

The dashboards in ``deploy/grafana/dashboards/*.json`` are this script's output, committed
so Grafana can provision them without running Python; a unit test checks they match.

    python deploy/grafana/generate.py           # rewrite the JSON files
    python deploy/grafana/generate.py --check   # exit 1 if a committed file is stale

Helpers for tests (load this file by path; it is not part of the ``pdserve`` package):

    import importlib.util
    spec = importlib.util.spec_from_file_location("pdserve_grafana", "deploy/grafana/generate.py")
    gen = importlib.util.module_from_spec(spec); spec.loader.exec_module(gen)

- ``all_queries(values=None)`` -> ``[(dashboard_uid, panel_title, expr), ...]`` for every
  target of every panel of the committed dashboards, ready to send to Prometheus. Template
  variables are substituted: ``$model``/``${model}``/``[[model]]`` (and ``pool``,
  ``worker``) by ``values[name]`` if given, else by ``.*``, the variables' "All" value.
  Every variable is used as a regex matcher (``label=~"$var"``), so ``.*`` matches every
  series and a plain value matches that one. Grafana's interval variables become fixed
  durations: ``$__rate_interval`` -> ``1m``, ``$__interval`` -> ``15s``,
  ``$__range`` -> ``1h``.
- ``recording_rule_names()`` -> the ``record:`` names in ``deploy/prometheus/rules/*.yml``.
- ``dashboards()`` -> ``{file name: dashboard dict}`` as generated.

The builders live in ``dashboards_lib/`` next to this file (panels, layout, one module per
dashboard, the query helpers); this file puts its own folder on ``sys.path`` so that
loading it by path, as above, finds them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from dashboards_lib.cluster import cluster_dashboard  # noqa: E402
from dashboards_lib.queries import (  # noqa: E402
    DASHBOARDS_DIR,
    all_queries,
    iter_panels,
    load_dashboards,
    recording_rule_names,
    substitute,
)
from dashboards_lib.slo import slo_dashboard  # noqa: E402

# The helpers tests load this file for (module docstring), with the generator's own API.
__all__ = ["all_queries", "dashboards", "iter_panels", "load_dashboards", "main",
           "recording_rule_names", "render", "substitute"]


def dashboards() -> dict[str, dict]:
    return {"pdserve-slo.json": slo_dashboard(), "pdserve-cluster.json": cluster_dashboard()}


def render(board: dict) -> str:
    return json.dumps(board, indent=2, sort_keys=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if a committed dashboard differs from the generator")
    args = parser.parse_args(argv)
    stale = []
    for name, board in dashboards().items():
        path = DASHBOARDS_DIR / name
        text = render(board)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            DASHBOARDS_DIR.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"stale: {', '.join(stale)}; run python deploy/grafana/generate.py",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
