"""pdserve.cluster.cli.replay: replaying a trace against a running endpoint, as clients would.

What ``pdserve bench`` runs and the benchmark scripts reuse: ``loadgen`` sends a
``Trace`` open-loop over gRPC and timestamps every streamed message, ``report`` turns a
run into latency percentiles and SLO attainment, ``sweep`` replays one trace at several
rates to find the goodput, and ``plots`` draws the CDFs and the attainment curve.
"""
