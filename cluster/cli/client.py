"""A small synchronous gRPC client for the ``Generate`` stream (CLI, tests, benchmarks).

``ClientSecurity`` says how to reach a secured endpoint (docs/security.md): TLS (trusting a
given CA, or the system's roots), an optional client certificate for mutual TLS, and where
a bearer token comes from. It names files and an environment variable but never holds a
secret value, because configs that embed it are written into benchmark results.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from pdserve.protos import pdserve_pb2, pdserve_pb2_grpc


@dataclass
class Completion:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: int = 0
    usage: pdserve_pb2.Usage | None = None


def build_request(prompt: str | Sequence[int], max_tokens: int | None = None,
                  temperature: float | None = 0.0, top_p: float | None = None,
                  top_k: int | None = None, seed: int | None = None,
                  stop: Sequence[str] = (), request_id: str = "") -> pdserve_pb2.GenerateRequest:
    req = pdserve_pb2.GenerateRequest(request_id=request_id)
    if isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.ids.extend(prompt)
    for name, value in (("max_tokens", max_tokens), ("temperature", temperature),
                        ("top_p", top_p), ("top_k", top_k), ("seed", seed)):
        if value is not None:
            setattr(req.sampling, name, value)
    req.stop.stop.extend(stop)
    return req


TOKEN_ENV = "PDSERVE_AUTH_TOKEN"


@dataclass(frozen=True)
class ClientSecurity:
    """``tls`` (implied by any certificate file) without ``root_ca_file`` trusts the system's
    roots. The token is read from ``token_file`` if given, else from ``$token_env``."""

    tls: bool = False
    root_ca_file: str | None = None
    client_cert_file: str | None = None
    client_key_file: str | None = None
    token_file: str | None = None
    token_env: str | None = None

    def __post_init__(self) -> None:
        # Files are checked when used, not here: results that embed this config must load
        # on machines without them.
        if (self.client_cert_file is None) != (self.client_key_file is None):
            raise ValueError("a client certificate (--tls-cert) needs its key (--tls-key), "
                             "and the key its certificate")
        if self.root_ca_file or self.client_cert_file:
            object.__setattr__(self, "tls", True)

    def credentials(self) -> grpc.ChannelCredentials | None:
        """TLS channel credentials, or None for a plaintext channel."""
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=_read("TLS root CA", self.root_ca_file),
            private_key=_read("TLS client key", self.client_key_file),
            certificate_chain=_read("TLS client certificate", self.client_cert_file))

    def token(self, environ: Mapping[str, str] | None = None) -> str | None:
        if self.token_file is not None:
            raw = _read("auth token", self.token_file) or b""
            lines = [ln.strip() for ln in raw.decode().splitlines()]
            token = next((ln for ln in lines if ln and not ln.startswith("#")), "")
            if not token:
                raise ValueError(f"the auth token file {self.token_file} holds no token")
            return token
        if self.token_env is not None:
            return (os.environ if environ is None else environ).get(self.token_env) or None
        return None


def _read(what: str, path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the {what} file {path}: {exc.strerror or exc}") from None


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Per-call metadata carrying the bearer token (works on plaintext channels too, which
    gRPC's call credentials refuse; send tokens in plaintext only over loopback)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def open_channel(address: str, security: ClientSecurity | None = None,
                 options: Sequence[tuple[str, object]] = ()) -> grpc.Channel:
    creds = security.credentials() if security is not None else None
    if creds is None:
        return grpc.insecure_channel(address, options=list(options))
    return grpc.secure_channel(address, creds, options=list(options))


class Client:
    """``token`` overrides the one ``security`` points at."""

    def __init__(self, address: str, timeout_s: float | None = None, *,
                 security: ClientSecurity | None = None, token: str | None = None):
        self.channel = open_channel(address, security)
        self.stub = pdserve_pb2_grpc.GenerationStub(self.channel)
        self.timeout_s = timeout_s
        if token is None and security is not None:
            token = security.token()
        self._metadata = auth_metadata(token)

    def stream(self, req: pdserve_pb2.GenerateRequest) -> Iterator[pdserve_pb2.GenerateResponse]:
        return self.stub.Generate(req, timeout=self.timeout_s, metadata=self._metadata or None)

    def generate(self, req: pdserve_pb2.GenerateRequest) -> Completion:
        out = Completion()
        for msg in self.stream(req):
            out.token_ids.extend(msg.token_ids)
            out.text += msg.text
            if msg.finish_reason:
                out.finish_reason = msg.finish_reason
            if msg.HasField("usage"):
                out.usage = msg.usage
        return out

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
