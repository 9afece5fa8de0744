"""End to end: one bridge process serving several devices of one guest,
each with its own daemon, window and SPI, found in xenstore in devid
order; one daemon dying leaves the other device working."""

from __future__ import annotations

import contextlib
import os
import sys

import pytest
import trio

from bridge.daemons import start_qemu_storage_daemon
from bridge.testbed import LIBXL_FIRST_MMIO_BASE, LIBXL_FIRST_SPI, start_bridge
from tests.e2e_helpers import assert_on_image
from xen.sim.guest import SimGuest
from xen.sim.guest_memory import GuestAllocator
from xen.sim.launch import start_simulator
from xen.sim.virtio_blk import VirtioBlkDriver
from xen.sim.virtio_mmio_driver import VirtioMmioDriver

pytestmark = pytest.mark.e2e

MiB = 1 << 20


@contextlib.contextmanager
def two_disks(workdir: str, *bridge_flags: str):
    """Two qemu-storage-daemons, a simulator with two libxl virtio-blk
    entries, one bridge for both; everything stopped by PID afterwards."""
    images = [os.path.join(workdir, f"disk{i}.img") for i in range(2)]
    sockets = [os.path.join(workdir, f"blk{i}.sock") for i in range(2)]
    control = os.path.join(workdir, "sim.sock")
    started = []
    try:
        for image, sock in zip(images, sockets):
            with open(image, "wb") as f:
                f.truncate(16 * MiB)
            started.append(start_qemu_storage_daemon(image, sock))
        started.append(start_simulator(control, vcpus=2, extra_args=["--virtio", "blk", "--virtio", "blk"]))
        argv = [sys.executable, "-m", "bridge.cli", "--domid", "1", "--xen-sim", control, "-v",
                "--device", f"blk:{sockets[0]}", "--device", f"blk:{sockets[1]}", *bridge_flags]
        bridge = start_bridge(argv)
        started.append(bridge)
        yield control, images, started[:2], bridge
    finally:
        for child in reversed(started):
            child.stop()
        for path in images + sockets + [control]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


async def open_disk(guest: SimGuest, index: int) -> tuple[VirtioMmioDriver, VirtioBlkDriver]:
    allocator = GuestAllocator(guest.ram.base + index * 64 * MiB, 64 * MiB)  # one region of RAM each
    transport = VirtioMmioDriver(None, guest.ram, allocator, LIBXL_FIRST_MMIO_BASE + 0x200 * index,
                                 LIBXL_FIRST_SPI + index, guest)
    return transport, await VirtioBlkDriver.open(transport)


async def test_two_disks_through_one_bridge(workdir):
    with two_disks(workdir) as (control, images, _daemons, bridge):
        [ready] = [line for line in bridge.output().splitlines() if line.startswith("xen-vhost-bridge: ready:")]
        assert ready.count("serving virtio-blk") == 2  # one ready line for both devices
        assert "backend/virtio/1/0" in ready and "backend/virtio/1/1" in ready
        async with SimGuest.open(control) as guest:
            (_, disk0), (_, disk1) = await open_disk(guest, 0), await open_disk(guest, 1)
            async with trio.open_nursery() as nursery:
                for i in range(16):
                    nursery.start_soon(disk0.write, i * 8, bytes([i]) * 4096)
                    nursery.start_soon(disk1.write, i * 8, bytes([0x80 | i]) * 4096)
            await disk0.flush()
            await disk1.flush()
            assert await disk0.read(8, 4096) == bytes([1]) * 4096
            assert await disk1.read(8, 4096) == bytes([0x81]) * 4096
        assert_on_image(images[0], {i * 8: bytes([i]) * 4096 for i in range(16)})
        assert_on_image(images[1], {i * 8: bytes([0x80 | i]) * 4096 for i in range(16)})


async def test_one_daemon_dying_leaves_the_other_device_working(workdir):
    with two_disks(workdir, "--reconnect", "0") as (control, images, daemons, bridge):
        async with SimGuest.open(control) as guest:
            (t0, disk0), (t1, disk1) = await open_disk(guest, 0), await open_disk(guest, 1)
            await disk0.write(0, b"\x01" * 4096)
            seen = t0.config_changes
            daemons[0].kill()
            with trio.fail_after(10):
                await t0.wait_config_change(seen)
            assert await t0.needs_reset()
            for i in range(8):  # the other disk goes on as if nothing happened
                await disk1.write(i * 8, b"\x22" * 4096)
            assert await disk1.read(0, 4096) == b"\x22" * 4096
            assert not await t1.needs_reset()
        assert bridge.alive()
        assert_on_image(images[1], {i * 8: b"\x22" * 4096 for i in range(8)})
