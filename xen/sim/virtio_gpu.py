"""The simulated guest's virtio-gpu 2D driver (virtio 1.2 section 5.7),
modelled on Linux's drivers/gpu/drm/virtio.

Queue 0 (control) carries commands, each one descriptor chain: the
command (device-readable; RESOURCE_ATTACH_BACKING's memory entries in a
second readable buffer, as Linux sends them) and the response
(device-writable). Queue 1 (cursor) carries UPDATE_CURSOR and MOVE_CURSOR,
readable only; the device returns them with a used length of 0. All
structures are little endian::

    struct virtio_gpu_ctrl_hdr { le32 type, flags; le64 fence_id; le32 ctx_id; u8 ring_idx, padding[3]; }
    struct virtio_gpu_rect     { le32 x, y, width, height; }

A framebuffer is a 2D resource (B8G8R8X8, Linux's XRGB8888 on a
little-endian guest) whose backing is one contiguous allocation of guest
RAM, width * 4 bytes a row: the guest draws into it, then
TRANSFER_TO_HOST_2D and RESOURCE_FLUSH the rectangle it changed.

A response other than the expected OK raises :class:`VirtioGpuError`
naming it. While a command is outstanding the driver also watches for
DEVICE_NEEDS_RESET (a configuration interrupt): a device that broke raises
:class:`DeviceNeedsReset` instead of leaving the guest waiting.

Use::

    transport = VirtioMmioDriver(None, guest.ram, allocator, base, irq, guest)
    gpu = await VirtioGpuDriver.open(transport)
    (mode,) = [m for m in await gpu.get_display_info() if m.enabled]
    fb = await gpu.create_framebuffer(mode.width, mode.height)   # CREATE_2D, ATTACH_BACKING, SET_SCANOUT
    fb.fill(x, y, w, h, bgrx_bytes)                              # into guest RAM
    await gpu.flush(fb, x, y, w, h)                              # TRANSFER_TO_HOST_2D, RESOURCE_FLUSH
    cursor = await gpu.create_cursor(bgra_64x64, hot_x, hot_y)
    await gpu.update_cursor(cursor, x, y); await gpu.move_cursor(x, y)
    await gpu.close()
"""

from __future__ import annotations

import enum
import logging
import struct
from typing import Any

import attrs
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

VIRTIO_ID_GPU = 16
CONTROL_QUEUE = 0
CURSOR_QUEUE = 1

# struct virtio_gpu_config.
CFG_EVENTS_READ = 0
CFG_EVENTS_CLEAR = 4
CFG_NUM_SCANOUTS = 8
CFG_NUM_CAPSETS = 12

DEFAULT_FEATURES = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_INDIRECT_DESC | 1 << VIRTIO_F_EVENT_IDX

MAX_SCANOUTS = 16
CURSOR_SIZE = 64
PAGE_SIZE = 4096

FORMAT_B8G8R8X8 = 2
"""VIRTIO_GPU_FORMAT_B8G8R8X8_UNORM: bytes B, G, R, X (Linux's XRGB8888)."""
FORMAT_B8G8R8A8 = 1


class Cmd(enum.IntEnum):
    GET_DISPLAY_INFO = 0x0100
    RESOURCE_CREATE_2D = 0x0101
    RESOURCE_UNREF = 0x0102
    SET_SCANOUT = 0x0103
    RESOURCE_FLUSH = 0x0104
    TRANSFER_TO_HOST_2D = 0x0105
    RESOURCE_ATTACH_BACKING = 0x0106
    RESOURCE_DETACH_BACKING = 0x0107
    GET_EDID = 0x010A
    UPDATE_CURSOR = 0x0300
    MOVE_CURSOR = 0x0301


