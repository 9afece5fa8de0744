"""Any vhost-user daemon, as the bridge's generic device (--device-id N):
the harness knows no I/O for it, so it gets the protocol and lifecycle
checks. The guest's driver accepts VIRTIO_F_VERSION_1 only, sets up every
queue the device reports (QueueNumMax non-zero; at most --queues) and sets
DRIVER_OK; config space is compared with the daemon's GET_CONFIG reply.
For a daemon that needs something to serve, --daemon-cmd may name
``{image}`` (an empty file of --image-mib MiB) and ``{share}`` (an empty
directory), made by the harness.
"""

from __future__ import annotations

import os

from bridge.smoke.battery import CheckFailed, NotApplicable
from bridge.smoke.device_battery import DeviceBattery, Opened
from xen.sim.guest_memory import GuestAllocator
from xen.sim.virtio_mmio_driver import QueueUnavailable, VirtioMmioDriver

VIRTIO_F_VERSION_1 = 32
MAX_QUEUES = 64


def prepare(workdir: str, options) -> dict[str, str]:
    image = os.path.join(workdir, "scratch.img")
    with open(image, "wb") as f:
        f.truncate(options.image_mib << 20)
    share = os.path.join(workdir, "share")
    os.mkdir(share)
    return {"image": image, "share": share}


async def open_generic(rig, guest) -> Opened:
    allocator = GuestAllocator(guest.ram.base, guest.ram.size)
    transport = VirtioMmioDriver(None, guest.ram, allocator, rig.mmio_base, rig.irq, guest)
    await transport.probe(1 << VIRTIO_F_VERSION_1, device_id=rig.options.device_id)
    limit = rig.options.queues or MAX_QUEUES
    for index in range(limit):
        try:
            await transport.setup_queue(index, 64)
        except QueueUnavailable:
            break
    if not transport.queues:
        await transport.fail()
        raise CheckFailed("the device reports no queue (QueueNumMax 0 for queue 0)")
    await transport.driver_ok()
    return Opened(guest, transport, None)


async def check_config(rig, opened: Opened, daemon_config: bytes | None) -> list[str]:
    if not daemon_config:
        raise NotApplicable("the daemon gives no config space (no CONFIG protocol feature, or GET_CONFIG empty)")
    seen = await opened.transport.read_config_bytes(0, len(daemon_config))
    if seen != daemon_config:
        at = next(i for i, (a, b) in enumerate(zip(seen, daemon_config)) if a != b)
        raise CheckFailed(f"the guest reads config byte {at} as {seen[at]:#04x}, the daemon's GET_CONFIG "
                          f"says {daemon_config[at]:#04x}")
    return [f"{len(daemon_config)}-byte config space reads as the daemon gave it: {daemon_config[:16].hex()}"
            + ("..." if len(daemon_config) > 16 else "")]


def bridge_flags(rig) -> list[str]:
    options = rig.options
    flags = ["--device-id", str(options.device_id)]
    if options.queues:
        flags += ["--queues", str(options.queues)]
    return flags


BATTERY = DeviceBattery(
    name="generic",
    bridge_device="generic",
    summary="any daemon, as virtio device --device-id N: protocol and lifecycle checks only",
    open=open_generic,
    placeholders=("image", "share"),
    prepare=prepare,
    bridge_flags=bridge_flags,
    check_config=check_config,
)
