"""The virtio-gpu battery (QEMU's vhost-user-gpu, 2D).

The guest draws a picture in a framebuffer resource and flushes it; the
daemon presents it over the display channel, the bridge writes it as a
PNG (--gpu-output, a PNG per presented frame), and the check compares that
PNG with what the guest drew, pixel by pixel. With --artifacts DIR the
verified frame is kept as DIR/gpu-frame-MEMORY.png.

Both memory models: under shadow the bridge keeps an arena copy of each
resource's backing for the daemon (bridge/gpu_shadow.py).
"""

from __future__ import annotations

import os
import shutil
import zlib

import trio

from bridge.smoke.battery import Check, CheckFailed
from bridge.smoke.device_battery import DeviceBattery, Opened
from bridge.png import PngError, decode_rgb
from xen.sim.gpu_pictures import picture, to_rgb
from xen.sim.guest_memory import GuestAllocator
from xen.sim.guest_virtqueue import VirtioDriverError
from xen.sim.virtio_gpu import VirtioGpuDriver
from xen.sim.virtio_mmio_driver import VirtioMmioDriver

WIDTH, HEIGHT = 320, 200
"""The display mode the bridge offers (--gpu-resolution): small, so the PNG is quick."""


def prepare(workdir: str, options) -> dict[str, str]:
    frames = os.path.join(workdir, "frames")
    os.mkdir(frames)
    return {"frames": frames}


def bridge_flags(rig) -> list[str]:
    return ["--gpu-output", rig.values["frames"], "--gpu-resolution", f"{WIDTH}x{HEIGHT}", "--gpu-png-every-flush"]


async def open_gpu(rig, guest) -> Opened:
    allocator = GuestAllocator(guest.ram.base, guest.ram.size)
    transport = await VirtioMmioDriver.for_device(guest, allocator, rig.mmio_base, rig.irq)
    gpu = await VirtioGpuDriver.open(transport)
    return Opened(guest, transport, gpu)


def _pngs(frames: str) -> set[str]:
    return {name for name in os.listdir(frames) if name.endswith(".png")}


async def _new_png(rig, before: set[str]) -> tuple[str, tuple[int, int, bytes]]:
    """The next PNG the bridge writes, decoded (retried while it is being written)."""
    frames = rig.values["frames"]
    while True:
        for name in sorted(_pngs(frames) - before):
            path = os.path.join(frames, name)
            try:
                with open(path, "rb") as f:
                    return path, decode_rgb(f.read())
            except (OSError, PngError, zlib.error):
                pass  # still being written
        await trio.sleep(0.02)


async def _display_mode(rig, gpu: VirtioGpuDriver):
    rig.step = "asking for the display modes (GET_DISPLAY_INFO)"
    modes = [m for m in await gpu.get_display_info() if m.enabled]
    if not modes:
        raise CheckFailed("GET_DISPLAY_INFO reports no enabled scanout")
    return modes[0]


async def check_frame(rig):
    async with rig.guest() as guest:
        opened = await rig.open(guest)
        gpu = opened.driver
        mode = await _display_mode(rig, gpu)
        if (mode.width, mode.height) != (WIDTH, HEIGHT):
            raise CheckFailed(f"scanout {mode.scanout} is {mode.width}x{mode.height}, the bridge offers "
                              f"{WIDTH}x{HEIGHT}")
        rig.step = "creating a framebuffer and drawing in it"
        fb = await gpu.create_framebuffer(WIDTH, HEIGHT)
        image = picture(WIDTH, HEIGHT)
        fb.fill(0, 0, WIDTH, HEIGHT, image)
        before = _pngs(rig.values["frames"])
        rig.step = "flushing the frame (TRANSFER_TO_HOST_2D, RESOURCE_FLUSH)"
        await gpu.flush(fb)
        rig.step = "waiting for the presented frame (the bridge's PNG of it)"
        path, (width, height, rgb) = await _new_png(rig, before)
        await gpu.close()
    if (width, height) != (WIDTH, HEIGHT):
        raise CheckFailed(f"the presented frame is {width}x{height}, the guest drew {WIDTH}x{HEIGHT}")
    want = to_rgb(image)
    if rgb != want:
        at = next(i for i in range(0, len(want), 3) if rgb[i:i + 3] != want[i:i + 3]) // 3
        bad = sum(1 for i in range(0, len(want), 3) if rgb[i:i + 3] != want[i:i + 3])
        raise CheckFailed(f"{bad} of {WIDTH * HEIGHT} pixels differ from what the guest drew; the first at "
                          f"({at % WIDTH}, {at // WIDTH}) is #{rgb[at * 3:at * 3 + 3].hex()}, "
                          f"drawn #{want[at * 3:at * 3 + 3].hex()}")
    details = [f"a {WIDTH}x{HEIGHT} frame presented identical to what the guest drew, pixel by pixel"]
    if rig.options.artifacts:
        kept = os.path.join(rig.options.artifacts, f"gpu-frame-{rig.memory}.png")
        shutil.copyfile(path, kept)
        details.append(f"saved as {kept}")
    return details


async def io_round(rig, opened: Opened, n: int) -> None:
    await _display_mode(rig, opened.driver)


def start_in_flight(rig, opened: Opened, nursery, count: int) -> None:
    async def ask() -> None:
        try:
            await opened.driver.get_display_info()
        except* VirtioDriverError:
            pass  # the reset took it (also inside a driver's nursery): expected

    for _ in range(count):
        nursery.start_soon(ask)


async def check_config(rig, opened: Opened, daemon_config: bytes | None) -> list[str]:
    gpu = opened.driver
    return [f"num_scanouts {gpu.num_scanouts} (the front-end's field: the daemon's config has "
            f"{'none' if not daemon_config else len(daemon_config)} bytes)"]


BATTERY = DeviceBattery(
    name="gpu",
    bridge_device="gpu",
    summary="virtio-gpu 2D (vhost-user-gpu): a frame the guest draws must be presented pixel for pixel",
    open=open_gpu,
    prepare=prepare,
    bridge_flags=bridge_flags,
    xenstore_virtio=lambda options: "gpu",
    io_checks=(Check("io.gpu.frame", check_frame),),
    io_round=io_round,
    start_in_flight=start_in_flight,
    check_config=check_config,
)
