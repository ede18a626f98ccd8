"""Phase goodput curves on a sparse grid: where to measure, how to fill in between.

Alg. 1 needs a phase's goodput for every instance count that fits the cluster (1 to 63
at 8x8 with tp1), and each point is a goodput bisection on steady-state windows whose
length grows with the rate. Measuring every count is wasted work: goodput grows
smoothly with the count (pooling gains, then linearly). The planner measures
``curve_grid`` points, stops once the per-instance goodput stops growing, and
``fill_curve`` interpolates linearly between measured points and extends the last one at
its per-instance rate (a lower bound: identical instances added to a pool never lower
its per-instance goodput). The estimates only rank candidates; the best are simulated
whole.
"""

from __future__ import annotations


def curve_grid(max_n: int) -> list[int]:
    """Instance counts a phase curve is measured at: every count up to 6, then steps of
    about 25%, and ``max_n``."""
    out, n = [], 1
    while n < max_n:
        out.append(n)
        n = n + 1 if n < 6 else max(n + 1, round(n * 1.25))
    return out + [max_n] if max_n >= 1 else out


def fill_curve(measured: dict[int, float], max_n: int) -> dict[int, float]:
    """Goodput for every count 1..max_n from the ``measured`` grid points: linear between
    them, and at the last point's per-instance rate beyond it."""
    pts = sorted(measured.items())
    out: dict[int, float] = {}
    j = 0
    for n in range(1, max_n + 1):
        while j + 1 < len(pts) and pts[j + 1][0] <= n:
            j += 1
        n0, g0 = pts[j]
        if n == n0 or j + 1 >= len(pts):
            out[n] = g0 * n / n0 if n0 <= n else g0
        else:
            n1, g1 = pts[j + 1]
            out[n] = g0 + (g1 - g0) * (n - n0) / (n1 - n0)
    return out
