"""The simulated guest's virtio-fs driver (a FUSE client) against a
register-level fake device (tests/guest_driver_fakes.py) that serves a
small in-memory file system, and its packing and parsing against byte
strings written out from the FUSE header layout."""

from __future__ import annotations

import errno
import struct

import attrs
import pytest
import trio
import trio.testing

from tests.guest_driver_fakes import (
    DMA_MODES,
    IRQ,
    MMIO_BASE,
    DevChain,
    FakeGuest,
    FakeMmioDevice,
    assert_dma_state,
)
from xen.sim import virtio_fs as vfs
from xen.sim import virtio_mmio_driver as mmio
from xen.sim.guest_dma import GrantDma
from xen.sim.guest_memory import GuestAllocator
from xen.sim.guest_virtqueue import DeviceMisbehaved

V1 = 1 << 32
EVENT_IDX = 1 << 29
INDIRECT = 1 << 28
FS_FEATURES = V1 | EVENT_IDX | INDIRECT

# -- a fake virtio-fs device: an in-memory file system behind FUSE ---------------


def fs_config(tag: bytes, num_request_queues: int = 1) -> bytes:
    return tag.ljust(36, b"\0")[:36] + struct.pack("<I", num_request_queues)


@attrs.define
class Node:
    nodeid: int
    ino: int
    is_dir: bool
    data: bytearray = attrs.Factory(bytearray)
    children: dict[bytes, int] = attrs.Factory(dict)
    lookups: int = 0
    mode: int = 0o644


@attrs.define
class Seen:
    """One request as the device saw it."""

    queue: int
    opcode: int
    unique: int
    nodeid: int
    header: tuple
    readable: list[int]
    writable: list[int]
    body: bytes
    raw: bytes
    chain: DevChain


