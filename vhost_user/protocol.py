"""The vhost-user wire format: request ids, feature bits, header, payloads.

Pure codec, no I/O. Follows QEMU's docs/interop/vhost-user.rst. Every number
on the wire is in the machine's native byte order:

    header   u32 request, u32 flags, u32 size                  12 bytes
    flags    bits 0-1 version (1), bit 2 reply, bit 3 need-reply
    payload  ``size`` bytes, layout chosen by the request id

Each payload class is a frozen attrs class with ``pack() -> bytes`` and
``unpack(buf) -> instance``. Constructing one with an out-of-range field
raises ``ValueError`` (a bug in our own code); ``unpack`` checks the exact
size and every field and raises ``ProtocolError`` (a malformed message from
the other side). Explicit padding fields must be zero; the implicit tail
padding of a C struct (``Inflight``, ``IotlbMsg``) is written as zeros and
ignored when read.
"""

from __future__ import annotations

import enum
import struct
from typing import ClassVar, Protocol, TypeVar

import attrs

# --------------------------------------------------------------------------
# Errors


class VhostUserError(Exception):
    """Base of every error this package raises."""


class ProtocolError(VhostUserError):
    """The other side sent something malformed, unexpected or untrue."""


class DaemonUnavailable(VhostUserError):
    """Nobody answers on the vhost-user socket path."""


class ConnectionLost(VhostUserError):
    """The daemon closed the connection, or it is no longer usable."""


class DaemonTimeout(VhostUserError):
    """The daemon did not answer in time. ``received`` counts the bytes of
    the awaited message that did arrive (0: the daemon stayed silent)."""

    def __init__(self, message: str, *, received: int = 0) -> None:
        super().__init__(message)
        self.received = received


# --------------------------------------------------------------------------
# Request ids


class FrontendRequest(enum.IntEnum):
    """Requests the front-end sends on the main socket."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class BackendRequest(enum.IntEnum):
    """Requests the back-end sends on the channel given by SET_BACKEND_REQ_FD."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8
    SHMEM_MAP = 9
    SHMEM_UNMAP = 10


def request_name(kind: type[enum.IntEnum], request: int) -> str:
    """``SET_VRING_NUM`` for a known id, ``request 99`` otherwise."""
    try:
        return kind(request).name
    except ValueError:
        return f"request {request}"


# --------------------------------------------------------------------------
# Feature bits


