"""``router.speedups.tunnel`` without a network: frame boundaries and close frames.

The frames fed to ``FrameTracker`` are made by wsproto (an independent
encoder), masked as a client sends them or unmasked as a server does, and
cut at arbitrary points the way TCP reads cut them.
"""

from __future__ import annotations

import struct
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.frame_protocol import FrameProtocol, Opcode

from router import speedups

# The twin in use: compiled in the first pass of the suite, pure in the second.
INTERNAL_ERROR = speedups.tunnel.INTERNAL_ERROR
POLICY_VIOLATION = speedups.tunnel.POLICY_VIOLATION
FrameTracker = speedups.tunnel.FrameTracker
Tunnel = speedups.tunnel.Tunnel
accept_key = speedups.tunnel.accept_key
close_frame = speedups.tunnel.close_frame

# Payload sizes around each length form of RFC 6455 §5.2: 7-bit, 16-bit
# (126 marker) and 64-bit (127 marker).
SIZES = st.one_of(
    st.integers(0, 125),
    st.sampled_from([125, 126, 127, 65535, 65536]),
    st.integers(126, 2000),
    st.integers(65536, 70000),
)


@st.composite
def frames(draw: st.DrawFn) -> tuple[bytes, bool]:
    """One frame as wsproto makes it, and whether it is a close frame."""
    masked = draw(st.booleans())
    proto = FrameProtocol(client=masked, extensions=[])
    kind = draw(st.sampled_from(["text", "binary", "fragment", "ping", "close"]))
    if kind == "ping":
        return bytes(proto.ping(b"p" * draw(st.integers(0, 125)))), False
    if kind == "close":
        reason = "r" * draw(st.integers(0, 123))
        return bytes(proto.close(1000, reason)), True
    size = draw(SIZES)
    if kind == "text":
        return bytes(proto.send_data("t" * size)), False
    if kind == "binary":
        return bytes(proto.send_data(b"\xff" * size)), False
    # A message in two frames: a first fragment, then a continuation.
    first = bytes(proto.send_data(b"a" * size, fin=False))
    return first + bytes(proto.send_data(b"b" * draw(st.integers(0, 300)))), False


@settings(max_examples=150, deadline=None)
@given(
    st.lists(frames(), min_size=1, max_size=6),
    st.lists(st.integers(min_value=0, max_value=1 << 20), max_size=40),
)
def test_boundaries_found_wherever_reads_are_cut(
    drawn: list[tuple[bytes, bool]], cuts: list[int]
) -> None:
    stream = b"".join(frame for frame, _ in drawn)
    ends = _ends_by_decoding(stream) | {0}
    points = sorted({c % (len(stream) + 1) for c in cuts} | {len(stream)})

    tracker = FrameTracker()
    start = 0
    for point in points:
        tracker.feed(stream[start:point])
        start = point
        assert tracker.at_boundary == (point in ends), point
    assert tracker.saw_close == any(is_close for _, is_close in drawn)


@settings(max_examples=60, deadline=None)
@given(st.lists(frames(), min_size=1, max_size=3))
def test_byte_by_byte_true_exactly_at_frame_ends(
    drawn: list[tuple[bytes, bool]],
) -> None:
    """One byte per read: every header is split at every possible place."""
    stream = b"".join(frame for frame, _ in drawn)
    expected = _ends_by_decoding(stream)
    tracker = FrameTracker()
    for i in range(len(stream)):
        tracker.feed(stream[i : i + 1])
        assert tracker.at_boundary == (i + 1 in expected), i


def _ends_by_decoding(stream: bytes) -> set[int]:
    """Frame ends found by reading each header's length, independently."""
    ends, pos = set(), 0
    while pos < len(stream):
        b1 = stream[pos + 1]
        n, size = b1 & 0x7F, 2
        if n == 126:
            n, size = struct.unpack_from("!H", stream, pos + 2)[0], 4
        elif n == 127:
            n, size = struct.unpack_from("!Q", stream, pos + 2)[0], 10
        if b1 & 0x80:
            size += 4
        pos += size + n
        ends.add(pos)
    return ends


