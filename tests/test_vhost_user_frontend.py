"""The front-end's sequences against a scripted fake daemon.

The fake daemon behaves like libvhost-user where it matters: it answers
GET_* requests, acks need-reply requests, remembers ring bases, and treats
any request that was not negotiated (or a need-reply without REPLY_ACK) as
a fatal violation: it records it and hangs up. Every test also checks that
no violation happened."""

from __future__ import annotations

import array
import os
import socket
import struct

import pytest
import trio

from vhost_user import (
    SUPPORTED_PROTOCOL_FEATURES,
    ConnectionLost,
    DaemonTimeout,
    DaemonUnavailable,
    MemoryRegionFd,
    ProtocolError,
    ProtocolFeature,
    RingSetup,
    VhostUserError,
    VhostUserFrontend,
)
from vhost_user.backend_channel import BackendChannel
from vhost_user.connection import Connection
from vhost_user.frontend import (
    MAPPING_SECONDS_PER_GIB,
    Step,
    memory_slot_steps,
    memory_table_step,
    ring_start_steps,
)
from vhost_user.protocol import (
    BackendRequest,
    DeviceConfig,
    FrontendRequest,
    MemoryRegion,
    MemoryTable,
    SingleMemoryRegion,
    VringAddr,
    VringFd,
    VringState,
)

HDR = struct.Struct("=III")
U64 = struct.Struct("=Q")
F = FrontendRequest
BIT30 = 1 << 30

QSD_CONFIG = bytes.fromhex("00800000000000000000000000000000000000000000000080000000"
                           "01000000000000000000000000000000000000000000000000000000"
                           "00000000")
assert len(QSD_CONFIG) == 60

QSD = dict(features=0x175007E46, protocol_features=0x8F2B, queue_num=1, max_mem_slots=32,
           config=QSD_CONFIG)
VIRTIOFSD = dict(features=0x175000000, protocol_features=0x8C2B, queue_num=2, max_mem_slots=32)
TESTPMD = dict(features=0xD7C66E7CB, protocol_features=0x10CBF, queue_num=128)
NO_BIT30 = dict(features=(1 << 32) | (1 << 28), protocol_features=None)

# The fake daemon's own idea of what each request needs (from the spec, not
# from the code under test).
GATES = {
    F.GET_QUEUE_NUM: 0, F.SET_BACKEND_REQ_FD: 5, F.GET_CONFIG: 9, F.SET_CONFIG: 9,
    F.RESET_DEVICE: 13, F.GET_MAX_MEM_SLOTS: 15, F.ADD_MEM_REG: 15, F.REM_MEM_REG: 15,
    F.SET_STATUS: 16, F.GET_STATUS: 16,
}
OWN_REPLY = {F.GET_FEATURES, F.GET_PROTOCOL_FEATURES, F.GET_QUEUE_NUM, F.GET_MAX_MEM_SLOTS,
             F.GET_CONFIG, F.GET_VRING_BASE, F.GET_STATUS}
FDS = {F.SET_BACKEND_REQ_FD: 1, F.ADD_MEM_REG: 1}


async def read_raw(sock):
    """One message as (request, flags, payload, fds), or None at EOF."""
    async def exactly(n, fds):
        buf = b""
        while len(buf) < n:
            data, anc, _, _ = await sock.recvmsg(n - len(buf), socket.CMSG_SPACE(64))
            for _, _, raw in anc:
                a = array.array("i")
                a.frombytes(raw)
                fds.extend(a)
            if not data:
                return None
            buf += data
        return buf

    fds: list[int] = []
    head = await exactly(12, fds)
    if head is None:
        return None
    request, flags, size = HDR.unpack(head)
    payload = await exactly(size, fds) if size else b""
    return request, flags, payload, fds


async def write_raw(sock, request, flags, payload=b"", fds=()):
    anc = []
    if fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    await sock.sendmsg([HDR.pack(request, flags, len(payload)) + payload], anc)