class ProtocolFeature(enum.IntFlag):
    """vhost-user protocol feature bits (GET/SET_PROTOCOL_FEATURES)."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    NET_MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16
    XEN_MMAP = 1 << 17
    SHARED_OBJECT = 1 << 18
    DEVICE_STATE = 1 << 19


class VirtioFeature(enum.IntEnum):
    """Feature BIT NUMBERS (not masks) of the transport range, as in the C
    headers. ``1 << VirtioFeature.VERSION_1`` is the mask."""

    NOTIFY_ON_EMPTY = 24
    ANY_LAYOUT = 27
    RING_INDIRECT_DESC = 28
    RING_EVENT_IDX = 29
    VERSION_1 = 32
    ACCESS_PLATFORM = 33
    RING_PACKED = 34
    IN_ORDER = 35
    ORDER_PLATFORM = 36
    SR_IOV = 37
    NOTIFICATION_DATA = 38
    NOTIF_CONFIG_DATA = 39
    RING_RESET = 40


# vhost's own bits in the virtio feature word: they describe the vhost-user
# connection, never the device, and a driver must never see them.
VHOST_F_LOG_ALL = 26
VHOST_USER_F_PROTOCOL_FEATURES = 30
VIRTIO_F_VERSION_1 = VirtioFeature.VERSION_1.value

VHOST_F_LOG_ALL_MASK = 1 << VHOST_F_LOG_ALL
PROTOCOL_FEATURES_MASK = 1 << VHOST_USER_F_PROTOCOL_FEATURES
VHOST_ONLY_FEATURES_MASK = VHOST_F_LOG_ALL_MASK | PROTOCOL_FEATURES_MASK

# virtio device status bits (virtio 1.2, 2.1), for SET_STATUS.
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_NEEDS_RESET = 64
STATUS_FAILED = 128


# --------------------------------------------------------------------------
# Header

HEADER = struct.Struct("=III")
HEADER_SIZE = HEADER.size  # 12

VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
KNOWN_FLAGS = VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY

REQUEST_FLAGS = VERSION  # 0x1
REPLY_FLAGS = VERSION | FLAG_REPLY  # 0x5

# At most this many fds ride on one message (VHOST_MEMORY_BASELINE_NREGIONS).
MAX_FDS = 8
# The largest legal payload is far smaller (a 268-byte config message, a
# 264-byte memory table); anything beyond this is a broken or hostile peer.
MAX_PAYLOAD_SIZE = 4096 + 256

MAX_MEMORY_REGIONS = 8
MAX_CONFIG_SIZE = 256

_U8 = 0xFF
_U16 = 0xFFFF
_U32 = 0xFFFF_FFFF
_U64 = 0xFFFF_FFFF_FFFF_FFFF


def _check_uint(what: str, value: object, limit: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be an int, not {type(value).__name__}")
    if not 0 <= value <= limit:
        raise ValueError(f"{what} {value:#x} out of range 0..{limit:#x}")


def _uint(limit: int):
    def validate(instance: object, attribute: attrs.Attribute, value: object) -> None:
        _check_uint(f"{type(instance).__name__}.{attribute.name}", value, limit)

    return validate


_u8 = _uint(_U8)
_u16 = _uint(_U16)
_u32 = _uint(_U32)
_u64 = _uint(_U64)


@attrs.frozen
class Header:
    request: int = attrs.field(validator=_u32)
    flags: int = attrs.field(validator=_u32)
    size: int = attrs.field(validator=_u32)

    def __attrs_post_init__(self) -> None:
        if self.flags & VERSION_MASK != VERSION:
            raise ValueError(f"header version {self.flags & VERSION_MASK} (expected {VERSION})")
        if self.flags & ~KNOWN_FLAGS:
            raise ValueError(f"header flags {self.flags:#x} have unknown bits set")
        if self.size > MAX_PAYLOAD_SIZE:
            raise ValueError(f"payload size {self.size} exceeds the limit of {MAX_PAYLOAD_SIZE}")

    def pack(self) -> bytes:
        return HEADER.pack(self.request, self.flags, self.size)

    @classmethod
    def unpack(cls, buf: bytes) -> Header:
        if len(buf) != HEADER_SIZE:
            raise ProtocolError(f"header is {len(buf)} bytes, expected {HEADER_SIZE}")
        request, flags, size = HEADER.unpack(buf)
        try:
            return cls(request, flags, size)
        except ValueError as e:
            raise ProtocolError(f"bad header for {request=}: {e}") from None

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)


# --------------------------------------------------------------------------
# Payloads

P = TypeVar("P", bound="Payload")


class Payload(Protocol):
    def pack(self) -> bytes: ...

    @classmethod
    def unpack(cls: type[P], buf: bytes) -> P: ...


def _fixed_unpack(cls: type, layout: struct.Struct, buf: bytes) -> tuple:
    if len(buf) != layout.size:
        raise ProtocolError(f"{cls.__name__} payload is {len(buf)} bytes, expected {layout.size}")
    return layout.unpack(buf)


def _build(cls: type[P], *args: object) -> P:
    try:
        return cls(*args)
    except ValueError as e:
        raise ProtocolError(f"malformed {cls.__name__} payload: {e}") from None


class _Struct:
    """A payload that is exactly one C struct: the attrs fields, in order,
    are the struct's fields (``LAYOUT``); nothing else may follow."""

    __slots__ = ()
    LAYOUT: ClassVar[struct.Struct]

    def pack(self) -> bytes:
        return self.LAYOUT.pack(*attrs.astuple(self, recurse=False))

    @classmethod
    def unpack(cls: type[P], buf: bytes) -> P:
        return _build(cls, *_fixed_unpack(cls, cls.LAYOUT, buf))


