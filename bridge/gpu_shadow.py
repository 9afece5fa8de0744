"""virtio-gpu under shadow memory: resource backings copied into the arena.

A virtio-gpu 2D guest names its resources' backing pages by guest address
inside RESOURCE_ATTACH_BACKING (struct virtio_gpu_mem_entry {le64 addr;
le32 length; le32 padding} after the request), and vhost-user-gpu maps
those pages itself at attach time and reads them at every
TRANSFER_TO_HOST_2D. With shadow memory the daemon's memory table is the
arena alone, so this layer, the control queue's
:class:`bridge.shadow_ring.ChainHook`, gives each backing an arena copy:

- RESOURCE_ATTACH_BACKING: the entries are checked (all inside the
  request, none empty, each in guest RAM or a grant address), an arena
  buffer of their total length is allocated, the guest's backing copied
  in, and the command rewritten to one entry naming that buffer (the other
  entries zeroed: the daemon never sees a guest address). The buffer is
  the resource's once the daemon answers OK, and freed if it refuses.
- TRANSFER_TO_HOST_2D: before the daemon sees the command, the bytes it
  will read are copied from the guest's backing into the arena copy: the
  rectangle's rows (vhost-user-gpu reads ``width * 4`` bytes at ``offset
  + stride * row`` for each row, stride ``resource width * 4``: every 2D
  format is 32 bits a pixel), or the whole image for a full-width transfer
  at offset 0, exactly as vg_transfer_to_host_2d does; the whole backing
  when the resource's size is unknown (it was created before this layer
  saw it).
- RESOURCE_DETACH_BACKING and RESOURCE_UNREF: the arena copy is freed once
  the daemon has returned the command (it then holds no pointer into it);
  a TRANSFER sent after them copies nothing.
- :meth:`GpuShadow.reset` (queue or device reset, the daemon lost): every
  copy freed.

2D only: with shadow memory the device does not offer VIRTIO_GPU_F_VIRGL
nor VIRTIO_GPU_F_RESOURCE_BLOB (:data:`GPU_SHADOW_UNSUPPORTED_FEATURES`).

Bounds. Backings stay in the arena for as long as the guest keeps them
attached, so they are kept from taking the space every other request
needs: a backing is only allocated if ``headroom`` bytes of the arena stay
free in one piece. One that cannot be (larger than the arena, or the
arena full of other backings) is answered by the bridge with
VIRTIO_GPU_RESP_ERR_OUT_OF_MEMORY; only when requests in flight hold
space that their completion frees does the command wait for it instead.
A malformed ATTACH_BACKING (no entries, more than vhost-user-gpu's 16384,
more than the request holds, an empty entry, an address outside guest RAM
or a grant that cannot be mapped) is answered with
VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER, as is a TRANSFER whose backing can
no longer be read; each is logged with the reason (the first
:data:`LOUD_REFUSALS` as warnings). Other commands pass unchanged.

The daemon is not trusted: requests are parsed from the bridge's own copy
of what the guest gave (the daemon can write the arena at any time), its
answers only decide when a copy is freed, and every copy is freed at most
once and never written after, whatever order the answers come in.

The rows a partial transfer copies assume vhost-user-gpu's own buffers
(memory or udmabuf: rows ``width * 4`` bytes apart); a daemon started with
``--render-node`` (gbm buffers, rows possibly padded) is not covered.
"""

from __future__ import annotations

import bisect
import logging
import struct

from bridge.arena import Arena
from bridge.memory import OutsideGuestRam
from bridge.shadow_ring import WAIT, Answered, ChainBytes, GuestMemory

log = logging.getLogger(__name__)

GPU_CONTROL_QUEUE = 0

VIRTIO_GPU_F_VIRGL = 0
VIRTIO_GPU_F_RESOURCE_BLOB = 3
GPU_SHADOW_UNSUPPORTED_FEATURES = 1 << VIRTIO_GPU_F_VIRGL | 1 << VIRTIO_GPU_F_RESOURCE_BLOB
"""Not offered the guest with shadow memory: 3D transfers write into the
backing (a copy back this layer does not make) and blob resources name
guest memory in RESOURCE_CREATE_BLOB. vhost-user-gpu 7.2 offers VIRGL
only with --virgl, and no blobs."""

CMD_RESOURCE_CREATE_2D = 0x0101
CMD_RESOURCE_UNREF = 0x0102
CMD_TRANSFER_TO_HOST_2D = 0x0105
CMD_RESOURCE_ATTACH_BACKING = 0x0106
CMD_RESOURCE_DETACH_BACKING = 0x0107
RESP_OK_NODATA = 0x1100
RESP_ERR_OUT_OF_MEMORY = 0x1201
RESP_ERR_INVALID_PARAMETER = 0x1205
FLAG_FENCE = 1

