"""A hostile guest (issue 7 item 3): hypothesis-generated MMIO access
sequences at three levels.

1. The register model alone (``VirtioMmioModel``), as a hypothesis state
   machine. Every access is also put to :class:`SpecDevice`, a second,
   deliberately plain reading of virtio 1.2 section 4.2 and of the model's
   numbered choices: the model must accept exactly what it accepts, answer
   the same values and produce the same effects. After every step
   :func:`check_consistent` checks the 4.2 rules against what the driver
   actually did (a ledger kept by the test, not by either device).
2. The IOREQ server in front of the model, with hostile ioreq slots (any
   type, size, count, data_is_ptr): every slot is completed, and only
   well-formed MMIO reaches the model. Plus the x86-only ioreqs: rep and
   data_is_ptr writes, PIO and PCI config are refused and touch nothing;
   buffered ioreqs are never asked for, and a buffered page is not read.
3. The whole bridge (real qemu-storage-daemon, simulator and bridge
   processes): random accesses from the simulated guest's vCPUs all return
   or fault, the bridge survives, and a normal driver still does I/O that
   lands on the image.
"""

from __future__ import annotations

import copy
import itertools
import mmap
import os
import shutil
import tempfile

import attrs
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from bridge import virtio_mmio as vm
from bridge.testbed import BlkTestbed
from bridge.virtio_mmio import (
    ConfigWrite,
    DriverOk,
    GuestAccessError,
    InterruptAck,
    Kick,
    QueueEnable,
    QueueReset,
    Reset,
    VirtioMmioModel,
)
from tests.e2e_helpers import assert_on_image, open_blk
from tests.test_ioreq_server import BASE, LOCAL_PORT_BASE, FakeXen
from xen import abi
from xen.hypervisor import IoreqPages
from xen.ioreq_server import IoreqServer, MmioRouter
from xen.sim.guest import GuestAccessFault, SimGuest

U32 = 0xFFFF_FFFF
ACK, DRIVER, DRIVER_OK, FEATURES_OK, NEEDS_RESET, FAILED = 1, 2, 4, 8, 0x40, 0x80
BROKEN = NEEDS_RESET | FAILED
INT_VRING, INT_CONFIG = 1, 2

F_INDIRECT = 1 << 28
F_EVENT_IDX = 1 << 29
F_VERSION_1 = 1 << 32
F_RING_PACKED = 1 << 34
F_NOTIFICATION_DATA = 1 << 38
F_RING_RESET = 1 << 40
F_HIGH = 1 << 70  # a made-up device feature in word 2, so that word exists
BIT_RING_PACKED, BIT_NOTIFICATION_DATA, BIT_RING_RESET = 34, 38, 40

RAM = 0x4000_0000  # GUEST_RAM0_BASE on Xen/Arm

# Register classes, written out from the table in virtio 1.2 4.2.2 (not
# taken from the module under test).
READ_ONLY = {0x000, 0x004, 0x008, 0x00C, 0x010, 0x034, 0x060, 0x0B0, 0x0B4, 0x0B8, 0x0BC, 0x0FC}
WRITE_ONLY = {0x014, 0x020, 0x024, 0x030, 0x038, 0x050, 0x064, 0x080, 0x084, 0x090, 0x094, 0x0A0, 0x0A4, 0x0AC}
READ_WRITE = {0x044, 0x070, 0x0C0}
READABLE = READ_ONLY | READ_WRITE
WRITABLE = WRITE_ONLY | READ_WRITE
ADDRESS_REGS = {0x080: ("desc", False), 0x084: ("desc", True), 0x090: ("driver", False),
                0x094: ("driver", True), 0x0A0: ("device", False), 0x0A4: ("device", True)}


