"""The SSE codec on its own: what the encoder writes, the decoder reads back, however the bytes
are cut on the way."""

import asyncio

import pytest

from protocol.sse import DONE, Decoder, Event, encode_event, iter_events

EVENTS = [
    Event(b'{"a": 1}'),
    Event(b"line one\nline two\n\nafter a blank line"),
    Event("héllo wörld ✓".encode()),
    Event(b"named", event="token"),
    Event(b"crlf\r\ninside"),
    Event(DONE),
]
# What the decoder must return for EVENTS (a CR LF inside data becomes a line break).
EXPECTED = [e if b"\r\n" not in e.data else Event(e.data.replace(b"\r\n", b"\n"), e.event) for e in EVENTS]


def _wire(with_space: bool = True) -> bytes:
    return b"".join(encode_event(e.data, e.event, with_space) for e in EVENTS)


def test_encoder_writes_the_spec_format():
    assert encode_event(b'{"x":1}') == b'data: {"x":1}\n\n'
    assert encode_event(b'{"x":1}', with_space=False) == b'data:{"x":1}\n\n'
    assert encode_event(b"a\nb", event="e") == b"event: e\ndata: a\ndata: b\n\n"


@pytest.mark.parametrize("with_space", [True, False])
def test_every_cut_point_decodes_the_same(with_space):
    wire = _wire(with_space)
    for size in (1, 2, 3, 7, 64, len(wire)):
        decoder = Decoder()
        got = []
        for i in range(0, len(wire), size):
            got += decoder.feed(wire[i : i + size])
        assert got == EXPECTED, size


def test_cuts_anywhere_in_two():
    wire = _wire()
    for cut in range(len(wire) + 1):
        decoder = Decoder()
        assert decoder.feed(wire[:cut]) + decoder.feed(wire[cut:]) == EXPECTED


def test_comments_ids_cr_line_ends_and_unknown_fields():
    wire = b": keep-alive\r\rid: 7\rretry: 10\rfoo: bar\rdata:x\r\rdata: y\n\n"
    assert Decoder().feed(wire) == [Event(b"x", None, "7"), Event(b"y", None, "7")]


def test_an_unfinished_event_is_not_returned():
    decoder = Decoder()
    assert decoder.feed(b"data: partial\n") == []
    assert decoder.feed(b"\n") == [Event(b"partial")]


def test_iter_events_over_a_byte_stream():
    async def chunks():
        wire = _wire()
        for i in range(0, len(wire), 5):
            yield wire[i : i + 5]

    async def collect():
        return [e async for e in iter_events(chunks())]

    assert asyncio.run(collect()) == EXPECTED
