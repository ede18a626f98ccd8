"""The prefill worker's end of the direct channel: a Unix socket in its event loop.

``ChannelServer`` listens on a socket file in a fresh directory only this user may enter
(0700; the socket's own mode is 0600): on one host the file system's permissions are the
authentication, as for Ray's and vLLM's own local sockets. Each connection gets the
worker's ``Hello``, then carries calls (``channel_wire``) that are served concurrently
by the very ``PrefillHost`` methods the Ray actor forwards to, so both paths behave alike.

When a connection ends, for whatever reason (the router closed it, died, or sent a frame
that is not of this protocol), every prefill it had in flight is aborted: nobody is left
to receive its result, and its blocks and queue entry are released at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile

from pdserve.prefill_worker import channel_wire as wire
from pdserve.prefill_worker.host import PrefillHost

log = logging.getLogger(__name__)


class ChannelServer:
    def __init__(self, host: PrefillHost):
        self.host = host
        self.path: str | None = None
        self._server: asyncio.AbstractServer | None = None
        self._dir: str | None = None
        self._connections: set[asyncio.Task] = set()

    async def start(self) -> str:
        """Listen (once); the socket's path."""
        if self.path is None:
            self._dir = tempfile.mkdtemp(prefix="pdserve-prefill-")  # mode 0700
            path = os.path.join(self._dir, "channel.sock")
            self._server = await asyncio.start_unix_server(self._serve, path)
            os.chmod(path, 0o600)
            self.path = path
        return self.path

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._connections):
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)
            self._server = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(asyncio.current_task())
        in_flight: dict[int, tuple[str, asyncio.Task]] = {}  # call_id -> (request_id, task)
        worker = self.host.worker
        try:
            writer.write(wire.encode(wire.Hello(wire.VERSION, worker.worker_id,
                                                worker.incarnation)))
            while (call := await wire.read_call(reader)) is not None:
                task = asyncio.ensure_future(self._answer(call, writer))
                if isinstance(call, wire.PrefillCall):
                    in_flight[call.call_id] = (call.request.request_id, task)
                    task.add_done_callback(lambda _t, cid=call.call_id: in_flight.pop(cid, None))
        except wire.ProtocolError as exc:
            log.warning("prefill channel: dropping a connection: %s", exc)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            # The router is gone from this connection: no one will take these results.
            writer.close()
            for request_id, task in list(in_flight.values()):
                task.cancel()
                with contextlib.suppress(Exception):
                    await self.host.abort(request_id)
            self._connections.discard(asyncio.current_task())

    async def _answer(self, call: wire.Call, writer: asyncio.StreamWriter) -> None:
        try:
            if isinstance(call, wire.PrefillCall):
                reply = wire.PrefillDone(call.call_id, await self.host.prefill(call.request))
            elif isinstance(call, wire.DestinationCall):
                await self.host.set_destination(call.destination)
                reply = wire.Ack(call.call_id)
            else:
                reply = wire.Ack(call.call_id, await self.host.abort(call.request_id))
        except asyncio.CancelledError:
            if writer.is_closing():
                raise
            # Aborted while waiting (``abort`` cancels a waiting prefill): answer as the
            # Ray path does, with the cancellation.
            reply = wire.Failed(call.call_id, "CancelledError", "the prefill was aborted")
        except Exception as exc:  # the caller gets the worker's exception, as over Ray
            reply = wire.Failed(call.call_id, type(exc).__name__, str(exc)[:2000])
        if not writer.is_closing():
            writer.write(wire.encode(reply))
