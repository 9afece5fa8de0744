"""A scripted vhost-user daemon that lies, for unit tests only.

``LyingDaemon`` listens on a UNIX socket path in a trio task and serves one
front-end at a time (as qemu-storage-daemon does). By default it answers
honestly, like libvhost-user: it replies to GET_* requests from a profile
(features, protocol features, queue count, memory slots, config space),
acks need-reply requests when REPLY_ACK was negotiated, remembers ring
bases, and treats a request that was not negotiated as fatal (it records a
violation and hangs up, as libvhost-user's vu_panic does).

A script of lies replaces chosen answers::

    lies = {
        F.GET_QUEUE_NUM: Reply(payload=u64(0)),            # every time
        F.GET_FEATURES: [None, Reply(payload=u64(1))],     # honest, then a lie
        F.SET_OWNER: HANGUP,
        F.GET_CONFIG: lambda payload: Reply(size=4096),    # computed per request
    }
    async with open_lying_daemon(path, profile=QSD, lies=lies) as daemon:
        ...

A lie is one of:

- ``Reply(payload=, request=, flags=, size=, fds=, then=)``: a reply in
  which every field not given is the honest one (the payload of a request
  without a reply of its own is the ack u64 0). ``size`` is the header's
  size field when it should not match the bytes sent; ``fds`` names kinds
  of fds to attach (``"eventfd"``, ``"memfd"``, ``"file"``, ``"socket"``,
  ``"pipe"``, ``"memfd-ro"``; ``"memfd:N"`` and ``"memfd-ro:N"`` are N
  bytes long instead of 4096; in a reply to GET_INFLIGHT_FD,
  ``"inflight"`` is a memfd of the honest size), created at send time;
  ``then`` is ``HANGUP`` (close the connection right after) or
  ``SILENCE`` (answer nothing more).
- ``Raw(data, fds=, then=)``: exactly these bytes on the wire.
- ``HANGUP``: close the connection without answering.
- ``SILENCE``: never answer this or any later request, but keep reading,
  so that the front-end hanging up is still seen.
- ``None``: the honest answer (useful in a per-occurrence list).
- a callable taking the request's payload and returning one of the above.

Each accepted connection is a ``Session``: it records every request seen,
the back-end channel socket the front-end handed over
(SET_BACKEND_REQ_FD), and whether the front-end hung up.

Inflight tracking (INFLIGHT_SHMFD, offered by the ``QSD_INFLIGHT``
profile, not by ``QSD``, as the real qemu-storage-daemon 7.2 does not
offer it): GET_INFLIGHT_FD is answered like libvhost-user does, with the
queues echoed, mmap_offset 0, the size libvhost-user computes and a fresh
memfd of exactly that size (``Session.inflight_given`` lists the identity
of every fd sent in such a reply); SET_INFLIGHT_FD is checked the way
libvhost-user maps it (one fd, a regular file at least offset + size long,
size not 0; otherwise a violation) and recorded in ``Session.inflight_set``
with the identity of the fd, so a test can tell which memfd came back.
The Reply lie without ``fds`` answers GET_INFLIGHT_FD with no fd at all. The back-end
channel is driven by the test through the session: ``backend_send``,
``backend_send_raw``, ``backend_read``.

Every fd the daemon sends is created just before sending and its own copy
is closed right after, so any copy still open afterwards belongs to the
code under test; ``leaked_fds`` finds those (by inode: eventfds all share
one anonymous inode and can only be counted, see ``open_fd_count``).
"""

from __future__ import annotations

import array
import contextlib
import enum
import gc
import os
import socket
import stat
import struct
import tempfile
from typing import Callable, Iterable, Union

import attrs
import trio

from vhost_user.protocol import FrontendRequest

F = FrontendRequest

HDR = struct.Struct("=III")
U64 = struct.Struct("=Q")
VRING_STATE = struct.Struct("=II")
CONFIG_HEAD = struct.Struct("=III")

REQUEST_FLAGS = 0x1
NEED_REPLY = 0x8
REPLY_FLAGS = 0x5
BIT30 = 1 << 30
REPLY_ACK = 1 << 3

# Room for many more fds than the protocol allows, so that a front-end
# sending too many is seen rather than truncated.
_ANCILLARY = socket.CMSG_SPACE(64 * 4)