def _header(length: int, masked: bool, opcode: int = 0x2) -> bytes:
    mask = 0x80 if masked else 0
    if length < 126:
        head = bytes([0x80 | opcode, mask | length])
    elif length < 1 << 16:
        head = bytes([0x80 | opcode, mask | 126]) + struct.pack("!H", length)
    else:
        head = bytes([0x80 | opcode, mask | 127]) + struct.pack("!Q", length)
    return head + (b"\x01\x02\x03\x04" if masked else b"")


def test_sixteen_bit_length_with_header_split_everywhere() -> None:
    for masked in (False, True):
        head = _header(300, masked)
        assert len(head) == (8 if masked else 4)
        for cut in range(1, len(head)):
            tracker = FrameTracker()
            tracker.feed(head[:cut])
            assert not tracker.at_boundary
            tracker.feed(head[cut:])
            assert tracker.need == 300
            tracker.feed(b"x" * 299)
            assert not tracker.at_boundary
            tracker.feed(b"x")
            assert tracker.at_boundary


def test_sixty_four_bit_length_with_header_split_everywhere() -> None:
    for masked in (False, True):
        head = _header(65536, masked)
        assert len(head) == (14 if masked else 10)
        for cut in range(1, len(head)):
            tracker = FrameTracker()
            tracker.feed(head[:cut])
            tracker.feed(head[cut:] + b"y" * 65535)
            assert tracker.need == 1
            tracker.feed(b"y" + _header(0, masked))
            # An empty frame right after: ends with its own header.
            assert tracker.at_boundary


def test_huge_declared_length_is_counted_not_buffered() -> None:
    tracker = FrameTracker()
    tracker.feed(_header(1 << 40, masked=True) + b"z" * 10)
    assert tracker.need == (1 << 40) - 10
    assert tracker.header == b""


def test_several_frames_and_a_partial_header_in_one_read() -> None:
    tracker = FrameTracker()
    data = _header(3, False) + b"abc" + _header(0, True) + _header(5, False)[:1]
    tracker.feed(data)
    assert not tracker.at_boundary
    assert tracker.header == data[-1:]
    tracker.feed(_header(5, False)[1:] + b"12345")
    assert tracker.at_boundary


def test_close_frame_is_noticed() -> None:
    tracker = FrameTracker()
    tracker.feed(_header(2, False, opcode=0x9) + b"hi")
    assert not tracker.saw_close
    # Noticed once its header (2 bytes and a 4-byte mask) is in.
    tracker.feed(close_frame(1000, "", to_server=True)[:6])
    assert tracker.saw_close


# -- close frames and accept keys ------------------------------------------------


def _decode(frame: bytes, from_client: bool) -> Any:
    # wsproto insists that frames to a server are masked and frames to a
    # client are not, so this also checks the masking.
    reader = FrameProtocol(client=not from_client, extensions=[])
    reader.receive_bytes(frame)
    [decoded] = list(reader.received_frames())
    return decoded


def test_close_frames_are_masked_only_towards_the_server() -> None:
    to_client = close_frame(POLICY_VIOLATION, "route revoked", to_server=False)
    decoded = _decode(to_client, from_client=False)
    assert decoded.opcode == Opcode.CLOSE
    assert decoded.payload == (POLICY_VIOLATION, "route revoked")
    assert not to_client[1] & 0x80

    to_server = close_frame(1001, "router shutting down", to_server=True)
    assert _decode(to_server, from_client=True).payload == (
        1001,
        "router shutting down",
    )
    assert to_server[1] & 0x80


