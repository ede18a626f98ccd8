"""The prefill worker's end of the direct channel: a Unix socket served by plain threads.

``ChannelServer`` listens on a socket file in a fresh directory only this user may enter
(0700; the socket's own mode is 0600): on one host the file system's permissions are the
authentication, as for Ray's and vLLM's own local sockets. Each connection gets the
worker's ``Hello``, then carries calls (``channel_wire``) served by the same
``PrefillHost`` the Ray actor forwards to, so both paths behave alike.

No event loop is on this path (it was most of the channel's cost: each call and each
reply waited for the actor's loop to be scheduled, benchmarks/results/router_overhead_*):
a thread per connection reads calls and hands prompts straight to the worker's step loop
(``PrefillHost.submit``), and the step thread writes each result's frame to the socket
itself the moment it is sampled. Frames are written whole under one lock per connection.
A router that stops reading its replies for ``WRITE_TIMEOUT_S`` loses the connection
rather than stalling the worker.

When a connection ends, for whatever reason (the router closed it, died, or sent a frame
that is not of this protocol), every prefill it had in flight is aborted: nobody is left
to receive its result, and its blocks and queue entry are released at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import shutil
import socket
import tempfile
import threading

from pdserve.prefill_worker import channel_wire as wire
from pdserve.prefill_worker.host import PrefillHost

log = logging.getLogger(__name__)

WRITE_TIMEOUT_S = 5.0


class ChannelServer:
    def __init__(self, host: PrefillHost):
        self.host = host
        self.path: str | None = None
        self._listener: socket.socket | None = None
        self._dir: str | None = None
        self._connections: set[_Connection] = set()
        self._lock = threading.Lock()

    async def start(self) -> str:
        """Listen (once); the socket's path."""
        with self._lock:
            if self.path is None:
                self._dir = tempfile.mkdtemp(prefix="pdserve-prefill-")  # mode 0700
                path = os.path.join(self._dir, "channel.sock")
                listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                listener.bind(path)
                os.chmod(path, 0o600)
                listener.listen(64)
                self._listener = listener
                threading.Thread(target=self._accept, args=(listener,), daemon=True,
                                 name="pdserve-channel-accept").start()
                self.path = path
        return self.path

    async def close(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            connections, self._connections = list(self._connections), set()
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for c in connections:
            c.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:  # closed
                return
            conn = _Connection(sock, self.host, self._forget)
            with self._lock:
                if self._listener is None:
                    conn.close()
                    return
                self._connections.add(conn)
            conn.start()

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._connections.discard(conn)


class _Connection:
    def __init__(self, sock: socket.socket, host: PrefillHost, on_end):
        self.sock = sock
        self.host = host
        self._on_end = on_end
        self._write_lock = threading.Lock()
        self._in_flight: dict[int, str] = {}  # call_id -> request_id, prefills unanswered
        self._flight_lock = threading.Lock()
        self._closed = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._serve, daemon=True, name="pdserve-channel").start()

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    # -- reading calls (this connection's thread) ---------------------------------------
    def _serve(self) -> None:
        worker = self.host.worker
        try:
            self._send(wire.Hello(wire.VERSION, worker.worker_id, worker.incarnation))
            while (body := self._read_body()) is not None:
                self._dispatch(wire.decode_call(body))
        except wire.ProtocolError as exc:
            log.warning("prefill channel: dropping a connection: %s", exc)
        except OSError:
            pass
        finally:
            # The router is gone from this connection: no one will take these results.
            self.close()
            self.sock.close()
            with self._flight_lock:
                orphans, self._in_flight = list(self._in_flight.values()), {}
            for request_id in orphans:
                self.host.abort_nowait(request_id)
            self._on_end(self)

    def _read_exactly(self, n: int, at_boundary: bool = False) -> bytes | None:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                if at_boundary and not buf:
                    return None
                raise wire.ProtocolError("the stream ended inside a frame")
            buf += chunk
        return bytes(buf)

    def _read_body(self) -> bytes | None:
        head = self._read_exactly(wire.LENGTH_BYTES, at_boundary=True)
        if head is None:
            return None
        length = wire.frame_length(head)
        return self._read_exactly(length) if length else b""

    def _dispatch(self, call: wire.Call) -> None:
        if isinstance(call, wire.PrefillCall):
            cid = call.call_id
            with self._flight_lock:
                self._in_flight[cid] = call.request.request_id
            self.host.submit(call.request, lambda value: self._answer_prefill(cid, value))
        elif isinstance(call, wire.DestinationCall):
            self.host.set_destination_nowait(call.destination)
            self._send(wire.Ack(call.call_id))
        else:
            fut = self.host.abort_call(call.request_id)
            fut.add_done_callback(lambda f, cid=call.call_id: self._answer_abort(cid, f))

    # -- answering (the step thread, or this connection's) ------------------------------
    def _answer_prefill(self, call_id: int, value) -> None:
        with self._flight_lock:
            if self._in_flight.pop(call_id, None) is None:
                return  # the connection ended: it was aborted, nobody waits
        if isinstance(value, asyncio.CancelledError):
            # Aborted while waiting: answered as the Ray path does, with the cancellation.
            reply = wire.Failed(call_id, "CancelledError", "the prefill was aborted")
        elif isinstance(value, BaseException):  # the worker refused it: its exception
            reply = wire.Failed(call_id, type(value).__name__, str(value)[:2000])
        else:
            reply = wire.PrefillDone(call_id, value)
        self._send(reply)

    def _answer_abort(self, call_id: int, fut) -> None:
        exc = fut.exception()
        self._send(wire.Ack(call_id, fut.result()) if exc is None else
                   wire.Failed(call_id, type(exc).__name__, str(exc)[:2000]))

    def _send(self, msg) -> None:
        """Write one whole frame, or close the connection (its reader then cleans up)."""
        if self._closed.is_set():
            return
        frame = memoryview(wire.encode(msg))
        with self._write_lock:
            try:
                while frame:
                    try:
                        sent = self.sock.send(frame, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        # The router is not reading: wait a little, never forever.
                        _, writable, _ = select.select([], [self.sock], [], WRITE_TIMEOUT_S)
                        if not writable:
                            raise TimeoutError("the router stopped reading") from None
                        continue
                    frame = frame[sent:]
            except (OSError, ValueError) as exc:
                log.warning("prefill channel: closing a connection: %s", exc)
                self.close()
