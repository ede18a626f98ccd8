"""Security of the gRPC endpoint: TLS, mutual TLS and bearer tokens, against real servers.

Certificates are made here with ``cryptography``: a CA, a server certificate for
127.0.0.1/localhost and a client certificate (plus one from a CA the server does not
trust). Two in-process clusters (``LocalCluster``, no Ray) are started once each: one
with TLS and bearer tokens (some from a file, one from the environment variable), one with
mutual TLS. Configuration checks and the token logic are tested without a server.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pdserve.cluster.cli.client import Client, ClientSecurity, build_request, open_channel
from pdserve.cluster.cli.common import client_security_from_args
from pdserve.cluster.cli.main import build_parser, main
from pdserve.cluster.cli.replay.config import LoadGenConfig
from pdserve.cluster.cli.replay.loadgen import run_trace
from pdserve.cluster.cli.replay.records import RunResult
from pdserve.cluster.cli.serve_commands import security_summary
from pdserve.cluster.launch.local import LocalCluster
from pdserve.engine.config import EngineConfig
from pdserve.router.auth import TOKENS_ENV, TokenSet, bearer_token, load_tokens
from pdserve.router.config import RouterConfig
from pdserve.router.server import ServerConfig
from pdserve.workloads.synthetic import synthetic

FILE_TOKENS = ("file-token-0123456789abcdef", "second-file-token-fedcba9876")
ENV_TOKEN = "env-token-0123456789ABCDEFG"
WRONG_TOKEN = "wrong-token-0123456789abcdef"


# -- certificates --------------------------------------------------------------------------
def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key, issuer: str, issuer_key, *, ca: bool = False,
          sans: list[x509.GeneralName] | None = None,
          usage: x509.ObjectIdentifier | None = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if usage is not None:
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key=None) -> tuple[str, str | None]:
    path.with_suffix(".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is None:
        return str(path.with_suffix(".pem")), None
    path.with_suffix(".key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return str(path.with_suffix(".pem")), str(path.with_suffix(".key"))


@dataclass(frozen=True)
class Pki:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    rogue_cert: str  # signed by a CA the server does not trust
    rogue_key: str


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_key, rogue_ca_key = _key(), _key()
    ca = _cert("pdserve test CA", ca_key, "pdserve test CA", ca_key, ca=True)
    ca_file, _ = _write(d / "ca", ca)
    sk, ck, rk = _key(), _key(), _key()
    sans = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    server = _write(d / "server", _cert("localhost", sk, "pdserve test CA", ca_key, sans=sans,
                                        usage=ExtendedKeyUsageOID.SERVER_AUTH), sk)
    client = _write(d / "client", _cert("client", ck, "pdserve test CA", ca_key,
                                        usage=ExtendedKeyUsageOID.CLIENT_AUTH), ck)
    rogue = _write(d / "rogue", _cert("rogue", rk, "rogue CA", rogue_ca_key,
                                      usage=ExtendedKeyUsageOID.CLIENT_AUTH), rk)
    return Pki(ca_file, *server, *client, *rogue)


# -- clusters ------------------------------------------------------------------------------
def _engine(model) -> EngineConfig:
    return EngineConfig(model=str(model), device="cpu", num_kv_blocks=128, block_size=16,
                        max_num_seqs=8, max_num_batched_tokens=512)


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens.txt"
    path.write_text(f"# accepted bearer tokens\n\n{FILE_TOKENS[0]}\n  {FILE_TOKENS[1]}  \n")
    return path


@pytest.fixture(scope="module")
def tls_token_cluster(demo_model_dir, pki, token_file):
    tokens = load_tokens(token_file, environ={TOKENS_ENV: f" {ENV_TOKEN} ,"})
    server = ServerConfig(port=0, http_port=0, metrics_port=None, tls_cert_file=pki.server_cert,
                          tls_key_file=pki.server_key, auth_tokens=tokens)
    router = RouterConfig(model=str(demo_model_dir), server=server)
    with LocalCluster(_engine(demo_model_dir), router=router) as c:
        yield c


@pytest.fixture(scope="module")
def mtls_cluster(demo_model_dir, pki):
    server = ServerConfig(port=0, http_port=0, metrics_port=None, tls_cert_file=pki.server_cert,
                          tls_key_file=pki.server_key, tls_client_ca_file=pki.ca)
    router = RouterConfig(model=str(demo_model_dir), server=server)
    with LocalCluster(_engine(demo_model_dir), router=router) as c:
        yield c


def _generate(address: str, **client_kwargs):
    with Client(address, timeout_s=30, **client_kwargs) as c:
        return c.generate(build_request([5, 6, 7, 8], max_tokens=4))


def _code(address: str, **client_kwargs) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        _generate(address, **client_kwargs)
    return err.value.code()


# -- TLS + bearer tokens -------------------------------------------------------------------
def test_tls_with_the_ca_and_a_token_streams_tokens(tls_token_cluster, pki):
    tls = ClientSecurity(root_ca_file=pki.ca)
    with Client(tls_token_cluster.address, timeout_s=30, security=tls,
                token=FILE_TOKENS[0]) as c:
        msgs = list(c.stream(build_request([5, 6, 7, 8], max_tokens=4)))
    assert sum(len(m.token_ids) for m in msgs) == 4 and msgs[-1].finish_reason
    # Every configured token works: both file lines and the environment variable's.
    for token in (*FILE_TOKENS, ENV_TOKEN):
        assert len(_generate(tls_token_cluster.address, security=tls,
                             token=token).token_ids) == 4


def test_missing_or_wrong_token_is_unauthenticated(tls_token_cluster, pki, caplog):
    caplog.set_level("INFO", logger="pdserve.router.auth")
    tls = ClientSecurity(root_ca_file=pki.ca)
    addr = tls_token_cluster.address
    with pytest.raises(grpc.RpcError) as err:
        _generate(addr, security=tls)
    assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "missing bearer token" in err.value.details()
    for token in (WRONG_TOKEN, FILE_TOKENS[0][:-1], FILE_TOKENS[0] + "x"):
        with pytest.raises(grpc.RpcError) as err:
            _generate(addr, security=tls, token=token)
        assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert err.value.details() == "invalid bearer token"
    # Another scheme, or two authorization entries, are refused too.
    with open_channel(addr, tls) as ch:
        stub_call = ch.unary_stream("/pdserve.v1.Generation/Generate")
        for md in ((("authorization", f"Basic {FILE_TOKENS[0]}"),),
                   (("authorization", f"Bearer {FILE_TOKENS[0]}"),
                    ("authorization", f"Bearer {WRONG_TOKEN}"))):
            with pytest.raises(grpc.RpcError) as err:
                list(stub_call(b"", metadata=md, timeout=10))
            assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "refused an unauthenticated call" in caplog.text
    assert WRONG_TOKEN not in caplog.text and FILE_TOKENS[0] not in caplog.text


def test_plaintext_client_cannot_talk_to_a_tls_server(tls_token_cluster):
    code = _code(tls_token_cluster.address, token=FILE_TOKENS[0])
    assert code is grpc.StatusCode.UNAVAILABLE


def test_a_client_that_does_not_trust_the_ca_is_refused(tls_token_cluster, pki):
    # The system roots do not include the test CA.
    code = _code(tls_token_cluster.address, security=ClientSecurity(tls=True),
                 token=FILE_TOKENS[0])
    assert code is grpc.StatusCode.UNAVAILABLE


def test_health_needs_no_token_but_reflection_does(tls_token_cluster, pki):
    with open_channel(tls_token_cluster.address, ClientSecurity(root_ca_file=pki.ca)) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "pdserve.v1.Generation"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        reqs = [reflection_pb2.ServerReflectionRequest(list_services="")]
        with pytest.raises(grpc.RpcError) as err:
            list(refl.ServerReflectionInfo(iter(reqs), timeout=10))
        assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
        md = (("authorization", f"Bearer {ENV_TOKEN}"),)
        names = {s.name for r in refl.ServerReflectionInfo(iter(reqs), timeout=10, metadata=md)
                 for s in r.list_services_response.service}
        assert "pdserve.v1.Generation" in names


def test_cli_generate_with_ca_and_token_file(tls_token_cluster, pki, token_file, capsys,
                                             monkeypatch):
    monkeypatch.delenv("PDSERVE_AUTH_TOKEN", raising=False)
    argv = ["generate", "--address", tls_token_cluster.address, "--tls-ca", pki.ca,
            "--max-tokens", "3", "Hello"]
    assert main([*argv, "--auth-token-file", str(token_file)]) == 0
    assert "[3 tokens" in capsys.readouterr().err
    assert main(argv) == 1  # no token at all
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    monkeypatch.setenv("PDSERVE_AUTH_TOKEN", ENV_TOKEN)  # the client's env var
    assert main(argv) == 0


def test_loadgen_through_tls_and_token_keeps_the_token_out_of_results(
        tls_token_cluster, pki, token_file):
    security = ClientSecurity(root_ca_file=pki.ca, token_file=str(token_file))
    run = run_trace(tls_token_cluster.address, synthetic(3, 50.0, (4, 8), (2, 3), seed=1),
                    LoadGenConfig(quiet=True, security=security))
    assert [r.outcome for r in run.records] == ["ok"] * 3, [r.error for r in run.records]
    text = json.dumps(run.to_dict())
    assert not any(t in text for t in FILE_TOKENS)
    assert RunResult.from_dict(json.loads(text)).config.security == security


def test_http_loadgen_through_tls_and_token(tls_token_cluster, pki, token_file):
    # The same client security options reach the OpenAI HTTP API: HTTPS trusting the CA,
    # the token as Authorization: Bearer. Without the token nothing is served.
    trace = synthetic(3, 50.0, (4, 8), (2, 3), seed=1)
    security = ClientSecurity(root_ca_file=pki.ca, token_file=str(token_file))
    address = tls_token_cluster.server.http_address
    run = run_trace(address, trace, LoadGenConfig(quiet=True, security=security, api="http"))
    assert [r.outcome for r in run.records] == ["ok"] * 3, [r.error for r in run.records]
    assert not any(t in json.dumps(run.to_dict()) for t in FILE_TOKENS)
    anonymous = ClientSecurity(root_ca_file=pki.ca)
    run = run_trace(address, trace, LoadGenConfig(quiet=True, security=anonymous, api="http",
                                                  model="any"))
    assert {r.status for r in run.records} == {"UNAUTHENTICATED"}


# -- mutual TLS ----------------------------------------------------------------------------
def test_mtls_refuses_a_client_without_a_certificate(mtls_cluster, pki):
    code = _code(mtls_cluster.address, security=ClientSecurity(root_ca_file=pki.ca))
    assert code is grpc.StatusCode.UNAVAILABLE


def test_mtls_refuses_a_certificate_from_another_ca(mtls_cluster, pki):
    rogue = ClientSecurity(root_ca_file=pki.ca, client_cert_file=pki.rogue_cert,
                           client_key_file=pki.rogue_key)
    assert _code(mtls_cluster.address, security=rogue) is grpc.StatusCode.UNAVAILABLE


def test_mtls_accepts_a_client_certificate(mtls_cluster, pki):
    ok = ClientSecurity(root_ca_file=pki.ca, client_cert_file=pki.client_cert,
                        client_key_file=pki.client_key)
    assert len(_generate(mtls_cluster.address, security=ok).token_ids) == 4
    # The HTTP load generator presents the same certificate.
    run = run_trace(mtls_cluster.server.http_address, synthetic(2, 50.0, (4, 8), (2, 3)),
                    LoadGenConfig(quiet=True, security=ok, api="http"))
    assert [r.outcome for r in run.records] == ["ok"] * 2, [r.error for r in run.records]


# -- configuration, no server --------------------------------------------------------------
def test_server_config_validates_tls_files(pki, tmp_path):
    with pytest.raises(ValueError, match="only the key"):
        ServerConfig(tls_key_file=pki.server_key)
    with pytest.raises(ValueError, match="only the certificate"):
        ServerConfig(tls_cert_file=pki.server_cert)
    with pytest.raises(ValueError, match="client CA"):
        ServerConfig(tls_client_ca_file=pki.ca)
    with pytest.raises(ValueError, match="does not exist"):
        ServerConfig(tls_cert_file=str(tmp_path / "nope.pem"), tls_key_file=pki.server_key)
    unreadable = tmp_path / "locked.key"
    unreadable.write_text("x")
    unreadable.chmod(0)
    if os.geteuid() != 0:  # root reads anything
        with pytest.raises(ValueError, match="not readable"):
            ServerConfig(tls_cert_file=pki.server_cert, tls_key_file=str(unreadable))
    cfg = ServerConfig(tls_cert_file=pki.server_cert, tls_key_file=pki.server_key,
                       tls_client_ca_file=pki.ca, auth_tokens=(ENV_TOKEN,))
    assert cfg.tls and cfg.mutual_tls
    assert ENV_TOKEN not in repr(cfg)
    assert pickle.loads(pickle.dumps(cfg)) == cfg  # plain data: it crosses Ray
    assert not ServerConfig().tls and ServerConfig().host == "127.0.0.1"


def test_tokens_are_validated():
    for bad in ("short", "has space in the middle!!", "comma,separated,token-xx", "tökén" * 5):
        with pytest.raises(ValueError, match="auth tokens"):
            ServerConfig(auth_tokens=(bad,))
    with pytest.raises(ValueError, match="tuple"):
        ServerConfig(auth_tokens=[ENV_TOKEN])


def test_load_tokens_from_file_and_env(token_file, tmp_path, monkeypatch):
    monkeypatch.delenv(TOKENS_ENV, raising=False)
    assert load_tokens() == ()
    assert load_tokens(token_file) == FILE_TOKENS
    monkeypatch.setenv(TOKENS_ENV, f"{ENV_TOKEN}, {FILE_TOKENS[0]}")
    assert load_tokens() == (ENV_TOKEN, FILE_TOKENS[0])
    assert load_tokens(token_file) == (*FILE_TOKENS, ENV_TOKEN)  # union, no duplicates
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="holds no token"):
        load_tokens(empty)
    with pytest.raises(ValueError, match="cannot read"):
        load_tokens(tmp_path / "missing")
    monkeypatch.setenv(TOKENS_ENV, "tooshort")
    with pytest.raises(ValueError, match="at least"):
        load_tokens()


def test_token_matching_and_header_parsing():
    tokens = TokenSet(FILE_TOKENS)
    assert tokens.matches(FILE_TOKENS[1].encode())
    assert not tokens.matches(WRONG_TOKEN.encode()) and not tokens.matches(b"")
    assert FILE_TOKENS[0] not in repr(tokens)
    with pytest.raises(ValueError):
        TokenSet(())
    assert bearer_token([("authorization", "Bearer abc")]) == b"abc"
    assert bearer_token([("authorization", "bearer   abc ")]) == b"abc"
    assert bearer_token([("x-other", "Bearer abc")]) is None
    assert bearer_token([("authorization", "Basic abc")]) is None
    assert bearer_token([("authorization", "Bearer ")]) is None
    assert bearer_token([("authorization", "Bearer a"), ("authorization", "Bearer a")]) is None
    assert bearer_token(None) is None


def test_client_security_and_cli_flags(pki):
    with pytest.raises(ValueError, match="needs its key"):
        ClientSecurity(client_cert_file=pki.client_cert)
    assert ClientSecurity(root_ca_file=pki.ca).tls
    with pytest.raises(ValueError, match="cannot read"):
        ClientSecurity(root_ca_file="/nonexistent/ca.pem").credentials()
    args = build_parser().parse_args(["generate", "x", "--tls-ca", pki.ca, "--tls-cert",
                                      pki.client_cert, "--tls-key", pki.client_key,
                                      "--auth-token-file", "/t"])
    sec = client_security_from_args(args)
    assert (sec.tls, sec.root_ca_file, sec.client_key_file, sec.token_file) == (
        True, pki.ca, pki.client_key, "/t")
    server = ServerConfig(tls_cert_file=pki.server_cert, tls_key_file=pki.server_key,
                          auth_tokens=(ENV_TOKEN,))
    assert security_summary(server) == ("TLS, bearer tokens",
                                         " --tls-ca CA.pem --auth-token-file TOKEN")
    for cmd in (["bench", "--address", "a:1", "--trace", "poisson:1:1", "--tls"],
                ["serve", "--tls-cert", "c", "--tls-key", "k", "--tls-client-ca", "ca",
                 "--auth-token-file", "t", "--kv-secret-file", "s"]):
        args = build_parser().parse_args(cmd)
        assert args.command == cmd[0]
