"""pdserve.cluster.cli.replay: replaying a trace against a running endpoint, as clients would.

What ``pdserve bench`` runs and the benchmark scripts reuse: ``loadgen`` sends a
``Trace`` open-loop and timestamps every streamed message, building each request with
``prompts`` and sending it through a ``driver`` (``grpc_driver`` for pdserve's gRPC
endpoint, ``http_driver`` for the OpenAI-compatible HTTP one); ``records`` holds what a
run recorded, ``report`` turns a run into latency percentiles and SLO attainment,
``sweep`` replays one trace at several rates to find the goodput, and ``plots`` draws the
CDFs and the attainment curve.
"""
