"""The Xen IOREQ ABI: shared-page layouts, states and dm_op numbers.

Pure data, no I/O. Layouts follow xen/include/public/hvm/ioreq.h and
dm_op.h for LP64 little-endian (Arm64 and x86-64 alike):

    struct ioreq {              offset
        uint64_t addr;          0
        uint64_t data;          8
        uint32_t count;         16
        uint32_t size;          20
        uint32_t vp_eport;      24
        uint16_t _pad0;         28
        uint8_t  state:4;       30  bits 0-3
        uint8_t  data_is_ptr:1; 30  bit 4
        uint8_t  dir:1;         30  bit 5 (1 = read)
        uint8_t  df:1;          30  bit 6
        uint8_t  _pad1:1;
        uint8_t  type;          31
    };

The shared ioreq page is ``struct ioreq vcpu_ioreq[]``: vCPU *i* at 32 * i.
The buffered page is ``{u32 read_pointer; u32 write_pointer;
buf_ioreq[511]}`` with 8-byte entries.
"""

from __future__ import annotations

import enum
import struct

import attrs

PAGE_SIZE = 4096

IOREQ_SIZE = 32
IOREQ_STRUCT = struct.Struct("<QQIIIHBB")
assert IOREQ_STRUCT.size == IOREQ_SIZE

# Field offsets inside one slot, for in-place reads and writes on the page.
OFF_ADDR = 0
OFF_DATA = 8
OFF_COUNT = 16
OFF_SIZE = 20
OFF_VP_EPORT = 24
OFF_FLAGS = 30
OFF_TYPE = 31

# Bits of the flags byte at offset 30.
STATE_MASK = 0x0F
FLAG_DATA_IS_PTR = 0x10
FLAG_DIR_READ = 0x20
FLAG_DF = 0x40

# One page holds this many vCPU slots; Xen refuses more vCPUs per server.
MAX_VCPUS_PER_PAGE = PAGE_SIZE // IOREQ_SIZE


class IoreqState(enum.IntEnum):
    NONE = 0
    IOREQ_READY = 1
    INPROCESS = 2
    IORESP_READY = 3


class IoreqType(enum.IntEnum):
    PIO = 0
    COPY = 1  # MMIO
    PCI_CONFIG = 2
    TIMEOFFSET = 7
    INVALIDATE = 8


# Range types for map_io_range_to_ioreq_server.
XEN_DMOP_IO_RANGE_PORT = 0
XEN_DMOP_IO_RANGE_MEMORY = 1
XEN_DMOP_IO_RANGE_PCI = 2

# Resource type and frame indices for XENMEM_acquire_resource.
XENMEM_RESOURCE_IOREQ_SERVER = 0
XENMEM_RESOURCE_IOREQ_SERVER_FRAME_BUFIOREQ = 0
XENMEM_RESOURCE_IOREQ_SERVER_FRAME_IOREQ = 1  # + vCPU page index


class DmOp(enum.IntEnum):
    CREATE_IOREQ_SERVER = 1
    GET_IOREQ_SERVER_INFO = 2
    MAP_IO_RANGE_TO_IOREQ_SERVER = 3
    UNMAP_IO_RANGE_FROM_IOREQ_SERVER = 4
    SET_IOREQ_SERVER_STATE = 5
    DESTROY_IOREQ_SERVER = 6
    SET_IRQ_LEVEL = 19
    NR_VCPUS = 20


# create_ioreq_server handle_bufioreq values.
HVM_IOREQSRV_BUFIOREQ_OFF = 0
HVM_IOREQSRV_BUFIOREQ_LEGACY = 1
HVM_IOREQSRV_BUFIOREQ_ATOMIC = 2


def size_mask(size: int) -> int:
    """The value mask for an access of ``size`` bytes (1, 2, 4 or 8)."""
    return (1 << (8 * size)) - 1


@attrs.frozen(slots=True)
class Ioreq:
    """One decoded ioreq slot (a snapshot; the page itself stays the truth)."""

    addr: int
    data: int
    count: int
    size: int
    vp_eport: int
    state: IoreqState | int
    data_is_ptr: bool
    is_read: bool
    df: bool
    type: IoreqType | int

    @classmethod
    def unpack(cls, buf, offset: int = 0) -> "Ioreq":
        addr, data, count, size, vp_eport, _pad, flags, type_ = IOREQ_STRUCT.unpack_from(buf, offset)
        return cls(
            addr=addr,
            data=data,
            count=count,
            size=size,
            vp_eport=vp_eport,
            state=_maybe_enum(IoreqState, flags & STATE_MASK),
            data_is_ptr=bool(flags & FLAG_DATA_IS_PTR),
            is_read=bool(flags & FLAG_DIR_READ),
            df=bool(flags & FLAG_DF),
            type=_maybe_enum(IoreqType, type_),
        )

    def pack_into(self, buf, offset: int = 0) -> None:
        flags = (
            (int(self.state) & STATE_MASK)
            | (FLAG_DATA_IS_PTR if self.data_is_ptr else 0)
            | (FLAG_DIR_READ if self.is_read else 0)
            | (FLAG_DF if self.df else 0)
        )
        IOREQ_STRUCT.pack_into(
            buf, offset, self.addr, self.data, self.count, self.size, self.vp_eport, 0, flags, int(self.type)
        )


