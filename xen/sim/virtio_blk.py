"""The simulated guest's virtio-blk driver (virtio 1.2 section 5.2).

Modelled on Linux's drivers/block/virtio_blk.c. Each request is one chain::

    struct virtio_blk_req {          device-readable: header (16 bytes)
        le32 type; le32 reserved; le64 sector;
        u8 data[];                   OUT: device-readable, IN: device-writable
        u8 status;                   device-writable (1 byte)
    };

The data is split into segments of at most ``size_max`` bytes
(VIRTIO_BLK_F_SIZE_MAX), at most ``seg_max`` of them per request
(VIRTIO_BLK_F_SEG_MAX; like Linux, one segment per request without it) and
never more than fit the queue with the header and status; a read or write
larger than one request can carry is split into several requests issued
concurrently, as the block layer splits a bio. With VIRTIO_BLK_F_MQ, the
request goes to the queue of the vCPU that issues it (vCPU index modulo the
number of queues), and that vCPU sends the notification, as blk-mq maps
CPUs to hardware queues.

Header and status share one small allocation (as in Linux's struct
virtblk_req); data buffers come from the GuestAllocator and go back once
the device has returned the chain, even if the caller was cancelled in the
meantime. A request the device never returned because it misbehaved keeps
its buffers: the device may still write them.

The driver deals in guest-physical addresses only. What the device is
given is up to the transport's DMA layer (``VirtioMmioDriver(..., dma=)``,
see xen/sim/guest_dma.py): the virtqueue maps the header, data segments and
status byte of each request (with Xen grants: grants them to the backend)
and unmaps them before the request completes, so by the time the data is
read back from guest RAM or the buffers are freed, the device has no access
to them any more.
"""

from __future__ import annotations

import logging
import struct
from typing import Any

import trio

from xen.sim.guest_virtqueue import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    Completion,
    GuestVirtqueue,
    VirtioDriverError,
)
from xen.sim.virtio_mmio_driver import VIRTIO_F_VERSION_1, VirtioMmioDriver

logger = logging.getLogger(__name__)

VIRTIO_ID_BLOCK = 2

# Feature bits (5.2.3).
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

# Request types and status values (5.2.6).
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8

VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2
STATUS_NAMES = {VIRTIO_BLK_S_OK: "OK", VIRTIO_BLK_S_IOERR: "IOERR", VIRTIO_BLK_S_UNSUPP: "UNSUPP"}

SECTOR_SIZE = 512
VIRTIO_BLK_ID_BYTES = 20

# struct virtio_blk_config offsets (5.2.4).
CFG_CAPACITY = 0
CFG_SIZE_MAX = 8
CFG_SEG_MAX = 12
CFG_GEOMETRY = 16
CFG_BLK_SIZE = 20
CFG_TOPOLOGY = 24
CFG_WRITEBACK = 32
CFG_NUM_QUEUES = 34

OUTHDR = struct.Struct("<IIQ")
"""struct virtio_blk_outhdr: le32 type, le32 reserved, le64 sector."""

STATUS_UNWRITTEN = 0xFF
"""Put in the status byte before submitting, to spot a device that never wrote it."""

DEFAULT_FEATURES = (
    1 << VIRTIO_F_VERSION_1
    | 1 << VIRTIO_BLK_F_SIZE_MAX
    | 1 << VIRTIO_BLK_F_SEG_MAX
    | 1 << VIRTIO_BLK_F_RO
    | 1 << VIRTIO_BLK_F_BLK_SIZE
    | 1 << VIRTIO_BLK_F_FLUSH
    | 1 << VIRTIO_BLK_F_MQ
    | 1 << VIRTIO_F_INDIRECT_DESC
    | 1 << VIRTIO_F_EVENT_IDX
)
"""What the driver accepts by default: the features it implements."""

DEFAULT_MAX_SECTORS = 2560
"""Largest request in sectors (the block layer's classic BLK_DEF_MAX_SECTORS)."""

DEFAULT_SEGMENT_SIZE = 65536
"""Segment size limit when the device offers SIZE_MAX but size_max is 0
(the block layer's BLK_MAX_SEGMENT_SIZE)."""

DATA_ALIGN = SECTOR_SIZE
"""Alignment of data buffers (Linux's virtio-blk dma_alignment is 511)."""


class VirtioBlkError(VirtioDriverError):
    """A virtio-blk device cannot be used, or a request cannot be made."""


