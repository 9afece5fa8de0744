"""The simulated guest's virtio-fs driver: a minimal FUSE client over virtio
(virtio 1.2 section 5.11, the FUSE kernel protocol 7.31 and later).

Modelled on Linux's fs/fuse/virtio_fs.c. The device has one high-priority
queue (0, FORGET) and ``num_request_queues`` request queues (1..); this
driver uses the first. Its config space::

    struct virtio_fs_config {
        char tag[36];                 NUL-padded, not necessarily terminated
        le32 num_request_queues;
        le32 notify_buf_size;         only with VIRTIO_FS_F_NOTIFICATION
    };

Each FUSE request is one descriptor chain, as Linux builds it (one
buffer per argument)::

    device-readable:  fuse_in_header (40) | op struct | name or data ...
    device-writable:  fuse_out_header (16) | reply struct | data ...

A FORGET, which has no reply, is one device-readable buffer on the hiprio
queue (struct virtio_fs_forget: fuse_in_header + fuse_forget_in); the
device returns it with a used length of 0.

All structures are packed little endian, the byte order of the simulated
(Arm) guest and of the host's daemon. ``fuse_out_header.error`` is 0 or a
negative errno; a negative one raises :class:`FuseError`, which names the
errno. Anything else a device could get wrong (a reply shorter than its
header, a ``unique`` that is not the request's, a ``len`` beyond what the
device says it wrote, a dirent that runs past the reply) raises
:class:`FuseProtocolError`.

Lookup counts: every LOOKUP, CREATE and READDIRPLUS entry with a node id
takes a reference on the daemon's inode; the path helpers give each one
back with FORGET before they return, so a daemon's inode table does not
grow with the guest's activity (Linux forgets when it evicts the inode).

Buffers come from the transport's GuestAllocator: the headers and
argument structs of a request share one small allocation (Linux's
argbuf), the file data has its own page-aligned one; both go back once
the device has returned the chain, even if the caller was cancelled
meanwhile. The DMA layer (``VirtioMmioDriver(..., dma=)``) is the
virtqueue's business, as for virtio-blk.

Use::

    transport = VirtioMmioDriver(None, guest.ram, allocator, base, irq, guest, dma=dma)
    fs = await VirtioFsDriver.open(transport)       # probe, queues, DRIVER_OK, FUSE_INIT
    fs.tag, fs.num_request_queues, fs.init_info
    data = await fs.read_file("dir/file")
    await fs.write_file("dir/new", b"...")          # LOOKUP, then OPEN(O_TRUNC) or CREATE
    names = await fs.listdir("dir")                 # OPENDIR, READDIRPLUS..., RELEASEDIR
    await fs.close()                                # FUSE_DESTROY, device reset

The single operations (``lookup``, ``getattr``, ``open_node``, ``create``,
``read``, ``write``, ``flush``, ``release``, ``opendir``, ``readdirplus``,
``releasedir``, ``setattr_size``, ``forget``, ``destroy``) and the raw
``request`` are there for tests that need one FUSE request at a time.
"""

from __future__ import annotations

import enum
import errno as errno_module
import logging
import os
import struct
from collections import Counter
from collections.abc import Sequence
from typing import Any

import attrs

from xen.sim.guest_virtqueue import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    Completion,
    GuestVirtqueue,
    VirtioDriverError,
)
from xen.sim.virtio_mmio_driver import VIRTIO_F_VERSION_1, VirtioMmioDriver

logger = logging.getLogger(__name__)

VIRTIO_ID_FS = 26

# struct virtio_fs_config (5.11.4).
CFG_TAG = 0
TAG_SIZE = 36
CFG_NUM_REQUEST_QUEUES = 36

HIPRIO_QUEUE = 0
REQUEST_QUEUE = 1
"""The first request queue: the only one this driver uses (virtiofsd serves one)."""

DEFAULT_FEATURES = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_INDIRECT_DESC | 1 << VIRTIO_F_EVENT_IDX
"""Linux's virtio_fs has no device feature of its own to accept (it does
not implement VIRTIO_FS_F_NOTIFICATION); only the transport's."""

# -- the FUSE protocol (include/uapi/linux/fuse.h) -----------------------------

FUSE_KERNEL_VERSION = 7
FUSE_MIN_MINOR = 31
"""virtiofsd refuses an INIT below 7.31 (EPROTO)."""
FUSE_DEFAULT_MINOR = 36
"""QEMU 7.2's virtiofsd speaks 7.36; fuse_init_in grew flags2 in 7.36."""
FUSE_ROOT_ID = 1

PAGE_SIZE = 4096
FUSE_DEFAULT_MAX_PAGES = 32
"""Pages per request when FUSE_MAX_PAGES is not negotiated (FUSE_DEFAULT_MAX_PAGES_PER_REQ)."""
FUSE_NAME_MAX = 1024
"""The longest name a FUSE dirent may carry."""


class Op(enum.IntEnum):
    """FUSE opcodes (enum fuse_opcode)."""

    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    CREATE = 35
    DESTROY = 38
    BATCH_FORGET = 42
    READDIRPLUS = 44


def op_name(opcode: int) -> str:
    try:
        return Op(opcode).name
    except ValueError:
        return f"opcode {opcode}"


# fuse_init_in/out flags.
FUSE_ASYNC_READ = 1 << 0
FUSE_ATOMIC_O_TRUNC = 1 << 3
FUSE_BIG_WRITES = 1 << 5
FUSE_DO_READDIRPLUS = 1 << 13
FUSE_PARALLEL_DIROPS = 1 << 18
FUSE_MAX_PAGES = 1 << 22
FUSE_INIT_EXT = 1 << 30

