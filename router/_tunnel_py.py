"""Upgraded connections: WebSocket tunnels (SPEC §5, revocation of §2).

This file is the pure twin; Cython compiles it as ``router._ctunnel`` with the
C types of ``_speedups/router/_ctunnel.pxd`` (see ``router.speedups``).

After a 101 the router relays bytes both ways untouched.  It still follows
where each frame ends, in both directions, for one reason: to end a tunnel
cleanly it must put a close frame *between* frames.  A close frame written in
the middle of a frame would be read as payload and leave the peer's parser
lost; so on revocation the frame in flight is finished first, then the close
frame follows.  The frames themselves come from wsproto.

``FrameTracker`` is the sans-IO part (bytes in, frame boundaries out);
``Tunnel`` is the IO part, driven by the two connections' callbacks.
"""

from __future__ import annotations

import base64
import hashlib
from typing import TYPE_CHECKING, Any

from wsproto.frame_protocol import FrameProtocol

from .splice import MIN_SPLICE, SpliceRelay, can_splice

if TYPE_CHECKING:
    import asyncio

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

# Close codes of RFC 6455 §7.4.1 that the router sends itself.
GOING_AWAY = 1001
POLICY_VIOLATION = 1008
INTERNAL_ERROR = 1011


def accept_key(key: bytes) -> bytes:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 §4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.strip() + WS_GUID).digest())


def close_frame(code: int, reason: str, to_server: bool) -> bytes:
    """A close frame as wsproto makes it; masked when sent to the server."""
    return bytes(FrameProtocol(client=to_server, extensions=[]).close(code, reason))


class FrameTracker:
    """Follows frame boundaries in one direction of a WebSocket stream.

    Only lengths are read: payloads are neither unmasked nor copied.  An
    opcode is remembered so that a close frame passing through is seen.
    """

    __slots__ = ("header", "need", "saw_close")

    def __init__(self) -> None:
        self.header = b""  # a frame header split across reads
        self.need = 0  # payload bytes of the current frame still to come
        self.saw_close = False

    @property
    def at_boundary(self) -> bool:
        return self.need == 0 and not self.header

    def feed(self, data: bytes) -> None:
        pos = 0
        end = len(data)
        need = self.need
        while pos < end:
            if need:
                rest = end - pos
                take = rest if need > rest else need
                pos += take
                need -= take
                continue

            # A frame header: 2 bytes, then 0, 2 or 8 of length, then 0 or 4
            # of mask (RFC 6455 §5.2).  It is read in place; only one split
            # across reads is joined first.
            if self.header:
                buf = self.header + data[pos : pos + 14]
                at = 0
                base = -len(self.header)
            else:
                buf = data
                at = pos
                base = 0
            avail = len(buf) - at
            if avail < 2:
                self.header = buf[at:]
                break
            b0 = buf[at]
            b1 = buf[at + 1]
            short = b1 & 0x7F
            size = 2 + (2 if short == 126 else 8 if short == 127 else 0)
            size += 4 if b1 & 0x80 else 0
            if avail < size:
                self.header = buf[at:]
                pos = end
                break
            if short == 126:
                need = buf[at + 2] << 8 | buf[at + 3]
            elif short == 127:
                need = 0
                for i in range(at + 2, at + 10):
                    need = need << 8 | buf[i]
            else:
                need = short
            if b0 & 0x0F == 0x8:
                self.saw_close = True
            pos += size + base
            self.header = b""
        self.need = need


