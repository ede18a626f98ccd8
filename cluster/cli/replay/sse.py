"""Server-sent events, incrementally: bytes as they arrive in, each event's data out.

What the OpenAI streaming APIs need of the format (WHATWG HTML, "server-sent events"):
lines end with LF, CRLF or CR; an event ends at a blank line; its data is its ``data:``
lines joined with LF (one space after the colon dropped); comment lines (``:``) and the
other fields (``event``, ``id``, ``retry``) are ignored, as is an event without data.
Bytes are split into lines before decoding, so a multi-byte character cut between two
network reads is decoded whole.
"""

from __future__ import annotations


class SSEParser:
    def __init__(self) -> None:
        self._buf = b""
        self._data: list[str] = []
        self._cr = False  # the last byte fed was CR: a following LF belongs to it

    def feed(self, chunk: bytes) -> list[str]:
        """The data of every event that ``chunk`` completes, in order."""
        if self._cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._cr = chunk.endswith(b"\r")
        self._buf += chunk
        lines = self._buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        self._buf = lines.pop()  # an unterminated line waits for the rest
        events = []
        for raw in lines:
            line = raw.decode("utf-8", errors="replace")
            if not line:
                if self._data:
                    events.append("\n".join(self._data))
                    self._data = []
                continue
            field, _, value = line.partition(":")
            if field == "data":
                self._data.append(value[1:] if value.startswith(" ") else value)
        return events
