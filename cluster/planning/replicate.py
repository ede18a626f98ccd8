"""Large clusters planned as identical sub-clusters: how to split the cluster, how to scale up.

Searching a 512-GPU cluster candidate by candidate means whole-system simulations of
hundreds of instances on windows of hundreds of thousands of requests. A cluster larger
than ``PlannerConfig.max_search_gpus`` is instead split into ``copies`` identical
sub-clusters of whole nodes (the largest divisor of the node count that fits), the
search runs on one, and its best candidate is replicated: every pool ``copies`` times
larger. Replication never lowers per-instance goodput (each copy could keep to itself,
and a pooled dispatcher only has more choice), so ``copies`` times the sub-cluster's
goodput is a lower bound; the planner's final check then measures the whole cluster on
a long window, from that rate upwards.

KV routing: a copy that fits one node keeps its KV on NVLink only if requests stay in it,
so the replicated plan has ``units = copies`` (as low node-affinity units do); a copy
spanning nodes already paid the inter-node bandwidth, and its pools are merged
(``units`` of a low-affinity plan are multiplied either way).
"""

from __future__ import annotations

from dataclasses import replace

from pdserve.cluster.planning.cluster_desc import ClusterDesc
from pdserve.cluster.planning.simulator.evaluator import Candidate


def split_cluster(cluster: ClusterDesc, max_gpus: int) -> tuple[ClusterDesc, int]:
    """The sub-cluster to search and how many copies of it fill ``cluster``."""
    if cluster.num_gpus <= max_gpus:
        return cluster, 1
    fit = max(1, max_gpus // cluster.gpus_per_node)
    nodes = max(d for d in range(1, fit + 1) if cluster.num_nodes % d == 0)
    return replace(cluster, num_nodes=nodes), cluster.num_nodes // nodes


def replicate(cand: Candidate, copies: int, affinity: str, sub: ClusterDesc) -> Candidate:
    """``cand`` (found on ``sub``) with every pool ``copies`` times larger."""
    if copies == 1:
        return cand
    if cand.mode == "colocated":
        i = cand.colocated
        return Candidate.colo(i.with_count(i.count * copies))
    p, d = cand.prefill, cand.decode
    if affinity == "low":
        units = cand.units * copies
    else:
        units = copies if cand.num_gpus <= sub.gpus_per_node else 1
    return Candidate.disagg(p.with_count(p.count * copies), d.with_count(d.count * copies),
                            cand.transfer_bandwidth, units)
