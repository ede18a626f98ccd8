"""No import points up a layer (the table in docs/architecture.md, "Layers").

Every ``import`` of every source file counts, at module level or inside a function: a
lazy import is still a dependency. Each top-level folder may import only the pdserve
packages below it and the third-party frameworks its row allows; a few named modules are
the sanctioned exceptions (the thin Ray actors). On top of the static check, the router's
request path is imported in a fresh interpreter to show it pulls in neither torch nor Ray.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("engine", "kv_transfer", "workloads", "prefill_worker", "decode_worker", "router",
            "cluster", "benchmarks")
WORKERS = ("prefill_worker", "decode_worker")

# folder -> (pdserve packages it must not import, third-party modules it must not import)
FORBIDDEN: dict[str, tuple[set[str], set[str]]] = {
    "engine": ({"kv_transfer", "workloads", *WORKERS, "router", "cluster", "benchmarks"},
               {"ray", "grpc"}),
    "kv_transfer": ({"workloads", *WORKERS, "router", "cluster", "benchmarks"}, {"ray", "grpc"}),
    "workloads": ({"kv_transfer", *WORKERS, "router", "cluster", "benchmarks"},
                  {"ray", "grpc", "torch"}),
    "prefill_worker": ({"decode_worker", "router", "cluster", "benchmarks", "workloads"},
                       {"ray", "grpc"}),
    "decode_worker": ({"prefill_worker", "router", "cluster", "benchmarks", "workloads"},
                      {"ray", "grpc"}),
    "router": ({"cluster", "benchmarks", "workloads"}, {"ray", "torch"}),
    "cluster": ({"benchmarks"}, set()),
}
# Modules allowed a third-party import their folder's row forbids, and why.
EXEMPT = {
    "prefill_worker/actor.py": {"ray"},  # the thin Ray actors
    "decode_worker/actor.py": {"ray"},
    "router/actor.py": {"ray"},
    "router/clients.py": {"ray"},  # calls Ray actors (imported only when talking to one)
}
# The router may import these modules of the workers: their torch-free messages and the
# direct channel's wire format, nothing of their implementation.
ROUTER_MAY_IMPORT = {"pdserve.prefill_worker.messages", "pdserve.decode_worker.messages",
                     "pdserve.prefill_worker.channel_wire"}


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            out.append((node.lineno, "<relative>"))
    return out


def violations(root: Path) -> list[str]:
    found = []
    for folder, (packages, third_party) in FORBIDDEN.items():
        for path in sorted((root / folder).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            exempt = EXEMPT.get(rel, set())
            for line, name in imports_of(path):
                top, _, rest = name.partition(".")
                where = f"{rel}:{line} imports {name}"
                if name == "<relative>":
                    found.append(f"{rel}:{line}: relative import (use pdserve.<package>)")
                elif top in third_party and top not in exempt:
                    found.append(where)
                elif top == "pdserve" and rest.split(".")[0] in packages:
                    if folder == "router" and _is_worker_message(name):
                        continue
                    found.append(where)
                elif folder == "router" and top == "pdserve" and rest.split(".")[0] in WORKERS \
                        and not _is_worker_message(name):
                    found.append(f"{where} (a worker implementation)")
    outside = [p for top in (*PACKAGES, "pdserve", "protos", "deploy", "scripts")
               if top != "benchmarks" for p in sorted((root / top).rglob("*.py"))]
    for path in outside:
        for line, name in imports_of(path):
            if name.startswith(("pdserve.benchmarks", "benchmarks.")) or name == "benchmarks":
                found.append(f"{path.relative_to(root).as_posix()}:{line} imports {name}")
    return sorted(set(found))


def _is_worker_message(name: str) -> bool:
    return any(name == m or name.startswith(m + ".") for m in ROUTER_MAY_IMPORT)


def test_no_import_points_up_a_layer():
    assert violations(ROOT) == []


def test_the_check_catches_an_upward_import(tmp_path):
    """The checker itself, on a small tree with one bad import of each kind."""
    files = {
        "engine/ok.py": "import torch\nfrom pdserve.engine import config\n",
        "engine/bad.py": "def f():\n    from pdserve.router import orchestrator\n",
        "kv_transfer/bad.py": "import ray\n",
        "router/bad.py": "from pdserve.decode_worker.worker import DecodeWorker\n",
        "router/ok.py": "from pdserve.decode_worker.messages import TokenBatch\n",
        "router/torchy.py": "import torch.nn\n",
        "decode_worker/actor.py": "import ray\n",
        "cluster/bad.py": "from pdserve.benchmarks.trace import Trace\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    found = violations(tmp_path)
    assert [v.split(":")[0] for v in found] == [
        "cluster/bad.py", "cluster/bad.py", "engine/bad.py", "engine/bad.py",
        "kv_transfer/bad.py", "router/bad.py", "router/bad.py", "router/torchy.py"], found


@pytest.mark.parametrize("module", ["orchestrator", "service", "server", "build", "clients",
                                    "validation", "attempt", "admission", "routes"])
def test_router_request_path_imports_no_torch_and_no_ray(module):
    code = (f"import sys, pdserve.router.{module}\n"
            "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout
