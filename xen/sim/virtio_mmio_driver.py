"""The simulated guest's virtio-mmio (version 2) transport driver.

It touches the registers in the order Linux's drivers/virtio/virtio_mmio.c
and drivers/virtio/virtio.c do (see docs/virtio-mmio.md), because the
point of the simulated guest is to drive the bridge the way a real Linux
guest would:

probe (vm_probe + register_virtio_device + virtio_dev_probe)
    MagicValue, Version, DeviceID (0: no device, stop), VendorID;
    Status 0 and read Status until it is 0 (vm_reset);
    Status |= ACKNOWLEDGE, Status |= DRIVER (each a read, then a write:
    virtio_add_status);
    DeviceFeaturesSel 1, DeviceFeatures; DeviceFeaturesSel 0, DeviceFeatures;
    DriverFeaturesSel 1, DriverFeatures (high); DriverFeaturesSel 0,
    DriverFeatures (low);
    Status |= FEATURES_OK, read Status back: refused if the bit did not stick.
setup_queue (vm_setup_vq)
    QueueSel; QueueReady (must read 0); QueueNumMax (0: no such queue);
    QueueNum; QueueDescLow/High, QueueDriverLow/High, QueueDeviceLow/High;
    QueueReady 1.
driver_ok
    Status |= DRIVER_OK.
interrupt (vm_interrupt)
    InterruptStatus, InterruptACK with the same value; then the
    configuration change (bit 1) and the used buffers of every queue (bit 0).
reset (vm_reset + vm_del_vqs)
    Status 0, read Status until it is 0; per queue QueueSel, QueueReady 0,
    QueueReady read back.

Config space is read like Linux's virtio_cread*: 1, 2 and 4-byte fields in
one access of that width, 64-bit fields as two 32-bit reads (low first) and
byte arrays byte by byte, the multi-access reads inside the ConfigGeneration
loop of __virtio_cread_many.

DMA: the addresses the device is given (queue registers, descriptors,
indirect tables) come from the ``dma`` layer (xen/sim/guest_dma.py): by
default the identity, guest-physical addresses; with
``GrantDma(guest)`` (a device whose device-tree node says grant_usage)
grant addresses, as Linux's xen-grant-dma-ops gives them. The rings are
mapped at setup_queue and unmapped at reset, the buffers per request by the
virtqueue.

Every operation takes an optional ``vcpu`` (a ``SimVcpu``: anything with
``async read(addr, size)`` and ``async write(addr, size, value)``); without
one it uses the default: vCPU 0 of the guest, the vCPU given to the
constructor, or what the picker given to the constructor returns.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from bridge import split_ring as sr
from bridge.virtio_mmio import (
    CONFIG_GENERATION,
    DEVICE_FEATURES,
    DEVICE_FEATURES_SEL,
    DEVICE_ID,
    DRIVER_FEATURES,
    DRIVER_FEATURES_SEL,
    INTERRUPT_ACK,
    INTERRUPT_STATUS,
    MAGIC_VALUE,
    QUEUE_DESC_LOW,
    QUEUE_DEVICE_LOW,
    QUEUE_DRIVER_LOW,
    QUEUE_NOTIFY,
    QUEUE_NUM,
    QUEUE_NUM_MAX,
    QUEUE_READY,
    QUEUE_SEL,
    STATUS,
    VENDOR_ID,
    DeviceStatus,
)
from bridge.virtio_mmio import CONFIG_OFFSET as CONFIG
from bridge.virtio_mmio import INT_CONFIG as VIRTIO_MMIO_INT_CONFIG
from bridge.virtio_mmio import INT_VRING as VIRTIO_MMIO_INT_VRING
from bridge.virtio_mmio import MAGIC as VIRTIO_MMIO_MAGIC
from bridge.virtio_mmio import VERSION_REG as VERSION
from xen.sim.guest_dma import IDENTITY_DMA, GuestDma, dma_for_device
from xen.sim.guest_memory import GuestAllocator
from xen.sim.guest_virtqueue import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    Completion,
    DeviceMisbehaved,
    GuestRamLike,
    GuestVirtqueue,
    QueueDetached,
    VirtioDriverError,
)

__all__ = [
    "VirtioMmioDriver",
    "VirtioMmioError",
    "NotVirtioMmio",
    "UnsupportedVersion",
    "NoDevice",
    "WrongDevice",
    "FeaturesRefused",
    "MissingVersion1",
    "QueueUnavailable",
    "DeviceTimeout",
    "DeviceMisbehaved",
    "QueueDetached",
    "VirtioDriverError",
]

logger = logging.getLogger(__name__)

# The register map, status and interrupt bits are the spec's, shared with
# the device side (bridge.virtio_mmio); the driver uses Linux's names.
STATUS_ACKNOWLEDGE = DeviceStatus.ACKNOWLEDGE
STATUS_DRIVER = DeviceStatus.DRIVER
STATUS_DRIVER_OK = DeviceStatus.DRIVER_OK
STATUS_FEATURES_OK = DeviceStatus.FEATURES_OK
STATUS_DEVICE_NEEDS_RESET = DeviceStatus.DEVICE_NEEDS_RESET
STATUS_FAILED = DeviceStatus.FAILED

VIRTIO_F_VERSION_1 = 32

ConfigChangeCallback = Callable[[], Awaitable[None]]


class VirtioMmioError(VirtioDriverError):
    """The virtio-mmio device cannot be driven."""


class NotVirtioMmio(VirtioMmioError):
    """MagicValue is not "virt": no virtio-mmio window at that address."""


class UnsupportedVersion(VirtioMmioError):
    """Version is not 2 (1 is the legacy interface, which this driver does not speak)."""


class NoDevice(VirtioMmioError):
    """DeviceID 0: a placeholder window with no device behind it."""


class WrongDevice(VirtioMmioError):
    """DeviceID is not the one the caller asked for."""


class FeaturesRefused(VirtioMmioError):
    """The device did not accept the driver's features (FEATURES_OK did not stick)."""