class Refused(Exception):
    """SpecDevice's verdict: the specification (or a documented choice)
    forbids this access."""


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class SpecDevice:
    """What a virtio-mmio v2 device must do, written as plainly as possible
    from virtio 1.2 section 4.2 and the choices in bridge/virtio_mmio.py's
    docstring. Same read/write interface as the model; a refused access
    raises :class:`Refused` and may leave this object half-changed (the
    caller works on a copy)."""

    def __init__(self, *, device_id, vendor_id, device_features, queue_num_max, config, config_writable):
        self.device_id = device_id
        self.vendor_id = vendor_id
        self.offered = device_features
        self.words = max(2, -(-device_features.bit_length() // 32))
        self.num_max = list(queue_num_max)
        self.config = bytearray(config)
        self.writable = config_writable
        self.generation = 0
        self.vring_irq_in_kernel = False
        self._reset_state()

    def _reset_state(self):
        self.status = 0
        self.accepted = {}  # feature word -> value, words the device has
        self.foreign = set()  # words past those with a non-zero value
        self.dev_sel = self.drv_sel = self.queue_sel = self.shm_sel = 0
        self.isr = 0
        self.queues = [dict(num=0, desc=0, driver=0, device=0, ready=False) for _ in self.num_max]

    def clone(self) -> "SpecDevice":
        c = copy.copy(self)
        c.config = bytearray(self.config)
        c.accepted = dict(self.accepted)
        c.foreign = set(self.foreign)
        c.queues = [dict(q) for q in self.queues]
        return c

    def pristine(self) -> bool:
        return (self.status == 0 and not any(self.accepted.values()) and not self.foreign
                and self.dev_sel == self.drv_sel == self.queue_sel == self.shm_sel == self.isr == 0
                and all(q == dict(num=0, desc=0, driver=0, device=0, ready=False) for q in self.queues))

    @property
    def driver_features(self) -> int:
        return sum(v << (32 * w) for w, v in self.accepted.items())

    def negotiated(self, bit: int) -> bool:
        return bool(self.status & FEATURES_OK and self.driver_features >> bit & 1)

    def features_ok_possible(self) -> bool:
        f = self.driver_features
        return not self.foreign and f & ~self.offered == 0 and bool(f & F_VERSION_1)

    def queue(self):
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def layout_sane(self, q) -> bool:
        num = q["num"]
        if self.negotiated(BIT_RING_PACKED):
            if not 0 < num <= 1 << 15:
                return False
            areas = ((q["desc"], 16, 16 * num), (q["driver"], 4, 4), (q["device"], 4, 4))
        else:
            if not _power_of_two(num):
                return False
            areas = ((q["desc"], 16, 16 * num), (q["driver"], 2, 6 + 2 * num), (q["device"], 4, 6 + 8 * num))
        return all(addr != 0 and addr % align == 0 and addr + size <= 1 << 64 for addr, align, size in areas)

    # --- guest side

    def _config_start(self, offset, size):
        if size not in (1, 2, 4, 8) or offset % size:
            raise Refused("config access size or alignment")
        start = offset - 0x100
        if start < 0 or start + size > len(self.config):
            raise Refused("outside config space")
        return start

    def read(self, offset: int, size: int) -> int:
        if 0 <= offset < 0x100:
            if size != 4 or offset % 4 or offset not in READABLE:
                raise Refused("control read")
            q = self.queue()
            if offset == 0x000:
                return 0x74726976
            if offset == 0x004:
                return 2
            if offset == 0x008:
                return self.device_id
            if offset == 0x00C:
                return self.vendor_id
            if offset == 0x010:
                return self.offered >> (32 * self.dev_sel) & U32
            if offset == 0x034:
                return q and self.num_max[self.queue_sel] or 0
            if offset == 0x044:
                return int(bool(q and q["ready"]))
            if offset == 0x060:
                shown = INT_VRING if self.vring_irq_in_kernel and self.status & DRIVER_OK else 0
                return self.isr | shown
            if offset == 0x070:
                return self.status
            if 0x0B0 <= offset <= 0x0BC:
                return U32  # no shared memory regions
            if offset == 0x0C0:
                return 0
            return self.generation  # 0x0FC
        start = self._config_start(offset, size)
        return int.from_bytes(self.config[start:start + size], "little")

    def write(self, offset: int, size: int, value: int) -> tuple:
        if not 0 <= offset < 0x100:
            start = self._config_start(offset, size)
            if not self.writable:
                raise Refused("read-only config")
            data = (value % (1 << (8 * size))).to_bytes(size, "little")
            self.config[start:start + size] = data
            return (ConfigWrite(start, data),)
        if size != 4 or offset % 4 or offset not in WRITABLE:
            raise Refused("control write")
        v = value & U32
        q = self.queue()
        running = bool(self.status & DRIVER_OK)
        if offset == 0x014:
            self.dev_sel = v
        elif offset == 0x024:
            self.drv_sel = v
        elif offset == 0x030:
            self.queue_sel = v
        elif offset == 0x0AC:
            self.shm_sel = v
        elif offset == 0x020:
            return self._write_driver_features(v)
        elif offset == 0x038:
            if q is None or q["ready"] or not 1 <= v <= self.num_max[self.queue_sel]:
                raise Refused("QueueNum")
            q["num"] = v
        elif offset in ADDRESS_REGS:
            if q is None or q["ready"]:
                raise Refused("queue address while absent or ready")
            field, high = ADDRESS_REGS[offset]
            low32, high32 = q[field] & U32, q[field] >> 32
            q[field] = (high32 << 32 | v) if not high else (v << 32 | low32)
        elif offset == 0x044:
            if v > 1:
                raise Refused("QueueReady value")
            if q is None:
                if v:
                    raise Refused("QueueReady=1 for no queue")
                return ()
            if v == 0:
                was = q["ready"]
                q["ready"] = False
                return (QueueReset(self.queue_sel),) if was and running else ()
            if q["ready"]:
                return ()
            if not self.status & FEATURES_OK or self.status & BROKEN or not self.layout_sane(q):
                raise Refused("QueueReady=1")
            q["ready"] = True
            return (QueueEnable(self.queue_sel),) if running else ()
        elif offset == 0x050:
            index = v & 0xFFFF if self.negotiated(BIT_NOTIFICATION_DATA) else v
            if not running or index >= len(self.queues) or not self.queues[index]["ready"]:
                raise Refused("QueueNotify")
            return () if self.status & BROKEN else (Kick(index),)
        elif offset == 0x064:
            if v & ~3:
                raise Refused("InterruptACK undefined bits")
            self.isr &= ~v
            return (InterruptAck(self.isr),)
        elif offset == 0x070:
            return self._write_status(v)
        elif offset == 0x0C0:
            if not self.negotiated(BIT_RING_RESET) or v > 1 or q is None:
                raise Refused("QueueReset")
            if v:
                q.update(num=0, desc=0, driver=0, device=0, ready=False)
                return (QueueReset(self.queue_sel),) if running else ()
        return ()

    def _write_driver_features(self, v):
        w = self.drv_sel
        if w < self.words:
            changed = self.accepted.get(w, 0) != v
            new_foreign = self.foreign
        else:
            new_foreign = self.foreign | {w} if v else self.foreign - {w}
            changed = new_foreign != self.foreign
            if len(new_foreign) > 16:
                raise Refused("too many foreign feature words")
        if changed and self.status & FEATURES_OK:
            raise Refused("features frozen by FEATURES_OK")
        if w < self.words:
            self.accepted[w] = v
        self.foreign = set(new_foreign)
        return ()

    def _write_status(self, v):
        if v == 0:
            if self.pristine():
                return ()
            self._reset_state()
            return (Reset(),)
        old = self.status
        if v & ~0xCF:
            raise Refused("reserved status bits")
        if v & NEEDS_RESET and not old & NEEDS_RESET:
            raise Refused("driver sets DEVICE_NEEDS_RESET")
        new = v & ~NEEDS_RESET | old & NEEDS_RESET
        if old & ~new:
            raise Refused("status bits cleared without a reset")
        gained = new & ~old
        if gained & (FEATURES_OK | DRIVER_OK) and new & BROKEN:
            raise Refused("progress on a failed or broken device")
        if gained & FEATURES_OK and not self.features_ok_possible():
            new &= ~FEATURES_OK
        if (new & DRIVER and not new & ACK or new & FEATURES_OK and not new & DRIVER
                or new & DRIVER_OK and not new & FEATURES_OK):
            raise Refused("status order")
        self.status = new
        return (DriverOk(),) if new & DRIVER_OK and not old & DRIVER_OK else ()

    # --- device side

    def raise_interrupt(self, bits: int) -> bool:
        if self.status == 0:
            return False
        if not self.status & DRIVER_OK:
            bits &= ~INT_VRING
        edge = bits != 0 and self.isr == 0
        self.isr |= bits
        return edge

    def set_needs_reset(self) -> bool:
        if self.status == 0 or self.status & NEEDS_RESET:
            return False
        self.status |= NEEDS_RESET
        return True

    def update_config(self, data: bytes) -> bool:
        if bytes(self.config) == data:
            return False
        self.config = bytearray(data)
        self.generation = (self.generation + 1) & U32
        return True


def device_args(features: int, queues: tuple[int, ...], config: bytes, writable: bool) -> dict:
    return dict(device_id=2, vendor_id=0x554D4551, device_features=features, queue_num_max=queues,
                config=config, config_writable=writable)


def guest_view(dev, nr_queues: int, feature_words: int) -> dict:
    """Everything the guest can read back, taken from a copy so that moving
    the selectors disturbs nothing; plus the write-only state the device
    side sees (``driver_features``, each queue's registers)."""
    # Selector writes only rebind ints, so a shallow copy keeps them off
    # ``dev`` (were that ever not so, the views would stop matching).
    c = dev.clone() if isinstance(dev, SpecDevice) else copy.copy(dev)
    view = {off: c.read(off, 4) for off in sorted(READABLE)}  # at the current selectors
    for sel in range(feature_words + 2):
        c.write(0x014, 4, sel)
        view[f"DeviceFeatures[{sel}]"] = c.read(0x010, 4)
    for sel in [*range(nr_queues + 1), U32]:
        c.write(0x030, 4, sel)
        view[f"queue[{sel}]"] = (c.read(0x034, 4), c.read(0x044, 4), c.read(0x0C0, 4))
    view["config"] = bytes(dev.config)
    view["driver_features"] = dev.driver_features
    view["queues"] = [
        (q.num, q.desc, q.driver, q.device, q.ready) if hasattr(q, "num")
        else (q["num"], q["desc"], q["driver"], q["device"], q["ready"])
        for q in dev.queues
    ]
    return view


def state_of(m: VirtioMmioModel) -> dict:
    """Everything the model holds, as values (a cheaper deepcopy)."""
    state = {}
    for name, value in vars(m).items():
        if name == "queues":
            value = [attrs.astuple(q) for q in value]
        elif isinstance(value, bytearray):
            value = bytes(value)
        elif isinstance(value, (list, dict, set)):
            value = copy.deepcopy(value)
        state[name] = value
    return state


# ------------------------------------------------------------------ strategies

STATUS_VALUES = [0, ACK, ACK | DRIVER, ACK | DRIVER | FEATURES_OK, ACK | DRIVER | FEATURES_OK | DRIVER_OK,
                 DRIVER, FEATURES_OK, DRIVER_OK, ACK | DRIVER_OK, ACK | DRIVER | DRIVER_OK, FAILED,
                 ACK | FAILED, ACK | DRIVER | FEATURES_OK | FAILED, NEEDS_RESET, ACK | NEEDS_RESET, 0x10,
                 0x20, 0x100, 0xFF, 0xCF, U32]
ADDRESS_LOWS = [0, RAM, RAM + 0x1000, RAM + 0x2000, RAM + 2, RAM + 4, RAM + 8, RAM + 1, 0x1000, 0xFFFF_FFF0, U32]
ADDRESS_HIGHS = [0, 0, 1, 0xFFFF_FFFF, 0x8000_0000]
QUEUE_NUMS = [0, 1, 2, 3, 8, 100, 128, 255, 256, 512, 1 << 15, 1 << 16, U32]

device_configs = st.fixed_dictionaries(dict(
    features=st.builds(
        lambda extra: F_VERSION_1 | F_INDIRECT | F_EVENT_IDX | 1 << 9 | extra,
        st.sampled_from([0, F_RING_RESET, F_RING_PACKED, F_NOTIFICATION_DATA, F_HIGH,
                         F_RING_RESET | F_RING_PACKED | F_NOTIFICATION_DATA]),
    ),
    queues=st.sampled_from([(256, 128), (4,), (1, 2, 1 << 15), ()]),
    config=st.sampled_from([0, 1, 8, 60, 0x100]).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
    writable=st.booleans(),
))

any_offset = st.one_of(
    st.integers(-8, 0x208),
    st.sampled_from(sorted(READABLE | WRITABLE)),
    st.integers(0x100, 0x1FF),
    st.sampled_from([-(1 << 40), 1 << 40]),
)
any_size = st.one_of(st.sampled_from([1, 2, 4, 8]), st.just(4), st.sampled_from([0, 3, 16, -1]))
any_value = st.one_of(
    st.sampled_from(STATUS_VALUES + ADDRESS_LOWS + QUEUE_NUMS),
    st.integers(0, (1 << 64) - 1),
    st.integers(-(1 << 64), -1),
)
feature_words = st.integers(0, 3) | st.integers(4, 40)
feature_values = st.one_of(
    st.sampled_from([0, 1, 1 << 2, 1 << 6, 1 << 7, U32, (F_INDIRECT | F_EVENT_IDX | 1 << 9), 1 << 30, 1 << 5 | 1]),
    st.integers(0, U32),
)
register_writes = st.one_of(
    st.tuples(st.just(0x070), st.sampled_from(STATUS_VALUES) | st.integers(0, 0x1FF)),
    st.tuples(st.just(0x014), feature_words),
    st.tuples(st.just(0x024), feature_words),
    st.tuples(st.just(0x020), feature_values),
    st.tuples(st.just(0x030), st.sampled_from([0, 1, 2, 3, U32])),
    st.tuples(st.just(0x038), st.sampled_from(QUEUE_NUMS)),
    st.tuples(st.sampled_from([0x080, 0x090, 0x0A0]), st.sampled_from(ADDRESS_LOWS)),
    st.tuples(st.sampled_from([0x084, 0x094, 0x0A4]), st.sampled_from(ADDRESS_HIGHS)),
    st.tuples(st.just(0x044), st.sampled_from([0, 1, 1, 2, U32])),
    st.tuples(st.just(0x050), st.sampled_from([0, 1, 2, 3, 0x1_0000, 0x5_0001, U32])),
    st.tuples(st.just(0x064), st.sampled_from([0, 1, 2, 3, 4, 0x100, U32])),
    st.tuples(st.just(0x0C0), st.sampled_from([0, 1, 2])),
    st.tuples(st.just(0x0AC), st.sampled_from([0, 1, U32])),
)


# ------------------------------------------------------------------ level 1: the register model


class HostileGuestMachine(RuleBasedStateMachine):
    """A guest that does anything, against the model and SpecDevice side by
    side, with the test's own ledger of what the driver did."""

    @initialize(dev=device_configs)
    def build(self, dev):
        args = device_args(dev["features"], dev["queues"], dev["config"], dev["writable"])
        self.args = args
        self.m = VirtioMmioModel(**args)
        self.spec = SpecDevice(**args)
        self.nr_queues = len(dev["queues"])
        self.feature_words = max(2, -(-dev["features"].bit_length() // 32))
        self._forget_driver()
        self.needs_reset_by_device = False

    def _forget_driver(self):
        """The ledger: what the driver wrote since its last reset."""
        self.status_bits_written = 0
        self.features_written: dict[int, int] = {}
        self.queues_written: dict[int, dict] = {}
        self.drv_sel = self.queue_sel = 0

    # --- one access, checked three ways

    def access(self, kind: str, offset: int, size: int, value: int = 0):
        m = self.m
        before = state_of(m)
        old_status, old_generation = m.status, m.config_generation
        resetting = kind == "write" and offset == 0x070 and size == 4 and value & U32 == 0
        old_view = guest_view(m, self.nr_queues, self.feature_words) if resetting else None
        trial = self.spec.clone()
        try:
            expected = trial.read(offset, size) if kind == "read" else trial.write(offset, size, value)
        except Refused:
            expected = Refused
        try:
            got = m.read(offset, size) if kind == "read" else m.write(offset, size, value)
        except GuestAccessError:
            got = Refused
        # (Anything other than GuestAccessError escapes and fails the test.)
        what = f"{kind} {offset:#x}/{size} {value:#x}"
        assert got == expected, f"{what}: model {got!r}, specification {expected!r}"
        assert m.config_generation == old_generation, f"{what} moved ConfigGeneration"
        if got is Refused:
            assert state_of(m) == before, f"{what} was refused but changed the model"
            return Refused
        self.spec = trial
        if kind == "read":
            assert 0 <= got < 1 << (8 * size)
            assert state_of(m) == before, f"{what}: a read changed the model"
            assert size == 4 and offset in READABLE or offset >= 0x100
        else:
            self._after_write(offset, size, value & U32, got, old_status, old_view)
        return got

    def _after_write(self, offset, size, v, effects, old_status, old_view):
        """Per-register rules for an accepted write, and the ledger."""
        m = self.m
        if offset >= 0x100:
            assert self.args["config_writable"] and offset - 0x100 + size <= len(self.args["config"])
            return
        assert size == 4 and offset % 4 == 0 and offset in WRITABLE
        if offset == 0x070:
            if v == 0:
                self._check_reset(old_view, effects)
                self._forget_driver()
                self.needs_reset_by_device = False
                return
            assert old_status & ~NEEDS_RESET & ~m.status == 0, "Status went backwards without a reset"
            assert (DriverOk() in effects) == bool(m.status & DRIVER_OK and not old_status & DRIVER_OK)
            self.status_bits_written |= v
        elif offset == 0x024:
            self.drv_sel = v
        elif offset == 0x030:
            self.queue_sel = v
        elif offset == 0x020:
            self.features_written[self.drv_sel] = v
        elif offset == 0x038:
            assert 1 <= v <= self.args["queue_num_max"][self.queue_sel]
            self.queues_written.setdefault(self.queue_sel, {})["num"] = v
        elif offset in ADDRESS_REGS:
            field, high = ADDRESS_REGS[offset]
            q = self.queues_written.setdefault(self.queue_sel, {})
            q[field + ("_high" if high else "_low")] = v
        elif offset == 0x050:
            index = v & 0xFFFF if m.driver_features & F_NOTIFICATION_DATA else v
            assert m.status & DRIVER_OK and index < self.nr_queues and m.queues[index].ready
            assert effects == (() if m.status & BROKEN else (Kick(index),))
        elif offset == 0x064:
            assert v & ~3 == 0 and effects == (InterruptAck(m.interrupt_status),)
        elif offset == 0x0C0 and v == 1:
            self.queues_written.pop(self.queue_sel, None)

    def _check_reset(self, old_view, effects):
        """Status 0: everything readable is back at its reset value, the
        config and its generation stay, and Reset is reported only if
        something had to be undone."""
        m = self.m
        fresh = VirtioMmioModel(**{**self.args, "config": m.config})
        now = guest_view(m, self.nr_queues, self.feature_words)
        reset = guest_view(fresh, self.nr_queues, self.feature_words)
        generation = vm.CONFIG_GENERATION
        assert now[generation] == old_view[generation]
        reset[generation] = now[generation]
        assert now == reset
        # DriverFeaturesSel is write-only: a DriverFeatures write shows where it points.
        probe = copy.deepcopy(m)
        probe.write(0x020, 4, 0x1234)
        assert probe.driver_features == 0x1234
        # (Reset for a device that differed only in a write-only selector is
        # the specification comparison's business.)
        assert effects in ((), (Reset(),))
        if old_view != now:
            assert effects == (Reset(),)

    # --- rules: anything at all

    @rule(kind=st.sampled_from(["read", "write"]), offset=any_offset, size=any_size, value=any_value)
    def raw(self, kind, offset, size, value):
        self.access(kind, offset, size, value)

    @rule(reg_value=register_writes)
    def register_write(self, reg_value):
        self.access("write", reg_value[0], 4, reg_value[1])

    @rule(offset=st.sampled_from(sorted(READABLE | WRITABLE)))
    def register_read(self, offset):
        self.access("read", offset, 4)

    @rule(data=st.data())
    def config_access(self, data):
        size = data.draw(st.sampled_from([1, 2, 4, 8]))
        inside = max(0, len(self.m.config) // size - 1)
        offset = 0x100 + size * data.draw(st.integers(0, inside) | st.integers(0, 0x100 // size - 1))
        if data.draw(st.booleans()):
            self.access("read", offset, size)
        else:
            self.access("write", offset, size, data.draw(any_value))

    # --- rules: a Linux-like driver, so that runs get deep into the protocol

    def add_status(self, bit):
        status = self.access("read", 0x070, 4)
        self.access("write", 0x070, 4, status | bit)

    def _negotiate(self, wanted: int, start_over: bool = True):
        if start_over:
            self.access("write", 0x070, 4, 0)
        self.add_status(ACK)
        self.add_status(DRIVER)
        for word in (1, 0):
            self.access("write", 0x014, 4, word)
            self.access("read", 0x010, 4)
        for word in range(max(2, -(-wanted.bit_length() // 32)) - 1, -1, -1):
            self.access("write", 0x024, 4, word)
            self.access("write", 0x020, 4, wanted >> (32 * word) & U32)
        self.add_status(FEATURES_OK)

    def _setup_queue(self, index, num, base, gap):
        self.access("write", 0x030, 4, index)
        self.access("read", 0x044, 4)
        num_max = self.access("read", 0x034, 4)
        self.access("write", 0x038, 4, min(num, num_max) if num_max else num)
        for i, low in enumerate((0x080, 0x090, 0x0A0)):
            addr = (base + i * gap * 16) % (1 << 64)
            self.access("write", low, 4, addr & U32)
            self.access("write", low + 4, 4, addr >> 32)
        self.access("write", 0x044, 4, 1)

    @rule(extra=st.sampled_from([0, F_RING_RESET, F_RING_PACKED, F_NOTIFICATION_DATA, F_RING_RESET | F_RING_PACKED]),
          num=st.sampled_from([1, 2, 4, 8, 256, 1 << 15]))
    def linux_probe(self, extra, num):
        """A well-behaved driver up to DRIVER_OK, so that the hostile steps
        that follow find a running device."""
        offered = self.args["device_features"]
        self._negotiate(offered & ~(F_RING_RESET | F_RING_PACKED | F_NOTIFICATION_DATA) | offered & extra)
        for index in range(self.nr_queues):
            self._setup_queue(index, num, RAM + index * 0x10_0000, 0x1000)
        self.add_status(DRIVER_OK)

    @rule(extra=st.sampled_from([0, F_RING_RESET, F_RING_PACKED, F_NOTIFICATION_DATA, 1 << 33, 1 << 40 | 1 << 34,
                                 F_HIGH, 1 << 96]),
          drop_version=st.booleans(), start_over=st.booleans())
    def negotiate(self, extra, drop_version, start_over):
        """Feature negotiation with features that may not have been offered."""
        wanted = (self.args["device_features"] & ~(F_RING_RESET | F_RING_PACKED | F_NOTIFICATION_DATA)) | extra
        if drop_version:
            wanted &= ~F_VERSION_1
        self._negotiate(wanted, start_over)

    @rule(index=st.integers(0, 3), num=st.sampled_from(QUEUE_NUMS[1:10]),
          base=st.sampled_from([RAM, RAM + 0x10_0000, RAM + 8, 0xFFFF_FFFF_FFFF_F000, 0x1000]),
          gap=st.sampled_from([0x1000, 0x800, 2, 1]))
    def setup_queue(self, index, num, base, gap):
        """Linux's vm_setup_vq with sizes and addresses of any kind."""
        self._setup_queue(index, num, base, gap)

    @rule(index=st.integers(0, 3), how=st.sampled_from(["QueueReady", "QueueReset"]), num=st.sampled_from([2, 3, 4]))
    def restart_queue(self, index, how, num):
        """Stop one queue (QueueReady 0, or a ring reset) and set it up
        again, on a device that may be running."""
        self.access("write", 0x030, 4, index)
        self.access("write", 0x044 if how == "QueueReady" else 0x0C0, 4, 0 if how == "QueueReady" else 1)
        self.access("read", 0x044, 4)
        self._setup_queue(index, num, RAM + 0x80_0000 + index * 0x1_0000, 0x100)

    @rule()
    def driver_ok(self):
        self.add_status(DRIVER_OK)

    @rule()
    def interrupt_handler(self):
        self.access("write", 0x064, 4, self.access("read", 0x060, 4))

    @rule(queue=st.integers(0, 3))
    def notify(self, queue):
        self.access("write", 0x050, 4, queue)

    # --- rules: the device side

    @rule(bits=st.integers(0, 3))
    def device_interrupt(self, bits):
        had = self.m.interrupt_status
        edge = self.m.raise_interrupt(bits)
        assert edge == self.spec.raise_interrupt(bits)
        assert edge == (had == 0 and self.m.interrupt_status != 0)

    @rule()
    def device_needs_reset(self):
        newly = self.m.set_needs_reset()
        assert newly == self.spec.set_needs_reset()
        self.needs_reset_by_device |= newly

    @rule(data=st.data())
    def device_config_change(self, data):
        old = self.m.config
        new = data.draw(st.one_of(st.just(old), st.binary(min_size=len(old), max_size=len(old))))
        generation = self.m.config_generation
        changed = self.m.update_config(new)
        assert changed == self.spec.update_config(new) == (new != old)
        assert self.m.config_generation == (generation + changed) & U32

    @rule()
    def toggle_kernel_irqs(self):
        self.m.vring_irq_in_kernel = self.spec.vring_irq_in_kernel = not self.m.vring_irq_in_kernel

    # --- after every step

    @invariant()
    def same_as_the_specification(self):
        if hasattr(self, "m"):
            assert guest_view(self.m, self.nr_queues, self.feature_words) == guest_view(
                self.spec, self.nr_queues, self.feature_words)

    @invariant()
    def consistent_with_section_4_2(self):
        if hasattr(self, "m"):
            check_consistent(self)


def check_consistent(t: HostileGuestMachine) -> None:
    """The 4.2 rules and the model's choices, against the driver's ledger."""
    m = t.m
    s = m.read(vm.STATUS, 4)
    assert s & ~0xCF == 0
    # Only bits the driver set, in a legal order; DEVICE_NEEDS_RESET only from the device.
    assert s & ~NEEDS_RESET & ~t.status_bits_written == 0
    assert not s & NEEDS_RESET or t.needs_reset_by_device
    assert not s & DRIVER or s & ACK
    assert not s & FEATURES_OK or s & DRIVER
    assert not s & DRIVER_OK or s & FEATURES_OK
    offered = t.args["device_features"]
    if s & FEATURES_OK:
        # Every word the driver wrote is a subset of what was offered, and VERSION_1 is in.
        for word, value in t.features_written.items():
            assert value & ~(offered >> (32 * word)) & U32 == 0, (word, value)
        assert t.features_written.get(1, 0) & 1
    assert m.driver_features == sum(v << 32 * w for w, v in t.features_written.items() if w < t.feature_words)
    # Interrupts: defined bits only, none while reset, vring ones only once running.
    isr = m.read(vm.INTERRUPT_STATUS, 4)
    assert isr & ~3 == 0
    assert m.interrupt_status & ~3 == 0
    if s == 0:
        assert isr == 0
    if isr & INT_VRING:
        assert s & DRIVER_OK
    packed = bool(s & FEATURES_OK and m.driver_features & F_RING_PACKED)
    for index, q in enumerate(m.queues):
        written = t.queues_written.get(index, {})
        assert q.num == written.get("num", 0)
        for field in ("desc", "driver", "device"):
            addr = written.get(field + "_high", 0) << 32 | written.get(field + "_low", 0)
            assert getattr(q, field) == addr, (index, field)
        if q.ready:
            assert s & FEATURES_OK
            assert 1 <= q.num <= q.num_max
            if packed:
                assert q.num <= 1 << 15
                assert q.desc % 16 == 0 and q.driver % 4 == 0 and q.device % 4 == 0
                ends = (q.desc + 16 * q.num, q.driver + 4, q.device + 4)
            else:
                assert _power_of_two(q.num)
                assert q.desc % 16 == 0 and q.driver % 2 == 0 and q.device % 4 == 0
                ends = (q.desc + 16 * q.num, q.driver + 6 + 2 * q.num, q.device + 6 + 8 * q.num)
            assert q.desc and q.driver and q.device
            assert all(end <= 1 << 64 for end in ends)
    assert m.ready_queues() == [i for i, q in enumerate(m.queues) if q.ready]
    if not s & FEATURES_OK:
        assert m.ready_queues() == []


HostileGuestMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestHostileGuestAgainstTheModel = HostileGuestMachine.TestCase


# ------------------------------------------------------------------ level 2: the IOREQ server in front of the model

SIZES = (1, 2, 4, 8)


class ModelWindow:
    """The device window the way bridge/device.py puts a model behind the
    IOREQ server, minus the effects (a write's effects are dropped)."""

    def __init__(self, model: VirtioMmioModel) -> None:
        self.model = model

    def mmio_read(self, offset: int, size: int) -> int:
        return self.model.read(offset, size)

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        self.model.write(offset, size, value)


def running_model() -> VirtioMmioModel:
    """A model a Linux driver has brought up: the hostile slots then meet
    every kind of register state."""
    m = VirtioMmioModel(**device_args(F_VERSION_1 | F_EVENT_IDX | F_RING_RESET, (256, 8), bytes(range(60)), True))
    for off, value in [(0x070, ACK), (0x070, ACK | DRIVER), (0x024, 1), (0x020, 1), (0x024, 0), (0x020, 0),
                       (0x070, ACK | DRIVER | FEATURES_OK), (0x030, 0), (0x038, 256),
                       (0x080, RAM), (0x090, RAM + 0x1000), (0x0A0, RAM + 0x2000), (0x044, 1),
                       (0x070, ACK | DRIVER | FEATURES_OK | DRIVER_OK)]:
        m.write(off, 4, value)
    assert m.status & DRIVER_OK and m.ready_queues() == [0]
    return m


IOREQ_TYPES = [abi.IoreqType.COPY] * 6 + [abi.IoreqType.PIO, abi.IoreqType.PCI_CONFIG, abi.IoreqType.TIMEOFFSET,
                                          abi.IoreqType.INVALIDATE, 3, 0xFF]
hostile_ioreqs = st.lists(
    st.fixed_dictionaries(dict(
        vcpu=st.integers(0, 1),
        addr=st.one_of(st.integers(BASE - 16, BASE + 0x210), st.sampled_from(sorted(READABLE | WRITABLE)).map(
            lambda off: BASE + off), st.sampled_from([0, 0x1000, BASE + 0x1000, (1 << 64) - 4])),
        size=st.sampled_from(SIZES + SIZES + (0, 3, 16, U32)),
        count=st.sampled_from([1, 1, 1, 1, 0, 2, U32]),
        data_is_ptr=st.sampled_from([False, False, False, True]),
        is_read=st.booleans(),
        data=st.one_of(st.sampled_from(STATUS_VALUES + [0, 1, 2, 3]), st.integers(0, (1 << 64) - 1)),
        type_=st.sampled_from(IOREQ_TYPES),
    )),
    min_size=1, max_size=40,
)


async def _serve_hostile_ioreqs(reqs: list[dict]) -> None:
    xen = FakeXen(vcpus=2)
    served, mirror = running_model(), running_model()
    router = MmioRouter()
    router.add(BASE, 0x200, ModelWindow(served))
    server = IoreqServer(xen, router, fast_path=False)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            for n, req in enumerate(reqs, 1):
                xen.post(**req)
                with trio.fail_after(5):
                    while xen.slot(req["vcpu"]).state != abi.IoreqState.IORESP_READY:
                        await trio.sleep(0.0005)
                slot = xen.slot(req["vcpu"])
                size, addr = req["size"], req["addr"]
                plain_mmio = (req["type_"] == abi.IoreqType.COPY and req["count"] == 1 and not req["data_is_ptr"]
                              and size in SIZES and BASE <= addr and addr + size <= BASE + 0x200)
                expected = abi.size_mask(size if size in SIZES else 8)  # all-ones: refused
                if plain_mmio:
                    try:
                        if req["is_read"]:
                            expected = mirror.read(addr - BASE, size)
                        else:
                            mirror.write(addr - BASE, size, req["data"] & abi.size_mask(size))
                    except GuestAccessError:
                        pass
                elif req["type_"] in (abi.IoreqType.TIMEOFFSET, abi.IoreqType.INVALIDATE):
                    expected = 0  # nothing to emulate: completed with no data
                if req["is_read"]:
                    assert slot.data == expected, req
                assert xen.evtchn.notified[-1] == LOCAL_PORT_BASE + req["vcpu"]
                assert len(xen.evtchn.notified) == server.completed == n
                # Only well-formed MMIO inside the window touched the device.
                assert state_of(served) == state_of(mirror), req
            nursery.cancel_scope.cancel()
    finally:
        xen.page.close()
        os.close(xen._page_fd)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reqs=hostile_ioreqs)
def test_every_hostile_ioreq_is_completed_and_only_plain_mmio_reaches_the_model(reqs):
    trio.run(_serve_hostile_ioreqs, reqs)


# ------------------------------------------------------------------ x86 ioreqs the server refuses


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(count=4),  # rep movs/stos of 4 elements
        dict(count=2, data_is_ptr=True),
        dict(count=1, data_is_ptr=True),  # data is a guest address, not the value
        dict(type_=abi.IoreqType.PIO),
        dict(type_=abi.IoreqType.PCI_CONFIG),
        dict(count=0),
    ],
)
async def test_refused_x86_writes_complete_and_reach_no_device(kwargs):
    xen = FakeXen(vcpus=1)
    m = running_model()
    before = state_of(m)
    router = MmioRouter()
    router.add(BASE, 0x200, ModelWindow(m))
    server = IoreqServer(xen, router)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        # A write that, served as plain MMIO, would reset the device.
        xen.post(0, addr=BASE + 0x070, size=4, is_read=False, data=0, **kwargs)
        with trio.fail_after(5):
            while xen.slot(0).state != abi.IoreqState.IORESP_READY:
                await trio.sleep(0.001)
        nursery.cancel_scope.cancel()
    assert state_of(m) == before
    assert xen.evtchn.notified == [LOCAL_PORT_BASE]
    assert server.errors.count == 1


class FakeXenWithBufferedPage(FakeXen):
    """A hypervisor that hands back a buffered-ioreq page holding pending
    writes, although the server asked for none."""

    def __init__(self) -> None:
        super().__init__(vcpus=1)
        self.buffered = None

    def map_ioreq_pages(self, server_id: int) -> IoreqPages:
        pages = super().map_ioreq_pages(server_id)
        self.buffered = mmap.mmap(-1, abi.PAGE_SIZE)
        abi.BufIoreq(type=abi.IoreqType.COPY, is_read=False, size=4, addr=0x70, data=0).pack_into(
            self.buffered, abi.buf_slot_offset(0))
        self.buffered[abi.BUF_PAGE_OFF_WRITE_POINTER] = 1
        return IoreqPages(ioreq=pages.ioreq, buffered=self.buffered)


async def test_buffered_ioreqs_are_never_asked_for_nor_drained():
    """Buffered ioreqs (x86 only) are not served. The server creates its Xen
    server with handle_bufioreq OFF, so Xen keeps no buffered ring for it:
    a write Xen would buffer (the VGA aperture, in practice) reaches a
    server without a buffered page as an ordinary synchronous ioreq, which
    the loop serves or refuses like any other (Xen commit "ioreq-server:
    make buffered ioreq handling optional"). A buffered page handed over
    all the same is not read, and is unmapped at teardown."""
    xen = FakeXenWithBufferedPage()
    m = running_model()
    before = state_of(m)
    router = MmioRouter()
    router.add(BASE, 0x200, ModelWindow(m))
    async with trio.open_nursery() as nursery:
        await nursery.start(IoreqServer(xen, router).serve)
        assert xen.calls[0] == ("create", False)
        xen.post(0, addr=BASE + 0x004, size=4, is_read=True)  # the synchronous path still works
        with trio.fail_after(5):
            while xen.slot(0).state != abi.IoreqState.IORESP_READY:
                await trio.sleep(0.001)
        assert xen.slot(0).data == 2
        assert xen.buffered[abi.BUF_PAGE_OFF_READ_POINTER] == 0  # nothing consumed
        nursery.cancel_scope.cancel()
    assert state_of(m) == before  # the buffered Status 0 never reached the device
    assert xen.buffered.closed


# ------------------------------------------------------------------ level 3: the whole bridge

WINDOW = 0x200
SCRATCH = 0x4_0000  # zeroed guest RAM at the top, the only RAM hostile rings may use
E2E_SECTORS = itertools.count(64, 16)


@pytest.fixture(scope="module")
def hostile_bed():
    """One testbed for every example: qemu-storage-daemon, simulator and
    bridge (shadow memory, as on Xen). Each example starts with a reset."""
    workdir = tempfile.mkdtemp(prefix="xvb-hostile-")
    bed = BlkTestbed(workdir, image_size=8 << 20, vcpus=2, bridge_extra=["--memory", "shadow"],
                     sim_extra=["--vcpu-timeout", "5"])
    try:
        bed.start()
        yield bed
    finally:
        bridge = bed.bridge
        bed.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    # SIGTERM after all that is still a clean exit.
    assert bridge is not None and bridge.proc.returncode == 0, bridge and bridge.output()
    assert "Traceback" not in bridge.output()


def _in_window(rel: int, size: int) -> bool:
    return 0 <= rel and rel + size <= WINDOW


def _fixed_read(rel: int, size: int) -> int | None:
    """The answer a read must get whatever the device state, or None."""
    if not 0 <= rel < 0x100:
        return None
    if size != 4 or rel % 4 or rel not in READABLE:
        return abi.size_mask(size)  # refused: all-ones
    return {0x000: 0x74726976, 0x004: 2, 0x008: 2, 0x0B0: U32, 0x0B4: U32, 0x0B8: U32, 0x0BC: U32,
            0x0C0: 0}.get(rel)


# Queue addresses: zeroed RAM (as offsets into SCRATCH), misaligned ones,
# and ones outside guest RAM.
E2E_ADDRESSES = [("ram", 0), ("ram", 0x1000), ("ram", 0x2000), ("ram", 0x3000), ("ram", 2), ("ram", 8),
                 ("ram", 0x1006), ("abs", 0), ("abs", 0x1000), ("abs", 0x2000_0000), ("abs", 1 << 40),
                 ("abs", (1 << 64) - 0x1000)]
e2e_ops = st.one_of(
    st.tuples(st.just("access"), st.sampled_from(["read", "write"]),
              st.one_of(st.integers(-8, WINDOW + 8), st.sampled_from(sorted(READABLE | WRITABLE)),
                        st.sampled_from([-WINDOW, WINDOW, 0x1000, -0x10_0000])),
              st.sampled_from(SIZES), any_value.map(lambda v: v % (1 << 64))),
    st.tuples(st.just("write"), register_writes),
    st.tuples(st.just("negotiate"), st.sampled_from([1, 0, 3, 1 | 1 << 8]),
              st.sampled_from([0, F_INDIRECT | F_EVENT_IDX, U32, 1 << 9])),
    st.tuples(st.just("queue"), st.sampled_from([0, 1]), st.sampled_from([0, 1, 3, 8, 256, 512]),
              st.sampled_from(E2E_ADDRESSES), st.sampled_from(E2E_ADDRESSES), st.sampled_from(E2E_ADDRESSES)),
    st.tuples(st.just("status"), st.sampled_from([DRIVER_OK, FAILED, FEATURES_OK, 0])),
    st.tuples(st.just("notify"), st.sampled_from([0, 1, 2, 0x1_0000])),
    st.tuples(st.just("access"), st.sampled_from(["read", "write"]), st.integers(0x100, 0x140),
              st.sampled_from(SIZES), st.integers(0, (1 << 64) - 1)),  # config space
)
# Bring-up with hostile parameters: features, then queue 0, then DRIVER_OK and kicks.
GOOD_AREAS = (("ram", 0), ("ram", 0x1000), ("ram", 0x2000))
e2e_bringups = st.tuples(
    st.just("bringup"),
    st.sampled_from([1, 1, 1, 0, 3, 1 | 1 << 8]),  # word 1: VERSION_1, none, ones not offered
    st.sampled_from([0, F_INDIRECT | F_EVENT_IDX, U32, 1 << 9]),
    st.sampled_from([8, 8, 256, 1, 3, 512, 0]),
    st.one_of(st.just(GOOD_AREAS), st.tuples(*[st.sampled_from(E2E_ADDRESSES)] * 3)),
)


async def _run_e2e_ops(vcpu, base: int, scratch: int, ops) -> None:
    async def access(kind: str, rel: int, size: int, value: int = 0) -> int | None:
        addr = base + rel
        with trio.fail_after(10):  # longer than the simulator's vcpu-timeout: a hang shows as VcpuHung
            try:
                if kind == "read":
                    got = await vcpu.read(addr, size)
                else:
                    await vcpu.write(addr, size, value)
                    got = None
            except GuestAccessFault:
                assert not _in_window(rel, size), f"{kind} {rel:#x}/{size} inside the window faulted"
                return None
        assert _in_window(rel, size), f"{kind} {rel:#x}/{size} outside the window did not fault"
        if got is not None:
            assert 0 <= got <= abi.size_mask(size)
            fixed = _fixed_read(rel, size)
            assert fixed is None or got == fixed, (rel, size, got)
        return got

    def address(where) -> int:
        kind, value = where
        return scratch + value if kind == "ram" else value

    for op in ops:
        if op[0] == "access":
            _, kind, rel, size, value = op
            await access(kind, rel, size, value)
        elif op[0] == "write":
            await access("write", op[1][0], 4, op[1][1])
        elif op[0] == "negotiate":
            for status in (0, ACK, ACK | DRIVER):
                await access("write", 0x070, 4, status)
            for word, value in ((1, op[1]), (0, op[2])):
                await access("write", 0x024, 4, word)
                await access("write", 0x020, 4, value)
            await access("write", 0x070, 4, ACK | DRIVER | FEATURES_OK)
        elif op[0] == "bringup":
            _, word1, word0, num, areas = op
            for sub in [("negotiate", word1, word0), ("queue", 0, num, *areas), ("status", DRIVER_OK),
                        ("notify", 0), ("notify", 0)]:
                await _run_e2e_ops(vcpu, base, scratch, [sub])
        elif op[0] == "queue":
            _, index, num, *areas = op
            await access("write", 0x030, 4, index)
            await access("write", 0x038, 4, num)
            for low, where in zip((0x080, 0x090, 0x0A0), areas):
                await access("write", low, 4, address(where) & U32)
                await access("write", low + 4, 4, address(where) >> 32)
            await access("write", 0x044, 4, 1)
        elif op[0] == "status":
            status = await access("read", 0x070, 4)
            await access("write", 0x070, 4, status | op[1] if op[1] else 0)
        else:
            await access("write", 0x050, 4, op[1])


async def _hostile_example(bed: BlkTestbed, ops, sector: int) -> None:
    base = bed.mmio_base
    data = os.urandom(4096)
    async with SimGuest.open(bed.control) as guest:
        scratch = guest.ram.base + guest.ram.size - SCRATCH
        guest.ram.write(scratch, bytes(SCRATCH))
        v0 = guest.vcpus[0]
        with trio.fail_after(10):  # the reset between examples
            await v0.write(base + 0x070, 4, 0)
            assert await v0.read(base + 0x070, 4) == 0
        async with trio.open_nursery() as nursery:
            for i, vcpu in enumerate(guest.vcpus):
                nursery.start_soon(_run_e2e_ops, vcpu, base, scratch, [op for v, op in ops if v == i])
        assert bed.bridge.alive(), bed.bridge.output()
        # A well-behaved driver takes the device over and its I/O lands.
        with trio.fail_after(20):
            transport, blk = await open_blk(guest, bed)
            await blk.write(sector, data)
            await blk.flush()
            assert await blk.read(sector, len(data)) == data
            await transport.reset()
    assert_on_image(bed.image, {sector: data})


@pytest.mark.e2e
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(before=st.lists(st.tuples(st.integers(0, 1), e2e_ops), min_size=3, max_size=15),
       bringup=e2e_bringups,
       after=st.lists(st.tuples(st.integers(0, 1), e2e_ops), min_size=3, max_size=15))
def test_a_hostile_guest_cannot_hang_or_break_the_bridge(hostile_bed, before, bringup, after):
    """Both vCPUs at once: vCPU 0 does its share of ``before``, a bring-up
    with hostile parameters, then its share of ``after``; vCPU 1 does its
    share of both meanwhile."""
    ops = [*before, (0, bringup), *after]
    trio.run(_hostile_example, hostile_bed, ops, next(E2E_SECTORS))
