"""pdserve.cluster.planning.profiler: measure a model's step latencies and fit a profile.

``run.profile_model`` is what ``pdserve profile`` runs; it draws batch shapes
(``grids``), times worker steps on the loaded model (``timing``), fits the latency model
and reports held-out error (``fitting``), and times KV transfers between processes
(``bandwidth``), as ``options`` say.
"""
