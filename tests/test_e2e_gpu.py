"""End to end: the simulated guest's virtio-gpu 2D driver -> xen-sim -> the
bridge (its own process, the real CLI, --device gpu) -> the real
/usr/lib/qemu/vhost-user-gpu -> the display channel -> the PNGs the bridge
writes, read back with bridge.png's reader and compared pixel for pixel
with what the guest drew.

The drawing tests run in both memory models: passthrough (the daemon maps
the guest's framebuffer pages itself) and shadow (the bridge copies each
backing into the arena at RESOURCE_ATTACH_BACKING and the guest's changes
at every TRANSFER_TO_HOST_2D, bridge/gpu_shadow.py), with guest-physical
addresses and with grant references."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import trio

from bridge.daemons import start_qemu_storage_daemon, start_vhost_user_gpu
from bridge.testbed import LIBXL_FIRST_MMIO_BASE, LIBXL_FIRST_SPI, GpuTestbed, start_bridge
from bridge import png
from xen.sim.gpu_pictures import cursor_arrow, picture, solid, to_rgb
from xen.sim.guest import SimGuest
from xen.sim.guest_memory import GuestAllocator
from xen.sim.launch import start_simulator
from xen.sim.virtio_blk import VirtioBlkDriver
from xen.sim.client import SimHypervisor
from xen.sim.virtio_gpu import DeviceNeedsReset, VirtioGpuDriver, VirtioGpuError
from xen.sim.virtio_mmio_driver import VirtioMmioDriver

pytestmark = pytest.mark.e2e

MiB = 1 << 20
GUEST_TIMEOUT = 60
"""Seconds a guest session may take: a frame that never comes fails the
test instead of hanging it."""


@pytest.fixture(params=["passthrough", "shadow"])
def memory(request):
    """The drawing tests run in both memory models."""
    return request.param


@pytest.fixture
def bed(workdir, memory):
    testbed = GpuTestbed(workdir, resolution=(320, 200), vcpus=2, bridge_extra=["--memory", memory]).start()
    daemon_pid = testbed.daemon.pid
    yield testbed
    bridge = testbed.bridge
    testbed.stop()
    assert bridge is None or bridge.proc.returncode == 0, bridge.output()
    assert testbed.daemon_exited_by_itself, (testbed.daemon_status, testbed.daemon_output)
    with pytest.raises(ProcessLookupError):
        os.kill(daemon_pid, 0)
    assert [p for p in (testbed.daemon_socket, testbed.control, testbed.output_dir) if os.path.exists(p)] == []


async def open_gpu(guest: SimGuest, base: int, irq: int, allocator=None) -> tuple[VirtioMmioDriver, VirtioGpuDriver]:
    allocator = allocator or GuestAllocator(guest.ram.base, guest.ram.size)
    transport = await VirtioMmioDriver.for_device(guest, allocator, base, irq)
    return transport, await VirtioGpuDriver.open(transport)


@contextlib.asynccontextmanager
async def guest_gpu(bed: GpuTestbed):
    with trio.fail_after(GUEST_TIMEOUT):
        async with SimGuest.open(bed.control) as guest:
            yield await open_gpu(guest, bed.mmio_base, bed.irq)


async def next_png(bed: GpuTestbed, count: int) -> tuple[int, int, bytes]:
    """The ``count``-th PNG the bridge writes (1 = the first), decoded."""
    while len(bed.pngs()) < count:
        if not bed.bridge.alive():
            raise AssertionError(f"the bridge exited: {bed.bridge.output()}")
        await trio.sleep(0.02)
    return png.read_rgb(bed.pngs()[count - 1])


def patch(rgb: bytes, width: int, x: int, y: int, w: int, h: int, region: bytes) -> bytes:
    """``rgb`` (a picture ``width`` wide) with a w x h RGB rectangle at (x, y)."""
    out = bytearray(rgb)
    for r in range(h):
        start = ((y + r) * width + x) * 3
        out[start:start + w * 3] = region[r * w * 3:(r + 1) * w * 3]
    return bytes(out)


async def test_the_png_is_the_guests_picture_pixel_for_pixel(bed):
    async with guest_gpu(bed) as (_transport, gpu):
        (mode,) = [m for m in await gpu.get_display_info() if m.enabled]
        assert (mode.width, mode.height) == (320, 200)  # --gpu-resolution
        fb = await gpu.create_framebuffer(mode.width, mode.height)
        image = picture(mode.width, mode.height)
        fb.fill(0, 0, mode.width, mode.height, image)
        await gpu.flush(fb)
        assert await next_png(bed, 1) == (320, 200, to_rgb(image))
        # a snapshot on request (SIGUSR1) shows the same frame
        bed.request_snapshot()
        assert await next_png(bed, 2) == (320, 200, to_rgb(image))
        await gpu.close()


async def test_a_partial_flush_changes_only_its_rectangle(bed):
    async with guest_gpu(bed) as (_transport, gpu):
        fb = await gpu.create_framebuffer(320, 200)
        image = picture(320, 200)
        fb.fill(0, 0, 320, 200, image)
        await gpu.flush(fb)
        _, _, before = await next_png(bed, 1)
        # Draw two rectangles, flush one: the other is never transferred.
        fb.fill(40, 30, 50, 20, solid(50, 20, (0, 200, 0)))
        fb.fill(200, 100, 30, 30, solid(30, 30, (0, 0, 200)))
        await gpu.flush(fb, 40, 30, 50, 20)
        width, height, after = await next_png(bed, 2)
        assert (width, height) == (320, 200)
        assert after == patch(before, 320, 40, 30, 50, 20, to_rgb(solid(50, 20, (0, 200, 0))))
        # the second rectangle shows once it is flushed too
        await gpu.flush(fb, 200, 100, 30, 30)
        _, _, third = await next_png(bed, 3)
        assert third == patch(after, 320, 200, 100, 30, 30, to_rgb(solid(30, 30, (0, 0, 200))))


async def test_a_mode_change(bed):
    async with guest_gpu(bed) as (_transport, gpu):
        big = await gpu.create_framebuffer(320, 200)
        big.fill(0, 0, 320, 200, picture(320, 200))
        await gpu.flush(big)
        assert (await next_png(bed, 1))[:2] == (320, 200)
        # A smaller mode: a new resource, SET_SCANOUT to it, the old one dropped.
        small = await gpu.create_framebuffer(160, 120)
        await gpu.unref(big)
        image = picture(160, 120)
        small.fill(0, 0, 160, 120, image)
        await gpu.flush(small)
        assert await next_png(bed, 2) == (160, 120, to_rgb(image))
        # And a scanout of part of a larger resource (a panning framebuffer).
        wide = await gpu.create_resource(400, 120)
        wide_image = picture(400, 120)
        wide.fill(0, 0, 400, 120, wide_image)
        await gpu.set_scanout(wide, 0, (0, 0, 200, 100))
        await gpu.flush(wide, 0, 0, 200, 100)
        width, height, rgb = await next_png(bed, 3)
        assert (width, height) == (200, 100)
        full = to_rgb(wide_image)
        assert rgb == b"".join(full[y * 400 * 3:(y * 400 + 200) * 3] for y in range(100))


async def test_the_cursor_drawn_at_its_position(workdir, memory):
    with GpuTestbed(workdir, resolution=(320, 200), cursor=True, bridge_extra=["--memory", memory]) as bed:
        async with guest_gpu(bed) as (_transport, gpu):
            fb = await gpu.create_framebuffer(320, 200)
            base = solid(320, 200, (30, 60, 90))
            fb.fill(0, 0, 320, 200, base)
            await gpu.flush(fb)
            assert (await next_png(bed, 1))[2] == to_rgb(base)  # no cursor yet
            arrow = cursor_arrow()
            cursor = await gpu.create_cursor(arrow)
            await gpu.update_cursor(cursor, 100, 50, hot_x=0, hot_y=0)
            # The cursor messages precede the next frame on the display
            # channel (the daemon is single-threaded): flush one pixel.
            await gpu.flush(fb, 0, 0, 1, 1)
            _, _, shown = await next_png(bed, 2)
            assert shown == with_cursor(to_rgb(base), 320, 200, arrow, 100, 50)
            await gpu.move_cursor(250, 170)
            await gpu.flush(fb, 0, 0, 1, 1)
            _, _, moved = await next_png(bed, 3)
            assert moved == with_cursor(to_rgb(base), 320, 200, arrow, 250, 170)  # clipped at the edges
            await gpu.move_cursor(10, 10, visible=False)
            await gpu.flush(fb, 0, 0, 1, 1)
            assert (await next_png(bed, 4))[2] == to_rgb(base)
            await gpu.close()


def with_cursor(rgb: bytes, width: int, height: int, image: bytes, left: int, top: int) -> bytes:
    """The expected picture: each cursor pixel blended with its alpha."""
    out = bytearray(rgb)
    for cy in range(64):
        for cx in range(64):
            x, y = left + cx, top + cy
            b, g, r, a = image[(cy * 64 + cx) * 4:(cy * 64 + cx) * 4 + 4]
            if a and 0 <= x < width and 0 <= y < height:
                d = (y * width + x) * 3
                for i, src in enumerate((r, g, b)):
                    out[d + i] = (src * a + out[d + i] * (255 - a) + 127) // 255
    return bytes(out)


async def status_needs_reset_soon(transport: VirtioMmioDriver) -> None:
    while not await transport.needs_reset():
        await trio.sleep(0.05)


async def test_the_daemon_dying_mid_session_is_a_clear_error_not_a_hang(workdir, memory):
    # The default --reconnect: a gpu daemon's resources die with it, so the
    # bridge does not wait for a new one before telling the guest.
    with GpuTestbed(workdir, resolution=(320, 200), bridge_extra=["--memory", memory]) as bed:
        async with guest_gpu(bed) as (transport, gpu):
            fb = await gpu.create_framebuffer(320, 200)
            fb.fill(0, 0, 320, 200, picture(320, 200))
            await gpu.flush(fb)
            await next_png(bed, 1)
            bed.daemon.kill()
            with trio.fail_after(30):
                await status_needs_reset_soon(transport)
            # A command now fails at once instead of waiting for a dead daemon.
            with trio.fail_after(30), pytest.raises(DeviceNeedsReset):
                await gpu.flush(fb)
            assert bed.bridge.alive()
            output = bed.bridge.output()
            assert "virtio-gpu at daemon" in output and "the device needs a reset" in output
            assert "Traceback" not in output
            # A new daemon, and the guest's reset brings the display back.
            bed.restart_daemon()
            gpu = await VirtioGpuDriver.open(transport)  # resets the device, DRIVER_OK again
            fb = await gpu.create_framebuffer(320, 200)
            image = solid(320, 200, (12, 34, 56))
            fb.fill(0, 0, 320, 200, image)
            await gpu.flush(fb)
            assert await next_png(bed, 2) == (320, 200, to_rgb(image))
            await gpu.close()


async def test_a_guest_using_grants_draws_through_shadow_memory(workdir):
    """xl's grant_usage=1: the framebuffer's backing is given as grant
    addresses inside ATTACH_BACKING; the bridge (shadow memory, which auto
    picks) copies it through the grants, and the picture arrives."""
    with GpuTestbed(workdir, resolution=(320, 200), virtio="gpu,grant_usage=1") as bed:
        assert "shadow memory" in bed.bridge.output()
        with SimHypervisor.connect(bed.control, bed.domid) as hv:
            async with guest_gpu(bed) as (transport, gpu):
                assert transport.dma.needs_calls
                fb = await gpu.create_framebuffer(320, 200)
                image = picture(320, 200)
                fb.fill(0, 0, 320, 200, image)
                await gpu.flush(fb)
                assert await next_png(bed, 1) == (320, 200, to_rgb(image))
                fb.fill(10, 20, 30, 40, solid(30, 40, (250, 0, 250)))
                await gpu.flush(fb, 10, 20, 30, 40)
                assert (await next_png(bed, 2))[2] == patch(to_rgb(image), 320, 10, 20, 30, 40,
                                                            to_rgb(solid(30, 40, (250, 0, 250))))
                stats = hv.stats()
                assert stats["map_grant_calls"] > 0 and stats["map_foreign_calls"] == 0  # grants only
                await gpu.close()


async def test_a_backing_the_arena_cannot_hold_is_refused_and_the_device_keeps_working(workdir):
    """--arena-mib 1: a 640x480 framebuffer (1.2 MB) is answered
    ERR_OUT_OF_MEMORY by the bridge, at once; a 320x200 one still works."""
    with GpuTestbed(workdir, resolution=(320, 200),
                    bridge_extra=["--memory", "shadow", "--arena-mib", "1"]) as bed:
        async with guest_gpu(bed) as (transport, gpu):
            with pytest.raises(VirtioGpuError, match="RESOURCE_ATTACH_BACKING: the device answered ERR_OUT_OF_MEMORY"):
                await gpu.create_framebuffer(640, 480)
            fb = await gpu.create_framebuffer(320, 200)
            image = picture(320, 200)
            fb.fill(0, 0, 320, 200, image)
            await gpu.flush(fb)
            assert await next_png(bed, 1) == (320, 200, to_rgb(image))
            assert not await transport.needs_reset()
            await gpu.close()
        output = bed.bridge.output()
        assert "does not fit the" in output and "--arena-mib" in output and "ERR_OUT_OF_MEMORY" in output
        assert "Traceback" not in output


@contextlib.contextmanager
def disk_and_display(workdir: str):
    """qemu-storage-daemon and vhost-user-gpu behind one bridge."""
    image = os.path.join(workdir, "disk.img")
    sockets = [os.path.join(workdir, "blk.sock"), os.path.join(workdir, "gpu.sock")]
    control = os.path.join(workdir, "sim.sock")
    frames = os.path.join(workdir, "frames")
    os.mkdir(frames)
    with open(image, "wb") as f:
        f.truncate(16 * MiB)
    started = []
    try:
        started.append(start_qemu_storage_daemon(image, sockets[0]))
        started.append(start_vhost_user_gpu(sockets[1]))
        started.append(start_simulator(control, vcpus=2, extra_args=["--virtio", "blk", "--virtio", "gpu"]))
        argv = [sys.executable, "-m", "bridge.cli", "--domid", "1", "--xen-sim", control, "-v", "--reconnect", "0",
                "--device", f"blk:{sockets[0]}", "--device", f"gpu:{sockets[1]},gpu-output={frames}",
                "--gpu-png-every-flush", "--gpu-resolution", "160x100"]
        bridge = start_bridge(argv)
        started.append(bridge)
        yield control, started[1], bridge, frames
    finally:
        for child in reversed(started):
            child.stop()
        for path in [image, *sockets, control]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        for name in os.listdir(frames):
            os.unlink(os.path.join(frames, name))
        os.rmdir(frames)


async def test_the_bridge_keeps_serving_other_devices_when_the_gpu_daemon_dies(workdir):
    with disk_and_display(workdir) as (control, gpu_daemon, bridge, frames):
        with trio.fail_after(GUEST_TIMEOUT):
            async with SimGuest.open(control) as guest:
                allocator = GuestAllocator(guest.ram.base, guest.ram.size)
                disk_transport = VirtioMmioDriver(None, guest.ram, allocator, LIBXL_FIRST_MMIO_BASE,
                                                  LIBXL_FIRST_SPI, guest)
                disk = await VirtioBlkDriver.open(disk_transport)
                transport, gpu = await open_gpu(guest, LIBXL_FIRST_MMIO_BASE + 0x200, LIBXL_FIRST_SPI + 1, allocator)
                fb = await gpu.create_framebuffer(160, 100)
                image = picture(160, 100)
                fb.fill(0, 0, 160, 100, image)
                await gpu.flush(fb)
                while not os.listdir(frames):
                    await trio.sleep(0.02)
                (name,) = os.listdir(frames)
                assert png.read_rgb(os.path.join(frames, name)) == (160, 100, to_rgb(image))
                await disk.write(0, b"before" * 512)
                os.kill(gpu_daemon.pid, signal.SIGKILL)
                await status_needs_reset_soon(transport)
                await disk.write(8, b"after!" * 512)
                await disk.flush()
                assert await disk.read(0, 3072) == b"before" * 512
                assert await disk.read(8, 3072) == b"after!" * 512
                assert not await disk_transport.needs_reset()
        assert bridge.alive()


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--force-device-scale-factor=1"]


def screenshot(url: str, width: int, height: int, workdir: str, name: str) -> str:
    """A headless Debian chromium (a fresh profile each time) loads ``url``
    in a width x height window and saves what it shows; the path."""
    profile = os.path.join(workdir, f"chromium-{name}")
    out = os.path.join(workdir, f"{name}.png")
    argv = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
            f"--screenshot={out}", url]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: chromium and the helpers it started
        proc.communicate()
        raise AssertionError("chromium did not finish its screenshot in 90 s")
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert proc.returncode == 0 and os.path.exists(out), err.decode(errors="replace")[-2000:]
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_the_live_view_in_a_browser_is_the_png(workdir):
    port = free_port()
    with GpuTestbed(workdir, resolution=(320, 200), cursor=True,
                    bridge_extra=["--gpu-http", f"127.0.0.1:{port}"]) as bed:
        url = f"http://127.0.0.1:{port}/"
        async with guest_gpu(bed) as (_transport, gpu):
            fb = await gpu.create_framebuffer(320, 200)
            fb.fill(0, 0, 320, 200, picture(320, 200))
            await gpu.flush(fb)
            first = await next_png(bed, 1)
            shot = await trio.to_thread.run_sync(screenshot, url, 320, 200, workdir, "first")
            assert png.read_rgb(shot) == first
            # a partial update and the cursor: the view shows them as the PNG does
            fb.fill(100, 60, 40, 40, solid(40, 40, (250, 250, 0)))
            cursor = await gpu.create_cursor(cursor_arrow())
            await gpu.update_cursor(cursor, 200, 120)
            await gpu.flush(fb, 100, 60, 40, 40)
            second = await next_png(bed, 2)
            assert second != first
            shot = await trio.to_thread.run_sync(screenshot, url, 320, 200, workdir, "second")
            assert png.read_rgb(shot) == second
            await gpu.close()
        for name in ("first.png", "second.png"):
            os.unlink(os.path.join(workdir, name))