class Tunnel:
    """Both halves of one upgraded connection."""

    __slots__ = (
        "client",
        "client_told",
        "closing",
        "loop",
        "relays",
        "route_id",
        "to_client",
        "to_upstream",
        "upstream",
        "upstream_told",
    )

    def __init__(
        self,
        client: asyncio.Transport,
        upstream: asyncio.Transport,
        route_id: int,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.client = client
        self.upstream = upstream
        self.route_id = route_id
        # Large frame payloads are spliced in the kernel (router.splice);
        # one relay at most per direction, keyed by that direction's tracker.
        self.loop = loop
        self.relays: dict[FrameTracker, SpliceRelay] = {}
        self.to_client = FrameTracker()
        self.to_upstream = FrameTracker()
        # (client code, upstream code, reason) once an ending is decided.
        self.closing: tuple[int, int, str] | None = None
        # Whether the router has written its own close frame to that side.
        self.client_told = False
        self.upstream_told = False

    def from_client(self, data: bytes) -> None:
        self._relay(data, self.to_upstream, self.upstream)

    def from_upstream(self, data: bytes) -> None:
        self._relay(data, self.to_client, self.client)

    def _relay(self, data: bytes, tracker: FrameTracker, out: Any) -> None:
        if self.closing is None:
            tracker.feed(data)
            out.write(data)
            if tracker.need >= MIN_SPLICE and self.loop is not None:
                self._splice(tracker, out)
            return

        # Ending: pass on only the rest of the frame that was in flight
        # when the ending began, then our close frame goes to ``out``
        # (``_try_finish``).  Nothing after that is passed on, whatever it
        # claims to be: it is only read, for the close frame this side
        # answers ours with.  (Read before our frame is written, a close
        # from this side would be taken for one already passed on.)
        told = self.upstream_told if out is self.upstream else self.client_told
        if not told and not tracker.at_boundary:
            cut = _frame_rest(tracker, data)
            if not out.is_closing():
                out.write(data[:cut])
            data = data[cut:]
        self._try_finish()
        if data:
            tracker.feed(data)
            self._try_finish()

    def _splice(self, tracker: FrameTracker, out: Any) -> None:
        """Move the rest of a large frame's payload without Python copies.

        Only the payload is spliced, and exactly up to the frame's end, so
        the tracker is at a boundary when the relay is done: frame headers
        and small frames still pass through ``_relay``.
        """
        src = self.upstream if out is self.client else self.client
        if tracker in self.relays or not can_splice(src, out, tracker.need):
            return
        assert self.loop is not None

        def done(ok: bool) -> None:
            del self.relays[tracker]
            if not ok:
                self.peer_lost("upstream" if src is self.upstream else "client")
                return
            tracker.need = 0
            if self.closing is not None:
                self._try_finish()

        self.relays[tracker] = SpliceRelay(self.loop, src, out, tracker.need, done)

    def _cancel_relays(self) -> None:
        # A relay holds duplicates of both sockets: closing the transports
        # alone would leave the connections open.
        relays = list(self.relays.values())
        self.relays.clear()
        for relay in relays:
            relay.cancel()

    def end(self, client_code: int, upstream_code: int, reason: str) -> None:
        """Close both sides with close frames, as soon as framing allows."""
        if self.closing is not None:
            return
        self.closing = (client_code, upstream_code, reason)
        self._try_finish()

    def _try_finish(self) -> None:
        assert self.closing is not None
        client_code, upstream_code, reason = self.closing
        # A side that already got a close frame from its peer gets no second
        # one (RFC 6455 §5.5.1: nothing follows a close frame).
        if not self.client_told and self.to_client.at_boundary:
            self.client_told = True
            if not self.client.is_closing() and not self.to_client.saw_close:
                self.client.write(close_frame(client_code, reason, to_server=False))
        if not self.upstream_told and self.to_upstream.at_boundary:
            self.upstream_told = True
            if not self.upstream.is_closing() and not self.to_upstream.saw_close:
                self.upstream.write(close_frame(upstream_code, reason, to_server=True))

        # A side's socket is closed once that side has a close frame and has
        # answered it with its own (RFC 6455 §7.1.1), not as soon as ours is
        # written: the answer would then meet a closed socket and a reset,
        # and a browser reports such an ending as not clean.  Until then
        # both sockets are read, so that a frame still in flight reaches
        # the other end whole.  A peer that never answers is cut by the
        # caller's grace timer.
        if self.client_told and self.to_upstream.saw_close:
            self._cancel_relays()
            self.client.close()
        if self.upstream_told and self.to_client.saw_close:
            self._cancel_relays()
            self.upstream.close()

    def peer_lost(self, side: str) -> None:
        """One socket died without a close handshake: end the other one.

        A client whose upstream vanished gets 1011 (RFC 6455 §7.4.1: the
        server met a condition that kept it from fulfilling the request),
        unless a close frame already went its way; an upstream whose client
        vanished is simply closed.  A client that has the router's own close
        frame (a revocation, a shutdown) keeps its socket until it answers.
        """
        self._cancel_relays()
        if side == "upstream":
            if self.client_told and not self.to_upstream.saw_close:
                # An ending is under way and the client has its close frame:
                # it still answers it, and then its socket is closed (above).
                return
            if not self.client.is_closing():
                told = self.client_told or self.to_client.saw_close
                if self.to_client.at_boundary and not told:
                    self.client_told = True
                    self.client.write(
                        close_frame(INTERNAL_ERROR, "upstream went away", False)
                    )
                self.client.close()
        elif not self.upstream.is_closing():
            # Cut: a sandbox that stopped reading would never let a close
            # finish, and nothing it was owed matters once the client left.
            self.upstream.abort()


def _frame_rest(tracker: FrameTracker, data: bytes) -> int:
    """How much of ``data`` finishes the frame in flight; feeds that much."""
    i = 0
    # The rest of a split header first (at most 14 bytes), then its payload.
    while i < len(data) and tracker.header:
        tracker.feed(data[i : i + 1])
        i += 1
    take = min(tracker.need, len(data) - i)
    tracker.feed(data[i : i + take])
    return i + take
