"""Regenerate (or check) the checked-in Python code for ``protos/pdserve.proto``.

Usage::

    python scripts/gen_protos.py          # rewrite protos/pdserve_pb2{.py,.pyi,_grpc.py}
    python scripts/gen_protos.py --check  # exit 1 (with a diff summary) if they are stale

Contract: the generated modules import each other as ``pdserve.protos.pdserve_pb2``,
matching how the package is installed (``protos/`` -> ``pdserve.protos``). protoc derives
Python import paths from the ``.proto`` path relative to its ``-I`` root, so the proto is
copied into a temporary ``pdserve/protos/`` tree before compiling; compiling it in place
would emit ``import pdserve_pb2``, which only works with ``protos/`` on ``sys.path``.

Generation is deterministic for a given grpcio-tools version, so ``--check`` (and the unit
test that calls ``check()``) fails when the ``.proto`` was edited without regenerating,
or when the files were generated with a different grpcio-tools.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.resources
import shutil
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = REPO_ROOT / "protos"
PROTO_NAME = "pdserve.proto"
# The package path the generated code must use in its imports.
PACKAGE_PATH = Path("pdserve") / "protos"
GENERATED = ("pdserve_pb2.py", "pdserve_pb2.pyi", "pdserve_pb2_grpc.py")


def generate(proto_dir: Path = PROTO_DIR) -> dict[str, str]:
    """Compile ``proto_dir/pdserve.proto`` and return ``{file name: generated text}``.

    Writes nothing under ``proto_dir``. Raises ``RuntimeError`` if protoc fails.
    """
    from grpc_tools import protoc

    # grpc_tools ships the well-known types (google/protobuf/*.proto) in its package;
    # protoc.main does not add that include path on its own.
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory(prefix="pdserve-protoc-") as tmp:
        src_root = Path(tmp) / "src"
        out_root = Path(tmp) / "out"
        (src_root / PACKAGE_PATH).mkdir(parents=True)
        out_root.mkdir()
        shutil.copyfile(proto_dir / PROTO_NAME, src_root / PACKAGE_PATH / PROTO_NAME)
        with importlib.resources.as_file(well_known) as well_known_dir:
            args = [
                "grpc_tools.protoc",  # argv[0], ignored by protoc
                f"-I{src_root}",
                f"-I{well_known_dir}",
                f"--python_out={out_root}",
                f"--pyi_out={out_root}",
                f"--grpc_python_out={out_root}",
                str(PACKAGE_PATH / PROTO_NAME),
            ]
            rc = protoc.main(args)
        if rc != 0:
            raise RuntimeError(f"protoc failed with exit code {rc}")
        out_dir = out_root / PACKAGE_PATH
        return {name: (out_dir / name).read_text(encoding="utf-8") for name in GENERATED}


def check(proto_dir: Path = PROTO_DIR) -> list[str]:
    """Problems with the checked-in generated files (empty list = up to date).

    Each entry names a file and summarizes how it differs from a fresh generation.
    """
    problems: list[str] = []
    for name, fresh in generate(proto_dir).items():
        path = proto_dir / name
        if not path.is_file():
            problems.append(f"{name}: missing")
            continue
        current = path.read_text(encoding="utf-8")
        if current == fresh:
            continue
        diff = list(
            difflib.unified_diff(
                current.splitlines(),
                fresh.splitlines(),
                fromfile=f"checked-in/{name}",
                tofile=f"fresh/{name}",
                lineterm="",
                n=1,
            )
        )
        changed = sum(
            1 for line in diff if line[:1] in "+-" and not line.startswith(("+++", "---"))
        )
        # Show only the head of the diff: generated descriptors are single huge lines.
        preview = "\n".join(line[:200] for line in diff[:20])
        problems.append(f"{name}: stale ({changed} changed lines)\n{preview}")
    return problems


def write(proto_dir: Path = PROTO_DIR) -> list[Path]:
    """Regenerate the files into ``proto_dir``; returns the paths written."""
    written = []
    for name, text in generate(proto_dir).items():
        path = proto_dir / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="do not write; exit 1 if the checked-in generated files are out of date",
    )
    args = parser.parse_args(argv)
    if args.check:
        problems = check()
        if problems:
            print("generated protobuf code is out of date; run scripts/gen_protos.py")
            for problem in problems:
                print(problem)
            return 1
        print("generated protobuf code is up to date")
        return 0
    for path in write():
        print(f"wrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