# Which protocol feature bit each request needs (from the spec, not from the
# code under test).
GATES = {
    F.GET_QUEUE_NUM: 0, F.SET_BACKEND_REQ_FD: 5, F.GET_CONFIG: 9, F.SET_CONFIG: 9,
    F.GET_INFLIGHT_FD: 12, F.SET_INFLIGHT_FD: 12, F.RESET_DEVICE: 13,
    F.GET_MAX_MEM_SLOTS: 15, F.ADD_MEM_REG: 15, F.REM_MEM_REG: 15,
    F.SET_STATUS: 16, F.GET_STATUS: 16,
}
# Requests answered with a reply of their own, never with an ack.
OWN_REPLY = {F.GET_FEATURES, F.GET_PROTOCOL_FEATURES, F.GET_QUEUE_NUM, F.GET_MAX_MEM_SLOTS,
             F.GET_CONFIG, F.GET_VRING_BASE, F.GET_STATUS, F.GET_INFLIGHT_FD}

# What real daemons offer (Debian 12), usable as ``profile=``.
QSD_CONFIG = bytes.fromhex("00800000000000000000000000000000000000000000000080000000"
                           "01000000000000000000000000000000000000000000000000000000"
                           "00000000")
QSD = dict(features=0x175007E46, protocol_features=0x8F2B, queue_num=1, max_mem_slots=32,
           config=QSD_CONFIG)
INFLIGHT_SHMFD = 1 << 12
# A libvhost-user daemon that also offers inflight tracking.
QSD_INFLIGHT = dict(QSD, protocol_features=QSD["protocol_features"] | INFLIGHT_SHMFD)

INFLIGHT = struct.Struct("=QQHH4x")
# libvhost-user's layout: per queue, 16 bytes a descriptor + a u16, rounded
# up to 64 (vu_inflight_queue_size).
_INFLIGHT_DESC = 16
_INFLIGHT_ALIGN = 64


def inflight_queue_size(queue_size: int) -> int:
    raw = _INFLIGHT_DESC * queue_size + 2
    return (raw + _INFLIGHT_ALIGN - 1) // _INFLIGHT_ALIGN * _INFLIGHT_ALIGN


def inflight(mmap_size: int, mmap_offset: int, num_queues: int, queue_size: int) -> bytes:
    """A GET/SET_INFLIGHT_FD payload."""
    return INFLIGHT.pack(mmap_size, mmap_offset, num_queues, queue_size)


def u64(value: int) -> bytes:
    return U64.pack(value)


def header(request: int, flags: int, size: int) -> bytes:
    return HDR.pack(request, flags, size)


class Then(enum.Enum):
    HANGUP = "hangup"
    SILENCE = "silence"


HANGUP = Then.HANGUP
SILENCE = Then.SILENCE

FD_KINDS = ("eventfd", "memfd", "file", "socket", "pipe", "memfd-ro")


@attrs.frozen
class Reply:
    """A reply; fields left as None are the honest ones."""

    payload: bytes | None = None
    request: int | None = None
    flags: int = REPLY_FLAGS
    size: int | None = None
    fds: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    then: Then | None = None


@attrs.frozen
class Raw:
    """Exactly ``data`` on the wire (fds on its first byte)."""

    data: bytes
    fds: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    then: Then | None = None


Action = Union[Reply, Raw, Then, None]
Lie = Union[Action, Callable[[bytes], Action], list]


@attrs.frozen
class Seen:
    """One request as the daemon received it."""

    name: str
    flags: int
    payload: bytes
    nfds: int


@attrs.frozen
class InflightSet:
    """One SET_INFLIGHT_FD as the daemon received it: the payload fields
    and (device, inode) of the fd, None when it had no single fd."""

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int
    fd_identity: tuple[int, int] | None


def open_fd_count() -> int:
    """How many fds this process has open right now."""
    return len(os.listdir("/proc/self/fd"))


def settled_fd_count() -> int:
    """The fd count once the garbage of earlier tests is collected: a
    socket an earlier test dropped must not close half-way through this
    one and make a leak here look like none (or the count go down)."""
    gc.collect()
    return open_fd_count()