CTRL_HDR = struct.Struct("<IIQIB3x")  # type, flags, fence_id, ctx_id, ring_idx
CREATE_2D = struct.Struct("<IIII")  # resource_id, format, width, height
RESOURCE_ID = struct.Struct("<I")  # unref / detach: resource_id, padding
TRANSFER = struct.Struct("<IIIIQII")  # rect x, y, width, height; offset; resource_id, padding
ATTACH = struct.Struct("<II")  # resource_id, nr_entries
MEM_ENTRY = struct.Struct("<QII")  # addr, length, padding

MAX_ENTRIES = 16384
"""vhost-user-gpu's limit on nr_entries (vg_create_mapping_iov)."""
BYTES_PER_PIXEL = 4
"""Every virtio-gpu 2D format is 32 bits a pixel."""
DEFAULT_HEADROOM = 512 << 10
"""Arena bytes kept free in one piece beside the backings, for the
requests in flight on every queue of the device."""
LOUD_REFUSALS = 10
"""Refusals logged as warnings; later ones are logged at debug level."""
_ADDR_LIMIT = 1 << 64
_U32 = 0xFFFFFFFF


class _Backing:
    """One arena copy of a resource's backing."""

    __slots__ = ("resource_id", "offset", "size", "starts", "addrs", "lengths", "seq", "attached", "freed")

    def __init__(self, resource_id: int, offset: int, entries: list[tuple[int, int]], seq: int) -> None:
        self.resource_id = resource_id
        self.offset = offset
        self.addrs = [a for a, _ in entries]
        self.lengths = [n for _, n in entries]
        self.starts = []
        at = 0
        for n in self.lengths:
            self.starts.append(at)
            at += n
        self.size = at
        self.seq = seq
        self.attached = False  # the daemon answered OK: it is the resource's
        self.freed = False


