"""Keeps the direct channel to one prefill worker's Ray actor up, when it can be.

``DirectPath.channel()`` never waits: it returns the live ``PrefillChannel``, or None
(the caller goes over Ray) and starts connecting in the background if nothing is under
way. Connecting asks the actor, over Ray, for its socket (``channel_address``, given the
router's node: a worker on another node answers None, and this path stays on Ray for
good: the channel is a Unix socket, so same host only). A channel that ends (the worker
died or was restarted by Ray) is replaced the same way, with the restarted process's new
socket, at most once per ``retry_s``; in between, calls go over Ray, which also waits
for the restart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from pdserve.router.prefill_channel import PrefillChannel

log = logging.getLogger(__name__)


class DirectPath:
    def __init__(self, worker_id: str, target: Any, node_id: Callable[[], str],
                 retry_s: float = 1.0):
        self.worker_id = worker_id
        self.target = target  # the worker's Ray actor handle
        self._node_id = node_id
        self.retry_s = retry_s
        self.disabled: str | None = None  # why this worker is served over Ray only
        self.connects = 0  # channels opened so far (a restart opens a new one)
        self._channel: PrefillChannel | None = None
        self._connecting: asyncio.Task | None = None
        self._last_try = float("-inf")

    def channel(self) -> PrefillChannel | None:
        ch = self._channel
        if ch is not None and ch.alive:
            return ch
        if (self.disabled is None and self._connecting is None
                and time.monotonic() - self._last_try >= self.retry_s):
            self._last_try = time.monotonic()
            self._connecting = asyncio.ensure_future(self._connect())
        return None

    async def _connect(self) -> None:
        try:
            path = await self.target.channel_address.remote(self._node_id())
            if path is None:
                self.disabled = "the worker is on another node (the channel is a Unix socket)"
                log.info("prefill %s: request path over Ray: %s", self.worker_id, self.disabled)
                return
            old, self._channel = self._channel, await PrefillChannel.connect(path, self.worker_id)
            self.connects += 1
            if old is not None:
                await old.close()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # (worker dead or restarting: over Ray until next try)
            log.debug("prefill %s: no direct channel yet: %s", self.worker_id, exc)
        finally:
            self._connecting = None

    async def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
            await asyncio.gather(self._connecting, return_exceptions=True)
        if self._channel is not None:
            await self._channel.close()