def _identity(fd: int) -> tuple[int, int] | None:
    """(device, inode) of what fd refers to, None for anonymous inodes
    (eventfd, epoll, ...) which every such fd shares."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
        st = os.fstat(fd)
    except OSError:
        return None
    if target.startswith("anon_inode:"):
        return None
    return (st.st_dev, st.st_ino)


class Session:
    """One front-end connection to the daemon."""

    def __init__(self, daemon: LyingDaemon, sock: trio.socket.SocketType) -> None:
        self.daemon = daemon
        self.sock = sock
        self.seen: list[Seen] = []
        self.violations: list[str] = []
        self.backend: trio.socket.SocketType | None = None
        self.negotiated = 0
        self.acked_features: int | None = None
        self.bases: dict[int, int] = {}
        self.counts: dict[int, int] = {}
        self.silent = False
        # (device, inode) of every fd sent with a GET_INFLIGHT_FD reply.
        self.inflight_given: list[tuple[int, int] | None] = []
        self.inflight_set: list[InflightSet] = []
        # The front-end closed its end (EOF read); the session ended.
        self.frontend_hung_up = trio.Event()
        self.finished = trio.Event()

    # -- what was seen

    def names(self, start: int = 0) -> list[str]:
        return [s.name for s in self.seen[start:]]

    def payloads(self, name: str) -> list[bytes]:
        return [s.payload for s in self.seen if s.name == name]

    async def wait_frontend_hung_up(self, timeout: float = 2.0) -> None:
        """Wait until the front-end has closed the connection."""
        with trio.fail_after(timeout):
            await self.frontend_hung_up.wait()

    async def wait_finished(self, timeout: float = 2.0) -> None:
        with trio.fail_after(timeout):
            await self.finished.wait()

    # -- the back-end channel, driven by the test

    def _backend(self) -> trio.socket.SocketType:
        if self.backend is None:
            raise AssertionError("the front-end never sent SET_BACKEND_REQ_FD")
        return self.backend

    async def backend_send(self, request: int, flags: int = REQUEST_FLAGS, payload: bytes = b"",
                           *, size: int | None = None, fds: Iterable[str] = ()) -> None:
        """A back-end request; ``size`` overrides the size field."""
        data = header(request, flags, len(payload) if size is None else size) + payload
        await self.daemon.send_with_fds(self._backend(), data, tuple(fds))

    async def backend_send_raw(self, data: bytes, fds: Iterable[str] = ()) -> None:
        await self.daemon.send_with_fds(self._backend(), data, tuple(fds))

    async def backend_read(self, timeout: float = 2.0):
        """The front-end's next message on the channel as (request, flags,
        payload, fd count), or None when it closed the channel. Any fds
        that came with it are closed."""
        try:
            with trio.fail_after(timeout):
                msg = await _read_message(self._backend())
        except ConnectionResetError:
            return None  # the front-end closed it with our bytes unread
        if msg is None:
            return None
        request, flags, payload, fds = msg
        _close_all(fds)
        return request, flags, payload, len(fds)

    def close_backend(self) -> None:
        if self.backend is not None:
            self.backend.close()

    # -- serving

    async def run(self) -> None:
        try:
            while True:
                msg = await _read_message(self.sock)
                if msg is None:
                    self.frontend_hung_up.set()
                    return
                request, flags, payload, fds = msg
                try:
                    if not await self._handle(request, flags, payload, fds):
                        return
                finally:
                    _close_all(fds)
        except ConnectionResetError:
            # The front-end closed with our bytes unread: it hung up too.
            self.frontend_hung_up.set()
        except (OSError, trio.ClosedResourceError):
            return
        finally:
            self.sock.close()
            self.finished.set()

    async def _handle(self, request: int, flags: int, payload: bytes, fds: list[int]) -> bool:
        """Answer one request; False to end the session."""
        try:
            name = F(request).name
        except ValueError:
            name = f"request {request}"
        self.seen.append(Seen(name, flags, payload, len(fds)))
        if self.silent:
            return True
        problem = self._violation(request, flags, payload, len(fds))
        if problem is None and request == F.SET_INFLIGHT_FD:
            problem = self._take_inflight(payload, fds)
        if problem is not None:
            self.violations.append(problem)
            return False  # libvhost-user: vu_panic, connection dropped
        if request == F.SET_BACKEND_REQ_FD:
            self.backend = trio.socket.from_stdlib_socket(
                socket.socket(fileno=os.dup(fds[0])))
        self._remember(request, payload)  # what the front-end said stands, lie or not
        nth = self.counts.get(request, 0)
        self.counts[request] = nth + 1
        action = self._lie_for(request, nth, payload)
        if action is None:
            return await self._answer_honestly(request, flags, payload)
        if action is HANGUP:
            return False
        if action is SILENCE:
            self.silent = True
            return True
        if isinstance(action, Reply):
            body = action.payload
            if body is None:
                body = self._honest(request, payload)
            if body is None:
                body = u64(0)  # the honest answer to a need-reply: success
            size = len(body) if action.size is None else action.size
            rid = request if action.request is None else action.request
            data = header(rid, action.flags, size) + body
        else:
            data = action.data
        kinds = action.fds
        if request == F.GET_INFLIGHT_FD:
            honest = f"memfd:{self._inflight_size(payload)}"
            kinds = tuple(honest if kind == "inflight" else kind for kind in kinds)
        sent = await self.daemon.send_with_fds(self.sock, data, kinds)
        if request == F.GET_INFLIGHT_FD:
            self.inflight_given.extend(sent)
        if action.then is HANGUP:
            return False
        if action.then is SILENCE:
            self.silent = True
        return True

    def _lie_for(self, request: int, nth: int, payload: bytes) -> Action:
        lie = self.daemon.lies.get(request)
        if isinstance(lie, list):
            lie = lie[nth] if nth < len(lie) else None
        if callable(lie):
            lie = lie(payload)
        return lie

    def _violation(self, request: int, flags: int, payload: bytes, nfds: int) -> str | None:
        profile = self.daemon.profile
        if request not in set(F):
            return f"unknown request {request}"
        req = F(request)
        if profile["protocol_features"] is None and req in (F.GET_PROTOCOL_FEATURES,
                                                            F.SET_PROTOCOL_FEATURES):
            return f"{req.name} although bit 30 was never offered"
        if req == F.SET_VRING_ENABLE and not (self.acked_features or 0) & BIT30:
            return "SET_VRING_ENABLE without bit 30 in SET_FEATURES"
        if req in GATES and not self.negotiated >> GATES[req] & 1:
            return f"{req.name} without protocol feature bit {GATES[req]}"
        if flags not in (REQUEST_FLAGS, REQUEST_FLAGS | NEED_REPLY):
            return f"{req.name} with flags {flags:#x}"
        if flags & NEED_REPLY and not self.negotiated & REPLY_ACK:
            return f"need-reply on {req.name} without REPLY_ACK"
        want = {F.SET_BACKEND_REQ_FD: 1, F.ADD_MEM_REG: 1, F.SET_INFLIGHT_FD: 1}.get(req, 0)
        if req in (F.SET_VRING_KICK, F.SET_VRING_CALL, F.SET_VRING_ERR):
            want = 0 if U64.unpack(payload)[0] & 0x100 else 1
        if req == F.SET_MEM_TABLE:
            want = struct.unpack_from("=I", payload)[0]
        if nfds != want:
            return f"{req.name} with {nfds} fds, expected {want}"
        return None

    def _honest(self, request: int, payload: bytes) -> bytes | None:
        """The honest reply payload of a request with a reply of its own
        (None for the others)."""
        profile = self.daemon.profile
        if request == F.GET_FEATURES:
            return u64(profile["features"])
        if request == F.GET_PROTOCOL_FEATURES:
            return u64(profile["protocol_features"] or 0)
        if request == F.GET_QUEUE_NUM:
            return u64(profile["queue_num"])
        if request == F.GET_MAX_MEM_SLOTS:
            return u64(profile["max_mem_slots"])
        if request == F.GET_CONFIG:
            offset, size, flags = CONFIG_HEAD.unpack_from(payload)
            config = profile["config"]
            if offset + size > len(config):
                return b""  # libvhost-user's way of refusing
            return CONFIG_HEAD.pack(offset, size, flags) + config[offset:offset + size]
        if request == F.GET_VRING_BASE:
            index, _ = VRING_STATE.unpack(payload)
            return VRING_STATE.pack(index, self.bases.get(index, 0))
        if request == F.GET_STATUS:
            return u64(0)
        if request == F.GET_INFLIGHT_FD:
            _, _, num_queues, queue_size = INFLIGHT.unpack(payload)
            return inflight(self._inflight_size(payload), 0, num_queues, queue_size)
        return None

    @staticmethod
    def _inflight_size(payload: bytes) -> int:
        """The mmap_size libvhost-user gives for a GET_INFLIGHT_FD."""
        _, _, num_queues, queue_size = INFLIGHT.unpack(payload)
        return inflight_queue_size(queue_size) * num_queues

    def _take_inflight(self, payload: bytes, fds: list[int]) -> str | None:
        """Record a SET_INFLIGHT_FD; what libvhost-user's mmap of it would
        fail on, if anything."""
        if len(payload) != INFLIGHT.size:
            return f"SET_INFLIGHT_FD payload of {len(payload)} bytes"
        size, offset, num_queues, queue_size = INFLIGHT.unpack(payload)
        fd = fds[0]  # exactly one: checked as a violation before
        self.inflight_set.append(InflightSet(size, offset, num_queues, queue_size,
                                             _identity(fd)))
        st = os.fstat(fd)
        if size == 0:
            return "SET_INFLIGHT_FD with mmap_size 0"
        if not stat.S_ISREG(st.st_mode):
            return "SET_INFLIGHT_FD with an fd that is not a regular file"
        if st.st_size < offset + size:
            return (f"SET_INFLIGHT_FD maps {offset}+{size} bytes of a file of "
                    f"{st.st_size}")
        return None

    def _remember(self, request: int, payload: bytes) -> None:
        if request == F.SET_PROTOCOL_FEATURES:
            self.negotiated = U64.unpack(payload)[0]
        elif request == F.SET_FEATURES:
            self.acked_features = U64.unpack(payload)[0]
        elif request == F.SET_VRING_BASE:
            index, num = VRING_STATE.unpack(payload)
            self.bases[index] = num

    async def _answer_honestly(self, request: int, flags: int, payload: bytes) -> bool:
        body = self._honest(request, payload)
        if body is None and request in OWN_REPLY:
            body = b""
        if request == F.GET_INFLIGHT_FD:
            data = header(request, REPLY_FLAGS, len(body)) + body
            kinds = (f"memfd:{self._inflight_size(payload)}",)
            self.inflight_given.extend(await self.daemon.send_with_fds(self.sock, data, kinds))
            return True
        if body is not None:
            await self.sock.send(header(request, REPLY_FLAGS, len(body)) + body)
        elif flags & NEED_REPLY:
            await self.sock.send(header(request, REPLY_FLAGS, 8) + u64(0))
        return True


class LyingDaemon:
    """The listening daemon. ``profile``: features, protocol_features (None:
    bit 30 not offered either), queue_num, max_mem_slots, config."""

    def __init__(self, path: str, *, profile: dict | None = None,
                 lies: dict[int, Lie] | None = None) -> None:
        self.path = path
        self.profile = dict(QSD)
        self.profile.update(profile or {})
        self.lies: dict[int, Lie] = dict(lies or {})
        self.sessions: list[Session] = []
        self._listener: trio.socket.SocketType | None = None
        self._cancel: trio.CancelScope | None = None
        # (device, inode) of every non-anonymous fd the daemon ever sent.
        self.sent: set[tuple[int, int]] = set()
        self.sent_count = 0
        self._new_session = trio.Condition()

    @property
    def session(self) -> Session:
        """The latest session."""
        if not self.sessions:
            raise AssertionError("no front-end has connected")
        return self.sessions[-1]

    async def wait_session(self, timeout: float = 2.0) -> Session:
        with trio.fail_after(timeout):
            async with self._new_session:
                while not self.sessions:
                    await self._new_session.wait()
        return self.sessions[-1]

    async def serve(self, *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve front-ends one after the other until ``stop``."""
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener = listener
        try:
            await listener.bind(self.path)
            listener.listen(1)
            with trio.CancelScope() as scope:
                self._cancel = scope
                task_status.started()
                while True:
                    sock, _ = await listener.accept()
                    session = Session(self, sock)
                    async with self._new_session:
                        self.sessions.append(session)
                        self._new_session.notify_all()
                    await session.run()
        finally:
            listener.close()
            for session in self.sessions:
                session.sock.close()
                session.close_backend()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def stop(self) -> None:
        if self._cancel is not None:
            self._cancel.cancel()

    # -- fds

    def make_fd(self, kind: str) -> int:
        """A fresh fd of one kind, owned by the caller."""
        if kind == "eventfd":
            return os.eventfd(0)
        base, _, length = kind.partition(":")
        if base in ("memfd", "memfd-ro") and (length.isdigit() or kind == base):
            fd = os.memfd_create("lying-daemon")
            try:
                os.ftruncate(fd, int(length or 4096))
                if base == "memfd-ro":
                    # The same memfd, opened again read-only.
                    ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
                    os.close(fd)
                    fd = ro
            except BaseException:
                os.close(fd)
                raise
            return fd
        if kind == "file":
            fd, path = tempfile.mkstemp(prefix="lying-daemon-")
            os.unlink(path)
            return fd
        if kind == "socket":
            a, b = socket.socketpair()
            b.close()
            return a.detach()
        if kind == "pipe":
            r, w = os.pipe()
            os.close(r)
            return w
        raise ValueError(f"unknown fd kind {kind!r}; one of {FD_KINDS}")

    async def send_with_fds(self, sock: trio.socket.SocketType, data: bytes,
                            kinds: tuple[str, ...]) -> list[tuple[int, int] | None]:
        """``data`` with fds of these kinds as SCM_RIGHTS on its first byte;
        the daemon's own copies are closed once sent. Returns the identity
        of each fd sent (None for anonymous inodes)."""
        fds: list[int] = []
        idents: list[tuple[int, int] | None] = []
        try:
            for kind in kinds:
                fds.append(self.make_fd(kind))
            for fd in fds:
                ident = _identity(fd)
                idents.append(ident)
                if ident is not None:
                    self.sent.add(ident)
            self.sent_count += len(fds)
            anc = []
            if fds:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
            sent = await sock.sendmsg([data], anc)
            while sent < len(data):
                sent += await sock.send(data[sent:])
        finally:
            _close_all(fds)
        return idents

    def leaked_fds(self) -> list[int]:
        """fds of this process that are copies of what the daemon sent."""
        leaked = []
        for name in os.listdir("/proc/self/fd"):
            ident = _identity(int(name))
            if ident is not None and ident in self.sent:
                leaked.append(int(name))
        return leaked


