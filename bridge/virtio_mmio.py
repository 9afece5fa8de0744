"""The virtio-mmio version 2 register file (virtio 1.2 section 4.2), sans I/O.

One :class:`VirtioMmioModel` is one device window as the guest sees it. The
caller decodes an ioreq into ``read(offset, size)`` or
``write(offset, size, value)``. A read gives back the register value. A write
gives back a tuple of *effects*: small frozen objects that tell the device
glue what it has to do (kick a queue, start or stop the backend, pass a
config write on, redo the interrupt line). The model does no I/O and has no
clock. It only checks accesses, keeps the registers, and decides the effects.

The device side talks to the model through ``raise_interrupt``,
``update_config`` and ``set_needs_reset``, and reads ``status``,
``driver_features``, ``queues`` and ``ready_queues()`` when it acts on an
effect.

Error model
-----------
An access the specification forbids raises :class:`GuestAccessError`. Such
accesses include a wrong size or alignment, an undefined offset, a read of a
write-only register, a write to a read-only one, and a value the register
cannot take. The caller logs the error and completes the ioreq (a read gets
all-ones). A rejected access never changes the model and never produces an
effect: every check runs before the first assignment. Bad arguments from the
*device* side (the caller's own code) raise ``ValueError``.

Effects are synchronous with the access
---------------------------------------
The vCPU that made the access stays paused until its ioreq is completed.
That is the only ordering point the transport has. Before it completes the
ioreq of a write, the caller MUST carry out that write's ``Reset`` and
``QueueReset`` effects, that is, have the backend stop using the rings. The
driver takes the next read (Status == 0, QueueReset == 0, QueueReady == 0)
as proof that the device no longer touches that memory, and may free it.
The model therefore shows the finished state at once.

Choices made where the specification is loose
---------------------------------------------
1. Access widths. Control registers (offsets below 0x100) take only 32-bit
   naturally aligned accesses (4.2.2 driver requirements). The driver
   requirements name 8, 16 and 32-bit config accesses. The model also takes
   8-byte accesses to config space, which a guest's 64-bit load can make.
   Linux itself reads a 64-bit field as two 32-bit reads. Every config
   access must be naturally aligned and lie entirely inside the config
   bytes the device has. Offsets not in the
   register table are rejected, and that includes the legacy-only
   GuestPageSize, QueueAlign and QueuePFN.
2. Feature words. DeviceFeatures returns bits ``32*sel .. 32*sel+31`` for
   any selector, so selectors past the offered bits read 0. The model keeps
   DriverFeatures for every word the device has (at least words 0 and 1).
   A non-zero write to a word past those is remembered as "driver accepted
   a feature that was not offered", and FEATURES_OK then fails. At most 16
   such words are remembered (one more is rejected), so a hostile guest
   cannot grow memory.
3. FEATURES_OK is refused, and does not stick (the rest of the write still
   applies), unless the driver's features are a subset of the device's and
   include VIRTIO_F_VERSION_1 (a version 2 device needs it). Linux reads
   Status back to find out. Refusal is the protocol at work, not a guest
   error, so it does not raise.
4. DriverFeatures is frozen once FEATURES_OK is set. A write that would
   change the negotiated set raises GuestAccessError, and writing the same
   value again is accepted. The backend negotiates from these bits, and the
   only way to renegotiate is a reset (2.2).
5. Status. A write of 0 is a reset. A non-zero write sets flags, and the
   following are rejected:
   - reserved bits (0x10, 0x20 and anything above 0xff);
   - setting DEVICE_NEEDS_RESET, which only the device sets;
   - clearing a set bit other than DEVICE_NEEDS_RESET. The driver's value
     of that bit is ignored, so a read-modify-write may carry it or not;
   - breaking the 3.1.1 order: DRIVER needs ACKNOWLEDGE, FEATURES_OK needs
     DRIVER, DRIVER_OK needs FEATURES_OK. A single write that sets several
     bits in the right order is fine;
   - newly setting FEATURES_OK or DRIVER_OK while FAILED or
     DEVICE_NEEDS_RESET is set, or in the same write as FAILED. Nothing
     new is started on a device the driver gave up on or that needs a
     reset.
   ``DriverOk`` is emitted on the one write that sets DRIVER_OK. Bits
   cannot be cleared except by a reset, so that happens at most once per
   reset cycle.
6. Reset (Status = 0) restores every register to its reset value: status,
   features and their selectors, QueueSel, SHMSel, every queue's
   registers, and InterruptStatus. The config bytes are the device's and
   stay. ConfigGeneration keeps counting. ``Reset`` is emitted only if
   something differed from the reset state. Linux writes 0 to a fresh
   device at probe, and that gives no effect. InterruptStatus counts, so
   the caller also lowers the line on ``Reset``.
7. Queue registers. QueueSel takes any value. For a queue that does not
   exist, QueueNumMax, QueueReady and QueueReset read 0, and every write
   to that queue's registers is rejected, except QueueReady = 0. Linux's
   vm_setup_vq writes that on its error path when QueueNumMax reads 0, so
   it is accepted and does nothing. QueueNum and the Desc, Driver
   and Device halves are rejected while the queue is ready (4.2.2).
   A QueueNum of 0 or above QueueNumMax is rejected when written (4.2.2).
   Whether the size suits the ring format is checked at QueueReady = 1,
   because the format is only settled at FEATURES_OK. QueueNum resets to
   0, which means "not written". The QueueNum register is write-only and
   4.2.3.2 has the driver write it, so the model does not silently fall
   back to the maximum. QueueNumMax values must be powers of two, which
   suits both ring formats.
8. QueueReady = 1 is accepted only under all of these conditions, and
   otherwise raises GuestAccessError with QueueReady still reading 0:
   - FEATURES_OK is set (the ring layout depends on the negotiated
     features, see 3.1.1);
   - the device is not FAILED or NEEDS_RESET;
   - QueueNum has been written, and suits the ring format: a power of two
     for a split ring (2.7), anything up to 2**15 for a packed ring
     (2.8);
   - the three areas are non-zero;
   - the areas are aligned as the format requires. A split ring needs the
     descriptor table on 16, the available ring on 2 and the used ring
     on 4 (2.7). A packed ring needs the descriptor ring on 16 and both
     event suppression structures on 4 (2.8);
   - no area runs past 2**64.
   Zero is the reset value, so it means "never programmed". Xen on Arm
   puts no guest RAM at 0.
   Writing 1 to a queue that is already ready does nothing. If DRIVER_OK
   is set, ``QueueEnable`` is emitted: the queue is brought up on a
   running device, for example after a queue reset. Values other than
   0 and 1 are rejected.
9. QueueReady = 0 on a ready queue while DRIVER_OK is set means the driver
   stops using that queue. The device must stop touching it before the
   driver reads the 0 back (4.2.2). The model emits ``QueueReset(q)`` for
   this too: the backend has to do exactly the same thing, which is to stop
   the vring and forget its indices. A later ``QueueEnable`` sets it up
   afresh. The queue's other registers are kept. Linux writes
   QueueReady = 0 only after a reset or before DRIVER_OK, and then no
   effect is emitted.
10. QueueReset (VIRTIO_F_RING_RESET, bit 40). A write needs the bit to be
    negotiated (FEATURES_OK set and bit 40 accepted). Otherwise the write
    is rejected and a read returns 0. Writing 1 puts the selected queue's
    registers back to their reset values (QueueReady becomes 0), and emits
    ``QueueReset(q)`` if DRIVER_OK is set. Writing 0 does nothing, and
    other values are rejected. A read always returns 0. 4.2.2 says the
    device shows 1 only "as long as the queue reset is ongoing" and must
    show 0 in QueueReset and QueueReady once the reset has completed, and
    the driver "MUST NOT consider queue reset to be complete until it
    reads back 0". Here the reset is complete when the write's ioreq
    completes (see above), so no read can see it ongoing. Showing 1 until
    the queue is enabled again would make a driver that polls for 0
    (Linux does so for PCI) spin forever. Linux's virtio_mmio driver does
    not implement ring reset at all today. So ``QueueState`` has no
    ``reset`` field: nothing is ever held in reset.
11. QueueNotify. If VIRTIO_F_NOTIFICATION_DATA is negotiated, the queue is
    the low 16 bits and the rest is notification data, which a vhost-user
    kick cannot carry. Otherwise the value must be the queue index itself.
    A notify before DRIVER_OK, or for a queue that does not exist or is
    not ready, is a driver error and raises (3.1.1, 4.2.2). While FAILED
    or DEVICE_NEEDS_RESET is set, notifies are accepted and dropped, with
    no ``Kick``. Once the glue has started the backend (``DriverOk``), it
    should kick each ready queue once, because drivers that fill a ring
    before DRIVER_OK do exist.
12. Interrupts. ``raise_interrupt`` refuses bits other than INT_VRING and
    INT_CONFIG (ValueError). It drops INT_VRING unless DRIVER_OK is set
    (2.1.2: no used buffer notifications before DRIVER_OK). It drops every
    bit while Status is 0: with no driver, a stale bit would stay pending
    into the next driver's lifetime and hide the edge for every later
    event. It returns True only on the 0 -> non-zero change, which is when
    an edge is needed. InterruptACK with bits other than 0 and 1 is rejected
    (4.2.2: the driver "MUST NOT set any of the undefined bits"). Any other
    ACK emits ``InterruptAck(status_after)``, even one that cleared
    nothing, so the caller lowers the line and raises it again if events
    are still pending.
13. ``set_needs_reset`` does nothing while Status is 0, because there is
    no driver to tell and a driver waiting for Status to read 0 after its
    reset must see 0. Otherwise it sets DEVICE_NEEDS_RESET and returns
    True the first time. The caller then raises INT_CONFIG, which 2.1.2
    requires once DRIVER_OK is set and allows before that.
14. Config space. Reads are little-endian. If ``config_writable`` is
    False, a write is rejected. Otherwise the model stores the bytes and
    emits ``ConfigWrite``. A driver's own write does not bump
    ConfigGeneration, because ConfigGeneration guards against changes the
    driver did not make. ``update_config`` bumps it (modulo 2**32) only
    when the bytes really change. The config is at most 0x100 bytes,
    which is the rest of the window.
15. Shared memory regions are not offered: SHMLen* and SHMBase* read
    all-ones for every SHMSel.
16. Transport features that this transport cannot honour are refused when
    the model is built (ValueError), so the glue has to mask them. See
    ``UNSUPPORTED_FEATURES``: bit 30 (VHOST_USER_F_PROTOCOL_FEATURES, a
    vhost-user bit that is never a virtio feature), SR_IOV (37, PCI only),
    NOTIF_CONFIG_DATA (39, MMIO has no register for it) and ADMIN_VQ (41,
    reserved for MMIO). The device must also offer VIRTIO_F_VERSION_1.
    VIRTIO_F_RING_PACKED (34) is allowed. If it is negotiated, queues are
    checked against the packed layout (choice 8).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import Union

import attrs

from bridge.split_ring import (
    AVAIL_ALIGN,
    DESC_ALIGN,
    USED_ALIGN,
    avail_ring_size,
    desc_table_size,
    is_valid_queue_size,
    used_ring_size,
)

__all__ = [
    "WINDOW_SIZE",
    "MAGIC",
    "VERSION",
    "CONFIG_OFFSET",
    "CONFIG_MAX_SIZE",
    "MAGIC_VALUE",
    "VERSION_REG",
    "DEVICE_ID",
    "VENDOR_ID",
    "DEVICE_FEATURES",
    "DEVICE_FEATURES_SEL",
    "DRIVER_FEATURES",
    "DRIVER_FEATURES_SEL",
    "QUEUE_SEL",
    "QUEUE_NUM_MAX",
    "QUEUE_NUM",
    "QUEUE_READY",
    "QUEUE_NOTIFY",
    "INTERRUPT_STATUS",
    "INTERRUPT_ACK",
    "STATUS",
    "QUEUE_DESC_LOW",
    "QUEUE_DESC_HIGH",
    "QUEUE_DRIVER_LOW",
    "QUEUE_DRIVER_HIGH",
    "QUEUE_DEVICE_LOW",
    "QUEUE_DEVICE_HIGH",
    "SHM_SEL",
    "SHM_LEN_LOW",
    "SHM_LEN_HIGH",
    "SHM_BASE_LOW",
    "SHM_BASE_HIGH",
    "QUEUE_RESET",
    "CONFIG_GENERATION",
    "REGISTER_NAMES",
    "DeviceStatus",
    "INT_VRING",
    "INT_CONFIG",
    "VIRTIO_F_VERSION_1",
    "VIRTIO_F_RING_PACKED",
    "VIRTIO_F_SR_IOV",
    "VIRTIO_F_NOTIFICATION_DATA",
    "VIRTIO_F_NOTIF_CONFIG_DATA",
    "VIRTIO_F_RING_RESET",
    "VIRTIO_F_ADMIN_VQ",
    "VHOST_USER_F_PROTOCOL_FEATURES",
    "UNSUPPORTED_FEATURES",
    "GuestAccessError",
    "Kick",
    "DriverOk",
    "Reset",
    "ConfigWrite",
    "InterruptAck",
    "QueueReset",
    "QueueEnable",
    "Effect",
    "QueueState",
    "VirtioMmioModel",
]

WINDOW_SIZE = 0x200  # Xen on Arm gives each virtio-mmio device 0x200 bytes
MAGIC = 0x74726976  # "virt", little-endian
VERSION = 2
CONFIG_OFFSET = 0x100
CONFIG_MAX_SIZE = WINDOW_SIZE - CONFIG_OFFSET

# Register offsets (virtio 1.2, table 4.1). The Version register is called
# VERSION_REG because VERSION is the value it reads.
MAGIC_VALUE = 0x000
VERSION_REG = 0x004
DEVICE_ID = 0x008
VENDOR_ID = 0x00C
DEVICE_FEATURES = 0x010
DEVICE_FEATURES_SEL = 0x014
DRIVER_FEATURES = 0x020
DRIVER_FEATURES_SEL = 0x024
QUEUE_SEL = 0x030
QUEUE_NUM_MAX = 0x034
QUEUE_NUM = 0x038
QUEUE_READY = 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS = 0x060
INTERRUPT_ACK = 0x064
STATUS = 0x070
QUEUE_DESC_LOW = 0x080
QUEUE_DESC_HIGH = 0x084
QUEUE_DRIVER_LOW = 0x090
QUEUE_DRIVER_HIGH = 0x094
QUEUE_DEVICE_LOW = 0x0A0
QUEUE_DEVICE_HIGH = 0x0A4
SHM_SEL = 0x0AC
SHM_LEN_LOW = 0x0B0
SHM_LEN_HIGH = 0x0B4
SHM_BASE_LOW = 0x0B8
SHM_BASE_HIGH = 0x0BC
QUEUE_RESET = 0x0C0
CONFIG_GENERATION = 0x0FC

# Spec names, for log lines.
REGISTER_NAMES: dict[int, str] = {
    MAGIC_VALUE: "MagicValue",
    VERSION_REG: "Version",
    DEVICE_ID: "DeviceID",
    VENDOR_ID: "VendorID",
    DEVICE_FEATURES: "DeviceFeatures",
    DEVICE_FEATURES_SEL: "DeviceFeaturesSel",
    DRIVER_FEATURES: "DriverFeatures",
    DRIVER_FEATURES_SEL: "DriverFeaturesSel",
    QUEUE_SEL: "QueueSel",
    QUEUE_NUM_MAX: "QueueNumMax",
    QUEUE_NUM: "QueueNum",
    QUEUE_READY: "QueueReady",
    QUEUE_NOTIFY: "QueueNotify",
    INTERRUPT_STATUS: "InterruptStatus",
    INTERRUPT_ACK: "InterruptACK",
    STATUS: "Status",
    QUEUE_DESC_LOW: "QueueDescLow",
    QUEUE_DESC_HIGH: "QueueDescHigh",
    QUEUE_DRIVER_LOW: "QueueDriverLow",
    QUEUE_DRIVER_HIGH: "QueueDriverHigh",
    QUEUE_DEVICE_LOW: "QueueDeviceLow",
    QUEUE_DEVICE_HIGH: "QueueDeviceHigh",
    SHM_SEL: "SHMSel",
    SHM_LEN_LOW: "SHMLenLow",
    SHM_LEN_HIGH: "SHMLenHigh",
    SHM_BASE_LOW: "SHMBaseLow",
    SHM_BASE_HIGH: "SHMBaseHigh",
    QUEUE_RESET: "QueueReset",
    CONFIG_GENERATION: "ConfigGeneration",
}


class DeviceStatus(enum.IntFlag):
    """Device status bits (virtio 1.2 section 2.1)."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 0x40
    FAILED = 0x80


