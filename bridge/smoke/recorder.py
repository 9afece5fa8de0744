"""A recording proxy between the bridge and the daemon under test.

The bridge dials the recorder's socket instead of the daemon's; for each
connection the recorder dials the daemon and relays every vhost-user
message both ways unchanged (header, payload and the fds riding on it),
keeping a copy of each header and payload. The smoke checks read that
record to see what the bridge sent and what the daemon answered, without
depending on the bridge's log.

The recorder frames messages only to record them: it forwards what it
read even when a header is nonsense (the bridge is the one to judge), and
a message cut short by a closed connection is recorded as incomplete.
Only the main socket is seen; the back-end channel (SET_BACKEND_REQ_FD)
travels as an fd and is not relayed here.
"""

from __future__ import annotations

import array
import os
import socket
import time

import attrs
import trio

from vhost_user.protocol import FLAG_REPLY, HEADER, HEADER_SIZE, FrontendRequest, request_name

# Room for more fds than the protocol allows, so an excess is relayed, not cut.
_ANCILLARY = socket.CMSG_SPACE(64 * array.array("i").itemsize)
_CMSG_CLOEXEC = getattr(socket, "MSG_CMSG_CLOEXEC", 0)
_SEND_FLAGS = getattr(socket, "MSG_NOSIGNAL", 0)
_MAX_RECORDED_PAYLOAD = 1 << 16
"""A header announcing more than this is relayed as far as it goes but not waited for."""

REQUEST = "request"
"""Direction of a message from the bridge to the daemon."""
REPLY = "reply"
"""Direction of a message from the daemon to the bridge."""


@attrs.frozen
class Recorded:
    """One message as it passed through."""

    session: int
    """1 for the bridge's first connection, 2 for the one after it redialled, ..."""
    direction: str
    request: int
    flags: int
    size: int
    """The header's size field."""
    payload: bytes
    """The payload bytes that arrived (fewer than ``size`` if incomplete)."""
    nfds: int
    complete: bool
    at: float

    @property
    def name(self) -> str:
        return request_name(FrontendRequest, self.request)

    @property
    def is_reply_flagged(self) -> bool:
        return bool(self.flags & FLAG_REPLY)

    def describe(self) -> str:
        what = f"{self.name} {self.direction} (flags {self.flags:#x}, {self.size}-byte payload"
        if self.nfds:
            what += f", {self.nfds} fd(s)"
        if not self.complete:
            what += f", cut short after {len(self.payload)} bytes"
        return what + ")"


@attrs.frozen
class SessionEvent:
    """Something about a connection other than a message."""

    session: int
    what: str
    at: float


class _Closed(Exception):
    """The peer closed its end (``got`` bytes of the current piece had arrived)."""

    def __init__(self, got: bytes) -> None:
        super().__init__("closed")
        self.got = got


def _take_fds(ancdata, fds: list[int]) -> None:
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % array.array("i").itemsize
            fds.extend(array.array("i", data[:usable]))


async def _recv_exactly(sock, count: int, fds: list[int]) -> bytes:
    buf = bytearray()
    while len(buf) < count:
        data, ancdata, _flags, _addr = await sock.recvmsg(count - len(buf), _ANCILLARY, _CMSG_CLOEXEC)
        _take_fds(ancdata, fds)
        if not data:
            raise _Closed(bytes(buf))
        buf += data
    return bytes(buf)


async def _send_all(sock, data: bytes, fds: list[int]) -> None:
    view = memoryview(data)
    first = True
    while view or first:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if first and fds else []
        sent = await sock.sendmsg([view], anc, _SEND_FLAGS)
        first = False
        view = view[sent:]


