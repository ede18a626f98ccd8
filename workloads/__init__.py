"""pdserve.workloads: request traces, what arrives when with how many tokens.

``trace`` holds the ``Trace`` type every consumer shares; ``formats`` reads the public
trace files (Azure and BurstGPT CSV, and through ``mooncake`` and ``sharegpt`` the
Mooncake JSONL and ShareGPT JSON) and tells them apart; ``synthetic`` draws Poisson or
Gamma arrivals. Pure Python with no pdserve imports, so the simulator and planner
(``cluster/``) and the load generators (``benchmarks/``) can all sit above it.
"""
