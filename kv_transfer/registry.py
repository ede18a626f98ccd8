"""KV transfer backends by name.

Each entry loads its (sender class, receiver class) pair on first use, so asking for
"inprocess" never imports the CUDA backend. Every receiver's ``create`` and sender's
constructor accept ``auth_token`` (and receivers ``bind_host`` and ``instance_key``) so a
worker can pass its one ``KVTransferConfig`` whatever the backend; backends that do not
need them ignore them.
"""

from __future__ import annotations

import torch

from pdserve.engine.kv_cache import KVCache, KVCacheSpec
from pdserve.engine.registry import Registry
from pdserve.kv_transfer.base import KVReceiver, KVSender

BackendClasses = tuple[type[KVSender], type[KVReceiver]]


def _inprocess() -> BackendClasses:
    from pdserve.kv_transfer.inprocess import InProcessReceiver, InProcessSender

    return InProcessSender, InProcessReceiver


def _shm() -> BackendClasses:
    from pdserve.kv_transfer.shm import ShmReceiver, ShmSender

    return ShmSender, ShmReceiver


def _tcp() -> BackendClasses:
    from pdserve.kv_transfer.tcp import TcpReceiver, TcpSender

    return TcpSender, TcpReceiver


def _cuda_ipc() -> BackendClasses:
    from pdserve.kv_transfer.cuda_ipc import CudaIpcReceiver, CudaIpcSender

    return CudaIpcSender, CudaIpcReceiver


BACKENDS: Registry[BackendClasses] = Registry("KV transfer backend", {
    "inprocess": _inprocess,
    "shm": _shm,
    "tcp": _tcp,
    "cuda_ipc": _cuda_ipc,
})


def backend_classes(name: str) -> BackendClasses:
    return BACKENDS.get(name)


def create_receiver(name: str, cache_spec: KVCacheSpec, worker_id: str,
                    device: torch.device | str = "cpu", **options) -> tuple[KVReceiver, KVCache]:
    """The decode worker's receiver and the KV cache it must use."""
    _, receiver_cls = backend_classes(name)
    return receiver_cls.create(cache_spec, worker_id, device, **options)


def create_sender(name: str, **options) -> KVSender:
    sender_cls, _ = backend_classes(name)
    return sender_cls(**options)