class FakeDaemon:
    def __init__(self, sock, *, features, protocol_features=None, queue_num=1,
                 max_mem_slots=32, config=b""):
        self.sock = sock
        self.features = features
        self.offered_pf = protocol_features
        self.queue_num = queue_num
        self.max_mem_slots = max_mem_slots
        self.config = config
        self.negotiated = 0
        self.acked = None
        self.bases: dict[int, int] = {}
        self.seen: list[tuple[str, int, bytes, int]] = []
        self.violations: list[str] = []
        self.backend = None
        self.finished = trio.Event()
        # name -> callable(payload) giving the raw (request, flags, payload)
        # to answer instead, or "hangup"
        self.lies: dict[str, object] = {}
        self.acks: dict[str, int] = {}

    def names(self, start=0):
        return [s[0] for s in self.seen[start:]]

    def flags(self, start=0):
        return [s[1] for s in self.seen[start:]]

    def payloads(self, name):
        return [s[2] for s in self.seen if s[0] == name]

    def _violation(self, request, flags, nfds, value):
        if self.offered_pf is None and request in (F.GET_PROTOCOL_FEATURES,
                                                   F.SET_PROTOCOL_FEATURES):
            return "protocol features were never offered"
        if request == F.SET_VRING_ENABLE and not (self.acked or 0) & BIT30:
            return "SET_VRING_ENABLE without bit 30 in SET_FEATURES"
        if request in GATES and not self.negotiated >> GATES[request] & 1:
            return f"{request.name} without protocol feature bit {GATES[request]}"
        if flags not in (0x1, 0x9):
            return f"flags {flags:#x}"
        if flags == 0x9:
            if not self.negotiated & ProtocolFeature.REPLY_ACK:
                return "need-reply without REPLY_ACK"
            if request in OWN_REPLY or request == F.SET_PROTOCOL_FEATURES:
                return f"need-reply on {request.name}"
        want = FDS.get(request, 0)
        if request in (F.SET_VRING_KICK, F.SET_VRING_CALL, F.SET_VRING_ERR):
            want = 0 if value & 0x100 else 1
        if request == F.SET_MEM_TABLE:
            want = value
        if nfds != want:
            return f"{request.name} with {nfds} fds, expected {want}"
        return None

    async def run(self):
        try:
            while True:
                msg = await read_raw(self.sock)
                if msg is None:
                    return
                request, flags, payload, fds = msg
                request = F(request)
                self.seen.append((request.name, flags, payload, len(fds)))
                value = U64.unpack(payload)[0] if len(payload) == 8 else None
                if request == F.SET_MEM_TABLE:
                    value = MemoryTable.unpack(payload).regions.__len__()
                problem = self._violation(request, flags, len(fds), value)
                if request == F.SET_BACKEND_REQ_FD and not problem:
                    self.backend = trio.socket.from_stdlib_socket(
                        socket.socket(fileno=fds.pop()))
                for fd in fds:
                    os.close(fd)
                if problem:
                    self.violations.append(problem)
                    return  # libvhost-user: vu_panic, connection dropped
                lie = self.lies.get(request.name)
                if lie == "hangup":
                    return
                if lie is not None:
                    await write_raw(self.sock, *lie(payload))
                    continue
                reply = self._handle(request, payload, value)
                if reply is not None:
                    await write_raw(self.sock, request, 0x5, reply)
                elif flags & 0x8:
                    await write_raw(self.sock, request, 0x5, U64.pack(self.acks.get(request.name, 0)))
        finally:
            self.sock.close()
            if self.backend is not None:
                self.backend.close()
            self.finished.set()

    def _handle(self, request, payload, value):
        if request == F.GET_FEATURES:
            return U64.pack(self.features)
        if request == F.GET_PROTOCOL_FEATURES:
            return U64.pack(self.offered_pf)
        if request == F.SET_PROTOCOL_FEATURES:
            if value & ~self.offered_pf:
                self.violations.append(f"SET_PROTOCOL_FEATURES {value:#x} not offered")
            self.negotiated = value
        if request == F.SET_FEATURES:
            if value & ~self.features:
                self.violations.append(f"SET_FEATURES {value:#x} not offered")
            self.acked = value
        if request == F.GET_QUEUE_NUM:
            return U64.pack(self.queue_num)
        if request == F.GET_MAX_MEM_SLOTS:
            return U64.pack(self.max_mem_slots)
        if request == F.GET_CONFIG:
            cfg = DeviceConfig.unpack(payload)
            if cfg.offset + cfg.size > len(self.config):
                return b""  # libvhost-user's error answer
            return DeviceConfig(0, cfg.size, 0, self.config[:cfg.size]).pack()
        if request == F.SET_VRING_BASE:
            state = VringState.unpack(payload)
            self.bases[state.index] = state.num
        if request == F.GET_VRING_BASE:
            index = VringState.unpack(payload).index
            return VringState(index, self.bases.get(index, 0)).pack()
        if request == F.GET_STATUS:
            return U64.pack(0)
        return None


class RecordingHandler:
    def __init__(self):
        self.events = []
        self.hook = None

    async def config_changed(self):
        self.events.append("config_changed")
        if self.hook is not None:
            await self.hook()

    def vring_call(self, index):
        self.events.append(("call", index))

    def vring_err(self, index):
        self.events.append(("err", index))


async def open_pair(nursery, profile, *, handler=None, default_num_queues=1, config_size=0,
                    lies=None):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    daemon = FakeDaemon(trio.socket.from_stdlib_socket(b), **profile)
    daemon.lies.update(lies or {})
    nursery.start_soon(daemon.run)
    fe = await VhostUserFrontend.from_socket(
        trio.socket.from_stdlib_socket(a), nursery=nursery,
        handler=handler or RecordingHandler(), default_num_queues=default_num_queues,
        config_size=config_size, timeout=2.0, label="fake")
    return fe, daemon


USER = 0x7F12_0000_0000
GPA = 0x4000_0000
MiB = 1 << 20


def region(fd, n=0):
    return MemoryRegionFd(gpa=GPA + n * 4 * MiB, size=4 * MiB, user_addr=USER + n * 4 * MiB,
                          fd=fd, fd_offset=0)


def ring(index, eventfds, base=0, num=256):
    start = USER + index * 0x10000
    return RingSetup(index=index, num=num, base=base, desc_addr=start, avail_addr=start + 0x1000,
                     used_addr=start + 0x2000, kick_fd=eventfds[2 * index],
                     call_fd=eventfds[2 * index + 1])


RING_STEPS = ["SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_CALL",
              "SET_VRING_KICK"]


# -- connect sequences

