"""The virtio-fs battery (virtiofsd and the like).

The harness makes the shared directory (``{share}`` in --daemon-cmd); the
guest's FUSE client reads a file the harness put there, writes one the
harness then reads on the host, and lists the directory. The bridge gives
the guest the tag (--fs-tag), as virtiofsd has no config space.
"""

from __future__ import annotations

import os
import random

from bridge.smoke.battery import Check, CheckFailed
from bridge.smoke.device_battery import DeviceBattery, Opened
from xen.sim.guest_memory import GuestAllocator
from xen.sim.guest_virtqueue import VirtioDriverError
from xen.sim.virtio_fs import VirtioFsDriver
from xen.sim.virtio_mmio_driver import VirtioMmioDriver

MiB = 1 << 20


def prepare(workdir: str, options) -> dict[str, str]:
    share = os.path.join(workdir, "share")
    os.mkdir(share)
    return {"share": share}


def _share(rig) -> str | None:
    if rig.options.daemon_cmd is None or "{share}" not in rig.options.daemon_cmd:
        return None
    return rig.values.get("share")


async def open_fs(rig, guest) -> Opened:
    allocator = GuestAllocator(guest.ram.base, guest.ram.size)
    transport = await VirtioMmioDriver.for_device(guest, allocator, rig.mmio_base, rig.irq)
    fs = await VirtioFsDriver.open(transport)
    return Opened(guest, transport, fs)


async def io_round(rig, opened: Opened, n: int) -> None:
    name = f"smoke-round-{n}"
    data = f"round {n}\n".encode() * 64
    rig.step = f"writing {name} through FUSE"
    await opened.driver.write_file(name, data)
    rig.step = f"reading {name} back through FUSE"
    got = await opened.driver.read_file(name)
    if got != data:
        raise CheckFailed(f"{name}: read back {len(got)} bytes that differ from the {len(data)} written")


def start_in_flight(rig, opened: Opened, nursery, count: int) -> None:
    async def one(i: int) -> None:
        try:
            await opened.driver.write_file(f"smoke-inflight-{i}", bytes([i]) * 65536)
        except* VirtioDriverError:
            pass  # the reset took it (also inside a driver's nursery): expected

    for i in range(count):
        nursery.start_soon(one, i)


async def check_config(rig, opened: Opened, daemon_config: bytes | None) -> list[str]:
    fs = opened.driver
    if fs.tag != rig.options.fs_tag:
        raise CheckFailed(f"the guest reads tag {fs.tag!r}, expected {rig.options.fs_tag!r}")
    source = "the daemon's config space" if daemon_config else "supplied by the bridge (the daemon has no CONFIG)"
    info = fs.init_info
    return [f"tag {fs.tag!r} ({source}); {fs.num_request_queues} request queue(s)",
            f"FUSE {info.major}.{info.minor}, max_write {info.max_write}"]


async def check_read(rig):
    share = _share(rig)
    data = random.Random(3).randbytes(3 * MiB + 123)  # several READs, the last one short
    async with rig.guest() as guest:
        opened = await rig.open(guest)
        if share is not None:
            with open(os.path.join(share, "from-host.bin"), "wb") as f:
                f.write(data)
            where = "a file the harness wrote on the host"
        else:
            rig.step = "writing from-host.bin through FUSE (the shared directory is unknown)"
            await opened.driver.write_file("from-host.bin", data)
            where = "a file the guest wrote (shared directory unknown: give {share})"
        rig.step = "reading from-host.bin through FUSE"
        got = await opened.driver.read_file("from-host.bin")
        await opened.transport.reset()
    if got != data:
        raise CheckFailed(f"the guest read {len(got)} bytes of from-host.bin; expected the {len(data)} bytes of {where}")
    return [f"read {len(data)} bytes of {where} through FUSE"]


async def check_write(rig):
    share = _share(rig)
    data = random.Random(4).randbytes(2 * MiB + 4096 + 7)
    async with rig.guest() as guest:
        opened = await rig.open(guest)
        rig.step = "writing from-guest.bin through FUSE"
        await opened.driver.write_file("from-guest.bin", data)
        rig.step = "reading from-guest.bin back through FUSE"
        back = await opened.driver.read_file("from-guest.bin")
        await opened.transport.reset()
    if back != data:
        raise CheckFailed(f"the guest read back {len(back)} bytes of from-guest.bin, not the {len(data)} it wrote")
    if share is None:
        return [f"wrote and read back {len(data)} bytes (the host side is unknown: give {{share}})"]
    with open(os.path.join(share, "from-guest.bin"), "rb") as f:
        on_host = f.read()
    if on_host != data:
        raise CheckFailed(f"the host file from-guest.bin holds {len(on_host)} bytes, not the {len(data)} the guest "
                          "wrote")
    return [f"wrote {len(data)} bytes; the host file holds every byte"]


async def check_listdir(rig):
    share = _share(rig)
    names = [f"entry-{i:02d}" for i in range(40)]
    async with rig.guest() as guest:
        opened = await rig.open(guest)
        rig.step = "creating files through FUSE"
        await opened.driver.write_file("listing-marker", b"x")
        if share is not None:
            os.makedirs(os.path.join(share, "listing"), exist_ok=True)
            for name in names:
                with open(os.path.join(share, "listing", name), "w") as f:
                    f.write(name)
            rig.step = "listing a directory through FUSE (READDIRPLUS)"
            listed = sorted(await opened.driver.listdir("listing"))
        else:
            listed = names = []
        top = await opened.driver.listdir("/")
        await opened.transport.reset()
    if listed != sorted(names):
        raise CheckFailed(f"the guest lists {len(listed)} entries in listing/, the host made {len(names)}")
    if "listing-marker" not in top:
        raise CheckFailed(f"the guest's listing of / lacks the file it created: {sorted(top)[:10]}")
    return [f"listed {len(names)} host-made entries and the guest's own file"]


BATTERY = DeviceBattery(
    name="fs",
    bridge_device="fs",
    summary="virtio-fs (virtiofsd): {share} is a directory the harness makes",
    open=open_fs,
    placeholders=("share",),
    prepare=prepare,
    bridge_flags=lambda rig: ["--fs-tag", rig.options.fs_tag],
    xenstore_virtio=lambda options: "fs",
    io_checks=(
        Check("io.fs.read", check_read),
        Check("io.fs.write", check_write),
        Check("io.fs.listdir", check_listdir),
    ),
    io_round=io_round,
    start_in_flight=start_in_flight,
    check_config=check_config,
)
