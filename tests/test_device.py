"""bridge.device: the effects of guest accesses and daemon events, with the
real register model, a stand-in front-end and a hypervisor that records
interrupt line changes. (The whole path with the real daemon is in
test_e2e_blk.py.)"""

from __future__ import annotations

import os

import pytest
import trio
import trio.testing

from bridge import split_ring as sr
from bridge import virtio_mmio as vm
from bridge.device import VhostUserDevice, passthrough_resume_index
from bridge.device_types import DEVICE_TYPES
from bridge.memory import GuestRamMap, PassthroughMemory
from bridge.shadow_ring import RingError
from vhost_user.protocol import ConnectionLost
from xen.hypervisor import GuestRamRegion

IRQ = 40
RAM_BASE = 0x4000_0000
FEATURES = (1 << 32) | (1 << 9)


class RecordingXen:
    def __init__(self) -> None:
        self.levels: list[int] = []

    def set_irq_level(self, irq: int, level: int) -> None:
        assert irq == IRQ
        self.levels.append(level)


class StandInFrontend:
    def __init__(self, config: bytes) -> None:
        self.config = config
        self.started: list = []
        self.stopped: list = []
        self.fail_with: Exception | None = None
        self.hold: trio.Event | None = None

    async def get_config(self, size: int) -> bytes:
        return self.config[:size]

    async def start(self, features, regions, rings) -> None:
        if self.fail_with:
            raise self.fail_with
        if self.hold is not None:
            await self.hold.wait()
        self.started.append((features, [r.index for r in rings], [(r.kick_fd, r.call_fd) for r in rings]))

    def take_inflight(self):
        return None  # the daemon this stands in for offers no INFLIGHT_SHMFD

    async def stop(self, indices):
        self.stopped.append(list(indices))
        return {i: 0 for i in indices}


@pytest.fixture
def ram():
    fd = os.memfd_create("guest-ram")
    os.ftruncate(fd, 1 << 20)
    ram = GuestRamMap([GuestRamRegion(gpa=RAM_BASE, size=1 << 20, fd=fd)])
    yield PassthroughMemory(ram)
    ram.close()
    os.close(fd)


@pytest.fixture
async def device(ram, nursery):
    xen = RecordingXen()
    dev = VhostUserDevice(hypervisor=xen, device_type=DEVICE_TYPES["blk"], socket_path="/x", irq=IRQ, memory=ram)
    dev.frontend = StandInFrontend(config=bytes(60))
    dev.model = vm.VirtioMmioModel(
        device_id=2, vendor_id=0, device_features=FEATURES, queue_num_max=[8], config=bytes(60)
    )
    dev._nursery = nursery
    return dev, xen


async def drive_to_driver_ok(dev: VhostUserDevice) -> None:
    """Linux's probe and queue set-up, then DRIVER_OK (run to completion)."""
    w = dev.mmio_write
    assert w(vm.STATUS, 4, 0) is None
    w(vm.STATUS, 4, 1)
    w(vm.STATUS, 4, 3)
    w(vm.DRIVER_FEATURES_SEL, 4, 1)
    w(vm.DRIVER_FEATURES, 4, FEATURES >> 32)
    w(vm.DRIVER_FEATURES_SEL, 4, 0)
    w(vm.DRIVER_FEATURES, 4, FEATURES & 0xFFFFFFFF)
    w(vm.STATUS, 4, 0xB)
    w(vm.QUEUE_SEL, 4, 0)
    w(vm.QUEUE_NUM, 4, 8)
    for reg, gpa in ((vm.QUEUE_DESC_LOW, 0x1000), (vm.QUEUE_DRIVER_LOW, 0x2000), (vm.QUEUE_DEVICE_LOW, 0x3000)):
        w(reg, 4, RAM_BASE + gpa)
    w(vm.QUEUE_READY, 4, 1)
    pending = w(vm.STATUS, 4, 0xF)
    assert pending is not None  # the start talks to the daemon: the vCPU waits
    await pending


async def test_driver_ok_starts_the_ready_ring_and_kicks_reach_its_eventfd(device):
    dev, _xen = device
    await drive_to_driver_ok(dev)
    [(features, rings, fds)] = dev.frontend.started
    assert features == FEATURES and rings == [0]
    kick, _call = fds[0]
    assert dev.mmio_write(vm.QUEUE_NOTIFY, 4, 0) is None
    assert dev.mmio_write(vm.QUEUE_NOTIFY, 4, 0) is None
    assert os.eventfd_read(kick) == 2