async def test_qsd_connect_sequence(nursery):
    fe, daemon = await open_pair(nursery, QSD, config_size=60)
    assert daemon.names() == [
        "GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES", "GET_QUEUE_NUM",
        "GET_MAX_MEM_SLOTS", "SET_BACKEND_REQ_FD", "SET_OWNER", "GET_FEATURES", "GET_CONFIG"]
    assert daemon.flags() == [0x1, 0x1, 0x1, 0x1, 0x1, 0x9, 0x9, 0x1, 0x1]
    assert daemon.payloads("SET_PROTOCOL_FEATURES") == [U64.pack(0x8229)]
    assert daemon.payloads("GET_CONFIG") == [DeviceConfig(0, 60, 0, bytes(60)).pack()]
    assert fe.device_features == 0x131007E46  # bits 30 and 26 (LOG_ALL) removed
    assert fe.has_protocol_features
    assert fe.protocol_features == (ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK
                                    | ProtocolFeature.BACKEND_REQ | ProtocolFeature.CONFIG
                                    | ProtocolFeature.CONFIGURE_MEM_SLOTS)
    assert fe.num_queues == 1
    assert fe.max_mem_slots == 32
    assert fe.config == QSD_CONFIG
    assert not daemon.violations
    await fe.aclose()


async def test_virtiofsd_connect_sequence_without_config(nursery):
    fe, daemon = await open_pair(nursery, VIRTIOFSD, default_num_queues=1, config_size=40)
    assert daemon.names() == [
        "GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES", "GET_QUEUE_NUM",
        "GET_MAX_MEM_SLOTS", "SET_BACKEND_REQ_FD", "SET_OWNER", "GET_FEATURES"]
    assert daemon.payloads("SET_PROTOCOL_FEATURES") == [U64.pack(0x8029)]
    assert fe.device_features == 0x131000000
    assert fe.num_queues == 2
    assert fe.config == b""
    with pytest.raises(VhostUserError, match="CONFIG"):
        await fe.get_config(40)
    with pytest.raises(VhostUserError, match="CONFIG"):
        await fe.set_config(0, b"x")
    assert len(daemon.seen) == 8
    assert not daemon.violations
    await fe.aclose()


async def test_testpmd_connect_sequence(nursery):
    fe, daemon = await open_pair(nursery, TESTPMD, default_num_queues=2, config_size=12)
    assert daemon.names() == [
        "GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES", "GET_QUEUE_NUM",
        "SET_BACKEND_REQ_FD", "SET_OWNER", "GET_FEATURES"]
    assert daemon.payloads("SET_PROTOCOL_FEATURES") == [U64.pack(0x10029)]
    assert fe.device_features == 0xD7C66E7CB & ~(BIT30 | 1 << 26)
    assert fe.num_queues == 128
    assert fe.max_mem_slots is None
    assert fe.config == b""
    assert not daemon.violations
    await fe.aclose()


async def test_daemon_without_protocol_features(nursery):
    fe, daemon = await open_pair(nursery, NO_BIT30, default_num_queues=3, config_size=8)
    assert daemon.names() == ["GET_FEATURES", "SET_OWNER", "GET_FEATURES"]
    assert daemon.flags() == [0x1, 0x1, 0x1]
    assert not fe.has_protocol_features
    assert fe.protocol_features == ProtocolFeature(0)
    assert fe.num_queues == 3
    assert fe.max_mem_slots is None
    assert fe.device_features == NO_BIT30["features"]
    assert not daemon.violations
    await fe.aclose()


async def test_only_supported_protocol_features_are_negotiated(nursery):
    everything = (1 << 20) - 1
    fe, daemon = await open_pair(nursery, dict(QSD, protocol_features=everything))
    assert daemon.payloads("SET_PROTOCOL_FEATURES") == [U64.pack(int(SUPPORTED_PROTOCOL_FEATURES))]
    # MQ REPLY_ACK BACKEND_REQ CONFIG INFLIGHT_SHMFD RESET_DEVICE CONFIGURE_MEM_SLOTS STATUS
    assert int(SUPPORTED_PROTOCOL_FEATURES) == 0x1B229
    assert not daemon.violations
    await fe.aclose()


async def test_connect_through_a_path(nursery, tmp_path):
    path = str(tmp_path / "daemon.sock")
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(path)
    listener.listen(1)
    daemons = []

    async def serve():
        sock, _ = await listener.accept()
        daemons.append(FakeDaemon(sock, **QSD))
        await daemons[0].run()

    nursery.start_soon(serve)
    fe = await VhostUserFrontend.connect(path, nursery=nursery, handler=RecordingHandler(),
                                         default_num_queues=1, config_size=8)
    assert fe.config == QSD_CONFIG[:8]
    await fe.aclose()
    await daemons[0].finished.wait()
    listener.close()


async def test_connect_nobody_listening(nursery, tmp_path):
    path = tmp_path / "vhost.sock"
    with pytest.raises(DaemonUnavailable) as info:
        await VhostUserFrontend.connect(str(path), nursery=nursery, handler=RecordingHandler(),
                                        default_num_queues=1, config_size=0)
    assert str(info.value) == f"no vhost-user daemon is listening on {path} (it does not exist)"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    with pytest.raises(DaemonUnavailable, match=r"listening on .* \(connection refused\)"):
        await VhostUserFrontend.connect(str(path), nursery=nursery, handler=RecordingHandler(),
                                        default_num_queues=1, config_size=0)
    s.close()


# -- lying or failing daemons during connect

async def test_silent_daemon_times_out_with_a_hint(nursery):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with pytest.raises(DaemonTimeout, match="GET_FEATURES within 0.1 s.*one at a time"):
        await VhostUserFrontend.from_socket(
            trio.socket.from_stdlib_socket(a), nursery=nursery, handler=RecordingHandler(),
            default_num_queues=1, config_size=0, timeout=0.1, label="fake")
    assert a.fileno() == -1  # the front-end closed its socket
    b.close()


