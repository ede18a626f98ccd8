"""The HTTP listener: an aiohttp runner in the router's event loop, next to gRPC.

``await HttpServer(app, host, port, tls).start()`` binds (port 0 picks a free one) and
returns ``HOST:PORT``; ``stop()`` stops accepting and gives in-flight requests
``grace_s`` to finish. TLS uses the gRPC endpoint's PEM files: a server certificate and
key, plus a client CA for mutual TLS (clients without a certificate it signed are refused
in the handshake).
"""

from __future__ import annotations

import ssl

from aiohttp import web


def tls_context(cert_file: str, key_file: str, client_ca_file: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_file, key_file)
    if client_ca_file is not None:
        ctx.load_verify_locations(client_ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class HttpServer:
    def __init__(self, app: web.Application, host: str, port: int,
                 tls: ssl.SSLContext | None = None, backlog: int = 4096, grace_s: float = 5.0):
        self.app = app
        self.grace_s = grace_s
        self.host = host
        self.port = port
        self.tls = tls
        self.backlog = backlog
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        # handler_cancellation: a client that goes away cancels its handler (the request's
        # KV is released at once, not when the next write fails). No access log: one line
        # per request would cost more than the request path itself.
        runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None,
                               shutdown_timeout=self.grace_s)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, ssl_context=self.tls,
                           backlog=self.backlog, reuse_address=True)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    async def stop(self) -> None:
        if self._runner is None:
            return
        runner, self._runner = self._runner, None
        await runner.shutdown()
        await runner.cleanup()
