"""One virtio-mmio window bound to one vhost-user daemon.

The register model (bridge.virtio_mmio) decides what a guest access means;
this object carries out the effects:

- QueueNotify -> a write to that queue's kick eventfd (the hot path: no
  allocation, no logging);
- the daemon's call eventfd -> InterruptStatus bit 0 and a rising edge on the
  SPI; InterruptACK lowers the line, and raises it again at once when bits
  are still pending, because libxl wires virtio-mmio SPIs edge-triggered
  and only a fresh edge is seen;
- DRIVER_OK -> vhost-user start (memory table, rings, kick and call fds);
  Status = 0 -> vhost-user stop; both hold the guest's vCPU (the ioreq is
  completed when the daemon has answered), as QEMU does, so a driver that
  reads Status back after a reset sees a device that really stopped;
- a config write -> SET_CONFIG; the daemon's CONFIG_CHANGE_MSG -> GET_CONFIG,
  a new ConfigGeneration and a config interrupt.

With shadow memory (bridge.memory) a kick first moves the guest's new
chains into the shadow ring in the arena, and a call first returns the
daemon's completions to the guest's used ring; the interrupt and the kick
then follow the guest's and the daemon's notification suppression.

Anything the daemon gets wrong (it dies, it refuses, it times out) leaves the
bridge running and the device in DEVICE_NEEDS_RESET with a config interrupt,
the way virtio tells a driver that a device broke.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import trio

from bridge import split_ring
from bridge.device_types import (
    DeviceOptions,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_IN_ORDER,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    DeviceType,
    guest_features,
)
from bridge.gpu_display import GpuDisplay
from bridge.gpu_shadow import GPU_CONTROL_QUEUE, GPU_SHADOW_UNSUPPORTED_FEATURES, GpuShadow
from bridge.memory import OutsideGuestRam, PassthroughMemory, ShadowMemory
from bridge.served_queue import ServedQueue
from bridge.shadow_ring import DaemonRingError, GuestRing, RingError, ShadowVirtqueue
from bridge.virtio_mmio import (
    CONFIG_OFFSET,
    DeviceStatus,
    GuestAccessError,
    INT_CONFIG,
    INT_VRING,
    ConfigWrite,
    DriverOk,
    InterruptAck,
    Kick,
    QueueEnable,
    QueueReset,
    Reset,
    VirtioMmioModel,
)
from vhost_user.frontend import InflightRegion, RingSetup, VhostUserFrontend
from vhost_user.protocol import ConnectionLost, ProtocolFeature, VhostUserError
from xen.fast_path import KernelFastPath
from xen.hypervisor import Hypervisor, HypervisorError

if TYPE_CHECKING:
    from xen.ioreq_server import IoreqServer

log = logging.getLogger(__name__)

# VendorID the device reports: "XVHB" read as a little-endian word.
VENDOR_ID = int.from_bytes(b"XVHB", "little")

_EFD_FLAGS = os.EFD_NONBLOCK | os.EFD_CLOEXEC

DRAIN_LIMIT = 1.0
"""Seconds a reset waits for the daemon to finish the requests it holds."""
DRAIN_POLL = 0.001
DRAIN_GRACE = 0.002

# Shadow rings are split rings whose chains complete in any order.
SHADOW_UNSUPPORTED_FEATURES = (1 << VIRTIO_F_RING_PACKED) | (1 << VIRTIO_F_IN_ORDER)


class DeviceSetupError(Exception):
    """The daemon cannot back this device (one clear sentence why)."""


class VhostUserDevice:
    def __init__(
        self,
        *,
        hypervisor: Hypervisor,
        device_type: DeviceType,
        socket_path: str,
        irq: int,
        memory: PassthroughMemory | ShadowMemory,
        base: int = 0,
        queue_size: int = 256,
        timeout: float = 5.0,
        reconnect: float = 0.0,
        options: DeviceOptions = DeviceOptions(),
    ) -> None:
        self.hv = hypervisor
        self.type = device_type
        self.socket_path = socket_path
        self.irq = irq
        self.base = base
        self.fast_path: KernelFastPath | None = None
        """The ioreq server's, once it serves; None: relay everything."""
        self.watcher: IoreqServer | None = None
        """The ioreq server, once it serves: the relays of the daemon's
        calls run with the ioreqs (IoreqServer.watch); None: tasks run them."""
        self.memory = memory
        self.queue_size = queue_size
        self.timeout = timeout
        self.options = options
        self.reconnect = reconnect
        """Seconds to keep redialling a daemon that went away (0: give up at
        once and report DEVICE_NEEDS_RESET)."""
        self.reconnects = 0
        self._daemon_lost = False  # gave up on it; the next DRIVER_OK dials once more
        self.frontend: VhostUserFrontend | None = None
        self.model: VirtioMmioModel | None = None
        self.failed: str | None = None
        self._nursery: trio.Nursery | None = None
        self._lifecycle = trio.Lock()
        self._line = 0
        # Per started ring: index -> (kick fd, call fd). Kicks index a list.
        self._rings: dict[int, tuple[int, int]] = {}
        self._kick_fds: list[int] = []
        # Shadow memory only: index -> that ring's shadow virtqueue.
        self._shadow: dict[int, ShadowVirtqueue] = {}
        self._shadow_by_ring: list[ShadowVirtqueue | None] = []
        # Shadow memory with the kernel fast path: index -> the eventfd the
        # kernel signals for the guest's QueueNotify (ours, not the daemon's).
        self._guest_kicks: dict[int, int] = {}
        # Shadow memory: index -> the pins of that queue's ring memory.
        self._ring_pins: dict[int, list] = {}
        # virtio-gpu: the frame sink and the daemon's display channel.
        self.display: GpuDisplay | None = None
        if device_type.name == "gpu":
            # With shadow memory the control queue goes through
            # bridge.gpu_shadow (see _shadow_ring_setup).
            self.display = GpuDisplay(options, name=f"gpu-{base:x}", label=socket_path, timeout=timeout,
                                      on_error=self._fail)
        # What the bridge serves itself beyond the daemon's rings (virtio-net:
        # config, features, the control queue).
        self.emulation = device_type.emulation(options) if device_type.emulation is not None else None

    # --- life of the device --------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Dial the daemon, build the register model from what it offers,
        report started, then keep the daemon's channels served until
        cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.frontend = await self._dial()
                self.model = self._build_model(self.frontend)
                log.info(
                    "virtio-%s backed by %s: offering the guest features %#x, %d queues",
                    self.type.name,
                    self.socket_path,
                    self.model.device_features,
                    len(self.model.queues),
                )
                nursery.start_soon(self._watch_daemon)
                if self.display is not None:
                    await self.display.start(nursery)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._close_rings()
            if self.display is not None:
                self.display.close()
            if self.frontend is not None:
                with trio.CancelScope(shield=True):
                    await self.frontend.aclose()

    async def _dial(self, inflight: InflightRegion | None = None) -> VhostUserFrontend:
        frontend = await VhostUserFrontend.connect(
            self.socket_path,
            nursery=self._nursery,
            handler=self,
            default_num_queues=self.type.default_num_queues,
            config_size=self.type.config_size or 0,
            timeout=self.timeout,
            inflight=inflight,
            rings_per_queue=self.type.rings_per_queue,
        )
        if self.type.config_size is None:
            try:
                frontend.config = await frontend.probe_config()
            except BaseException:
                with trio.CancelScope(shield=True):
                    await frontend.aclose()
                raise
        return frontend

    async def _watch_daemon(self) -> None:
        """When the daemon's connection closes: redial it and carry on where
        it stopped, or report DEVICE_NEEDS_RESET."""
        while True:
            frontend = self.frontend
            await frontend.wait_hangup()
            why = frontend.failure
            gone = (f"the connection to the daemon was closed: {why}" if why is not None
                    else "the daemon closed its vhost-user connection (it exited or crashed)")
            if self.reconnect <= 0 or self.display is not None:
                # virtio-gpu: the guest's resources lived in the daemon that
                # died; a new one could not resume them (the guest resets).
                for shadow in self._shadow.values():
                    if shadow.hook is not None:
                        shadow.hook.reset()  # what was kept for the daemon (gpu backings)
                self._daemon_lost = True
                self._fail(gone)
                return
            log.warning("virtio-%s: %s; redialling %s for up to %g s", self.type.name, gone, self.socket_path,
                        self.reconnect)
            # Guest starts and resets wait meanwhile (their vCPU is held, as
            # for a slow daemon); kicks pile up in the eventfds.
            async with self._lifecycle:
                if self.frontend is not frontend:
                    continue  # a guest reset dialled a new one meanwhile
                # With INFLIGHT_SHMFD the old daemon's record of the requests
                # it held goes to the new one, which resubmits them.
                inflight = frontend.take_inflight()
                if inflight is not None and self.memory.mode == "shadow":
                    # Not with shadow rings: the bridge republishes every chain
                    # itself, and the daemon's record would redo them twice.
                    inflight.close()
                    inflight = None
                await frontend.aclose()
                if not await self._redial(gone, inflight):
                    return

    async def _redial(self, gone: str, inflight: InflightRegion | None = None) -> bool:
        """Dial with back-off until the daemon answers or time runs out;
        then resume the rings the guest had running."""
        deadline = trio.current_time() + self.reconnect
        delay = 0.05
        while True:
            try:
                frontend = await self._dial(inflight)
                break
            except VhostUserError as exc:
                if trio.current_time() + delay > deadline:
                    if inflight is not None:
                        inflight.close()
                    self._daemon_lost = True
                    self._fail(f"{gone}, and it did not come back within {self.reconnect:g} s ({exc})")
                    return False
                await trio.sleep(delay)
                delay = min(delay * 2, 1.0)
        self.frontend = frontend
        self.reconnects += 1
        try:
            await self._resume(frontend)
        except ConnectionLost as exc:
            # Gone again before it took the rings: the watch loop sees the
            # hang-up and dials once more.
            log.warning("virtio-%s: the daemon went away again while resuming: %s", self.type.name, exc)
            return True
        except (VhostUserError, OutsideGuestRam, RingError, DeviceSetupError) as exc:
            # Redialling the same daemon would only repeat this: stop here;
            # the guest's reset dials once more.
            self._daemon_lost = True
            self._fail(f"the daemon came back but the device cannot resume: {exc}")
            await frontend.aclose()
            return False
        log.warning("virtio-%s: the daemon is back (reconnect %d); rings %s resumed", self.type.name,
                    self.reconnects, sorted(self._rings))
        return True

    async def _resume(self, frontend: VhostUserFrontend) -> None:
        """Give a new daemon the device as the guest has it: the same
        features, memory, rings and eventfds, each ring from where the
        guest's requests still need it."""
        offered = guest_features(frontend.device_features)
        if self.emulation is not None:
            offered = self.emulation.offered_features(offered)
        if self.model.device_features & ~offered:
            raise DeviceSetupError(
                f"the new daemon offers features {offered:#x}, without {self.model.device_features & ~offered:#x} "
                "that the device already offered the guest"
            )
        needed = len(self.model.queues) if self.emulation is None else self.emulation.daemon_rings
        if frontend.num_queues < needed:
            raise DeviceSetupError(f"the new daemon has {frontend.num_queues} queues, not {needed}")
        if self.model.update_config(self._config_of(frontend)):
            self.raise_interrupt(INT_CONFIG)
        if not self._rings or self.failed is not None or not self.model.status & DeviceStatus.DRIVER_OK:
            return  # nothing running (or the guest reset it meanwhile): the next DRIVER_OK starts it
        rings = [self._resume_ring(index) for index in sorted(self._rings)]
        if self.display is not None:
            await self.display.attach(frontend, self._nursery)
        await self._start_daemon_rings(frontend, rings)
        for ring in rings:  # requests that waited, or that the old daemon dropped
            os.eventfd_write(ring.kick_fd, 1)

    def _resume_ring(self, index: int) -> RingSetup:
        q = self.model.queues[index]
        kick, call = self._rings[index]
        shadow = self._shadow.get(index)
        if shadow is not None:
            # Completions the old daemon wrote before it died go to the guest;
            # every chain still in flight is published again, in order.
            shadow.stop()
            if shadow.daemon_called():
                self.raise_interrupt(INT_VRING)
            shadow.restart()
            desc, avail, used = (self.memory.arena_user_addr + off for off in (
                shadow.shadow_desc_offset, shadow.shadow_avail_offset, shadow.shadow_used_offset))
            base = 0
        else:
            desc, avail, used = self._passthrough_ring_setup(index)
            if self.frontend.inflight is not None:
                # The daemon resubmits what its inflight region records, in
                # any order: the guest's used index is where it goes on.
                base = split_ring.U16.unpack(self.memory.ram.read(q.device + split_ring.USED_IDX, 2))[0]
            else:
                base = passthrough_resume_index(self.memory.ram, q.num, q.driver, q.device)
        return RingSetup(index=index, num=q.num, base=base, desc_addr=desc, avail_addr=avail, used_addr=used,
                         kick_fd=kick, call_fd=call)

    def _build_model(self, frontend: VhostUserFrontend) -> VirtioMmioModel:
        features = guest_features(frontend.device_features)
        if self.memory.mode == "shadow":
            features &= ~SHADOW_UNSUPPORTED_FEATURES
            if self.type.name == "gpu":
                features &= ~GPU_SHADOW_UNSUPPORTED_FEATURES  # 3D and blobs: guest memory it does not copy
        if not features >> VIRTIO_F_VERSION_1 & 1:
            raise DeviceSetupError(
                f"the daemon at {self.socket_path} does not offer VIRTIO_F_VERSION_1, which virtio-mmio version 2 requires"
            )
        if frontend.num_queues < 1:
            raise DeviceSetupError(f"the daemon at {self.socket_path} reports {frontend.num_queues} queues")
        if self.emulation is not None:
            return self._build_emulated_model(frontend, features)
        return VirtioMmioModel(
            device_id=self.type.virtio_id,
            vendor_id=VENDOR_ID,
            device_features=features,
            queue_num_max=[self.queue_size] * min(frontend.num_queues, self.type.max_queues or frontend.num_queues),
            config=self._config_of(frontend),
            config_writable=bool(frontend.protocol_features & ProtocolFeature.CONFIG),
        )

    def _config_of(self, frontend: VhostUserFrontend) -> bytes:
        """The config space the guest sees: the daemon's, or the one the
        bridge supplies for a daemon that has none."""
        if self.emulation is not None:
            return self.emulation.config
        if self.type.supplied_config is not None and not frontend.config:
            return self.type.supplied_config(self.options, frontend.num_queues)
        if self.type.config_overlay is not None:
            return self.type.config_overlay(frontend.config, self.options)
        return frontend.config

    # --- what the bridge serves itself (virtio-net) ---------------------

    def _build_emulated_model(self, frontend: VhostUserFrontend, features: int) -> VirtioMmioModel:
        try:
            features, num_queues, config = self.emulation.setup(
                features, frontend.num_queues, daemon_mq=bool(frontend.protocol_features & ProtocolFeature.MQ))
        except ValueError as exc:
            raise DeviceSetupError(f"the daemon at {self.socket_path} cannot back this device: {exc}") from None
        return VirtioMmioModel(
            device_id=self.type.virtio_id,
            vendor_id=VENDOR_ID,
            device_features=features,
            queue_num_max=[self.queue_size] * num_queues,
            config=config,
            config_writable=False,
        )

    async def _start_daemon_rings(self, frontend: VhostUserFrontend, rings: Sequence[RingSetup]) -> None:
        """frontend.start; with an emulation the daemon is told the driver's
        features without what the bridge does itself, and only the rings of
        the active pairs are enabled."""
        if self.emulation is None:
            await frontend.start(self.model.driver_features, self.memory.regions, rings)
            return
        features = self.emulation.daemon_features(self.model.driver_features, frontend.device_features)
        await frontend.start(features, self.memory.regions, rings,
                             enabled=self.emulation.enabled_rings([r.index for r in rings]))

    def _start_emulation(self, ready: list[int]) -> list[int]:
        """DRIVER_OK: serve the queues that are the bridge's own; return the
        ready queues that are the daemon's."""
        emu = self.emulation
        own = [i for i in ready if emu.is_served_here(i)]
        queue = None
        for index in own:
            q = self.model.queues[index]
            ram = self.memory.ram
            if self.memory.mode == "shadow" and hasattr(ram, "pin"):
                # As for shadow rings: keep the ring's grants mapped while it runs.
                self._ring_pins[index] = [ram.pin(addr, length) for addr, length in (
                    (q.desc, split_ring.desc_table_size(q.num)),
                    (q.driver, split_ring.avail_ring_size(q.num)),
                    (q.device, split_ring.used_ring_size(q.num)))]
            features = self.model.driver_features
            queue = ServedQueue(ram, GuestRing(num=q.num, desc=q.desc, avail=q.driver, used=q.device),
                                event_idx=bool(features >> VIRTIO_F_EVENT_IDX & 1),
                                indirect=bool(features >> VIRTIO_F_INDIRECT_DESC & 1))
        emu.start(queue, self.model.driver_features)
        return [i for i in ready if not emu.is_served_here(i)]

    async def _serve_here(self, index: int) -> None:
        """The guest kicked a queue the bridge serves (its vCPU waits)."""
        try:
            if await self.emulation.serve(self._enable_rings):
                self.raise_interrupt(INT_VRING)
        except RingError as exc:
            self._fail(f"the guest broke queue {index}: {exc}")

    async def _enable_rings(self, indices: Sequence[int], enable: bool) -> None:
        running = [i for i in indices if i in self._rings]
        if running:
            await self.frontend.set_rings_enabled(running, enable)
        log.info("virtio-%s: rings %s %s", self.type.name, running, "enabled" if enable else "disabled")

    # --- the MMIO window (called by the IOREQ server) -------------------

    def mmio_read(self, offset: int, size: int) -> int:
        return self.model.read(offset, size)

    def mmio_write(self, offset: int, size: int, value: int):
        if offset >= CONFIG_OFFSET and not self.type.config_write_allowed(offset - CONFIG_OFFSET, size):
            raise GuestAccessError(
                f"config write of {size} bytes at {offset - CONFIG_OFFSET:#x}: not a field a virtio-{self.type.name} "
                "driver may write"
            )
        effects = self.model.write(offset, size, value)
        slow = None
        for effect in effects:
            kind = type(effect)
            if kind is Kick and (self.emulation is None or not self.emulation.is_served_here(effect.queue)):
                self._kick(effect.queue)
            elif kind is InterruptAck:
                self._set_line(0)
                if effect.status:
                    self._set_line(1)
            else:
                slow = (slow or ()) + (effect,)
        if slow:
            return self._carry_out(slow)
        return None

    def _kick(self, queue: int) -> None:
        if self._shadow_by_ring:
            self._shadow_kick(queue)
            return
        try:
            os.eventfd_write(self._kick_fds[queue], 1)
        except (IndexError, OSError):
            pass  # that ring is not started (its start failed): nothing to kick

    def _shadow_kick(self, queue: int) -> None:
        """The guest kicked a shadowed queue: move its new chains to the
        shadow ring, and kick the daemon if it wants to be."""
        try:
            shadow = self._shadow_by_ring[queue]
        except IndexError:
            return
        if shadow is None:
            return
        try:
            wanted = shadow.guest_kicked()
        except RingError as exc:
            self._fail(f"the guest broke queue {queue}: {exc}")
            return
        if shadow.hook is not None and shadow.take_interrupt():
            self.raise_interrupt(INT_VRING)  # chains the hook answered itself
        if wanted:
            os.eventfd_write(self._kick_fds[queue], 1)

    def _shadow_call(self, queue: int) -> None:
        """The daemon signalled a shadowed queue: return its completions to
        the guest, then publish chains that waited for arena space (on every
        queue: they share the arena)."""
        shadow = self._shadow_by_ring[queue] if 0 <= queue < len(self._shadow_by_ring) else None
        if shadow is None:
            return
        try:
            wanted = shadow.daemon_called()
        except DaemonRingError as exc:
            self._fail(f"the daemon broke shadow queue {queue}: {exc}")
            return
        except RingError as exc:
            self.raise_interrupt(INT_VRING)  # the completions before the error were returned
            self._fail(f"the guest broke queue {queue}: {exc}")
            return
        if wanted:
            self.raise_interrupt(INT_VRING)
        if shadow.kick_prepare():
            os.eventfd_write(self._kick_fds[queue], 1)
        for other, waiting in self._shadow.items():
            if other != queue and waiting.waiting:
                self._shadow_kick(other)

    # --- interrupts ------------------------------------------------------

    def raise_interrupt(self, bits: int) -> None:
        if self.model.raise_interrupt(bits):
            self._set_line(1)

    def _set_line(self, level: int) -> None:
        if level == self._line:
            return
        try:
            self.hv.set_irq_level(self.irq, level)
        except HypervisorError as exc:
            log.error("cannot set irq %d to %d: %s", self.irq, level, exc)
            return
        self._line = level

    def _fail(self, reason: str) -> None:
        """The daemon let us down: tell the guest the virtio way."""
        if self.failed is None:
            log.error("virtio-%s at daemon %s: %s; the device needs a reset", self.type.name, self.socket_path, reason)
        self.failed = reason
        if self.model.set_needs_reset():
            self.raise_interrupt(INT_CONFIG)

    # --- effects that talk to the daemon --------------------------------

    async def _carry_out(self, effects: Sequence[object]) -> None:
        async with self._lifecycle:
            for effect in effects:
                kind = type(effect)
                try:
                    with trio.fail_after(self.timeout * 4):
                        if kind is DriverOk:
                            await self._start()
                        elif kind is Reset:
                            await self._stop()
                        elif kind is ConfigWrite:
                            await self.frontend.set_config(effect.offset, effect.data)
                        elif kind is QueueReset:
                            await self._stop_queue(effect.queue)
                        elif kind is QueueEnable:
                            await self._start_queue(effect.queue)
                        elif kind is Kick:  # a queue the bridge serves itself
                            await self._serve_here(effect.queue)
                except (VhostUserError, OutsideGuestRam, RingError, OSError) as exc:
                    self._fail(f"{type(effect).__name__}: {exc}")
                except trio.TooSlowError:
                    self._fail(f"{type(effect).__name__}: the daemon did not answer in time")

    def _ring_setup(self, index: int) -> RingSetup:
        if self.memory.mode == "shadow":
            desc, avail, used = self._shadow_ring_setup(index)
        else:
            desc, avail, used = self._passthrough_ring_setup(index)
        kick = os.eventfd(0, _EFD_FLAGS)
        try:
            call = os.eventfd(0, _EFD_FLAGS)
        except OSError:
            os.close(kick)
            raise
        self._rings[index] = (kick, call)
        return RingSetup(
            index=index,
            num=self.model.queues[index].num,
            base=0,
            desc_addr=desc,
            avail_addr=avail,
            used_addr=used,
            kick_fd=kick,
            call_fd=call,
        )

    def _shadow_ring_setup(self, index: int) -> tuple[int, int, int]:
        """A shadow virtqueue for the guest's ring; the daemon gets its
        shadow ring in the arena."""
        q = self.model.queues[index]
        features = self.model.driver_features
        # Ring memory lives as long as the queue: with grant addresses, keep
        # its grants mapped until the queue stops (buffers are mapped per
        # access).
        guest = self.memory.ram
        self._ring_pins[index] = pins = []
        for addr, length in (
            (q.desc, split_ring.desc_table_size(q.num)),
            (q.driver, split_ring.avail_ring_size(q.num)),
            (q.device, split_ring.used_ring_size(q.num)),
        ):
            pins.append(guest.pin(addr, length))
        shadow = ShadowVirtqueue(
            guest=self.memory.ram,
            ring=GuestRing(num=q.num, desc=q.desc, avail=q.driver, used=q.device),
            arena=self.memory.arena,
            arena_gpa=self.memory.regions[0].gpa,
            event_idx=bool(features >> VIRTIO_F_EVENT_IDX & 1),
            indirect=bool(features >> VIRTIO_F_INDIRECT_DESC & 1),
            hook=(GpuShadow(self.memory.ram, self.memory.arena, self.memory.regions[0].gpa, label=self.socket_path)
                  if self.type.name == "gpu" and index == GPU_CONTROL_QUEUE else None),
        )
        self._shadow[index] = shadow
        base = self.memory.arena_user_addr
        return (
            base + shadow.shadow_desc_offset,
            base + shadow.shadow_avail_offset,
            base + shadow.shadow_used_offset,
        )

    def _passthrough_ring_setup(self, index: int) -> tuple[int, int, int]:
        """The daemon reads the guest's own ring, at the bridge's user
        addresses of it."""
        q = self.model.queues[index]
        if self.model.driver_features >> VIRTIO_F_RING_PACKED & 1:
            desc_len, driver_len, device_len = 16 * q.num, 4, 4
        else:
            desc_len = split_ring.desc_table_size(q.num)
            driver_len = split_ring.avail_ring_size(q.num)
            device_len = split_ring.used_ring_size(q.num)
        ram = self.memory.ram
        return (
            ram.gpa_to_user(q.desc, desc_len),
            ram.gpa_to_user(q.driver, driver_len),
            ram.gpa_to_user(q.device, device_len),
        )

    def _publish_kicks(self) -> None:
        kicks = [-1] * len(self.model.queues)
        for index, (kick, _call) in self._rings.items():
            kicks[index] = kick
        self._kick_fds = kicks
        if self._shadow:
            self._shadow_by_ring = [self._shadow.get(i) for i in range(len(kicks))]
        else:
            self._shadow_by_ring = []

    async def _start(self) -> None:
        if self.failed is not None:
            raise VhostUserError(f"not starting: {self.failed}")
        if self._daemon_lost:
            # The guest reset the device after the daemon went for good: one
            # more try, so a daemon started again since brings it back.
            frontend = await self._dial()
            await self.frontend.aclose()
            self.frontend = frontend
            self._daemon_lost = False
            await self._resume(frontend)
            self._nursery.start_soon(self._watch_daemon)
        ready = self.model.ready_queues()
        if self.emulation is not None:
            ready = self._start_emulation(ready)
        rings = [self._ring_setup(i) for i in ready]
        # Kicks go to the new eventfds from now on, even while the daemon is
        # still being told about them: an eventfd keeps its count until the
        # daemon polls it, so no QueueNotify from another vCPU is lost.
        self._publish_kicks()
        for ring in rings:
            self._attach(ring)
        if self.display is not None:
            await self.display.attach(self.frontend, self._nursery)
        await self._start_daemon_rings(self.frontend, rings)
        log.info("virtio-%s started: features %#x, rings %s", self.type.name, self.model.driver_features,
                 [r.index for r in rings])

    async def _stop(self) -> None:
        """The guest reset the device: stop every ring in the daemon."""
        started = sorted(self._rings)
        self._kick_fds = []
        self._shadow_by_ring = []
        try:
            # Stop the daemon's rings whatever broke: after a guest's broken
            # ring the daemon is fine and its rings still run; after the
            # daemon's death this fails at once.
            if self.emulation is not None:
                self.emulation.stop()
            if started:
                await self._drain([i for i in started if self.emulation is None or self.emulation.needs_drain(i)])
                try:
                    bases = await self.frontend.stop(started)
                    log.info("virtio-%s stopped; ring bases %s", self.type.name, bases)
                except VhostUserError as exc:
                    if self.failed is None:
                        raise
                    log.info("virtio-%s: the daemon's rings were not stopped: %s", self.type.name, exc)
        finally:
            self._close_rings()
            if self.frontend is not None:
                # A reset device starts with nothing in flight: a fresh
                # inflight region at the next start (QEMU drops it too).
                region = self.frontend.take_inflight()
                if region is not None:
                    region.close()
            self.failed = None  # a reset is how a guest recovers a broken device
            self._set_line(0)

    async def _drain(self, indices: Sequence[int]) -> None:
        """Let the daemon finish the requests it holds before its rings are
        stopped. The guest's reset is not complete until then (its vCPU
        waits), so writes into guest memory are still allowed; and
        libvhost-user answers GET_VRING_BASE with requests still running,
        which then signal a call fd it has already closed: qemu-storage-
        daemon 7.2 panics on that ('Error writing eventfd')."""
        deadline = trio.current_time() + min(self.timeout, DRAIN_LIMIT)
        while True:
            busy = [i for i in indices if not self._ring_idle(i)]
            if self.frontend is None or self.failed is not None:
                return
            if not busy:
                # A daemon publishes its used index before it signals the
                # call fd: give that signal time to go out.
                await trio.sleep(DRAIN_GRACE)
                return
            if trio.current_time() > deadline:
                log.info("virtio-%s: rings %s still had requests at the daemon after %g s; stopping them anyway",
                         self.type.name, busy, min(self.timeout, DRAIN_LIMIT))
                return
            await trio.sleep(DRAIN_POLL)

    def _ring_idle(self, index: int) -> bool:
        shadow = self._shadow.get(index)
        if shadow is not None:
            return shadow.daemon_caught_up
        if self.model.driver_features >> VIRTIO_F_RING_PACKED & 1:
            return True  # no index pair to compare in a packed ring: not drained
        q = self.model.queues[index]
        ram = self.memory.ram
        try:
            avail = ram.read(q.driver + split_ring.AVAIL_IDX, 2)
            used = ram.read(q.device + split_ring.USED_IDX, 2)
        except OutsideGuestRam:
            return True
        return avail == used

    async def _stop_queue(self, index: int) -> None:
        if index in self._rings:
            await self.frontend.stop_ring(index)
            self._close_ring(index)
            self._publish_kicks()

    async def _start_queue(self, index: int) -> None:
        ring = self._ring_setup(index)
        self._publish_kicks()
        self._attach(ring)
        await self.frontend.start_ring(ring)

    def _attach(self, ring: RingSetup) -> None:
        """Route one ring's kicks and calls: through the kernel where it can
        (the ioreq loop and this process then never see them), else through
        this process."""
        index = ring.index
        fast = self.fast_path
        kicks_in_kernel = irq_in_kernel = False
        if fast is not None and fast.enabled:
            if self.memory.mode == "shadow":
                # The bridge must see the guest's kicks to copy chains into
                # the shadow ring, but the kernel can still complete the
                # guest's write at once and leave the copy to this process.
                guest_kick = os.eventfd(0, _EFD_FLAGS)
                kicks_in_kernel = fast.assign_kick(self.base, index, guest_kick)
                if kicks_in_kernel:
                    self._guest_kicks[index] = guest_kick
                    self._relay(guest_kick, functools.partial(self._on_guest_kick, index, guest_kick))
                else:
                    os.close(guest_kick)
            else:
                kicks_in_kernel = fast.assign_kick(self.base, index, ring.kick_fd)
                # The daemon's completions can go straight to the guest only
                # when the bridge has nothing to copy back.
                irq_in_kernel = fast.assign_irq(self.irq, ring.call_fd)
        if irq_in_kernel:
            self.model.vring_irq_in_kernel = True
        else:
            self._relay(ring.call_fd, functools.partial(self._on_call, index, ring.call_fd))
        log.info(
            "virtio-%s queue %d: kicks %s, interrupts %s", self.type.name, index,
            "taken by the kernel (ioeventfd)" if kicks_in_kernel else "relayed by the bridge",
            "raised by the kernel (irqfd)" if irq_in_kernel else "raised by the bridge",
        )

    def _relay(self, fd: int, on_event: Callable[[], None]) -> None:
        """Run ``on_event`` each time eventfd ``fd`` is signalled: with the
        ioreqs where the ioreq server takes it, else in a task."""
        if self.watcher is not None:
            self.watcher.watch(fd, on_event)
        else:
            self._nursery.start_soon(self._relay_task, fd, on_event)

    @staticmethod
    async def _relay_task(fd: int, on_event: Callable[[], None]) -> None:
        try:
            while True:
                await trio.lowlevel.wait_readable(fd)
                on_event()
        except (trio.ClosedResourceError, OSError):
            return  # the ring was stopped and its fds closed

    def _on_guest_kick(self, index: int, fd: int) -> None:
        """Shadow memory: the kernel took the guest's QueueNotify; move its
        chains to the shadow ring."""
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            return
        self._shadow_kick(index)

    def _on_call(self, index: int, call_fd: int) -> None:
        """The daemon's call eventfd for one ring -> a used-buffer interrupt."""
        try:
            os.eventfd_read(call_fd)
        except BlockingIOError:
            return
        if self._shadow_by_ring:
            self._shadow_call(index)
        else:
            self.raise_interrupt(INT_VRING)

    def _close_ring(self, index: int) -> None:
        kick, call = self._rings.pop(index)
        guest_kick = self._guest_kicks.pop(index, None)
        for fd in (kick, call) if guest_kick is None else (kick, call, guest_kick):
            if self.fast_path is not None:
                self.fast_path.release(fd)  # before the close: the kernel finds it by its eventfd
            if self.watcher is not None:
                self.watcher.unwatch(fd)
            trio.lowlevel.notify_closing(fd)
            os.close(fd)
        if not self._rings:
            self.model.vring_irq_in_kernel = False
        self._unpin_ring(index)
        shadow = self._shadow.pop(index, None)
        if shadow is not None:
            if shadow.in_flight:
                log.info("virtio-%s queue %d: %d requests were in flight when it stopped", self.type.name, index,
                         shadow.in_flight)
            shadow.close()  # frees its arena buffers and shadow ring

    def _close_rings(self) -> None:
        self._kick_fds = []
        self._shadow_by_ring = []
        for index in list(self._rings):
            self._close_ring(index)
        # A ring whose set-up failed half-way may have a shadow queue only.
        for shadow in self._shadow.values():
            shadow.close()
        self._shadow.clear()
        for index in list(self._ring_pins):
            self._unpin_ring(index)

    def _unpin_ring(self, index: int) -> None:
        for handle in self._ring_pins.pop(index, ()):
            self.memory.ram.unpin(handle)

    # --- the daemon's requests (BackendHandler) -------------------------

    async def config_changed(self) -> None:
        size = len(self.frontend.config) if self.type.config_size is None else self.type.config_size
        if not size:
            return
        try:
            config = await self.frontend.get_config(size)
        except VhostUserError as exc:
            self._fail(f"re-reading config after CONFIG_CHANGE_MSG: {exc}")
            return
        if self.type.config_overlay is not None:
            config = self.type.config_overlay(config, self.options)
        if self.model.update_config(config):
            self.raise_interrupt(INT_CONFIG)

    def vring_call(self, index: int) -> None:
        if self._shadow_by_ring:
            self._shadow_call(index)
        else:
            self.raise_interrupt(INT_VRING)

    def vring_err(self, index: int) -> None:
        self._fail(f"the daemon reported an error on ring {index}")