async def _connect_expecting(nursery, profile, lies, exc, match, **kw):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    daemon = FakeDaemon(trio.socket.from_stdlib_socket(b), **profile)
    daemon.lies.update(lies)
    nursery.start_soon(daemon.run)
    with pytest.raises(exc, match=match):
        await VhostUserFrontend.from_socket(
            trio.socket.from_stdlib_socket(a), nursery=nursery, handler=RecordingHandler(),
            default_num_queues=1, timeout=2.0, label="fake", **kw)
    # the front-end hung up
    with trio.fail_after(2):
        await daemon.finished.wait()
    return daemon


async def test_get_config_error_reply(nursery):
    await _connect_expecting(nursery, dict(QSD, config=b""), {}, ProtocolError,
                             "refused GET_CONFIG of 60 bytes", config_size=60)


async def test_get_config_wrong_size(nursery):
    lie = {"GET_CONFIG": lambda p: (24, 0x5, DeviceConfig(0, 4, 0, b"abcd").pack())}
    await _connect_expecting(nursery, QSD, lie, ProtocolError, "lies.*got 4", config_size=60)


async def test_queue_num_zero_is_a_lie(nursery):
    lie = {"GET_QUEUE_NUM": lambda p: (17, 0x5, U64.pack(0))}
    await _connect_expecting(nursery, QSD, lie, ProtocolError, "GET_QUEUE_NUM", config_size=0)


async def test_features_changing_bit_30_is_a_lie(nursery):
    calls = []

    def second_time_without_bit30(p):
        calls.append(p)
        value = QSD["features"] if len(calls) == 1 else QSD["features"] & ~BIT30
        return (1, 0x5, U64.pack(value))

    await _connect_expecting(nursery, QSD, {"GET_FEATURES": second_time_without_bit30},
                             ProtocolError, "bit 30", config_size=0)


async def test_reply_for_the_wrong_request(nursery):
    lie = {"GET_PROTOCOL_FEATURES": lambda p: (1, 0x5, U64.pack(0x8F2B))}
    await _connect_expecting(nursery, QSD, lie, ProtocolError, "lies", config_size=0)


async def test_daemon_hanging_up_mid_connect(nursery):
    await _connect_expecting(nursery, QSD, {"SET_OWNER": "hangup"}, ConnectionLost,
                             "while SET_OWNER was pending", config_size=0)


async def test_nonzero_ack_is_an_error(nursery):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    daemon = FakeDaemon(trio.socket.from_stdlib_socket(b), **QSD)
    daemon.acks["SET_OWNER"] = 22
    nursery.start_soon(daemon.run)
    with pytest.raises(VhostUserError, match=r"rejected SET_OWNER \(ack 0x16\)"):
        await VhostUserFrontend.from_socket(
            trio.socket.from_stdlib_socket(a), nursery=nursery, handler=RecordingHandler(),
            default_num_queues=1, config_size=0, timeout=2.0, label="fake")


# -- start / stop

async def test_qsd_start_stop_restart(nursery, memfds, eventfds):
    fe, daemon = await open_pair(nursery, QSD, config_size=60)
    ram = memfds()
    features = (1 << 32) | (1 << 28) | (1 << 9)
    mark = len(daemon.seen)
    await fe.start(features, [region(ram)], [ring(0, eventfds, base=7)])
    assert daemon.names(mark) == ["SET_FEATURES", "ADD_MEM_REG", *RING_STEPS, "SET_VRING_ENABLE"]
    assert set(daemon.flags(mark)) == {0x9}
    assert daemon.payloads("SET_FEATURES") == [U64.pack(features | BIT30)]
    assert daemon.payloads("ADD_MEM_REG") == [
        SingleMemoryRegion(MemoryRegion(GPA, 4 * MiB, USER, 0)).pack()]
    r = ring(0, eventfds, base=7)
    assert daemon.payloads("SET_VRING_NUM") == [VringState(0, 256).pack()]
    assert daemon.payloads("SET_VRING_BASE") == [VringState(0, 7).pack()]
    assert daemon.payloads("SET_VRING_ADDR") == [
        VringAddr(0, 0, r.desc_addr, r.used_addr, r.avail_addr, 0).pack()]
    assert daemon.payloads("SET_VRING_KICK") == [VringFd(0).pack()]
    assert daemon.payloads("SET_VRING_ENABLE") == [VringState(0, 1).pack()]

    mark = len(daemon.seen)
    assert await fe.stop([0]) == {0: 7}
    assert daemon.names(mark) == ["SET_VRING_ENABLE", "GET_VRING_BASE"]
    assert daemon.flags(mark) == [0x9, 0x1]
    assert daemon.seen[-2][2] == VringState(0, 0).pack()

    # a restart: the back-end still has the region, so no ADD_MEM_REG
    mark = len(daemon.seen)
    await fe.start(features, [region(ram)], [ring(0, eventfds, base=7)])
    assert daemon.names(mark) == ["SET_FEATURES", *RING_STEPS, "SET_VRING_ENABLE"]
    assert not daemon.violations
    await fe.aclose()


