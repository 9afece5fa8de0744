"""Put it together: a hypervisor, guest memory, one device, the IOREQ server.

Start-up order matters: the daemon is dialled first (the device's features,
queues and config come from it), then the IOREQ server maps the window, so
the guest never reaches a window nobody can answer. Tear-down runs in
reverse on every exit path, SIGINT and SIGTERM included.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable

import attrs
import trio

from bridge.device import VhostUserDevice
from bridge.device_types import DeviceType
from bridge.memory import GuestRamMap, PassthroughMemory, ShadowMemory
from bridge.virtio_mmio import WINDOW_SIZE
from xen.hypervisor import HypervisorError, open_hypervisor
from xen.ioreq_server import IoreqServer, MmioRouter

log = logging.getLogger(__name__)


@attrs.frozen
class BridgeConfig:
    domid: int
    socket_path: str
    device_type: DeviceType
    mmio_base: int
    irq: int
    xen_sim: str | None = None
    queue_size: int = 256
    timeout: float = 5.0
    memory: str = "auto"
    arena_size: int = 64 << 20


async def run_bridge(config: BridgeConfig, *, on_ready: Callable[[str], None] | None = None) -> None:
    """Serve until SIGINT or SIGTERM (or cancellation)."""
    hv = open_hypervisor(config.domid, config.xen_sim)
    ram = memory = None
    try:
        banks = hv.guest_ram()
        if banks is None:
            # Shadow mode would work here, given foreign mappings of guest
            # RAM; the real-Xen back end does not make them yet.
            raise HypervisorError("this hypervisor does not give the bridge a mapping of guest RAM")
        ram = GuestRamMap(banks)
        mode = "passthrough" if config.memory == "auto" else config.memory
        memory = ShadowMemory(ram, config.arena_size) if mode == "shadow" else PassthroughMemory(ram)
        router = MmioRouter()
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                device = VhostUserDevice(
                    hypervisor=hv,
                    device_type=config.device_type,
                    socket_path=config.socket_path,
                    irq=config.irq,
                    memory=memory,
                    queue_size=config.queue_size,
                    timeout=config.timeout,
                )
                await nursery.start(device.run)
                router.add(config.mmio_base, WINDOW_SIZE, device)
                server = IoreqServer(hv, router)
                await nursery.start(server.serve)
                end = config.mmio_base + WINDOW_SIZE - 1
                message = (
                    f"serving virtio-{config.device_type.name} for domain {config.domid} at "
                    f"{config.mmio_base:#x}-{end:#x}, irq {config.irq}, daemon {config.socket_path}, "
                    f"{memory.mode} memory"
                )
                log.info("%s", message)
                if on_ready is not None:
                    on_ready(message)
                async for signum in signals:
                    log.info("%s: shutting down", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break
    finally:
        if memory is not None:
            memory.close()
        if ram is not None:
            ram.close()
        hv.close()
