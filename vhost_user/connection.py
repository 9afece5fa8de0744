"""vhost-user framing over a trio UNIX stream socket, with SCM_RIGHTS fds.

One ``Connection`` wraps one socket: the main front-end socket or our end of
the back-end channel socketpair. It moves whole messages and nothing else:

- ``send`` writes the 12-byte header and the payload; the fds ride as
  SCM_RIGHTS on the sendmsg that carries the header's first byte.
- ``recv`` reads exactly 12 header bytes, validates them, then reads exactly
  ``size`` payload bytes, collecting SCM_RIGHTS from every recvmsg. Received
  fds are close-on-exec (MSG_CMSG_CLOEXEC) and are all closed on any error.
- ``transact`` sends a request and reads its reply under one lock, so
  request/reply pairs never interleave, within a timeout.

Once a message has been half sent or half read, or a reply did not come or
was wrong, the byte stream can no longer be trusted: the connection is then
marked unusable, its socket is closed (so the daemon sees the front-end go
rather than a session that silently stopped), and every later call raises
``ConnectionLost`` naming the first error.

A message that has begun to arrive must be complete within the timeout,
also on ``recv`` (which otherwise waits as long as it takes for a message
to begin): a peer that sends half a header and stalls is an error, not a
reason to wait forever.
"""

from __future__ import annotations

import array
import enum
import errno
import fcntl
import logging
import os
import select
import socket
import struct
import termios
from typing import Iterable

import trio

from .protocol import (
    FLAG_REPLY,
    HEADER,
    HEADER_SIZE,
    MAX_FDS,
    REPLY_FLAGS,
    ConnectionLost,
    DaemonTimeout,
    DaemonUnavailable,
    FrontendRequest,
    Header,
    Message,
    ProtocolError,
    VhostUserError,
    request_name,
)

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 5.0

_FD_SIZE = array.array("i").itemsize
# Room for one more fd than allowed, so that an excess shows up as a count
# rather than only as MSG_CTRUNC.
_ANCILLARY_SPACE = socket.CMSG_SPACE((MAX_FDS + 1) * _FD_SIZE)
_CMSG_CLOEXEC = getattr(socket, "MSG_CMSG_CLOEXEC", 0)
_SEND_FLAGS = getattr(socket, "MSG_NOSIGNAL", 0)


def close_fds(fds: Iterable[int]) -> None:
    """Close every fd, ignoring ones that are already gone."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class _Progress:
    """How far the reading of one message got: bytes received of the bytes
    expected (the header until it is known, then header and payload). With
    ``timeout`` set, the rest must follow the first byte within it."""

    __slots__ = ("got", "want", "timeout", "scope")

    def __init__(self, timeout: float | None = None) -> None:
        self.got = 0
        self.want = HEADER_SIZE
        self.timeout = timeout
        self.scope: trio.CancelScope | None = None

    def describe(self) -> str:
        if self.got < HEADER_SIZE:
            return f"{self.got} of the {HEADER_SIZE} header bytes"
        return (f"{self.got} of the {self.want} bytes (header and a payload of "
                f"{self.want - HEADER_SIZE} according to its size field)")


def _check_send_fds(fds: tuple[int, ...]) -> None:
    if len(fds) > MAX_FDS:
        raise ValueError(f"{len(fds)} fds on one message, at most {MAX_FDS}")
    for fd in fds:
        if isinstance(fd, bool) or not isinstance(fd, int) or fd < 0:
            raise ValueError(f"{fd!r} is not a file descriptor")


async def connect_unix(path: str, *, timeout: float = DEFAULT_TIMEOUT) -> trio.socket.SocketType:
    """Dial the daemon's UNIX socket; DaemonUnavailable with a one-line
    reason when nobody is there."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ok = False
    try:
        with trio.fail_after(timeout):
            await sock.connect(os.fspath(path))
        ok = True
        return sock
    except FileNotFoundError:
        raise DaemonUnavailable(
            f"no vhost-user daemon is listening on {path} (it does not exist)") from None
    except ConnectionRefusedError:
        raise DaemonUnavailable(
            f"no vhost-user daemon is listening on {path} (connection refused)") from None
    except PermissionError:
        raise DaemonUnavailable(
            f"cannot connect to the vhost-user daemon on {path} (permission denied)") from None
    except trio.TooSlowError:
        raise DaemonUnavailable(
            f"the vhost-user daemon on {path} did not accept the connection within "
            f"{timeout:g} s") from None
    except OSError as e:
        raise DaemonUnavailable(
            f"cannot connect to the vhost-user daemon on {path} ({e.strerror or e})") from None
    finally:
        if not ok:
            sock.close()