def passthrough_resume_index(ram, num: int, avail_gpa: int, used_gpa: int) -> int:
    """Where a new daemon must resume a guest ring it reads directly: the
    guest's used index, so it takes again every request the old daemon had
    not completed (QEMU does the same without INFLIGHT_SHMFD).

    That is right only if the old daemon completed requests in the order
    they were made available: then used entry i is avail entry i. An
    out-of-order completion leaves some finished request after the used
    index and some unfinished one before it; resuming would complete one
    twice and lose the other, so that is refused instead (the caller
    reports DEVICE_NEEDS_RESET). Shadow memory has no such limit: the
    bridge knows every chain in flight."""
    avail_idx = split_ring.U16.unpack(ram.read(avail_gpa + split_ring.AVAIL_IDX, 2))[0]
    used_idx = split_ring.U16.unpack(ram.read(used_gpa + split_ring.USED_IDX, 2))[0]
    outstanding = (avail_idx - used_idx) & 0xFFFF
    if outstanding > num:
        raise RingError(f"the guest's ring shows {outstanding} requests in flight on a queue of {num}")
    mask = num - 1
    # Positions still held by both rings: the last num of each.
    for back in range(1, num - outstanding + 1):
        pos = (used_idx - back) & 0xFFFF
        head = split_ring.U16.unpack(ram.read(avail_gpa + split_ring.avail_ring_entry(pos & mask), 2))[0]
        done = split_ring.USED_ELEM.unpack(ram.read(used_gpa + split_ring.used_ring_entry(pos & mask), 8))[0]
        if head != done:
            raise RingError(
                f"the old daemon completed requests out of order (used entry {pos} is head {done}, avail entry "
                f"{pos} head {head}): without INFLIGHT_SHMFD the requests still in flight cannot be told apart"
            )
    return used_idx