DEFAULT_INIT_FLAGS = FUSE_ASYNC_READ | FUSE_ATOMIC_O_TRUNC | FUSE_BIG_WRITES | FUSE_DO_READDIRPLUS | FUSE_MAX_PAGES
"""What the client asks for; FUSE_INIT_EXT is added for minor >= 36."""

DEFAULT_MAX_READAHEAD = 128 * 1024

# Open flags as a Linux guest passes them (the generic values, which
# arm64 and x86 share for these).
O_RDONLY = 0o0
O_WRONLY = 0o1
O_RDWR = 0o2
O_CREAT = 0o100
O_EXCL = 0o200
O_TRUNC = 0o1000

S_IFMT = 0o170000
S_IFDIR = 0o040000
S_IFREG = 0o100000

# Structures, little endian, no implicit padding ('<').
IN_HEADER = struct.Struct("<IIQQIIIHH")
"""fuse_in_header: len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding (40 bytes)."""
OUT_HEADER = struct.Struct("<IiQ")
"""fuse_out_header: len, error (0 or -errno), unique (16 bytes)."""
INIT_IN_COMPAT = struct.Struct("<IIII")
"""fuse_init_in before 7.36: major, minor, max_readahead, flags (16 bytes)."""
INIT_IN = struct.Struct("<IIIII44x")
"""fuse_init_in since 7.36: ... flags, flags2, unused[11] (64 bytes)."""
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")
"""fuse_init_out: major, minor, max_readahead, flags, max_background,
congestion_threshold, max_write, time_gran, max_pages, map_alignment,
flags2, unused[7] (64 bytes)."""
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
"""fuse_attr: ino, size, blocks, atime, mtime, ctime, atimensec, mtimensec,
ctimensec, mode, nlink, uid, gid, rdev, blksize, flags (88 bytes)."""
ENTRY_OUT_HEAD = struct.Struct("<QQQQII")
"""fuse_entry_out up to its fuse_attr: nodeid, generation, entry_valid,
attr_valid, entry_valid_nsec, attr_valid_nsec (40 bytes)."""
ENTRY_OUT_SIZE = ENTRY_OUT_HEAD.size + ATTR.size  # 128
ATTR_OUT_HEAD = struct.Struct("<QII")
"""fuse_attr_out up to its fuse_attr: attr_valid, attr_valid_nsec, dummy (16 bytes)."""
ATTR_OUT_SIZE = ATTR_OUT_HEAD.size + ATTR.size  # 104
GETATTR_IN = struct.Struct("<IIQ")
"""fuse_getattr_in: getattr_flags, dummy, fh."""
FUSE_GETATTR_FH = 1 << 0
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")
"""fuse_setattr_in: valid, padding, fh, size, lock_owner, atime, mtime,
ctime, atimensec, mtimensec, ctimensec, mode, unused4, uid, gid, unused5
(88 bytes)."""
FATTR_SIZE = 1 << 3
FATTR_FH = 1 << 6
OPEN_IN = struct.Struct("<II")
"""fuse_open_in: flags, open_flags."""
CREATE_IN = struct.Struct("<IIII")
"""fuse_create_in: flags, mode, umask, open_flags."""
OPEN_OUT = struct.Struct("<QII")
"""fuse_open_out: fh, open_flags, padding."""
RELEASE_IN = struct.Struct("<QIIQ")
"""fuse_release_in: fh, flags, release_flags, lock_owner."""
FLUSH_IN = struct.Struct("<QIIQ")
"""fuse_flush_in: fh, unused, padding, lock_owner."""
READ_IN = struct.Struct("<QQIIQII")
"""fuse_read_in: fh, offset, size, read_flags, lock_owner, flags, padding."""
WRITE_IN = struct.Struct("<QQIIQII")
"""fuse_write_in: fh, offset, size, write_flags, lock_owner, flags, padding."""
WRITE_OUT = struct.Struct("<II")
"""fuse_write_out: size, padding."""
FORGET_IN = struct.Struct("<Q")
"""fuse_forget_in: nlookup."""
DIRENT = struct.Struct("<QQII")
"""fuse_dirent up to its name: ino, off, namelen, type (24 bytes)."""
DIRENTPLUS_NAME_OFFSET = ENTRY_OUT_SIZE + DIRENT.size  # 152

UNIQUE_STEP = 2
"""Linux's FUSE_REQ_ID_STEP: request ids go up by two (the low bit marks interrupts)."""

ARG_ALIGN = 8
DATA_ALIGN = PAGE_SIZE


def dirent_align(length: int) -> int:
    """FUSE_DIRENT_ALIGN: dirents are padded to 8 bytes."""
    return (length + 7) & ~7


def errno_name(err: int) -> str:
    return errno_module.errorcode.get(err, f"errno {err}")


# -- errors --------------------------------------------------------------------


class VirtioFsError(VirtioDriverError):
    """A virtio-fs device cannot be used, or a request cannot be made."""


class FuseProtocolError(VirtioFsError):
    """The device's reply breaks the FUSE protocol."""


class FuseError(VirtioFsError):
    """The daemon answered a request with an error (a negative errno)."""

    def __init__(self, err: int, opcode: int, nodeid: int, what: str = "") -> None:
        self.errno = err
        self.opcode = opcode
        self.nodeid = nodeid
        self.errno_name = errno_name(err)
        target = f" {what}" if what else ""
        super().__init__(
            f"FUSE {op_name(opcode)} on node {nodeid}{target} failed: {self.errno_name} ({os.strerror(err)})"
        )


# -- parsed replies ------------------------------------------------------------


