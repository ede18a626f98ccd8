"""The serving code of another git revision, importable as ``pdserve``: for A/B runs.

``export_revision(rev, dest)`` extracts every ``pdserve`` subpackage of revision ``rev``
(``git archive``) into ``dest`` laid out as the installed package (``dest/pdserve/router``
and so on, as ``pyproject.toml``'s package-dir maps them), except ``pdserve.benchmarks``,
which stays this checkout's, so the same harness measures both revisions. Put ``dest``
first on ``PYTHONPATH`` and a process (and the Ray workers it starts, which inherit its
environment) imports the old code: a path entry is searched before the editable
install's finder.
"""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# subpackage -> folder in the repository (pyproject.toml, [tool.setuptools] package-dir)
SERVING_FOLDERS = {"": "pdserve", "engine": "engine", "kv_transfer": "kv_transfer",
                   "prefill_worker": "prefill_worker", "decode_worker": "decode_worker",
                   "router": "router", "cluster": "cluster", "protos": "protos",
                   "workloads": "workloads"}


def export_revision(rev: str, dest: Path) -> Path:
    """Write revision ``rev``'s serving code under ``dest``; returns the path entry."""
    folders = list(SERVING_FOLDERS.values())
    tar = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", "--format=tar", rev, *folders],
                         check=True, capture_output=True).stdout
    src = dest / "src"
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        # (the "data" filter refuses links out of dest; Pythons before 3.10.12 lack it)
        t.extractall(src, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    pkg = dest / "pdserve"
    pkg.mkdir(parents=True, exist_ok=True)
    for f in (src / "pdserve").iterdir():
        (pkg / f.name).write_bytes(f.read_bytes())
    for sub, folder in SERVING_FOLDERS.items():
        if sub:
            (pkg / sub).symlink_to(src / folder, target_is_directory=True)
    (pkg / "benchmarks").symlink_to(REPO_ROOT / "benchmarks", target_is_directory=True)
    return dest


def revision_name(rev: str) -> str:
    """``rev`` as a short commit hash (for the results)."""
    return subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", rev],
                          check=True, capture_output=True, text=True).stdout.strip()
