"""Put it together: a hypervisor, the device's place in the guest (flags or
xenstore), guest memory, one device, the IOREQ server.

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
    close_backend,
    discover,
    set_state,
    watch_until_gone,
)
from bridge.guest_pages import DEFAULT_MAX_BYTES, MappedGuestMemory
from bridge.memory import GuestRamMap, PassthroughMemory, ShadowMemory
from bridge.virtio_mmio import WINDOW_SIZE
from xen.hypervisor import Hypervisor, HypervisorError, open_hypervisor
from xen.ioreq_server import IoreqServer, MmioRouter
from xen.xenstore import XenbusState, XenStore

log = logging.getLogger(__name__)


@attrs.frozen
class BridgeConfig:
    domid: int
    socket_path: str
    device_type: DeviceType
    mmio_base: int | None = None
    """None: from xenstore, where libxl recorded the device (with ``irq``)."""
    irq: int | None = None
    devid: int | None = None
    """Which of the guest's xenstore virtio devices, when several could be ours."""
    xen_sim: str | None = None
    queue_size: int = 256
    timeout: float = 5.0
    memory: str = "auto"
    arena_size: int = 64 << 20
    map_cache_size: int = DEFAULT_MAX_BYTES
    fast_path: bool = True
    reconnect: float = 0.0
    """Seconds to redial a daemon that went away (0: DEVICE_NEEDS_RESET at once)."""
    options: DeviceOptions = DeviceOptions()


@attrs.frozen
class Placement:
    """Where the device sits in the guest, and who said so."""

    base: int
    irq: int
    xenstore: XenstoreDevice | None = None


def place_device(config: BridgeConfig, xs: XenStore | None) -> Placement:
    """The window and SPI: the flags where given, else xenstore's."""
    if config.mmio_base is not None and config.irq is not None:
        return Placement(config.mmio_base, config.irq)
    found = discover(xs, config.domid, config.device_type, config.devid)
    base = config.mmio_base if config.mmio_base is not None else found.base
    irq = config.irq if config.irq is not None else found.irq
    return Placement(base, irq, found)


def choose_memory(config: BridgeConfig, hv: Hypervisor, placement: Placement):
    """The memory model: passthrough where guest RAM is a file the daemon
    can map and the guest gives addresses, shadow otherwise (real Xen, a
    guest using grants) or when asked."""
    grants = placement.xenstore is not None and placement.xenstore.grant_usage
    banks = hv.guest_ram()
    mode = config.memory
    if mode == "auto":
        mode = "passthrough" if banks is not None and not grants else "shadow"
    if mode == "passthrough":
        if grants:
            raise DiscoveryError(
                f"{placement.xenstore.describe()} has grant_usage=1: the guest gives grant references, which "
                "only the bridge can map, so it needs --memory shadow (or auto)"
            )
        if banks is None:
            raise HypervisorError(
                "--memory passthrough needs guest RAM as a file the daemon can map, and this hypervisor has none "
                "(on Xen only foreign mappings reach guest RAM): use --memory shadow"
            )
        return PassthroughMemory(GuestRamMap(banks))
    guest = MappedGuestMemory(hv, max_bytes=config.map_cache_size)
    try:
        return ShadowMemory(guest, config.arena_size)
    except BaseException:
        guest.close()
        raise


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
    the device."""
    check_daemon_socket(config.socket_path)
    hv = open_hypervisor(config.domid, config.xen_sim)
    xs = memory = placement = None
    try:
        if config.mmio_base is None or config.irq is None:
            xs = hv.xenstore()
        placement = place_device(config, xs)
        if placement.xenstore is not None:
            set_state(xs, placement.xenstore, XenbusState.INIT_WAIT)
        memory = choose_memory(config, hv, placement)
        router = MmioRouter()
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                device = VhostUserDevice(
                    hypervisor=hv,
                    device_type=config.device_type,
                    socket_path=config.socket_path,
                    irq=placement.irq,
                    base=placement.base,
                    memory=memory,
                    queue_size=config.queue_size,
                    timeout=config.timeout,
                    reconnect=config.reconnect,
                    options=config.options,
                )
                await nursery.start(device.run)
                router.add(placement.base, WINDOW_SIZE, device)
                server = IoreqServer(hv, router, fast_path=config.fast_path)
                await nursery.start(server.serve)
                device.fast_path = server.fast_path
                if placement.xenstore is not None:
                    set_state(xs, placement.xenstore, XenbusState.CONNECTED)
                    nursery.start_soon(_stop_when_removed, xs, placement.xenstore, nursery.cancel_scope)
                end = placement.base + WINDOW_SIZE - 1
                source = "" if placement.xenstore is None else f" (xenstore {placement.xenstore.path})"
                message = (
                    f"serving virtio-{config.device_type.name} for domain {config.domid} at "
                    f"{placement.base:#x}-{end:#x}, irq {placement.irq}{source}, daemon {config.socket_path}, "
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
        if xs is not None:
            if placement is not None and placement.xenstore is not None:
                close_backend(xs, placement.xenstore)
            xs.close()
        hv.close()


async def _stop_when_removed(xs: XenStore, device: XenstoreDevice, scope: trio.CancelScope) -> None:
    reason = await watch_until_gone(xs, device)
    log.warning("%s: stopping", reason)
    scope.cancel()