def _maybe_enum(enum_cls, value: int):
    try:
        return enum_cls(value)
    except ValueError:
        return value


# --- buffered ioreqs (x86 only; Xen on Arm refuses a buffered server) ----

BUF_IOREQ_SIZE = 8
BUF_IOREQ_SLOT_NUM = 511
BUF_PAGE_OFF_READ_POINTER = 0
BUF_PAGE_OFF_WRITE_POINTER = 4
BUF_PAGE_OFF_SLOTS = 8
_BUF_IOREQ = struct.Struct("<II")


@attrs.frozen(slots=True)
class BufIoreq:
    """One 8-byte buffered ioreq: word 0 is type (bits 0-7), dir (bit 9),
    log2 size (bits 10-11) and a 20-bit address (bits 12-31); word 1 is data.
    An 8-byte access takes two consecutive slots (the second holds the high
    32 data bits)."""

    type: int
    is_read: bool
    size: int
    addr: int
    data: int

    @classmethod
    def unpack(cls, buf, offset: int = 0) -> "BufIoreq":
        word0, data = _BUF_IOREQ.unpack_from(buf, offset)
        return cls(
            type=word0 & 0xFF,
            is_read=bool(word0 & (1 << 9)),
            size=1 << ((word0 >> 10) & 0x3),
            addr=(word0 >> 12) & 0xFFFFF,
            data=data,
        )

    def pack_into(self, buf, offset: int = 0) -> None:
        log2 = {1: 0, 2: 1, 4: 2, 8: 3}[self.size]
        if not 0 <= self.addr < (1 << 20):
            raise ValueError(f"buffered ioreq address {self.addr:#x} does not fit 20 bits")
        word0 = (self.type & 0xFF) | ((1 << 9) if self.is_read else 0) | (log2 << 10) | (self.addr << 12)
        _BUF_IOREQ.pack_into(buf, offset, word0, self.data & 0xFFFFFFFF)


def buf_slot_offset(pointer: int) -> int:
    """Page offset of the slot that ring pointer ``pointer`` designates."""
    return BUF_PAGE_OFF_SLOTS + (pointer % BUF_IOREQ_SLOT_NUM) * BUF_IOREQ_SIZE


def drain_buffered_page(page) -> list[tuple[int, int, int, int]]:
    """Consume every pending buffered ioreq on ``page`` and return them as
    (type, addr, size, data) writes, advancing read_pointer.

    The consumer protocol of ioreq.h: read read_pointer, then write_pointer,
    handle rd..wr, then publish the new read_pointer. A slot pair for an
    8-byte access is joined here. Only writes are ever buffered."""
    rd = struct.unpack_from("<I", page, BUF_PAGE_OFF_READ_POINTER)[0]
    wr = struct.unpack_from("<I", page, BUF_PAGE_OFF_WRITE_POINTER)[0]
    out: list[tuple[int, int, int, int]] = []
    # Pointers are free-running 32-bit counters; never trust more than a ring.
    pending = (wr - rd) & 0xFFFFFFFF
    if pending > BUF_IOREQ_SLOT_NUM:
        raise ValueError(f"buffered ioreq ring pointers are corrupt (read {rd}, write {wr})")
    while rd != wr:
        req = BufIoreq.unpack(page, buf_slot_offset(rd))
        rd = (rd + 1) & 0xFFFFFFFF
        data = req.data
        if req.size == 8:
            if rd == wr:
                raise ValueError("buffered 8-byte ioreq is missing its second slot")
            high = BufIoreq.unpack(page, buf_slot_offset(rd)).data
            rd = (rd + 1) & 0xFFFFFFFF
            data |= high << 32
        out.append((req.type, req.addr, req.size, data))
    # One 32-bit store: the producer reads read_pointer meanwhile, and
    # struct.pack_into would zero the field before writing it.
    with memoryview(page) as view, view.cast("I") as words:
        words[BUF_PAGE_OFF_READ_POINTER >> 2] = rd
    return out
