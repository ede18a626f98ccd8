"""Which decode batch sizes get a CUDA graph, and which graph a batch of B rows uses.

Pure functions (no CUDA): the config validates the sizes with ``validate_sizes``, the
runner narrows them to the engine's ``max_num_seqs`` with ``capture_sizes`` and picks the
graph for a step with ``padded_size``. A decode-only step of B rows runs the graph of the
smallest captured size >= B (its extra rows are padding, see ``padding.py``); a batch
larger than every captured size runs eagerly.
"""

from __future__ import annotations

from collections.abc import Iterable

# vLLM's and SGLang's shape: dense at small batches (where a padded row costs the most
# relative to the step), sparser above; 256 bounds capture time and the graph pool.
DEFAULT_CUDA_GRAPH_SIZES: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192,
                                             256)
MAX_CUDA_GRAPH_SIZE = 1024


def validate_sizes(sizes: Iterable[int]) -> tuple[int, ...]:
    """The sizes, sorted, as a tuple; ValueError unless they are distinct ints in
    [1, MAX_CUDA_GRAPH_SIZE] and there is at least one."""
    out = tuple(sizes)
    if not out:
        raise ValueError("cuda_graph_sizes must name at least one batch size "
                         "(use enforce_eager to turn graphs off)")
    for s in out:
        if isinstance(s, bool) or not isinstance(s, int):
            raise ValueError(f"cuda_graph_sizes must be integers, got {s!r}")
        if not 1 <= s <= MAX_CUDA_GRAPH_SIZE:
            raise ValueError(f"cuda_graph_sizes must be in [1, {MAX_CUDA_GRAPH_SIZE}], got {s}")
    if len(set(out)) != len(out):
        raise ValueError(f"cuda_graph_sizes has duplicates: {out}")
    return tuple(sorted(out))


def capture_sizes(sizes: Iterable[int], max_num_seqs: int) -> tuple[int, ...]:
    """The sizes worth capturing for an engine that never decodes more than
    ``max_num_seqs`` rows: those <= max_num_seqs, plus the smallest larger one when none
    of them covers max_num_seqs (so every decode batch the scheduler can form has a graph)."""
    ordered = sorted(set(sizes))
    kept = [s for s in ordered if s <= max_num_seqs]
    if not kept or kept[-1] < max_num_seqs:
        above = [s for s in ordered if s > max_num_seqs]
        if above:
            kept.append(above[0])
    return tuple(kept)


def padded_size(sizes: tuple[int, ...], batch: int) -> int | None:
    """The smallest captured size >= ``batch`` (``sizes`` sorted), or None: run eagerly."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    for s in sizes:
        if s >= batch:
            return s
    return None


def graphs_wanted(enforce_eager: bool, device_type: str, backend_supports_graphs: bool,
                  tensor_parallel_size: int) -> bool:
    """Graphs only where they can run and pay: on CUDA, with a backend that can plan
    outside a graph (FlashInfer; the torch reference cannot), one rank (a graph would have
    to capture the ranks' collectives too: not built), and not turned off."""
    return (not enforce_eager and device_type == "cuda" and backend_supports_graphs
            and tensor_parallel_size == 1)