class Connection:
    """Message framing on one connected AF_UNIX SOCK_STREAM trio socket.

    ``kind`` names the request ids of this channel (FrontendRequest on the
    main socket, BackendRequest on the back-end channel), for log lines and
    error messages. ``label`` says which daemon this is (its socket path).
    """

    def __init__(self, sock: trio.socket.SocketType, *, label: str,
                 kind: type[enum.IntEnum] = FrontendRequest,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise ValueError("a vhost-user connection needs an AF_UNIX SOCK_STREAM socket")
        self._sock = sock
        self.label = label
        self._kind = kind
        self.timeout = timeout
        # Held for a whole send, or a whole request/reply pair.
        self._lock = trio.Lock()
        # Held while reading one message.
        self._recv_lock = trio.Lock()
        self._closed = False
        self._broken: str | None = None
        # Set by close(): wakes wait_hangup().
        self._closed_event = trio.Event()

    @classmethod
    def from_stdlib(cls, sock: socket.socket, **kwargs: object) -> Connection:
        return cls(trio.socket.from_stdlib_socket(sock), **kwargs)  # type: ignore[arg-type]

    # -- state

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def usable(self) -> bool:
        return not self._closed and self._broken is None

    def close(self) -> None:
        """Close the socket; tasks blocked on it get ConnectionLost, and
        wait_hangup returns."""
        if not self._closed:
            self._closed = True
            self._sock.close()
            self._closed_event.set()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    async def wait_hangup(self) -> None:
        """Return when the peer hangs up (or the socket errors), without
        touching the byte stream: replies in flight are left to recv().
        Also return when the connection is closed at this end, e.g. after
        the daemon lied: either way it is over.

        A private epoll instance watches the socket for EPOLLRDHUP only
        (EPOLLHUP and EPOLLERR always report), so ordinary traffic never
        wakes this task; trio waits on the epoll fd itself."""
        if self._closed:
            return
        watcher = select.epoll(1)
        try:
            watcher.register(self._sock.fileno(), select.EPOLLRDHUP)
            async with trio.open_nursery() as nursery:
                async def peer_hangs_up() -> None:
                    while not watcher.poll(0):
                        await trio.lowlevel.wait_readable(watcher.fileno())
                    nursery.cancel_scope.cancel()

                async def closed_here() -> None:
                    await self._closed_event.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(peer_hangs_up)
                nursery.start_soon(closed_here)
        finally:
            watcher.close()

    def _mark_broken(self, reason: str) -> None:
        """The byte stream cannot be trusted any more: remember why, and
        close the socket so the daemon sees the front-end go."""
        if self._broken is None and not self._closed:
            self._broken = reason
            logger.warning("%s: connection no longer usable, closing it: %s", self.label,
                           reason)
            self.close()

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise ConnectionLost(f"{self.label}: the vhost-user connection is unusable "
                                 f"after an earlier error ({self._broken})")
        if self._closed:
            raise ConnectionLost(f"{self.label}: the vhost-user connection is closed")

    def _pending_bytes(self) -> int:
        """Bytes waiting to be read on the socket (without reading them)."""
        try:
            raw = fcntl.ioctl(self._sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
        except OSError:
            return 0
        return struct.unpack("i", raw)[0]

    def _name(self, request: int) -> str:
        return request_name(self._kind, request)

    # -- public operations

    async def send(self, request: int, payload: bytes = b"", fds: tuple[int, ...] = (),
                   need_reply: bool = False) -> None:
        """Send one request; do not wait for anything back."""
        msg = Message.make_request(request, payload, tuple(fds), need_reply=need_reply)
        _check_send_fds(msg.fds)
        async with self._lock:
            self._check_usable()
            await self._send_within_timeout(msg)

    async def send_reply(self, request: int, payload: bytes = b"") -> None:
        """Answer a request the peer sent (flags 0x5, never with fds)."""
        msg = Message.make_reply(request, payload)
        async with self._lock:
            self._check_usable()
            await self._send_within_timeout(msg)

    async def recv(self) -> Message:
        """Wait for and read one whole message. The caller owns its fds.
        Waits as long as it takes for a message to begin; once it has, the
        rest must come within the timeout (else DaemonTimeout)."""
        async with self._recv_lock:
            self._check_usable()
            progress = _Progress(self.timeout)
            with trio.CancelScope() as progress.scope:
                return await self._recv_message(None, progress)
            # Only our own deadline, armed by the first byte, gets here.
            raise DaemonTimeout(
                f"{self.label}: the vhost-user daemon sent {progress.describe()} of a message "
                f"and then nothing for {self.timeout:g} s", received=progress.got)

    async def transact(self, request: int, payload: bytes = b"", fds: tuple[int, ...] = (),
                       *, need_reply: bool = False, max_reply_fds: int = 0,
                       timeout: float | None = None) -> Message:
        """Send a request and return its reply, which must carry the same
        request id, flags exactly 0x5 and at most ``max_reply_fds`` fds."""
        msg = Message.make_request(request, payload, tuple(fds), need_reply=need_reply)
        _check_send_fds(msg.fds)
        name = self._name(request)
        limit = self.timeout if timeout is None else timeout
        async with self._lock, self._recv_lock:
            self._check_usable()
            done = False
            progress = _Progress()
            try:
                stale = self._pending_bytes()
                if stale:
                    # The daemon speaks only when asked: these bytes belong
                    # to no request, and would be read as the reply to this one.
                    raise ProtocolError(
                        f"{self.label}: the vhost-user daemon lies: it sent {stale} bytes "
                        f"nobody asked for before {name} (a reply longer than its size "
                        f"field?)")
                with trio.fail_after(limit):
                    await self._send_message(msg)
                    reply = await self._recv_message(name, progress)
                self._check_reply(request, name, reply, max_reply_fds)
                done = True
                return reply
            except trio.TooSlowError:
                if progress.got:
                    raise DaemonTimeout(
                        f"{self.label}: the vhost-user daemon sent {progress.describe()} of "
                        f"its reply to {name} and then nothing for {limit:g} s (a size field "
                        f"larger than the payload?)", received=progress.got) from None
                raise DaemonTimeout(
                    f"{self.label}: the vhost-user daemon did not answer {name} within "
                    f"{limit:g} s") from None
            finally:
                if not done:
                    self._mark_broken(f"{name} did not complete")

    # -- internals

    async def _send_within_timeout(self, msg: Message) -> None:
        try:
            with trio.fail_after(self.timeout):
                await self._send_message(msg)
        except trio.TooSlowError:
            self._mark_broken(f"sending {self._name(msg.request)} timed out")
            raise DaemonTimeout(
                f"{self.label}: the vhost-user daemon did not take {self._name(msg.request)} "
                f"within {self.timeout:g} s") from None

    async def _send_message(self, msg: Message) -> None:
        name = self._name(msg.request)
        data = msg.pack_header() + msg.payload
        logger.debug("%s -> %s flags=%#x size=%d fds=%d", self.label, name, msg.flags,
                     len(msg.payload), len(msg.fds))
        ancillary = []
        if msg.fds:
            ancillary.append((socket.SOL_SOCKET, socket.SCM_RIGHTS,
                              array.array("i", msg.fds).tobytes()))
        sent = 0
        try:
            sent = await self._sock.sendmsg([data], ancillary, _SEND_FLAGS)
            while sent < len(data):
                sent += await self._sock.send(data[sent:], _SEND_FLAGS)
        except trio.ClosedResourceError:
            raise ConnectionLost(f"{self.label}: connection closed while sending {name}") from None
        except OSError as e:
            if e.errno == errno.EBADF and sent == 0 and not self._closed:
                raise VhostUserError(
                    f"{self.label}: cannot send {name}: one of its fds {msg.fds} is not "
                    f"open") from None
            self._mark_broken(f"sending {name} failed")
            raise ConnectionLost(
                f"{self.label}: the vhost-user daemon went away while {name} was being sent "
                f"({e.strerror or e})") from None
        finally:
            if 0 < sent < len(data):
                self._mark_broken(f"{name} was only partly sent")

    async def _recv_message(self, waiting_for: str | None, progress: _Progress) -> Message:
        fds: list[int] = []
        ok = False
        try:
            head = await self._recv_exactly(HEADER_SIZE, fds, progress, waiting_for)
            request, flags, size = HEADER.unpack(head)
            try:
                header = Header(request, flags, size)
            except ValueError as e:
                # Nothing of the payload is read: a huge size is never allocated.
                raise ProtocolError(
                    f"{self.label}: the vhost-user daemon sent a bad message header"
                    f"{self._in_reply_to(waiting_for)} (request {self._name(request)}, flags "
                    f"{flags:#x}, size {size}): {e}") from None
            progress.want = HEADER_SIZE + header.size
            payload = b""
            if header.size:
                payload = await self._recv_exactly(header.size, fds, progress, waiting_for)
            msg = Message(header.request, header.flags, payload, tuple(fds))
            logger.debug("%s <- %s flags=%#x size=%d fds=%d", self.label,
                         self._name(msg.request), msg.flags, len(payload), len(fds))
            ok = True
            return msg
        finally:
            if not ok:
                close_fds(fds)
                if progress.got:
                    self._mark_broken("a message was only partly read")

    async def _recv_exactly(self, count: int, fds: list[int], progress: _Progress,
                            waiting_for: str | None) -> bytes:
        buf = bytearray()
        while len(buf) < count:
            try:
                data, ancillary, msg_flags, _ = await self._sock.recvmsg(
                    count - len(buf), _ANCILLARY_SPACE, _CMSG_CLOEXEC)
            except trio.ClosedResourceError:
                raise ConnectionLost(f"{self.label}: the vhost-user connection was closed "
                                     f"locally") from None
            except OSError as e:
                self._mark_broken("receiving failed")
                during = self._while(waiting_for, progress)
                raise ConnectionLost(
                    f"{self.label}: lost the vhost-user daemon{during} "
                    f"({e.strerror or e})") from None
            if data and not progress.got and progress.scope is not None:
                # The message has begun: the rest is due within the timeout.
                progress.scope.deadline = trio.current_time() + progress.timeout
            # Counted before the fds are checked: these bytes are gone from
            # the stream whatever comes next.
            buf += data
            progress.got += len(data)
            self._collect_fds(ancillary, msg_flags, fds, waiting_for)
            if not data:
                self._mark_broken("the daemon closed the connection")
                if progress.got:
                    raise ConnectionLost(
                        f"{self.label}: the vhost-user daemon closed the connection in the "
                        f"middle of {self._message(waiting_for)}, after {progress.describe()}")
                raise ConnectionLost(
                    f"{self.label}: the vhost-user daemon closed the connection"
                    f"{self._while(waiting_for, progress)}")
        return bytes(buf)

    @staticmethod
    def _while(waiting_for: str | None, progress: _Progress) -> str:
        if waiting_for is None:
            return ""
        if progress.got:
            return f" in the middle of its reply to {waiting_for}"
        return (f" while {waiting_for} was pending (libvhost-user daemons drop the "
                f"connection on a request they do not implement)")

    @staticmethod
    def _in_reply_to(waiting_for: str | None) -> str:
        return "" if waiting_for is None else f" in reply to {waiting_for}"

    @staticmethod
    def _message(waiting_for: str | None) -> str:
        return "a message" if waiting_for is None else f"its reply to {waiting_for}"

    def _collect_fds(self, ancillary: list, msg_flags: int, fds: list[int],
                     waiting_for: str | None) -> None:
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(data[:len(data) - len(data) % _FD_SIZE])
                if not _CMSG_CLOEXEC:
                    for fd in got:
                        os.set_inheritable(fd, False)
                fds.extend(got)
            else:
                logger.debug("%s: ignoring control message level=%d type=%d", self.label,
                             level, kind)
        if msg_flags & socket.MSG_CTRUNC:
            raise ProtocolError(f"{self.label}: the vhost-user daemon sent more than "
                                f"{len(fds)} fds with {self._message(waiting_for)}, at most "
                                f"{MAX_FDS} are allowed (the excess was discarded)")
        if len(fds) > MAX_FDS:
            raise ProtocolError(f"{self.label}: the vhost-user daemon sent {len(fds)} fds with "
                                f"{self._message(waiting_for)}, at most {MAX_FDS} are allowed")

    def _check_reply(self, request: int, name: str, reply: Message, max_fds: int) -> None:
        problem = None
        if reply.request != request:
            problem = (f"answered {name} with a message for {self._name(reply.request)}")
        elif not reply.flags & FLAG_REPLY:
            problem = (f"answered {name} with flags {reply.flags:#x}, without the reply flag "
                       f"{FLAG_REPLY:#x} (a reply has {REPLY_FLAGS:#x})")
        elif reply.flags != REPLY_FLAGS:
            problem = (f"answered {name} with flags {reply.flags:#x}, a reply has "
                       f"{REPLY_FLAGS:#x}")
        elif len(reply.fds) > max_fds:
            problem = (f"attached {len(reply.fds)} fds to its reply to {name}, expected at "
                       f"most {max_fds}")
        if problem is not None:
            close_fds(reply.fds)
            raise ProtocolError(f"{self.label}: the vhost-user daemon lies: it {problem}")