async def test_the_daemons_call_raises_the_line_and_ack_lowers_it(device):
    dev, xen = device
    await drive_to_driver_ok(dev)
    _kick, call = dev.frontend.started[0][2][0]
    os.eventfd_write(call, 1)
    with trio.fail_after(5):
        while xen.levels != [1]:
            await trio.sleep(0.001)
    assert dev.mmio_read(vm.INTERRUPT_STATUS, 4) == vm.INT_VRING
    dev.mmio_write(vm.INTERRUPT_ACK, 4, vm.INT_VRING)
    assert xen.levels == [1, 0]


async def test_an_ack_that_leaves_bits_pending_makes_a_fresh_edge(device):
    dev, xen = device
    await drive_to_driver_ok(dev)
    dev.raise_interrupt(vm.INT_VRING)
    dev.raise_interrupt(vm.INT_CONFIG)  # line already high: no new edge yet
    assert xen.levels == [1]
    dev.mmio_write(vm.INTERRUPT_ACK, 4, vm.INT_VRING)
    # still pending: lower and raise again, so an edge-triggered SPI sees it
    assert xen.levels == [1, 0, 1]


async def test_config_change_bumps_the_generation_and_raises_a_config_interrupt(device):
    dev, xen = device
    await drive_to_driver_ok(dev)
    generation = dev.mmio_read(vm.CONFIG_GENERATION, 4)
    dev.frontend.config = (12345).to_bytes(8, "little") + bytes(52)
    await dev.config_changed()
    assert dev.mmio_read(vm.CONFIG_GENERATION, 4) != generation
    assert dev.mmio_read(vm.CONFIG_OFFSET, 4) == 12345
    assert dev.mmio_read(vm.INTERRUPT_STATUS, 4) == vm.INT_CONFIG
    assert xen.levels == [1]
    await dev.config_changed()  # same bytes again: nothing to tell the guest
    assert xen.levels == [1]


async def test_a_failed_start_sets_needs_reset_and_a_reset_recovers(device):
    dev, xen = device
    dev.frontend.fail_with = ConnectionLost("daemon went away")
    await drive_to_driver_ok(dev)
    assert dev.mmio_read(vm.STATUS, 4) & vm.DeviceStatus.DEVICE_NEEDS_RESET
    assert dev.mmio_read(vm.INTERRUPT_STATUS, 4) & vm.INT_CONFIG
    assert xen.levels == [1]
    reset = dev.mmio_write(vm.STATUS, 4, 0)
    if reset is not None:
        await reset
    assert dev.mmio_read(vm.STATUS, 4) == 0
    assert xen.levels == [1, 0]
    assert dev.failed is None


async def test_reset_stops_the_started_rings_and_closes_their_fds(device):
    dev, _xen = device
    await drive_to_driver_ok(dev)
    kick, call = dev.frontend.started[0][2][0]
    await dev.mmio_write(vm.STATUS, 4, 0)
    assert dev.frontend.stopped == [[0]]
    for fd in (kick, call):
        with pytest.raises(OSError):
            os.fstat(fd)


async def test_a_kick_during_the_start_sequence_is_not_lost(device, nursery):
    """Another vCPU may notify while DRIVER_OK's start is still talking to
    the daemon; the kick must be waiting in the eventfd when the daemon
    gets it."""
    dev, _xen = device
    dev.frontend.hold = trio.Event()
    done = trio.Event()

    async def probe():
        await drive_to_driver_ok(dev)
        done.set()

    nursery.start_soon(probe)
    await trio.testing.wait_all_tasks_blocked()
    assert not done.is_set()  # the start is still in progress
    assert dev.mmio_write(vm.QUEUE_NOTIFY, 4, 0) is None
    dev.frontend.hold.set()
    await done.wait()
    kick, _call = dev.frontend.started[0][2][0]
    assert os.eventfd_read(kick) == 1


class RecordingFastPath:
    """KernelFastPath's interface, recording what the device registers; the
    fds it keeps are checked to be open at release time, as the kernel finds
    a registration by its eventfd."""

    def __init__(self, *, kicks: bool = True, irqs: bool = True) -> None:
        self.enabled = True
        self.take_kicks, self.take_irqs = kicks, irqs
        self.kicks: dict[int, tuple[int, int]] = {}
        self.irqs: dict[int, int] = {}
        self.released: list[int] = []

    def assign_kick(self, base: int, vq: int, fd: int) -> bool:
        if self.take_kicks:
            self.kicks[fd] = (base, vq)
        return self.take_kicks

    def assign_irq(self, irq: int, fd: int) -> bool:
        if self.take_irqs:
            self.irqs[fd] = irq
        return self.take_irqs

    def release(self, fd: int) -> None:
        os.fstat(fd)  # still open
        self.released.append(fd)
        self.kicks.pop(fd, None)
        self.irqs.pop(fd, None)


