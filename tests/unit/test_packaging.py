"""Every Python package folder of the repository is listed in pyproject.toml (a wheel would
silently miss one that is not), and the CLI knows every documented subcommand."""

from __future__ import annotations

import sys
from pathlib import Path

from pdserve.cluster.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[2]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = None


def test_every_package_folder_is_packaged():
    if tomllib is None:
        return
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = cfg["package-dir"]
    listed = set(cfg["packages"])
    found = set()
    for pkg, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([pkg, *rel.parts]) if rel.parts else pkg)
    assert found <= listed, f"not in pyproject packages: {sorted(found - listed)}"


def test_cli_has_every_subcommand():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"serve", "generate", "complete", "demo-model", "profile", "simulate", "plan",
            "bench"} <= set(sub.choices)
