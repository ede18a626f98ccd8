"""A deployment plan: what the planner decided and what the launcher builds.

Lifecycle: the planner (``pdserve plan``) writes a ``Plan`` as JSON (``pdserve-plan-v1``);
``pdserve simulate --plan`` replays it; the launcher reads it and calls
``placement_groups()`` to create one Ray placement group per ``PlacementGroupSpec``.

Placement is a tuple of ``InstanceGroup``s, each a set of instance *segments* (a run of
consecutive pipeline stages of one instance, ``tp`` GPUs per stage):

- low node-affinity plans (DistServe Alg. 2) put the prefill and decode segments of the
  same pipeline stage of one unit in one group with ``colocate=True``: they must share a
  node so KV moves over NVLink; the launcher makes it one STRICT_PACK placement group;
- high node-affinity plans (Alg. 1) and colocated plans have one group per instance
  (PACK: stages preferably together, but may spread when the network is fast).

Every bundle is one pipeline stage (``tp`` GPUs on one node, as tensor parallelism
needs); ``roles`` names, per bundle, ``(role, instance index, stage)``. ``node`` indices
are the planner's intended layout and only advisory to Ray.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pdserve.cluster.planning.check import PlanCheck
from pdserve.cluster.planning.cluster_desc import ClusterDesc
from pdserve.cluster.planning.simulator.config import (
    ColocatedPlanSpec,
    DisaggPlanSpec,
    InstanceSpec,
)
from pdserve.router.slo import SloConfig

FORMAT = "pdserve-plan-v1"
MODES = ("disaggregated", "colocated")
AFFINITIES = ("high", "low", "none")
ROLES = ("prefill", "decode", "colocated")
STRATEGIES = ("STRICT_PACK", "PACK", "SPREAD")


@dataclass(frozen=True)
class Segment:
    role: str
    instance: int
    first_stage: int
    num_stages: int
    tp: int

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.instance < 0 or self.first_stage < 0 or self.num_stages < 1 or self.tp < 1:
            raise ValueError(f"invalid segment {self}")

    @property
    def num_gpus(self) -> int:
        return self.tp * self.num_stages


@dataclass(frozen=True)
class InstanceGroup:
    segments: tuple[Segment, ...]
    colocate: bool = False  # must share one node (STRICT_PACK)
    node: int | None = None  # intended node (advisory)

    def __post_init__(self) -> None:
        if not self.segments:
            raise ValueError("an instance group needs at least one segment")

    @property
    def num_gpus(self) -> int:
        return sum(s.num_gpus for s in self.segments)


@dataclass(frozen=True)
class PlacementGroupSpec:
    bundles: tuple[tuple[tuple[str, float], ...], ...]  # each: (("CPU", m), ("GPU", n))
    strategy: str
    roles: tuple[tuple[str, int, int], ...]  # per bundle: (role, instance index, stage)
    node: int | None = None

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}")
        if len(self.bundles) != len(self.roles) or not self.bundles:
            raise ValueError("need one role per bundle and at least one bundle")

    def bundle_dicts(self) -> list[dict[str, float]]:
        """The ``bundles`` argument of ``ray.util.placement_group``."""
        return [dict(b) for b in self.bundles]


@dataclass(frozen=True)
class SearchStats:
    candidates: int = 0
    simulations: int = 0
    runtime_s: float = 0.0
    trace_requests: int = 0
    notes: str = ""
    requests_simulated: int = 0


@dataclass(frozen=True)
class Plan:
    model: str
    profile: str
    mode: str
    affinity: str
    prefill: InstanceSpec | None = None
    decode: InstanceSpec | None = None
    colocated: InstanceSpec | None = None
    units: int = 1  # low affinity: identical units, each routing KV only inside itself
    transfer_bandwidth: float = 25e9
    placement: tuple[InstanceGroup, ...] = ()
    expected_rate: float = 0.0
    expected_per_gpu_goodput: float = 0.0
    slo: SloConfig = field(default_factory=SloConfig)
    trace: str = ""
    search: SearchStats = field(default_factory=SearchStats)
    cluster: ClusterDesc | None = None
    arrivals: str = "trace"  # the arrival model planned for (``workloads.arrivals``)
    check: PlanCheck | None = None  # the long-window check and confidence figure

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.affinity not in AFFINITIES:
            raise ValueError(f"affinity must be one of {AFFINITIES}, got {self.affinity!r}")
        disagg = self.mode == "disaggregated"
        if disagg != (self.prefill is not None and self.decode is not None) or \
                disagg == (self.colocated is not None):
            raise ValueError("a disaggregated plan needs prefill and decode specs only; a "
                             "colocated plan needs the colocated spec only")
        if self.units < 1 or (disagg and (self.prefill.count % self.units
                                          or self.decode.count % self.units)):
            raise ValueError("units must divide the prefill and decode instance counts")
        if self.placement and sum(g.num_gpus for g in self.placement) != self.num_gpus:
            raise ValueError("placement GPUs do not add up to the plan's GPUs")
        if self.cluster is not None and self.num_gpus > self.cluster.num_gpus:
            raise ValueError(f"plan needs {self.num_gpus} GPUs, cluster has "
                             f"{self.cluster.num_gpus}")

    @property
    def num_gpus(self) -> int:
        if self.mode == "colocated":
            return self.colocated.num_gpus
        return self.prefill.num_gpus + self.decode.num_gpus

    def spec(self) -> DisaggPlanSpec | ColocatedPlanSpec:
        """The whole plan as one simulator spec (low affinity: KV stays inside units)."""
        if self.mode == "colocated":
            return ColocatedPlanSpec(self.colocated)
        return DisaggPlanSpec(self.prefill, self.decode, self.transfer_bandwidth, self.units)

    def unit_spec(self) -> DisaggPlanSpec | ColocatedPlanSpec:
        """One unit (low affinity) as a simulator spec; the whole plan otherwise."""
        if self.mode == "colocated" or self.units == 1:
            return self.spec()
        return DisaggPlanSpec(self.prefill.with_count(self.prefill.count // self.units),
                              self.decode.with_count(self.decode.count // self.units),
                              self.transfer_bandwidth)

    def placement_groups(self, cpus_per_bundle: float = 1.0) -> list[PlacementGroupSpec]:
        out = []
        for g in self.placement:
            bundles, roles = [], []
            for s in g.segments:
                for stage in range(s.first_stage, s.first_stage + s.num_stages):
                    bundles.append((("CPU", float(cpus_per_bundle)), ("GPU", float(s.tp))))
                    roles.append((s.role, s.instance, stage))
            out.append(PlacementGroupSpec(tuple(bundles), "STRICT_PACK" if g.colocate
                                          else "PACK", tuple(roles), g.node))
        return out

    # -- JSON -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["cluster"] = self.cluster.to_dict() if self.cluster is not None else None
        if self.check is not None:  # derived figures, for readers (from_dict ignores them)
            c, target = self.check, self.slo.attainment
            d["confidence"] = {"replicate_mean": c.replicate_mean,
                               "replicate_sd": c.replicate_sd,
                               "replicates_passing": c.replicates_passing(target),
                               "replicates": len(c.replicates)}
        return {"format": FORMAT, **d}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        if d.get("format") != FORMAT:
            raise ValueError(f"not a pdserve plan (format must be {FORMAT})")

        def spec(x: dict | None) -> InstanceSpec | None:
            return InstanceSpec(**x) if x is not None else None

        try:
            groups = tuple(InstanceGroup(tuple(Segment(**s) for s in g["segments"]),
                                         bool(g.get("colocate", False)), g.get("node"))
                           for g in d.get("placement", ()))
            return cls(d["model"], d["profile"], d["mode"], d["affinity"], spec(d.get("prefill")),
                       spec(d.get("decode")), spec(d.get("colocated")), int(d.get("units", 1)),
                       float(d.get("transfer_bandwidth", 25e9)), groups,
                       float(d.get("expected_rate", 0.0)),
                       float(d.get("expected_per_gpu_goodput", 0.0)),
                       SloConfig(**d["slo"]) if d.get("slo") else SloConfig(),
                       str(d.get("trace", "")), SearchStats(**d.get("search", {})),
                       ClusterDesc.from_dict(d["cluster"]) if d.get("cluster") else None,
                       str(d.get("arrivals", "trace")),
                       PlanCheck(**{**d["check"], "replicates": tuple(d["check"]["replicates"])})
                       if d.get("check") else None)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed plan: {exc}") from exc

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not JSON: {exc}") from exc


# -- placement builders ----------------------------------------------------------------
def instance_groups(role: str, spec: InstanceSpec, first_index: int = 0) -> list[InstanceGroup]:
    """One free (PACK) group per instance."""
    return [InstanceGroup((Segment(role, first_index + i, 0, spec.pp, spec.tp),))
            for i in range(spec.count)]


def assign_nodes(groups: list[InstanceGroup], num_nodes: int,
                 gpus_per_node: int) -> list[InstanceGroup]:
    """Advisory first-fit node indices for groups that fit on one node (else None)."""
    free = [gpus_per_node] * num_nodes
    out = []
    for g in groups:
        node = next((n for n in range(num_nodes) if free[n] >= g.num_gpus), None)
        if node is not None:
            free[node] -= g.num_gpus
        out.append(InstanceGroup(g.segments, g.colocate, node))
    return out


def low_affinity_groups(tp_p: int, pp_p_seg: int, n_p: int, tp_d: int, pp_d_seg: int,
                        n_d: int, pp_cross: int, units: int,
                        gpus_per_node: int) -> list[InstanceGroup]:
    """Units of ``n_p`` prefill + ``n_d`` decode instances; per unit and cross-node stage
    ``s``, one STRICT_PACK group holds stage segment ``s`` of all of them. Units fill the
    node sets ``[j*pp_cross, (j+1)*pp_cross)`` in order."""
    seg_gpus = n_p * tp_p * pp_p_seg + n_d * tp_d * pp_d_seg
    per_node = gpus_per_node // seg_gpus
    if per_node < 1:
        raise ValueError("a unit segment does not fit on one node")
    groups = []
    for u in range(units):
        node_set = u // per_node
        for s in range(pp_cross):
            segs = [Segment("prefill", u * n_p + i, s * pp_p_seg, pp_p_seg, tp_p)
                    for i in range(n_p)]
            segs += [Segment("decode", u * n_d + i, s * pp_d_seg, pp_d_seg, tp_d)
                     for i in range(n_d)]
            groups.append(InstanceGroup(tuple(segs), True, node_set * pp_cross + s))
    return groups
