"""The simulated guest's virtio-gpu 2D driver against a register-level fake
device (tests/guest_driver_fakes.py) that decodes every command from the
virtio 1.2 layouts written out here by hand, keeps resources and a scanout,
and shows what the guest flushed."""

from __future__ import annotations

import struct

import pytest
import trio

from tests.guest_driver_fakes import IRQ, MMIO_BASE, DevChain, FakeGuest, FakeMmioDevice
from xen.sim import virtio_gpu as vgpu
from xen.sim import virtio_mmio_driver as mmio
from xen.sim.gpu_pictures import cursor_arrow, picture, solid
from xen.sim.guest_memory import GuestAllocator

V1 = 1 << 32
GPU_FEATURES = V1 | 1 << 29 | 1 << 28

HDR = struct.Struct("<IIQIB3x")  # type, flags, fence_id, ctx_id, ring_idx
OK_NODATA, OK_DISPLAY_INFO = 0x1100, 0x1101
ERR_INVALID_RESOURCE_ID, ERR_INVALID_PARAMETER = 0x1203, 0x1205


class FakeGpu:
    """A virtio-gpu device in 2D: resources with backing in guest RAM, one
    scanout, and the picture it shows (B, G, R, X bytes) after flushes."""

    def __init__(self, width: int = 64, height: int = 48) -> None:
        self.mode = (width, height)
        self.resources: dict[int, dict] = {}
        self.scanout: tuple[int, tuple[int, int, int, int]] | None = None
        self.shown: bytearray | None = None
        self.commands: list[tuple[int, int, list[int], list[int]]] = []  # queue, type, readable, writable
        self.cursor_commands: list[tuple] = []
        self.fail_next: int | None = None

    def __call__(self, dev: FakeMmioDevice, queue: int, chain: DevChain) -> int:
        raw = chain.read_out(dev.ram)
        ctype = HDR.unpack_from(raw)[0]
        self.commands.append((queue, ctype, [n for _, n in chain.readable], [n for _, n in chain.writable]))
        body = raw[HDR.size:]
        if queue == 1:
            assert not chain.writable
            scanout, x, y, _pad, rid, hot_x, hot_y, _pad2 = struct.unpack_from("<8I", body)
            self.cursor_commands.append((ctype, scanout, x, y, rid, hot_x, hot_y))
            return 0
        if self.fail_next is not None:
            resp, self.fail_next = self.fail_next, None
            return chain.write_in(dev.ram, HDR.pack(resp, 0, 0, 0, 0))
        resp = self.command(dev, ctype, body)
        return chain.write_in(dev.ram, resp)

    def command(self, dev: FakeMmioDevice, ctype: int, body: bytes) -> bytes:
        ok = HDR.pack(OK_NODATA, 0, 0, 0, 0)
        if ctype == 0x0100:  # GET_DISPLAY_INFO
            out = HDR.pack(OK_DISPLAY_INFO, 0, 0, 0, 0) + struct.pack("<6I", 0, 0, *self.mode, 1, 0)
            return out + bytes(15 * 24)
        if ctype == 0x0101:  # RESOURCE_CREATE_2D
            rid, fmt, w, h = struct.unpack_from("<4I", body)
            if rid in self.resources or rid == 0:
                return HDR.pack(ERR_INVALID_RESOURCE_ID, 0, 0, 0, 0)
            self.resources[rid] = {"fmt": fmt, "w": w, "h": h, "backing": [], "pixels": bytearray(w * h * 4)}
            return ok
        if ctype == 0x0106:  # RESOURCE_ATTACH_BACKING: entries follow the 32-byte command
            rid, n = struct.unpack_from("<2I", body)
            entries = [struct.unpack_from("<QII", body, 8 + 16 * i)[:2] for i in range(n)]
            self.resources[rid]["backing"] = entries
            return ok
        if ctype == 0x0103:  # SET_SCANOUT
            x, y, w, h, scanout, rid = struct.unpack_from("<6I", body)
            assert scanout == 0
            self.scanout = None if rid == 0 else (rid, (x, y, w, h))
            self.shown = None if rid == 0 else bytearray(w * h * 4)
            return ok
        if ctype == 0x0105:  # TRANSFER_TO_HOST_2D
            x, y, w, h, offset, rid, _pad = struct.unpack_from("<4IQ2I", body)
            res = self.resources[rid]
            if x + w > res["w"] or y + h > res["h"]:
                return HDR.pack(ERR_INVALID_PARAMETER, 0, 0, 0, 0)
            backing = b"".join(dev.ram.read(addr, length) for addr, length in res["backing"])
            stride = res["w"] * 4
            for r in range(h):
                src = offset + r * stride
                dst = (y + r) * stride + x * 4
                res["pixels"][dst:dst + w * 4] = backing[src:src + w * 4]
            return ok
        if ctype == 0x0104:  # RESOURCE_FLUSH
            x, y, w, h, rid, _pad = struct.unpack_from("<6I", body)
            if self.scanout is not None and self.scanout[0] == rid:
                res = self.resources[rid]
                stride = res["w"] * 4
                for r in range(h):
                    start = (y + r) * stride + x * 4
                    self.shown[start:start + w * 4] = res["pixels"][start:start + w * 4]
            return ok
        if ctype == 0x010A:  # GET_EDID
            scanout, _pad = struct.unpack_from("<2I", body)
            blob = bytes([scanout + 7]) * 128
            return HDR.pack(0x1104, 0, 0, 0, 0) + struct.pack("<II", 128, 0) + blob.ljust(1024, b"\0")
        if ctype == 0x0102:  # RESOURCE_UNREF
            (rid,) = struct.unpack_from("<I", body)
            del self.resources[rid]
            return ok
        return HDR.pack(0x1200, 0, 0, 0, 0)


