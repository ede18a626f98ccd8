"""The pieces of deploy/grafana/generate.py: panel builders (``panels``), dashboard layout
and variables (``board``), the two dashboards (``slo``, ``cluster``) and the query helpers
tests use (``queries``).

Not part of the ``pdserve`` package: generate.py is run and loaded by path, and puts this
folder's parent on ``sys.path`` before importing ``dashboards_lib``.
"""
