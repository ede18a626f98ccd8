"""Which KV transfer backend a cluster uses, and its options (one frozen object).

The TCP backend's shared secret (docs/security.md) is cluster configuration handed to
every worker, senders and receivers alike; it never travels in a ``KVEndpoint``. Where it
comes from, first match wins: ``shared_secret``, ``secret_file``, ``$PDSERVE_KV_SECRET``
(read by ``with_cluster_secret``, once, where the cluster is launched), else a random one
that ``with_cluster_secret`` generates per cluster, so authentication is on by default.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from pdserve.kv_transfer.messages import check_mode

KNOWN_BACKENDS = ("inprocess", "shm", "tcp", "cuda_ipc")
SECRET_ENV = "PDSERVE_KV_SECRET"
# Backends whose receivers accept connections from the network and so need the secret.
NETWORK_BACKENDS = ("tcp",)
# A recorded handshake allows an offline guess at the secret: keep it out of reach.
MIN_SECRET_CHARS = 16


@dataclass(frozen=True)
class KVTransferConfig:
    """``bind_host`` is where TCP receivers listen: loopback by default, ``auto`` for the
    node's Ray address (multi-node clusters), or an explicit address. ``shared_secret``
    (or the first line of ``secret_file``) is what TCP senders must prove they know; both
    empty turns the check off, unless ``with_cluster_secret`` fills it in. ``checksum`` is
    the end-to-end KV check (``checksum.py``: full, sample, off, or auto: full for the host
    memory backends, sample for cuda_ipc, where hashing every byte means copying the KV to
    the host; docs/architecture.md gives the measured cost behind that choice)."""

    backend: str = "shm"
    bind_host: str = "127.0.0.1"
    shared_secret: str = field(default="", repr=False)
    secret_file: str | None = None
    timeout_s: float = 30.0
    checksum: str = "auto"

    def __post_init__(self) -> None:
        if self.backend not in KNOWN_BACKENDS:
            raise ValueError(f"unknown KV transfer backend {self.backend!r}; "
                             f"choose from {', '.join(KNOWN_BACKENDS)}")
        if self.timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        if self.checksum != "auto":
            check_mode(self.checksum)
        if self.shared_secret and self.secret_file is not None:
            raise ValueError("give the KV shared secret or a secret file, not both")
        if self.shared_secret:
            _check_secret(self.shared_secret, "the KV shared secret")
        if self.secret_file is not None:
            _read_secret(self.secret_file)  # fail at configuration, not in a worker

    @property
    def checksum_mode(self) -> str:
        """``checksum`` with ``auto`` resolved for this backend."""
        if self.checksum != "auto":
            return self.checksum
        return "sample" if self.backend == "cuda_ipc" else "full"

    @property
    def auth_token(self) -> str:
        """The effective secret ("" = none); the name the workers' call sites use."""
        if self.secret_file is not None:
            return _read_secret(self.secret_file)
        return self.shared_secret

    def with_cluster_secret(self, environ: Mapping[str, str] | None = None) -> KVTransferConfig:
        """This config with its secret resolved to a value (so workers on other nodes need
        no file): the configured one, else ``$PDSERVE_KV_SECRET``, else, for a network
        backend, a fresh random secret. Other backends are returned unchanged."""
        if self.backend not in NETWORK_BACKENDS:
            return self
        env = os.environ if environ is None else environ
        secret = self.auth_token
        if not secret and env.get(SECRET_ENV, "").strip():
            secret = _check_secret(env[SECRET_ENV].strip(), f"${SECRET_ENV}")
        return replace(self, shared_secret=secret or secrets.token_hex(32), secret_file=None)


def _check_secret(secret: str, what: str) -> str:
    if len(secret) < MIN_SECRET_CHARS:
        raise ValueError(f"{what} must be at least {MIN_SECRET_CHARS} characters "
                         "(e.g. python -c 'import secrets; print(secrets.token_hex(32))')")
    return secret


def _read_secret(path: str) -> str:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ValueError(f"cannot read the KV secret file {path}: "
                         f"{exc.strerror or exc}") from None
    secret = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if not secret:
        raise ValueError(f"the KV secret file {path} is empty")
    return _check_secret(secret, f"the secret in {path}")
