"""``WorkerGone``: the one error every path to a worker raises when the worker is lost."""

from __future__ import annotations


class WorkerGone(RuntimeError):
    """The worker process is dead or unreachable (a Ray actor error, or the direct channel
    to it ended): the router marks it dead and retries the request elsewhere."""