def _close(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


class Recorder:
    """Listen on ``listen_path``; relay each connection to ``daemon_path``.
    Run with ``nursery.start(recorder.run)``; cancelled, it closes everything."""

    def __init__(self, listen_path: str, daemon_path: str) -> None:
        self.listen_path = listen_path
        self.daemon_path = daemon_path
        self.messages: list[Recorded] = []
        self.events: list[SessionEvent] = []
        self.sessions = 0
        self._live: list[tuple[trio.socket.SocketType, trio.socket.SocketType]] = []
        self._changed = trio.Event()

    # -- what the checks read ------------------------------------------------

    def mark(self) -> int:
        """A position in the record, for :meth:`since`."""
        return len(self.messages)

    def since(self, mark: int = 0) -> list[Recorded]:
        return self.messages[mark:]

    def requests(self, mark: int = 0) -> list[Recorded]:
        return [m for m in self.messages[mark:] if m.direction == REQUEST]

    def last_request(self) -> Recorded | None:
        for m in reversed(self.messages):
            if m.direction == REQUEST:
                return m
        return None

    @property
    def connected(self) -> bool:
        return bool(self._live)

    async def wait_for(self, predicate, timeout: float) -> bool:
        """Wait until ``predicate()`` holds (re-checked after every message
        or session event); False after ``timeout`` seconds."""
        with trio.move_on_after(timeout):
            while not predicate():
                await self._changed.wait()
            return True
        return False

    def drop(self) -> None:
        """Close the live connections (both ends), as if the daemon's
        connection had broken; the daemon itself is not touched."""
        for bridge_side, daemon_side in self._live:
            for sock in (bridge_side, daemon_side):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    # -- running -------------------------------------------------------------

    def _note(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _event(self, session: int, what: str) -> None:
        self.events.append(SessionEvent(session, what, time.monotonic()))
        self._note()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await listener.bind(self.listen_path)
            listener.listen(8)
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    conn, _ = await listener.accept()
                    self.sessions += 1
                    nursery.start_soon(self._serve, conn, self.sessions)
        finally:
            listener.close()
            try:
                os.unlink(self.listen_path)
            except FileNotFoundError:
                pass

    async def _serve(self, bridge_side, session: int) -> None:
        daemon_side = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                await daemon_side.connect(self.daemon_path)
            except OSError as exc:
                self._event(session, f"could not dial the daemon at {self.daemon_path}: {exc.strerror or exc}")
                return
            self._event(session, "connected")
            pair = (bridge_side, daemon_side)
            self._live.append(pair)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, bridge_side, daemon_side, session, REQUEST, nursery.cancel_scope)
                    nursery.start_soon(self._pump, daemon_side, bridge_side, session, REPLY, nursery.cancel_scope)
            finally:
                self._live.remove(pair)
        finally:
            bridge_side.close()
            daemon_side.close()

    async def _pump(self, src, dst, session: int, direction: str, scope: trio.CancelScope) -> None:
        who = "the bridge" if direction == REQUEST else "the daemon"
        try:
            while True:
                fds: list[int] = []
                try:
                    try:
                        head = await _recv_exactly(src, HEADER_SIZE, fds)
                    except _Closed as closed:
                        if closed.got:
                            self._record(session, direction, closed.got, b"", fds, complete=False)
                        self._event(session, f"{who} closed the connection")
                        return
                    request, flags, size = HEADER.unpack(head)
                    wanted = min(size, _MAX_RECORDED_PAYLOAD)
                    try:
                        payload = await _recv_exactly(src, wanted, fds)
                    except _Closed as closed:
                        self._record(session, direction, head, closed.got, fds, complete=False)
                        await self._forward(dst, head + closed.got, fds)
                        self._event(session, f"{who} closed the connection in the middle of a message")
                        return
                    self._record(session, direction, head, payload, fds, complete=wanted == size)
                    await self._forward(dst, head + payload, fds)
                    if wanted != size:
                        self._event(session, f"{who} announced a {size}-byte payload; not relayed further")
                        return
                finally:
                    _close(fds)
        except OSError as exc:
            self._event(session, f"relaying from {who} failed: {exc.strerror or exc}")
        finally:
            scope.cancel()

    async def _forward(self, dst, data: bytes, fds: list[int]) -> None:
        try:
            await _send_all(dst, data, fds)
        except OSError:
            pass  # the other side is gone; its pump reports it

    def _record(self, session: int, direction: str, head: bytes, payload: bytes, fds: list[int],
                *, complete: bool) -> None:
        if len(head) == HEADER_SIZE:
            request, flags, size = HEADER.unpack(head)
        else:
            request, flags, size = -1, 0, 0
        self.messages.append(Recorded(session, direction, request, flags, size, payload, len(fds),
                                      complete and len(head) == HEADER_SIZE, time.monotonic()))
        self._note()