async def test_mem_slots_track_what_the_backend_has(nursery, memfds, eventfds):
    fe, daemon = await open_pair(nursery, QSD)
    a, b, c = memfds(), memfds(), memfds()
    await fe.start(1 << 32, [region(a, 0), region(b, 1)], [])
    assert daemon.names()[-2:] == ["ADD_MEM_REG", "ADD_MEM_REG"]
    assert [p for p in daemon.payloads("ADD_MEM_REG")] == [
        SingleMemoryRegion(region(a, 0).wire()).pack(),
        SingleMemoryRegion(region(b, 1).wire()).pack()]
    # b goes away, c comes in: removals first, like QEMU
    mark = len(daemon.seen)
    await fe.start(1 << 32, [region(a, 0), region(c, 2)], [])
    assert daemon.names(mark) == ["SET_FEATURES", "REM_MEM_REG", "ADD_MEM_REG"]
    assert daemon.seen[mark + 1][2] == SingleMemoryRegion(region(b, 1).wire()).pack()
    assert daemon.seen[mark + 1][3] == 0  # REM_MEM_REG carries no fd
    assert daemon.seen[mark + 2][2] == SingleMemoryRegion(region(c, 2).wire()).pack()
    # same addresses but a different file: the back-end must remap
    mark = len(daemon.seen)
    await fe.start(1 << 32, [region(a, 0), region(b, 2)], [])
    assert daemon.names(mark) == ["SET_FEATURES", "REM_MEM_REG", "ADD_MEM_REG"]
    assert not daemon.violations
    await fe.aclose()


async def test_too_many_regions_for_the_slots(nursery, memfds):
    fe, daemon = await open_pair(nursery, dict(QSD, max_mem_slots=2))
    fds = [memfds() for _ in range(3)]
    mark = len(daemon.seen)
    with pytest.raises(VhostUserError, match="at most 2"):
        await fe.start(1 << 32, [region(fd, i) for i, fd in enumerate(fds)], [])
    assert daemon.names(mark) == ["SET_FEATURES"]
    await fe.aclose()


async def test_testpmd_start_stop_with_status_and_mem_table(nursery, memfds, eventfds):
    fe, daemon = await open_pair(nursery, TESTPMD, default_num_queues=2)
    a, b = memfds(), memfds()
    rings = [ring(0, eventfds, base=3), ring(1, eventfds, base=4)]
    mark = len(daemon.seen)
    features = (1 << 32) | (1 << 0)  # VERSION_1, CSUM
    await fe.start(features, [region(a, 0), region(b, 1)], rings)
    assert daemon.names(mark) == ["SET_FEATURES", "SET_MEM_TABLE", *RING_STEPS, *RING_STEPS,
                                  "SET_VRING_ENABLE", "SET_VRING_ENABLE", "SET_STATUS"]
    assert set(daemon.flags(mark)) == {0x9}
    (table,) = daemon.payloads("SET_MEM_TABLE")
    assert MemoryTable.unpack(table) == MemoryTable([region(a, 0).wire(), region(b, 1).wire()])
    assert daemon.seen[mark + 1][3] == 2  # one fd per region
    assert daemon.payloads("SET_STATUS") == [U64.pack(0xF)]

    mark = len(daemon.seen)
    assert await fe.stop([0, 1]) == {0: 3, 1: 4}
    assert daemon.names(mark) == ["SET_VRING_ENABLE", "SET_VRING_ENABLE", "GET_VRING_BASE",
                                  "GET_VRING_BASE", "SET_STATUS"]
    assert [p for p in daemon.payloads("SET_VRING_ENABLE")[-2:]] == [
        VringState(0, 0).pack(), VringState(1, 0).pack()]
    assert daemon.payloads("SET_STATUS")[-1] == U64.pack(0)
    assert not daemon.violations
    await fe.aclose()


async def test_testpmd_more_than_8_regions_is_refused_before_sending(nursery, memfds):
    fe, daemon = await open_pair(nursery, TESTPMD)
    fds = [memfds(4096 * 1024) for _ in range(9)]
    mark = len(daemon.seen)
    with pytest.raises(VhostUserError, match="at most 8"):
        await fe.start(1 << 32, [region(fd, i) for i, fd in enumerate(fds)], [])
    assert daemon.names(mark) == ["SET_FEATURES"]
    await fe.aclose()


async def test_no_bit30_start_stop(nursery, memfds, eventfds):
    fe, daemon = await open_pair(nursery, NO_BIT30, default_num_queues=1)
    ram = memfds()
    mark = len(daemon.seen)
    await fe.start(1 << 32, [region(ram)], [ring(0, eventfds, base=1)])
    # Nothing is acknowledged without REPLY_ACK: GET_VRING_BASE's reply is
    # the first proof the daemon has seen everything before it.
    assert await fe.stop([0]) == {0: 1}
    assert daemon.names(mark) == ["SET_FEATURES", "SET_MEM_TABLE", *RING_STEPS,
                                  "GET_VRING_BASE"]
    assert set(daemon.flags(mark)) == {0x1}
    assert daemon.payloads("SET_FEATURES") == [U64.pack(1 << 32)]
    assert not daemon.violations
    await fe.aclose()


async def test_stop_before_start_sends_no_enable(nursery):
    """SET_VRING_ENABLE needs bit 30 acknowledged by SET_FEATURES, not
    merely offered."""
    fe, daemon = await open_pair(nursery, TESTPMD)
    mark = len(daemon.seen)
    assert await fe.stop([0]) == {0: 0}
    assert daemon.names(mark) == ["GET_VRING_BASE", "SET_STATUS"]
    assert not daemon.violations
    await fe.aclose()


