"""Put it together: a hypervisor, each device's place in the guest (flags or
xenstore), guest memory, the devices, one IOREQ server for all of them.

Start-up order matters: the daemon is dialled first (the device's features,
queues and config come from it), then the IOREQ server maps the window, so
the guest never reaches a window nobody can answer. Tear-down runs in
reverse on every exit path, SIGINT and SIGTERM included.
"""

from __future__ import annotations

import logging
import os
import signal
import stat
from collections.abc import Callable

import attrs
import trio

from bridge.device import DeviceSetupError, VhostUserDevice
from bridge.device_types import DeviceOptions, DeviceType
from bridge.discovery import (
    DiscoveryError,
    XenstoreDevice,
    choose_device,
    close_backend,
    describe_roots,
    find_devices,
    mark_claimed,
    mark_served,
    own_domid,
    watch_until_gone,
)
from bridge.guest_pages import DEFAULT_MAX_BYTES, MappedGuestMemory
from bridge.memory import GuestRamMap, PassthroughMemory, ShadowMemory
from bridge.virtio_mmio import WINDOW_SIZE
from xen.hypervisor import Hypervisor, HypervisorError, open_hypervisor
from xen.ioreq_server import IoreqServer, MmioRouter
from xen.xenstore import XenStore

log = logging.getLogger(__name__)


@attrs.frozen
class DeviceConfig:
    """One virtio device of the guest and the daemon that serves it."""

    device_type: DeviceType
    socket_path: str
    mmio_base: int | None = None
    """None: from xenstore, where libxl recorded the device (with ``irq``)."""
    irq: int | None = None
    devid: int | None = None
    """Which of the guest's xenstore virtio devices, when several could be this one."""
    options: DeviceOptions = DeviceOptions()

    def describe(self) -> str:
        return f"virtio-{self.device_type.name} ({self.socket_path})"


@attrs.frozen
class BridgeConfig:
    domid: int
    devices: tuple[DeviceConfig, ...]
    xen_sim: str | None = None
    queue_size: int = 256
    timeout: float = 5.0
    memory: str = "auto"
    arena_size: int = 64 << 20
    map_cache_size: int = DEFAULT_MAX_BYTES
    fast_path: bool = True
    kernel_kicks: bool = False
    """Also give QueueNotify writes to the kernel (xen.fast_path says why not by default)."""
    reconnect: float = 0.0
    """Seconds to redial a daemon that went away (0: DEVICE_NEEDS_RESET at once)."""


@attrs.frozen
class Placement:
    """Where a device sits in the guest, and who said so."""

    base: int
    irq: int
    xenstore: XenstoreDevice | None = None


def place_devices(config: BridgeConfig, xs: XenStore | None) -> list[Placement]:
    """Each device's window and SPI: its flags where given, else the
    xenstore entry it claims (its --devid, or the first unclaimed one of its
    type, in devid order). Windows must not overlap, SPIs not repeat."""
    found: list[XenstoreDevice] | None = None
    where = ""
    claimed: set[int] = set()
    placements = []
    for dev in config.devices:
        if dev.mmio_base is not None and dev.irq is not None:
            placements.append(Placement(dev.mmio_base, dev.irq))
            continue
        if found is None:
            backend = own_domid(xs)
            found = find_devices(xs, config.domid, backend)
            where = describe_roots(backend, config.domid)
        entry = choose_device([d for d in found if d.devid not in claimed], dev.device_type, dev.devid, where=where,
                              first=len(config.devices) > 1)
        claimed.add(entry.devid)
        placements.append(Placement(
            dev.mmio_base if dev.mmio_base is not None else entry.base,
            dev.irq if dev.irq is not None else entry.irq,
            entry,
        ))
    for i, (dev, place) in enumerate(zip(config.devices, placements)):
        for other, other_place in zip(config.devices[:i], placements[:i]):
            if abs(place.base - other_place.base) < WINDOW_SIZE:
                raise DiscoveryError(
                    f"{dev.describe()} at {place.base:#x} overlaps {other.describe()} at {other_place.base:#x}"
                )
            if place.irq == other_place.irq:
                raise DiscoveryError(f"{dev.describe()} and {other.describe()} would share irq {place.irq}")
    return placements


class GuestMemory:
    """The bridge's views of guest RAM, made when a device first needs one
    and shared by every device: all of RAM as files (passthrough), and the
    on-demand page cache (shadow). Each shadow device has its own arena, so
    a daemon sees only its own buffers."""

    def __init__(self, config: BridgeConfig, hv: Hypervisor) -> None:
        self.config = config
        self.hv = hv
        self.banks = hv.guest_ram()
        self._ram: GuestRamMap | None = None
        self._pages: MappedGuestMemory | None = None
        self._models: list = []

    def for_device(self, dev: DeviceConfig, place: Placement):
        """The memory model of one device: passthrough where guest RAM is a
        file the daemon can map and the guest gives addresses; shadow
        otherwise (real Xen, a guest using grants) or when asked."""
        grants = place.xenstore is not None and place.xenstore.grant_usage
        mode = self.config.memory
        if mode == "auto":
            mode = "passthrough" if self.banks is not None and not grants else "shadow"
        if mode == "passthrough":
            if grants:
                raise DiscoveryError(
                    f"{place.xenstore.describe()} has grant_usage=1: the guest gives grant references, which "
                    "only the bridge can map, so it needs --memory shadow (or auto)"
                )
            if self.banks is None:
                raise HypervisorError(
                    "--memory passthrough needs guest RAM as a file the daemon can map, and this hypervisor has "
                    "none (on Xen only foreign mappings reach guest RAM): use --memory shadow"
                )
            if self._ram is None:
                self._ram = GuestRamMap(self.banks)
            model = PassthroughMemory(self._ram)
        else:
            if self._pages is None:
                self._pages = MappedGuestMemory(self.hv, max_bytes=self.config.map_cache_size)
            model = ShadowMemory(self._pages, self.config.arena_size)
        self._models.append(model)
        return model

    def close(self) -> None:
        for model in self._models:
            model.close()
        for ram in (self._pages, self._ram):
            if ram is not None:
                ram.close()


