"""The virtio-blk battery (qemu-storage-daemon and the like).

The harness makes the image (``{image}`` in --daemon-cmd); the I/O checks
write patterns from the guest, read them back, flush, and compare what the
image file holds. Without ``{image}`` (or with --socket) only the guest's
view is verified.
"""

from __future__ import annotations

import os
import random
import struct

import trio

from bridge.smoke.battery import Check, CheckFailed, NotApplicable
from bridge.smoke.device_battery import DeviceBattery, Opened
from xen.sim.guest_memory import GuestAllocator
from xen.sim.guest_virtqueue import VirtioDriverError
from xen.sim.virtio_blk import (
    CFG_CAPACITY,
    CFG_WRITEBACK,
    DEFAULT_FEATURES,
    SECTOR_SIZE,
    VIRTIO_BLK_F_CONFIG_WCE,
    VirtioBlkDriver,
)
from xen.sim.virtio_mmio_driver import VirtioMmioDriver

MiB = 1 << 20
FEATURE_NAMES = {
    0: "BLK_BARRIER", 1: "BLK_SIZE_MAX", 2: "BLK_SEG_MAX", 4: "BLK_GEOMETRY", 5: "BLK_RO", 6: "BLK_BLK_SIZE",
    7: "BLK_SCSI", 9: "BLK_FLUSH", 10: "BLK_TOPOLOGY", 11: "BLK_CONFIG_WCE", 12: "BLK_MQ", 13: "BLK_DISCARD",
    14: "BLK_WRITE_ZEROES", 15: "BLK_LIFETIME", 16: "BLK_SECURE_ERASE", 17: "BLK_ZONED",
}


def prepare(workdir: str, options) -> dict[str, str]:
    image = os.path.join(workdir, "disk.img")
    with open(image, "wb") as f:
        f.truncate(options.image_mib * MiB)
    return {"image": image}


def _image(rig) -> str | None:
    """The image the daemon serves, when the harness made it and the daemon's
    command line names it."""
    if rig.options.daemon_cmd is None or "{image}" not in rig.options.daemon_cmd:
        return None
    return rig.values.get("image")


async def open_blk(rig, guest, *, features: int = DEFAULT_FEATURES) -> Opened:
    allocator = GuestAllocator(guest.ram.base, guest.ram.size)
    transport = await VirtioMmioDriver.for_device(guest, allocator, rig.mmio_base, rig.irq)
    blk = await VirtioBlkDriver.open(transport, features=features)
    return Opened(guest, transport, blk)