async def test_single_ring_restart(nursery, memfds, eventfds):
    fe, daemon = await open_pair(nursery, QSD)
    ram = memfds()
    r0 = ring(0, eventfds, base=2)
    with pytest.raises(VhostUserError, match="before start"):
        await fe.start_ring(r0)
    await fe.start(1 << 32, [region(ram)], [r0])
    with pytest.raises(VhostUserError, match="running"):
        await fe.start_ring(r0)
    mark = len(daemon.seen)
    assert await fe.stop_ring(0) == 2
    assert daemon.names(mark) == ["SET_VRING_ENABLE", "GET_VRING_BASE"]
    mark = len(daemon.seen)
    await fe.start_ring(ring(0, eventfds, base=9))
    assert daemon.names(mark) == [*RING_STEPS, "SET_VRING_ENABLE"]
    assert daemon.seen[mark + 1][2] == VringState(0, 9).pack()
    assert not daemon.violations
    await fe.aclose()


async def test_ring_without_fds_sends_the_no_fd_flag(nursery, memfds, eventfds):
    fe, daemon = await open_pair(nursery, QSD)
    ram = memfds()
    r0 = attrs_evolve(ring(0, eventfds), kick_fd=-1)
    await fe.start(1 << 32, [region(ram)], [r0])
    (kick,) = [s for s in daemon.seen if s[0] == "SET_VRING_KICK"]
    (call,) = [s for s in daemon.seen if s[0] == "SET_VRING_CALL"]
    assert (kick[2], kick[3]) == (VringFd(0, no_fd=True).pack(), 0)
    assert (call[2], call[3]) == (VringFd(0).pack(), 1)
    assert not daemon.violations
    await fe.aclose()


def attrs_evolve(obj, **changes):
    import attrs
    return attrs.evolve(obj, **changes)


async def test_start_validates_before_sending(nursery, memfds, eventfds):
    fe, daemon = await open_pair(nursery, QSD)
    ram = memfds()
    mark = len(daemon.seen)
    with pytest.raises(VhostUserError, match="does not offer"):
        await fe.start(BIT30 | 1 << 32, [region(ram)], [])
    with pytest.raises(VhostUserError, match="does not offer"):
        await fe.start(1 << 60, [region(ram)], [])
    with pytest.raises(VhostUserError, match="does not exist"):
        await fe.start(1 << 32, [region(ram)], [ring(1, eventfds)])
    outside = attrs_evolve(ring(0, eventfds), used_addr=USER + 4 * MiB - 16)
    with pytest.raises(VhostUserError, match="used ring .* not inside"):
        await fe.start(1 << 32, [region(ram)], [outside])
    with pytest.raises(VhostUserError, match="twice"):
        await fe.start(1 << 32, [region(ram)], [ring(0, eventfds), ring(0, eventfds)])
    with pytest.raises(VhostUserError, match="overlap"):
        await fe.start(1 << 32, [region(ram), attrs_evolve(region(ram), gpa=GPA + MiB,
                                                           user_addr=USER + 64 * MiB)], [])
    with pytest.raises(VhostUserError, match="16-bit"):
        await fe.start(1 << 32, [region(ram)], [ring(0, eventfds, base=0x10000)])
    with pytest.raises(VhostUserError, match="without memory"):
        await fe.start(1 << 32, [], [])
    assert len(daemon.seen) == mark  # nothing reached the daemon
    await fe.aclose()


async def test_ack_failure_names_the_request(nursery, memfds, eventfds):
    fe, daemon = await open_pair(nursery, QSD)
    daemon.acks["SET_VRING_ADDR"] = 1
    with pytest.raises(VhostUserError, match=r"rejected SET_VRING_ADDR \(ack 0x1\)"):
        await fe.start(1 << 32, [region(memfds())], [ring(0, eventfds)])
    await fe.aclose()


async def test_get_vring_base_for_another_ring_is_a_lie(nursery, memfds, eventfds):
    fe, daemon = await open_pair(nursery, QSD)
    daemon.lies["GET_VRING_BASE"] = lambda p: (11, 0x5, VringState(1, 0).pack())
    with pytest.raises(ProtocolError, match="lies"):
        await fe.stop([0])
    await fe.aclose()


async def test_stop_rejects_unknown_rings(nursery):
    fe, daemon = await open_pair(nursery, QSD)
    mark = len(daemon.seen)
    with pytest.raises(VhostUserError, match="does not exist"):
        await fe.stop([1])
    with pytest.raises(VhostUserError, match="repeat"):
        await fe.stop([0, 0])
    assert len(daemon.seen) == mark
    await fe.aclose()


async def test_set_config(nursery):
    fe, daemon = await open_pair(nursery, QSD)
    await fe.set_config(32, b"\x01")
    assert daemon.seen[-1] == ("SET_CONFIG", 0x9, DeviceConfig(32, 1, 0, b"\x01").pack(), 0)
    assert await fe.get_config(8) == QSD_CONFIG[:8]
    await fe.aclose()


async def test_reset_device_only_when_negotiated(nursery):
    fe, daemon = await open_pair(nursery, QSD)
    mark = len(daemon.seen)
    with pytest.raises(VhostUserError, match="RESET_DEVICE was not negotiated"):
        await fe.reset_device()
    assert len(daemon.seen) == mark
    await fe.aclose()

    fe, daemon = await open_pair(nursery, dict(QSD, protocol_features=0x8F2B | 1 << 13))
    await fe.reset_device()
    assert daemon.seen[-1][:2] == ("RESET_DEVICE", 0x9)
    assert not daemon.violations
    await fe.aclose()