class Resp(enum.IntEnum):
    OK_NODATA = 0x1100
    OK_DISPLAY_INFO = 0x1101
    OK_EDID = 0x1104
    ERR_UNSPEC = 0x1200
    ERR_OUT_OF_MEMORY = 0x1201
    ERR_INVALID_SCANOUT_ID = 0x1202
    ERR_INVALID_RESOURCE_ID = 0x1203
    ERR_INVALID_CONTEXT_ID = 0x1204
    ERR_INVALID_PARAMETER = 0x1205


CTRL_HDR = struct.Struct("<IIQIB3x")
RECT = struct.Struct("<IIII")
DISPLAY_ONE = struct.Struct("<IIIIII")
DISPLAY_INFO_SIZE = CTRL_HDR.size + MAX_SCANOUTS * DISPLAY_ONE.size
CREATE_2D = struct.Struct("<IIII")  # resource_id, format, width, height
SET_SCANOUT = struct.Struct("<IIIIII")  # rect, scanout_id, resource_id
FLUSH = struct.Struct("<IIIIII")  # rect, resource_id, padding
TRANSFER = struct.Struct("<IIIIQII")  # rect, offset, resource_id, padding
ATTACH = struct.Struct("<II")  # resource_id, nr_entries
MEM_ENTRY = struct.Struct("<QII")  # addr, length, padding
UNREF = struct.Struct("<II")
CURSOR = struct.Struct("<IIIIIIII")  # pos {scanout, x, y, pad}, resource_id, hot_x, hot_y, pad
EDID_REQ = struct.Struct("<II")


def resp_name(value: int) -> str:
    try:
        return Resp(value).name
    except ValueError:
        return f"{value:#x}"


class VirtioGpuError(VirtioDriverError):
    """The device answered a command with something other than OK."""


class DeviceNeedsReset(VirtioGpuError):
    """The device set DEVICE_NEEDS_RESET while a command was outstanding."""


@attrs.frozen
class DisplayMode:
    scanout: int
    x: int
    y: int
    width: int
    height: int
    enabled: bool
    flags: int


@attrs.define
class Resource:
    """A 2D resource and its backing in guest RAM (``stride`` bytes a row)."""

    resource_id: int
    width: int
    height: int
    backing: int
    """Guest-physical address of the backing (one allocation)."""
    size: int
    stride: int
    ram: Any = attrs.field(repr=False)

    def fill(self, x: int, y: int, width: int, height: int, pixels: bytes) -> None:
        """Write B, G, R, X pixels (``width * 4`` bytes a row) into the
        backing at (x, y): the guest drawing, no device involved."""
        if x + width > self.width or y + height > self.height:
            raise ValueError(f"{width}x{height}+{x}+{y} outside the {self.width}x{self.height} resource")
        if len(pixels) != width * height * 4:
            raise ValueError(f"{len(pixels)} bytes for {width}x{height} pixels")
        row = width * 4
        if x == 0 and width == self.width:
            self.ram.write(self.backing + y * self.stride, pixels)
            return
        for r in range(height):
            self.ram.write(self.backing + (y + r) * self.stride + x * 4, pixels[r * row:(r + 1) * row])

    def read(self) -> bytes:
        """The whole backing (what the guest drew)."""
        return self.ram.read(self.backing, self.stride * self.height)