# InterruptStatus / InterruptACK bits.
INT_VRING = 1
INT_CONFIG = 2

# Feature bit numbers (virtio 1.2 section 6) the transport cares about.
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_RING_PACKED = 34
VIRTIO_F_SR_IOV = 37
VIRTIO_F_NOTIFICATION_DATA = 38
VIRTIO_F_NOTIF_CONFIG_DATA = 39
VIRTIO_F_RING_RESET = 40
VIRTIO_F_ADMIN_VQ = 41
# Not a virtio feature: the vhost-user daemon announces the protocol-feature
# extension in bit 30 of its GET_FEATURES answer. It must never reach a guest.
VHOST_USER_F_PROTOCOL_FEATURES = 30

# Features a device behind this transport must not offer (see choice 16).
UNSUPPORTED_FEATURES = (
    (1 << VHOST_USER_F_PROTOCOL_FEATURES)
    | (1 << VIRTIO_F_SR_IOV)
    | (1 << VIRTIO_F_NOTIF_CONFIG_DATA)
    | (1 << VIRTIO_F_ADMIN_VQ)
)

# Plain ints for the hot paths (IntFlag arithmetic is slow).
_ACK = int(DeviceStatus.ACKNOWLEDGE)
_DRIVER = int(DeviceStatus.DRIVER)
_DRIVER_OK = int(DeviceStatus.DRIVER_OK)
_FEATURES_OK = int(DeviceStatus.FEATURES_OK)
_NEEDS_RESET = int(DeviceStatus.DEVICE_NEEDS_RESET)
_FAILED = int(DeviceStatus.FAILED)
_STATUS_DEFINED = _ACK | _DRIVER | _DRIVER_OK | _FEATURES_OK | _NEEDS_RESET | _FAILED
_BROKEN = _NEEDS_RESET | _FAILED
_INT_ALL = INT_VRING | INT_CONFIG