class BlkIoError(VirtioBlkError):
    """The device completed a request with a status other than VIRTIO_BLK_S_OK."""

    def __init__(self, status: int, req_type: int, sector: int) -> None:
        self.status = status
        self.req_type = req_type
        self.sector = sector
        name = STATUS_NAMES.get(status, "not a virtio-blk status" if status != STATUS_UNWRITTEN
                                else "status byte not written")
        super().__init__(f"virtio-blk request type {req_type} at sector {sector} failed: status {status} ({name})")


class BlkReadOnly(VirtioBlkError):
    """A write to a device that offered VIRTIO_BLK_F_RO."""


def _header(req_type: int, sector: int) -> bytes:
    return OUTHDR.pack(req_type, 0, sector)


def _segments(gpa: int, length: int, max_segment: int) -> list[tuple[int, int]]:
    return [(gpa + off, min(max_segment, length - off)) for off in range(0, length, max_segment)]


class VirtioBlkDriver:
    """A virtio-blk device driven over a :class:`VirtioMmioDriver`. Create
    it with ``await VirtioBlkDriver.open(transport)``."""

    def __init__(self, transport: VirtioMmioDriver) -> None:
        self.transport = transport
        self.queues: list[GuestVirtqueue] = []
        self.capacity = 0
        """Capacity in 512-byte sectors."""
        self.read_only = False
        self.block_size = SECTOR_SIZE
        self.size_max: int | None = None
        self.seg_max: int | None = None
        self.device_num_queues = 1
        self.max_segment_size = 0
        self.max_segments = 0
        self.max_request_bytes = 0

    # -- setup --------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        transport: VirtioMmioDriver,
        queue_size: int | None = None,
        *,
        features: int = DEFAULT_FEATURES,
        num_queues: int | None = None,
        max_segment_size: int | None = None,
        max_sectors: int = DEFAULT_MAX_SECTORS,
        separate_rings: bool = False,
        vcpu: Any = None,
    ) -> VirtioBlkDriver:
        """Probe the device, negotiate ``features`` (its intersection with
        what the device offers), read the config, set up the request queues
        (with MQ: as many as the device has, at most ``num_queues``, by
        default one per guest vCPU) and set DRIVER_OK.

        ``max_segment_size`` further limits segments below ``size_max`` (to
        produce more scatter-gather); ``max_sectors`` limits one request."""
        if max_sectors < 1:
            raise ValueError("max_sectors must be at least 1")
        if max_segment_size is not None and max_segment_size < 1:
            raise ValueError("max_segment_size must be positive")
        self = cls(transport)
        t = transport
        v = t.pick_vcpu(vcpu)
        await t.probe(features, device_id=VIRTIO_ID_BLOCK, vcpu=v)
        try:
            await self._configure(queue_size, num_queues, max_segment_size, max_sectors, separate_rings, v)
        except VirtioDriverError:
            # virtio_dev_probe's error path: tell the device the driver gave up.
            await t.fail(vcpu=v)
            raise
        await t.driver_ok(vcpu=v)
        t.on_config_change(self._config_changed)
        logger.debug("virtio-blk at %#x: %d sectors, %d queue(s) of %d, segments %d x %d bytes, features %#x",
                     t.base, self.capacity, len(self.queues), self.queues[0].size, self.max_segments,
                     self.max_segment_size, t.features)
        return self

    async def _configure(self, queue_size: int | None, num_queues: int | None, max_segment_size: int | None,
                         max_sectors: int, separate_rings: bool, v: Any) -> None:
        t = self.transport
        # Same order as virtblk_probe: seg_max, queues, size_max, blk_size, capacity.
        if t.has_feature(VIRTIO_BLK_F_SEG_MAX):
            self.seg_max = await t.read_config(CFG_SEG_MAX, 4, vcpu=v)
        segments = self.seg_max or 1

        nq = 1
        if t.has_feature(VIRTIO_BLK_F_MQ):
            nq = await t.read_config(CFG_NUM_QUEUES, 2, vcpu=v)
            if nq == 0:
                raise VirtioBlkError("virtio-blk: MQ negotiated but num_queues is 0")
        self.device_num_queues = nq
        if num_queues is None:
            num_queues = len(getattr(t.guest, "vcpus", ())) or 1
        nq = max(1, min(nq, num_queues))
        for index in range(nq):
            self.queues.append(await t.setup_queue(index, queue_size, vcpu=v, separate_rings=separate_rings))

        if t.has_feature(VIRTIO_BLK_F_RO):
            self.read_only = True
        segment_size = 0xFFFFFFFF
        if t.has_feature(VIRTIO_BLK_F_SIZE_MAX):
            self.size_max = await t.read_config(CFG_SIZE_MAX, 4, vcpu=v)
            if self.size_max:
                segment_size = self.size_max
            else:
                # qemu-storage-daemon's vhost-user-blk export offers SIZE_MAX
                # with size_max 0. Linux's block layer takes a zero segment
                # size limit as "unset" and uses its default; so do we.
                logger.info("virtio-blk at %#x: size_max is 0, using %d-byte segments",
                            t.base, DEFAULT_SEGMENT_SIZE)
                segment_size = DEFAULT_SEGMENT_SIZE
        if max_segment_size is not None:
            segment_size = min(segment_size, max_segment_size)
        if t.has_feature(VIRTIO_BLK_F_BLK_SIZE):
            blk_size = await t.read_config(CFG_BLK_SIZE, 4, vcpu=v)
            if blk_size < SECTOR_SIZE or blk_size & (blk_size - 1) or blk_size > 65536:
                raise VirtioBlkError(f"virtio-blk: invalid block size {blk_size:#x}")
            self.block_size = blk_size
        await self.refresh_capacity(vcpu=v)

        # Header and status take two descriptors of the chain, which may not
        # be longer than the queue (also when it is an indirect table).
        queue_limit = min(vq.size for vq in self.queues) - 2
        if queue_limit < 1:
            raise VirtioBlkError(f"virtio-blk: queue size {queue_limit + 2} cannot hold a request")
        self.max_segments = min(segments, queue_limit)
        self.max_segment_size = segment_size
        limit = min(self.max_segments * segment_size, max_sectors * SECTOR_SIZE)
        self.max_request_bytes = limit - limit % SECTOR_SIZE
        if self.max_request_bytes < SECTOR_SIZE:
            raise VirtioBlkError(
                f"virtio-blk: {self.max_segments} segments of at most {segment_size} bytes cannot carry a sector"
            )

    async def refresh_capacity(self, *, vcpu: Any = None) -> int:
        """Re-read ``capacity`` from config space (a 64-bit field: two reads
        inside the ConfigGeneration loop)."""
        self.capacity = await self.transport.read_config(CFG_CAPACITY, 8, vcpu=vcpu)
        return self.capacity

    async def _config_changed(self) -> None:
        old = self.capacity
        await self.refresh_capacity()
        if self.capacity != old:
            logger.info("virtio-blk at %#x: capacity changed from %d to %d sectors",
                        self.transport.base, old, self.capacity)

    async def close(self, *, vcpu: Any = None) -> None:
        """Reset the device and free the queues (virtblk_remove)."""
        await self.transport.reset(vcpu=vcpu)
        self.queues = []

    # -- properties ---------------------------------------------------------

    @property
    def capacity_bytes(self) -> int:
        return self.capacity * SECTOR_SIZE

    @property
    def has_flush(self) -> bool:
        return self.transport.has_feature(VIRTIO_BLK_F_FLUSH)

    def queue_for(self, vcpu: Any = None) -> tuple[GuestVirtqueue, Any]:
        """The request queue a request from ``vcpu`` goes to, and the vCPU."""
        if not self.queues:
            raise VirtioBlkError("virtio-blk device is not open")
        v = self.transport.pick_vcpu(vcpu)
        return self.queues[getattr(v, "index", 0) % len(self.queues)], v

    # -- I/O ----------------------------------------------------------------

    def _check_range(self, sector: int, length: int) -> None:
        if length <= 0 or length % SECTOR_SIZE:
            raise ValueError(f"I/O length must be a positive multiple of {SECTOR_SIZE} bytes, not {length}")
        if sector < 0:
            raise ValueError(f"negative sector {sector}")
        if sector + length // SECTOR_SIZE > self.capacity:
            raise ValueError(
                f"I/O of {length // SECTOR_SIZE} sectors at sector {sector} goes beyond the capacity "
                f"of {self.capacity} sectors"
            )

    def _chunks(self, sector: int, length: int) -> list[tuple[int, int, int]]:
        """(sector, byte offset, byte length) of each request."""
        step = self.max_request_bytes
        return [(sector + off // SECTOR_SIZE, off, min(step, length - off)) for off in range(0, length, step)]

    async def read(self, sector: int, length: int, *, vcpu: Any = None) -> bytes:
        """Read ``length`` bytes (a multiple of 512) starting at ``sector``."""
        self._check_range(sector, length)
        chunks = self._chunks(sector, length)
        if len(chunks) == 1:
            return await self.request(VIRTIO_BLK_T_IN, sector, in_len=length, vcpu=vcpu)
        out = bytearray(length)

        async def one(chunk_sector: int, offset: int, chunk_len: int) -> None:
            out[offset:offset + chunk_len] = await self.request(VIRTIO_BLK_T_IN, chunk_sector, in_len=chunk_len,
                                                                vcpu=vcpu)

        async with trio.open_nursery() as nursery:
            for chunk in chunks:
                nursery.start_soon(one, *chunk)
        return bytes(out)

    async def write(self, sector: int, data: bytes, *, vcpu: Any = None) -> None:
        """Write ``data`` (a multiple of 512 bytes) starting at ``sector``."""
        if self.read_only:
            raise BlkReadOnly(f"virtio-blk at {self.transport.base:#x} is read-only (VIRTIO_BLK_F_RO)")
        data = bytes(data)
        self._check_range(sector, len(data))
        chunks = self._chunks(sector, len(data))
        if len(chunks) == 1:
            await self.request(VIRTIO_BLK_T_OUT, sector, out_data=data, vcpu=vcpu)
            return
        async with trio.open_nursery() as nursery:
            for chunk_sector, offset, chunk_len in chunks:
                nursery.start_soon(self._write_chunk, chunk_sector, data[offset:offset + chunk_len], vcpu)

    async def _write_chunk(self, sector: int, data: bytes, vcpu: Any) -> None:
        await self.request(VIRTIO_BLK_T_OUT, sector, out_data=data, vcpu=vcpu)

    async def flush(self, *, vcpu: Any = None) -> None:
        """VIRTIO_BLK_T_FLUSH (sector 0). Without VIRTIO_BLK_F_FLUSH the device
        has no volatile cache to flush and, as in Linux, nothing is sent."""
        if not self.has_flush:
            await trio.lowlevel.checkpoint()
            return
        await self.request(VIRTIO_BLK_T_FLUSH, 0, vcpu=vcpu)

    async def get_id(self, *, vcpu: Any = None) -> bytes:
        """VIRTIO_BLK_T_GET_ID: the device ID string (up to 20 bytes, NUL-padded
        by the device), without the padding."""
        raw = await self.request(VIRTIO_BLK_T_GET_ID, 0, in_len=VIRTIO_BLK_ID_BYTES, vcpu=vcpu)
        return raw.split(b"\0", 1)[0]

    async def request(
        self,
        req_type: int,
        sector: int = 0,
        *,
        out_data: bytes = b"",
        in_len: int = 0,
        vcpu: Any = None,
    ) -> bytes:
        """One raw virtio_blk_req: header, ``out_data`` (device-readable),
        ``in_len`` device-writable bytes, status. No range or read-only checks
        (tests use it to provoke the device); segments still honour
        size_max/seg_max. Returns the device-written data; raises
        :class:`BlkIoError` if the status is not VIRTIO_BLK_S_OK."""
        if in_len < 0:
            raise ValueError("negative in_len")
        vq, v = self.queue_for(vcpu)
        t = self.transport
        ram, allocator = t.ram, t.allocator
        out_len = len(out_data)
        data_len = out_len + in_len
        nsegs = (-(-out_len // self.max_segment_size)) + (-(-in_len // self.max_segment_size))
        if nsegs > self.max_segments:
            raise ValueError(
                f"{data_len} bytes need {nsegs} segments; the device takes {self.max_segments} "
                f"of at most {self.max_segment_size} bytes per request"
            )

        allocations: list[int] = []
        completion: Completion | None = None
        try:
            hdr_gpa = allocator.allocate(OUTHDR.size + 1)
            allocations.append(hdr_gpa)
            status_gpa = hdr_gpa + OUTHDR.size
            ram.write(hdr_gpa, _header(req_type, sector) + bytes([STATUS_UNWRITTEN]))
            out_bufs = [(hdr_gpa, OUTHDR.size)]
            in_bufs: list[tuple[int, int]] = []
            if data_len:
                data_gpa = allocator.allocate(data_len, DATA_ALIGN)
                allocations.append(data_gpa)
                if out_len:
                    ram.write(data_gpa, bytes(out_data))
                    out_bufs += _segments(data_gpa, out_len, self.max_segment_size)
                if in_len:
                    in_bufs += _segments(data_gpa + out_len, in_len, self.max_segment_size)
            in_bufs.append((status_gpa, 1))

            completion = await vq.add(out_bufs, in_bufs, token=(req_type, sector))
            await vq.kick(v)
            await completion
            status = ram.read(status_gpa, 1)[0]
            data = ram.read(data_gpa + out_len, in_len) if in_len else b""
        finally:
            self.transport.free_when_returned(completion, allocations, "virtio-blk")
        if status != VIRTIO_BLK_S_OK:
            raise BlkIoError(status, req_type, sector)
        return data