@contextlib.asynccontextmanager
async def open_lying_daemon(path: str, **kwargs: object):
    """A LyingDaemon serving on ``path`` for the duration of the block; it is
    stopped, and every socket of it closed, on the way out."""
    daemon = LyingDaemon(path, **kwargs)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.serve)
        try:
            yield daemon
        finally:
            daemon.stop()


@contextlib.asynccontextmanager
async def leak_checked(path: str, make_scene, **daemon_kwargs: object):
    """A daemon on ``path`` and a test scene around it
    (``make_scene(daemon, nursery, path)``, which keeps the front-ends it
    connects in ``frontends`` and the fds it made in ``fds``); on the way
    out everything is closed, and no fd may be left: none the daemon sent,
    and no more open than before."""
    before = settled_fd_count()
    async with open_lying_daemon(path, **daemon_kwargs) as daemon:
        async with trio.open_nursery() as nursery:
            scene = make_scene(daemon, nursery, path)
            try:
                yield scene
            finally:
                for fe in scene.frontends:
                    await fe.aclose()
                for fd in scene.fds:
                    os.close(fd)
    # The daemon, the front-ends and their tasks are all gone now.
    assert daemon.leaked_fds() == [], "fds the daemon sent are still open"
    assert open_fd_count() == before, "fds leaked"


async def _read_message(sock: trio.socket.SocketType):
    """(request, flags, payload, fds) or None at EOF (also mid-message)."""
    fds: list[int] = []

    async def exactly(n: int) -> bytes | None:
        buf = b""
        while len(buf) < n:
            data, anc, _, _ = await sock.recvmsg(n - len(buf), _ANCILLARY)
            for level, kind, raw in anc:
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                    got = array.array("i")
                    got.frombytes(raw[:len(raw) - len(raw) % got.itemsize])
                    fds.extend(got)
            if not data:
                return None
            buf += data
        return buf

    try:
        head = await exactly(HDR.size)
        if head is None:
            _close_all(fds)
            return None
        request, flags, size = HDR.unpack(head)
        payload = await exactly(size) if size else b""
        if payload is None:
            _close_all(fds)
            return None
    except BaseException:
        _close_all(fds)
        raise
    return request, flags, payload, fds


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