@attrs.frozen
class Empty:
    """No payload at all (size 0)."""

    SIZE: ClassVar[int] = 0

    def pack(self) -> bytes:
        return b""

    @classmethod
    def unpack(cls, buf: bytes) -> Empty:
        if buf:
            raise ProtocolError(f"expected no payload, got {len(buf)} bytes")
        return cls()


@attrs.frozen
class Raw:
    """A payload whose layout this package does not model."""

    data: bytes = attrs.field(converter=bytes)

    def __attrs_post_init__(self) -> None:
        if len(self.data) > MAX_PAYLOAD_SIZE:
            raise ValueError(f"raw payload of {len(self.data)} bytes exceeds {MAX_PAYLOAD_SIZE}")

    def pack(self) -> bytes:
        return self.data

    @classmethod
    def unpack(cls, buf: bytes) -> Raw:
        return _build(cls, buf)


_U64_LAYOUT = struct.Struct("=Q")


@attrs.frozen
class U64(_Struct):
    value: int = attrs.field(validator=_u64)

    LAYOUT = _U64_LAYOUT
    SIZE: ClassVar[int] = _U64_LAYOUT.size


_VRING_STATE = struct.Struct("=II")


@attrs.frozen
class VringState(_Struct):
    """struct vhost_vring_state: SET_VRING_NUM/BASE/ENABLE, GET_VRING_BASE."""

    index: int = attrs.field(validator=_u32)
    num: int = attrs.field(validator=_u32)

    LAYOUT = _VRING_STATE
    SIZE: ClassVar[int] = _VRING_STATE.size


VRING_F_LOG = 0x1  # VHOST_VRING_F_LOG in vhost_vring_addr.flags
_VRING_ADDR = struct.Struct("=IIQQQQ")


@attrs.frozen
class VringAddr(_Struct):
    """struct vhost_vring_addr. The wire order is index, flags, desc, USED,
    AVAIL, log; desc/used/avail are front-end user addresses (IOVAs with
    ACCESS_PLATFORM), log is a guest-physical address."""

    index: int = attrs.field(validator=_u32)
    flags: int = attrs.field(validator=_u32)
    desc: int = attrs.field(validator=_u64)
    used: int = attrs.field(validator=_u64)
    avail: int = attrs.field(validator=_u64)
    log: int = attrs.field(validator=_u64)

    LAYOUT = _VRING_ADDR
    SIZE: ClassVar[int] = _VRING_ADDR.size  # 40

    def __attrs_post_init__(self) -> None:
        if self.flags & ~VRING_F_LOG:
            raise ValueError(f"vring address flags {self.flags:#x} have unknown bits set")


VRING_IDX_MASK = 0xFF
VRING_NOFD_FLAG = 0x100


@attrs.frozen
class VringFd:
    """The u64 of SET_VRING_KICK/CALL/ERR: bits 0-7 ring index, bit 8 set
    when no fd rides along. Every other bit must be clear."""

    index: int = attrs.field(validator=_u8)
    no_fd: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))

    SIZE: ClassVar[int] = _U64_LAYOUT.size

    def pack(self) -> bytes:
        return _U64_LAYOUT.pack(self.index | (VRING_NOFD_FLAG if self.no_fd else 0))

    @classmethod
    def unpack(cls, buf: bytes) -> VringFd:
        (value,) = _fixed_unpack(cls, _U64_LAYOUT, buf)
        if value & ~(VRING_IDX_MASK | VRING_NOFD_FLAG):
            raise ProtocolError(f"vring fd word {value:#x} has bits other than 0-8 set")
        return cls(value & VRING_IDX_MASK, bool(value & VRING_NOFD_FLAG))