async def test_aclose_is_idempotent_and_final(nursery, memfds):
    fe, daemon = await open_pair(nursery, QSD)
    await fe.aclose()
    await fe.aclose()
    with trio.fail_after(2):
        await daemon.finished.wait()
    with pytest.raises(VhostUserError, match="closed"):
        await fe.start(1 << 32, [region(memfds())], [])
    with pytest.raises(VhostUserError, match="closed"):
        await fe.stop([0])


# -- pure planning

def test_ring_start_steps_order_and_payloads():
    r = RingSetup(index=3, num=64, base=5, desc_addr=0x1000, avail_addr=0x2000,
                  used_addr=0x3000, kick_fd=10, call_fd=-1)
    steps = ring_start_steps(r)
    assert steps == [
        Step(F.SET_VRING_NUM, VringState(3, 64)),
        Step(F.SET_VRING_BASE, VringState(3, 5)),
        Step(F.SET_VRING_ADDR, VringAddr(3, 0, 0x1000, 0x3000, 0x2000, 0)),
        Step(F.SET_VRING_CALL, VringFd(3, no_fd=True)),
        Step(F.SET_VRING_KICK, VringFd(3), (10,)),
    ]


def test_memory_slot_steps_remove_before_add():
    old = MemoryRegion(0, 4096, 0x1000, 0)
    new = MemoryRegionFd(gpa=0x10000, size=4096, user_addr=0x20000, fd=5, fd_offset=0)
    steps = memory_slot_steps({("new",): new}, {("old",): old})
    assert [(k, s.request) for k, s in steps] == [(("old",), F.REM_MEM_REG),
                                                   (("new",), F.ADD_MEM_REG)]
    assert steps[1][1].fds == (5,)


