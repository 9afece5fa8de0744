"""vhost-user framing over a real socketpair: fds, partial reads, replies,
need-reply, EOF, timeouts. The peer side is written with raw trio socket
calls, independent of the code under test."""

from __future__ import annotations

import array
import fcntl
import os
import socket
import struct

import pytest
import trio

from vhost_user.connection import Connection, connect_unix
from vhost_user.protocol import (
    MAX_PAYLOAD_SIZE,
    BackendRequest,
    ConnectionLost,
    DaemonTimeout,
    DaemonUnavailable,
    REPLY_FLAGS,
    U64,
    FrontendRequest,
    Header,
    ProtocolError,
    VhostUserError,
    VringFd,
    VringState,
)

HDR = struct.Struct("=III")


@pytest.fixture
async def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    conn = Connection.from_stdlib(a, label="test", timeout=1.0)
    peer = trio.socket.from_stdlib_socket(b)
    yield conn, peer
    conn.close()
    peer.close()


async def peer_send(peer, data: bytes, fds=()):
    anc = []
    if fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    sent = await peer.sendmsg([data], anc)
    assert sent == len(data)


async def peer_recv_exactly(peer, n):
    buf, fds = b"", []
    while len(buf) < n:
        data, anc, _, _ = await peer.recvmsg(n - len(buf), socket.CMSG_SPACE(64))
        for level, kind, raw in anc:
            assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
            a = array.array("i")
            a.frombytes(raw)
            fds.extend(a)
        assert data, "unexpected EOF"
        buf += data
    return buf, fds


async def peer_recv_message(peer):
    head, fds = await peer_recv_exactly(peer, 12)
    request, flags, size = HDR.unpack(head)
    payload, more = await peer_recv_exactly(peer, size) if size else (b"", [])
    return request, flags, payload, fds + more


def pipe_write_end_is_closed_everywhere(read_fd) -> bool:
    """True when no write end of the pipe is open any more (read sees EOF)."""
    os.set_blocking(read_fd, False)
    try:
        return os.read(read_fd, 1) == b""
    except BlockingIOError:
        return False


# -- sending

async def test_send_puts_header_payload_and_fds_on_the_wire(pair):
    conn, peer = pair
    r, w = os.pipe()
    try:
        await conn.send(FrontendRequest.SET_VRING_CALL, VringFd(2).pack(), (w,))
        request, flags, payload, fds = await peer_recv_message(peer)
        assert (request, flags) == (13, 0x1)
        assert payload == struct.pack("=Q", 2)
        assert len(fds) == 1
        # the fd that arrived is the same pipe, and usable
        os.write(fds[0], b"x")
        assert os.read(r, 1) == b"x"
        os.close(fds[0])
    finally:
        os.close(r)
        os.close(w)


async def test_send_need_reply_sets_flag(pair):
    conn, peer = pair
    await conn.send(FrontendRequest.SET_OWNER, need_reply=True)
    assert await peer_recv_message(peer) == (3, 0x9, b"", [])


async def test_send_refuses_too_many_or_bogus_fds(pair):
    conn, _ = pair
    with pytest.raises(ValueError):
        await conn.send(FrontendRequest.SET_MEM_TABLE, b"", tuple(range(3, 12)))
    with pytest.raises(ValueError):
        await conn.send(FrontendRequest.SET_VRING_KICK, b"", (-1,))


async def test_send_with_a_closed_fd_is_a_clear_error(pair):
    conn, _ = pair
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(VhostUserError, match="not open"):
        await conn.send(FrontendRequest.SET_VRING_KICK, VringFd(0).pack(), (w,))


async def test_send_to_a_gone_peer_is_connection_lost(pair):
    conn, peer = pair
    peer.close()
    with pytest.raises(ConnectionLost):
        await conn.send(FrontendRequest.SET_OWNER)


class TrickleSocket:
    """A trio socket that accepts at most a few bytes per call, the way a
    full socket buffer does."""

    def __init__(self, sock):
        self._sock = sock
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self._sock, name)

    async def sendmsg(self, buffers, ancillary, flags):
        self.calls += 1
        data = b"".join(buffers)
        return await self._sock.sendmsg([data[:1]], ancillary, flags)

    async def send(self, data, flags):
        self.calls += 1
        return await self._sock.send(data[:5], flags)


async def test_send_survives_partial_writes():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    trickle = TrickleSocket(trio.socket.from_stdlib_socket(a))
    conn = Connection(trickle, label="test", timeout=2.0, kind=BackendRequest)
    peer = trio.socket.from_stdlib_socket(b)
    r, w = os.pipe()
    payload = bytes(range(256)) * 4
    await conn.send(FrontendRequest.SET_VRING_KICK, payload, (w,))
    request, flags, got, fds = await peer_recv_message(peer)
    assert (request, flags, got) == (12, 0x1, payload)
    assert len(fds) == 1  # the fd rode on the first byte only
    assert trickle.calls > 100
    for fd in fds + [r, w]:
        os.close(fd)
    conn.close()
    peer.close()


# -- receiving