_REGION = struct.Struct("=QQQQ")


@attrs.frozen
class MemoryRegion(_Struct):
    """One region of a memory table: guest-physical address, size, the
    front-end's user address of it, and its offset in the fd."""

    gpa: int = attrs.field(validator=_u64)
    size: int = attrs.field(validator=_u64)
    user_addr: int = attrs.field(validator=_u64)
    mmap_offset: int = attrs.field(validator=_u64)

    LAYOUT = _REGION
    SIZE: ClassVar[int] = _REGION.size  # 32

    def __attrs_post_init__(self) -> None:
        if self.size == 0:
            raise ValueError("memory region of size 0")
        for name in ("gpa", "user_addr", "mmap_offset"):
            if getattr(self, name) + self.size - 1 > _U64:
                raise ValueError(f"memory region {name} {getattr(self, name):#x} + size "
                                 f"{self.size:#x} wraps around 2**64")


_TABLE_HEAD = struct.Struct("=II")


def _regions_tuple(value: object) -> tuple[MemoryRegion, ...]:
    return tuple(value)  # type: ignore[arg-type]


@attrs.frozen
class MemoryTable:
    """SET_MEM_TABLE: u32 count, u32 padding, then ``count`` regions."""

    regions: tuple[MemoryRegion, ...] = attrs.field(converter=_regions_tuple)

    def __attrs_post_init__(self) -> None:
        if len(self.regions) > MAX_MEMORY_REGIONS:
            raise ValueError(f"{len(self.regions)} memory regions, at most "
                             f"{MAX_MEMORY_REGIONS} fit in one table")
        for r in self.regions:
            if not isinstance(r, MemoryRegion):
                raise ValueError(f"memory table entry {r!r} is not a MemoryRegion")

    def pack(self) -> bytes:
        return _TABLE_HEAD.pack(len(self.regions), 0) + b"".join(r.pack() for r in self.regions)

    @classmethod
    def unpack(cls, buf: bytes) -> MemoryTable:
        if len(buf) < _TABLE_HEAD.size:
            raise ProtocolError(f"memory table payload is {len(buf)} bytes, shorter than its "
                                f"{_TABLE_HEAD.size}-byte head")
        count, padding = _TABLE_HEAD.unpack_from(buf)
        if count > MAX_MEMORY_REGIONS:
            raise ProtocolError(f"memory table claims {count} regions, at most "
                                f"{MAX_MEMORY_REGIONS} are allowed")
        if padding:
            raise ProtocolError(f"memory table padding is {padding:#x}, must be 0")
        expected = _TABLE_HEAD.size + count * MemoryRegion.SIZE
        if len(buf) != expected:
            raise ProtocolError(f"memory table with {count} regions is {len(buf)} bytes, "
                                f"expected {expected}")
        regions = tuple(
            MemoryRegion.unpack(buf[off:off + MemoryRegion.SIZE])
            for off in range(_TABLE_HEAD.size, expected, MemoryRegion.SIZE)
        )
        return cls(regions)


_PAD64 = struct.Struct("=Q")


@attrs.frozen
class SingleMemoryRegion:
    """ADD_MEM_REG / REM_MEM_REG: u64 padding, then one region (40 bytes)."""

    region: MemoryRegion = attrs.field(validator=attrs.validators.instance_of(MemoryRegion))

    SIZE: ClassVar[int] = _PAD64.size + MemoryRegion.SIZE  # 40

    def pack(self) -> bytes:
        return _PAD64.pack(0) + self.region.pack()

    @classmethod
    def unpack(cls, buf: bytes) -> SingleMemoryRegion:
        if len(buf) != cls.SIZE:
            raise ProtocolError(f"single memory region payload is {len(buf)} bytes, "
                                f"expected {cls.SIZE}")
        (padding,) = _PAD64.unpack_from(buf)
        if padding:
            raise ProtocolError(f"single memory region padding is {padding:#x}, must be 0")
        return cls(MemoryRegion.unpack(buf[_PAD64.size:]))


