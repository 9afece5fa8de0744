"""Inflight I/O tracking (INFLIGHT_SHMFD) against the lying daemon.

With INFLIGHT_SHMFD the front-end asks the daemon once for a memfd
(GET_INFLIGHT_FD) in which the daemon records the requests it has in
flight, sends it back with SET_INFLIGHT_FD at every start, and hands it
to the next connection after the daemon died, so that the restarted
daemon resubmits what was in flight. These tests check the order of the
messages, that the very same memfd goes to the new daemon, that every bad
answer to GET_INFLIGHT_FD ends in one precise error without leaking an fd,
and that the region is closed exactly once, by whoever owns it last.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import socket
import stat

import pytest
import trio

from lying_daemon import (
    HANGUP,
    INFLIGHT_SHMFD,
    QSD,
    QSD_INFLIGHT,
    Reply,
    inflight,
    inflight_queue_size,
    leak_checked,
    u64,
)
from vhost_user import (
    ConnectionLost,
    DaemonUnavailable,
    MemoryRegionFd,
    ProtocolError,
    RingSetup,
    VhostUserError,
    VhostUserFrontend,
)
from vhost_user.frontend import SUPPORTED_PROTOCOL_FEATURES, InflightRegion
from vhost_user.protocol import FrontendRequest, ProtocolFeature

F = FrontendRequest

VERSION_1 = 1 << 32
MiB = 1 << 20
GPA = 0x4000_0000
USER = 0x7F12_0000_0000
RING_STEPS = ["SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_CALL",
              "SET_VRING_KICK"]
# libvhost-user's region for one queue of 256: 16 * 256 + 2 rounded up to 64.
SIZE_256 = 4160
LOGGER = "vhost_user.frontend"


class Handler:
    async def config_changed(self):
        pass

    def vring_call(self, index):
        pass

    def vring_err(self, index):
        pass


class Scene:
    """A lying daemon, the front-ends that dialled it and the fds the test
    made for them; everything is closed on the way out."""

    def __init__(self, daemon, nursery, path):
        self.daemon = daemon
        self.nursery = nursery
        self.path = path
        self.frontends = []
        self.fds = []

    async def connect(self, *, inflight=None, path=None):
        fe = await VhostUserFrontend.connect(
            path or self.path, nursery=self.nursery, handler=Handler(), default_num_queues=1,
            config_size=0, timeout=1.0, inflight=inflight)
        self.frontends.append(fe)
        return fe

    def _keep(self, fd):
        self.fds.append(fd)
        return fd

    def start_args(self, nums=(256,)):
        """Features, one 4 MiB region and rings 0.. of these sizes in it."""
        ram = self._keep(os.memfd_create("guest-ram"))
        os.ftruncate(ram, 4 * MiB)
        region = MemoryRegionFd(gpa=GPA, size=4 * MiB, user_addr=USER, fd=ram, fd_offset=0)
        return VERSION_1, [region], [self.ring(i, num) for i, num in enumerate(nums)]

    def ring(self, index, num=256):
        start = USER + index * 0x10000
        return RingSetup(index=index, num=num, base=0, desc_addr=start,
                         avail_addr=start + 0x1000, used_addr=start + 0x2000,
                         kick_fd=self._keep(os.eventfd(0)), call_fd=self._keep(os.eventfd(0)))


def scene(workdir, profile=QSD_INFLIGHT, **daemon_kwargs):
    return leak_checked(os.path.join(workdir, "daemon.sock"), Scene, profile=profile, **daemon_kwargs)


def identity(fd):
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino)


def is_open(fd):
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError as e:
        assert e.errno == errno.EBADF
        return False
    return True


@contextlib.contextmanager
def occupied(fd):
    """The closed fd number ``fd`` refers to a pipe for the duration."""
    r, w = os.pipe()
    if r != fd:
        os.dup2(r, fd)
        os.close(r)
    try:
        yield
    finally:
        os.close(fd)
        os.close(w)


def check_error(exc, exc_type, pattern, label):
    message = str(exc)
    assert type(exc) is exc_type, f"{type(exc).__name__}: {message}"
    assert "\n" not in message
    assert message.startswith(f"{label}: "), message
    assert re.search(pattern, message), message


# -- the region and the feature ----------------------------------------------

def test_inflight_shmfd_is_offered():
    assert SUPPORTED_PROTOCOL_FEATURES & ProtocolFeature.INFLIGHT_SHMFD
    assert INFLIGHT_SHMFD == int(ProtocolFeature.INFLIGHT_SHMFD)


def test_region_fits_wire_and_closes_once():
    fd = os.memfd_create("inflight")
    region = InflightRegion(fd, SIZE_256 * 2, 0, 2, 256)
    assert region.wire().pack() == inflight(SIZE_256 * 2, 0, 2, 256)
    assert region.fits(2, 256) and region.fits(2, 128)
    assert not region.fits(2, 512)  # rings larger than it was laid out for
    assert not region.fits(1, 256)  # another geometry altogether
    assert region != InflightRegion(fd, SIZE_256 * 2, 0, 2, 256)  # identity, not value
    region.close()
    assert region.closed and not is_open(fd)
    # The number is reused; a second close must not touch the new file.
    with occupied(fd):
        region.close()
        assert stat.S_ISFIFO(os.fstat(fd).st_mode)
    with pytest.raises(ValueError):
        InflightRegion(-1, 1, 0, 1, 1)
    with pytest.raises(ValueError):
        InflightRegion(3, 1, 0, 0x10000, 1)


# -- start -----------------------------------------------------------------

async def test_start_gets_then_sets_the_region_before_memory_and_rings(workdir):
    async with scene(workdir, profile=dict(QSD_INFLIGHT, queue_num=2)) as s:
        fe = await s.connect()
        session = s.daemon.session
        assert session.negotiated & INFLIGHT_SHMFD
        assert fe.protocol_features & ProtocolFeature.INFLIGHT_SHMFD
        assert fe.inflight is None
        mark = len(session.seen)
        await fe.start(*s.start_args(nums=(128, 256)))
        assert session.names(mark) == (
            ["SET_FEATURES", "GET_INFLIGHT_FD", "SET_INFLIGHT_FD", "ADD_MEM_REG"]
            + RING_STEPS + RING_STEPS + ["SET_VRING_ENABLE", "SET_VRING_ENABLE"])
        # Asked for all the device's queues, sized for its largest ring.
        assert session.payloads("GET_INFLIGHT_FD") == [inflight(0, 0, 2, 256)]
        get, put = [x for x in session.seen if x.name.endswith("_INFLIGHT_FD")]
        assert get.flags == 0x1 and get.nfds == 0
        assert put.flags == 0x9 and put.nfds == 1  # acked under REPLY_ACK
        assert session.payloads("SET_INFLIGHT_FD") == [inflight(2 * SIZE_256, 0, 2, 256)]
        region = fe.inflight
        assert isinstance(region, InflightRegion)
        assert (region.mmap_size, region.mmap_offset, region.num_queues,
                region.queue_size) == (2 * SIZE_256, 0, 2, 256)
        # The very memfd the daemon gave went back to it.
        assert len(session.inflight_given) == 1
        assert identity(region.fd) == session.inflight_given[0]
        assert [x.fd_identity for x in session.inflight_set] == session.inflight_given
        assert os.fstat(region.fd).st_size == 2 * SIZE_256
        assert not session.violations


async def test_a_second_start_sends_the_same_region_without_asking_again(workdir):
    async with scene(workdir) as s:
        fe = await s.connect()
        session = s.daemon.session
        args = s.start_args()
        await fe.start(*args)
        region = fe.inflight
        await fe.stop([0])
        mark = len(session.seen)
        await fe.start(*args)
        assert session.names(mark) == (["SET_FEATURES", "SET_INFLIGHT_FD"] + RING_STEPS
                                       + ["SET_VRING_ENABLE"])
        assert fe.inflight is region and not region.closed
        assert session.names().count("GET_INFLIGHT_FD") == 1
        assert session.payloads("SET_INFLIGHT_FD") == [inflight(SIZE_256, 0, 1, 256)] * 2
        assert [x.fd_identity for x in session.inflight_set] == [identity(region.fd)] * 2
        assert not session.violations


async def test_larger_rings_later_get_a_new_region(workdir, caplog):
    async with scene(workdir) as s:
        fe = await s.connect()
        session = s.daemon.session
        await fe.start(*s.start_args(nums=(128,)))
        old = fe.inflight
        await fe.stop([0])
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            await fe.start(*s.start_args(nums=(256,)))
        assert "does not fit 1 queues of 256" in caplog.text
        assert old.closed and fe.inflight is not old
        assert session.payloads("GET_INFLIGHT_FD") == [inflight(0, 0, 1, 128),
                                                       inflight(0, 0, 1, 256)]
        assert [x.fd_identity for x in session.inflight_set] == session.inflight_given
        assert len(set(session.inflight_given)) == 2
        assert not session.violations


async def test_restarting_one_ring_larger_than_the_region_is_refused(workdir):
    async with scene(workdir) as s:
        fe = await s.connect()
        session = s.daemon.session
        await fe.start(*s.start_args(nums=(128,)))
        await fe.stop_ring(0)
        mark = len(session.seen)
        with pytest.raises(VhostUserError, match=r"ring 0 size 256 does not fit the inflight "
                                                 r"region, laid out for rings of up to 128"):
            await fe.start_ring(s.ring(0, num=256))
        assert session.names(mark) == []
        await fe.start_ring(s.ring(0, num=64))
        assert fe.failure is None and not session.violations


async def test_without_the_feature_nothing_inflight_is_sent(workdir):
    """The real qemu-storage-daemon 7.2 does not offer INFLIGHT_SHMFD."""
    async with scene(workdir, profile=QSD) as s:
        fe = await s.connect()
        session = s.daemon.session
        assert not session.negotiated & INFLIGHT_SHMFD
        args = s.start_args()
        await fe.start(*args)
        await fe.stop([0])
        await fe.start(*args)
        assert not [n for n in session.names() if "INFLIGHT" in n]
        assert fe.inflight is None and fe.take_inflight() is None
        assert not session.violations


# -- reconnect ---------------------------------------------------------------

async def test_reconnect_sends_the_same_memfd_to_the_new_daemon(workdir):
    async with scene(workdir, lies={F.GET_VRING_BASE: [HANGUP]}) as s:
        old = await s.connect()
        first = s.daemon.session
        args = s.start_args()
        await old.start(*args)
        region = old.inflight
        # The daemon dies with requests in flight: the front-end gives up on
        # the connection but keeps the region.
        with pytest.raises(ConnectionLost):
            await old.stop([0])
        assert old.failure is not None
        assert old.inflight is region and not region.closed
        assert old.take_inflight() is region
        assert old.inflight is None and old.take_inflight() is None
        await old.aclose()
        assert not region.closed and is_open(region.fd)

        s.daemon.lies.clear()
        new = await s.connect(inflight=region)
        second = s.daemon.session
        assert second is not first
        assert new.inflight is region
        mark = len(second.seen)
        await new.start(*args)
        assert second.names(mark) == (["SET_FEATURES", "SET_INFLIGHT_FD", "ADD_MEM_REG"]
                                      + RING_STEPS + ["SET_VRING_ENABLE"])
        assert "GET_INFLIGHT_FD" not in second.names()
        assert second.inflight_given == []
        assert second.payloads("SET_INFLIGHT_FD") == [inflight(SIZE_256, 0, 1, 256)]
        assert [x.fd_identity for x in second.inflight_set] == first.inflight_given
        assert not first.violations and not second.violations
        await new.aclose()
        assert region.closed and not is_open(region.fd)


async def test_a_handed_over_region_that_no_longer_fits_is_replaced(workdir, caplog):
    async with scene(workdir) as s:
        old = await s.connect()
        await old.start(*s.start_args(nums=(128,)))
        region = old.take_inflight()
        await old.aclose()
        new = await s.connect(inflight=region)
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            await new.start(*s.start_args(nums=(256,)))
        assert "will not be resubmitted" in caplog.text
        assert region.closed
        assert s.daemon.session.payloads("GET_INFLIGHT_FD") == [inflight(0, 0, 1, 256)]
        assert new.inflight.queue_size == 256


async def test_a_daemon_without_the_feature_gets_no_region_and_it_is_closed(workdir, caplog):
    async with scene(workdir) as s:
        old = await s.connect()
        await old.start(*s.start_args())
        region = old.take_inflight()
        await old.aclose()
        # The daemon comes back without INFLIGHT_SHMFD.
        s.daemon.profile = dict(QSD)
        with caplog.at_level(logging.INFO, logger=LOGGER):
            new = await s.connect(inflight=region)
        assert "does not negotiate INFLIGHT_SHMFD: closing the inflight region" in caplog.text
        assert region.closed and not is_open(region.fd)
        assert new.inflight is None
        await new.start(*s.start_args())
        assert not [n for n in s.daemon.session.names() if "INFLIGHT" in n]
        assert not s.daemon.session.violations


async def test_a_failed_connect_leaves_the_region_with_the_caller(workdir):
    async with scene(workdir, lies={F.SET_OWNER: [HANGUP]}) as s:
        s.daemon.lies.clear()
        old = await s.connect()
        await old.start(*s.start_args())
        region = old.take_inflight()
        await old.aclose()
        with pytest.raises(DaemonUnavailable):
            await s.connect(inflight=region, path=os.path.join(workdir, "nobody.sock"))
        s.daemon.lies[F.SET_OWNER] = [HANGUP]
        with pytest.raises(ConnectionLost):
            await s.connect(inflight=region)
        assert not region.closed and is_open(region.fd)
        s.daemon.lies.clear()
        # Still the caller's, so it can try again with it.
        new = await s.connect(inflight=region)
        assert new.inflight is region


async def test_a_region_can_be_handed_to_one_frontend_only(workdir):
    async with scene(workdir) as s:
        fe = await s.connect()
        await fe.start(*s.start_args())
        sessions = len(s.daemon.sessions)
        with pytest.raises(ValueError, match="still held by"):
            await s.connect(inflight=fe.inflight)
        with pytest.raises(TypeError):
            await s.connect(inflight=fe.inflight.fd)
        region = fe.take_inflight()
        region.close()
        with pytest.raises(ValueError, match="is closed"):
            await s.connect(inflight=region)
        assert len(s.daemon.sessions) == sessions  # refused before dialling
        # from_socket refuses too, and closes the socket it was given.
        a, b = socket.socketpair()
        with b:
            with pytest.raises(ValueError, match="is closed"):
                await VhostUserFrontend.from_socket(
                    trio.socket.from_stdlib_socket(a), nursery=s.nursery, handler=Handler(),
                    default_num_queues=1, config_size=0, inflight=region)
            assert a.fileno() == -1
            assert b.recv(1) == b""


async def test_aclose_closes_the_region_exactly_once(workdir):
    async with scene(workdir) as s:
        fe = await s.connect()
        await fe.start(*s.start_args())
        region = fe.inflight
        fd = region.fd
        await fe.aclose()
        assert region.closed and not is_open(fd)
        assert fe.inflight is None
        # Another file gets the number; nothing may close it again.
        with occupied(fd):
            await fe.aclose()
            region.close()
            assert stat.S_ISFIFO(os.fstat(fd).st_mode)


# -- bad answers to GET_INFLIGHT_FD --------------------------------------------

BAD_ANSWERS = {
    "no fd": (
        Reply(), ProtocolError,
        r"lies: its reply to GET_INFLIGHT_FD \(4160 bytes at offset 0\) carries no fd$"),
    "two fds": (
        Reply(fds=["inflight", "inflight"]), ProtocolError,
        r"lies: it attached 2 fds to its reply to GET_INFLIGHT_FD, expected at most 1$"),
    "a pipe": (
        Reply(fds=["pipe"]), ProtocolError,
        r"lies: the fd of its reply to GET_INFLIGHT_FD is a pipe, not a memfd$"),
    "a socket": (
        Reply(fds=["socket"]), ProtocolError, r"GET_INFLIGHT_FD is a socket, not a memfd$"),
    "an eventfd": (
        Reply(fds=["eventfd"]), ProtocolError,
        r"GET_INFLIGHT_FD is anon_inode:\[eventfd\], not a memfd$"),
    "a memfd shorter than the region": (
        Reply(fds=["memfd:100"]), ProtocolError,
        r"lies: the fd of its reply to GET_INFLIGHT_FD is a file of 100 bytes, shorter than "
        r"the 4160 bytes \(offset \+ size\) of the region$"),
    "a memfd shorter than offset + size": (
        Reply(payload=inflight(SIZE_256, 4096, 1, 256), fds=["inflight"]), ProtocolError,
        r"is a file of 4160 bytes, shorter than the 8256 bytes"),
    "offset + size beyond 2**64": (
        Reply(payload=inflight(2**64 - 1, 2**64 - 1, 1, 256), fds=["inflight"]),
        ProtocolError, r"shorter than the 36893488147419103230 bytes"),
    "a read-only memfd": (
        Reply(fds=[f"memfd-ro:{SIZE_256}"]), ProtocolError,
        r"GET_INFLIGHT_FD is not open for reading and writing$"),
    "other queues": (
        Reply(payload=inflight(2 * SIZE_256, 0, 2, 256), fds=["inflight"]), ProtocolError,
        r"lies: asked GET_INFLIGHT_FD for 1 queues of 256, got a region for 2 queues of 256$"),
    "another queue size": (
        Reply(payload=inflight(SIZE_256, 0, 1, 1024), fds=["inflight"]), ProtocolError,
        r"got a region for 1 queues of 1024$"),
    "a short payload": (
        Reply(payload=bytes(16), fds=["inflight"]), ProtocolError,
        r"lies: its reply to GET_INFLIGHT_FD is malformed: Inflight payload is 16 bytes, "
        r"expected 24$"),
    "hang up": (
        HANGUP, ConnectionLost, r"closed the connection while GET_INFLIGHT_FD was pending"),
    # libvhost-user's answer when it cannot allocate the region: a refusal.
    "mmap_size 0": (
        Reply(payload=inflight(0, 0, 1, 256)), VhostUserError,
        r"the vhost-user daemon refused GET_INFLIGHT_FD \(mmap_size 0\)$"),
    "mmap_size 0 with a memfd": (
        Reply(payload=inflight(0, 0, 1, 256), fds=["memfd"]), VhostUserError,
        r"refused GET_INFLIGHT_FD \(mmap_size 0\)$"),
}


@pytest.mark.parametrize("answer,exc_type,pattern", BAD_ANSWERS.values(), ids=BAD_ANSWERS)
async def test_a_bad_answer_to_get_inflight_fd(workdir, answer, exc_type, pattern):
    async with scene(workdir, lies={F.GET_INFLIGHT_FD: answer}) as s:
        fe = await s.connect()
        session = s.daemon.session
        with pytest.raises(VhostUserError) as info:
            await fe.start(*s.start_args())
        check_error(info.value, exc_type, pattern, s.path)
        assert fe.inflight is None
        assert "SET_INFLIGHT_FD" not in session.names()
        # Whatever the daemon sent is closed already, not only at the end.
        assert s.daemon.leaked_fds() == []
        if exc_type is VhostUserError:
            # A refusal, not a lie: the connection stays.
            assert fe.failure is None
            assert await fe.get_config(4) == QSD_INFLIGHT["config"][:4]
        else:
            assert fe.failure is not None
            await session.wait_finished()
            assert session.frontend_hung_up.is_set() or answer is HANGUP
        assert not session.violations


async def test_a_rejected_set_inflight_fd_keeps_the_region_for_aclose(workdir):
    async with scene(workdir, lies={F.SET_INFLIGHT_FD: Reply(payload=u64(1))}) as s:
        fe = await s.connect()
        with pytest.raises(VhostUserError, match=r"rejected SET_INFLIGHT_FD \(ack 0x1\)$"):
            await fe.start(*s.start_args())
        region = fe.inflight
        assert region is not None and not region.closed and fe.failure is None
        await fe.aclose()
        assert region.closed


# -- the lying daemon itself -----------------------------------------------------

def test_inflight_sizes_are_libvhost_users():
    assert inflight_queue_size(256) == SIZE_256
    assert inflight_queue_size(128) == 2112
    assert inflight_queue_size(1) == 64


async def test_the_daemon_maps_set_inflight_fd_like_libvhost_user(workdir):
    async with scene(workdir) as s:
        fe = await s.connect()
        session = s.daemon.session
        pipe_r, pipe_w = os.pipe()
        try:
            # Bypass the front-end: a pipe is nothing to map.
            await fe._conn.send(F.SET_INFLIGHT_FD, inflight(SIZE_256, 0, 1, 256), (pipe_r,))
            await session.wait_finished()
        finally:
            os.close(pipe_r)
            os.close(pipe_w)
        assert session.violations == ["SET_INFLIGHT_FD with an fd that is not a regular file"]
        assert session.inflight_set[0].fd_identity is not None