async def test_recv_collects_fds_and_sets_cloexec(pair):
    conn, peer = pair
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    try:
        await peer_send(peer, HDR.pack(2, 0x1, 0), (w1, w2))
        msg = await conn.recv()
        assert (msg.request, msg.flags, msg.payload) == (2, 0x1, b"")
        assert len(msg.fds) == 2
        for fd in msg.fds:
            assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        os.write(msg.fds[1], b"y")
        assert os.read(r2, 1) == b"y"
        for fd in msg.fds:
            os.close(fd)
    finally:
        for fd in (r1, w1, r2, w2):
            os.close(fd)


async def test_recv_handles_partial_reads_and_fds_on_several_chunks(pair):
    conn, peer = pair
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    payload = VringState(7, 42).pack()
    wire = HDR.pack(11, 0x5, len(payload)) + payload
    received = []
    try:
        async with trio.open_nursery() as nursery:
            async def receive():
                received.append(await conn.recv())
            nursery.start_soon(receive)
            # the header in three pieces, fds on its first byte and on the
            # payload's first byte, with pauses in between
            await peer_send(peer, wire[:1], (w1,))
            await trio.sleep(0.01)
            await peer_send(peer, wire[1:7])
            await trio.sleep(0.01)
            await peer_send(peer, wire[7:12])
            await trio.sleep(0.01)
            await peer_send(peer, wire[12:13], (w2,))
            await trio.sleep(0.01)
            await peer_send(peer, wire[13:])
        (msg,) = received
        assert msg.request == 11 and msg.decode(VringState) == VringState(7, 42)
        assert len(msg.fds) == 2
        os.write(msg.fds[0], b"1")
        os.write(msg.fds[1], b"2")
        assert os.read(r1, 1) == b"1" and os.read(r2, 1) == b"2"
        for fd in msg.fds:
            os.close(fd)
    finally:
        for fd in (r1, w1, r2, w2):
            os.close(fd)


async def test_recv_bad_header_closes_fds_and_poisons_the_connection(pair):
    conn, peer = pair
    r, w = os.pipe()
    await peer_send(peer, HDR.pack(1, 0x2, 0), (w,))  # version 2
    os.close(w)
    with pytest.raises(ProtocolError, match="version"):
        await conn.recv()
    assert pipe_write_end_is_closed_everywhere(r)
    os.close(r)
    assert not conn.usable
    with pytest.raises(ConnectionLost, match="earlier error"):
        await conn.recv()


async def test_recv_oversize_header(pair):
    conn, peer = pair
    await peer_send(peer, HDR.pack(1, 0x5, MAX_PAYLOAD_SIZE + 1))
    with pytest.raises(ProtocolError, match="exceeds"):
        await conn.recv()


async def test_recv_too_many_fds_closes_all_of_them(pair):
    conn, peer = pair
    r, w = os.pipe()
    dups = [os.dup(w) for _ in range(9)]
    await peer_send(peer, HDR.pack(1, 0x5, 0), dups)
    for fd in dups + [w]:
        os.close(fd)
    with pytest.raises(ProtocolError, match="fds"):
        await conn.recv()
    assert pipe_write_end_is_closed_everywhere(r)
    os.close(r)


async def test_recv_eof_is_connection_lost(pair):
    conn, peer = pair
    peer.close()
    with pytest.raises(ConnectionLost, match="closed the connection"):
        await conn.recv()


async def test_recv_eof_mid_message_closes_fds(pair):
    conn, peer = pair
    r, w = os.pipe()
    await peer_send(peer, HDR.pack(1, 0x5, 8) + b"\0\0", (w,))
    os.close(w)
    peer.close()
    with pytest.raises(ConnectionLost, match="middle of a message"):
        await conn.recv()
    assert pipe_write_end_is_closed_everywhere(r)
    os.close(r)


async def test_recv_after_local_close(pair):
    conn, _ = pair
    async with trio.open_nursery() as nursery:
        async def closer():
            await trio.sleep(0.01)
            conn.close()
        nursery.start_soon(closer)
        with pytest.raises(ConnectionLost):
            await conn.recv()
    with pytest.raises(ConnectionLost, match="closed"):
        await conn.send(FrontendRequest.SET_OWNER)


# -- transact

async def answer(peer, request, payload, flags=0x5, fds=()):
    await peer_send(peer, HDR.pack(request, flags, len(payload)) + payload, fds)


async def test_transact_returns_the_reply(pair):
    conn, peer = pair
    async with trio.open_nursery() as nursery:
        async def daemon():
            req = await peer_recv_message(peer)
            assert req == (11, 0x1, VringState(0, 0).pack(), [])
            await answer(peer, 11, VringState(0, 9).pack())
        nursery.start_soon(daemon)
        reply = await conn.transact(FrontendRequest.GET_VRING_BASE, VringState(0, 0).pack())
    assert reply.decode(VringState) == VringState(0, 9)
    assert conn.usable


