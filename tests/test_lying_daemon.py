"""The front-end against a daemon that lies (issue 7, item 4).

Every lie must end in one specific, one-line VhostUserError that says what
the daemon did wrong; the front-end must close the connection (the daemon
sees it go), and nothing may leak: the process has as many fds afterwards
as before, and no copy of an fd the daemon sent is left open.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import struct

import pytest
import trio

from lying_daemon import (
    FD_KINDS,
    HANGUP,
    QSD,
    SILENCE,
    Raw,
    Reply,
    header,
    leak_checked,
    u64,
)
from vhost_user import (
    ConnectionLost,
    DaemonTimeout,
    MemoryRegionFd,
    ProtocolError,
    RingSetup,
    VhostUserError,
    VhostUserFrontend,
)
from vhost_user.protocol import (
    BackendRequest,
    DeviceConfig,
    FrontendRequest,
    VringState,
)

F = FrontendRequest
B = BackendRequest

BIT30 = 1 << 30
VERSION_1 = 1 << 32
MiB = 1 << 20
GPA = 0x4000_0000
USER = 0x7F12_0000_0000
TIMEOUT = 0.3


class Handler:
    def __init__(self):
        self.events = []

    async def config_changed(self):
        self.events.append("config_changed")

    def vring_call(self, index):
        self.events.append(("call", index))

    def vring_err(self, index):
        self.events.append(("err", index))


class Scene:
    """A lying daemon on a path, the front-ends that dialled it, and the fds
    the test made for them; everything is closed on the way out."""

    def __init__(self, daemon, nursery, path):
        self.daemon = daemon
        self.nursery = nursery
        self.path = path
        self.frontends = []
        self.fds = []
        self.handler = Handler()

    async def connect(self, *, timeout=1.0, config_size=0):
        fe = await VhostUserFrontend.connect(
            self.path, nursery=self.nursery, handler=self.handler, default_num_queues=1,
            config_size=config_size, timeout=timeout)
        self.frontends.append(fe)
        return fe

    async def connect_fails(self, exc_type, pattern, **kwargs):
        with pytest.raises(VhostUserError) as info:
            await self.connect(**kwargs)
        check_error(info.value, exc_type, pattern, self.path)
        return info.value

    def memfd(self):
        fd = os.memfd_create("guest-ram")
        os.ftruncate(fd, 4 * MiB)
        self.fds.append(fd)
        return fd

    def eventfd(self):
        fd = os.eventfd(0)
        self.fds.append(fd)
        return fd

    def start_args(self):
        """Features, one 4 MiB region and ring 0 inside it."""
        region = MemoryRegionFd(gpa=GPA, size=4 * MiB, user_addr=USER, fd=self.memfd(),
                                fd_offset=0)
        ring = RingSetup(index=0, num=256, base=0, desc_addr=USER, avail_addr=USER + 0x1000,
                         used_addr=USER + 0x2000, kick_fd=self.eventfd(),
                         call_fd=self.eventfd())
        return VERSION_1, [region], [ring]


def scene(workdir, **daemon_kwargs):
    return leak_checked(os.path.join(workdir, "daemon.sock"), Scene, **daemon_kwargs)


def check_error(exc, exc_type, pattern, label):
    message = str(exc)
    assert type(exc) is exc_type, f"{type(exc).__name__}: {message}"
    assert "\n" not in message
    assert message.startswith(f"{label}: "), message
    assert re.search(pattern, message), message


async def settle(session, *, daemon_hung_up=False):
    """After a failure: the session is over, and unless the daemon hung up
    itself, it ended because the front-end closed the connection."""
    await session.wait_finished()
    if not daemon_hung_up:
        assert session.frontend_hung_up.is_set()


# -- lies during connect ---------------------------------------------------

CONNECT_LIES = {
    # wrong payload size for the request
    "reply too short": (
        {F.GET_FEATURES: Reply(payload=bytes(4))}, ProtocolError,
        r"lies: its reply to GET_FEATURES is malformed: U64 payload is 4 bytes, expected 8$"),
    "reply too long": (
        {F.GET_PROTOCOL_FEATURES: Reply(payload=bytes(16))}, ProtocolError,
        r"lies: its reply to GET_PROTOCOL_FEATURES is malformed: U64 payload is 16 bytes"),
    "size field smaller than the bytes sent": (
        {F.GET_QUEUE_NUM: Reply(payload=u64(1), size=4)}, ProtocolError,
        r"its reply to GET_QUEUE_NUM is malformed: U64 payload is 4 bytes, expected 8"),
    "size field larger than the bytes sent, then hang up": (
        {F.GET_FEATURES: Reply(size=16, then=HANGUP)}, ConnectionLost,
        r"closed the connection in the middle of its reply to GET_FEATURES, after 20 of "
        r"the 28 bytes"),
    # a reply to a different request
    "reply to another request": (
        {F.GET_PROTOCOL_FEATURES: Reply(request=F.GET_FEATURES)}, ProtocolError,
        r"lies: it answered GET_PROTOCOL_FEATURES with a message for GET_FEATURES$"),
    "reply to an unknown request": (
        {F.GET_MAX_MEM_SLOTS: Reply(request=999)}, ProtocolError,
        r"lies: it answered GET_MAX_MEM_SLOTS with a message for request 999$"),
    # flags
    "reply without the reply flag": (
        {F.GET_FEATURES: Reply(flags=0x1)}, ProtocolError,
        r"lies: it answered GET_FEATURES with flags 0x1, without the reply flag 0x4"),
    "ack without the reply flag": (
        {F.SET_OWNER: Reply(payload=u64(0), flags=0x1)}, ProtocolError,
        r"it answered SET_OWNER with flags 0x1, without the reply flag"),
    "reply with need-reply set": (
        {F.GET_FEATURES: Reply(flags=0xD)}, ProtocolError,
        r"it answered GET_FEATURES with flags 0xd, a reply has 0x5$"),
    "reply with version 2": (
        {F.GET_FEATURES: Reply(flags=0x6)}, ProtocolError,
        r"sent a bad message header in reply to GET_FEATURES \(request GET_FEATURES, flags "
        r"0x6, size 8\): header version 2 \(expected 1\)$"),
    "reply with version 0": (
        {F.GET_PROTOCOL_FEATURES: Reply(flags=0x4)}, ProtocolError,
        r"bad message header in reply to GET_PROTOCOL_FEATURES .*header version 0"),
    "reply with unknown flag bits": (
        {F.GET_FEATURES: Reply(flags=0x25)}, ProtocolError,
        r"bad message header in reply to GET_FEATURES .*unknown bits set$"),
    # a size the front-end must not even try to read
    "huge size field": (
        {F.GET_FEATURES: Reply(size=0xFFFF_FFFF)}, ProtocolError,
        r"bad message header in reply to GET_FEATURES \(request GET_FEATURES, flags 0x5, "
        r"size 4294967295\): payload size 4294967295 exceeds the limit of 4352$"),
    "size just over the limit": (
        {F.GET_FEATURES: Reply(size=4353)}, ProtocolError, r"exceeds the limit of 4352$"),
    # fds
    "nine fds": (
        {F.GET_FEATURES: Reply(fds=["eventfd"] * 9)}, ProtocolError,
        r"sent 9 fds with its reply to GET_FEATURES, at most 8 are allowed$"),
    "far too many fds": (
        {F.GET_FEATURES: Reply(fds=["pipe"] * 40)}, ProtocolError,
        r"sent more than \d+ fds with its reply to GET_FEATURES, at most 8 are allowed "
        r"\(the excess was discarded\)$"),
    # disconnects
    "hang up mid-message": (
        {F.GET_FEATURES: Raw(header(1, 0x5, 8) + bytes(2), then=HANGUP)}, ConnectionLost,
        r"closed the connection in the middle of its reply to GET_FEATURES, after 14 of the "
        r"20 bytes"),
    "hang up mid-header": (
        {F.GET_PROTOCOL_FEATURES: Raw(header(15, 0x5, 8)[:7], then=HANGUP)}, ConnectionLost,
        r"in the middle of its reply to GET_PROTOCOL_FEATURES, after 7 of the 12 header "
        r"bytes$"),
    "hang up while a reply is awaited": (
        {F.SET_BACKEND_REQ_FD: HANGUP}, ConnectionLost,
        r"closed the connection while SET_BACKEND_REQ_FD was pending"),
    # impossible values
    "no queues": (
        {F.GET_QUEUE_NUM: Reply(payload=u64(0))}, ProtocolError,
        r"lies: GET_QUEUE_NUM says 0 queues, a device has 1\.\.32768$"),
    "absurd number of queues": (
        {F.GET_QUEUE_NUM: Reply(payload=u64(65535))}, ProtocolError,
        r"lies: GET_QUEUE_NUM says 65535 queues"),
    "2**64-1 queues": (
        {F.GET_QUEUE_NUM: Reply(payload=u64(2**64 - 1))}, ProtocolError,
        r"GET_QUEUE_NUM says 18446744073709551615 queues"),
    "no memory slots": (
        {F.GET_MAX_MEM_SLOTS: Reply(payload=u64(0))}, ProtocolError,
        r"lies: GET_MAX_MEM_SLOTS says 0 memory slots"),
    "config of another size": (
        {F.GET_CONFIG: Reply(payload=DeviceConfig(0, 4, 0, b"abcd").pack())}, ProtocolError,
        r"lies: asked for 60 config bytes at offset 0 with GET_CONFIG, got 4 at offset 0$"),
    "config at another offset": (
        {F.GET_CONFIG: Reply(payload=DeviceConfig(4, 56, 0, bytes(56)).pack())},
        ProtocolError, r"got 56 at offset 4$"),
    "config size field not matching its data": (
        {F.GET_CONFIG: Reply(payload=struct.pack("=III", 0, 60, 0) + bytes(8))},
        ProtocolError,
        r"its reply to GET_CONFIG is malformed: config payload says size 60 but carries 8"),
    "bit 30 vanishes after SET_OWNER": (
        {F.GET_FEATURES: [None, Reply(payload=u64(QSD["features"] & ~BIT30))]}, ProtocolError,
        r"lies: GET_FEATURES changed bit 30 \(VHOST_USER_F_PROTOCOL_FEATURES\) after "
        r"SET_OWNER"),
    "VERSION_1 vanishes after SET_OWNER": (
        {F.GET_FEATURES: [None, Reply(payload=u64(QSD["features"] & ~VERSION_1))]},
        VhostUserError, r"does not offer VIRTIO_F_VERSION_1"),
    "a non-zero ack": (
        {F.SET_OWNER: Reply(payload=u64(5))}, VhostUserError,
        r"the vhost-user daemon rejected SET_OWNER \(ack 0x5\)$"),
}


@pytest.mark.parametrize("lies,exc_type,pattern", CONNECT_LIES.values(), ids=CONNECT_LIES)
async def test_lie_during_connect(workdir, lies, exc_type, pattern):
    async with scene(workdir, lies=lies) as s:
        await s.connect_fails(exc_type, pattern, config_size=60)
        hung_up = any(a is HANGUP or getattr(a, "then", None) is HANGUP
                      for a in lies.values())
        await settle(s.daemon.session, daemon_hung_up=hung_up)
        assert not s.daemon.session.violations


@pytest.mark.parametrize("kind", FD_KINDS)
async def test_fd_of_any_kind_on_a_reply_is_closed(workdir, kind):
    async with scene(workdir, lies={F.GET_FEATURES: Reply(fds=[kind])}) as s:
        await s.connect_fails(ProtocolError, r"lies: it attached 1 fds to its reply to "
                                             r"GET_FEATURES, expected at most 0$")
        await settle(s.daemon.session)
    assert s.daemon.sent_count == 1


async def test_fds_spread_over_a_reply_are_all_closed(workdir):
    """fds on several chunks of one reply: four with the header, five with
    the payload, nine in all."""
    async with scene(workdir) as s:
        fe = await s.connect()
        session = s.daemon.session

        def split_reply(payload):
            async def send():
                await s.daemon.send_with_fds(session.sock, header(11, 0x5, 8), ["memfd"] * 4)
                await trio.sleep(0.02)
                await s.daemon.send_with_fds(session.sock, VringState(0, 0).pack(),
                                             ["file"] * 5)
            s.nursery.start_soon(send)
            return SILENCE

        s.daemon.lies[F.GET_VRING_BASE] = split_reply
        with pytest.raises(VhostUserError) as info:
            await fe.stop([0])
        check_error(info.value, ProtocolError,
                    r"sent 9 fds with its reply to GET_VRING_BASE, at most 8", s.path)
        await session.wait_frontend_hung_up()
    assert s.daemon.sent_count == 9


async def test_reply_that_never_comes_times_out(workdir):
    async with scene(workdir, lies={F.SET_OWNER: SILENCE}) as s:
        start = trio.current_time()
        await s.connect_fails(DaemonTimeout, r"did not answer SET_OWNER within 0\.3 s$",
                              timeout=TIMEOUT)
        elapsed = trio.current_time() - start
        assert TIMEOUT <= elapsed < TIMEOUT + 0.5
        await settle(s.daemon.session)


async def test_first_reply_that_never_comes_hints_at_another_frontend(workdir):
    async with scene(workdir, lies={F.GET_FEATURES: SILENCE}) as s:
        await s.connect_fails(DaemonTimeout, r"did not answer GET_FEATURES within 0\.3 s "
                                             r"\(is another front-end connected\?",
                              timeout=TIMEOUT)
        await settle(s.daemon.session)


async def test_size_field_larger_than_the_payload_times_out_and_says_so(workdir):
    async with scene(workdir, lies={F.GET_FEATURES: Reply(size=16)}) as s:
        start = trio.current_time()
        exc = await s.connect_fails(
            DaemonTimeout,
            r"sent 20 of the 28 bytes \(header and a payload of 16 according to its size "
            r"field\) of its reply to GET_FEATURES and then nothing for 0\.3 s",
            timeout=TIMEOUT)
        assert TIMEOUT <= trio.current_time() - start < TIMEOUT + 0.5
        assert exc.received == 20
        assert "another front-end" not in str(exc)  # it did answer, partly
        await settle(s.daemon.session)


async def test_header_half_sent_then_silence_times_out(workdir):
    lies = {F.GET_PROTOCOL_FEATURES: Raw(header(15, 0x5, 8)[:5], then=SILENCE)}
    async with scene(workdir, lies=lies) as s:
        await s.connect_fails(DaemonTimeout, r"sent 5 of the 12 header bytes of its reply to "
                                             r"GET_PROTOCOL_FEATURES and then nothing",
                              timeout=TIMEOUT)
        await settle(s.daemon.session)


async def test_no_version_1_is_refused_before_anything_else(workdir):
    profile = dict(QSD, features=QSD["features"] & ~VERSION_1)
    async with scene(workdir, profile=profile) as s:
        await s.connect_fails(
            VhostUserError,
            r"the vhost-user daemon does not offer VIRTIO_F_VERSION_1 \(GET_FEATURES "
            r"0x75007e46\): it is a legacy virtio device")
        await settle(s.daemon.session)
        assert s.daemon.session.names() == ["GET_FEATURES"]


async def test_no_protocol_features_bit_means_no_protocol_messages(workdir):
    """Without bit 30 the protocol-feature messages are not legal: a
    libvhost-user daemon would drop the connection on them."""
    profile = dict(features=VERSION_1 | 1 << 28, protocol_features=None)
    async with scene(workdir, profile=profile) as s:
        fe = await s.connect(config_size=60)
        assert s.daemon.session.names() == ["GET_FEATURES", "SET_OWNER", "GET_FEATURES"]
        assert not fe.has_protocol_features
        assert fe.num_queues == 1 and fe.config == b""
        args = s.start_args()
        await fe.start(*args)
        assert await fe.stop([0]) == {0: 0}
        assert "SET_VRING_ENABLE" not in s.daemon.session.names()
        assert not s.daemon.session.violations


async def test_features_offered_but_not_supported_are_never_used(workdir):
    """HOST_NOTIFIER and SHARED_OBJECT would bring fds from the daemon:
    they are never negotiated, so no such fd is ever asked for.
    (INFLIGHT_SHMFD is supported: see test_vhost_user_inflight.)"""
    offered = QSD["protocol_features"] | 1 << 11 | 1 << 18
    async with scene(workdir, profile=dict(QSD, protocol_features=offered)) as s:
        fe = await s.connect()
        session = s.daemon.session
        assert not session.negotiated & (1 << 11 | 1 << 18)
        await fe.start(*s.start_args())
        await fe.stop([0])
        assert not session.violations


# -- lies after connect ----------------------------------------------------

async def _start(fe, s):
    await fe.start(*s.start_args())


async def _stop(fe, s):
    await fe.stop([0])


async def _start_then_stop(fe, s):
    await fe.start(*s.start_args())
    await fe.stop([0])


async def _get_config(fe, s):
    await fe.get_config(60)


async def _set_config(fe, s):
    await fe.set_config(8, b"\1")


AFTER_CONNECT_LIES = {
    "GET_VRING_BASE too short": (
        _stop, {F.GET_VRING_BASE: Reply(payload=bytes(4))}, ProtocolError,
        r"lies: its reply to GET_VRING_BASE is malformed: VringState payload is 4 bytes, "
        r"expected 8$"),
    "GET_VRING_BASE for another ring": (
        _stop, {F.GET_VRING_BASE: Reply(payload=VringState(1, 0).pack())}, ProtocolError,
        r"lies: GET_VRING_BASE for ring 0 answered ring 1$"),
    "GET_VRING_BASE beyond 16 bits": (
        _start_then_stop, {F.GET_VRING_BASE: Reply(payload=VringState(0, 0x10000).pack())},
        ProtocolError, r"lies: GET_VRING_BASE says ring 0 base is 0x10000, which does not "
                       r"fit a split ring's 16-bit index$"),
    "GET_VRING_BASE never answered": (
        _stop, {F.GET_VRING_BASE: SILENCE}, DaemonTimeout,
        r"did not answer GET_VRING_BASE within 0\.3 s$"),
    "hang up on SET_VRING_ENABLE": (
        _start_then_stop, {F.SET_VRING_ENABLE: [None, HANGUP]}, ConnectionLost,
        r"closed the connection while SET_VRING_ENABLE was pending"),
    "fd on an ack": (
        _start, {F.SET_VRING_ADDR: Reply(payload=u64(0), fds=["memfd"])}, ProtocolError,
        r"lies: it attached 1 fds to its reply to SET_VRING_ADDR, expected at most 0$"),
    "ack cut short, then hang up": (
        _start, {F.ADD_MEM_REG: Raw(header(37, 0x5, 8) + bytes(3), then=HANGUP)},
        ConnectionLost, r"in the middle of its reply to ADD_MEM_REG, after 15 of the 20"),
    "ack longer than its size field": (
        _start, {F.SET_FEATURES: Reply(payload=u64(0) + b"junk", size=8)}, ProtocolError,
        r"lies: it sent 4 bytes nobody asked for before ADD_MEM_REG \(a reply longer than "
        r"its size field\?\)$"),
    "ack for another request": (
        _start, {F.SET_VRING_KICK: Reply(payload=u64(0), request=F.SET_VRING_CALL)},
        ProtocolError, r"it answered SET_VRING_KICK with a message for SET_VRING_CALL$"),
    "ack with a huge size": (
        _start, {F.SET_VRING_NUM: Reply(payload=u64(0), size=1 << 30)}, ProtocolError,
        r"bad message header in reply to SET_VRING_NUM .*exceeds the limit"),
    "ack with version bits 3": (
        _start, {F.SET_VRING_BASE: Reply(payload=u64(0), flags=0x7)}, ProtocolError,
        r"bad message header in reply to SET_VRING_BASE .*header version 3"),
    "ack without the reply flag": (
        _set_config, {F.SET_CONFIG: Reply(payload=u64(0), flags=0x1)}, ProtocolError,
        r"it answered SET_CONFIG with flags 0x1, without the reply flag 0x4"),
    "GET_CONFIG of another size": (
        _get_config, {F.GET_CONFIG: Reply(payload=DeviceConfig(0, 8, 0, bytes(8)).pack())},
        ProtocolError, r"asked for 60 config bytes at offset 0 with GET_CONFIG, got 8"),
    "GET_CONFIG without its head": (
        _get_config, {F.GET_CONFIG: Reply(payload=bytes(4))}, ProtocolError,
        r"its reply to GET_CONFIG is malformed: config payload is 4 bytes, shorter than its "
        r"12-byte head$"),
}


@pytest.mark.parametrize("operation,lies,exc_type,pattern", AFTER_CONNECT_LIES.values(),
                         ids=AFTER_CONNECT_LIES)
async def test_lie_after_connect_closes_the_connection(workdir, operation, lies, exc_type,
                                                       pattern):
    async with scene(workdir) as s:
        fe = await s.connect(timeout=TIMEOUT)
        session = s.daemon.session
        s.daemon.lies.update(lies)
        with pytest.raises(VhostUserError) as info:
            await operation(fe, s)
        check_error(info.value, exc_type, pattern, s.path)
        daemon_hung_up = any(
            (a if not isinstance(a, list) else a[-1]) is HANGUP
            or getattr(a, "then", None) is HANGUP for a in lies.values())
        await settle(session, daemon_hung_up=daemon_hung_up)
        if not daemon_hung_up:
            # the back-end channel went with it
            assert await session.backend_read() is None
        # and nothing more is sent: the error names the first failure
        with pytest.raises(ConnectionLost) as later:
            await fe.stop([0])
        check_error(later.value, ConnectionLost,
                    r"the vhost-user connection was closed after an earlier error: ", s.path)
        assert str(info.value).split(": ", 1)[1] in str(later.value)
        assert not session.violations


async def test_a_watcher_learns_that_the_frontend_gave_up(workdir):
    """Whoever waits for the daemon to hang up (the device, to redial or
    report it) also wakes when the front-end closed the connection after a
    lie, and ``failure`` says why."""
    async with scene(workdir) as s:
        fe = await s.connect()
        assert fe.failure is None
        woke = trio.Event()

        async def watch():
            await fe.wait_hangup()
            woke.set()

        s.nursery.start_soon(watch)
        await trio.sleep(0.02)
        assert not woke.is_set()
        s.daemon.lies[F.GET_VRING_BASE] = Reply(payload=VringState(3, 0).pack())
        with pytest.raises(ProtocolError):
            await fe.stop([0])
        with trio.fail_after(2):
            await woke.wait()
        assert fe.failure == ("the vhost-user daemon lies: GET_VRING_BASE for ring 0 "
                              "answered ring 3")
        await s.daemon.session.wait_frontend_hung_up()


async def test_a_refusal_is_not_a_lie_and_keeps_the_connection(workdir):
    async with scene(workdir, profile=dict(QSD, config=bytes(8))) as s:
        fe = await s.connect()
        session = s.daemon.session
        s.daemon.lies[F.SET_VRING_ADDR] = [Reply(payload=u64(1))]
        with pytest.raises(VhostUserError) as info:
            await fe.start(*s.start_args())
        check_error(info.value, VhostUserError,
                    r"the vhost-user daemon rejected SET_VRING_ADDR \(ack 0x1\)$", s.path)
        # libvhost-user's empty answer to a GET_CONFIG it cannot serve
        with pytest.raises(VhostUserError) as info:
            await fe.get_config(60)
        check_error(info.value, ProtocolError,
                    r"refused GET_CONFIG of 60 bytes \(empty reply\)$", s.path)
        # still talking
        assert await fe.get_config(8) == bytes(8)
        assert await fe.stop([0]) == {0: 0}
        assert not session.frontend_hung_up.is_set()


async def test_stale_bytes_without_reply_ack(workdir):
    """Without REPLY_ACK nothing is read after a command: bytes the daemon
    sent anyway are found before the next request that has a reply."""
    profile = dict(QSD, protocol_features=QSD["protocol_features"] & ~(1 << 3))
    async with scene(workdir, profile=profile) as s:
        fe = await s.connect()
        s.daemon.lies[F.SET_VRING_NUM] = Raw(header(8, 0x5, 8) + u64(0))
        await fe.start(*s.start_args())
        with pytest.raises(VhostUserError) as info:
            await fe.stop([0])
        check_error(info.value, ProtocolError,
                    r"lies: it sent 20 bytes nobody asked for before GET_VRING_BASE", s.path)
        await s.daemon.session.wait_frontend_hung_up()


# -- the back-end channel ----------------------------------------------------

async def _refused(session, request):
    got = await session.backend_read()
    assert got is not None, "the back-end channel was closed"
    rid, flags, payload, nfds = got
    assert (rid, flags, nfds) == (request, 0x5, 0)
    assert struct.unpack("=Q", payload)[0] != 0


async def _main_still_works(fe, session):
    assert await fe.get_config(8) == QSD["config"][:8]
    assert not session.frontend_hung_up.is_set()


async def test_backend_unknown_request_is_refused(workdir):
    async with scene(workdir) as s:
        fe = await s.connect()
        session = s.daemon.session
        await session.backend_send(99, 0x9, b"garbage")
        await _refused(session, 99)
        # without need-reply: no answer, and the channel goes on
        await session.backend_send(1234, 0x1)
        await session.backend_send(B.CONFIG_CHANGE_MSG, 0x9)
        assert await session.backend_read() == (2, 0x5, u64(0), 0)
        await _main_still_works(fe, session)


@pytest.mark.parametrize("request_id,payload,kinds", [
    # HOST_NOTIFIER offered by the daemon but never negotiated: refused
    (B.VRING_HOST_NOTIFIER_MSG, struct.pack("=QQQ", 0, 4096, 0), ["file"]),
    (B.VRING_HOST_NOTIFIER_MSG, struct.pack("=QQQ", 0, 4096, 0), ["memfd"]),
    (B.SHARED_OBJECT_ADD, bytes(16), ["socket"]),
    (B.SHARED_OBJECT_LOOKUP, bytes(16), ["eventfd"]),
    (B.IOTLB_MSG, bytes(25) + b"\1" + bytes(6), ["pipe"]),
    (B.SHMEM_MAP, bytes(40), ["memfd", "memfd"]),
    (77, b"", ["eventfd"] * 8),
], ids=["host-notifier-file", "host-notifier-memfd", "shared-object-socket",
        "shared-object-eventfd", "iotlb-pipe", "shmem-map", "unknown-8-fds"])
async def test_backend_request_with_fds_is_refused_and_its_fds_closed(
        workdir, request_id, payload, kinds):
    async with scene(workdir) as s:
        fe = await s.connect()
        session = s.daemon.session
        await session.backend_send(request_id, 0x9, payload, fds=kinds)
        await _refused(session, request_id)
        assert s.daemon.leaked_fds() == []
        await _main_still_works(fe, session)
    assert s.daemon.sent_count == len(kinds)


async def test_backend_fds_where_none_are_expected_are_closed(workdir):
    async with scene(workdir) as s:
        fe = await s.connect()
        session = s.daemon.session
        await session.backend_send(B.CONFIG_CHANGE_MSG, 0x9, fds=["file", "socket"])
        assert await session.backend_read() == (2, 0x5, u64(0), 0)
        assert s.daemon.leaked_fds() == []
        with trio.fail_after(2):
            while s.handler.events != ["config_changed"]:
                await trio.sleep(0.01)
        await _main_still_works(fe, session)


BACKEND_GARBAGE = {
    "nine fds": (lambda s: s.backend_send(B.CONFIG_CHANGE_MSG, 0x9, fds=["eventfd"] * 9),
                 "sent 9 fds with a message, at most 8"),
    "huge size": (lambda s: s.backend_send(B.CONFIG_CHANGE_MSG, 0x9, size=0xFFFF_FFFF),
                  "payload size 4294967295 exceeds the limit"),
    "wrong version": (lambda s: s.backend_send(B.CONFIG_CHANGE_MSG, 0x2),
                      "header version 2"),
    "reply flag on a request": (lambda s: s.backend_send(B.CONFIG_CHANGE_MSG, 0xD),
                                "CONFIG_CHANGE_MSG arrived with the reply flag set"),
    "payload of the wrong size": (
        lambda s: s.backend_send(B.CONFIG_CHANGE_MSG, 0x9, b"abcd"),
        "expected no payload, got 4 bytes"),
    "short header, then hang up": (
        lambda s: _then_close_backend(s, s.backend_send_raw(header(2, 0x9, 0)[:5])),
        "closed the connection in the middle of a message, after 5 of the 12 header bytes"),
    "payload cut, then hang up": (
        lambda s: _then_close_backend(s, s.backend_send_raw(header(4, 0x9, 8) + bytes(3))),
        "in the middle of a message, after 15 of the 20 bytes"),
    "short header, then silence": (
        lambda s: s.backend_send_raw(header(2, 0x9, 0)[:5]),
        "sent 5 of the 12 header bytes of a message and then nothing for 0.3 s"),
}


async def _then_close_backend(session, sending):
    await sending
    session.close_backend()


@pytest.mark.parametrize("garbage,logged", BACKEND_GARBAGE.values(), ids=BACKEND_GARBAGE)
async def test_backend_garbage_closes_only_the_channel(workdir, caplog, garbage, logged):
    caplog.set_level(logging.INFO, logger="vhost_user")
    async with scene(workdir) as s:
        fe = await s.connect(timeout=TIMEOUT)
        session = s.daemon.session
        start = trio.current_time()
        await garbage(session)
        if session.backend.fileno() != -1:
            assert await session.backend_read() is None  # the front-end closed it
        with trio.fail_after(2):
            while not any(logged in r.getMessage() for r in caplog.records):
                await trio.sleep(0.01)
        assert trio.current_time() - start < TIMEOUT + 0.5
        assert s.daemon.leaked_fds() == []
        (record,) = [r for r in caplog.records if logged in r.getMessage()]
        assert "\n" not in record.getMessage()
        # the main connection is unaffected
        await _main_still_works(fe, session)


async def test_backend_need_reply_requests_are_all_answered(workdir):
    async with scene(workdir) as s:
        fe = await s.connect()
        session = s.daemon.session
        await session.backend_send(B.CONFIG_CHANGE_MSG, 0x9)
        assert await session.backend_read() == (2, 0x5, u64(0), 0)
        # in-band notifications were not negotiated
        await session.backend_send(B.VRING_CALL, 0x9, VringState(0, 0).pack())
        await _refused(session, B.VRING_CALL)
        await session.backend_send(B.SHMEM_UNMAP, 0x9, bytes(8))
        await _refused(session, B.SHMEM_UNMAP)
        await _main_still_works(fe, session)


async def test_backend_daemon_that_never_reads_its_answers(workdir):
    """A daemon that floods need-reply requests and reads none of the
    answers: the front-end gives up on the channel after the timeout
    instead of blocking on it for ever."""
    async with scene(workdir) as s:
        fe = await s.connect(timeout=TIMEOUT)
        session = s.daemon.session
        start = trio.current_time()
        flood = header(99, 0x9, 0) * 256

        with trio.move_on_after(5):
            with contextlib.suppress(OSError):
                while True:
                    await session.backend_send_raw(flood)
        assert trio.current_time() - start < TIMEOUT + 2
        # drain: the channel is closed at the end of what was answered
        with trio.fail_after(2):
            while await session.backend_read() is not None:
                pass
        await _main_still_works(fe, session)


async def test_backend_channel_survives_daemon_closing_it(workdir):
    async with scene(workdir) as s:
        fe = await s.connect()
        session = s.daemon.session
        session.close_backend()
        await trio.sleep(0.05)
        await _main_still_works(fe, session)
        await fe.start(*s.start_args())
        assert await fe.stop([0]) == {0: 0}


# -- the tool itself ---------------------------------------------------------

async def test_honest_daemon_connects_starts_and_stops(workdir):
    async with scene(workdir) as s:
        fe = await s.connect(config_size=60)
        session = s.daemon.session
        assert session.names() == [
            "GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES", "GET_QUEUE_NUM",
            "GET_MAX_MEM_SLOTS", "SET_BACKEND_REQ_FD", "SET_OWNER", "GET_FEATURES",
            "GET_CONFIG"]
        assert fe.config == QSD["config"]
        await fe.start(*s.start_args())
        assert await fe.stop([0]) == {0: 0}
        assert not session.violations
        await fe.aclose()
        await session.wait_frontend_hung_up()


async def test_daemon_serves_one_frontend_after_another(workdir):
    async with scene(workdir, lies={F.SET_OWNER: [HANGUP]}) as s:
        await s.connect_fails(ConnectionLost, "while SET_OWNER was pending")
        s.daemon.lies.clear()  # the script is per session: this one would hang up too
        fe = await s.connect()
        assert len(s.daemon.sessions) == 2
        await fe.aclose()


async def test_daemon_records_a_violation_and_hangs_up(workdir):
    """The tool behaves like libvhost-user: a request that was not
    negotiated ends the session."""
    async with scene(workdir) as s:
        fe = await s.connect()
        session = s.daemon.session
        # RESET_DEVICE was not negotiated; bypass the front-end's own check
        await fe._conn.send(F.RESET_DEVICE)
        await session.wait_finished()
        assert session.violations == ["RESET_DEVICE without protocol feature bit 13"]


def test_fd_kinds_are_what_they_say(tmp_path):
    from lying_daemon import LyingDaemon
    d = LyingDaemon(str(tmp_path / "unused"))
    links = {}
    for kind in FD_KINDS:
        fd = d.make_fd(kind)
        links[kind] = os.readlink(f"/proc/self/fd/{fd}")
        os.close(fd)
    assert links["eventfd"] == "anon_inode:[eventfd]"
    assert links["memfd"].startswith("/memfd:lying-daemon")
    assert links["memfd-ro"].startswith("/memfd:lying-daemon")
    assert "(deleted)" in links["file"]
    assert links["socket"].startswith("socket:")
    assert links["pipe"].startswith("pipe:")


def test_memfds_of_a_given_length_and_read_only(tmp_path):
    import fcntl
    from lying_daemon import LyingDaemon
    d = LyingDaemon(str(tmp_path / "unused"))
    for kind, size, mode in (("memfd", 4096, os.O_RDWR), ("memfd:100", 100, os.O_RDWR),
                             ("memfd-ro", 4096, os.O_RDONLY),
                             ("memfd-ro:4160", 4160, os.O_RDONLY)):
        fd = d.make_fd(kind)
        try:
            assert os.fstat(fd).st_size == size
            assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == mode
        finally:
            os.close(fd)
    for bad in ("memfd:", "memfd:x", "memfd-rw"):
        with pytest.raises(ValueError):
            d.make_fd(bad)