class Rig:
    def __init__(self, nursery, *, hold: bool = False, num_scanouts: int = 1, width: int = 64, height: int = 48):
        self.guest = FakeGuest()
        self.guest.nursery = nursery
        self.gpu = FakeGpu(width, height)
        config = struct.pack("<4I", 0, 0, num_scanouts, 0)
        self.dev = FakeMmioDevice(self.guest, device_id=vgpu.VIRTIO_ID_GPU, features=GPU_FEATURES, handler=self.gpu,
                                  config=config, queue_num_max=(64, 16), hold=hold)
        self.alloc = GuestAllocator(self.guest.ram.base, self.guest.ram.size)
        self.t = mmio.VirtioMmioDriver(None, self.guest.ram, self.alloc, MMIO_BASE, IRQ, self.guest,
                                       reset_poll_interval=0.0005)


def test_struct_sizes_are_the_virtio_gpu_abi():
    assert vgpu.CTRL_HDR.size == 24
    assert vgpu.DISPLAY_INFO_SIZE == 408
    assert vgpu.CREATE_2D.size + 24 == 40
    assert vgpu.SET_SCANOUT.size + 24 == 48
    assert vgpu.FLUSH.size + 24 == 48
    assert vgpu.TRANSFER.size + 24 == 56
    assert vgpu.ATTACH.size + 24 == 32 and vgpu.MEM_ENTRY.size == 16
    assert vgpu.CURSOR.size + 24 == 56


async def test_open_reads_num_scanouts_and_sets_up_both_queues(nursery):
    rig = Rig(nursery)
    gpu = await vgpu.VirtioGpuDriver.open(rig.t)
    assert gpu.num_scanouts == 1
    assert set(rig.t.queues) == {0, 1}
    assert await rig.t.status() == 0x0F


async def test_no_scanouts_fails_the_device(nursery):
    rig = Rig(nursery, num_scanouts=0)
    with pytest.raises(vgpu.VirtioGpuError, match="num_scanouts 0"):
        await vgpu.VirtioGpuDriver.open(rig.t)
    assert await rig.t.status() & mmio.STATUS_FAILED


