"""The router's end of the direct channel to one prefill worker (``channel_wire``).

``PrefillChannel`` is one Unix-socket connection: calls are written at once and return a
future their reply resolves; one reader task hands replies out by ``call_id``. When the
connection ends (the worker died or restarted, or broke the protocol) every pending call
fails with ``WorkerGone``, as a Ray call to a dead actor does, so the router's retries
and health marks treat both paths alike. A worker's own exceptions come back as the same
built-in type where it is one of ``_KNOWN`` (``RuntimeError`` otherwise).
"""

from __future__ import annotations

import asyncio
import itertools
import logging

import pdserve.prefill_worker.channel_wire as wire
from pdserve.kv_transfer.messages import KVDestination
from pdserve.prefill_worker.messages import PrefillRequest, PrefillResult
from pdserve.router.worker_gone import WorkerGone

log = logging.getLogger(__name__)

_KNOWN = {cls.__name__: cls for cls in (ValueError, KeyError, TypeError, RuntimeError)}


class PrefillChannel:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 hello: wire.Hello):
        self.worker_id = hello.worker_id
        self.incarnation = hello.incarnation
        self._reader, self._writer = reader, writer
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._closed: str | None = None  # why, once closed
        self._reader_task = asyncio.ensure_future(self._read())

    @classmethod
    async def connect(cls, path: str, worker_id: str, timeout: float = 5.0) -> PrefillChannel:
        """Connect to the socket at ``path`` and check that ``worker_id`` answers."""
        async def open_() -> PrefillChannel:
            reader, writer = await asyncio.open_unix_connection(path)
            try:
                hello = await wire.read_reply(reader)
                if not isinstance(hello, wire.Hello) or hello.version != wire.VERSION:
                    raise wire.ProtocolError(f"expected Hello v{wire.VERSION}, got {hello!r:.200}")
                if hello.worker_id != worker_id:
                    raise wire.ProtocolError(f"the socket at {path} is worker "
                                             f"{hello.worker_id}, not {worker_id}")
            except BaseException:
                writer.close()
                raise
            return cls(reader, writer, hello)

        return await asyncio.wait_for(open_(), timeout)

    @property
    def alive(self) -> bool:
        return self._closed is None

    def prefill(self, msg: PrefillRequest) -> asyncio.Future[PrefillResult]:
        return self._call(lambda cid: wire.PrefillCall(cid, msg))

    def set_destination(self, destination: KVDestination) -> asyncio.Future[None]:
        return self._call(lambda cid: wire.DestinationCall(cid, destination))

    def abort(self, request_id: str) -> asyncio.Future[bool]:
        return self._call(lambda cid: wire.AbortCall(cid, request_id))

    def _call(self, make) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        if self._closed is not None:
            fut.set_exception(WorkerGone(self._closed))
            return fut
        call_id = next(self._ids)
        self._pending[call_id] = fut
        try:
            self._writer.write(wire.encode(make(call_id)))
        except Exception as exc:  # (a message too large: only this call fails)
            self._pending.pop(call_id, None)
            fut.set_exception(exc)
        return fut

    async def _read(self) -> None:
        why = "the prefill worker closed the channel"
        try:
            while (reply := await wire.read_reply(self._reader)) is not None:
                fut = self._pending.pop(getattr(reply, "call_id", -1), None)
                if fut is None or fut.done():  # (the caller stopped waiting)
                    continue
                if isinstance(reply, wire.PrefillDone):
                    fut.set_result(reply.result)
                elif isinstance(reply, wire.Ack):
                    fut.set_result(reply.value)
                elif isinstance(reply, wire.Failed):
                    fut.set_exception(_KNOWN.get(reply.error_type, RuntimeError)(
                        f"{reply.message}" if reply.error_type in _KNOWN
                        else f"{reply.error_type}: {reply.message}"))
        except wire.ProtocolError as exc:
            why = f"the prefill worker broke the channel's protocol: {exc}"
            log.warning("prefill channel to %s: %s", self.worker_id, why)
        except (ConnectionError, OSError) as exc:
            why = f"the channel to the prefill worker failed: {exc}"
        except asyncio.CancelledError:
            why = "the channel was closed"
        finally:
            self._fail_all(why)

    def _fail_all(self, why: str) -> None:
        self._closed = self._closed or why
        self._writer.close()
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(WorkerGone(why))

    async def close(self) -> None:
        self._reader_task.cancel()
        await asyncio.gather(self._reader_task, return_exceptions=True)