CONFIG_FLAG_WRITABLE = 0  # VHOST_SET_CONFIG_TYPE_FRONTEND
CONFIG_FLAG_MIGRATION = 1
_CONFIG_HEAD = struct.Struct("=III")
CONFIG_HEADER_SIZE = _CONFIG_HEAD.size  # 12


@attrs.frozen
class DeviceConfig:
    """GET_CONFIG / SET_CONFIG: u32 offset, u32 size, u32 flags, data."""

    offset: int = attrs.field(validator=_u32)
    size: int = attrs.field(validator=_u32)
    flags: int = attrs.field(validator=_u32)
    data: bytes = attrs.field(converter=bytes)

    def __attrs_post_init__(self) -> None:
        if self.size != len(self.data):
            raise ValueError(f"config size field {self.size} but {len(self.data)} data bytes")
        if self.size > MAX_CONFIG_SIZE:
            raise ValueError(f"config size {self.size} exceeds {MAX_CONFIG_SIZE}")
        if self.offset + self.size > MAX_CONFIG_SIZE:
            raise ValueError(f"config window {self.offset}+{self.size} runs past "
                             f"{MAX_CONFIG_SIZE} bytes")
        if self.flags not in (CONFIG_FLAG_WRITABLE, CONFIG_FLAG_MIGRATION):
            raise ValueError(f"config flags {self.flags:#x} are neither 0 nor 1")

    def pack(self) -> bytes:
        return _CONFIG_HEAD.pack(self.offset, self.size, self.flags) + self.data

    @classmethod
    def unpack(cls, buf: bytes) -> DeviceConfig:
        if len(buf) < CONFIG_HEADER_SIZE:
            raise ProtocolError(f"config payload is {len(buf)} bytes, shorter than its "
                                f"{CONFIG_HEADER_SIZE}-byte head")
        offset, size, flags = _CONFIG_HEAD.unpack_from(buf)
        data = buf[CONFIG_HEADER_SIZE:]
        if size != len(data):
            raise ProtocolError(f"config payload says size {size} but carries {len(data)} bytes")
        return _build(cls, offset, size, flags, data)


_INFLIGHT = struct.Struct("=QQHH4x")


@attrs.frozen
class Inflight(_Struct):
    """GET/SET_INFLIGHT_FD: u64 mmap_size, u64 mmap_offset, u16 num_queues,
    u16 queue_size, 4 bytes of struct tail padding (24 bytes)."""

    mmap_size: int = attrs.field(validator=_u64)
    mmap_offset: int = attrs.field(validator=_u64)
    num_queues: int = attrs.field(validator=_u16)
    queue_size: int = attrs.field(validator=_u16)

    LAYOUT = _INFLIGHT
    SIZE: ClassVar[int] = _INFLIGHT.size  # 24


_LOG = struct.Struct("=QQ")


@attrs.frozen
class Log(_Struct):
    """SET_LOG_BASE with LOG_SHMFD: u64 mmap_size, u64 mmap_offset."""

    mmap_size: int = attrs.field(validator=_u64)
    mmap_offset: int = attrs.field(validator=_u64)

    LAYOUT = _LOG
    SIZE: ClassVar[int] = _LOG.size


IOTLB_MISS = 1
IOTLB_UPDATE = 2
IOTLB_INVALIDATE = 3
IOTLB_ACCESS_FAIL = 4
_IOTLB = struct.Struct("=QQQBB6x")