async def test_transact_need_reply_ack(pair):
    conn, peer = pair
    async with trio.open_nursery() as nursery:
        async def daemon():
            request, flags, _, fds = await peer_recv_message(peer)
            assert (request, flags) == (2, 0x9)
            await answer(peer, 2, struct.pack("=Q", 0))
        nursery.start_soon(daemon)
        reply = await conn.transact(FrontendRequest.SET_FEATURES, struct.pack("=Q", 1 << 32),
                                    need_reply=True)
    assert reply.payload == bytes(8)


@pytest.mark.parametrize("request_id,flags,match", [
    (15, 0x5, "for GET_PROTOCOL_FEATURES"),   # wrong request id
    (1, 0x1, "flags 0x1"),                     # reply flag missing
    (1, 0xD, "flags 0xd"),                     # need-reply on a reply
])
async def test_transact_rejects_lying_replies(pair, request_id, flags, match):
    conn, peer = pair
    async with trio.open_nursery() as nursery:
        async def daemon():
            await peer_recv_message(peer)
            await answer(peer, request_id, bytes(8), flags=flags)
        nursery.start_soon(daemon)
        with pytest.raises(ProtocolError, match=f"lies.*{match}"):
            await conn.transact(FrontendRequest.GET_FEATURES)
    assert not conn.usable


async def test_transact_rejects_and_closes_unexpected_reply_fds(pair):
    conn, peer = pair
    r, w = os.pipe()
    async with trio.open_nursery() as nursery:
        async def daemon():
            await peer_recv_message(peer)
            await answer(peer, 1, bytes(8), fds=(w,))
            os.close(w)
        nursery.start_soon(daemon)
        with pytest.raises(ProtocolError, match="fds"):
            await conn.transact(FrontendRequest.GET_FEATURES)
    assert pipe_write_end_is_closed_everywhere(r)
    os.close(r)


async def test_transact_timeout(pair):
    conn, peer = pair
    with pytest.raises(DaemonTimeout, match="did not answer GET_FEATURES within 0.05 s"):
        await conn.transact(FrontendRequest.GET_FEATURES, timeout=0.05)
    # a late reply cannot be matched to anything any more
    with pytest.raises(ConnectionLost, match="unusable"):
        await conn.transact(FrontendRequest.GET_FEATURES)


async def test_transact_eof_names_the_pending_request(pair):
    conn, peer = pair
    async with trio.open_nursery() as nursery:
        async def daemon():
            await peer_recv_message(peer)
            peer.close()
        nursery.start_soon(daemon)
        with pytest.raises(ConnectionLost, match="while SET_STATUS was pending"):
            await conn.transact(FrontendRequest.SET_STATUS, bytes(8), need_reply=True)


async def test_transacts_never_interleave(pair):
    conn, peer = pair
    order = []
    async with trio.open_nursery() as nursery:
        async def daemon():
            for _ in range(2):
                request, _, _, _ = await peer_recv_message(peer)
                order.append(request)
                await trio.sleep(0.02)
                # nothing else may be on the wire before we answered
                with pytest.raises(BlockingIOError):
                    peer._sock.recv(1, socket.MSG_DONTWAIT)
                await answer(peer, request, bytes(8))

        async def ask(request):
            reply = await conn.transact(request)
            assert reply.request == request

        nursery.start_soon(daemon)
        nursery.start_soon(ask, FrontendRequest.GET_FEATURES)
        nursery.start_soon(ask, FrontendRequest.GET_PROTOCOL_FEATURES)
    assert sorted(order) == [1, 15]


# -- dialing

async def test_connect_to_missing_path(tmp_path):
    path = tmp_path / "nothing.sock"
    with pytest.raises(DaemonUnavailable) as info:
        await connect_unix(str(path))
    assert str(info.value) == f"no vhost-user daemon is listening on {path} (it does not exist)"


async def test_connect_refused(tmp_path):
    path = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)  # bound, never listening: like a daemon that died
    try:
        with pytest.raises(DaemonUnavailable) as info:
            await connect_unix(path)
        assert str(info.value) == \
            f"no vhost-user daemon is listening on {path} (connection refused)"
    finally:
        s.close()


async def test_connect_works(tmp_path):
    path = str(tmp_path / "d.sock")
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(path)
    listener.listen(1)
    sock = await connect_unix(path)
    server, _ = await listener.accept()
    conn = Connection(sock, label=path)
    await conn.send(FrontendRequest.GET_FEATURES)
    assert await peer_recv_message(server) == (1, 0x1, b"", [])
    for s in (sock, server, listener):
        s.close()


async def test_wait_hangup_ignores_traffic_and_returns_when_the_peer_goes(pair):
    conn, peer = pair
    async with trio.open_nursery() as nursery:
        gone = trio.Event()

        async def watch():
            await conn.wait_hangup()
            gone.set()

        nursery.start_soon(watch)
        # a reply in flight is ordinary traffic: the watcher stays asleep and
        # leaves the bytes for recv()
        await peer_send(peer, Header(FrontendRequest.GET_FEATURES, REPLY_FLAGS, 8).pack() + U64(7).pack())
        await trio.sleep(0.05)
        assert not gone.is_set()
        msg = await conn.recv()
        assert U64.unpack(msg.payload).value == 7
        peer.close()
        with trio.fail_after(5):
            await gone.wait()