_U32 = 0xFFFF_FFFF
_U64 = 0xFFFF_FFFF_FFFF_FFFF
_ADDR_SPACE = 1 << 64
_MAX_QUEUES = 0x1_0000  # QueueNotify carries a 16-bit index (4.2.3.3)
_MAX_FOREIGN_FEATURE_WORDS = 16
_CONFIG_ACCESS_SIZES = (1, 2, 4, 8)
# Packed virtqueues (virtio 1.2 section 2.8.10.1): at most 2**15 entries;
# descriptor ring 16-aligned, 16 bytes an entry; both event suppression
# structures 4-aligned, 4 bytes.
_PACKED_MAX_SIZE = 1 << 15
_PACKED_DESC_ALIGN = 16
_PACKED_EVENT_ALIGN = 4
_PACKED_EVENT_SIZE = 4


class GuestAccessError(Exception):
    """The guest made an access the virtio-mmio specification forbids.

    The model is unchanged. The caller logs the error, answers a read with
    all-ones, and completes the ioreq.
    """


# ---------------------------------------------------------------- effects


@attrs.frozen
class Kick:
    """Available-buffer notification for a ready queue on a running device."""

    queue: int


@attrs.frozen
class DriverOk:
    """Status gained DRIVER_OK (FEATURES_OK is set): start the device with
    ``driver_features`` and the queues in ``ready_queues()``."""


