"""Stand-in for the ``ray`` package on hosts without Ray (the GPU benchmark machines).

Installed as ``ray/__init__.py`` by ``pdserve_path.py`` only when no real Ray can be
imported. It exists because ``prefill_worker/actor.py``, ``decode_worker/actor.py`` and
``router/actor.py`` import Ray at module level for their actor classes, while the
Ray-less builders next to them (``build_prefill_host``, ``build_decode_host``,
``build_colocated_host``, ``build_router``) are what in-process and subprocess hosts use.
Only what importing those modules needs is provided; using Ray for real fails loudly.
"""

from __future__ import annotations

__version__ = "0+pdserve-stub"
IS_PDSERVE_STUB = True


def remote(*args, **kwargs):
    """``@ray.remote`` and ``@ray.remote(...)``: the class or function, unchanged."""
    if len(args) == 1 and not kwargs and callable(args[0]):
        return args[0]
    return lambda obj: obj


def method(*args, **kwargs):
    if len(args) == 1 and not kwargs and callable(args[0]):
        return args[0]
    return lambda obj: obj


def is_initialized() -> bool:
    return False


def __getattr__(name: str):
    raise AttributeError(f"ray.{name}: Ray is not installed on this host (pdserve's GPU-host stub)")