def _round_sector(blk: VirtioBlkDriver, n: int) -> int:
    blocks = max(1, blk.capacity // 8 // 2)
    return (blk.capacity // 2 // 8 + n % blocks) * 8


async def io_round(rig, opened: Opened, n: int) -> None:
    """Write one 4 KiB block and read it back (one request at a time)."""
    blk = opened.driver
    sector = _round_sector(blk, n)
    data = struct.pack("<Q", n) * 512
    rig.step = f"writing 4096 bytes at sector {sector}"
    await blk.write(sector, data)
    rig.step = f"reading back 4096 bytes at sector {sector}"
    got = await blk.read(sector, 4096)
    if got != data:
        raise CheckFailed(f"sector {sector}: read back {_first_difference(data, got)} of what was written")


def start_in_flight(rig, opened: Opened, nursery, count: int) -> None:
    blk = opened.driver

    async def write(i: int) -> None:
        try:
            await blk.write(_round_sector(blk, 100 + i), bytes([i]) * 4096)
        except* VirtioDriverError:
            pass  # the reset took it (also inside a driver's nursery): expected

    for i in range(count):
        nursery.start_soon(write, i)


def _first_difference(expected: bytes, got: bytes) -> str:
    if len(expected) != len(got):
        return f"{len(got)} bytes instead of {len(expected)}"
    for i, (a, b) in enumerate(zip(expected, got)):
        if a != b:
            return f"byte {i} as {b:#04x} instead of {a:#04x}"
    return "the same bytes"


def _blocks(blk: VirtioBlkDriver, seed: int, count: int) -> dict[int, bytes]:
    """``count`` blocks of random sizes (512 B to 256 KiB) at distinct places
    in the first half of the device."""
    rng = random.Random(seed)
    half = blk.capacity // 2
    slot = 512  # sectors: 256 KiB apart
    slots = rng.sample(range(max(1, half // slot)), min(count, max(1, half // slot)))
    return {s * slot: rng.randbytes(rng.choice((1, 8, 64, 512)) * SECTOR_SIZE) for s in slots}


async def _write_all(rig, blk, blocks: dict[int, bytes]) -> None:
    rig.step = f"writing {len(blocks)} blocks, all in flight"
    async with trio.open_nursery() as nursery:
        for sector, data in blocks.items():
            nursery.start_soon(blk.write, sector, data)


async def _read_back(rig, blk, blocks: dict[int, bytes]) -> None:
    rig.step = f"reading {len(blocks)} blocks back, all in flight"
    got: dict[int, bytes] = {}

    async def read(sector: int, length: int) -> None:
        got[sector] = await blk.read(sector, length)

    async with trio.open_nursery() as nursery:
        for sector, data in blocks.items():
            nursery.start_soon(read, sector, len(data))
    for sector, data in blocks.items():
        if got[sector] != data:
            raise CheckFailed(f"the guest read back sector {sector} ({len(data)} bytes) with "
                              f"{_first_difference(data, got[sector])}")


def _compare_image(image: str, blocks: dict[int, bytes]) -> None:
    with open(image, "rb") as f:
        for sector, data in blocks.items():
            f.seek(sector * SECTOR_SIZE)
            on_disk = f.read(len(data))
            if on_disk != data:
                raise CheckFailed(f"the image file at sector {sector} holds {_first_difference(data, on_disk)} "
                                  "of what the guest wrote")


async def check_write_read(rig):
    async with rig.guest() as guest:
        opened = await rig.open(guest)
        blocks = _blocks(opened.driver, 1, 32)
        await _write_all(rig, opened.driver, blocks)
        await _read_back(rig, opened.driver, blocks)
        peak = max(vq.peak_in_flight for vq in opened.driver.queues)
        await opened.transport.reset()
    total = sum(len(d) for d in blocks.values())
    return [f"{len(blocks)} writes ({total} bytes, up to {peak} in flight) read back identical"]


async def check_flush(rig):
    async with rig.guest() as guest:
        opened = await rig.open(guest)
        if not opened.driver.has_flush:
            await opened.transport.reset()
            raise NotApplicable("the daemon does not offer VIRTIO_BLK_F_FLUSH (no volatile cache)")
        rig.step = "writing 4096 bytes at sector 8"
        await opened.driver.write(8, b"\xa5" * 4096)
        rig.step = "flushing (VIRTIO_BLK_T_FLUSH)"
        await opened.driver.flush()
        await opened.transport.reset()
    return ["VIRTIO_BLK_T_FLUSH answered VIRTIO_BLK_S_OK"]


async def check_on_image(rig):
    image = _image(rig)
    if image is None:
        raise NotApplicable("the harness does not know the daemon's image (give --daemon-cmd with {image})")
    async with rig.guest() as guest:
        opened = await rig.open(guest)
        size = os.path.getsize(image)
        if opened.driver.capacity * SECTOR_SIZE != size:
            raise CheckFailed(f"the device's capacity is {opened.driver.capacity} sectors "
                              f"({opened.driver.capacity * SECTOR_SIZE} bytes), the image is {size} bytes")
        blocks = _blocks(opened.driver, 2, 24)
        await _write_all(rig, opened.driver, blocks)
        rig.step = "flushing"
        await opened.driver.flush()
        await opened.transport.reset()
    _compare_image(image, blocks)
    return [f"{len(blocks)} writes and a flush: the image file holds every byte"]


async def check_config(rig, opened: Opened, daemon_config: bytes | None) -> list[str]:
    if daemon_config is None:
        raise CheckFailed("the daemon gave no config space (no GET_CONFIG reply); virtio-blk needs its capacity")
    seen = await opened.transport.read_config_bytes(0, len(daemon_config))
    if seen != daemon_config:
        at = next(i for i, (a, b) in enumerate(zip(seen, daemon_config)) if a != b)
        raise CheckFailed(f"the guest reads config byte {at} as {seen[at]:#04x}, the daemon's GET_CONFIG "
                          f"says {daemon_config[at]:#04x}")
    capacity = await opened.transport.read_config(CFG_CAPACITY, 8)
    details = [f"{len(daemon_config)}-byte config; capacity {capacity} sectors"]
    image = _image(rig)
    if image is not None and capacity * SECTOR_SIZE != os.path.getsize(image):
        raise CheckFailed(f"capacity {capacity} sectors is not the image's {os.path.getsize(image)} bytes")
    return details


async def config_write(rig, guest) -> tuple[Opened, list[str]]:
    """A write the bridge refuses (capacity), then, with CONFIG_WCE, the
    writeback field toggled and read back."""
    opened = await rig.open(guest, features=DEFAULT_FEATURES | 1 << VIRTIO_BLK_F_CONFIG_WCE)
    t = opened.transport
    before = await t.read_config(CFG_CAPACITY, 8)
    await t.write_config(CFG_CAPACITY, 4, 1)
    after = await t.read_config(CFG_CAPACITY, 8)
    if after != before:
        raise CheckFailed(f"a guest write changed the read-only capacity from {before} to {after}")
    details = ["a write to capacity (read-only) left it unchanged"]
    if not t.has_feature(VIRTIO_BLK_F_CONFIG_WCE):
        return opened, details + ["VIRTIO_BLK_F_CONFIG_WCE not offered: no writable field"]
    old = await t.read_config(CFG_WRITEBACK, 1)
    new = 0 if old else 1
    rig.step = f"writing writeback = {new}"
    await t.write_config(CFG_WRITEBACK, 1, new)
    got = await t.read_config(CFG_WRITEBACK, 1)
    await t.write_config(CFG_WRITEBACK, 1, old)
    details.append(f"writeback {old} -> {new}: reads back {got}")
    if got != new:
        raise CheckFailed(f"writeback written as {new} reads back as {got}")
    return opened, details


BATTERY = DeviceBattery(
    name="blk",
    bridge_device="blk",
    summary="virtio-blk (qemu-storage-daemon): {image} is a disk image the harness makes",
    open=open_blk,
    feature_names=FEATURE_NAMES,
    placeholders=("image",),
    prepare=prepare,
    xenstore_virtio=lambda options: "blk",
    io_checks=(
        Check("io.blk.write-read", check_write_read),
        Check("io.blk.flush", check_flush),
        Check("io.blk.on-image", check_on_image),
    ),
    io_round=io_round,
    start_in_flight=start_in_flight,
    check_config=check_config,
    config_write=config_write,
)