@attrs.frozen
class IotlbMsg(_Struct):
    """struct vhost_iotlb_msg: iova, size, uaddr, u8 perm, u8 type (32 bytes)."""

    iova: int = attrs.field(validator=_u64)
    size: int = attrs.field(validator=_u64)
    uaddr: int = attrs.field(validator=_u64)
    perm: int = attrs.field(validator=_uint(3))
    type: int = attrs.field(validator=_u8)

    LAYOUT = _IOTLB
    SIZE: ClassVar[int] = _IOTLB.size

    def __attrs_post_init__(self) -> None:
        if not IOTLB_MISS <= self.type <= IOTLB_ACCESS_FAIL:
            raise ValueError(f"IOTLB message type {self.type} is not 1..4")


_VRING_AREA = struct.Struct("=QQQ")


@attrs.frozen
class VringArea:
    """VRING_HOST_NOTIFIER_MSG: u64 index/no-fd word, u64 size, u64 offset."""

    index: int = attrs.field(validator=_u8)
    no_fd: bool = attrs.field(validator=attrs.validators.instance_of(bool))
    size: int = attrs.field(validator=_u64)
    offset: int = attrs.field(validator=_u64)

    SIZE: ClassVar[int] = _VRING_AREA.size

    def pack(self) -> bytes:
        word = self.index | (VRING_NOFD_FLAG if self.no_fd else 0)
        return _VRING_AREA.pack(word, self.size, self.offset)

    @classmethod
    def unpack(cls, buf: bytes) -> VringArea:
        word, size, offset = _fixed_unpack(cls, _VRING_AREA, buf)
        if word & ~(VRING_IDX_MASK | VRING_NOFD_FLAG):
            raise ProtocolError(f"vring area word {word:#x} has bits other than 0-8 set")
        return cls(word & VRING_IDX_MASK, bool(word & VRING_NOFD_FLAG), size, offset)


@attrs.frozen
class SharedObject:
    """SHARED_OBJECT_* and GET_SHARED_OBJECT: a 16-byte UUID."""

    uuid: bytes = attrs.field(converter=bytes)

    SIZE: ClassVar[int] = 16

    def __attrs_post_init__(self) -> None:
        if len(self.uuid) != self.SIZE:
            raise ValueError(f"shared object UUID is {len(self.uuid)} bytes, expected 16")

    def pack(self) -> bytes:
        return self.uuid

    @classmethod
    def unpack(cls, buf: bytes) -> SharedObject:
        if len(buf) != cls.SIZE:
            raise ProtocolError(f"SharedObject payload is {len(buf)} bytes, expected {cls.SIZE}")
        return cls(buf)


_STATE_TRANSFER = struct.Struct("=II")


@attrs.frozen
class DeviceStateTransfer(_Struct):
    """SET_DEVICE_STATE_FD: u32 direction (0 save, 1 load), u32 phase (0 stopped)."""

    direction: int = attrs.field(validator=_uint(1))
    phase: int = attrs.field(validator=_uint(0))

    LAYOUT = _STATE_TRANSFER
    SIZE: ClassVar[int] = _STATE_TRANSFER.size

# --------------------------------------------------------------------------
# Which payload each request carries


@attrs.frozen
class RequestLayout:
    """The payload class of a request, and of its reply when it has one of
    its own (``reply is None``: the only possible answer is a REPLY_ACK u64
    the front-end asked for with need-reply). ``gate`` is what must hold
    before the request may be sent: a negotiated ``ProtocolFeature``, one of
    the two bit-30 gates below, or None."""

    request: type
    reply: type | None
    gate: ProtocolFeature | str | None = None


# Virtio bit 30 present in GET_FEATURES (the protocol-feature messages).
BIT30_OFFERED = "VHOST_USER_F_PROTOCOL_FEATURES offered"
# Virtio bit 30 acknowledged with SET_FEATURES (SET_VRING_ENABLE).
BIT30_ACKED = "VHOST_USER_F_PROTOCOL_FEATURES acknowledged"

_F = FrontendRequest
_PF = ProtocolFeature