@attrs.frozen
class Reset:
    """The driver reset a device that was not pristine. Stop the backend and
    lower the interrupt line. The model has already reset its registers."""


@attrs.frozen
class ConfigWrite:
    """The driver wrote ``data`` at ``offset`` (from the start of config space)."""

    offset: int
    data: bytes


@attrs.frozen
class InterruptAck:
    """InterruptACK was written. ``status`` is InterruptStatus after the ack.
    Lower the line, and raise it again if ``status`` is non-zero (edge SPI)."""

    status: int


@attrs.frozen
class QueueReset:
    """Queue ``queue`` stopped on a running device (QueueReset = 1, or
    QueueReady 1 -> 0). The backend stops the vring and forgets its state."""

    queue: int


@attrs.frozen
class QueueEnable:
    """QueueReady = 1 on a running device: set up and start vring ``queue``
    from ``queues[queue]``."""

    queue: int


Effect = Union[Kick, DriverOk, Reset, ConfigWrite, InterruptAck, QueueReset, QueueEnable]

_NO_EFFECTS: tuple[Effect, ...] = ()
_DRIVER_OK_EFFECTS: tuple[Effect, ...] = (DriverOk(),)
_RESET_EFFECTS: tuple[Effect, ...] = (Reset(),)
_ACK_EFFECTS: tuple[tuple[Effect, ...], ...] = tuple(
    (InterruptAck(s),) for s in range(_INT_ALL + 1)
)


# ---------------------------------------------------------------- queues


@attrs.define
class QueueState:
    """One virtqueue's transport registers.

    ``desc``, ``driver`` (the available ring) and ``device`` (the used ring)
    are 64-bit guest-physical addresses, put together from the Low and High
    register halves. ``num`` is 0 until the driver writes QueueNum.
    """

    num_max: int
    num: int = 0
    desc: int = 0
    driver: int = 0
    device: int = 0
    ready: bool = False

    def is_pristine(self) -> bool:
        return (
            self.num == 0
            and self.desc == 0
            and self.driver == 0
            and self.device == 0
            and not self.ready
        )

    def clear(self) -> None:
        """Back to the reset values. ``num_max`` belongs to the device and stays."""
        self.num = 0
        self.desc = 0
        self.driver = 0
        self.device = 0
        self.ready = False


