"""Which KV transfer backend a cluster uses, and its options (one frozen object)."""

from __future__ import annotations

from dataclasses import dataclass

KNOWN_BACKENDS = ("inprocess", "shm", "tcp", "cuda_ipc")


@dataclass(frozen=True)
class KVTransferConfig:
    """``bind_host`` is where TCP receivers listen: loopback by default, ``auto`` for the
    node's Ray address (multi-node clusters), or an explicit address. ``auth_token`` is the cluster's shared secret that
    TCP senders must present; empty disables the check."""

    backend: str = "shm"
    bind_host: str = "127.0.0.1"
    auth_token: str = ""
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.backend not in KNOWN_BACKENDS:
            raise ValueError(f"unknown KV transfer backend {self.backend!r}; "
                             f"choose from {', '.join(KNOWN_BACKENDS)}")
        if self.timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