class MissingVersion1(FeaturesRefused):
    """A version 2 device must offer VIRTIO_F_VERSION_1."""


class QueueUnavailable(VirtioMmioError):
    """The queue does not exist (QueueNumMax 0) or is already live."""


class DeviceTimeout(VirtioMmioError):
    """The device did not finish a reset in time."""


def _largest_power_of_two_at_most(n: int) -> int:
    return 1 << (n.bit_length() - 1)


class VirtioMmioDriver:
    """The transport driver for one virtio-mmio window of the simulated guest.

    ``vcpu`` is the default vCPU (a SimVcpu), or a zero-argument callable that
    returns one per access, or None for ``guest.vcpus[0]``. ``irq`` is the
    window's SPI; with a ``guest`` the interrupt handler is registered with
    ``guest.on_irq`` at the first probe. Without one, call
    :meth:`handle_interrupt` yourself. ``dma`` is the DMA layer the
    virtqueues use for every address the device sees (default: identity;
    see xen.sim.guest_dma for grant mode).
    """

    def __init__(
        self,
        vcpu: Any,
        ram: GuestRamLike,
        allocator: GuestAllocator,
        base: int,
        irq: int | None = None,
        guest: Any = None,
        *,
        reset_timeout: float = 5.0,
        reset_poll_interval: float = 0.001,
        config_generation_retries: int = 1000,
        dma: GuestDma | None = None,
    ) -> None:
        if vcpu is None:
            if guest is None:
                raise ValueError("need a vCPU, a vCPU picker or a guest")
            self._default_vcpu: Any = guest.vcpus[0]
            self._vcpu_picker: Callable[[], Any] | None = None
        elif hasattr(vcpu, "read") and hasattr(vcpu, "write"):
            self._default_vcpu = vcpu
            self._vcpu_picker = None
        elif callable(vcpu):
            self._default_vcpu = None
            self._vcpu_picker = vcpu
        else:
            raise TypeError(f"vcpu must be a SimVcpu or a callable returning one, not {vcpu!r}")
        self.ram = ram
        self.allocator = allocator
        self.base = base
        self.irq = irq
        self.guest = guest
        self.dma: GuestDma = dma if dma is not None else IDENTITY_DMA
        self.reset_timeout = reset_timeout
        self.reset_poll_interval = reset_poll_interval
        self.config_generation_retries = config_generation_retries

        self.version: int | None = None
        self.device_id: int | None = None
        self.vendor_id: int | None = None
        self.device_features = 0
        """What the device offered at the last probe."""
        self.features = 0
        """What was negotiated (written to DriverFeatures) at the last probe."""
        self.queues: dict[int, GuestVirtqueue] = {}
        self.interrupts_handled = 0
        self.config_changes = 0
        self.irq_errors: list[VirtioDriverError] = []
        self._config_event = trio.Event()
        self._config_callbacks: list[ConfigChangeCallback] = []
        self._irq_registered = False

    @classmethod
    async def for_device(cls, guest: Any, allocator: GuestAllocator, base: int, irq: int,
                         **kwargs: Any) -> "VirtioMmioDriver":
        """The driver for the window at ``base``, set up as Linux would from
        the guest's device tree: grant DMA when the device says
        grant_usage (libxl's "xen,grant-dma"), else by address."""
        dma = IDENTITY_DMA
        for device in await guest.devices():
            if device.base == base:
                dma = dma_for_device(guest, device)
        return cls(None, guest.ram, allocator, base, irq, guest, dma=dma, **kwargs)

    # -- plumbing -----------------------------------------------------------

    def free_when_returned(self, completion: Completion | None, allocations: list[int], what: str) -> None:
        """Free a request's buffers once the device has returned its chain:
        now, or when it does (the caller may have gone away, cancelled,
        while the device still owns the chain). A chain the device never
        returned (it misbehaved) keeps its buffers: it may still write."""

        def release(done: Completion | None) -> None:
            if done is not None and isinstance(done.error, DeviceMisbehaved):
                logger.warning("%s: not freeing %d buffer(s) of a request the device did not return", what,
                               len(allocations))
                return
            for gpa in allocations:
                self.allocator.free(gpa)

        if completion is None or completion.done:
            release(completion)
        else:
            completion.add_done_callback(release)

    def pick_vcpu(self, vcpu: Any = None) -> Any:
        """The vCPU an access is made from: ``vcpu`` or the default."""
        if vcpu is not None:
            return vcpu
        if self._vcpu_picker is not None:
            return self._vcpu_picker()
        return self._default_vcpu

    async def read_reg(self, offset: int, *, vcpu: Any = None) -> int:
        """A 32-bit read of a register (all virtio-mmio registers are 32-bit)."""
        return await self.pick_vcpu(vcpu).read(self.base + offset, 4)

    async def write_reg(self, offset: int, value: int, *, vcpu: Any = None) -> None:
        await self.pick_vcpu(vcpu).write(self.base + offset, 4, value & 0xFFFFFFFF)

    def has_feature(self, bit: int) -> bool:
        return bool(self.features >> bit & 1)

    # -- device status ------------------------------------------------------

    async def status(self, *, vcpu: Any = None) -> int:
        """Read the device status register."""
        return await self.read_reg(STATUS, vcpu=vcpu)

    async def add_status(self, bits: int, *, vcpu: Any = None) -> None:
        """Linux's virtio_add_status: read Status, write it back with ``bits`` set."""
        v = self.pick_vcpu(vcpu)
        current = await self.read_reg(STATUS, vcpu=v)
        await self.write_reg(STATUS, current | bits, vcpu=v)

    async def needs_reset(self, *, vcpu: Any = None) -> bool:
        """Whether the device set DEVICE_NEEDS_RESET."""
        return bool(await self.status(vcpu=vcpu) & STATUS_DEVICE_NEEDS_RESET)

    async def fail(self, *, vcpu: Any = None) -> None:
        """Set FAILED: the driver gave up on the device."""
        await self.add_status(STATUS_FAILED, vcpu=vcpu)

    async def driver_ok(self, *, vcpu: Any = None) -> None:
        """Set DRIVER_OK (Linux's virtio_device_ready): the device is live."""
        await self.add_status(STATUS_DRIVER_OK, vcpu=vcpu)

    async def _vm_reset(self, v: Any) -> None:
        await self.write_reg(STATUS, 0, vcpu=v)
        deadline = trio.current_time() + self.reset_timeout
        while await self.read_reg(STATUS, vcpu=v):
            if trio.current_time() >= deadline:
                raise DeviceTimeout(
                    f"virtio-mmio device at {self.base:#x}: Status still non-zero "
                    f"{self.reset_timeout}s after writing 0 (reset)"
                )
            await trio.sleep(self.reset_poll_interval)

    # -- probe and feature negotiation -------------------------------------

    async def probe(self, wanted_features: int, *, device_id: int | None = None, vcpu: Any = None) -> None:
        """Identify the device, reset it and negotiate features, up to and
        including FEATURES_OK (queues and DRIVER_OK are the device driver's
        business). VIRTIO_F_VERSION_1 is always accepted and must be offered.
        With ``device_id``, a different DeviceID raises :class:`WrongDevice`
        before the device is touched."""
        v = self.pick_vcpu(vcpu)
        magic = await self.read_reg(MAGIC_VALUE, vcpu=v)
        if magic != VIRTIO_MMIO_MAGIC:
            raise NotVirtioMmio(f"no virtio-mmio device at {self.base:#x}: wrong magic value {magic:#010x}")
        version = await self.read_reg(VERSION, vcpu=v)
        if version != 2:
            what = "the legacy interface" if version == 1 else "unknown"
            raise UnsupportedVersion(f"virtio-mmio device at {self.base:#x}: version {version} ({what}) not supported")
        self.version = version
        dev_id = await self.read_reg(DEVICE_ID, vcpu=v)
        self.device_id = dev_id
        if dev_id == 0:
            raise NoDevice(f"virtio-mmio window at {self.base:#x} has no device (DeviceID 0)")
        self.vendor_id = await self.read_reg(VENDOR_ID, vcpu=v)
        if device_id is not None and dev_id != device_id:
            raise WrongDevice(f"virtio-mmio device at {self.base:#x} is device {dev_id}, not {device_id}")
        self._register_irq()

        # register_virtio_device: reset, ACKNOWLEDGE; virtio_dev_probe: DRIVER.
        await self._reset_and_drop_queues(v)
        self.features = 0
        await self.add_status(STATUS_ACKNOWLEDGE, vcpu=v)
        await self.add_status(STATUS_DRIVER, vcpu=v)

        await self.write_reg(DEVICE_FEATURES_SEL, 1, vcpu=v)
        high = await self.read_reg(DEVICE_FEATURES, vcpu=v)
        await self.write_reg(DEVICE_FEATURES_SEL, 0, vcpu=v)
        low = await self.read_reg(DEVICE_FEATURES, vcpu=v)
        self.device_features = high << 32 | low

        features = self.device_features & (wanted_features | 1 << VIRTIO_F_VERSION_1)
        if not features >> VIRTIO_F_VERSION_1 & 1:
            await self.fail(vcpu=v)
            raise MissingVersion1(
                f"virtio-mmio device at {self.base:#x} is version 2 but does not offer VIRTIO_F_VERSION_1 "
                f"(device features {self.device_features:#x})"
            )
        await self.write_reg(DRIVER_FEATURES_SEL, 1, vcpu=v)
        await self.write_reg(DRIVER_FEATURES, features >> 32, vcpu=v)
        await self.write_reg(DRIVER_FEATURES_SEL, 0, vcpu=v)
        await self.write_reg(DRIVER_FEATURES, features, vcpu=v)
        self.features = features

        await self.add_status(STATUS_FEATURES_OK, vcpu=v)
        status = await self.read_reg(STATUS, vcpu=v)
        if not status & STATUS_FEATURES_OK:
            await self.fail(vcpu=v)
            raise FeaturesRefused(
                f"virtio-mmio device at {self.base:#x} refused features {features:#x} "
                f"(status {status:#x} after setting FEATURES_OK)"
            )
        logger.debug("virtio-mmio %#x: device %d vendor %#x, features %#x of %#x",
                     self.base, dev_id, self.vendor_id, features, self.device_features)

    def _register_irq(self) -> None:
        if self._irq_registered or self.guest is None or self.irq is None:
            return
        self.guest.on_irq(self.irq, self._irq_handler)
        self._irq_registered = True

    async def _irq_handler(self) -> None:
        await self.handle_interrupt()

    # -- configuration space ------------------------------------------------

    async def config_generation(self, *, vcpu: Any = None) -> int:
        return await self.read_reg(CONFIG_GENERATION, vcpu=vcpu)

    async def _config_get(self, offset: int, size: int, v: Any) -> int:
        addr = self.base + CONFIG + offset
        if size == 8:
            low = await v.read(addr, 4)
            high = await v.read(addr + 4, 4)
            return high << 32 | low
        return await v.read(addr, size)

    async def _generation_loop(self, v: Any, read_fields: Callable[[], Awaitable[Any]]) -> Any:
        # __virtio_cread_many: generation, fields, generation; again while it moved.
        generation = await self.config_generation(vcpu=v)
        for _ in range(self.config_generation_retries):
            old = generation
            value = await read_fields()
            generation = await self.config_generation(vcpu=v)
            if generation == old:
                return value
        raise DeviceMisbehaved(
            f"virtio-mmio device at {self.base:#x}: ConfigGeneration changed on each of "
            f"{self.config_generation_retries} config reads"
        )

    @staticmethod
    def _check_config_access(offset: int, size: int) -> None:
        if size not in (1, 2, 4, 8):
            raise ValueError(f"config access size must be 1, 2, 4 or 8, not {size}")
        if offset < 0 or offset % min(size, 4):
            raise ValueError(f"config offset {offset:#x} is not aligned for a {size}-byte access")

    async def read_config(self, offset: int, size: int, *, vcpu: Any = None,
                          generation_loop: bool | None = None) -> int:
        """Read a little-endian config field of 1, 2, 4 or 8 bytes at
        ``offset`` into the device-specific config space. As Linux, only the
        8-byte read (two accesses) goes through the ConfigGeneration loop;
        ``generation_loop=True`` forces it for the others too."""
        self._check_config_access(offset, size)
        v = self.pick_vcpu(vcpu)
        if generation_loop is None:
            generation_loop = size == 8
        if not generation_loop:
            return await self._config_get(offset, size, v)
        return await self._generation_loop(v, lambda: self._config_get(offset, size, v))

    async def read_config_bytes(self, offset: int, length: int, *, vcpu: Any = None) -> bytes:
        """Read ``length`` bytes of config space byte by byte inside the
        ConfigGeneration loop (Linux's virtio_cread_bytes)."""
        if offset < 0 or length < 0:
            raise ValueError("negative config offset or length")
        v = self.pick_vcpu(vcpu)
        addr = self.base + CONFIG + offset

        async def read_bytes() -> bytes:
            return bytes([await v.read(addr + i, 1) for i in range(length)])

        return await self._generation_loop(v, read_bytes)

    async def write_config(self, offset: int, size: int, value: int, *, vcpu: Any = None) -> None:
        """Write a config field (8 bytes as two 32-bit writes, low first)."""
        self._check_config_access(offset, size)
        v = self.pick_vcpu(vcpu)
        addr = self.base + CONFIG + offset
        if size == 8:
            await v.write(addr, 4, value & 0xFFFFFFFF)
            await v.write(addr + 4, 4, value >> 32 & 0xFFFFFFFF)
        else:
            await v.write(addr, size, value & ((1 << 8 * size) - 1))

    def on_config_change(self, callback: ConfigChangeCallback) -> None:
        """Have ``await callback()`` run by the interrupt handler after each
        configuration change interrupt."""
        self._config_callbacks.append(callback)

    async def wait_config_change(self, seen: int | None = None) -> int:
        """Wait until more than ``seen`` (default: the current count)
        configuration change interrupts were handled; return the count."""
        if seen is None:
            seen = self.config_changes
        while self.config_changes <= seen:
            await self._config_event.wait()
        return self.config_changes

    # -- virtqueues ---------------------------------------------------------

    async def setup_queue(self, index: int, size: int | None = None, *, vcpu: Any = None,
                          separate_rings: bool = False) -> GuestVirtqueue:
        """Set up virtqueue ``index`` (vm_setup_vq): its size is the largest
        power of two not above ``size`` (default: QueueNumMax) and QueueNumMax.
        The rings are allocated zeroed in guest RAM and mapped with the DMA
        layer; the queue registers get their DMA addresses."""
        if index in self.queues:
            raise ValueError(f"virtqueue {index} is already set up")
        if size is not None and size < 1:
            raise ValueError(f"queue size must be positive, not {size}")
        v = self.pick_vcpu(vcpu)
        await self.write_reg(QUEUE_SEL, index, vcpu=v)
        if await self.read_reg(QUEUE_READY, vcpu=v):
            raise QueueUnavailable(f"virtio-mmio device at {self.base:#x}: queue {index} is already live")
        num_max = await self.read_reg(QUEUE_NUM_MAX, vcpu=v)
        if num_max == 0:
            raise QueueUnavailable(f"virtio-mmio device at {self.base:#x} has no queue {index}")
        num = _largest_power_of_two_at_most(min(num_max, size or num_max, sr.MAX_QUEUE_SIZE))
        if size is not None and num != size:
            logger.debug("virtio-mmio %#x queue %d: size %d (asked %d, max %d)", self.base, index, num, size, num_max)

        async def notify(notify_vcpu: Any) -> None:
            await self.write_reg(QUEUE_NOTIFY, index, vcpu=notify_vcpu)

        vq = GuestVirtqueue.create(
            self.ram, self.allocator, index, num, notify,
            event_idx=self.has_feature(VIRTIO_F_EVENT_IDX),
            indirect=self.has_feature(VIRTIO_F_INDIRECT_DESC),
            separate_rings=separate_rings,
            dma=self.dma,
        )
        try:
            await vq.map_rings()
            await self.write_reg(QUEUE_NUM, num, vcpu=v)
            for low_reg, addr in ((QUEUE_DESC_LOW, vq.desc_dma), (QUEUE_DRIVER_LOW, vq.avail_dma),
                                  (QUEUE_DEVICE_LOW, vq.used_dma)):
                assert addr is not None
                await self.write_reg(low_reg, addr & 0xFFFFFFFF, vcpu=v)
                await self.write_reg(low_reg + 4, addr >> 32, vcpu=v)
            await self.write_reg(QUEUE_READY, 1, vcpu=v)
        except BaseException:
            with trio.CancelScope(shield=True):
                await vq.delete("queue setup failed")
            raise
        self.queues[index] = vq
        return vq

    # -- interrupts ---------------------------------------------------------

    async def handle_interrupt(self, *, vcpu: Any = None) -> int:
        """The interrupt handler (vm_interrupt): read InterruptStatus, ack it,
        then handle a configuration change and collect every queue's used
        buffers. Collecting after the ack means a buffer used after the ack
        raises a new edge, and one used before it is seen here. Returns the
        InterruptStatus value."""
        v = self.pick_vcpu(vcpu)
        status = await self.read_reg(INTERRUPT_STATUS, vcpu=v)
        await self.write_reg(INTERRUPT_ACK, status, vcpu=v)
        self.interrupts_handled += 1
        if status & VIRTIO_MMIO_INT_CONFIG:
            self.config_changes += 1
            self._config_event.set()
            self._config_event = trio.Event()
        if status & VIRTIO_MMIO_INT_VRING:
            for vq in list(self.queues.values()):
                try:
                    if vq.dma.needs_calls:
                        # Unmaps each returned chain before completing it.
                        await vq.handle_used()
                    else:
                        vq.collect_used()
                except DeviceMisbehaved as exc:
                    # Already logged, and delivered to every waiter of the queue.
                    self.irq_errors.append(exc)
        if status & VIRTIO_MMIO_INT_CONFIG:
            for callback in list(self._config_callbacks):
                await callback()
        return status

    # -- reset --------------------------------------------------------------

    async def _reset_and_drop_queues(self, v: Any) -> None:
        await self._vm_reset(v)
        for index in sorted(self.queues):
            # vm_del_vq
            await self.write_reg(QUEUE_SEL, index, vcpu=v)
            await self.write_reg(QUEUE_READY, 0, vcpu=v)
            if await self.read_reg(QUEUE_READY, vcpu=v):
                logger.warning("virtio-mmio %#x: queue %d still ready after reset", self.base, index)
        queues, self.queues = self.queues, {}
        for vq in queues.values():
            # vring_del_virtqueue: unmaps what the device was given, rings last.
            await vq.delete("device reset")

    async def reset(self, *, vcpu: Any = None) -> None:
        """Reset the device (Status 0, then wait for Status to read 0), tear
        the queues down, unmap (DMA) and free their memory. Requests still in
        flight fail with :class:`QueueDetached`. ``probe`` may be called
        again after."""
        await self._reset_and_drop_queues(self.pick_vcpu(vcpu))
        self.features = 0