async def test_a_framebuffer_the_guest_draws_is_what_the_device_shows(nursery):
    rig = Rig(nursery)
    gpu = await vgpu.VirtioGpuDriver.open(rig.t)
    (mode,) = [m for m in await gpu.get_display_info() if m.enabled]
    assert (mode.scanout, mode.width, mode.height) == (0, 64, 48)
    fb = await gpu.create_framebuffer(mode.width, mode.height)
    res = rig.gpu.resources[fb.resource_id]
    assert res["fmt"] == vgpu.FORMAT_B8G8R8X8 and (res["w"], res["h"]) == (64, 48)
    assert res["backing"] == [(fb.backing, 64 * 48 * 4)] and fb.backing % 4096 == 0
    image = picture(64, 48)
    fb.fill(0, 0, 64, 48, image)
    await gpu.flush(fb)
    assert bytes(rig.gpu.shown) == image
    # a partial update: only the rectangle is transferred and flushed
    fb.fill(10, 5, 20, 8, solid(20, 8, (1, 2, 3)))
    fb.fill(0, 40, 64, 8, solid(64, 8, (9, 9, 9)))  # drawn, never flushed
    await gpu.flush(fb, 10, 5, 20, 8)
    expected = bytearray(image)
    for r in range(8):
        start = ((5 + r) * 64 + 10) * 4
        expected[start:start + 80] = solid(20, 1, (1, 2, 3))
    assert bytes(rig.gpu.shown) == bytes(expected)
    # each command one chain: the command readable, the response writable;
    # ATTACH_BACKING's memory entries in a second readable buffer
    by_type = {ctype: (readable, writable) for _q, ctype, readable, writable in rig.gpu.commands}
    assert by_type[0x0106] == ([32, 16], [24])
    assert by_type[0x0105] == ([56], [24])
    assert by_type[0x0100] == ([24], [408])
    allocations = rig.alloc.allocation_count
    await gpu.close()
    assert rig.gpu.resources == {}
    assert rig.alloc.allocation_count < allocations


async def test_cursor_commands_go_on_the_cursor_queue(nursery):
    rig = Rig(nursery)
    gpu = await vgpu.VirtioGpuDriver.open(rig.t)
    cursor = await gpu.create_cursor(cursor_arrow())
    assert rig.gpu.resources[cursor.resource_id]["fmt"] == vgpu.FORMAT_B8G8R8A8
    assert bytes(rig.gpu.resources[cursor.resource_id]["pixels"]) == cursor_arrow()
    await gpu.update_cursor(cursor, 30, 20, hot_x=2, hot_y=3)
    await gpu.move_cursor(40, 25)
    await gpu.move_cursor(41, 26, visible=False)
    assert rig.gpu.cursor_commands == [
        (0x0300, 0, 30, 20, cursor.resource_id, 2, 3),
        (0x0301, 0, 40, 25, 1, 0, 0),
        (0x0301, 0, 41, 26, 0, 0, 0),
    ]
    assert [c[2] for c in rig.gpu.commands if c[0] == 1] == [[56]] * 3


async def test_an_error_response_raises_with_its_name(nursery):
    rig = Rig(nursery)
    gpu = await vgpu.VirtioGpuDriver.open(rig.t)
    rig.gpu.fail_next = ERR_INVALID_PARAMETER
    with pytest.raises(vgpu.VirtioGpuError, match="RESOURCE_FLUSH: the device answered ERR_INVALID_PARAMETER"):
        await gpu.resource_flush(vgpu.Resource(7, 4, 4, 0, 0, 16, rig.guest.ram), 0, 0, 4, 4)


async def test_a_device_that_needs_a_reset_fails_the_outstanding_command(nursery):
    rig = Rig(nursery, hold=True)
    gpu = await vgpu.VirtioGpuDriver.open(rig.t)
    async with trio.open_nursery() as inner:
        async def break_device():
            while not rig.dev.pending.get(0):
                await trio.sleep(0.001)
            rig.dev.status |= 0x40  # DEVICE_NEEDS_RESET
            rig.dev.raise_interrupt(2)  # configuration change
        inner.start_soon(break_device)
        with trio.fail_after(10):
            with pytest.raises(vgpu.DeviceNeedsReset, match="GET_DISPLAY_INFO outstanding"):
                await gpu.get_display_info()
    # and a command sent once it is broken fails at once too
    with trio.fail_after(10):
        with pytest.raises(vgpu.DeviceNeedsReset):
            await gpu.move_cursor(1, 1)


async def test_get_edid_returns_the_blob_the_device_sized(nursery):
    rig = Rig(nursery)
    gpu = await vgpu.VirtioGpuDriver.open(rig.t)
    assert await gpu.get_edid(0) == bytes([7]) * 128
    assert rig.gpu.commands[-1][2:] == ([32], [24 + 8 + 1024])
