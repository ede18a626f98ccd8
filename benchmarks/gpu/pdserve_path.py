"""Make ``import pdserve`` work from this working tree where pdserve cannot be installed.

The GPU host reaches no package registry, so ``pip install -e .`` (which would want
setuptools>=69 and the project's dependencies) is not an option there. pyproject.toml maps
the repository's top-level folders into one namespace (``pdserve.engine`` = ``engine/``,
...); this script builds the same layout out of symbolic links:

    <dest>/pdserve/__init__.py -> <repo>/pdserve/__init__.py   (and the other files there)
    <dest>/pdserve/engine      -> <repo>/engine                (one link per package-dir)

so that ``PYTHONPATH=<dest>`` gives ``pdserve.*`` straight from the working tree (edits
show up at once; nothing is copied). The mapping is read from pyproject.toml, the one
place it is written down.

Ray is not installed on the GPU host, and nothing run there needs it: the builders
(``*_worker/build.py``, ``router/build.py``) import no Ray; only the thin actor modules
(``*/actor.py``) do.

    python benchmarks/gpu/pdserve_path.py /tmp/pdserve-shim   # prints the directory
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

REPO = Path(__file__).resolve().parents[2]


def package_dirs(repo: Path = REPO) -> dict[str, str]:
    text = (repo / "pyproject.toml").read_text()
    if tomllib is not None:
        return dict(tomllib.loads(text)["tool"]["setuptools"]["package-dir"])
    # Fallback parse of the one inline table (only for Python 3.10 hosts).
    line = next(x for x in text.splitlines() if x.startswith("package-dir"))
    body = line.split("{", 1)[1].rsplit("}", 1)[0]
    pairs = (item.split("=") for item in body.split(","))
    return {k.strip().strip('"'): v.strip().strip('"') for k, v in pairs}


def build_shim(dest: Path, repo: Path = REPO) -> Path:
    """(Re)create ``dest`` and return it; put it first on ``sys.path`` / ``PYTHONPATH``."""
    dest = dest.resolve()
    mapping = package_dirs(repo)
    root = mapping.pop("pdserve")
    pkg = dest / "pdserve"
    if pkg.exists() or pkg.is_symlink():
        shutil.rmtree(pkg)
    pkg.mkdir(parents=True)
    for f in (repo / root).iterdir():
        if f.suffix == ".py":
            (pkg / f.name).symlink_to(f)
    for name, folder in mapping.items():
        parts = name.split(".")
        if parts[0] != "pdserve" or len(parts) != 2:
            raise ValueError(f"unexpected package-dir entry {name!r}")
        (pkg / parts[1]).symlink_to(repo / folder, target_is_directory=True)
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dest", type=Path)
    args = ap.parse_args(argv)
    print(build_shim(args.dest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