FRONTEND_REQUESTS: dict[FrontendRequest, RequestLayout] = {
    _F.GET_FEATURES: RequestLayout(Empty, U64),
    _F.SET_FEATURES: RequestLayout(U64, None),
    _F.SET_OWNER: RequestLayout(Empty, None),
    _F.RESET_OWNER: RequestLayout(Empty, None),
    # Postcopy makes the back-end answer with its mapping; not modelled.
    _F.SET_MEM_TABLE: RequestLayout(MemoryTable, None),
    # Answers a u64 only with LOG_SHMFD.
    _F.SET_LOG_BASE: RequestLayout(Log, None, _PF.LOG_SHMFD),
    _F.SET_LOG_FD: RequestLayout(Empty, None),
    _F.SET_VRING_NUM: RequestLayout(VringState, None),
    _F.SET_VRING_ADDR: RequestLayout(VringAddr, None),
    _F.SET_VRING_BASE: RequestLayout(VringState, None),
    _F.GET_VRING_BASE: RequestLayout(VringState, VringState),
    _F.SET_VRING_KICK: RequestLayout(VringFd, None),
    _F.SET_VRING_CALL: RequestLayout(VringFd, None),
    _F.SET_VRING_ERR: RequestLayout(VringFd, None),
    _F.GET_PROTOCOL_FEATURES: RequestLayout(Empty, U64, BIT30_OFFERED),
    _F.SET_PROTOCOL_FEATURES: RequestLayout(U64, None, BIT30_OFFERED),
    _F.GET_QUEUE_NUM: RequestLayout(Empty, U64, _PF.MQ),
    _F.SET_VRING_ENABLE: RequestLayout(VringState, None, BIT30_ACKED),
    _F.SEND_RARP: RequestLayout(U64, None, _PF.RARP),
    _F.NET_SET_MTU: RequestLayout(U64, None, _PF.NET_MTU),
    _F.SET_BACKEND_REQ_FD: RequestLayout(Empty, None, _PF.BACKEND_REQ),
    _F.IOTLB_MSG: RequestLayout(IotlbMsg, U64),
    _F.SET_VRING_ENDIAN: RequestLayout(VringState, None, _PF.CROSS_ENDIAN),
    _F.GET_CONFIG: RequestLayout(DeviceConfig, DeviceConfig, _PF.CONFIG),
    _F.SET_CONFIG: RequestLayout(DeviceConfig, None, _PF.CONFIG),
    _F.CREATE_CRYPTO_SESSION: RequestLayout(Raw, Raw, _PF.CRYPTO_SESSION),
    _F.CLOSE_CRYPTO_SESSION: RequestLayout(U64, None, _PF.CRYPTO_SESSION),
    # The reply is empty and carries the userfaultfd.
    _F.POSTCOPY_ADVISE: RequestLayout(Empty, Empty, _PF.PAGEFAULT),
    _F.POSTCOPY_LISTEN: RequestLayout(Empty, None, _PF.PAGEFAULT),
    _F.POSTCOPY_END: RequestLayout(Empty, U64, _PF.PAGEFAULT),
    _F.GET_INFLIGHT_FD: RequestLayout(Inflight, Inflight, _PF.INFLIGHT_SHMFD),
    _F.SET_INFLIGHT_FD: RequestLayout(Inflight, None, _PF.INFLIGHT_SHMFD),
    _F.GPU_SET_SOCKET: RequestLayout(Empty, None),
    _F.RESET_DEVICE: RequestLayout(Empty, None, _PF.RESET_DEVICE),
    _F.VRING_KICK: RequestLayout(VringState, None, _PF.INBAND_NOTIFICATIONS),
    _F.GET_MAX_MEM_SLOTS: RequestLayout(Empty, U64, _PF.CONFIGURE_MEM_SLOTS),
    # Answers with the region only in postcopy; not modelled.
    _F.ADD_MEM_REG: RequestLayout(SingleMemoryRegion, None, _PF.CONFIGURE_MEM_SLOTS),
    _F.REM_MEM_REG: RequestLayout(SingleMemoryRegion, None, _PF.CONFIGURE_MEM_SLOTS),
    _F.SET_STATUS: RequestLayout(U64, None, _PF.STATUS),
    _F.GET_STATUS: RequestLayout(Empty, U64, _PF.STATUS),
    _F.GET_SHARED_OBJECT: RequestLayout(SharedObject, U64, _PF.SHARED_OBJECT),
    _F.SET_DEVICE_STATE_FD: RequestLayout(DeviceStateTransfer, U64, _PF.DEVICE_STATE),
    _F.CHECK_DEVICE_STATE: RequestLayout(Empty, U64, _PF.DEVICE_STATE),
}