class GpuShadow:
    """The control queue's :class:`bridge.shadow_ring.ChainHook` for one
    virtio-gpu device. ``guest`` is the shadow rings' guest memory (grant
    addresses included), ``arena`` the device's arena, ``arena_gpa`` where
    the daemon sees it."""

    def __init__(self, guest: GuestMemory, arena: Arena, arena_gpa: int, *, headroom: int = DEFAULT_HEADROOM,
                 label: str = "virtio-gpu") -> None:
        self.guest = guest
        self.arena = arena
        self.arena_gpa = arena_gpa
        self.headroom = headroom
        self.label = label
        self._sizes: dict[int, tuple[int, int]] = {}  # resource id -> (width, height), created OK
        self._latest: dict[int, _Backing] = {}  # what the daemon will hold when it reaches the next command
        self._attached: dict[int, _Backing] = {}  # what the daemon holds (answered OK)
        self._live: list[_Backing] = []  # every copy not freed
        self._seq = 0
        self.bytes_copied = 0
        """Guest bytes copied into backings so far (attach and transfers)."""
        self.refused = 0
        """Commands answered here with an error."""

    @property
    def backing_bytes(self) -> int:
        """Arena bytes held by backings now."""
        return sum(b.size for b in self._live)

    @property
    def backings(self) -> int:
        return len(self._live)

    # -- the hook ------------------------------------------------------------

    def before_publish(self, chain: ChainBytes) -> object:
        if chain.request_size < CTRL_HDR.size:
            return None  # the daemon answers what it cannot read
        hdr = chain.read(0, CTRL_HDR.size)
        cmd = CTRL_HDR.unpack(hdr)[0]
        body = chain.request_size - CTRL_HDR.size
        if cmd == CMD_RESOURCE_ATTACH_BACKING and body >= ATTACH.size:
            return self._attach(chain, hdr)
        if cmd == CMD_TRANSFER_TO_HOST_2D and body >= TRANSFER.size:
            return self._transfer(chain, hdr)
        if cmd in (CMD_RESOURCE_DETACH_BACKING, CMD_RESOURCE_UNREF) and body >= RESOURCE_ID.size:
            (rid,) = RESOURCE_ID.unpack(chain.read(CTRL_HDR.size, RESOURCE_ID.size))
            self._latest.pop(rid, None)  # commands after this one find no backing at the daemon
            self._seq += 1
            return ("release", cmd, rid, self._seq)
        if cmd == CMD_RESOURCE_CREATE_2D and body >= CREATE_2D.size:
            rid, _fmt, width, height = CREATE_2D.unpack(chain.read(CTRL_HDR.size, CREATE_2D.size))
            return ("create", rid, width, height)
        return None

    def after_return(self, chain: ChainBytes, used_len: int, cookie: object) -> None:
        if cookie is None:
            return
        resp = chain.read_response(min(used_len, CTRL_HDR.size))
        ok = len(resp) == CTRL_HDR.size and CTRL_HDR.unpack(resp)[0] == RESP_OK_NODATA
        kind = cookie[0]
        if kind == "attach":
            backing = cookie[1]
            if backing.freed:
                return
            rid = backing.resource_id
            if not ok:
                self._free(backing)
                return
            old = self._attached.get(rid)
            if old is not None and old is not backing:
                self._free(old)  # the daemon replaced it
            backing.attached = True
            self._attached[rid] = backing
        elif kind == "release":
            _, cmd, rid, seq = cookie
            # The daemon dropped the backing: every copy for the resource
            # attached before this command goes (later ones are not its).
            for backing in [b for b in self._live if b.resource_id == rid and b.seq < seq]:
                self._free(backing)
            if cmd == CMD_RESOURCE_UNREF and ok:
                self._sizes.pop(rid, None)
        elif kind == "create" and ok:
            _, rid, width, height = cookie
            self._sizes[rid] = (width, height)

    def reset(self) -> None:
        for backing in list(self._live):
            self._free(backing)
        self._sizes.clear()
        self._latest.clear()
        self._attached.clear()

    # -- commands ------------------------------------------------------------

    def _attach(self, chain: ChainBytes, hdr: bytes) -> object:
        rid, count = ATTACH.unpack(chain.read(CTRL_HDR.size, ATTACH.size))
        first = CTRL_HDR.size + ATTACH.size
        if count == 0:
            return self._refuse(chain, hdr, RESP_ERR_INVALID_PARAMETER, f"ATTACH_BACKING of resource {rid}: no entries")
        if count > MAX_ENTRIES:
            return self._refuse(chain, hdr, RESP_ERR_INVALID_PARAMETER,
                                f"ATTACH_BACKING of resource {rid}: {count} entries, more than {MAX_ENTRIES}")
        if first + count * MEM_ENTRY.size > chain.request_size:
            return self._refuse(chain, hdr, RESP_ERR_INVALID_PARAMETER,
                                f"ATTACH_BACKING of resource {rid}: {count} entries need "
                                f"{count * MEM_ENTRY.size} bytes, the request holds "
                                f"{chain.request_size - first}")
        raw = chain.read(first, count * MEM_ENTRY.size)
        entries = []
        total = 0
        for i in range(count):
            addr, length, _pad = MEM_ENTRY.unpack_from(raw, i * MEM_ENTRY.size)
            problem = None
            if length == 0:
                problem = "is empty"
            elif addr + length > _ADDR_LIMIT:
                problem = f"wraps ({addr:#x} + {length:#x})"
            else:
                try:
                    self.guest.check_range(addr, length)
                except OutsideGuestRam:
                    problem = f"is outside guest RAM ({addr:#x} + {length:#x})"
            if problem:
                return self._refuse(chain, hdr, RESP_ERR_INVALID_PARAMETER,
                                    f"ATTACH_BACKING of resource {rid}: entry {i} {problem}")
            entries.append((addr, length))
            total += length
        arena = self.arena
        if total > _U32 or not arena.fits_ever(total + self.headroom):
            return self._refuse(chain, hdr, RESP_ERR_OUT_OF_MEMORY,
                                f"ATTACH_BACKING of resource {rid}: a {total}-byte backing does not fit the "
                                f"{arena.size}-byte arena (--arena-mib) with {self.headroom} bytes to spare")
        offset = arena.alloc(total)
        if offset is not None and arena.largest_free < self.headroom:
            arena.free(offset)
            offset = None
        if offset is None:
            # Requests in flight (this one's own buffer aside) free space
            # when they complete; backings only when the guest lets them go.
            if arena.allocation_count - len(self._live) > 1:
                return WAIT
            return self._refuse(chain, hdr, RESP_ERR_OUT_OF_MEMORY,
                                f"ATTACH_BACKING of resource {rid}: no room for a {total}-byte backing "
                                f"({len(self._live)} backings hold {self.backing_bytes} bytes of the "
                                f"{arena.size}-byte arena)")
        self._seq += 1
        backing = _Backing(rid, offset, entries, self._seq)
        self._live.append(backing)
        try:
            self._copy_in(backing, [(0, total)])
        except OutsideGuestRam as exc:
            self._free(backing)
            return self._refuse(chain, hdr, RESP_ERR_INVALID_PARAMETER,
                                f"ATTACH_BACKING of resource {rid}: the backing cannot be read ({exc})")
        chain.write(CTRL_HDR.size + 4, struct.pack("<I", 1))
        chain.write(first, MEM_ENTRY.pack(self.arena_gpa + offset, total, 0) + bytes((count - 1) * MEM_ENTRY.size))
        self._latest[rid] = backing
        return ("attach", backing)

    def _transfer(self, chain: ChainBytes, hdr: bytes) -> object:
        x, y, width, height, offset, rid, _pad = TRANSFER.unpack(chain.read(CTRL_HDR.size, TRANSFER.size))
        backing = self._latest.get(rid)
        if backing is None:
            return None  # no backing at the daemon: it refuses the command
        try:
            self._copy_in(backing, transfer_ranges(self._sizes.get(rid), x, y, width, height, offset, backing.size))
        except OutsideGuestRam as exc:
            return self._refuse(chain, hdr, RESP_ERR_INVALID_PARAMETER,
                                f"TRANSFER_TO_HOST_2D of resource {rid}: the backing cannot be read ({exc})")
        return None

    # -- helpers -------------------------------------------------------------

    def _copy_in(self, backing: _Backing, ranges: list[tuple[int, int]]) -> None:
        """Guest backing bytes [start, start + length) of each range into
        the arena copy."""
        buf = self.arena.buf
        read = self.guest.read
        base = backing.offset
        starts, addrs, lengths = backing.starts, backing.addrs, backing.lengths
        for start, length in ranges:
            i = bisect.bisect_right(starts, start) - 1
            at, end = start, start + length
            while at < end:
                skip = at - starts[i]
                n = min(lengths[i] - skip, end - at)
                buf[base + at:base + at + n] = read(addrs[i] + skip, n)
                at += n
                i += 1
            self.bytes_copied += length

    def _free(self, backing: _Backing) -> None:
        if backing.freed:
            return
        backing.freed = True
        self.arena.free(backing.offset)
        self._live.remove(backing)
        rid = backing.resource_id
        if self._latest.get(rid) is backing:
            attached = self._attached.get(rid)
            if attached is not None and attached is not backing:
                self._latest[rid] = attached
            else:
                del self._latest[rid]
        if self._attached.get(rid) is backing:
            del self._attached[rid]

    def _refuse(self, chain: ChainBytes, hdr: bytes, code: int, why: str) -> Answered:
        """Answer the command with an error response written here."""
        _type, flags, fence_id, ctx_id, _ring = CTRL_HDR.unpack(hdr)
        if flags & FLAG_FENCE:
            resp = CTRL_HDR.pack(code, FLAG_FENCE, fence_id, ctx_id, 0)
        else:
            resp = CTRL_HDR.pack(code, 0, 0, 0, 0)
        self.refused += 1
        # A guest can send these in a loop: the first few are warnings.
        log.log(logging.WARNING if self.refused <= LOUD_REFUSALS else logging.DEBUG, "%s: %s; answered %s",
                self.label, why, "ERR_OUT_OF_MEMORY" if code == RESP_ERR_OUT_OF_MEMORY else "ERR_INVALID_PARAMETER")
        return Answered(chain.write_response(resp))


def transfer_ranges(size: tuple[int, int] | None, x: int, y: int, width: int, height: int, offset: int,
                    backing_size: int) -> list[tuple[int, int]]:
    """The backing byte ranges vhost-user-gpu reads for a TRANSFER_TO_HOST_2D
    of a resource of ``size`` (width, height; None: unknown, so all of it),
    clipped to the backing, contiguous ones merged. A rectangle the daemon
    refuses reads nothing."""
    if size is None:
        return [(0, backing_size)]
    res_w, res_h = size
    if x > res_w or y > res_h or width > res_w or height > res_h or x + width > res_w or y + height > res_h:
        return []
    stride = res_w * BYTES_PER_PIXEL
    if not (offset or x or y or width != res_w):
        return [(0, min(stride * res_h, backing_size))]
    row = width * BYTES_PER_PIXEL
    ranges: list[tuple[int, int]] = []
    for r in range(height):
        start = (offset + stride * r) & _U32  # the daemon's uint32_t src_offset
        n = min(row, backing_size - start)
        if n <= 0:
            continue
        if ranges and ranges[-1][0] + ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], ranges[-1][1] + n)
        else:
            ranges.append((start, n))
    return ranges
