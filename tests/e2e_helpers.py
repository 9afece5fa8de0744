"""What the end-to-end tests do as the guest, and how they check the image."""

from __future__ import annotations

import trio

from bridge.blk_workload import SECTOR
from bridge.testbed import BlkTestbed
from xen.sim.guest import SimGuest
from xen.sim.guest_memory import GuestAllocator
from xen.sim.virtio_blk import VirtioBlkDriver
from xen.sim.virtio_mmio_driver import VirtioMmioDriver


async def open_blk(guest: SimGuest, bed: BlkTestbed, **kwargs) -> tuple[VirtioMmioDriver, VirtioBlkDriver]:
    """Probe the testbed's device the way Linux would: with grants when the
    guest's device tree says grant_usage (xen-grant-dma), else by address."""
    allocator = GuestAllocator(guest.ram.base, guest.ram.size)
    transport = await VirtioMmioDriver.for_device(guest, allocator, bed.mmio_base, bed.irq)
    return transport, await VirtioBlkDriver.open(transport, **kwargs)


async def write_all(blk, blocks: dict[int, bytes]) -> None:
    """Write every {sector: data} block, all in flight at once."""
    async with trio.open_nursery() as nursery:
        for sector, data in blocks.items():
            nursery.start_soon(blk.write, sector, data)


def assert_on_image(image: str, blocks: dict[int, bytes]) -> None:
    """The image file holds every {sector: data} block."""
    with open(image, "rb") as f:
        for sector, data in blocks.items():
            f.seek(sector * SECTOR)
            assert f.read(len(data)) == data, f"sector {sector}"


class NoBackendRequests:
    """A front-end handler for tests whose daemon sends nothing on the
    back-end channel worth acting on."""

    async def config_changed(self) -> None:
        pass

    def vring_call(self, index: int) -> None:
        pass

    def vring_err(self, index: int) -> None:
        pass