def _queue_layout_problem(q: QueueState, packed: bool) -> str | None:
    """Why this queue cannot be enabled in the negotiated ring format, or
    None if it can."""
    if q.num == 0:
        return "QueueNum was never written"
    if packed:
        if not 0 < q.num <= min(q.num_max, _PACKED_MAX_SIZE):
            return f"QueueNum {q.num} is not a valid packed-ring size <= {q.num_max}"
        areas = (
            ("descriptor ring", q.desc, _PACKED_DESC_ALIGN, 16 * q.num),
            ("driver event suppression", q.driver, _PACKED_EVENT_ALIGN, _PACKED_EVENT_SIZE),
            ("device event suppression", q.device, _PACKED_EVENT_ALIGN, _PACKED_EVENT_SIZE),
        )
    else:
        if not (is_valid_queue_size(q.num) and q.num <= q.num_max):
            return f"QueueNum {q.num} is not a power of two, as a split ring needs"
        areas = (
            ("descriptor table", q.desc, DESC_ALIGN, desc_table_size(q.num)),
            ("available ring", q.driver, AVAIL_ALIGN, avail_ring_size(q.num)),
            ("used ring", q.device, USED_ALIGN, used_ring_size(q.num)),
        )
    for name, addr, align, size in areas:
        if addr == 0:
            return f"{name} address was never written"
        if addr % align:
            return f"{name} address {addr:#x} is not {align}-byte aligned"
        if addr + size > _ADDR_SPACE:
            return f"{name} at {addr:#x} runs past the end of the address space"
    return None


# ---------------------------------------------------------------- the model

_Reader = Callable[["VirtioMmioModel"], int]
_Writer = Callable[["VirtioMmioModel", int], tuple[Effect, ...]]