def check_daemon_socket(path: str) -> None:
    """Refuse a --socket that exists but is not a UNIX socket: the bridge
    would otherwise hand guest memory fds to whatever answers there."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return  # dialling it says so, in the daemon's terms
    except OSError as exc:
        raise DeviceSetupError(f"cannot use --socket {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise DeviceSetupError(f"--socket {path} is not a UNIX socket (a vhost-user daemon listens on one)")


async def run_bridge(config: BridgeConfig, *, on_ready: Callable[[str], None] | None = None) -> None:
    """Serve until SIGINT or SIGTERM, cancellation, or the toolstack removing
    a device."""
    if not config.devices:
        raise DeviceSetupError("no device to serve")
    for dev in config.devices:
        check_daemon_socket(dev.socket_path)
    hv = open_hypervisor(config.domid, config.xen_sim)
    xs = memory = None
    placements: list[Placement] = []
    try:
        if any(dev.mmio_base is None or dev.irq is None for dev in config.devices):
            xs = hv.xenstore()
        placements = place_devices(config, xs)
        for place in placements:
            if place.xenstore is not None:
                mark_claimed(xs, place.xenstore)
        memory = GuestMemory(config, hv)
        router = MmioRouter()
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGUSR1) as signals:
            async with trio.open_nursery() as nursery:
                devices = []
                for dev, place in zip(config.devices, placements):
                    device = VhostUserDevice(
                        hypervisor=hv,
                        device_type=dev.device_type,
                        socket_path=dev.socket_path,
                        irq=place.irq,
                        base=place.base,
                        memory=memory.for_device(dev, place),
                        queue_size=config.queue_size,
                        timeout=config.timeout,
                        reconnect=config.reconnect,
                        options=dev.options,
                    )
                    await nursery.start(device.run)
                    router.add(place.base, WINDOW_SIZE, device)
                    devices.append(device)
                server = IoreqServer(hv, router, fast_path=config.fast_path, kernel_kicks=config.kernel_kicks)
                await nursery.start(server.serve)
                for device in devices:
                    device.fast_path = server.fast_path
                    device.watcher = server
                in_xenstore = [place.xenstore for place in placements if place.xenstore is not None]
                for entry in in_xenstore:
                    mark_served(xs, entry)
                if in_xenstore:
                    nursery.start_soon(_stop_when_removed, xs, in_xenstore, nursery.cancel_scope)
                message = "; ".join(
                    _serving(config.domid, dev, place, device.memory.mode)
                    for dev, place, device in zip(config.devices, placements, devices)
                )
                log.info("%s", message)
                if on_ready is not None:
                    on_ready(message)
                async for signum in signals:
                    if signum == signal.SIGUSR1:  # virtio-gpu: PNG snapshots now
                        for device in devices:
                            if device.display is not None:
                                nursery.start_soon(_snapshot, device)
                        continue
                    log.info("%s: shutting down", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break
    finally:
        if memory is not None:
            memory.close()
        if xs is not None:
            for place in placements:
                if place.xenstore is not None:
                    close_backend(xs, place.xenstore)
            xs.close()
        hv.close()


def _serving(domid: int, dev: DeviceConfig, place: Placement, mode: str) -> str:
    end = place.base + WINDOW_SIZE - 1
    source = "" if place.xenstore is None else f" (xenstore {place.xenstore.path})"
    return (
        f"serving virtio-{dev.device_type.name} for domain {domid} at {place.base:#x}-{end:#x}, irq {place.irq}"
        f"{source}, daemon {dev.socket_path}, {mode} memory"
    )


async def _snapshot(device: VhostUserDevice) -> None:
    try:
        paths = await device.display.snapshot()
    except OSError as exc:
        log.error("virtio-gpu at %#x: cannot write a snapshot: %s", device.base, exc)
        return
    if not paths:
        log.warning("virtio-gpu at %#x: SIGUSR1, but no snapshot: no --gpu-output, or no scanout on", device.base)


async def _stop_when_removed(xs: XenStore, devices: list[XenstoreDevice], scope: trio.CancelScope) -> None:
    """The toolstack took a device away (the domain is going): stop. Xen
    4.17 has no virtio hot-unplug, so the others are going too."""
    reason = await watch_until_gone(xs, devices)
    log.warning("%s: stopping", reason)
    scope.cancel()
