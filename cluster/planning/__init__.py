"""pdserve.cluster.planning: choosing pool sizes and placement against TTFT/TPOT SLOs.

``profiler`` measures a model's step latencies and fits a latency profile
(``pdserve.engine.latency_profile``), ``calibration`` corrects it from real step logs,
``simulator`` replays a trace on a plan, ``planner`` searches plans on a cluster
description (``cluster_desc``), and ``plan`` is what it writes for the launcher.
"""
