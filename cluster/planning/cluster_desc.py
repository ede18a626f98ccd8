"""The hardware a plan is made for: nodes, GPUs per node, GPU memory, interconnects.

A ``ClusterDesc`` is written by hand (or by ``pdserve plan --nodes ...``) and read by the
planner, which uses it to bound the search (GPUs per node caps tensor parallelism and
the low-affinity segments) and to price KV transfers (intra-node NVLink vs inter-node
network). JSON format ``pdserve-cluster-v1``; bandwidths in bytes/s.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

FORMAT = "pdserve-cluster-v1"


@dataclass(frozen=True)
class ClusterDesc:
    num_nodes: int
    gpus_per_node: int
    gpu_memory_gb: float = 80.0
    intra_node_bandwidth: float = 300e9  # bytes/s, e.g. NVLink
    inter_node_bandwidth: float = 25e9  # bytes/s, e.g. 200 Gb/s InfiniBand
    gpu_type: str = ""

    def __post_init__(self) -> None:
        if self.num_nodes < 1 or self.gpus_per_node < 1:
            raise ValueError("num_nodes and gpus_per_node must be >= 1")
        for name in ("gpu_memory_gb", "intra_node_bandwidth", "inter_node_bandwidth"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be positive and finite, got {v!r}")

    @property
    def num_gpus(self) -> int:
        return self.num_nodes * self.gpus_per_node

    def label(self) -> str:
        kind = f" {self.gpu_type}" if self.gpu_type else ""
        return f"{self.num_nodes}x{self.gpus_per_node}{kind}"

    # -- JSON -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> ClusterDesc:
        if d.get("format") != FORMAT:
            raise ValueError(f"not a pdserve cluster description (format must be {FORMAT})")
        try:
            return cls(int(d["num_nodes"]), int(d["gpus_per_node"]),
                       float(d.get("gpu_memory_gb", 80.0)),
                       float(d.get("intra_node_bandwidth", 300e9)),
                       float(d.get("inter_node_bandwidth", 25e9)), str(d.get("gpu_type", "")))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed cluster description: {exc}") from exc

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ClusterDesc:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not JSON: {exc}") from exc


def a100_cluster(num_nodes: int = 2, gpus_per_node: int = 8) -> ClusterDesc:
    """DistServe-like testbed: A100-80GB nodes, 300 GB/s NVLink, 25 GB/s between nodes."""
    return ClusterDesc(num_nodes, gpus_per_node, 80.0, 300e9, 25e9, "A100-80GB")
