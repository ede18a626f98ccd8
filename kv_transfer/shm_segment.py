"""Named shared-memory segments that hold a whole KV cache, and who may unlink them.

Lifecycle: the decode worker ``create``s the segment (it owns it: ``unlink`` on close);
prefill workers on the same host ``attach`` by name and only ever ``close`` their mapping.

Python < 3.13 registers every ``SharedMemory`` it opens, attached ones included, with the
``multiprocessing`` resource tracker, which unlinks all registered segments when the
process's tracker exits: a prefill worker exiting would destroy the decode worker's
cache. Unregistering after attach (the usual workaround) has a second problem: a process
started with ``multiprocessing`` shares its parent's tracker, whose registry is a set, so
the child's unregister also erases the creator's registration (and the creator's own
unlink later makes the tracker print a KeyError). So attachers never register: they map
the segment the way ``SharedMemory`` does (``shm_open`` + ``mmap``) minus the
registration (3.13's ``track=False`` would do the same, but mapping it ourselves also
lets us ask for ``MAP_POPULATE``). The creator stays registered, so the tracker still
reclaims the segment if the decode worker dies without closing it, and it also unlinks
at interpreter exit (atexit: a worker that exits without ``close``, as a Ray actor may,
must not leave a cache-sized file in /dev/shm; the tracker alone misses this when it is
killed along with the worker).

Closing while tensors still view the mapping raises ``BufferError`` in the stdlib; here the
mapping is then simply left to be unmapped when the last such tensor is freed.
"""

from __future__ import annotations

import atexit
import contextlib
import mmap
import os
import re
import uuid
from multiprocessing import shared_memory

import torch

try:  # the module SharedMemory itself uses on POSIX
    import _posixshmem
except ImportError:  # Windows: no resource tracker involvement, SharedMemory is fine
    _posixshmem = None

_DEV_SHM = "/dev/shm"


class _QuietSharedMemory(shared_memory.SharedMemory):
    def __del__(self) -> None:
        # BufferError: tensors still view the mapping; they keep it alive until freed.
        with contextlib.suppress(BufferError, OSError):
            self.close()


class ShmSegment:
    """A mapped segment; ``tensor(...)`` views it as the cache tensor."""

    def __init__(self, name: str, size: int, buffer, shm: shared_memory.SharedMemory | None,
                 owner: bool):
        self.name = name
        self.size = size
        self.owner = owner
        self._buffer = buffer  # mmap or memoryview the tensors are built on
        self._shm = shm
        self._unlinked = False
        self._creator_pid = os.getpid()

    @classmethod
    def create(cls, name: str, size: int) -> ShmSegment:
        _check_free_space(size)
        shm = _QuietSharedMemory(name=name, create=True, size=size)
        segment = cls(shm.name, size, shm.buf, shm, owner=True)
        atexit.register(segment._unlink_at_exit)
        return segment

    @classmethod
    def attach(cls, name: str, populate: bool = False, length: int | None = None
               ) -> ShmSegment:
        """Map an existing segment without registering it (see the module docstring).

        ``populate`` builds this process's page tables for the whole segment now
        (``MAP_POPULATE``): otherwise the first write to each 4 KiB page of the cache
        takes a page fault, which made cross-process copies ~40% slower in the
        benchmark until every block had been written once. ``length`` maps only the first
        that many bytes (a header) instead of the whole segment.
        """
        if _posixshmem is None:
            shm = _QuietSharedMemory(name=name)
            return cls(name, shm.size, shm.buf, shm, owner=False)
        fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
        try:
            size = os.fstat(fd).st_size
            if length is not None:
                if length > size:
                    raise ValueError(f"segment {name} has {size} bytes, not {length}")
                size = length
            flags = mmap.MAP_SHARED
            if populate and hasattr(mmap, "MAP_POPULATE"):
                flags |= mmap.MAP_POPULATE
            # The mapping keeps its own duplicate of the descriptor.
            mapping = mmap.mmap(fd, size, flags=flags)
        finally:
            os.close(fd)
        return cls(name, size, mapping, None, owner=False)

    @property
    def buffer(self):
        """The mapped bytes (an mmap or memoryview); None once closed."""
        return self._buffer

    def tensor(self, shape: tuple[int, ...], dtype: torch.dtype, offset: int = 0) -> torch.Tensor:
        """A view of ``shape``/``dtype`` starting ``offset`` bytes into the segment."""
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * dtype.itemsize
        if offset < 0 or offset % dtype.itemsize or offset + nbytes > self.size:
            raise ValueError(f"segment {self.name} has {self.size} bytes, need {nbytes} "
                             f"at offset {offset}")
        raw = torch.frombuffer(self._buffer, dtype=torch.uint8, count=nbytes, offset=offset)
        return raw.view(dtype).view(shape)

    def close(self) -> None:
        """Unmap (deferred while tensors still view it). Never destroys the segment."""
        target = self._shm if self._shm is not None else self._buffer
        self._buffer = None
        with contextlib.suppress(BufferError):
            target.close()

    def unlink(self) -> None:
        """Destroy the segment (owner only, once); existing mappings stay valid."""
        if not self.owner or self._unlinked:
            return
        self._unlinked = True
        atexit.unregister(self._unlink_at_exit)
        with contextlib.suppress(FileNotFoundError):
            self._shm.unlink()

    def _unlink_at_exit(self) -> None:
        if os.getpid() == self._creator_pid:  # not in a forked child that inherited atexit
            self.unlink()


def segment_name(kind: str, worker_id: str, instance_key: str = "") -> str:
    """``pdserve-<kind>-<worker>-<key>``. ``instance_key`` (a Ray actor id: the same across
    the actor's restarts, unique in the cluster) makes the name stable, so a restarted
    worker finds and replaces the segment its killed predecessor left; without one the
    name is random."""
    # POSIX allows ~255 chars and only one leading '/'; keep it short and filename-safe.
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", worker_id)[:40]
    key = re.sub(r"[^A-Za-z0-9]", "", instance_key)[:16] or uuid.uuid4().hex[:8]
    return f"pdserve-{kind}-{safe}-{key}"


def unlink_by_name(name: str) -> bool:
    """Destroy the segment ``name`` whoever made it; False if there was none. For segments
    of dead processes (a SIGKILL skips all cleanup): the owner's mappings stay valid."""
    try:
        if _posixshmem is not None:
            _posixshmem.shm_unlink("/" + name)
        else:
            os.unlink(os.path.join(_DEV_SHM, name))
    except FileNotFoundError:
        return False
    return True


def _check_free_space(size: int) -> None:
    # tmpfs accepts a segment bigger than its free space and then kills the first writer
    # past the limit with SIGBUS; refuse up front with a readable error instead.
    if not os.path.isdir(_DEV_SHM):
        return
    st = os.statvfs(_DEV_SHM)
    free = st.f_bavail * st.f_frsize
    if size > free:
        raise OSError(f"{_DEV_SHM} has {free / 2**30:.1f} GiB free, the KV cache needs "
                      f"{size / 2**30:.1f} GiB (raise the shm size, e.g. docker --shm-size)")