class VirtioMmioModel:
    """The register file of one virtio-mmio v2 device window."""

    def __init__(
        self,
        *,
        device_id: int,
        vendor_id: int,
        device_features: int,
        queue_num_max: Sequence[int],
        config: bytes,
        config_writable: bool = True,
    ) -> None:
        for name, v in (("device_id", device_id), ("vendor_id", vendor_id)):
            if not 0 <= v <= _U32:
                raise ValueError(f"{name} {v:#x} does not fit in 32 bits")
        if device_features < 0:
            raise ValueError("device_features must not be negative")
        if not device_features >> VIRTIO_F_VERSION_1 & 1:
            raise ValueError("a version 2 virtio-mmio device must offer VIRTIO_F_VERSION_1")
        unsupported = device_features & UNSUPPORTED_FEATURES
        if unsupported:
            bits = [b for b in range(unsupported.bit_length()) if unsupported >> b & 1]
            raise ValueError(f"device_features offers bits this transport cannot serve: {bits}")
        if len(queue_num_max) > _MAX_QUEUES:
            raise ValueError(f"at most {_MAX_QUEUES} queues")
        for i, n in enumerate(queue_num_max):
            if not is_valid_queue_size(n):
                raise ValueError(f"queue {i}: QueueNumMax {n} is not a power of two <= 32768")
        if len(config) > CONFIG_MAX_SIZE:
            raise ValueError(f"config space is {len(config)} bytes; at most {CONFIG_MAX_SIZE} fit")

        self._device_id = device_id
        self._vendor_id = vendor_id
        self._device_features = device_features
        # Feature words the model stores DriverFeatures for (choice 2).
        self._feature_words = max(2, (device_features.bit_length() + 31) // 32)
        self._config = bytearray(config)
        self._config_writable = config_writable
        self._config_generation = 0
        self.queues: list[QueueState] = [QueueState(num_max=n) for n in queue_num_max]
        # Shared, immutable effect tuples: the notify path allocates nothing.
        self._kick_effects: tuple[tuple[Effect, ...], ...] = tuple(
            (Kick(i),) for i in range(len(self.queues))
        )

        # Driver-visible state that a reset clears (kept in line with _reset_registers).
        self._status = 0
        self._driver_features = 0
        self._foreign_feature_words: frozenset[int] = frozenset()
        self._device_features_sel = 0
        self._driver_features_sel = 0
        self._queue_sel = 0
        self._shm_sel = 0
        self._interrupt_status = 0

        self.vring_irq_in_kernel = False
        """Set by the device while the kernel's irqfd raises used-buffer
        interrupts: InterruptStatus then always shows INT_VRING."""

    # ------------------------------------------------------------ device side

    @property
    def status(self) -> int:
        return self._status

    @property
    def driver_features(self) -> int:
        """The features the driver accepted. This is the negotiated set once
        FEATURES_OK is set (``status & DeviceStatus.FEATURES_OK``)."""
        return self._driver_features

    @property
    def device_features(self) -> int:
        return self._device_features

    @property
    def interrupt_status(self) -> int:
        return self._interrupt_status

    @property
    def config_generation(self) -> int:
        return self._config_generation

    @property
    def config(self) -> bytes:
        return bytes(self._config)

    def ready_queues(self) -> list[int]:
        return [i for i, q in enumerate(self.queues) if q.ready]

    def raise_interrupt(self, bits: int) -> bool:
        """OR ``bits`` into InterruptStatus. Return True on 0 -> non-zero,
        which is when the caller must raise the line (a fresh edge).

        INT_VRING is dropped unless DRIVER_OK is set, and everything is
        dropped while Status is 0 (choice 12).
        """
        if bits < 0 or bits & ~_INT_ALL:
            raise ValueError(f"interrupt bits {bits:#x}: only INT_VRING and INT_CONFIG exist")
        status = self._status
        if status == 0:
            return False
        if not status & _DRIVER_OK:
            bits &= ~INT_VRING
        if not bits:
            return False
        before = self._interrupt_status
        self._interrupt_status = before | bits
        return before == 0

    def update_config(self, config: bytes) -> bool:
        """Replace the config bytes. If they changed, bump ConfigGeneration and
        return True. The caller then raises INT_CONFIG if it wants to tell
        the driver."""
        if len(config) > CONFIG_MAX_SIZE:
            raise ValueError(f"config space is {len(config)} bytes; at most {CONFIG_MAX_SIZE} fit")
        if self._config == config:
            return False
        self._config = bytearray(config)
        self._config_generation = (self._config_generation + 1) & _U32
        return True

    def set_needs_reset(self) -> bool:
        """Set DEVICE_NEEDS_RESET. Return True if it was newly set, and the
        caller then raises INT_CONFIG. Does nothing while Status is 0
        (choice 13)."""
        if self._status == 0 or self._status & _NEEDS_RESET:
            return False
        self._status |= _NEEDS_RESET
        return True

    # ------------------------------------------------------------ guest side

    def read(self, offset: int, size: int) -> int:
        """A guest read at ``offset`` from the window base."""
        if size == 4:
            # The hot path: every key of the table is an aligned control
            # register, so a hit is a valid access.
            reader = _READERS.get(offset)
            if reader is not None:
                return reader(self)
        if 0 <= offset < CONFIG_OFFSET:
            self._check_control_access(offset, size, "read")
            reader = _READERS.get(offset)
            if reader is None:
                raise GuestAccessError(self._no_such_access(offset, "read"))
            return reader(self)
        start = self._check_config_access(offset, size, "read")
        return int.from_bytes(self._config[start : start + size], "little")

    def write(self, offset: int, size: int, value: int) -> tuple[Effect, ...]:
        """A guest write at ``offset`` from the window base. ``value`` is cut
        to ``size`` bytes."""
        if size == 4:
            writer = _WRITERS.get(offset)  # the hot path, as in read()
            if writer is not None:
                return writer(self, value & _U32)
        if 0 <= offset < CONFIG_OFFSET:
            self._check_control_access(offset, size, "write")
            writer = _WRITERS.get(offset)
            if writer is None:
                raise GuestAccessError(self._no_such_access(offset, "write"))
            return writer(self, value & _U32)
        start = self._check_config_access(offset, size, "write")
        if not self._config_writable:
            raise GuestAccessError(f"write to read-only config space at {offset:#x}")
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        self._config[start : start + size] = data
        return (ConfigWrite(start, data),)

    # ------------------------------------------------------------ access checks

    @staticmethod
    def _check_control_access(offset: int, size: int, kind: str) -> None:
        if size != 4 or offset & 3:
            raise GuestAccessError(
                f"{kind} of size {size} at {offset:#x}: control registers take "
                "32-bit aligned accesses only"
            )

    @staticmethod
    def _no_such_access(offset: int, kind: str) -> str:
        name = REGISTER_NAMES.get(offset)
        if name is None:
            return f"{kind} of undefined register offset {offset:#x}"
        if kind == "read":
            return f"read of write-only register {name} ({offset:#x})"
        return f"write to read-only register {name} ({offset:#x})"

    def _check_config_access(self, offset: int, size: int, kind: str) -> int:
        """Return the offset into config space, or raise."""
        if size not in _CONFIG_ACCESS_SIZES:
            raise GuestAccessError(f"config {kind} of unsupported size {size} at {offset:#x}")
        if offset % size:
            raise GuestAccessError(f"misaligned {size}-byte config {kind} at {offset:#x}")
        start = offset - CONFIG_OFFSET
        if start < 0 or start + size > len(self._config):
            raise GuestAccessError(
                f"{kind} of {size} bytes at {offset:#x} is outside the window's "
                f"{len(self._config)} bytes of config space"
            )
        return start

    # ------------------------------------------------------------ helpers

    def _selected_queue(self) -> QueueState | None:
        sel = self._queue_sel
        if sel < len(self.queues):
            return self.queues[sel]
        return None

    def _negotiated(self, bit: int) -> bool:
        return bool(self._status & _FEATURES_OK) and bool(self._driver_features >> bit & 1)

    def _features_acceptable(self) -> bool:
        drv = self._driver_features
        return (
            not self._foreign_feature_words
            and drv & ~self._device_features == 0
            and bool(drv >> VIRTIO_F_VERSION_1 & 1)
        )

    def _is_pristine(self) -> bool:
        return (
            self._status == 0
            and self._driver_features == 0
            and not self._foreign_feature_words
            and self._device_features_sel == 0
            and self._driver_features_sel == 0
            and self._queue_sel == 0
            and self._shm_sel == 0
            and self._interrupt_status == 0
            and all(q.is_pristine() for q in self.queues)
        )

    def _reset_registers(self) -> None:
        self._status = 0
        self._driver_features = 0
        self._foreign_feature_words = frozenset()
        self._device_features_sel = 0
        self._driver_features_sel = 0
        self._queue_sel = 0
        self._shm_sel = 0
        self._interrupt_status = 0
        for q in self.queues:
            q.clear()

    # ------------------------------------------------------------ register reads

    def _read_magic(self) -> int:
        return MAGIC

    def _read_version(self) -> int:
        return VERSION

    def _read_device_id(self) -> int:
        return self._device_id

    def _read_vendor_id(self) -> int:
        return self._vendor_id

    def _read_device_features(self) -> int:
        sel = self._device_features_sel
        if sel >= self._feature_words:
            return 0
        return (self._device_features >> (32 * sel)) & _U32

    def _read_queue_num_max(self) -> int:
        q = self._selected_queue()
        return 0 if q is None else q.num_max

    def _read_queue_ready(self) -> int:
        q = self._selected_queue()
        return 1 if q is not None and q.ready else 0

    def _read_interrupt_status(self) -> int:
        if self.vring_irq_in_kernel and self._status & _DRIVER_OK:
            # The kernel raises used-buffer interrupts (irqfd) without telling
            # us: say a vring interrupt may be pending, so the driver always
            # looks at its used rings (a spurious look costs nothing).
            return self._interrupt_status | INT_VRING
        return self._interrupt_status

    def _read_status(self) -> int:
        return self._status

    def _read_all_ones(self) -> int:
        return _U32

    def _read_queue_reset(self) -> int:
        # A queue reset finishes before the ioreq of its write completes
        # (choice 10), so no read can see one in progress.
        return 0

    def _read_config_generation(self) -> int:
        return self._config_generation

    # ------------------------------------------------------------ register writes

    def _write_device_features_sel(self, value: int) -> tuple[Effect, ...]:
        self._device_features_sel = value
        return _NO_EFFECTS

    def _write_driver_features_sel(self, value: int) -> tuple[Effect, ...]:
        self._driver_features_sel = value
        return _NO_EFFECTS

    def _write_driver_features(self, value: int) -> tuple[Effect, ...]:
        sel = self._driver_features_sel
        if sel < self._feature_words:
            shift = 32 * sel
            features = (self._driver_features & ~(_U32 << shift)) | (value << shift)
            foreign = self._foreign_feature_words
        else:
            features = self._driver_features
            if value:
                foreign = self._foreign_feature_words | {sel}
                if len(foreign) > _MAX_FOREIGN_FEATURE_WORDS:
                    raise GuestAccessError(
                        f"DriverFeatures: too many feature words past those offered "
                        f"(selector {sel})"
                    )
            else:
                foreign = self._foreign_feature_words - {sel}
        if features == self._driver_features and foreign == self._foreign_feature_words:
            return _NO_EFFECTS
        if self._status & _FEATURES_OK:
            raise GuestAccessError(
                f"DriverFeatures word {sel} changed to {value:#x} after FEATURES_OK"
            )
        self._driver_features = features
        self._foreign_feature_words = foreign
        return _NO_EFFECTS

    def _write_queue_sel(self, value: int) -> tuple[Effect, ...]:
        self._queue_sel = value
        return _NO_EFFECTS

    def _queue_for_setup(self, register: int) -> QueueState:
        q = self._selected_queue()
        name = REGISTER_NAMES[register]
        if q is None:
            raise GuestAccessError(f"{name} write for non-existent queue {self._queue_sel}")
        if q.ready:
            raise GuestAccessError(f"{name} write while queue {self._queue_sel} is ready")
        return q

    def _write_queue_num(self, value: int) -> tuple[Effect, ...]:
        q = self._queue_for_setup(QUEUE_NUM)
        if not 0 < value <= q.num_max:
            raise GuestAccessError(
                f"QueueNum {value} for queue {self._queue_sel}: outside 1..QueueNumMax {q.num_max}"
            )
        q.num = value
        return _NO_EFFECTS

    def _write_queue_ready(self, value: int) -> tuple[Effect, ...]:
        if value > 1:
            raise GuestAccessError(f"QueueReady takes 0 or 1, not {value:#x}")
        q = self._selected_queue()
        index = self._queue_sel
        if q is None:
            if value == 0:
                # Linux's vm_setup_vq error path does this when QueueNumMax reads 0.
                return _NO_EFFECTS
            raise GuestAccessError(f"QueueReady=1 for non-existent queue {index}")
        running = self._status & _DRIVER_OK
        if value == 0:
            if not q.ready:
                return _NO_EFFECTS
            q.ready = False
            return (QueueReset(index),) if running else _NO_EFFECTS
        if q.ready:
            return _NO_EFFECTS
        if not self._status & _FEATURES_OK:
            raise GuestAccessError(f"QueueReady=1 for queue {index} before FEATURES_OK")
        if self._status & _BROKEN:
            raise GuestAccessError(
                f"QueueReady=1 for queue {index} while status is {self._status:#x} "
                "(FAILED or DEVICE_NEEDS_RESET)"
            )
        problem = _queue_layout_problem(q, packed=self._negotiated(VIRTIO_F_RING_PACKED))
        if problem is not None:
            raise GuestAccessError(f"QueueReady=1 for queue {index} refused: {problem}")
        q.ready = True
        return (QueueEnable(index),) if running else _NO_EFFECTS

    def _write_queue_notify(self, value: int) -> tuple[Effect, ...]:
        status = self._status
        if not status & _DRIVER_OK:
            raise GuestAccessError(f"QueueNotify {value:#x} before DRIVER_OK")
        if self._driver_features >> VIRTIO_F_NOTIFICATION_DATA & 1:
            index = value & 0xFFFF
        else:
            index = value
        if index >= len(self.queues):
            raise GuestAccessError(f"QueueNotify for non-existent queue {index}")
        if not self.queues[index].ready:
            raise GuestAccessError(f"QueueNotify for queue {index}, which is not ready")
        if status & _BROKEN:
            return _NO_EFFECTS
        return self._kick_effects[index]

    def _write_interrupt_ack(self, value: int) -> tuple[Effect, ...]:
        if value & ~_INT_ALL:
            raise GuestAccessError(f"InterruptACK {value:#x} sets undefined bits")
        self._interrupt_status &= ~value
        return _ACK_EFFECTS[self._interrupt_status]

    def _write_status(self, value: int) -> tuple[Effect, ...]:
        if value == 0:
            if self._is_pristine():
                return _NO_EFFECTS
            self._reset_registers()
            return _RESET_EFFECTS
        old = self._status
        if value & ~_STATUS_DEFINED:
            raise GuestAccessError(f"Status {value:#x} sets reserved bits")
        if value & _NEEDS_RESET and not old & _NEEDS_RESET:
            raise GuestAccessError("the driver may not set DEVICE_NEEDS_RESET")
        new = (value & ~_NEEDS_RESET) | (old & _NEEDS_RESET)
        cleared = old & ~new
        if cleared:
            raise GuestAccessError(
                f"Status {value:#x} clears {cleared:#x}; only a reset (0) clears status bits"
            )
        added = new & ~old
        if not added:
            return _NO_EFFECTS
        if added & (_FEATURES_OK | _DRIVER_OK) and new & _BROKEN:
            raise GuestAccessError(
                f"Status {value:#x}: FEATURES_OK/DRIVER_OK while FAILED or DEVICE_NEEDS_RESET"
            )
        if added & _FEATURES_OK and not self._features_acceptable():
            # Refuse the features: FEATURES_OK does not stick (choice 3).
            new &= ~_FEATURES_OK
            added &= ~_FEATURES_OK
        if new & _DRIVER and not new & _ACK:
            raise GuestAccessError(f"Status {value:#x}: DRIVER without ACKNOWLEDGE")
        if new & _FEATURES_OK and not new & _DRIVER:
            raise GuestAccessError(f"Status {value:#x}: FEATURES_OK without DRIVER")
        if new & _DRIVER_OK and not new & _FEATURES_OK:
            raise GuestAccessError(f"Status {value:#x}: DRIVER_OK without FEATURES_OK")
        self._status = new
        if added & _DRIVER_OK:
            return _DRIVER_OK_EFFECTS
        return _NO_EFFECTS

    def _write_address_half(self, register: int, field: str, high: bool, value: int) -> None:
        q = self._queue_for_setup(register)
        current = getattr(q, field)
        if high:
            setattr(q, field, (current & _U32) | (value << 32))
        else:
            setattr(q, field, (current & ~_U32 & _U64) | value)

    def _write_desc_low(self, value: int) -> tuple[Effect, ...]:
        self._write_address_half(QUEUE_DESC_LOW, "desc", False, value)
        return _NO_EFFECTS

    def _write_desc_high(self, value: int) -> tuple[Effect, ...]:
        self._write_address_half(QUEUE_DESC_HIGH, "desc", True, value)
        return _NO_EFFECTS

    def _write_driver_low(self, value: int) -> tuple[Effect, ...]:
        self._write_address_half(QUEUE_DRIVER_LOW, "driver", False, value)
        return _NO_EFFECTS

    def _write_driver_high(self, value: int) -> tuple[Effect, ...]:
        self._write_address_half(QUEUE_DRIVER_HIGH, "driver", True, value)
        return _NO_EFFECTS

    def _write_device_low(self, value: int) -> tuple[Effect, ...]:
        self._write_address_half(QUEUE_DEVICE_LOW, "device", False, value)
        return _NO_EFFECTS

    def _write_device_high(self, value: int) -> tuple[Effect, ...]:
        self._write_address_half(QUEUE_DEVICE_HIGH, "device", True, value)
        return _NO_EFFECTS

    def _write_shm_sel(self, value: int) -> tuple[Effect, ...]:
        self._shm_sel = value
        return _NO_EFFECTS

    def _write_queue_reset(self, value: int) -> tuple[Effect, ...]:
        if not self._negotiated(VIRTIO_F_RING_RESET):
            raise GuestAccessError("QueueReset written but VIRTIO_F_RING_RESET was not negotiated")
        if value > 1:
            raise GuestAccessError(f"QueueReset takes 0 or 1, not {value:#x}")
        q = self._selected_queue()
        index = self._queue_sel
        if q is None:
            raise GuestAccessError(f"QueueReset write for non-existent queue {index}")
        if value == 0:
            return _NO_EFFECTS
        q.clear()
        return (QueueReset(index),) if self._status & _DRIVER_OK else _NO_EFFECTS


_READERS: dict[int, _Reader] = {
    MAGIC_VALUE: VirtioMmioModel._read_magic,
    VERSION_REG: VirtioMmioModel._read_version,
    DEVICE_ID: VirtioMmioModel._read_device_id,
    VENDOR_ID: VirtioMmioModel._read_vendor_id,
    DEVICE_FEATURES: VirtioMmioModel._read_device_features,
    QUEUE_NUM_MAX: VirtioMmioModel._read_queue_num_max,
    QUEUE_READY: VirtioMmioModel._read_queue_ready,
    INTERRUPT_STATUS: VirtioMmioModel._read_interrupt_status,
    STATUS: VirtioMmioModel._read_status,
    SHM_LEN_LOW: VirtioMmioModel._read_all_ones,
    SHM_LEN_HIGH: VirtioMmioModel._read_all_ones,
    SHM_BASE_LOW: VirtioMmioModel._read_all_ones,
    SHM_BASE_HIGH: VirtioMmioModel._read_all_ones,
    QUEUE_RESET: VirtioMmioModel._read_queue_reset,
    CONFIG_GENERATION: VirtioMmioModel._read_config_generation,
}

_WRITERS: dict[int, _Writer] = {
    DEVICE_FEATURES_SEL: VirtioMmioModel._write_device_features_sel,
    DRIVER_FEATURES: VirtioMmioModel._write_driver_features,
    DRIVER_FEATURES_SEL: VirtioMmioModel._write_driver_features_sel,
    QUEUE_SEL: VirtioMmioModel._write_queue_sel,
    QUEUE_NUM: VirtioMmioModel._write_queue_num,
    QUEUE_READY: VirtioMmioModel._write_queue_ready,
    QUEUE_NOTIFY: VirtioMmioModel._write_queue_notify,
    INTERRUPT_ACK: VirtioMmioModel._write_interrupt_ack,
    STATUS: VirtioMmioModel._write_status,
    QUEUE_DESC_LOW: VirtioMmioModel._write_desc_low,
    QUEUE_DESC_HIGH: VirtioMmioModel._write_desc_high,
    QUEUE_DRIVER_LOW: VirtioMmioModel._write_driver_low,
    QUEUE_DRIVER_HIGH: VirtioMmioModel._write_driver_high,
    QUEUE_DEVICE_LOW: VirtioMmioModel._write_device_low,
    QUEUE_DEVICE_HIGH: VirtioMmioModel._write_device_high,
    SHM_SEL: VirtioMmioModel._write_shm_sel,
    QUEUE_RESET: VirtioMmioModel._write_queue_reset,
}

# read() and write() take a table hit of a 4-byte access as valid.
assert all(0 <= offset < CONFIG_OFFSET and not offset & 3 for offset in (*_READERS, *_WRITERS))