class VirtioGpuDriver:
    """A virtio-gpu device in 2D mode, driven over a :class:`VirtioMmioDriver`."""

    def __init__(self, transport: VirtioMmioDriver) -> None:
        self.transport = transport
        self.control: GuestVirtqueue | None = None
        self.cursor: GuestVirtqueue | None = None
        self.num_scanouts = 0
        self.resources: dict[int, Resource] = {}
        self._next_id = 0
        self.commands_sent = 0

    @classmethod
    async def open(cls, transport: VirtioMmioDriver, queue_size: int | None = None, *,
                   features: int = DEFAULT_FEATURES, vcpu: Any = None) -> VirtioGpuDriver:
        """Probe (DeviceID 16), negotiate, read num_scanouts, set up the
        control and cursor queues, DRIVER_OK (virtio_gpu_init)."""
        self = cls(transport)
        t = transport
        v = t.pick_vcpu(vcpu)
        await t.probe(features, device_id=VIRTIO_ID_GPU, vcpu=v)
        try:
            self.num_scanouts = await t.read_config(CFG_NUM_SCANOUTS, 4, vcpu=v)
            if not 1 <= self.num_scanouts <= MAX_SCANOUTS:
                raise VirtioGpuError(f"virtio-gpu at {t.base:#x}: num_scanouts {self.num_scanouts}")
            self.control = await t.setup_queue(CONTROL_QUEUE, queue_size, vcpu=v)
            self.cursor = await t.setup_queue(CURSOR_QUEUE, queue_size, vcpu=v)
        except VirtioDriverError:
            await t.fail(vcpu=v)
            raise
        await t.driver_ok(vcpu=v)
        return self

    async def close(self, *, vcpu: Any = None) -> None:
        """Give every resource back (RESOURCE_UNREF), then reset the device."""
        for res in list(self.resources.values()):
            await self.unref(res, vcpu=vcpu)
        await self.transport.reset(vcpu=vcpu)
        self.control = self.cursor = None

    # -- the command path

    async def _watch_needs_reset(self, what: str) -> None:
        t = self.transport
        while True:
            seen = t.config_changes
            # Not cancelled half-way: a vCPU's access must complete before
            # its next one (the command's completion cancels this watch).
            with trio.CancelScope(shield=True):
                broken = await t.needs_reset()
            if broken:
                raise DeviceNeedsReset(f"virtio-gpu at {t.base:#x}: the device needs a reset ({what} outstanding)")
            await t.wait_config_change(seen)

    async def _wait(self, completion: Completion, what: str) -> int:
        result: list[int] = []
        broken: list[DeviceNeedsReset] = []

        async def watch(scope: trio.CancelScope) -> None:
            try:
                await self._watch_needs_reset(what)
            except DeviceNeedsReset as e:
                broken.append(e)
                scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch, nursery.cancel_scope)
            result.append(await completion)
            nursery.cancel_scope.cancel()
        if broken:
            raise broken[0]
        return result[0]

    async def command(self, cmd: Cmd, body: bytes = b"", extra: bytes = b"", resp_size: int = CTRL_HDR.size, *,
                      expect: Resp = Resp.OK_NODATA, vcpu: Any = None) -> bytes:
        """Send one control command; return the response (its header
        checked against ``expect``)."""
        if self.control is None:
            raise VirtioGpuError("virtio-gpu device is not open")
        t = self.transport
        ram, allocator = t.ram, t.allocator
        head = CTRL_HDR.pack(cmd, 0, 0, 0, 0) + body
        allocations: list[int] = []
        completion: Completion | None = None
        try:
            block = allocator.allocate(len(head) + len(extra) + resp_size, 8)
            allocations.append(block)
            ram.write(block, head + extra)
            readable = [(block, len(head))]
            if extra:
                readable.append((block + len(head), len(extra)))
            resp_gpa = block + len(head) + len(extra)
            ram.write(resp_gpa, bytes(resp_size))
            completion = await self.control.add(readable, [(resp_gpa, resp_size)], token=cmd)
            self.commands_sent += 1
            await self.control.kick(t.pick_vcpu(vcpu))
            used = await self._wait(completion, cmd.name)
            resp = ram.read(resp_gpa, resp_size)
        finally:
            t.free_when_returned(completion, allocations, "virtio-gpu")
        if used < CTRL_HDR.size:
            raise VirtioGpuError(f"{cmd.name}: the device wrote {used} bytes, less than a response header")
        rtype = CTRL_HDR.unpack_from(resp)[0]
        if rtype != expect:
            raise VirtioGpuError(f"{cmd.name}: the device answered {resp_name(rtype)}, expected {expect.name}")
        return resp[:used]

    async def _cursor_command(self, cmd: Cmd, resource_id: int, scanout: int, x: int, y: int, hot_x: int,
                              hot_y: int, vcpu: Any) -> None:
        if self.cursor is None:
            raise VirtioGpuError("virtio-gpu device is not open")
        t = self.transport
        body = CTRL_HDR.pack(cmd, 0, 0, 0, 0) + CURSOR.pack(scanout, x, y, 0, resource_id, hot_x, hot_y, 0)
        completion: Completion | None = None
        allocations: list[int] = []
        try:
            block = t.allocator.allocate(len(body), 8)
            allocations.append(block)
            t.ram.write(block, body)
            completion = await self.cursor.add([(block, len(body))], [], token=cmd)
            self.commands_sent += 1
            await self.cursor.kick(t.pick_vcpu(vcpu))
            await self._wait(completion, cmd.name)
        finally:
            t.free_when_returned(completion, allocations, "virtio-gpu cursor")

    # -- commands

    async def get_display_info(self, *, vcpu: Any = None) -> list[DisplayMode]:
        resp = await self.command(Cmd.GET_DISPLAY_INFO, resp_size=DISPLAY_INFO_SIZE, expect=Resp.OK_DISPLAY_INFO,
                                  vcpu=vcpu)
        if len(resp) < DISPLAY_INFO_SIZE:
            raise VirtioGpuError(f"GET_DISPLAY_INFO: {len(resp)} bytes, expected {DISPLAY_INFO_SIZE}")
        modes = []
        for i in range(MAX_SCANOUTS):
            x, y, w, h, enabled, flags = DISPLAY_ONE.unpack_from(resp, CTRL_HDR.size + i * DISPLAY_ONE.size)
            modes.append(DisplayMode(i, x, y, w, h, bool(enabled), flags))
        return modes

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    async def create_resource(self, width: int, height: int, *, fmt: int = FORMAT_B8G8R8X8,
                              vcpu: Any = None) -> Resource:
        """RESOURCE_CREATE_2D, then RESOURCE_ATTACH_BACKING with one
        zeroed, page-aligned allocation of guest RAM."""
        t = self.transport
        stride = width * 4
        size = stride * height
        rid = self._new_id()
        backing = t.allocator.allocate(size, PAGE_SIZE)
        try:
            t.ram.write(backing, bytes(size))
            await self.command(Cmd.RESOURCE_CREATE_2D, CREATE_2D.pack(rid, fmt, width, height), vcpu=vcpu)
            addr = backing
            if t.dma.needs_calls:
                addr = await t.dma.map_coherent(backing, size)
            await self.command(Cmd.RESOURCE_ATTACH_BACKING, ATTACH.pack(rid, 1), MEM_ENTRY.pack(addr, size, 0),
                               vcpu=vcpu)
        except BaseException:
            t.allocator.free(backing)
            raise
        res = Resource(rid, width, height, backing, size, stride, t.ram)
        self.resources[rid] = res
        return res

    async def set_scanout(self, res: Resource | None, scanout: int = 0, rect: tuple[int, int, int, int] | None = None,
                          *, vcpu: Any = None) -> None:
        """Show ``res`` (the whole of it unless ``rect``) on ``scanout``;
        None switches the scanout off."""
        if res is None:
            await self.command(Cmd.SET_SCANOUT, SET_SCANOUT.pack(0, 0, 0, 0, scanout, 0), vcpu=vcpu)
            return
        x, y, w, h = rect or (0, 0, res.width, res.height)
        await self.command(Cmd.SET_SCANOUT, SET_SCANOUT.pack(x, y, w, h, scanout, res.resource_id), vcpu=vcpu)

    async def create_framebuffer(self, width: int, height: int, scanout: int = 0, *, vcpu: Any = None) -> Resource:
        """A resource shown on ``scanout`` (what a DRM framebuffer is)."""
        res = await self.create_resource(width, height, vcpu=vcpu)
        await self.set_scanout(res, scanout, vcpu=vcpu)
        return res

    async def transfer_to_host(self, res: Resource, x: int, y: int, w: int, h: int, *, vcpu: Any = None) -> None:
        offset = y * res.stride + x * 4
        await self.command(Cmd.TRANSFER_TO_HOST_2D, TRANSFER.pack(x, y, w, h, offset, res.resource_id, 0),
                           vcpu=vcpu)

    async def resource_flush(self, res: Resource, x: int, y: int, w: int, h: int, *, vcpu: Any = None) -> None:
        await self.command(Cmd.RESOURCE_FLUSH, FLUSH.pack(x, y, w, h, res.resource_id, 0), vcpu=vcpu)

    async def flush(self, res: Resource, x: int = 0, y: int = 0, w: int | None = None, h: int | None = None, *,
                    vcpu: Any = None) -> None:
        """TRANSFER_TO_HOST_2D then RESOURCE_FLUSH of a rectangle (default:
        all of it), as Linux's dirty-framebuffer path does."""
        w = res.width - x if w is None else w
        h = res.height - y if h is None else h
        await self.transfer_to_host(res, x, y, w, h, vcpu=vcpu)
        await self.resource_flush(res, x, y, w, h, vcpu=vcpu)

    async def unref(self, res: Resource, *, vcpu: Any = None) -> None:
        """RESOURCE_UNREF; the backing goes back to the allocator."""
        await self.command(Cmd.RESOURCE_UNREF, UNREF.pack(res.resource_id, 0), vcpu=vcpu)
        self.resources.pop(res.resource_id, None)
        self.transport.allocator.free(res.backing)

    async def get_edid(self, scanout: int = 0, *, vcpu: Any = None) -> bytes:
        """GET_EDID (only with VIRTIO_GPU_F_EDID): the EDID bytes."""
        resp = await self.command(Cmd.GET_EDID, EDID_REQ.pack(scanout, 0), resp_size=CTRL_HDR.size + 8 + 1024,
                                  expect=Resp.OK_EDID, vcpu=vcpu)
        (size,) = struct.unpack_from("<I", resp, CTRL_HDR.size)
        return resp[CTRL_HDR.size + 8:CTRL_HDR.size + 8 + size]

    # -- the cursor queue

    async def create_cursor(self, image: bytes, *, vcpu: Any = None) -> Resource:
        """A 64x64 cursor resource holding ``image`` (B, G, R, A bytes),
        transferred to the host."""
        if len(image) != CURSOR_SIZE * CURSOR_SIZE * 4:
            raise ValueError(f"a cursor image is 64x64x4 bytes, not {len(image)}")
        res = await self.create_resource(CURSOR_SIZE, CURSOR_SIZE, fmt=FORMAT_B8G8R8A8, vcpu=vcpu)
        res.fill(0, 0, CURSOR_SIZE, CURSOR_SIZE, image)
        await self.transfer_to_host(res, 0, 0, CURSOR_SIZE, CURSOR_SIZE, vcpu=vcpu)
        return res

    async def update_cursor(self, res: Resource | None, x: int, y: int, *, hot_x: int = 0, hot_y: int = 0,
                            scanout: int = 0, vcpu: Any = None) -> None:
        """UPDATE_CURSOR: a new cursor image (None: no cursor) at (x, y)."""
        rid = 0 if res is None else res.resource_id
        await self._cursor_command(Cmd.UPDATE_CURSOR, rid, scanout, x, y, hot_x, hot_y, vcpu)

    async def move_cursor(self, x: int, y: int, *, visible: bool = True, scanout: int = 0,
                          vcpu: Any = None) -> None:
        """MOVE_CURSOR (resource id 0 hides it, as Linux does)."""
        await self._cursor_command(Cmd.MOVE_CURSOR, 1 if visible else 0, scanout, x, y, 0, 0, vcpu)
