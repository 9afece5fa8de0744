"""The simulated dom0 kernel's fast path: privcmd's ioeventfd (a guest's
QueueNotify write completed by signalling an eventfd) and irqfd (an eventfd
signal raising the guest's SPI), driven through SimHypervisor against a real
simulator process and a SimGuest. Every simulator is stopped by PID at the
end of its test (the start_sim fixture); every eventfd is closed."""

from __future__ import annotations

import errno
import mmap
import os
import socket
import struct
import time

import pytest
import trio

from xen import abi
from xen.hypervisor import FastPathUnsupported, HypervisorError, IoreqPages
from xen.sim import control
from xen.sim.client import SimHypervisor, SimHypervisorError
from xen.sim.guest import GuestAccessFault, SimGuest, VcpuHung
from xen.sim.hypervisor import Poller

BASE = 0x02000000  # libxl's first virtio-mmio window
WINDOW = (BASE, BASE + 0x1FF)
QUEUE_NOTIFY = BASE + 0x50
NONE = abi.IoreqState.NONE
READY = abi.IoreqState.IOREQ_READY
INPROCESS = abi.IoreqState.INPROCESS
IORESP_READY = abi.IoreqState.IORESP_READY



@pytest.fixture
def eventfd():
    """Make nonblocking eventfds; all are closed after the test."""
    made = []

    def make(initial: int = 0) -> int:
        fd = os.eventfd(initial, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        made.append(fd)
        return fd

    yield make
    for fd in made:
        os.close(fd)


def take_count(fd: int) -> int:
    """Read and clear an eventfd's count (0 if it was not signalled)."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def slot_state(page, vcpu: int) -> int:
    return page[vcpu * abi.IOREQ_SIZE + abi.OFF_FLAGS] & abi.STATE_MASK


def vp_eport(page, vcpu: int) -> int:
    return struct.unpack_from("<I", page, vcpu * abi.IOREQ_SIZE + abi.OFF_VP_EPORT)[0]


def sim_eventfds(sim) -> int:
    """How many eventfds the simulator process holds open."""
    count = 0
    for name in os.listdir(f"/proc/{sim.pid}/fd"):
        try:
            target = os.readlink(f"/proc/{sim.pid}/fd/{name}")
        except OSError:
            continue  # closed meanwhile
        count += target == "anon_inode:[eventfd]"
    return count


async def until(predicate, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.002)


class FastDM:
    """A device model that registers kicks with the kernel and serves what
    still reaches it the way a correct one must: read the pending ports,
    unmask them, and for each vCPU whose slot is INPROCESS (held by the
    kernel's handler) look again until the kernel has decided; take the slot
    only if it is IOREQ_READY. A registered kick it takes itself (it found
    the slot READY before the kernel's handler ran) it relays to the
    eventfd, as the bridge does."""

    def __init__(self, hv: SimHypervisor, *, patient: bool = True) -> None:
        self.hv = hv
        self.nr_vcpus = hv.nr_vcpus()
        self.server = hv.create_ioreq_server()
        self.pages = hv.map_ioreq_pages(self.server)
        self.page = self.pages.ioreq
        hv.set_ioreq_server_state(self.server, True)
        self.evtchn = hv.open_event_channel()
        self.ports = [self.evtchn.bind_interdomain(hv.domid, vp_eport(self.page, v)) for v in range(self.nr_vcpus)]
        self.vcpu_of = {port: vcpu for vcpu, port in enumerate(self.ports)}
        hv.map_mmio_range(self.server, *WINDOW)
        self.patient = patient
        self.seen: list[tuple[int, abi.Ioreq]] = []
        self.events = 0  # ports read from the event channel
        self.found_inprocess = 0  # events whose slot the kernel was holding
        self.relayed = 0  # registered kicks taken and relayed in userspace
        self.kicks: dict[tuple[int, int], int] = {}  # (QueueNotify address, vq) -> eventfd
        self.answer = lambda vcpu, req: 0

    async def drain_bind_notifications(self) -> None:
        """Read bind_interdomain's notification of every port; unmask them."""
        seen: set[int] = set()
        with trio.fail_after(5):
            while seen != set(self.ports):
                await trio.lowlevel.wait_readable(self.evtchn.fileno())
                seen.update(self.evtchn.read_pending())
        self.evtchn.unmask(self.ports)
        self.hv.nr_vcpus()  # the simulator acts on the evtchn records before a control request

    def kick(self, fd: int, vq: int = 0, *, base: int = BASE, assign: bool = True) -> None:
        self.hv.ioeventfd(self.pages, self.ports, base=base, vq=vq, fd=fd, assign=assign)
        if assign:
            self.kicks[base + 0x50, vq] = fd
        else:
            self.kicks.pop((base + 0x50, vq), None)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.lowlevel.wait_readable(self.evtchn.fileno())
            ports = self.evtchn.read_pending()
            if not ports:
                continue
            self.events += len(ports)
            self.evtchn.unmask(ports)
            for port in ports:
                await self.take(self.vcpu_of[port], port)

    async def take(self, vcpu: int, port: int) -> None:
        if slot_state(self.page, vcpu) == INPROCESS:
            self.found_inprocess += 1
            if not self.patient:
                return  # the bug: the kernel may hand it back
            with trio.fail_after(5):
                while slot_state(self.page, vcpu) == INPROCESS:
                    await trio.sleep(0.0005)
        off = vcpu * abi.IOREQ_SIZE
        flags = self.page[off + abi.OFF_FLAGS]
        if flags & abi.STATE_MASK != READY:
            return  # completed by the kernel, or the notification of bind_interdomain
        self.page[off + abi.OFF_FLAGS] = (flags & ~abi.STATE_MASK) | INPROCESS
        req = abi.Ioreq.unpack(self.page, off)
        self.seen.append((vcpu, req))
        kick = self.kicks.get((req.addr, req.data & 0xFFFF))
        if kick is not None and req.size == 4 and not req.is_read:
            os.eventfd_write(kick, 1)
            self.relayed += 1
        value = self.answer(vcpu, req)
        if req.is_read:
            struct.pack_into("<Q", self.page, off + abi.OFF_DATA, value & 0xFFFFFFFFFFFFFFFF)
        flags = self.page[off + abi.OFF_FLAGS]
        self.page[off + abi.OFF_FLAGS] = (flags & ~abi.STATE_MASK) | IORESP_READY
        self.evtchn.notify(port)


# --- ioeventfd ----------------------------------------------------------------------


async def test_a_matching_queue_notify_completes_in_the_kernel(start_sim, connect, eventfd):
    sim = start_sim(vcpus=2)
    dm = FastDM(connect(sim))
    kick = eventfd()
    dm.kick(kick, vq=0)
    await dm.drain_bind_notifications()  # a masked port runs no handler
    async with SimGuest.open(sim.control_path) as guest:
        with trio.fail_after(5):
            await guest.vcpus[0].write(QUEUE_NOTIFY, 4, 0)
        assert take_count(kick) == 1
        # Nobody completed the slot in userspace; the vCPU consumed the
        # kernel's IORESP_READY.
        assert slot_state(dm.page, 0) == NONE
        await until(lambda: dm.evtchn.read_pending() == [dm.ports[0]])  # userspace saw the port too
        dm.evtchn.unmask([dm.ports[0]])
        # The other vCPU's port has its handler as well.
        with trio.fail_after(5):
            await guest.vcpus[1].write(QUEUE_NOTIFY, 4, 0)
        assert take_count(kick) == 1
        assert slot_state(dm.page, 1) == NONE


async def test_kicks_complete_while_the_device_model_keeps_unmasking(start_sim, connect, eventfd):
    sim = start_sim(extra_args=("--fast-path-hold-us", "200"))  # so userspace catches slots held
    dm = FastDM(connect(sim))
    kicks = [eventfd(), eventfd()]
    dm.kick(kicks[0], vq=0)
    dm.kick(kicks[1], vq=1)
    await dm.drain_bind_notifications()
    async with trio.open_nursery() as nursery, SimGuest.open(sim.control_path) as guest:
        await nursery.start(dm.run)
        with trio.fail_after(10):
            for i in range(20):
                await guest.vcpus[0].write(QUEUE_NOTIFY, 4, i % 2)
            # The vq is the low 16 bits of the value written.
            await guest.vcpus[0].write(QUEUE_NOTIFY, 4, 0x70001)
        nursery.cancel_scope.cancel()
    assert [take_count(fd) for fd in kicks] == [10, 11]
    # Most never reached the ioreq loop. One whose port was masked when it
    # fired is handled when the device model unmasks, and the device model
    # may look at the slot before the simulator has acted on the unmask.
    assert len(dm.seen) == dm.relayed < 21
    assert dm.events >= 1 and dm.found_inprocess >= 1  # userspace saw ports, and slots in the kernel's hands


async def masked_kick_port(sim, connect, eventfd) -> tuple[FastDM, int, int]:
    """A one-vCPU device model with a kick registered on vq 0, whose port
    is masked (its bind_interdomain notification read, not unmasked):
    the device model, the kick eventfd and the port."""
    dm = FastDM(connect(sim))
    kick = eventfd()
    dm.kick(kick)
    [port] = dm.ports
    await until(lambda: dm.evtchn.read_pending() == [port])
    return dm, kick, port


async def test_a_kick_on_a_masked_port_waits_for_the_unmask(start_sim, connect, eventfd):
    """The kernel's handler shares the port's interrupt with the evtchn
    device, and the channel stays masked until userspace unmasks it."""
    sim = start_sim()
    dm, kick, port = await masked_kick_port(sim, connect, eventfd)
    async with trio.open_nursery() as nursery, SimGuest.open(sim.control_path) as guest:
        done = trio.Event()

        async def write():
            await guest.vcpus[0].write(QUEUE_NOTIFY, 4, 0)
            done.set()

        nursery.start_soon(write)
        await until(lambda: slot_state(dm.page, 0) == READY)
        await trio.sleep(0.05)
        assert slot_state(dm.page, 0) == READY and not done.is_set() and take_count(kick) == 0
        dm.evtchn.unmask([port])  # the pending event is delivered: both handlers run
        with trio.fail_after(5):
            await done.wait()
        assert take_count(kick) == 1
        # userspace's copy of the event travels on its own channel: it may
        # land just after the guest saw its access complete
        await until(lambda: dm.evtchn.read_pending() == [port])


async def test_the_kernel_has_taken_the_slot_when_the_unmask_returns(start_sim, connect, eventfd):
    """Linux runs the handlers of an event that fired while its port was
    masked in the upcall the unmask causes, before write() returns; a
    device model that looks at the slots right after its unmask must find
    what the kernel left, or both take the same kick."""
    sim = start_sim(extra_args=("--fast-path-hold-us", "300000"))  # the kernel holds the slot 0.3 s
    dm, kick, port = await masked_kick_port(sim, connect, eventfd)
    async with trio.open_nursery() as nursery, SimGuest.open(sim.control_path) as guest:
        nursery.start_soon(guest.vcpus[0].write, QUEUE_NOTIFY, 4, 0)
        await until(lambda: slot_state(dm.page, 0) == READY)
        for _ in range(3):
            dm.evtchn.unmask([port])
            assert slot_state(dm.page, 0) == INPROCESS  # no await in between
        with trio.fail_after(5):
            await until(lambda: take_count(kick) == 1)


async def test_other_writes_still_reach_the_device_model(start_sim, connect, eventfd):
    sim = start_sim()
    dm = FastDM(connect(sim))
    kick = eventfd()
    dm.kick(kick, vq=0)
    async with trio.open_nursery() as nursery, SimGuest.open(sim.control_path) as guest:
        await nursery.start(dm.run)
        vcpu = guest.vcpus[0]
        with trio.fail_after(5):
            await vcpu.write(QUEUE_NOTIFY, 4, 1)  # another queue
            await vcpu.write(BASE + 0x54, 4, 0)  # another register
            await vcpu.write(QUEUE_NOTIFY, 2, 0)  # another size
            await vcpu.write(QUEUE_NOTIFY, 8, 0)
            await vcpu.write(BASE + 0x150, 4, 0)  # another device's QueueNotify
        nursery.cancel_scope.cancel()
    assert [(r.addr, r.size, r.data, r.is_read) for _, r in dm.seen] == [
        (QUEUE_NOTIFY, 4, 1, False),
        (BASE + 0x54, 4, 0, False),
        (QUEUE_NOTIFY, 2, 0, False),
        (QUEUE_NOTIFY, 8, 0, False),
        (BASE + 0x150, 4, 0, False),
    ]
    assert take_count(kick) == 0
    assert slot_state(dm.page, 0) == NONE


async def test_reads_of_queue_notify_are_never_taken(start_sim, connect, eventfd):
    sim = start_sim()
    dm = FastDM(connect(sim))
    kick = eventfd()
    dm.kick(kick, vq=0)
    dm.answer = lambda vcpu, req: 0x1234
    async with trio.open_nursery() as nursery, SimGuest.open(sim.control_path) as guest:
        await nursery.start(dm.run)
        with trio.fail_after(5):
            assert await guest.vcpus[0].read(QUEUE_NOTIFY, 4) == 0x1234
        nursery.cancel_scope.cancel()
    [(_vcpu, req)] = dm.seen
    assert (req.addr, req.size, req.is_read) == (QUEUE_NOTIFY, 4, True)
    assert take_count(kick) == 0


async def test_the_kernel_holds_the_slot_inprocess_before_it_decides(start_sim, connect, eventfd):
    """The race a device model must survive: the event reaches userspace
    while the kernel holds the slot; a write it does not take comes back
    as IOREQ_READY, with no further notification."""
    sim = start_sim(extra_args=("--fast-path-hold-us", "100000"))
    dm = FastDM(connect(sim))
    kick = eventfd()
    dm.kick(kick, vq=0)
    [port] = dm.ports
    await dm.drain_bind_notifications()
    async with trio.open_nursery() as nursery, SimGuest.open(sim.control_path) as guest:
        for value, taken in ((1, False), (0, True)):
            done = trio.Event()

            async def write(value=value, done=done):
                await guest.vcpus[0].write(QUEUE_NOTIFY, 4, value)
                done.set()

            nursery.start_soon(write)
            with trio.fail_after(5):
                await trio.lowlevel.wait_readable(dm.evtchn.fileno())
            assert dm.evtchn.read_pending() == [port]
            assert slot_state(dm.page, 0) == INPROCESS  # the kernel has it
            dm.evtchn.unmask([port])
            await trio.sleep(0.02)
            assert slot_state(dm.page, 0) == INPROCESS and not done.is_set()
            await until(lambda: slot_state(dm.page, 0) != INPROCESS)
            if taken:
                with trio.fail_after(5):
                    await done.wait()
                assert take_count(kick) == 1
            else:
                assert slot_state(dm.page, 0) == READY  # handed back, and nobody was told
                await trio.sleep(0.05)
                assert dm.evtchn.read_pending() == [] and not done.is_set()
                await dm.take(0, port)
                with trio.fail_after(5):
                    await done.wait()
                assert take_count(kick) == 0
    assert [r.data for _, r in dm.seen] == [1]


async def test_a_device_model_that_skips_a_held_slot_hangs_the_vcpu(start_sim, connect, eventfd):
    sim = start_sim(extra_args=("--fast-path-hold-us", "20000", "--vcpu-timeout", "0.5"))
    dm = FastDM(connect(sim), patient=False)
    dm.kick(eventfd(), vq=0)
    await dm.drain_bind_notifications()
    async with trio.open_nursery() as nursery, SimGuest.open(sim.control_path) as guest:
        await nursery.start(dm.run)
        with trio.fail_after(5), pytest.raises(VcpuHung, match="IOREQ_READY"):
            await guest.vcpus[0].write(QUEUE_NOTIFY, 4, 3)
        assert dm.found_inprocess >= 1 and dm.seen == []
        nursery.cancel_scope.cancel()


async def test_a_zero_hold_decides_at_once(start_sim, connect, eventfd):
    sim = start_sim(extra_args=("--fast-path-hold-us", "0"))
    dm = FastDM(connect(sim))
    kick = eventfd()
    dm.kick(kick, vq=0)
    await dm.drain_bind_notifications()
    async with trio.open_nursery() as nursery, SimGuest.open(sim.control_path) as guest:
        await nursery.start(dm.run)
        with trio.fail_after(5):
            await guest.vcpus[0].write(QUEUE_NOTIFY, 4, 0)
            await guest.vcpus[0].write(QUEUE_NOTIFY, 4, 5)
        nursery.cancel_scope.cancel()
    assert take_count(kick) == 1
    assert [r.data for _, r in dm.seen] == [5]
    assert dm.found_inprocess == 0  # decided before the port reached userspace


async def test_deassign_stops_the_kernel_taking_kicks(start_sim, connect, eventfd):
    sim = start_sim()
    dm = FastDM(connect(sim))
    kick, other = eventfd(), eventfd()
    dm.kick(kick, vq=0)
    dm.kick(other, vq=1)
    await dm.drain_bind_notifications()
    async with trio.open_nursery() as nursery, SimGuest.open(sim.control_path) as guest:
        await nursery.start(dm.run)
        with trio.fail_after(5):
            await guest.vcpus[0].write(QUEUE_NOTIFY, 4, 0)
            assert take_count(kick) == 1 and dm.seen == []
            # Found by the eventfd itself: a dup is another fd number for it.
            dup = os.dup(kick)
            try:
                dm.kick(dup, vq=0, assign=False)
            finally:
                os.close(dup)
            await guest.vcpus[0].write(QUEUE_NOTIFY, 4, 0)
            assert take_count(kick) == 0
            assert [r.data for _, r in dm.seen] == [0]
            await guest.vcpus[0].write(QUEUE_NOTIFY, 4, 1)  # the other queue still goes to the kernel
            assert take_count(other) == 1
            dm.kick(other, vq=1, assign=False)  # the last one: the page is unhooked
            await guest.vcpus[0].write(QUEUE_NOTIFY, 4, 1)
            assert take_count(other) == 0
            assert [r.data for _, r in dm.seen][-1] == 1 and dm.relayed <= 1
        nursery.cancel_scope.cancel()
    with pytest.raises(SimHypervisorError) as info:
        dm.kick(kick, vq=0, assign=False)
    assert info.value.errno == errno.ENODEV


async def test_ioeventfd_refusals(start_sim, connect, eventfd):
    sim = start_sim(vcpus=2)
    hv = connect(sim)
    dm = FastDM(hv)
    kick, second, third = eventfd(), eventfd(), eventfd()

    def refused(err, match=None, **kwargs):
        args = {"pages": dm.pages, "ports": dm.ports, "addr": BASE, "addr_len": 4, "vq": 0, "fd": kick, "flags": 0}
        args.update(kwargs)
        with pytest.raises(SimHypervisorError, match=match) as info:
            hv.privcmd_ioeventfd(args.pop("pages"), args.pop("ports"), **args)
        assert info.value.errno == err, info.value
        assert not isinstance(info.value, FastPathUnsupported)

    refused(errno.EINVAL, "addr_len 3", addr_len=3)
    refused(errno.EINVAL, "overflows", addr=(1 << 64) - 2)
    refused(errno.EINVAL, "flags 0x2", flags=2)
    refused(errno.EINVAL, "1 ports for the 2 vCPUs", ports=dm.ports[:1])
    refused(errno.EINVAL, "is not bound to ioreq server", ports=dm.ports[::-1])
    refused(errno.EINVAL, "is not bound to ioreq server", ports=[dm.ports[0], 4000])
    r, w = os.pipe()
    try:
        refused(errno.EINVAL, "not an eventfd", fd=r)
    finally:
        os.close(r)
        os.close(w)
    refused(errno.EFAULT, "not mapped", pages=IoreqPages(ioreq=mmap.mmap(-1, mmap.PAGESIZE)))
    # Ports bound on another connection are not this device model's.
    other = connect(sim)
    with other.open_event_channel() as evtchn:
        with pytest.raises(SimHypervisorError, match="already bound"):
            evtchn.bind_interdomain(hv.domid, vp_eport(dm.page, 0))
    with pytest.raises(SimHypervisorError) as info:
        other.ioeventfd(other.map_ioreq_pages(other.create_ioreq_server()), dm.ports, base=BASE, vq=0, fd=kick)
    assert info.value.errno == errno.EINVAL  # ports of another server, bound on another connection
    # Accepted: every addr_len Linux takes, one eventfd per registration.
    for addr_len, fd in ((1, kick), (8, second)):
        hv.privcmd_ioeventfd(dm.pages, dm.ports, addr=BASE + 0x200 * addr_len, addr_len=addr_len, vq=0, fd=fd, flags=0)
    dm.kick(third, vq=0)
    refused(errno.EBUSY, "already assigned", addr=BASE + 0x400, fd=third)  # the same eventfd again
    refused(errno.EEXIST, "already has an ioeventfd", fd=eventfd())  # the same base and vq
    refused(errno.EINVAL, "differ from", ports=dm.ports[::-1], fd=eventfd())
    dm.kick(third, vq=0, assign=False)
    with pytest.raises(SimHypervisorError) as info:
        dm.kick(third, vq=0, assign=False)
    assert info.value.errno == errno.ENODEV
    with pytest.raises(SimHypervisorError) as info:
        hv.ioeventfd(dm.pages, dm.ports, base=BASE, vq=0, fd=-1)
    assert info.value.errno == errno.EBADF
    assert sim.running()


async def test_registrations_go_with_the_ioreq_server(start_sim, connect, eventfd):
    sim = start_sim()
    baseline = sim_eventfds(sim)
    dm = FastDM(connect(sim))
    kick = eventfd()
    dm.kick(kick, vq=0)
    assert sim_eventfds(sim) == baseline + 1  # its own reference; the one received is closed
    pages = dm.pages
    dm.hv.destroy_ioreq_server(dm.server)
    assert sim_eventfds(sim) == baseline  # the simulator closed its reference
    async with SimGuest.open(sim.control_path) as guest:
        with trio.fail_after(5), pytest.raises(GuestAccessFault, match="no ioreq server claims"):
            await guest.vcpus[0].write(QUEUE_NOTIFY, 4, 0)
    assert take_count(kick) == 0
    with pytest.raises(SimHypervisorError) as info:
        dm.hv.ioeventfd(pages, dm.ports, base=BASE, vq=0, fd=kick, assign=False)
    assert info.value.errno == errno.EFAULT  # the page went with the server
    # A new server on the same window starts with no registrations.
    dm2 = FastDM(dm.hv)
    async with trio.open_nursery() as nursery, SimGuest.open(sim.control_path) as guest:
        await nursery.start(dm2.run)
        with trio.fail_after(5):
            await guest.vcpus[0].write(QUEUE_NOTIFY, 4, 0)
        nursery.cancel_scope.cancel()
    assert len(dm2.seen) == 1 and take_count(kick) == 0


async def test_registrations_go_with_the_connection(start_sim, connect, eventfd):
    sim = start_sim()
    baseline = sim_eventfds(sim)
    hv = connect(sim)
    dm = FastDM(hv)
    kick, call = eventfd(), eventfd()
    dm.kick(kick, vq=0)
    hv.irqfd(irq=33, fd=call)
    assert sim_eventfds(sim) == baseline + 2
    hv.close()
    await until(lambda: sim_eventfds(sim) == baseline)
    async with SimGuest.open(sim.control_path) as guest:
        with trio.fail_after(5), pytest.raises(GuestAccessFault):
            await guest.vcpus[0].write(QUEUE_NOTIFY, 4, 0)
        os.eventfd_write(call, 1)
        await trio.sleep(0.05)
        assert guest.edge_count(33) == 0
    assert take_count(call) == 1  # nobody consumed it
    # The next device model starts clean: the same eventfd registers again.
    hv2 = connect(sim)
    hv2.irqfd(irq=33, fd=call)
    hv2.irqfd(irq=33, fd=call, assign=False)


async def test_without_the_kernel_fast_path_both_are_unsupported(start_sim, connect, eventfd):
    sim = start_sim(extra_args=("--no-kernel-fast-path",))
    dm = FastDM(connect(sim))
    fd = eventfd()
    for call in (
        lambda: dm.kick(fd),
        lambda: dm.kick(fd, assign=False),
        lambda: dm.hv.irqfd(irq=33, fd=fd),
        lambda: dm.hv.irqfd(irq=33, fd=fd, assign=False),
    ):
        with pytest.raises(FastPathUnsupported) as info:
            call()
        assert isinstance(info.value, HypervisorError) and info.value.errno == errno.ENOTTY
    # Kicks go through the ioreq loop as ever.
    async with trio.open_nursery() as nursery, SimGuest.open(sim.control_path) as guest:
        await nursery.start(dm.run)
        with trio.fail_after(5):
            await guest.vcpus[0].write(QUEUE_NOTIFY, 4, 0)
        nursery.cancel_scope.cancel()
    assert len(dm.seen) == 1 and take_count(fd) == 0


# --- irqfd --------------------------------------------------------------------------


async def test_irqfd_raises_the_guest_irq(start_sim, connect, eventfd):
    sim = start_sim()
    hv = connect(sim)
    call = eventfd()
    hv.irqfd(irq=33, fd=call)
    async with SimGuest.open(sim.control_path) as guest:
        runs = []

        async def handler():
            runs.append(guest.irq_level(33))

        guest.on_irq(33, handler)
        with trio.fail_after(5):
            os.eventfd_write(call, 1)
            await guest.wait_irq_edges(33, 1)
            await until(lambda: take_count(call) == 0 and len(runs) == 1)
            os.eventfd_write(call, 3)  # one wakeup: the count is read and cleared, one dm_op
            await guest.wait_irq_edges(33, 2)
            await until(lambda: len(runs) == 2)
        assert take_count(call) == 0
        assert runs == [1, 1] and guest.irq_level(33) == 1
        # Deassigned: signals stay in the eventfd.
        hv.irqfd(irq=33, fd=call, assign=False)
        os.eventfd_write(call, 1)
        await trio.sleep(0.05)
        assert guest.edge_count(33) == 2
    assert take_count(call) == 1
    with pytest.raises(SimHypervisorError) as info:
        hv.irqfd(irq=33, fd=call, assign=False)
    assert info.value.errno == errno.ENOENT


async def test_a_signal_before_assign_is_injected_at_once(start_sim, connect, eventfd):
    sim = start_sim()
    hv = connect(sim)
    call = eventfd(1)
    async with SimGuest.open(sim.control_path) as guest:
        hv.irqfd(irq=40, fd=call)
        with trio.fail_after(5):
            await guest.wait_irq_edges(40, 1)
    assert take_count(call) == 0


async def test_irqfd_follows_the_line_model(start_sim, connect, eventfd):
    sim = start_sim(extra_args=("--irq-model", "line"))
    hv = connect(sim)
    call = eventfd()
    hv.irqfd(irq=33, fd=call)
    async with SimGuest.open(sim.control_path) as guest:
        with trio.fail_after(5):
            os.eventfd_write(call, 1)
            await guest.wait_irq_edges(33, 1)
            await until(lambda: take_count(call) == 0)
            os.eventfd_write(call, 1)  # the line is still high: no new edge
            await trio.sleep(0.05)
            assert guest.edge_count(33) == 1
            hv.set_irq_level(33, 0)  # the device model lowers it (a status read)
            os.eventfd_write(call, 1)
            await guest.wait_irq_edges(33, 2)


async def test_irqfd_refusals(start_sim, connect, eventfd):
    sim = start_sim(extra_args=("--nr-spis", "8"))
    hv = connect(sim)
    call = eventfd()
    for irq in (5, 31, 40, 1 << 20):
        with pytest.raises(SimHypervisorError, match="not an SPI") as info:
            hv.irqfd(irq=irq, fd=call)
        assert info.value.errno == errno.EINVAL
    hv.irqfd(irq=39, fd=call)
    with pytest.raises(SimHypervisorError) as info:
        hv.irqfd(irq=33, fd=call)  # an eventfd drives one irqfd
    assert info.value.errno == errno.EBUSY
    hv.irqfd(irq=39, fd=eventfd())  # two eventfds may raise one irq
    r, w = os.pipe()
    try:
        with pytest.raises(SimHypervisorError, match="not an eventfd") as info:
            hv.irqfd(irq=33, fd=r)
        assert info.value.errno == errno.EINVAL
    finally:
        os.close(r)
        os.close(w)
    with pytest.raises(SimHypervisorError) as info:
        hv.irqfd(irq=33, fd=eventfd(), assign=False)
    assert info.value.errno == errno.ENOENT
    x86 = connect(start_sim(extra_args=("--arch", "x86")))
    with pytest.raises(SimHypervisorError, match="Arm only") as info:
        x86.irqfd(irq=33, fd=eventfd())
    assert info.value.errno == errno.EINVAL
    assert sim.running()


# --- the wire format ----------------------------------------------------------------


def test_privcmd_requests_are_validated():
    request = {"op": "privcmd_ioeventfd", "domid": 1, "id": 0, "ports": [64, 65], "addr": BASE, "addr_len": 4, "vq": 0}
    fields = {k: v for k, v in request.items() if k != "op"}
    assert control.validate_request({**request, "flags": 1}) == ("privcmd_ioeventfd", {**fields, "flags": 1})
    for ports, why in (([], "1 to 4096"), ([64, "65"], "must be an integer"), (64, "must be an array"), ([-1], "out of range")):
        with pytest.raises(control.ProtocolError, match=why):
            control.validate_request({**request, "flags": 0, "ports": ports})
    with pytest.raises(control.ProtocolError, match="missing field 'flags'"):
        control.validate_request(request)
    with pytest.raises(control.ProtocolError, match="missing field 'irq'"):
        control.validate_request({"op": "privcmd_irqfd", "domid": 1, "flags": 0})
    control.check_request_fds("privcmd_irqfd", [7])
    control.check_request_fds("nr_vcpus", [])
    with pytest.raises(control.ProtocolError, match="takes 1 file descriptor"):
        control.check_request_fds("privcmd_irqfd", [])
    with pytest.raises(control.ProtocolError, match="carry no file descriptors"):
        control.check_request_fds("nr_vcpus", [7])


def test_the_eventfd_must_ride_with_the_request(start_sim, eventfd):
    sim = start_sim()
    baseline = sim_eventfds(sim)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(5)
    fd = eventfd()

    def ask(message, fds=()):
        control.send_message(sock, message, fds)
        received = control.recv_message(sock)
        assert received is not None and received.error is None
        control.close_fds(received.fds)
        return received.message

    try:
        sock.connect(sim.control_path)
        assert ask({"op": "hello", "role": "dm", "domid": 1})["ok"] is True
        irqfd = {"op": "privcmd_irqfd", "domid": 1, "irq": 33, "flags": 0}
        reply = ask(irqfd)
        assert (reply["ok"], reply["errno"]) == (False, "EBADMSG") and "takes 1 file descriptor" in reply["error"]
        reply = ask(irqfd, [fd, fd])
        assert (reply["ok"], reply["errno"]) == (False, "EBADMSG") and "too many file descriptors" in reply["error"]
        reply = ask({"op": "nr_vcpus", "domid": 1}, [fd])
        assert reply["ok"] is False and "carry no file descriptors" in reply["error"]
        assert ask(irqfd, [fd]) == {"ok": True}
        assert ask({**irqfd, "flags": 1}, [fd]) == {"ok": True}
    finally:
        sock.close()
    assert sim.running() and sim_eventfds(sim) == baseline


# --- the poller's timers (the kernel's hold) ---------------------------------------


async def test_poller_timers_wake_an_idle_poller():
    poller = Poller()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(poller.run)
            await trio.sleep(0.01)  # the poller now waits in trio
            fired: list[float] = []
            start = time.monotonic()
            poller.call_later(0.03, lambda: fired.append(time.monotonic() - start))
            poller.call_later(0.01, lambda: fired.append(-1.0))  # an earlier one runs first
            await until(lambda: len(fired) == 2)
            assert fired[0] == -1.0 and 0.03 <= fired[1] < 1.0
            nursery.cancel_scope.cancel()
    finally:
        poller.close()