@attrs.frozen
class FuseAttr:
    ino: int
    size: int
    blocks: int
    atime: int
    mtime: int
    ctime: int
    atimensec: int
    mtimensec: int
    ctimensec: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    blksize: int
    flags: int

    @classmethod
    def unpack(cls, data: bytes, offset: int = 0) -> FuseAttr:
        return cls(*ATTR.unpack_from(data, offset))

    def pack(self) -> bytes:
        return ATTR.pack(*attrs.astuple(self))

    @property
    def is_dir(self) -> bool:
        return self.mode & S_IFMT == S_IFDIR

    @property
    def is_reg(self) -> bool:
        return self.mode & S_IFMT == S_IFREG


@attrs.frozen
class FuseEntry:
    """fuse_entry_out: what LOOKUP and CREATE (and each READDIRPLUS entry) give."""

    nodeid: int
    generation: int
    entry_valid: int
    attr_valid: int
    entry_valid_nsec: int
    attr_valid_nsec: int
    attr: FuseAttr

    @classmethod
    def unpack(cls, data: bytes, offset: int = 0) -> FuseEntry:
        head = ENTRY_OUT_HEAD.unpack_from(data, offset)
        return cls(*head, FuseAttr.unpack(data, offset + ENTRY_OUT_HEAD.size))

    def pack(self) -> bytes:
        return ENTRY_OUT_HEAD.pack(self.nodeid, self.generation, self.entry_valid, self.attr_valid,
                                   self.entry_valid_nsec, self.attr_valid_nsec) + self.attr.pack()


@attrs.frozen
class FuseOpenOut:
    fh: int
    open_flags: int


@attrs.frozen
class FuseInitInfo:
    """fuse_init_out: what the daemon agreed to."""

    major: int
    minor: int
    max_readahead: int
    flags: int
    max_background: int
    congestion_threshold: int
    max_write: int
    time_gran: int
    max_pages: int
    map_alignment: int
    flags2: int

    @classmethod
    def unpack(cls, data: bytes) -> FuseInitInfo:
        # A daemon speaking to an old minor sends a shorter reply (24 bytes
        # before 7.23); the fields it leaves out are 0.
        return cls(*INIT_OUT.unpack(bytes(data[:INIT_OUT.size]).ljust(INIT_OUT.size, b"\0")))


@attrs.frozen
class DirEntryPlus:
    """One READDIRPLUS entry: the dirent and the lookup the daemon did for
    it (``entry.nodeid`` 0 for "." and "..": no lookup count taken)."""

    name: bytes
    ino: int
    off: int
    type: int
    entry: FuseEntry

    @property
    def fsname(self) -> str:
        return os.fsdecode(self.name)


# -- packing -------------------------------------------------------------------


def pack_in_header(length: int, opcode: int, unique: int, nodeid: int, uid: int = 0, gid: int = 0,
                   pid: int = 0) -> bytes:
    return IN_HEADER.pack(length, opcode, unique, nodeid, uid, gid, pid, 0, 0)


def pack_init_in(minor: int = FUSE_DEFAULT_MINOR, max_readahead: int = DEFAULT_MAX_READAHEAD,
                 flags: int = DEFAULT_INIT_FLAGS, flags2: int = 0) -> bytes:
    """fuse_init_in as a kernel of protocol 7.``minor`` sends it: 64 bytes
    with FUSE_INIT_EXT from 7.36, else the 16-byte form."""
    if minor >= 36:
        return INIT_IN.pack(FUSE_KERNEL_VERSION, minor, max_readahead, (flags | FUSE_INIT_EXT) & 0xFFFFFFFF, flags2)
    return INIT_IN_COMPAT.pack(FUSE_KERNEL_VERSION, minor, max_readahead, flags & ~FUSE_INIT_EXT & 0xFFFFFFFF)


def fuse_name(name: str | bytes) -> bytes:
    """A name argument: the bytes and a NUL (FUSE names are NUL-terminated)."""
    raw = os.fsencode(name)
    if not raw or b"/" in raw or b"\0" in raw or raw in (b".", b".."):
        raise ValueError(f"{name!r} is not a name a FUSE request can carry")
    return raw + b"\0"


def parse_direntplus(data: bytes) -> list[DirEntryPlus]:
    """The fuse_direntplus records of a READDIRPLUS reply (each
    fuse_entry_out + fuse_dirent + name, padded to 8 bytes)."""
    entries: list[DirEntryPlus] = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < DIRENTPLUS_NAME_OFFSET:
            raise FuseProtocolError(
                f"READDIRPLUS reply: {len(data) - pos} bytes left at offset {pos}, "
                f"less than a fuse_direntplus ({DIRENTPLUS_NAME_OFFSET} bytes)"
            )
        entry = FuseEntry.unpack(data, pos)
        ino, off, namelen, dtype = DIRENT.unpack_from(data, pos + ENTRY_OUT_SIZE)
        if not 0 < namelen <= FUSE_NAME_MAX:
            raise FuseProtocolError(f"READDIRPLUS reply: entry at offset {pos} has name length {namelen}")
        name_at = pos + DIRENTPLUS_NAME_OFFSET
        if name_at + namelen > len(data):
            raise FuseProtocolError(
                f"READDIRPLUS reply: the {namelen}-byte name of the entry at offset {pos} runs past the "
                f"{len(data)}-byte reply"
            )
        entries.append(DirEntryPlus(bytes(data[name_at:name_at + namelen]), ino, off, dtype, entry))
        pos += dirent_align(DIRENTPLUS_NAME_OFFSET + namelen)
    return entries