class FakeFuseFs:
    """Serves FUSE requests (as virtiofsd would) from an in-memory tree;
    keeps the lookup count of every node to check the client gives them
    back. Knobs: ``errors`` {opcode: errno}, ``tamper`` (rewrites a reply)."""

    def __init__(self, *, max_write: int = 1 << 20, max_pages: int = 256, minor: int = 36,
                 init_flags: int = (vfs.FUSE_MAX_PAGES | vfs.FUSE_DO_READDIRPLUS | vfs.FUSE_BIG_WRITES
                                    | vfs.FUSE_ATOMIC_O_TRUNC)) -> None:
        self.nodes: dict[int, Node] = {1: Node(1, 1000, True, mode=0o755)}
        self.next_nodeid = 2
        self.next_fh = 100
        self.open_fhs: dict[int, int] = {}
        self.seen: list[Seen] = []
        self.errors: dict[int, int] = {}
        self.tamper = None
        self.max_write = max_write
        self.max_pages = max_pages
        self.minor = minor
        self.init_flags = init_flags
        self.got_init = False
        self.destroyed = 0
        self.on_enoent = None
        """Called with (parent, name) when a LOOKUP finds nothing (to race a CREATE)."""

    # -- the tree

    def add(self, parent: int, name: bytes, *, data: bytes | None = None) -> int:
        nodeid = self.next_nodeid
        self.next_nodeid += 1
        self.nodes[nodeid] = Node(nodeid, 1000 + nodeid, data is None, bytearray(data or b""),
                                  mode=0o755 if data is None else 0o644)
        self.nodes[parent].children[name] = nodeid
        return nodeid

    def outstanding_lookups(self) -> dict[int, int]:
        return {n.nodeid: n.lookups for n in self.nodes.values() if n.lookups}

    def attr(self, node: Node) -> vfs.FuseAttr:
        mode = (vfs.S_IFDIR if node.is_dir else vfs.S_IFREG) | node.mode
        size = 4096 if node.is_dir else len(node.data)
        return vfs.FuseAttr(node.ino, size, (size + 511) // 512, 1, 2, 3, 0, 0, 0, mode, 1, 0, 0, 0, 4096, 0)

    def entry(self, node: Node) -> vfs.FuseEntry:
        node.lookups += 1
        return vfs.FuseEntry(node.nodeid, 7, 1, 1, 0, 0, self.attr(node))

    # -- the device side

    def __call__(self, dev: FakeMmioDevice, queue: int, chain: DevChain) -> int:
        raw = chain.read_out(dev.ram)
        header = vfs.IN_HEADER.unpack_from(raw)
        length, opcode, unique, nodeid = header[:4]
        assert length == len(raw), f"fuse_in_header.len {length}, {len(raw)} bytes readable"
        seen = Seen(queue, opcode, unique, nodeid, header, [n for _, n in chain.readable],
                    [n for _, n in chain.writable], raw[vfs.IN_HEADER.size:], raw, chain)
        self.seen.append(seen)
        if opcode == vfs.Op.FORGET:
            assert queue == vfs.HIPRIO_QUEUE and not chain.writable
            (nlookup,) = vfs.FORGET_IN.unpack_from(seen.body)
            node = self.nodes[nodeid]
            assert node.lookups >= nlookup, f"FORGET {nlookup} of node {nodeid} with {node.lookups} lookups"
            node.lookups -= nlookup
            return 0
        assert queue == vfs.REQUEST_QUEUE
        err = self.errors.get(opcode)
        if err is None and not self.got_init and opcode != vfs.Op.INIT:
            err = errno.EIO
        payload = b""
        if err is None:
            try:
                payload = self.handle(opcode, nodeid, seen.body, sum(seen.writable) - 16)
            except OSError as exc:
                err = exc.errno
        if err is not None:
            reply = vfs.OUT_HEADER.pack(16, -err, unique)
        else:
            reply = vfs.OUT_HEADER.pack(16 + len(payload), 0, unique) + payload
        if self.tamper is not None:
            reply = self.tamper(seen, reply)
        return chain.write_in(dev.ram, reply)

    def node(self, nodeid: int) -> Node:
        try:
            return self.nodes[nodeid]
        except KeyError:
            raise OSError(errno.ESTALE, "no such node") from None

    def handle(self, opcode: int, nodeid: int, body: bytes, room: int) -> bytes:
        if opcode == vfs.Op.INIT:
            major, minor, readahead, flags = vfs.INIT_IN_COMPAT.unpack_from(body)
            if minor < 31:
                raise OSError(errno.EPROTO, "old")
            self.got_init = True
            return vfs.INIT_OUT.pack(7, self.minor, readahead, self.init_flags, 12, 9, self.max_write, 1,
                                     self.max_pages, 0, 0)
        if opcode == vfs.Op.DESTROY:
            self.destroyed += 1
            self.got_init = False
            return b""
        node = self.node(nodeid)
        if opcode == vfs.Op.LOOKUP:
            name = body.split(b"\0", 1)[0]
            if name not in node.children:
                if self.on_enoent is not None:
                    self.on_enoent(nodeid, name)
                raise OSError(errno.ENOENT, "no entry")
            return self.entry(self.nodes[node.children[name]]).pack()
        if opcode == vfs.Op.GETATTR:
            return vfs.ATTR_OUT_HEAD.pack(1, 0, 0) + self.attr(node).pack()
        if opcode in (vfs.Op.OPEN, vfs.Op.OPENDIR):
            if node.is_dir != (opcode == vfs.Op.OPENDIR):
                raise OSError(errno.EISDIR if node.is_dir else errno.ENOTDIR, "")
            flags = vfs.OPEN_IN.unpack_from(body)[0]
            assert not flags & vfs.O_CREAT, "O_CREAT in an OPEN"
            if flags & vfs.O_TRUNC and self.init_flags & vfs.FUSE_ATOMIC_O_TRUNC:
                node.data.clear()
            return self.new_fh(nodeid)
        if opcode == vfs.Op.SETATTR:
            valid, _, fh, size = vfs.SETATTR_IN.unpack_from(body)[:4]
            assert valid == vfs.FATTR_SIZE | vfs.FATTR_FH and self.open_fhs[fh] == nodeid
            del node.data[size:]
            return vfs.ATTR_OUT_HEAD.pack(1, 0, 0) + self.attr(node).pack()
        if opcode == vfs.Op.CREATE:
            flags, mode, umask, _ = vfs.CREATE_IN.unpack_from(body)
            name = body[vfs.CREATE_IN.size:].split(b"\0", 1)[0]
            child = node.children.get(name)
            if child is None:
                child = self.add(nodeid, name, data=b"")
            elif flags & vfs.O_EXCL:
                raise OSError(errno.EEXIST, "exists")
            else:
                # QEMU 7.2's virtiofsd aborts here (openat with O_CREAT and no mode).
                raise AssertionError("CREATE without O_EXCL of an existing name")
            return self.entry(self.nodes[child]).pack() + self.new_fh(child)
        if opcode in (vfs.Op.READ, vfs.Op.READDIRPLUS):
            fh, offset, size = vfs.READ_IN.unpack_from(body)[:3]
            assert self.open_fhs.get(fh) == nodeid and size <= room
            if opcode == vfs.Op.READ:
                return bytes(node.data[offset:offset + size])
            return self.readdirplus(node, offset, size)
        if opcode == vfs.Op.WRITE:
            fh, offset, size = vfs.WRITE_IN.unpack_from(body)[:3]
            data = body[vfs.WRITE_IN.size:]
            assert self.open_fhs.get(fh) == nodeid and len(data) == size <= self.max_write
            node.data[offset:offset + size] = data
            return vfs.WRITE_OUT.pack(size, 0)
        if opcode == vfs.Op.FLUSH:
            assert vfs.FLUSH_IN.unpack_from(body)[0] in self.open_fhs
            return b""
        if opcode in (vfs.Op.RELEASE, vfs.Op.RELEASEDIR):
            fh = vfs.RELEASE_IN.unpack_from(body)[0]
            assert self.open_fhs.pop(fh) == nodeid
            return b""
        raise OSError(errno.ENOSYS, "")

    def new_fh(self, nodeid: int) -> bytes:
        fh = self.next_fh
        self.next_fh += 1
        self.open_fhs[fh] = nodeid
        return vfs.OPEN_OUT.pack(fh, 0, 0)

    def readdirplus(self, node: Node, offset: int, size: int) -> bytes:
        names = [b".", b".."] + list(node.children)
        out = b""
        for index in range(offset, len(names)):
            name = names[index]
            if name in (b".", b".."):
                zero = vfs.FuseEntry(0, 0, 0, 0, 0, 0, attrs.evolve(self.attr(node), mode=vfs.S_IFDIR))
                record = vfs.pack_direntplus(name, zero, index + 1, 4)
            else:
                child = self.nodes[node.children[name]]
                record = vfs.pack_direntplus(name, vfs.FuseEntry(child.nodeid, 7, 1, 1, 0, 0, self.attr(child)),
                                             index + 1, 4 if child.is_dir else 8)
            if len(out) + len(record) > size:
                break
            if name not in (b".", b".."):
                self.nodes[node.children[name]].lookups += 1
            out += record
        return out


class Rig:
    def __init__(self, nursery=None, *, features=FS_FEATURES, tag=b"shared", num_request_queues=1,
                 queue_num_max=(128, 128), dma_mode="identity", fs: FakeFuseFs | None = None, **device_kw):
        self.guest = FakeGuest()
        self.guest.nursery = nursery
        self.fs = fs or FakeFuseFs()
        self.dev = FakeMmioDevice(self.guest, device_id=vfs.VIRTIO_ID_FS, features=features, handler=self.fs,
                                  config=fs_config(tag, num_request_queues), queue_num_max=queue_num_max,
                                  **device_kw)
        self.alloc = GuestAllocator(self.guest.ram.base, self.guest.ram.size)
        self.dma_mode = dma_mode
        self.dma = GrantDma(self.guest) if dma_mode == "grant" else None
        self.t = mmio.VirtioMmioDriver(None, self.guest.ram, self.alloc, MMIO_BASE, IRQ, self.guest,
                                       reset_poll_interval=0.0005, dma=self.dma)

    async def open(self, **kw) -> vfs.VirtioFsDriver:
        self.drv = await vfs.VirtioFsDriver.open(self.t, **kw)
        return self.drv

    def requests(self, opcode=None):
        return [s for s in self.fs.seen if opcode is None or s.opcode == opcode]


# -- the FUSE layout, written out by hand ------------------------------------------


def test_struct_sizes_are_the_fuse_abi():
    sizes = {
        "fuse_in_header": (vfs.IN_HEADER.size, 40),
        "fuse_out_header": (vfs.OUT_HEADER.size, 16),
        "fuse_init_in": (vfs.INIT_IN.size, 64),
        "fuse_init_in (before 7.36)": (vfs.INIT_IN_COMPAT.size, 16),
        "fuse_init_out": (vfs.INIT_OUT.size, 64),
        "fuse_attr": (vfs.ATTR.size, 88),
        "fuse_entry_out": (vfs.ENTRY_OUT_SIZE, 128),
        "fuse_attr_out": (vfs.ATTR_OUT_SIZE, 104),
        "fuse_getattr_in": (vfs.GETATTR_IN.size, 16),
        "fuse_setattr_in": (vfs.SETATTR_IN.size, 88),
        "fuse_open_in": (vfs.OPEN_IN.size, 8),
        "fuse_create_in": (vfs.CREATE_IN.size, 16),
        "fuse_open_out": (vfs.OPEN_OUT.size, 16),
        "fuse_release_in": (vfs.RELEASE_IN.size, 24),
        "fuse_flush_in": (vfs.FLUSH_IN.size, 24),
        "fuse_read_in": (vfs.READ_IN.size, 40),
        "fuse_write_in": (vfs.WRITE_IN.size, 40),
        "fuse_write_out": (vfs.WRITE_OUT.size, 8),
        "fuse_forget_in": (vfs.FORGET_IN.size, 8),
        "fuse_dirent (without name)": (vfs.DIRENT.size, 24),
        "offsetof(fuse_direntplus, dirent.name)": (vfs.DIRENTPLUS_NAME_OFFSET, 152),
    }
    assert {k: v[0] for k, v in sizes.items()} == {k: v[1] for k, v in sizes.items()}


INIT_7_36 = bytes.fromhex(
    # fuse_in_header: len 104, opcode 26 (INIT), unique 2, nodeid 0,
    "68000000" "1a000000" "0200000000000000" "0000000000000000"
    # uid 0, gid 0, pid 1, total_extlen 0, padding 0
    "00000000" "00000000" "01000000" "0000" "0000"
    # fuse_init_in: major 7, minor 36, max_readahead 0x20000,
    "07000000" "24000000" "00000200"
    # flags ASYNC_READ|ATOMIC_O_TRUNC|BIG_WRITES|DO_READDIRPLUS|MAX_PAGES|INIT_EXT, flags2 0, unused[11]
    "29204040" "00000000"
) + bytes(44)

INIT_7_31 = bytes.fromhex(
    "38000000" "1a000000" "0200000000000000" "0000000000000000"
    "00000000" "00000000" "01000000" "0000" "0000"
    # no flags2 before 7.36, and no FUSE_INIT_EXT
    "07000000" "1f000000" "00000200" "29204000"
)


@pytest.mark.parametrize("minor, expected", [(36, INIT_7_36), (31, INIT_7_31)])
async def test_init_request_bytes(nursery, minor, expected):
    rig = Rig(nursery)
    fs = await rig.open(minor=minor)
    (init,) = rig.requests()
    assert (init.queue, init.opcode) == (vfs.REQUEST_QUEUE, vfs.Op.INIT)
    assert init.raw == expected
    # One buffer per argument, as Linux's virtio_fs lays a request out.
    assert init.readable == [40, len(expected) - 40]
    assert init.writable == [16, 64]
    assert fs.init_info.minor == 36


async def test_init_reply_sets_the_session_limits(nursery):
    rig = Rig(nursery, fs=FakeFuseFs(max_write=1 << 20, max_pages=256))
    fs = await rig.open()
    info = fs.init_info
    assert (info.major, info.minor, info.max_readahead, info.max_write, info.max_pages) == (7, 36, 0x20000,
                                                                                         1 << 20, 256)
    assert (info.max_background, info.congestion_threshold, info.time_gran) == (12, 9, 1)
    assert fs.max_read == fs.max_write == 1 << 20
    # Without FUSE_MAX_PAGES in the reply, Linux's 32 pages per request.
    rig2 = Rig(nursery, fs=FakeFuseFs(init_flags=vfs.FUSE_BIG_WRITES))
    fs2 = await rig2.open()
    assert fs2.max_read == fs2.max_write == 32 * 4096


def test_init_reply_of_an_old_minor_is_shorter():
    # FUSE_COMPAT_22_INIT_OUT_SIZE: 24 bytes, up to max_write.
    short = struct.pack("<IIIIHHI", 7, 22, 4096, 0, 1, 1, 65536)
    info = vfs.FuseInitInfo.unpack(short)
    assert (info.minor, info.max_write, info.time_gran, info.max_pages) == (22, 65536, 0, 0)


async def test_init_refused_by_the_daemon_names_the_errno(nursery):
    rig = Rig(nursery)
    rig.fs.errors[vfs.Op.INIT] = errno.EPROTO
    with pytest.raises(vfs.FuseError, match=r"FUSE INIT on node 0 failed: EPROTO") as info:
        await rig.open()
    assert info.value.errno == errno.EPROTO and info.value.errno_name == "EPROTO"


async def test_init_below_7_31_is_not_sent(nursery):
    rig = Rig(nursery)
    fs = await rig.open(init=False)
    with pytest.raises(ValueError, match="7.31"):
        await fs.init(minor=30)
    assert rig.requests() == []


# -- probe and config space ------------------------------------------------------


async def test_probe_reads_the_tag_and_sets_up_hiprio_and_one_request_queue(nursery):
    rig = Rig(nursery, features=FS_FEATURES | 1 << 0 | 1 << 34, tag=b"myfs", num_request_queues=3)
    fs = await rig.open(init=False)
    assert fs.tag == "myfs" and fs.tag_bytes == b"myfs"
    assert fs.num_request_queues == 3
    # No device feature accepted (not VIRTIO_FS_F_NOTIFICATION), no packed ring.
    assert rig.t.features == FS_FEATURES
    assert sorted(rig.t.queues) == [0, 1]
    assert rig.dev.status == 15  # ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
    names = [name for _, name, _ in rig.dev.accesses("R")]
    # The tag byte by byte inside the generation loop, then the le32.
    first = names.index("Config+0x0/1")
    assert names[first - 1] == "ConfigGeneration"
    assert names[first:first + 36] == [f"Config+{i:#x}/1" for i in range(36)]
    assert names[first + 36] == "ConfigGeneration"
    assert names[first + 37] == "Config+0x24/4"


async def test_a_tag_of_36_bytes_has_no_terminator():
    rig = Rig(tag=b"t" * 36)
    fs = await rig.open(init=False)
    assert fs.tag == "t" * 36


@pytest.mark.parametrize("tag, queues, message", [(b"", 1, "empty tag"), (b"x", 0, "num_request_queues is 0")])
async def test_unusable_config_fails_the_device(tag, queues, message):
    rig = Rig(tag=tag, num_request_queues=queues)
    with pytest.raises(vfs.VirtioFsError, match=message):
        await rig.open()
    assert rig.dev.status & 0x80  # FAILED


async def test_another_device_is_not_driven():
    rig = Rig()
    rig.dev.device_id = 2
    with pytest.raises(mmio.WrongDevice):
        await rig.open()


# -- replies ---------------------------------------------------------------------


async def test_an_error_reply_raises_with_the_errno_name(nursery):
    rig = Rig(nursery)
    fs = await rig.open()
    with pytest.raises(vfs.FuseError, match=r"FUSE LOOKUP on node 1 b'missing' failed: ENOENT") as info:
        await fs.lookup(vfs.FUSE_ROOT_ID, "missing")
    assert info.value.errno == errno.ENOENT
    assert info.value.opcode == vfs.Op.LOOKUP
    with pytest.raises(vfs.FuseError, match="ENOENT"):
        await fs.read_file("dir/missing")
    assert rig.fs.outstanding_lookups() == {}


def _tamper_unique(seen, reply):
    return reply[:8] + struct.pack("<Q", seen.unique + 2) + reply[16:]


def _tamper_len(seen, reply):
    return struct.pack("<I", len(reply) + 8) + reply[4:]


def _tamper_error_payload(seen, reply):
    return struct.pack("<IiQ", 24, -errno.EIO, seen.unique) + bytes(8)


def _tamper_positive_error(seen, reply):
    return struct.pack("<IiQ", 16, 5, seen.unique)


def _tamper_short(seen, reply):
    return reply[:12]


@pytest.mark.parametrize("tamper, message", [
    (_tamper_unique, "reply to unique 6, the request was 4"),
    (_tamper_len, "fuse_out_header.len 152 but the device wrote 144"),
    (_tamper_error_payload, "error reply 5 carries 8 bytes"),
    (_tamper_positive_error, "error 5 is not 0 or a negative errno"),
    (_tamper_short, "wrote 12 bytes, less than a fuse_out_header"),
])
async def test_replies_that_break_the_protocol(nursery, tamper, message):
    rig = Rig(nursery)
    fs = await rig.open()
    rig.fs.add(1, b"f", data=b"x")
    rig.fs.tamper = tamper
    with pytest.raises(vfs.FuseProtocolError, match=message):
        await fs.lookup(1, "f")


def test_readdirplus_reply_parse_from_bytes():
    def attr(ino, mode):
        # fuse_attr: ino, size, blocks, atime, mtime, ctime, 3 x nsec, mode, nlink, uid, gid, rdev, blksize, flags
        return struct.pack("<6Q10I", ino, 11, 1, 0, 0, 0, 0, 0, 0, mode, 1, 0, 0, 0, 4096, 0)

    def entry_out(nodeid, ino, mode):
        return struct.pack("<4Q2I", nodeid, 0, 1, 1, 0, 0) + attr(ino, mode)

    dot = entry_out(0, 0, 0o040000) + struct.pack("<QQII", 5, 1, 1, 4) + b"." + bytes(7)
    assert len(dot) == 160  # 152 + 1, padded to 8
    hello = entry_out(42, 77, 0o100644) + struct.pack("<QQII", 77, 2, 9, 8) + b"hello.txt" + bytes(7)
    assert len(hello) == 168  # 152 + 9, padded to 8
    longest = entry_out(43, 78, 0o100644) + struct.pack("<QQII", 78, 3, 16, 8) + b"sixteen-bytes-xx"
    assert len(longest) == 168  # already aligned
    entries = vfs.parse_direntplus(dot + hello + longest)
    assert [(e.name, e.ino, e.off, e.type, e.entry.nodeid) for e in entries] == [
        (b".", 5, 1, 4, 0), (b"hello.txt", 77, 2, 8, 42), (b"sixteen-bytes-xx", 78, 3, 8, 43)]
    assert entries[1].entry.attr.size == 11 and entries[1].entry.attr.is_reg
    assert entries[0].entry.attr.is_dir
    assert entries[1].fsname == "hello.txt"
    # pack_direntplus (the fake's) lays records out the same way
    assert vfs.pack_direntplus(b"hello.txt", entries[1].entry, 2, 8) == hello
    assert vfs.parse_direntplus(b"") == []

    with pytest.raises(vfs.FuseProtocolError, match="less than a fuse_direntplus"):
        vfs.parse_direntplus(dot + hello[:100])
    with pytest.raises(vfs.FuseProtocolError, match="runs past"):
        vfs.parse_direntplus(dot + hello[:155])
    zero_name = entry_out(0, 0, 0) + struct.pack("<QQII", 1, 1, 0, 4)
    with pytest.raises(vfs.FuseProtocolError, match="name length 0"):
        vfs.parse_direntplus(zero_name)


def test_names_and_paths():
    assert vfs.fuse_name("a b") == b"a b\0"
    for bad in ("", ".", "..", "a/b", "a\0b"):
        with pytest.raises(ValueError):
            vfs.fuse_name(bad)
    assert vfs.split_path("/a//b/./c/") == [b"a", b"b", b"c"]
    assert vfs.split_path("/") == []
    with pytest.raises(ValueError):
        vfs.split_path("a/../b")


# -- the file operations -----------------------------------------------------------


@pytest.mark.parametrize("dma_mode", DMA_MODES)
async def test_write_read_and_list_through_fuse(nursery, dma_mode):
    rig = Rig(nursery, dma_mode=dma_mode)
    sub = rig.fs.add(1, b"sub")
    rig.fs.add(sub, b"host.txt", data=b"from the host\n")
    fs = await rig.open()
    rings = rig.alloc.allocation_count
    assert await fs.read_file("/sub/host.txt") == b"from the host\n"
    payload = bytes(range(256)) * 40  # 10 KiB
    await fs.write_file("sub/new.bin", payload)
    assert bytes(rig.fs.nodes[rig.fs.nodes[sub].children[b"new.bin"]].data) == payload
    assert await fs.read_file("sub/new.bin") == payload
    assert sorted(await fs.listdir("/sub")) == ["host.txt", "new.bin"]
    assert await fs.listdir("/") == ["sub"]
    st = await fs.stat("sub/new.bin")
    assert st.size == len(payload) and st.is_reg
    assert (await fs.stat("/")).is_dir
    # Every lookup count given back, every handle released, no buffer left.
    assert rig.fs.outstanding_lookups() == {}
    assert rig.fs.open_fhs == {}
    assert rig.alloc.allocation_count == rings
    if dma_mode == "grant":
        assert_dma_state(dma_mode, rig.dma, rig.guest.grants, rig.dev.dma_addrs, ring_blocks=2)


async def test_write_file_of_a_new_file_is_lookup_create_writes_flush_release_forget(nursery):
    rig = Rig(nursery, fs=FakeFuseFs(max_write=8192, max_pages=2))
    fs = await rig.open()
    payload = b"\x5a" * 20000
    rig.fs.seen.clear()
    await fs.write_file("big", payload)
    ops = [s.opcode for s in rig.fs.seen]
    assert ops == [vfs.Op.LOOKUP, vfs.Op.CREATE, vfs.Op.WRITE, vfs.Op.WRITE, vfs.Op.WRITE, vfs.Op.FLUSH,
                   vfs.Op.RELEASE, vfs.Op.FORGET]
    create = rig.fs.seen[1]
    flags, mode, umask, open_flags = vfs.CREATE_IN.unpack_from(create.body)
    assert (flags, mode, umask) == (vfs.O_WRONLY | vfs.O_CREAT | vfs.O_EXCL | vfs.O_TRUNC, 0o100644, 0o022)
    assert create.body[16:] == b"big\0"
    assert create.readable == [40, 16, 4] and create.writable == [16, 128, 16]
    writes = [s for s in rig.fs.seen if s.opcode == vfs.Op.WRITE]
    assert [vfs.WRITE_IN.unpack_from(w.body)[1:3] for w in writes] == [(0, 8192), (8192, 8192), (16384, 3616)]
    for w in writes:
        # header, fuse_write_in, the data in its own page-aligned buffer
        assert w.readable == [40, 40, vfs.WRITE_IN.unpack_from(w.body)[2]]
        assert w.chain.readable[2][0] % 4096 == 0
        assert w.writable == [16, 8]
    forget = rig.fs.seen[-1]
    assert forget.queue == vfs.HIPRIO_QUEUE
    assert forget.readable == [48] and forget.writable == []
    assert forget.nodeid == rig.fs.nodes[1].children[b"big"]
    assert vfs.FORGET_IN.unpack_from(forget.body) == (1,)
    assert rig.fs.outstanding_lookups() == {}
    assert bytes(rig.fs.nodes[forget.nodeid].data) == payload


@pytest.mark.parametrize("atomic_o_trunc", [True, False])
async def test_write_file_over_an_existing_file_opens_it_with_o_trunc(nursery, atomic_o_trunc):
    flags = vfs.FUSE_MAX_PAGES | (vfs.FUSE_ATOMIC_O_TRUNC if atomic_o_trunc else 0)
    rig = Rig(nursery, fs=FakeFuseFs(init_flags=flags))
    node = rig.fs.add(1, b"old", data=b"a much longer old content")
    fs = await rig.open()
    rig.fs.seen.clear()
    await fs.write_file("/old", b"new")
    assert bytes(rig.fs.nodes[node].data) == b"new"
    ops = [s.opcode for s in rig.fs.seen]
    truncate = [] if atomic_o_trunc else [vfs.Op.SETATTR]
    assert ops == [vfs.Op.LOOKUP, vfs.Op.OPEN, *truncate, vfs.Op.WRITE, vfs.Op.FLUSH, vfs.Op.RELEASE, vfs.Op.FORGET]
    assert vfs.OPEN_IN.unpack_from(rig.fs.seen[1].body)[0] == vfs.O_WRONLY | vfs.O_TRUNC
    assert rig.fs.outstanding_lookups() == {} and rig.fs.open_fhs == {}


async def test_write_file_racing_a_create_opens_what_appeared(nursery):
    rig = Rig(nursery)
    fs = await rig.open()

    def someone_creates_it(parent, name):
        rig.fs.on_enoent = None
        rig.fs.add(parent, name, data=b"theirs, longer")

    rig.fs.on_enoent = someone_creates_it
    rig.fs.seen.clear()
    await fs.write_file("raced", b"ours")
    assert [s.opcode for s in rig.fs.seen][:4] == [vfs.Op.LOOKUP, vfs.Op.CREATE, vfs.Op.LOOKUP, vfs.Op.OPEN]
    assert await fs.read_file("raced") == b"ours"
    assert rig.fs.outstanding_lookups() == {}


async def test_read_file_in_chunks_until_a_short_read(nursery):
    rig = Rig(nursery, fs=FakeFuseFs(max_write=8192, max_pages=2))
    rig.fs.add(1, b"f", data=b"abc" * 5000)  # 15000 bytes
    fs = await rig.open()
    rig.fs.seen.clear()
    assert await fs.read_file("f") == b"abc" * 5000
    reads = rig.requests(vfs.Op.READ)
    assert [vfs.READ_IN.unpack_from(r.body)[1:3] for r in reads] == [(0, 8192), (8192, 8192)]
    assert all(r.writable == [16, 8192] for r in reads)
    assert [s.opcode for s in rig.fs.seen] == [vfs.Op.LOOKUP, vfs.Op.OPEN, vfs.Op.READ, vfs.Op.READ,
                                               vfs.Op.RELEASE, vfs.Op.FORGET]
    # A file of exactly one chunk takes one more READ, which returns nothing.
    rig.fs.add(1, b"g", data=b"z" * 8192)
    assert await fs.read_file("g") == b"z" * 8192
    assert len(rig.requests(vfs.Op.READ)) == 4


async def test_listdir_continues_from_the_last_offset(nursery):
    rig = Rig(nursery)
    names = [f"file-{i:03d}-with-a-longer-name".encode() for i in range(40)]
    for name in names:
        rig.fs.add(1, name, data=b"")
    fs = await rig.open()
    rig.fs.seen.clear()
    assert await fs.listdir("/") == [n.decode() for n in names]
    calls = rig.requests(vfs.Op.READDIRPLUS)
    offsets = [vfs.READ_IN.unpack_from(c.body)[1] for c in calls]
    assert len(calls) > 2 and offsets[0] == 0 and offsets == sorted(offsets)
    assert all(c.writable == [16, 4096] for c in calls)
    assert rig.requests(vfs.Op.RELEASEDIR) and rig.fs.outstanding_lookups() == {}
    entries = await fs.scandir("/")
    assert [e.name for e in entries[:2]] == [b".", b".."]
    assert {e.entry.nodeid for e in entries[:2]} == {0}


async def test_unique_ids_go_up_by_two_and_carry_the_caller(nursery):
    rig = Rig(nursery)
    drv = await vfs.VirtioFsDriver.open(rig.t, uid=1000, gid=100, pid=77)
    rig.fs.add(1, b"f", data=b"1")
    await drv.read_file("f")
    uniques = [s.unique for s in rig.fs.seen]
    assert uniques == list(range(2, 2 * len(uniques) + 1, 2))
    assert {s.header[4:7] for s in rig.fs.seen} == {(1000, 100, 77)}


async def test_close_sends_destroy_and_resets(nursery):
    rig = Rig(nursery)
    fs = await rig.open()
    await fs.close()
    assert rig.fs.destroyed == 1 and rig.requests()[-1].opcode == vfs.Op.DESTROY
    assert rig.dev.status == 0 and rig.t.queues == {}
    assert rig.alloc.allocation_count == 0
    # A new probe and INIT start another session.
    fs = await rig.open()
    rig.fs.add(1, b"f", data=b"again")
    assert await fs.read_file("f") == b"again"


async def test_a_device_that_breaks_the_ring_keeps_the_buffers(nursery):
    rig = Rig(nursery)
    fs = await rig.open()
    rig.fs.add(1, b"f", data=b"x")
    allocated = rig.alloc.allocation_count

    def lie(dev, queue, chain):
        return sum(n for _, n in chain.writable) + 1  # more than the chain's writable space

    rig.dev.handler = lie
    with pytest.raises(DeviceMisbehaved):
        await fs.lookup(1, "f")
    # The device may still write them: neither the request's buffer nor
    # its indirect table is given back before a reset.
    assert rig.alloc.allocation_count == allocated + 2
    assert rig.t.queues[vfs.REQUEST_QUEUE].broken
    # The path helpers do not pile a FORGET error onto the first one.
    rig.dev.handler = rig.fs
    with pytest.raises(DeviceMisbehaved):
        await fs.read_file("f")
    assert rig.fs.seen[-1].opcode == vfs.Op.INIT


async def test_requests_run_concurrently(nursery):
    rig = Rig(nursery, hold=True)
    rig.fs.got_init = True
    fs = await rig.open(init=False)
    fs.init_info = vfs.FuseInitInfo(7, 36, 0, 0, 0, 0, 1 << 20, 1, 256, 0, 0)
    for i in range(4):
        rig.fs.add(1, f"n{i}".encode(), data=b"")
    results = {}

    async def one(i):
        results[i] = (await fs.lookup(1, f"n{i}")).nodeid

    async with trio.open_nursery() as inner:
        for i in range(4):
            inner.start_soon(one, i)
        await trio.testing.wait_all_tasks_blocked()
        pending = rig.dev.pending[vfs.REQUEST_QUEUE]
        assert len(pending) == 4
        rig.dev.serve(vfs.REQUEST_QUEUE, list(reversed(pending)))
        rig.dev.pending[vfs.REQUEST_QUEUE] = []
    # Answered in reverse order, each caller got its own node.
    assert results == {i: 2 + i for i in range(4)}
    assert rig.t.queues[vfs.REQUEST_QUEUE].peak_in_flight == 4