async def test_the_kernel_takes_the_daemons_kick_and_call_fds_in_passthrough(device):
    dev, xen = device
    dev.base = 0x0200_0000
    dev.fast_path = fast = RecordingFastPath()
    await drive_to_driver_ok(dev)
    kick, call = dev.frontend.started[0][2][0]
    assert fast.kicks == {kick: (0x0200_0000, 0)}
    assert fast.irqs == {call: IRQ}
    # The kernel raises the interrupt; the bridge must not also read the call fd.
    os.eventfd_write(call, 1)
    await trio.sleep(0.02)
    assert xen.levels == []
    assert os.eventfd_read(call) == 1  # still there for the kernel
    # InterruptStatus stays truthful without ever hearing of the call.
    assert dev.mmio_read(vm.INTERRUPT_STATUS, 4) == vm.INT_VRING
    await dev.mmio_write(vm.STATUS, 4, 0)
    assert sorted(fast.released) == sorted([kick, call]) and not fast.kicks and not fast.irqs
    assert dev.mmio_read(vm.INTERRUPT_STATUS, 4) == 0


async def test_without_irqfd_the_bridge_relays_calls_itself(device):
    dev, xen = device
    dev.fast_path = RecordingFastPath(irqs=False)
    await drive_to_driver_ok(dev)
    _kick, call = dev.frontend.started[0][2][0]
    os.eventfd_write(call, 1)
    with trio.fail_after(5):
        while xen.levels != [1]:
            await trio.sleep(0.001)
    dev.mmio_write(vm.INTERRUPT_ACK, 4, vm.INT_VRING)
    assert dev.mmio_read(vm.INTERRUPT_STATUS, 4) == 0


# --- resuming a passthrough ring after the daemon restarted ------------------

AVAIL, USED, NUM = RAM_BASE + 0x2000, RAM_BASE + 0x3000, 8


def fill_rings(memory: PassthroughMemory, avail: list[int], used: list[int]) -> None:
    """The guest made ``avail`` heads available, the daemon completed
    ``used`` heads, in that order, from index 0 (wrapping at NUM)."""
    ram = memory.ram
    for i, head in enumerate(avail):
        ram.write(AVAIL + sr.avail_ring_entry(i % NUM), sr.U16.pack(head))
    for i, head in enumerate(used):
        ram.write(USED + sr.used_ring_entry(i % NUM), sr.USED_ELEM.pack(head, 512))
    ram.write(AVAIL + sr.AVAIL_IDX, sr.U16.pack(len(avail) & 0xFFFF))
    ram.write(USED + sr.USED_IDX, sr.U16.pack(len(used) & 0xFFFF))


def test_in_order_completions_resume_at_the_used_index(ram):
    heads = [i % NUM for i in range(21)]
    fill_rings(ram, heads, heads[:17])  # 4 in flight, the ring wrapped twice
    assert passthrough_resume_index(ram.ram, NUM, AVAIL, USED) == 17


def test_out_of_order_completions_are_refused(ram):
    # Heads 0..4 made available; the daemon finished 1 before 0.
    fill_rings(ram, [0, 1, 2, 3, 4], [1])
    with pytest.raises(RingError, match="out of order"):
        passthrough_resume_index(ram.ram, NUM, AVAIL, USED)


def test_an_impossible_ring_is_refused(ram):
    fill_rings(ram, list(range(8)) + [0, 1], [])  # 10 in flight on a queue of 8
    with pytest.raises(RingError, match="10 requests in flight"):
        passthrough_resume_index(ram.ram, NUM, AVAIL, USED)


async def test_only_the_writeback_field_of_blk_config_may_be_written(device):
    """libvhost-user daemons panic on a SET_CONFIG they do not expect
    (qemu-storage-daemon: 'Set virtio configuration space failed'), so a
    guest write to capacity never reaches the daemon."""
    dev, _xen = device
    await drive_to_driver_ok(dev)
    with pytest.raises(vm.GuestAccessError, match="not a field"):
        dev.mmio_write(vm.CONFIG_OFFSET + 0, 4, 0xFFFF)  # capacity
    with pytest.raises(vm.GuestAccessError):
        dev.mmio_write(vm.CONFIG_OFFSET + 32, 2, 1)  # wider than writeback
    assert dev.model.config == bytes(60)