def test_accept_key_of_rfc_6455_example() -> None:
    # RFC 6455 §1.3.
    assert accept_key(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


# -- Tunnel against scripted transports --------------------------------------------


class FakeTransport:
    def __init__(self) -> None:
        self.written = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.written += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def _tunnel() -> tuple[Tunnel, FakeTransport, FakeTransport]:
    client, upstream = FakeTransport(), FakeTransport()
    return Tunnel(client, upstream, route_id=1), client, upstream  # type: ignore[arg-type]


# What each side answers the router's close frame with (RFC 6455 §5.5.1).
CLIENT_ANSWER = close_frame(POLICY_VIOLATION, "", to_server=True)
UPSTREAM_ANSWER = close_frame(1001, "", to_server=False)


def test_end_closes_each_side_once_it_answers() -> None:
    tunnel, client, upstream = _tunnel()
    tunnel.from_client(_header(2, True) + b"hi")
    tunnel.from_upstream(_header(2, False) + b"yo")
    tunnel.end(POLICY_VIOLATION, 1001, "route revoked")
    assert _decode(client.written[4:], from_client=False).payload[0] == 1008
    assert _decode(upstream.written[8:], from_client=True).payload[0] == 1001
    # Closed now, each socket would answer its peer's close frame with a
    # reset: a browser calls that ending unclean.
    assert not client.closed and not upstream.closed
    told_client, told_upstream = client.written, upstream.written

    # Each answer closes its own side and goes nowhere else, nor does a
    # frame sent after ours crossed it.
    tunnel.from_upstream(_header(1, False) + b"!" + UPSTREAM_ANSWER)
    assert upstream.closed and not client.closed
    tunnel.from_client(CLIENT_ANSWER)
    assert client.closed
    assert (client.written, upstream.written) == (told_client, told_upstream)


def test_end_mid_frame_finishes_the_frame_first() -> None:
    tunnel, client, upstream = _tunnel()
    frame = _header(10, False) + b"0123456789"
    tunnel.from_upstream(frame[:5])
    tunnel.end(POLICY_VIOLATION, 1001, "route revoked")
    # The upstream is told at once but kept open: the rest of its frame
    # must still be read and passed on.
    assert upstream.written.startswith(b"\x88") and not upstream.closed
    assert client.written == frame[:5] and not client.closed
    # The rest of the frame, and a frame after it that is dropped.
    tunnel.from_upstream(frame[5:] + _header(1, False) + b"!")
    assert client.written.startswith(frame)
    assert _decode(client.written[len(frame) :], from_client=False).payload[0] == 1008
    tunnel.from_client(CLIENT_ANSWER)
    tunnel.from_upstream(UPSTREAM_ANSWER)
    assert client.closed and upstream.closed


def test_nothing_after_the_frame_in_flight_reaches_the_other_side() -> None:
    # A revoked client finishes its frame, then starts a frame claiming
    # 2^40 bytes and hides whole messages inside it: none may reach the
    # sandbox, in this read or in later ones.
    tunnel, _, upstream = _tunnel()
    frame = _header(10, True) + b"0123456789"
    tunnel.from_client(frame[:8])
    tunnel.end(POLICY_VIOLATION, 1001, "route revoked")
    assert upstream.written == frame[:8]
    tunnel.from_client(frame[8:] + _header(1 << 40, True))
    assert upstream.written.startswith(frame)
    told = upstream.written
    assert _decode(told[len(frame) :], from_client=True).payload[0] == 1001
    for _ in range(3):
        tunnel.from_client(_header(5, True) + b"hello")
    assert upstream.written == told


def test_upstream_mid_frame_finishing_and_answering_in_one_read() -> None:
    # The client still gets the router's close frame: the upstream's close
    # (its answer to ours) was read, not passed on.
    tunnel, client, upstream = _tunnel()
    frame = _header(10, False) + b"0123456789"
    tunnel.from_upstream(frame[:5])
    tunnel.end(POLICY_VIOLATION, 1001, "route revoked")
    tunnel.from_upstream(frame[5:] + UPSTREAM_ANSWER)
    assert client.written.startswith(frame)
    assert _decode(client.written[len(frame) :], from_client=False).payload[0] == 1008
    assert upstream.closed and not client.closed
    tunnel.from_client(CLIENT_ANSWER)
    assert client.closed


def test_client_mid_frame_finishing_and_answering_in_one_read() -> None:
    tunnel, client, upstream = _tunnel()
    frame = _header(10, True) + b"0123456789"
    tunnel.from_client(frame[:5])
    tunnel.end(POLICY_VIOLATION, 1001, "route revoked")
    tunnel.from_client(frame[5:] + CLIENT_ANSWER)
    assert upstream.written.startswith(frame)
    assert _decode(upstream.written[len(frame) :], from_client=True).payload[0] == 1001
    assert client.closed


def test_upstream_answer_split_across_reads() -> None:
    tunnel, _, upstream = _tunnel()
    tunnel.end(POLICY_VIOLATION, 1001, "route revoked")
    tunnel.from_upstream(UPSTREAM_ANSWER[:1])
    assert not upstream.closed
    tunnel.from_upstream(UPSTREAM_ANSWER[1:])
    assert upstream.closed


def test_upstream_lost_gives_client_1011_once() -> None:
    tunnel, client, _ = _tunnel()
    tunnel.peer_lost("upstream")
    assert _decode(client.written, from_client=False).payload[0] == INTERNAL_ERROR
    assert client.closed


def test_upstream_lost_mid_frame_closes_client_without_frame() -> None:
    tunnel, client, _ = _tunnel()
    tunnel.from_upstream(_header(10, False) + b"01234")
    tunnel.peer_lost("upstream")
    assert client.written == _header(10, False) + b"01234"
    assert client.closed


def test_upstream_lost_after_revocation_frame_waits_for_the_client() -> None:
    tunnel, client, upstream = _tunnel()
    tunnel.from_client(_header(10, True) + b"01")  # client mid-frame
    tunnel.end(POLICY_VIOLATION, 1001, "route revoked")
    assert client.written.startswith(b"\x88") and not client.closed
    told = client.written
    upstream.close()
    tunnel.peer_lost("upstream")
    # No second close frame; the client has ours and may still answer it.
    assert client.written == told and not client.closed
    tunnel.from_client(b"23456789" + CLIENT_ANSWER)
    assert client.closed
    assert client.written == told


def test_client_lost_closes_upstream_without_frame() -> None:
    tunnel, _, upstream = _tunnel()
    tunnel.peer_lost("client")
    assert upstream.written == b""
    assert upstream.closed


def test_end_after_a_peer_close_sends_no_second_close() -> None:
    tunnel, client, upstream = _tunnel()
    upstream_close = close_frame(1000, "done", to_server=False)
    tunnel.from_upstream(upstream_close)
    tunnel.end(POLICY_VIOLATION, 1001, "route revoked")
    # The client has its close frame (the upstream's); the upstream gets ours.
    assert client.written == upstream_close
    assert _decode(upstream.written, from_client=True).payload[0] == 1001
    # The upstream's close frame was its answer; the client's is still due.
    assert upstream.closed and not client.closed
    tunnel.from_client(CLIENT_ANSWER)
    assert client.closed


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=40), max_size=12))
def test_compiled_and_pure_trackers_agree(chunks: list[bytes]) -> None:
    """Any bytes, even not frames (64-bit lengths with the top bit set
    included): both twins find the same boundaries, chunk after chunk."""
    import importlib

    pure = importlib.import_module("router._tunnel_py").FrameTracker()
    try:
        compiled = importlib.import_module("router._ctunnel").FrameTracker()
    except ImportError:
        if not speedups.FORCED_PURE:
            raise
        return
    for chunk in chunks:
        pure.feed(chunk)
        compiled.feed(chunk)
        assert (compiled.need, compiled.header, compiled.saw_close) == (
            pure.need,
            pure.header,
            pure.saw_close,
        )