def pack_direntplus(name: bytes, entry: FuseEntry, off: int, dtype: int) -> bytes:
    """One fuse_direntplus record, padded (for fakes and tests)."""
    record = entry.pack() + DIRENT.pack(entry.attr.ino, off, len(name), dtype) + name
    return record.ljust(dirent_align(len(record)), b"\0")


def _align(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)


def split_path(path: str | bytes) -> list[bytes]:
    """The components of a path inside the share ("/" and "" are the root)."""
    parts = [p for p in os.fsencode(path).split(b"/") if p and p != b"."]
    for part in parts:
        if part == b"..":
            raise ValueError(f"{path!r}: '..' is not supported")
    return parts


# -- the driver ----------------------------------------------------------------


class VirtioFsDriver:
    """A virtio-fs device driven over a :class:`VirtioMmioDriver`, with a
    FUSE session on it. Create it with ``await VirtioFsDriver.open(transport)``."""

    def __init__(self, transport: VirtioMmioDriver, *, uid: int = 0, gid: int = 0, pid: int = 1) -> None:
        self.transport = transport
        self.uid = uid
        self.gid = gid
        self.pid = pid
        """Who the requests come from (fuse_in_header uid/gid/pid)."""
        self.tag_bytes = b""
        self.num_request_queues = 0
        self.hiprio: GuestVirtqueue | None = None
        self.request_queue: GuestVirtqueue | None = None
        self.init_info: FuseInitInfo | None = None
        self._unique = 0
        self.lock_owner = 0x6775657374  # any fixed id: the guest has one "process"
        self.requests_sent = 0
        self.forgets_sent = 0

    # -- setup --------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        transport: VirtioMmioDriver,
        queue_size: int | None = None,
        *,
        features: int = DEFAULT_FEATURES,
        init: bool = True,
        minor: int = FUSE_DEFAULT_MINOR,
        init_flags: int = DEFAULT_INIT_FLAGS,
        max_readahead: int = DEFAULT_MAX_READAHEAD,
        uid: int = 0,
        gid: int = 0,
        pid: int = 1,
        vcpu: Any = None,
    ) -> VirtioFsDriver:
        """Probe the device (DeviceID 26), negotiate ``features``, read the
        tag and num_request_queues, set up the hiprio queue and the first
        request queue, set DRIVER_OK (virtio_fs_probe), then, unless
        ``init`` is False, start the FUSE session with FUSE_INIT (what
        mount does)."""
        self = cls(transport, uid=uid, gid=gid, pid=pid)
        t = transport
        v = t.pick_vcpu(vcpu)
        await t.probe(features, device_id=VIRTIO_ID_FS, vcpu=v)
        try:
            await self._configure(queue_size, v)
        except VirtioDriverError:
            await t.fail(vcpu=v)
            raise
        await t.driver_ok(vcpu=v)
        logger.debug("virtio-fs at %#x: tag %r, %d request queue(s), queues of %d, features %#x",
                     t.base, self.tag, self.num_request_queues, self.request_queue.size, t.features)
        if init:
            await self.init(minor=minor, flags=init_flags, max_readahead=max_readahead, vcpu=v)
        return self

    async def _configure(self, queue_size: int | None, v: Any) -> None:
        t = self.transport
        # virtio_fs_read_tag: the tag runs to the first NUL or all 36 bytes.
        raw = await t.read_config_bytes(CFG_TAG, TAG_SIZE, vcpu=v)
        tag = raw.split(b"\0", 1)[0]
        if not tag:
            raise VirtioFsError(f"virtio-fs at {t.base:#x}: empty tag in config space")
        self.tag_bytes = tag
        self.num_request_queues = await t.read_config(CFG_NUM_REQUEST_QUEUES, 4, vcpu=v)
        if self.num_request_queues == 0:
            raise VirtioFsError(f"virtio-fs at {t.base:#x}: num_request_queues is 0")
        self.hiprio = await t.setup_queue(HIPRIO_QUEUE, queue_size, vcpu=v)
        self.request_queue = await t.setup_queue(REQUEST_QUEUE, queue_size, vcpu=v)

    @property
    def tag(self) -> str:
        return self.tag_bytes.decode(errors="replace")

    async def close(self, *, destroy: bool = True, vcpu: Any = None) -> None:
        """End the session with FUSE_DESTROY (as an unmount does; skipped
        with ``destroy=False`` or before INIT) and reset the device."""
        if destroy and self.init_info is not None and self.request_queue is not None:
            await self.request(Op.DESTROY, 0, vcpu=vcpu)
        self.init_info = None
        await self.transport.reset(vcpu=vcpu)
        self.hiprio = self.request_queue = None

    # -- limits -------------------------------------------------------------

    @property
    def max_write(self) -> int:
        """Largest WRITE payload the daemon takes."""
        info = self._session()
        return max(PAGE_SIZE, min(info.max_write, self.max_read))

    @property
    def max_read(self) -> int:
        """Largest READ asked for: max_pages pages (FUSE_MAX_PAGES), else Linux's default of 32."""
        info = self._session()
        pages = info.max_pages if info.flags & FUSE_MAX_PAGES and info.max_pages else FUSE_DEFAULT_MAX_PAGES
        return pages * PAGE_SIZE

    def _session(self) -> FuseInitInfo:
        if self.init_info is None:
            raise VirtioFsError("no FUSE session: FUSE_INIT was not done")
        return self.init_info

    # -- the request path ---------------------------------------------------

    def _next_unique(self) -> int:
        self._unique += UNIQUE_STEP
        return self._unique

    async def request(
        self,
        opcode: int,
        nodeid: int,
        in_args: Sequence[bytes] = (),
        out_sizes: Sequence[int] = (),
        *,
        in_data: bytes = b"",
        out_data_size: int = 0,
        what: str = "",
        vcpu: Any = None,
    ) -> bytes:
        """Send one FUSE request on the request queue and return the reply's
        payload (what follows fuse_out_header, ``len - 16`` bytes).

        Each of ``in_args`` is a device-readable buffer after the
        fuse_in_header, ``in_data`` a last one in page-aligned memory;
        ``out_sizes`` are device-writable buffers after the
        fuse_out_header, ``out_data_size`` a last one in page-aligned
        memory. An error reply raises :class:`FuseError` (``what`` names
        the target in its message)."""
        if self.request_queue is None:
            raise VirtioFsError("virtio-fs device is not open")
        unique = self._next_unique()
        in_len = IN_HEADER.size + sum(len(a) for a in in_args) + len(in_data)
        header = pack_in_header(in_len, opcode, unique, nodeid, self.uid, self.gid, self.pid)
        used, reply = await self._submit(self.request_queue, [header, *in_args], in_data,
                                         [OUT_HEADER.size, *out_sizes], out_data_size, vcpu, (opcode, unique))
        return self._check_reply(opcode, nodeid, unique, used, reply, what)

    def _check_reply(self, opcode: int, nodeid: int, unique: int, used: int, reply: bytes, what: str) -> bytes:
        name = op_name(opcode)
        if used < OUT_HEADER.size:
            raise FuseProtocolError(f"FUSE {name} (unique {unique}): the device wrote {used} bytes, "
                                    f"less than a fuse_out_header")
        length, error, got_unique = OUT_HEADER.unpack_from(reply)
        if got_unique != unique:
            raise FuseProtocolError(f"FUSE {name}: reply to unique {got_unique}, the request was {unique}")
        if not OUT_HEADER.size <= length <= used:
            raise FuseProtocolError(f"FUSE {name} (unique {unique}): fuse_out_header.len {length} but "
                                    f"the device wrote {used} bytes")
        if error > 0 or error < -4095:
            raise FuseProtocolError(f"FUSE {name} (unique {unique}): error {error} is not 0 or a negative errno")
        if error:
            if length != OUT_HEADER.size:
                raise FuseProtocolError(f"FUSE {name} (unique {unique}): error reply {-error} "
                                        f"carries {length - OUT_HEADER.size} bytes")
            raise FuseError(-error, opcode, nodeid, what)
        return reply[OUT_HEADER.size:length]

    async def _submit(self, vq: GuestVirtqueue, in_args: Sequence[bytes], in_data: bytes,
                      out_sizes: Sequence[int], out_data_size: int, vcpu: Any,
                      token: object = None) -> tuple[int, bytes]:
        """Lay the request out in guest RAM, make it available, wait for the
        device to return it; (used length, the device-writable bytes)."""
        t = self.transport
        ram, allocator = t.ram, t.allocator
        v = t.pick_vcpu(vcpu)
        # One block for headers and argument structs (argbuf), each on an
        # 8-byte boundary; file data in its own page-aligned block.
        offsets_in, offsets_out, size = [], [], 0
        for arg in in_args:
            offsets_in.append(size)
            size = _align(size + len(arg), ARG_ALIGN)
        for n in out_sizes:
            offsets_out.append(size)
            size = _align(size + n, ARG_ALIGN)
        allocations: list[int] = []
        completion: Completion | None = None
        try:
            block = allocator.allocate(max(size, 1), ARG_ALIGN)
            allocations.append(block)
            data_gpa = None
            data_len = len(in_data) + out_data_size
            if data_len:
                data_gpa = allocator.allocate(data_len, DATA_ALIGN)
                allocations.append(data_gpa)
            image = bytearray(size)
            for off, arg in zip(offsets_in, in_args):
                image[off:off + len(arg)] = arg
            ram.write(block, bytes(image))
            readable = [(block + off, len(arg)) for off, arg in zip(offsets_in, in_args) if len(arg)]
            writable = [(block + off, n) for off, n in zip(offsets_out, out_sizes) if n]
            if in_data:
                ram.write(data_gpa, bytes(in_data))
                readable.append((data_gpa, len(in_data)))
            if out_data_size:
                writable.append((data_gpa + len(in_data), out_data_size))
            completion = await vq.add(readable, writable, token=token)
            self.requests_sent += 1
            await vq.kick(v)
            used = await completion
            out = b"".join(ram.read(gpa, n) for gpa, n in writable)
        finally:
            self.transport.free_when_returned(completion, allocations, "virtio-fs")
        return used, out[:used]

    # -- FUSE operations ----------------------------------------------------

    async def init(self, *, minor: int = FUSE_DEFAULT_MINOR, flags: int = DEFAULT_INIT_FLAGS,
                   max_readahead: int = DEFAULT_MAX_READAHEAD, vcpu: Any = None) -> FuseInitInfo:
        """FUSE_INIT: protocol 7.``minor`` (at least 7.31, which virtiofsd
        requires). Sets ``init_info``."""
        if minor < FUSE_MIN_MINOR:
            raise ValueError(f"FUSE 7.{minor} is older than virtio-fs allows (7.{FUSE_MIN_MINOR})")
        payload = await self.request(Op.INIT, 0, [pack_init_in(minor, max_readahead, flags)], [INIT_OUT.size],
                                     vcpu=vcpu)
        info = FuseInitInfo.unpack(payload)
        if info.major != FUSE_KERNEL_VERSION:
            # A daemon of a newer major answers with its own and waits for
            # another INIT; there is no other major to offer.
            raise VirtioFsError(f"the daemon speaks FUSE {info.major}.{info.minor}, not {FUSE_KERNEL_VERSION}.x")
        if info.minor < FUSE_MIN_MINOR:
            raise VirtioFsError(f"the daemon speaks FUSE 7.{info.minor}, older than 7.{FUSE_MIN_MINOR}")
        self.init_info = info
        logger.debug("virtio-fs: FUSE %d.%d, flags %#x, max_write %d, max_pages %d", info.major, info.minor,
                     info.flags, info.max_write, info.max_pages)
        return info

    async def lookup(self, parent: int, name: str | bytes, *, vcpu: Any = None) -> FuseEntry:
        """FUSE_LOOKUP of ``name`` in directory ``parent``: takes one lookup
        count on the node (give it back with :meth:`forget`)."""
        arg = fuse_name(name)
        payload = await self.request(Op.LOOKUP, parent, [arg], [ENTRY_OUT_SIZE], what=repr(arg[:-1]), vcpu=vcpu)
        entry = self._entry(Op.LOOKUP, payload)
        if entry.nodeid == 0:
            # A negative entry (cached absence): no node, no count.
            raise FuseError(errno_module.ENOENT, Op.LOOKUP, parent, repr(arg[:-1]))
        return entry

    @staticmethod
    def _entry(opcode: int, payload: bytes) -> FuseEntry:
        if len(payload) < ENTRY_OUT_SIZE:
            raise FuseProtocolError(f"FUSE {op_name(opcode)}: {len(payload)}-byte reply, "
                                    f"fuse_entry_out is {ENTRY_OUT_SIZE}")
        return FuseEntry.unpack(payload)

    async def forget(self, nodeid: int, nlookup: int = 1, *, vcpu: Any = None) -> None:
        """FUSE_FORGET on the hiprio queue: give back ``nlookup`` lookup
        counts. No reply; returns once the device has returned the chain."""
        if self.hiprio is None:
            raise VirtioFsError("virtio-fs device is not open")
        unique = self._next_unique()
        request = pack_in_header(IN_HEADER.size + FORGET_IN.size, Op.FORGET, unique, nodeid, self.uid, self.gid,
                                 self.pid) + FORGET_IN.pack(nlookup)
        # struct virtio_fs_forget: one buffer, header and argument together.
        await self._submit(self.hiprio, [request], b"", [], 0, vcpu, (Op.FORGET, unique))
        self.forgets_sent += 1

    async def forget_all(self, counts: Counter[int] | dict[int, int], *, vcpu: Any = None) -> None:
        """FORGET every node of ``counts`` ({nodeid: lookups}; node 0 is no
        node). Nothing is sent once the hiprio queue is gone or broken (the
        device lost the counts with it), so an error that broke the queue
        is not hidden by another from here."""
        hiprio = self.hiprio
        if hiprio is None or hiprio.broken or hiprio.detached:
            return
        for nodeid, n in counts.items():
            if nodeid and n:
                await self.forget(nodeid, n, vcpu=vcpu)

    async def getattr(self, nodeid: int, fh: int | None = None, *, vcpu: Any = None) -> FuseAttr:
        arg = GETATTR_IN.pack(FUSE_GETATTR_FH if fh is not None else 0, 0, fh or 0)
        payload = await self.request(Op.GETATTR, nodeid, [arg], [ATTR_OUT_SIZE], vcpu=vcpu)
        if len(payload) < ATTR_OUT_SIZE:
            raise FuseProtocolError(f"FUSE GETATTR: {len(payload)}-byte reply, fuse_attr_out is {ATTR_OUT_SIZE}")
        return FuseAttr.unpack(payload, ATTR_OUT_HEAD.size)

    async def _open(self, opcode: int, nodeid: int, flags: int, vcpu: Any) -> FuseOpenOut:
        payload = await self.request(opcode, nodeid, [OPEN_IN.pack(flags, 0)], [OPEN_OUT.size], vcpu=vcpu)
        if len(payload) < OPEN_OUT.size:
            raise FuseProtocolError(f"FUSE {op_name(opcode)}: {len(payload)}-byte reply, "
                                    f"fuse_open_out is {OPEN_OUT.size}")
        fh, open_flags, _ = OPEN_OUT.unpack_from(payload)
        return FuseOpenOut(fh, open_flags)

    async def open_node(self, nodeid: int, flags: int = O_RDONLY, *, vcpu: Any = None) -> FuseOpenOut:
        """FUSE_OPEN of a regular file."""
        return await self._open(Op.OPEN, nodeid, flags, vcpu)

    async def opendir(self, nodeid: int, *, vcpu: Any = None) -> FuseOpenOut:
        return await self._open(Op.OPENDIR, nodeid, O_RDONLY, vcpu)

    async def create(self, parent: int, name: str | bytes, flags: int = O_WRONLY | O_CREAT | O_TRUNC,
                     mode: int = 0o644, *, umask: int = 0o022, vcpu: Any = None) -> tuple[FuseEntry, FuseOpenOut]:
        """FUSE_CREATE: create and open ``name`` in ``parent`` (one lookup
        count on the new node)."""
        arg = fuse_name(name)
        payload = await self.request(Op.CREATE, parent, [CREATE_IN.pack(flags, S_IFREG | mode, umask, 0), arg],
                                     [ENTRY_OUT_SIZE, OPEN_OUT.size], what=repr(arg[:-1]), vcpu=vcpu)
        if len(payload) < ENTRY_OUT_SIZE + OPEN_OUT.size:
            raise FuseProtocolError(f"FUSE CREATE: {len(payload)}-byte reply, fuse_entry_out + fuse_open_out "
                                    f"are {ENTRY_OUT_SIZE + OPEN_OUT.size}")
        entry = FuseEntry.unpack(payload)
        fh, open_flags, _ = OPEN_OUT.unpack_from(payload, ENTRY_OUT_SIZE)
        return entry, FuseOpenOut(fh, open_flags)

    async def read(self, nodeid: int, fh: int, offset: int, size: int, *, flags: int = O_RDONLY,
                   vcpu: Any = None) -> bytes:
        """FUSE_READ: up to ``size`` bytes at ``offset`` (fewer at the end of the file)."""
        if size < 1:
            raise ValueError("a READ needs a positive size")
        arg = READ_IN.pack(fh, offset, size, 0, 0, flags, 0)
        return await self.request(Op.READ, nodeid, [arg], out_data_size=size, vcpu=vcpu)

    async def write(self, nodeid: int, fh: int, offset: int, data: bytes, *, flags: int = O_WRONLY,
                    vcpu: Any = None) -> int:
        """FUSE_WRITE of ``data`` at ``offset``; returns how many bytes the daemon wrote."""
        if not data:
            raise ValueError("a WRITE needs data")
        arg = WRITE_IN.pack(fh, offset, len(data), 0, 0, flags, 0)
        payload = await self.request(Op.WRITE, nodeid, [arg], [WRITE_OUT.size], in_data=bytes(data), vcpu=vcpu)
        if len(payload) < WRITE_OUT.size:
            raise FuseProtocolError(f"FUSE WRITE: {len(payload)}-byte reply, fuse_write_out is {WRITE_OUT.size}")
        written = WRITE_OUT.unpack_from(payload)[0]
        if written > len(data):
            raise FuseProtocolError(f"FUSE WRITE: the daemon says it wrote {written} of {len(data)} bytes")
        return written

    async def setattr_size(self, nodeid: int, size: int, *, fh: int | None = None, vcpu: Any = None) -> FuseAttr:
        """FUSE_SETATTR of the size alone (truncate/ftruncate)."""
        valid = FATTR_SIZE | (FATTR_FH if fh is not None else 0)
        arg = SETATTR_IN.pack(valid, 0, fh or 0, size, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        payload = await self.request(Op.SETATTR, nodeid, [arg], [ATTR_OUT_SIZE], vcpu=vcpu)
        if len(payload) < ATTR_OUT_SIZE:
            raise FuseProtocolError(f"FUSE SETATTR: {len(payload)}-byte reply, fuse_attr_out is {ATTR_OUT_SIZE}")
        return FuseAttr.unpack(payload, ATTR_OUT_HEAD.size)

    async def flush(self, nodeid: int, fh: int, *, vcpu: Any = None) -> None:
        """FUSE_FLUSH (what close(2) sends)."""
        await self.request(Op.FLUSH, nodeid, [FLUSH_IN.pack(fh, 0, 0, self.lock_owner)], vcpu=vcpu)

    async def release(self, nodeid: int, fh: int, flags: int = O_RDONLY, *, vcpu: Any = None) -> None:
        await self.request(Op.RELEASE, nodeid, [RELEASE_IN.pack(fh, flags, 0, 0)], vcpu=vcpu)

    async def releasedir(self, nodeid: int, fh: int, *, vcpu: Any = None) -> None:
        await self.request(Op.RELEASEDIR, nodeid, [RELEASE_IN.pack(fh, O_RDONLY, 0, 0)], vcpu=vcpu)

    async def readdirplus(self, nodeid: int, fh: int, offset: int = 0, size: int = PAGE_SIZE, *,
                          vcpu: Any = None) -> list[DirEntryPlus]:
        """One FUSE_READDIRPLUS of at most ``size`` bytes from ``offset``
        (0, or the ``off`` of the last entry seen). An empty list is the
        end of the directory. Every entry with a node id holds a lookup
        count."""
        arg = READ_IN.pack(fh, offset, size, 0, 0, O_RDONLY, 0)
        payload = await self.request(Op.READDIRPLUS, nodeid, [arg], out_data_size=size, vcpu=vcpu)
        return parse_direntplus(payload)

    async def destroy(self, *, vcpu: Any = None) -> None:
        """FUSE_DESTROY: end the session (a new INIT starts another)."""
        await self.request(Op.DESTROY, 0, vcpu=vcpu)
        self.init_info = None

    # -- path helpers -------------------------------------------------------

    async def _walk(self, parts: Sequence[bytes], looked_up: Counter[int], vcpu: Any) -> FuseEntry | None:
        """LOOKUP each component from the root; counts go into ``looked_up``.
        Returns the last entry (None for the root itself)."""
        nodeid, entry = FUSE_ROOT_ID, None
        for part in parts:
            entry = await self.lookup(nodeid, part, vcpu=vcpu)
            looked_up[entry.nodeid] += 1
            nodeid = entry.nodeid
        return entry

    async def stat(self, path: str | bytes, *, vcpu: Any = None) -> FuseAttr:
        looked_up: Counter[int] = Counter()
        try:
            entry = await self._walk(split_path(path), looked_up, vcpu)
            return await self.getattr(entry.nodeid if entry else FUSE_ROOT_ID, vcpu=vcpu)
        finally:
            await self.forget_all(looked_up, vcpu=vcpu)

    async def read_file(self, path: str | bytes, *, chunk_size: int | None = None, vcpu: Any = None) -> bytes:
        """The whole content of the file at ``path``: LOOKUP each component,
        OPEN read-only, READ until the end of the file, RELEASE, FORGET."""
        chunk = min(chunk_size or self.max_read, self.max_read)
        looked_up: Counter[int] = Counter()
        try:
            entry = await self._walk(split_path(path), looked_up, vcpu)
            if entry is None:
                raise FuseError(errno_module.EISDIR, Op.OPEN, FUSE_ROOT_ID, "'/'")
            handle = await self.open_node(entry.nodeid, O_RDONLY, vcpu=vcpu)
            try:
                out = bytearray()
                while True:
                    data = await self.read(entry.nodeid, handle.fh, len(out), chunk, vcpu=vcpu)
                    out += data
                    if len(data) < chunk:
                        return bytes(out)
            finally:
                await self.release(entry.nodeid, handle.fh, O_RDONLY, vcpu=vcpu)
        finally:
            await self.forget_all(looked_up, vcpu=vcpu)

    async def write_file(self, path: str | bytes, data: bytes, *, mode: int = 0o644, chunk_size: int | None = None,
                         vcpu: Any = None) -> None:
        """Create or truncate the file at ``path`` and write ``data`` to it,
        as open(path, O_WRONLY|O_CREAT|O_TRUNC) and write(2) do on Linux:
        LOOKUP the name; if it exists, OPEN it with O_TRUNC (SETATTR size 0
        without FUSE_ATOMIC_O_TRUNC), else CREATE it; WRITE in chunks of at
        most max_write; FLUSH, RELEASE, FORGET.

        Like Linux, an existing file is never CREATEd: QEMU 7.2's virtiofsd
        aborts on a CREATE without O_EXCL of a name that exists (its
        lo_inode_open passes O_CREAT to openat without a mode, which
        glibc's fortified openat refuses). The CREATE here carries O_EXCL,
        so a file that appears between the LOOKUP and the CREATE is an
        EEXIST, after which the file is opened instead."""
        parts = split_path(path)
        if not parts:
            raise ValueError(f"{path!r} names the root, not a file")
        chunk = min(chunk_size or self.max_write, self.max_write)
        flags = O_WRONLY | O_TRUNC
        looked_up: Counter[int] = Counter()
        try:
            parent = await self._walk(parts[:-1], looked_up, vcpu)
            parent_id = parent.nodeid if parent else FUSE_ROOT_ID
            entry, handle = await self._open_for_writing(parent_id, parts[-1], flags, mode, looked_up, vcpu)
            try:
                offset = 0
                view = memoryview(bytes(data))
                while offset < len(view):
                    written = await self.write(entry.nodeid, handle.fh, offset, view[offset:offset + chunk],
                                               flags=flags, vcpu=vcpu)
                    if written == 0:
                        raise VirtioFsError(f"FUSE WRITE of {path!r} at offset {offset}: the daemon wrote nothing")
                    offset += written
                await self.flush(entry.nodeid, handle.fh, vcpu=vcpu)
            finally:
                await self.release(entry.nodeid, handle.fh, flags, vcpu=vcpu)
        finally:
            await self.forget_all(looked_up, vcpu=vcpu)

    async def _open_for_writing(self, parent: int, name: bytes, flags: int, mode: int, looked_up: Counter[int],
                                vcpu: Any) -> tuple[FuseEntry, FuseOpenOut]:
        for _attempt in range(2):
            try:
                entry = await self.lookup(parent, name, vcpu=vcpu)
            except FuseError as exc:
                if exc.errno != errno_module.ENOENT:
                    raise
            else:
                looked_up[entry.nodeid] += 1
                handle = await self.open_node(entry.nodeid, flags, vcpu=vcpu)
                if not self._session().flags & FUSE_ATOMIC_O_TRUNC:
                    try:
                        await self.setattr_size(entry.nodeid, 0, fh=handle.fh, vcpu=vcpu)
                    except BaseException:
                        await self.release(entry.nodeid, handle.fh, flags, vcpu=vcpu)
                        raise
                return entry, handle
            try:
                entry, handle = await self.create(parent, name, flags | O_CREAT | O_EXCL, mode, vcpu=vcpu)
            except FuseError as exc:
                if exc.errno != errno_module.EEXIST:
                    raise
                continue  # created meanwhile: open it
            looked_up[entry.nodeid] += 1
            return entry, handle
        raise FuseError(errno_module.EEXIST, Op.CREATE, parent, repr(name))

    async def scandir(self, path: str | bytes = "/", *, buffer_size: int = PAGE_SIZE,
                      vcpu: Any = None) -> list[DirEntryPlus]:
        """Every entry of the directory at ``path``, "." and ".." included:
        OPENDIR, READDIRPLUS until an empty reply, RELEASEDIR; the lookup
        counts the entries took are given back."""
        looked_up: Counter[int] = Counter()
        try:
            entry = await self._walk(split_path(path), looked_up, vcpu)
            nodeid = entry.nodeid if entry else FUSE_ROOT_ID
            handle = await self.opendir(nodeid, vcpu=vcpu)
            entries: list[DirEntryPlus] = []
            try:
                offset = 0
                while True:
                    batch = await self.readdirplus(nodeid, handle.fh, offset, buffer_size, vcpu=vcpu)
                    for item in batch:
                        looked_up[item.entry.nodeid] += 1
                    if not batch:
                        return entries
                    entries += batch
                    offset = batch[-1].off
            finally:
                await self.releasedir(nodeid, handle.fh, vcpu=vcpu)
        finally:
            await self.forget_all(looked_up, vcpu=vcpu)

    async def listdir(self, path: str | bytes = "/", *, vcpu: Any = None) -> list[str]:
        """The names in the directory at ``path``, without "." and "..", in
        the daemon's order (like os.listdir)."""
        return [e.fsname for e in await self.scandir(path, vcpu=vcpu) if e.name not in (b".", b"..")]
