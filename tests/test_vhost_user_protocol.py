"""The pure vhost-user codec: every payload round-trips, every malformed
input is refused with ProtocolError."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vhost_user.protocol import (
    BACKEND_REQUESTS,
    FRONTEND_REQUESTS,
    HEADER_SIZE,
    MAX_FDS,
    MAX_PAYLOAD_SIZE,
    PROTOCOL_FEATURES_MASK,
    VHOST_F_LOG_ALL,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_F_VERSION_1,
    BackendRequest,
    DeviceConfig,
    DeviceStateTransfer,
    Empty,
    FrontendRequest,
    Header,
    Inflight,
    IotlbMsg,
    Log,
    MemoryRegion,
    MemoryTable,
    Message,
    ProtocolError,
    ProtocolFeature,
    Raw,
    SharedObject,
    SingleMemoryRegion,
    U64,
    VhostUserError,
    VringAddr,
    VringArea,
    VringFd,
    VringState,
    ack_payload,
    request_name,
)

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, 2**64 - 1)


@st.composite
def regions(draw):
    size = draw(st.integers(1, 2**48))
    limit = 2**64 - size
    return MemoryRegion(draw(st.integers(0, limit)), size, draw(st.integers(0, limit)),
                        draw(st.integers(0, limit)))


@st.composite
def configs(draw):
    size = draw(st.integers(0, 256))
    offset = draw(st.integers(0, 256 - size))
    return DeviceConfig(offset, size, draw(st.sampled_from([0, 1])),
                        draw(st.binary(min_size=size, max_size=size)))


payloads = st.one_of(
    st.just(Empty()),
    st.builds(Raw, st.binary(max_size=512)),
    st.builds(U64, u64),
    st.builds(VringState, u32, u32),
    st.builds(VringAddr, u32, st.sampled_from([0, 1]), u64, u64, u64, u64),
    st.builds(VringFd, u8, st.booleans()),
    regions(),
    st.builds(MemoryTable, st.lists(regions(), max_size=8)),
    st.builds(SingleMemoryRegion, regions()),
    configs(),
    st.builds(Inflight, u64, u64, u16, u16),
    st.builds(Log, u64, u64),
    st.builds(IotlbMsg, u64, u64, u64, st.integers(0, 3), st.integers(1, 4)),
    st.builds(VringArea, u8, st.booleans(), u64, u64),
    st.builds(SharedObject, st.binary(min_size=16, max_size=16)),
    st.builds(DeviceStateTransfer, st.integers(0, 1), st.just(0)),
)


@given(payloads)
def test_every_payload_round_trips(payload):
    assert type(payload).unpack(payload.pack()) == payload


@pytest.mark.parametrize("cls,size", [
    (U64, 8), (VringState, 8), (VringAddr, 40), (VringFd, 8), (MemoryRegion, 32),
    (SingleMemoryRegion, 40), (Inflight, 24), (Log, 16), (IotlbMsg, 32), (VringArea, 24),
    (SharedObject, 16), (DeviceStateTransfer, 8),
])
def test_fixed_sizes_are_exact(cls, size):
    good = bytearray(size)
    if cls in (MemoryRegion, SingleMemoryRegion):
        struct.pack_into("=Q", good, size - 24, 4096)  # a non-zero region size
    if cls is IotlbMsg:
        good[25] = 2  # type: update
    cls.unpack(bytes(good))
    for bad in (b"", bytes(good[:-1]), bytes(good) + b"\0", bytes(good) * 2):
        with pytest.raises(ProtocolError):
            cls.unpack(bad)


def test_layouts_match_the_spec_byte_for_byte():
    assert U64(0x0102030405060708).pack() == struct.pack("=Q", 0x0102030405060708)
    assert VringState(3, 256).pack() == struct.pack("=II", 3, 256)
    # index, flags, desc, USED, AVAIL, log
    assert VringAddr(1, 1, desc=0x10, used=0x20, avail=0x30, log=0x40).pack() == \
        struct.pack("=IIQQQQ", 1, 1, 0x10, 0x20, 0x30, 0x40)
    assert VringFd(5).pack() == struct.pack("=Q", 5)
    assert VringFd(5, no_fd=True).pack() == struct.pack("=Q", 0x105)
    region = MemoryRegion(0x4000_0000, 0x10_0000, 0x7F00_0000_0000, 0x1000)
    assert region.pack() == struct.pack("=QQQQ", 0x4000_0000, 0x10_0000, 0x7F00_0000_0000, 0x1000)
    assert MemoryTable([region, region]).pack() == struct.pack("=II", 2, 0) + region.pack() * 2
    assert SingleMemoryRegion(region).pack() == struct.pack("=Q", 0) + region.pack()
    assert DeviceConfig(4, 2, 0, b"ab").pack() == struct.pack("=III", 4, 2, 0) + b"ab"
    assert Inflight(1, 2, 3, 4).pack() == struct.pack("=QQHH", 1, 2, 3, 4) + bytes(4)
    assert Header(24, 0x9, 72).pack() == struct.pack("=III", 24, 9, 72)


# -- header

def _header(request=1, flags=0x1, size=0):
    return struct.pack("=III", request, flags, size)


@pytest.mark.parametrize("flags", [0x1, 0x5, 0x9])
def test_header_round_trips(flags):
    h = Header.unpack(_header(11, flags, 8))
    assert (h.request, h.flags, h.size) == (11, flags, 8)
    assert h.pack() == _header(11, flags, 8)
    assert h.is_reply == bool(flags & 4)
    assert h.need_reply == bool(flags & 8)


@pytest.mark.parametrize("flags", [0x0, 0x2, 0x3, 0x4, 0x6, 0xB])
def test_header_bad_version(flags):
    with pytest.raises(ProtocolError, match="version"):
        Header.unpack(_header(flags=flags))


@pytest.mark.parametrize("flags", [0x11, 0x101, 0x8000_0001])
def test_header_unknown_flag_bits(flags):
    with pytest.raises(ProtocolError, match="unknown bits"):
        Header.unpack(_header(flags=flags))


def test_header_oversize_payload():
    Header.unpack(_header(size=MAX_PAYLOAD_SIZE))
    with pytest.raises(ProtocolError, match="exceeds"):
        Header.unpack(_header(size=MAX_PAYLOAD_SIZE + 1))
    with pytest.raises(ProtocolError, match="exceeds"):
        Header.unpack(_header(size=0xFFFF_FFFF))


@pytest.mark.parametrize("length", [0, 11, 13])
def test_header_wrong_length(length):
    with pytest.raises(ProtocolError):
        Header.unpack(bytes(length))
    assert HEADER_SIZE == 12


# -- payload validation

def test_vring_fd_rejects_other_bits():
    assert VringFd.unpack(struct.pack("=Q", 0x1FF)) == VringFd(0xFF, True)
    for value in (0x200, 0x1_0000_0000, 1 << 63, 0x300):
        with pytest.raises(ProtocolError, match="bits other than 0-8"):
            VringFd.unpack(struct.pack("=Q", value))
    with pytest.raises(ValueError):
        VringFd(256)


def test_memory_table_limits():
    region = MemoryRegion(0, 4096, 0x1000, 0)
    with pytest.raises(ProtocolError, match="at most 8"):
        MemoryTable.unpack(struct.pack("=II", 9, 0) + region.pack() * 9)
    with pytest.raises(ValueError):
        MemoryTable([region] * 9)
    # the count must agree with the length, exactly
    with pytest.raises(ProtocolError, match="expected"):
        MemoryTable.unpack(struct.pack("=II", 2, 0) + region.pack())
    with pytest.raises(ProtocolError, match="expected"):
        MemoryTable.unpack(struct.pack("=II", 1, 0) + region.pack() * 2)
    with pytest.raises(ProtocolError, match="padding"):
        MemoryTable.unpack(struct.pack("=II", 1, 7) + region.pack())
    with pytest.raises(ProtocolError, match="shorter"):
        MemoryTable.unpack(b"\1\0\0")
    assert MemoryTable.unpack(struct.pack("=II", 0, 0)) == MemoryTable(())


def test_memory_region_ranges():
    with pytest.raises(ProtocolError, match="size 0"):
        MemoryRegion.unpack(struct.pack("=QQQQ", 0, 0, 0, 0))
    with pytest.raises(ProtocolError, match="wraps"):
        MemoryRegion.unpack(struct.pack("=QQQQ", 2**64 - 4096, 8192, 0, 0))
    with pytest.raises(ProtocolError, match="wraps"):
        MemoryRegion.unpack(struct.pack("=QQQQ", 0, 8192, 2**64 - 1, 0))
    MemoryRegion.unpack(struct.pack("=QQQQ", 2**64 - 4096, 4096, 0, 0))
    with pytest.raises(ValueError):
        MemoryRegion(-1, 4096, 0, 0)
    with pytest.raises(ValueError):
        MemoryRegion(0, 2**64, 0, 0)


def test_single_memory_region_padding():
    region = MemoryRegion(0, 4096, 0x1000, 0)
    with pytest.raises(ProtocolError, match="padding"):
        SingleMemoryRegion.unpack(struct.pack("=Q", 1) + region.pack())


def test_device_config_validation():
    head = struct.Struct("=III")
    with pytest.raises(ProtocolError, match="size"):
        DeviceConfig.unpack(head.pack(0, 8, 0) + bytes(4))
    with pytest.raises(ProtocolError, match="size"):
        DeviceConfig.unpack(head.pack(0, 4, 0) + bytes(8))
    with pytest.raises(ProtocolError, match="exceeds"):
        DeviceConfig.unpack(head.pack(0, 257, 0) + bytes(257))
    with pytest.raises(ProtocolError, match="runs past"):
        DeviceConfig.unpack(head.pack(250, 8, 0) + bytes(8))
    with pytest.raises(ProtocolError, match="flags"):
        DeviceConfig.unpack(head.pack(0, 4, 2) + bytes(4))
    with pytest.raises(ProtocolError, match="shorter"):
        DeviceConfig.unpack(b"\0" * 11)
    with pytest.raises(ValueError, match="size field"):
        DeviceConfig(0, 3, 0, b"ab")
    assert DeviceConfig.unpack(head.pack(0, 0, 0)) == DeviceConfig(0, 0, 0, b"")


def test_vring_addr_flags():
    with pytest.raises(ProtocolError, match="unknown bits"):
        VringAddr.unpack(struct.pack("=IIQQQQ", 0, 2, 0, 0, 0, 0))


def test_other_validation():
    with pytest.raises(ProtocolError):
        VringArea.unpack(struct.pack("=QQQ", 0x200, 0, 0))
    with pytest.raises(ProtocolError):
        IotlbMsg.unpack(struct.pack("=QQQBB6x", 0, 0, 0, 1, 9))
    with pytest.raises(ProtocolError):
        DeviceStateTransfer.unpack(struct.pack("=II", 0, 1))
    with pytest.raises(ProtocolError):
        Empty.unpack(b"\0")
    with pytest.raises(ValueError):
        U64(2**64)
    with pytest.raises(ValueError):
        VringState(True, 0)  # bools are not ring indices


def test_protocol_error_is_a_vhost_user_error():
    assert issubclass(ProtocolError, VhostUserError)


# -- ids, bits and tables

def test_request_ids_match_the_spec():
    spec = """GET_FEATURES SET_FEATURES SET_OWNER RESET_OWNER SET_MEM_TABLE SET_LOG_BASE
    SET_LOG_FD SET_VRING_NUM SET_VRING_ADDR SET_VRING_BASE GET_VRING_BASE SET_VRING_KICK
    SET_VRING_CALL SET_VRING_ERR GET_PROTOCOL_FEATURES SET_PROTOCOL_FEATURES GET_QUEUE_NUM
    SET_VRING_ENABLE SEND_RARP NET_SET_MTU SET_BACKEND_REQ_FD IOTLB_MSG SET_VRING_ENDIAN
    GET_CONFIG SET_CONFIG CREATE_CRYPTO_SESSION CLOSE_CRYPTO_SESSION POSTCOPY_ADVISE
    POSTCOPY_LISTEN POSTCOPY_END GET_INFLIGHT_FD SET_INFLIGHT_FD GPU_SET_SOCKET RESET_DEVICE
    VRING_KICK GET_MAX_MEM_SLOTS ADD_MEM_REG REM_MEM_REG SET_STATUS GET_STATUS
    GET_SHARED_OBJECT SET_DEVICE_STATE_FD CHECK_DEVICE_STATE""".split()
    assert [(r.name, r.value) for r in FrontendRequest] == [
        (name, i) for i, name in enumerate(spec, 1)]
    backend = """IOTLB_MSG CONFIG_CHANGE_MSG VRING_HOST_NOTIFIER_MSG VRING_CALL VRING_ERR
    SHARED_OBJECT_ADD SHARED_OBJECT_REMOVE SHARED_OBJECT_LOOKUP SHMEM_MAP SHMEM_UNMAP""".split()
    assert [(r.name, r.value) for r in BackendRequest] == [
        (name, i) for i, name in enumerate(backend, 1)]


def test_protocol_feature_bits():
    names = """MQ LOG_SHMFD RARP REPLY_ACK NET_MTU BACKEND_REQ CROSS_ENDIAN CRYPTO_SESSION
    PAGEFAULT CONFIG BACKEND_SEND_FD HOST_NOTIFIER INFLIGHT_SHMFD RESET_DEVICE
    INBAND_NOTIFICATIONS CONFIGURE_MEM_SLOTS STATUS XEN_MMAP SHARED_OBJECT DEVICE_STATE""".split()
    assert [(f.name, f.value) for f in ProtocolFeature] == [
        (name, 1 << bit) for bit, name in enumerate(names)]
    # qemu-storage-daemon's offer decodes without loss
    assert int(ProtocolFeature(0x8F2B)) == 0x8F2B


def test_transport_bits():
    assert VHOST_USER_F_PROTOCOL_FEATURES == 30
    assert PROTOCOL_FEATURES_MASK == 0x4000_0000
    assert VHOST_F_LOG_ALL == 26
    assert VIRTIO_F_VERSION_1 == 32


def test_request_tables():
    assert set(FRONTEND_REQUESTS) == set(FrontendRequest)
    assert set(BACKEND_REQUESTS) == set(BackendRequest)
    # the requests with a reply of their own, per the spec
    with_reply = {r for r, layout in FRONTEND_REQUESTS.items() if layout.reply is not None}
    assert {FrontendRequest.GET_FEATURES, FrontendRequest.GET_PROTOCOL_FEATURES,
            FrontendRequest.GET_VRING_BASE, FrontendRequest.GET_QUEUE_NUM,
            FrontendRequest.GET_CONFIG, FrontendRequest.GET_MAX_MEM_SLOTS,
            FrontendRequest.GET_STATUS, FrontendRequest.GET_INFLIGHT_FD} <= with_reply
    for r in (FrontendRequest.SET_FEATURES, FrontendRequest.SET_OWNER,
              FrontendRequest.SET_MEM_TABLE, FrontendRequest.SET_VRING_KICK,
              FrontendRequest.ADD_MEM_REG, FrontendRequest.SET_STATUS):
        assert FRONTEND_REQUESTS[r].reply is None
    assert FRONTEND_REQUESTS[FrontendRequest.GET_VRING_BASE].reply is VringState
    assert FRONTEND_REQUESTS[FrontendRequest.SET_VRING_CALL].request is VringFd
    assert FRONTEND_REQUESTS[FrontendRequest.SET_STATUS].gate is ProtocolFeature.STATUS
    assert BACKEND_REQUESTS[BackendRequest.VRING_CALL].request is VringState


def test_inflight_requests():
    """GET_INFLIGHT_FD answers an Inflight of its own (with the memfd);
    SET_INFLIGHT_FD has none; both need INFLIGHT_SHMFD (bit 12)."""
    get = FRONTEND_REQUESTS[FrontendRequest.GET_INFLIGHT_FD]
    put = FRONTEND_REQUESTS[FrontendRequest.SET_INFLIGHT_FD]
    assert (FrontendRequest.GET_INFLIGHT_FD, FrontendRequest.SET_INFLIGHT_FD) == (31, 32)
    assert (get.request, get.reply, get.gate) == (Inflight, Inflight,
                                                  ProtocolFeature.INFLIGHT_SHMFD)
    assert (put.request, put.reply, put.gate) == (Inflight, None,
                                                  ProtocolFeature.INFLIGHT_SHMFD)
    assert ProtocolFeature.INFLIGHT_SHMFD == 1 << 12
    # The 4 bytes of C tail padding are written as zeros and ignored when read.
    assert Inflight.unpack(struct.pack("=QQHH", 4160, 0, 1, 256) + b"\xff" * 4) == \
        Inflight(4160, 0, 1, 256)
    with pytest.raises(ValueError):
        Inflight(0, 0, 0x10000, 1)


def test_message_helpers():
    m = Message.make_request(FrontendRequest.SET_VRING_KICK, VringFd(0).pack(), (7,),
                             need_reply=True)
    assert (m.request, m.flags, m.fds) == (12, 0x9, (7,))
    assert m.need_reply and not m.is_reply
    assert m.pack_header() == struct.pack("=III", 12, 9, 8)
    assert m.decode(VringFd) == VringFd(0)
    r = Message.make_reply(11, VringState(0, 5).pack())
    assert r.flags == 0x5 and r.is_reply
    with pytest.raises(ValueError):
        Message(1, 1, b"", tuple(range(MAX_FDS + 1)))
    with pytest.raises(ValueError):
        Message(1, 1, bytes(MAX_PAYLOAD_SIZE + 1))
    assert ack_payload(0) == bytes(8)
    assert request_name(FrontendRequest, 39) == "SET_STATUS"
    assert request_name(BackendRequest, 99) == "request 99"