_B = BackendRequest

# For back-end requests ``reply`` is always None: the front-end answers a
# u64 (0 = success) only when the back-end set need-reply.
BACKEND_REQUESTS: dict[BackendRequest, RequestLayout] = {
    _B.IOTLB_MSG: RequestLayout(IotlbMsg, None),
    _B.CONFIG_CHANGE_MSG: RequestLayout(Empty, None, _PF.CONFIG),
    _B.VRING_HOST_NOTIFIER_MSG: RequestLayout(VringArea, None, _PF.HOST_NOTIFIER),
    # The spec gives the in-band call/err a vring state (index, num = 0), and
    # libvhost-user sends exactly that.
    _B.VRING_CALL: RequestLayout(VringState, None, _PF.INBAND_NOTIFICATIONS),
    _B.VRING_ERR: RequestLayout(VringState, None, _PF.INBAND_NOTIFICATIONS),
    _B.SHARED_OBJECT_ADD: RequestLayout(SharedObject, None, _PF.SHARED_OBJECT),
    _B.SHARED_OBJECT_REMOVE: RequestLayout(SharedObject, None, _PF.SHARED_OBJECT),
    _B.SHARED_OBJECT_LOOKUP: RequestLayout(SharedObject, None, _PF.SHARED_OBJECT),
    _B.SHMEM_MAP: RequestLayout(Raw, None),
    _B.SHMEM_UNMAP: RequestLayout(Raw, None),
}

assert set(FRONTEND_REQUESTS) == set(FrontendRequest)
assert set(BACKEND_REQUESTS) == set(BackendRequest)


# --------------------------------------------------------------------------
# Whole messages


@attrs.frozen
class Message:
    """One framed message: header fields, payload bytes and the fds that
    arrived with it (owned by whoever holds the message)."""

    request: int = attrs.field(validator=_u32)
    flags: int = attrs.field(validator=_u32)
    payload: bytes = attrs.field(default=b"", converter=bytes)
    fds: tuple[int, ...] = attrs.field(default=(), converter=tuple)

    def __attrs_post_init__(self) -> None:
        Header(self.request, self.flags, len(self.payload))  # validates
        if len(self.fds) > MAX_FDS:
            raise ValueError(f"{len(self.fds)} fds on one message, at most {MAX_FDS}")

    @classmethod
    def make_request(cls, request: int, payload: bytes = b"", fds: tuple[int, ...] = (),
                     *, need_reply: bool = False) -> Message:
        flags = REQUEST_FLAGS | (FLAG_NEED_REPLY if need_reply else 0)
        return cls(int(request), flags, payload, fds)

    @classmethod
    def make_reply(cls, request: int, payload: bytes = b"") -> Message:
        return cls(int(request), REPLY_FLAGS, payload)

    @property
    def header(self) -> Header:
        return Header(self.request, self.flags, len(self.payload))

    def pack_header(self) -> bytes:
        return HEADER.pack(self.request, self.flags, len(self.payload))

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    def decode(self, cls: type[P]) -> P:
        return cls.unpack(self.payload)


def ack_payload(value: int) -> bytes:
    """The u64 answered to a need-reply request: 0 success, else failure."""
    return U64(value).pack()