def test_mapping_memory_gets_time_by_its_size():
    """A daemon may map memory in time linear in its size (testpmd without
    hugepages takes seconds a GiB): SET_MEM_TABLE and ADD_MEM_REG get
    MAPPING_SECONDS_PER_GIB a GiB on top of the reply timeout; other
    requests get nothing extra."""
    gib = 1 << 30
    banks = [MemoryRegionFd(gpa=0, size=3 * gib, user_addr=0x1000_0000, fd=5, fd_offset=0),
             MemoryRegionFd(gpa=8 * gib, size=gib // 2, user_addr=0x9000_0000, fd=6, fd_offset=0)]
    assert memory_table_step(banks).extra_time == pytest.approx(3.5 * MAPPING_SECONDS_PER_GIB)
    steps = memory_slot_steps({("a",): banks[0], ("b",): banks[1]}, {("old",): MemoryRegion(0, gib, 0, 0)})
    assert [s.extra_time for _, s in steps] == [0.0, 3 * MAPPING_SECONDS_PER_GIB, MAPPING_SECONDS_PER_GIB / 2]


# -- back-end channel, through the front-end

async def test_config_change_is_answered_before_the_handler_runs(nursery):
    handler = RecordingHandler()
    fe, daemon = await open_pair(nursery, QSD, handler=handler, config_size=60)
    seen = []
    called = trio.Event()

    async def hook():
        # The answer must already be waiting on the daemon's side.
        data = daemon.backend._sock.recv(64, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        seen.append(data)
        # and the device can re-read the config without deadlock
        seen.append(await fe.get_config(60))
        called.set()

    handler.hook = hook
    await write_raw(daemon.backend, BackendRequest.CONFIG_CHANGE_MSG, 0x9)
    with trio.fail_after(2):
        await called.wait()
    assert seen == [HDR.pack(2, 0x5, 8) + U64.pack(0), QSD_CONFIG]
    assert await read_raw(daemon.backend) == (2, 0x5, U64.pack(0), [])
    assert handler.events == ["config_changed"]
    await fe.aclose()


async def test_backend_keeps_answering_while_the_handler_waits(nursery):
    handler = RecordingHandler()
    fe, daemon = await open_pair(nursery, QSD, handler=handler)
    release = trio.Event()

    async def hook():
        await release.wait()

    handler.hook = hook
    await write_raw(daemon.backend, BackendRequest.CONFIG_CHANGE_MSG, 0x9)
    assert await read_raw(daemon.backend) == (2, 0x5, U64.pack(0), [])
    # a second request while the handler is still busy is answered too
    await write_raw(daemon.backend, 99, 0x9)
    with trio.fail_after(2):
        assert (await read_raw(daemon.backend))[:2] == (99, 0x5)
    release.set()
    await fe.aclose()


async def test_backend_unknown_and_unnegotiated_requests_get_nonzero(nursery):
    handler = RecordingHandler()
    fe, daemon = await open_pair(nursery, QSD, handler=handler)
    r, w = os.pipe()
    await write_raw(daemon.backend, 99, 0x9, b"junk", (w,))
    os.close(w)
    request, flags, payload, fds = await read_raw(daemon.backend)
    assert (request, flags, fds) == (99, 0x5, [])
    assert U64.unpack(payload)[0] != 0
    # the fd that came with it was closed
    os.set_blocking(r, False)
    assert os.read(r, 1) == b""
    os.close(r)
    # in-band call was not negotiated: refused, handler not called
    await write_raw(daemon.backend, BackendRequest.VRING_CALL, 0x9, VringState(0, 0).pack())
    request, flags, payload, _ = await read_raw(daemon.backend)
    assert (request, flags) == (4, 0x5) and U64.unpack(payload)[0] != 0
    # supported but not implemented here: IOTLB miss
    await write_raw(daemon.backend, BackendRequest.IOTLB_MSG, 0x9, bytes(25) + b"\1" + bytes(6))
    request, flags, payload, _ = await read_raw(daemon.backend)
    assert request == 1 and U64.unpack(payload)[0] != 0
    # without need-reply: no answer, and the channel still works
    await write_raw(daemon.backend, 77, 0x1)
    await write_raw(daemon.backend, BackendRequest.CONFIG_CHANGE_MSG, 0x9)
    assert await read_raw(daemon.backend) == (2, 0x5, U64.pack(0), [])
    assert not [e for e in handler.events if isinstance(e, tuple)]
    await fe.aclose()


@pytest.mark.parametrize("wire", [
    HDR.pack(2, 0x9, 4) + b"abcd",          # CONFIG_CHANGE_MSG must be empty
    HDR.pack(2, 0x2, 0),                    # bad version
    HDR.pack(2, 0xD, 0),                    # a "request" with the reply flag
    HDR.pack(2, 0x1, 0xFFFF),               # oversize
])
async def test_malformed_backend_message_closes_only_the_channel(nursery, wire):
    fe, daemon = await open_pair(nursery, QSD)
    await daemon.backend.send(wire)
    with trio.fail_after(2):
        assert await read_raw(daemon.backend) is None  # channel closed
    # the main connection is unaffected
    assert await fe.get_config(8) == QSD_CONFIG[:8]
    await fe.aclose()


# -- back-end channel with in-band notifications, directly

async def test_inband_vring_call_and_err(nursery):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    handler = RecordingHandler()
    features = (ProtocolFeature.BACKEND_REQ | ProtocolFeature.REPLY_ACK
                | ProtocolFeature.INBAND_NOTIFICATIONS)
    channel = BackendChannel(Connection.from_stdlib(a, label="ch", kind=BackendRequest),
                             handler, protocol_features=features, num_queues=2)
    await nursery.start(channel.run)
    peer = trio.socket.from_stdlib_socket(b)

    await write_raw(peer, BackendRequest.VRING_CALL, 0x9, VringState(1, 0).pack())
    assert await read_raw(peer) == (4, 0x5, U64.pack(0), [])
    await write_raw(peer, BackendRequest.VRING_ERR, 0x1, VringState(0, 0).pack())
    await write_raw(peer, BackendRequest.VRING_CALL, 0x9, VringState(5, 0).pack())  # no ring 5
    request, _, payload, _ = await read_raw(peer)
    assert request == 4 and U64.unpack(payload)[0] != 0
    await write_raw(peer, BackendRequest.VRING_CALL, 0x9, VringState(0, 1).pack())  # num != 0
    request, _, payload, _ = await read_raw(peer)
    assert request == 4 and U64.unpack(payload)[0] != 0
    assert handler.events == [("call", 1), ("err", 0)]

    # a handler that raises is reported as failure, and the channel lives on
    def broken(index):
        raise RuntimeError("device bug")
    handler.vring_call = broken
    await write_raw(peer, BackendRequest.VRING_CALL, 0x9, VringState(0, 0).pack())
    request, _, payload, _ = await read_raw(peer)
    assert request == 4 and U64.unpack(payload)[0] != 0

    # a short payload is malformed: the channel closes
    await write_raw(peer, BackendRequest.VRING_CALL, 0x1, b"\0\0\0\0")
    with trio.fail_after(2):
        assert await read_raw(peer) is None
    assert channel.closed
    peer.close()


async def test_backend_channel_close_stops_the_reader(nursery):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    channel = BackendChannel(Connection.from_stdlib(a, label="ch", kind=BackendRequest),
                             RecordingHandler(), protocol_features=ProtocolFeature.CONFIG)
    done = trio.Event()

    async def run():
        await channel.run()
        done.set()

    nursery.start_soon(run)
    await trio.sleep(0.01)
    await channel.aclose()
    with trio.fail_after(2):
        await done.wait()
    b.close()


# -- a device the front-end knows nothing about: its config size is asked


@pytest.mark.parametrize("size", [1, 37, 60, 255, 256])
async def test_probe_config_finds_the_config_size_by_asking(nursery, size):
    config = bytes((7 * i + 3) & 0xFF for i in range(size))
    fe, daemon = await open_pair(nursery, dict(QSD, config=config))
    start = len(daemon.seen)
    assert await fe.probe_config() == config
    asked = [DeviceConfig.unpack(p).size for p in daemon.payloads("GET_CONFIG")]
    assert len(daemon.seen) - start == len(asked) <= 9  # a binary search, not a scan
    assert asked[0] == 256 and size in asked
    assert not daemon.violations
    assert fe.failure is None  # refused reads are answers, not lies


async def test_probe_config_of_a_daemon_with_no_config_space(nursery):
    fe, daemon = await open_pair(nursery, dict(QSD, config=b""))
    assert await fe.probe_config() == b""
    assert fe.failure is None and not daemon.violations
    # without CONFIG negotiated nothing is asked at all
    fe, daemon = await open_pair(nursery, VIRTIOFSD)
    assert await fe.probe_config() == b""
    assert daemon.payloads("GET_CONFIG") == [] and not daemon.violations


async def test_probe_config_stops_at_a_lie(nursery):
    lie = {"GET_CONFIG": lambda p: (24, 0x5, DeviceConfig(0, 4, 0, b"abcd").pack())}
    fe, daemon = await open_pair(nursery, QSD, lies=lie)
    with pytest.raises(VhostUserError, match="got 4"):
        await fe.probe_config()
    assert fe.failure is not None
