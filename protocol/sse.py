"""Server-sent events: the one encoder the server writes with and the one decoder the SDK reads
with (https://html.spec.whatwg.org/multipage/server-sent-events.html).

No aiohttp and no torch here, so the client can import it alone. The decoder is incremental:
feed it bytes as they arrive, in chunks cut anywhere (mid-line, mid-UTF-8 character), and it
returns the events completed so far.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass

DONE = b"[DONE]"  # OpenAI's end-of-stream sentinel


@dataclass(frozen=True, slots=True)
class Event:
    data: bytes
    event: str | None = None
    id: str | None = None


def encode_event(data: bytes, event: str | None = None, with_space: bool = True) -> bytes:
    """One event. Multi-line data becomes several ``data`` lines, as the spec requires.

    ``with_space=False`` writes ``data:{...}`` (TGI's spelling) instead of ``data: {...}``.
    """
    field = b"data: " if with_space else b"data:"
    head = b"event: " + event.encode() + b"\n" if event else b""
    if b"\n" not in data and b"\r" not in data:
        return head + field + data + b"\n\n"
    lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    return head + b"".join(field + line + b"\n" for line in lines) + b"\n"


class Decoder:
    """Incremental SSE parser. ``feed`` returns the events completed by these bytes."""

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[bytes] = []
        self._event: str | None = None
        self._id: str | None = None

    def feed(self, chunk: bytes) -> list[Event]:
        self._buffer += chunk
        events = []
        while True:
            line, sep = self._next_line()
            if sep is None:
                return events
            if not line:  # a blank line dispatches
                if self._data:
                    events.append(Event(b"\n".join(self._data), self._event, self._id))
                self._data, self._event = [], None
                continue
            if line.startswith(b":"):  # a comment (keep-alive)
                continue
            name, _, value = line.partition(b":")
            if value.startswith(b" "):
                value = value[1:]
            if name == b"data":
                self._data.append(value)
            elif name == b"event":
                self._event = value.decode()
            elif name == b"id":
                self._id = value.decode()
            # "retry" and unknown fields are ignored, as the spec says

    def _next_line(self) -> tuple[bytes, bytes | None]:
        buf = self._buffer
        lf, cr = buf.find(b"\n"), buf.find(b"\r")
        if cr == -1 or (lf != -1 and lf < cr):
            if lf == -1:
                return b"", None
            self._buffer = buf[lf + 1 :]
            return buf[:lf], b"\n"
        # \r or \r\n; a \r at the very end may still grow into \r\n
        if cr + 1 == len(buf):
            return b"", None
        end = cr + 2 if buf[cr + 1] == 0x0A else cr + 1
        self._buffer = buf[end:]
        return buf[:cr], b"\r"


async def iter_events(chunks: AsyncIterable[bytes]) -> AsyncIterator[Event]:
    """Events from a byte stream (e.g. ``response.content.iter_any()``)."""
    decoder = Decoder()
    async for chunk in chunks:
        for event in decoder.feed(chunk):
            yield event
