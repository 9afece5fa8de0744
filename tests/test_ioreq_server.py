"""The IOREQ loop against an in-process stand-in for Xen: a real shared page
(anonymous mmap) and a real event-channel fd (a socketpair carrying u32
ports), so every slot transition is checked byte for byte. The simulator
process is exercised by the end-to-end tests."""

from __future__ import annotations

import mmap
import os
import socket
import struct

import pytest
import trio

from xen import abi
from xen.hypervisor import EventChannel, FastPathUnsupported, Hypervisor, IoreqPages
from xen.ioreq_server import IoreqServer, MmioRouter

DOMID = 7
REMOTE_PORT_BASE = 100  # guest-side ports written into vp_eport
LOCAL_PORT_BASE = 40  # what bind_interdomain hands back


class FakeEventChannel(EventChannel):
    def __init__(self) -> None:
        self.ours, self.xen_side = socket.socketpair()
        self.ours.setblocking(False)
        self.unmasked: list[int] = []
        self.notified: list[int] = []
        self.bound: dict[int, int] = {}
        self.closed = False

    def fileno(self) -> int:
        return self.ours.fileno()

    def bind_interdomain(self, remote_domid: int, remote_port: int) -> int:
        assert remote_domid == DOMID
        local = LOCAL_PORT_BASE + len(self.bound)
        self.bound[local] = remote_port
        return local

    def unbind(self, local_port: int) -> None:
        del self.bound[local_port]

    def read_pending(self) -> list[int]:
        try:
            data = self.ours.recv(4096)
        except BlockingIOError:
            return []
        return list(struct.unpack(f"<{len(data) // 4}I", data))

    def unmask(self, local_ports) -> None:
        self.unmasked.extend(local_ports)

    def notify(self, local_port: int) -> None:
        self.notified.append(local_port)

    def close(self) -> None:
        self.closed = True
        self.ours.close()
        self.xen_side.close()

    def fire(self, *ports: int) -> None:
        self.xen_side.send(struct.pack(f"<{len(ports)}I", *ports))


class FakeXen(Hypervisor):
    def __init__(self, vcpus: int) -> None:
        self.domid = DOMID
        self.vcpus = vcpus
        # Xen's side and the device model's side are two mappings of one page.
        self._page_fd = os.memfd_create("ioreq-page")
        os.ftruncate(self._page_fd, abi.PAGE_SIZE)
        self.page = mmap.mmap(self._page_fd, abi.PAGE_SIZE)
        self.evtchn = FakeEventChannel()
        self.calls: list[tuple] = []
        self.enabled = False
        self.fast_path_supported = True

    def nr_vcpus(self) -> int:
        return self.vcpus

    def create_ioreq_server(self, *, buffered: bool = False) -> int:
        self.calls.append(("create", buffered))
        return 3

    def map_ioreq_pages(self, server_id: int) -> IoreqPages:
        return IoreqPages(ioreq=mmap.mmap(self._page_fd, abi.PAGE_SIZE))

    def set_ioreq_server_state(self, server_id: int, enabled: bool) -> None:
        self.calls.append(("state", enabled))
        if enabled:  # Xen fills vp_eport when the server is enabled
            for v in range(self.vcpus):
                struct.pack_into("<I", self.page, v * 32 + abi.OFF_VP_EPORT, REMOTE_PORT_BASE + v)

    def map_mmio_range(self, server_id, start, end) -> None:
        self.calls.append(("map", start, end))

    def unmap_mmio_range(self, server_id, start, end) -> None:
        self.calls.append(("unmap", start, end))

    def destroy_ioreq_server(self, server_id) -> None:
        self.calls.append(("destroy", server_id))

    def set_irq_level(self, irq, level) -> None:
        self.calls.append(("irq", irq, level))

    def open_event_channel(self) -> EventChannel:
        return self.evtchn

    def guest_ram(self):
        return None

    def guest_ram_layout(self):
        return []

    def map_guest_pages(self, gfn, count):
        raise NotImplementedError

    def ioeventfd(self, pages, ports, *, base, vq, fd, assign=True) -> None:
        if not self.fast_path_supported:
            raise FastPathUnsupported("ENOTTY")
        self.calls.append(("ioeventfd", list(ports), base, vq, fd, assign))

    def irqfd(self, *, irq, fd, assign=True) -> None:
        if not self.fast_path_supported:
            raise FastPathUnsupported("ENOTTY")
        self.calls.append(("irqfd", irq, fd, assign))

    def xenstore(self):
        raise NotImplementedError

    def close(self) -> None:
        pass

    # --- the guest's side of a slot -------------------------------------

    def post(self, vcpu: int, *, addr: int, size: int, is_read: bool, data: int = 0, type_=abi.IoreqType.COPY,
             count: int = 1, data_is_ptr: bool = False) -> None:
        abi.Ioreq(
            addr=addr, data=data, count=count, size=size, vp_eport=REMOTE_PORT_BASE + vcpu,
            state=abi.IoreqState.IOREQ_READY, data_is_ptr=data_is_ptr, is_read=is_read, df=False, type=type_,
        ).pack_into(self.page, vcpu * 32)
        self.evtchn.fire(LOCAL_PORT_BASE + vcpu)

    def slot(self, vcpu: int) -> abi.Ioreq:
        return abi.Ioreq.unpack(self.page, vcpu * 32)


class Registers:
    """A device window that records what it is asked."""

    def __init__(self) -> None:
        self.writes: list[tuple[int, int, int]] = []
        self.gate: trio.Event | None = None

    def mmio_read(self, offset: int, size: int):
        if offset == 0x10:
            raise ValueError("register 0x10 is write-only")
        if offset == 0x20 and self.gate is not None:
            return self._slow_read()
        return 0x1000 + offset

    async def _slow_read(self) -> int:
        await self.gate.wait()
        return 0xABCD

    def mmio_write(self, offset: int, size: int, value: int):
        self.writes.append((offset, size, value))


BASE = 0x0200_0000


@pytest.fixture
async def served(nursery):
    xen = FakeXen(vcpus=4)
    regs = Registers()
    router = MmioRouter()
    router.add(BASE, 0x200, regs)
    server = IoreqServer(xen, router)
    await nursery.start(server.serve)
    return xen, regs, server


async def until_completed(xen: FakeXen, vcpu: int) -> abi.Ioreq:
    with trio.fail_after(5):
        while xen.slot(vcpu).state != abi.IoreqState.IORESP_READY:
            await trio.sleep(0.001)
    return xen.slot(vcpu)


async def test_setup_follows_xens_order(served):
    xen, _regs, server = served
    assert xen.calls[:3] == [("create", False), ("state", True), ("map", BASE, BASE + 0x1FF)]
    # one local port per vCPU, bound to the remote port Xen wrote in vp_eport
    assert xen.evtchn.bound == {LOCAL_PORT_BASE + v: REMOTE_PORT_BASE + v for v in range(4)}
    assert server.nr_vcpus == 4


async def test_read_is_answered_and_completed_with_notify(served):
    xen, _regs, _server = served
    xen.post(2, addr=BASE + 0x8, size=4, is_read=True)
    slot = await until_completed(xen, 2)
    assert slot.data == 0x1008
    assert xen.evtchn.unmasked == [LOCAL_PORT_BASE + 2]
    assert xen.evtchn.notified == [LOCAL_PORT_BASE + 2]


async def test_write_reaches_the_window_masked_to_size(served):
    xen, regs, _server = served
    xen.post(0, addr=BASE + 0x70, size=2, is_read=False, data=0xFFFF_1234)
    await until_completed(xen, 0)
    assert regs.writes == [(0x70, 2, 0x1234)]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(addr=0x1000, size=4, is_read=True),  # no window there
        dict(addr=BASE + 0x1FE, size=4, is_read=True),  # straddles the window's end
        dict(addr=BASE + 0x10, size=4, is_read=True),  # the handler rejects it
        dict(addr=BASE + 0x8, size=4, is_read=True, type_=abi.IoreqType.PIO),
        dict(addr=BASE + 0x8, size=4, is_read=True, type_=abi.IoreqType.PCI_CONFIG),
        dict(addr=BASE + 0x8, size=4, is_read=True, count=4),  # x86 rep movs
        dict(addr=BASE + 0x8, size=4, is_read=True, data_is_ptr=True),
        dict(addr=BASE + 0x8, size=3, is_read=True),  # no such access size
    ],
)
async def test_rejected_reads_complete_with_all_ones(served, kwargs):
    xen, regs, server = served
    xen.post(1, **kwargs)
    slot = await until_completed(xen, 1)
    size = kwargs["size"]
    assert slot.data == abi.size_mask(size if size in (1, 2, 4, 8) else 8)
    assert xen.evtchn.notified == [LOCAL_PORT_BASE + 1]
    assert server.errors.count == 1
    assert regs.writes == []


async def test_invalidate_is_completed_without_touching_devices(served):
    xen, regs, server = served
    xen.post(3, addr=0, size=4, is_read=False, data=0xFFFFFFFF, type_=abi.IoreqType.INVALIDATE)
    await until_completed(xen, 3)
    assert regs.writes == [] and server.errors.count == 0


def kernel_takes(xen: FakeXen, vcpu: int) -> None:
    """What the kernel's fast path does first with the slot of a posted
    access: it holds it INPROCESS while it decides."""
    off = vcpu * 32 + abi.OFF_FLAGS
    xen.page[off] = (xen.page[off] & 0xF0) | abi.IoreqState.INPROCESS


async def test_a_slot_the_kernel_completes_is_left_alone(served):
    xen, regs, _server = served
    xen.post(0, addr=BASE + 0x50, size=4, is_read=False, data=0)
    kernel_takes(xen, 0)
    await trio.sleep(0.02)
    assert xen.slot(0).state == abi.IoreqState.INPROCESS  # still deciding: untouched
    off = abi.OFF_FLAGS
    xen.page[off] = (xen.page[off] & 0xF0) | abi.IoreqState.IORESP_READY  # a registered kick
    await trio.sleep(0.02)
    assert regs.writes == [] and xen.evtchn.notified == []


async def test_a_slot_the_kernel_hands_back_is_served(served):
    """The kernel held the slot when the event arrived, then found no
    registered kick and set it back to IOREQ_READY without a new event."""
    xen, regs, _server = served
    xen.post(1, addr=BASE + 0x50, size=4, is_read=False, data=3)
    kernel_takes(xen, 1)
    await trio.sleep(0.01)
    assert regs.writes == []
    off = 32 + abi.OFF_FLAGS
    xen.page[off] = (xen.page[off] & 0xF0) | abi.IoreqState.IOREQ_READY
    await until_completed(xen, 1)
    assert regs.writes == [(0x50, 4, 3)]
    assert xen.evtchn.notified == [LOCAL_PORT_BASE + 1]


async def test_the_fast_path_is_set_up_and_removed_with_the_server():
    xen = FakeXen(vcpus=2)
    router = MmioRouter()
    router.add(BASE, 0x200, Registers())
    async with trio.open_nursery() as nursery:
        server = IoreqServer(xen, router, kernel_kicks=True)
        await nursery.start(server.serve)
        ports = [LOCAL_PORT_BASE, LOCAL_PORT_BASE + 1]
        assert server.fast_path.assign_kick(BASE, 0, 99)
        assert server.fast_path.assign_irq(33, 98)
        assert xen.calls[-2:] == [("ioeventfd", ports, BASE, 0, 99, True), ("irqfd", 33, 98, True)]
        nursery.cancel_scope.cancel()
    # Removed first, before the ranges, ports and server go.
    assert xen.calls[-5:-3] == [("ioeventfd", ports, BASE, 0, 99, False), ("irqfd", 33, 98, False)]
    assert xen.calls[-3][0] == "unmap"


async def test_an_old_kernel_turns_the_fast_path_off_once(served):
    xen, _regs, server = served
    xen.fast_path_supported = False
    assert not server.fast_path.assign_irq(33, 98)
    xen.fast_path_supported = True
    assert not server.fast_path.assign_irq(34, 97)  # not asked again
    assert not [c for c in xen.calls if c[0] in ("ioeventfd", "irqfd")]


async def test_kicks_go_to_the_kernel_only_when_asked(served):
    """By default only interrupts use the fast path (xen.fast_path says
    why): no ioeventfd is even tried."""
    xen, _regs, server = served
    assert not server.fast_path.assign_kick(BASE, 0, 99)
    assert server.fast_path.assign_irq(33, 98)
    assert [c[0] for c in xen.calls if c[0] in ("ioeventfd", "irqfd")] == ["irqfd"]


async def test_a_slow_access_holds_only_its_own_vcpu(served):
    xen, regs, _server = served
    regs.gate = trio.Event()
    xen.post(0, addr=BASE + 0x20, size=4, is_read=True)
    await trio.sleep(0.02)
    assert xen.slot(0).state == abi.IoreqState.INPROCESS
    xen.post(1, addr=BASE + 0x4, size=4, is_read=True)  # another vCPU is still served
    assert (await until_completed(xen, 1)).data == 0x1004
    assert xen.slot(0).state == abi.IoreqState.INPROCESS
    regs.gate.set()
    assert (await until_completed(xen, 0)).data == 0xABCD


async def test_teardown_runs_in_reverse():
    xen = FakeXen(vcpus=2)
    router = MmioRouter()
    router.add(BASE, 0x200, Registers())
    async with trio.open_nursery() as nursery:
        await nursery.start(IoreqServer(xen, router).serve)
        nursery.cancel_scope.cancel()
    assert xen.calls[-3:] == [("unmap", BASE, BASE + 0x1FF), ("state", False), ("destroy", 3)]
    assert xen.evtchn.bound == {} and xen.evtchn.closed


def test_router_rejects_overlaps_and_finds_windows():
    router = MmioRouter()
    a, b = Registers(), Registers()
    router.add(0x2000, 0x200, a)
    router.add(0x2400, 0x200, b)
    with pytest.raises(ValueError, match="overlaps"):
        router.add(0x2100, 0x200, Registers())
    with pytest.raises(ValueError, match="overlaps"):
        router.add(0x1F00, 0x101, Registers())
    router.add(0x2200, 0x200, Registers())  # exactly between: fine
    assert router.lookup(0x2404, 4) == (b, 4)
    assert router.lookup(0x21FC, 4) == (a, 0x1FC)
    assert router.lookup(0x21FE, 4) is None
    assert router.lookup(0x1FFF, 1) is None
    assert router.lookup(0x2600, 1) is None


async def test_shutdown_completes_a_slot_still_held_by_a_slow_access():
    """Cancelling the server (SIGTERM) must not leave a vCPU waiting in Xen."""
    xen = FakeXen(vcpus=1)
    regs = Registers()
    regs.gate = trio.Event()  # never set: the access would wait forever
    router = MmioRouter()
    router.add(BASE, 0x200, regs)
    async with trio.open_nursery() as nursery:
        await nursery.start(IoreqServer(xen, router).serve)
        xen.post(0, addr=BASE + 0x20, size=4, is_read=True)
        with trio.fail_after(5):
            while xen.slot(0).state != abi.IoreqState.INPROCESS:
                await trio.sleep(0.001)
        nursery.cancel_scope.cancel()
    slot = xen.slot(0)
    assert slot.state == abi.IoreqState.IORESP_READY and slot.data == 0xFFFFFFFF
    assert xen.evtchn.notified == [LOCAL_PORT_BASE]


class TaskSteps(trio.abc.Instrument):
    """Counts the steps each task takes."""

    def __init__(self) -> None:
        self.steps: dict[str, int] = {}

    def before_task_step(self, task) -> None:
        self.steps[task.name] = self.steps.get(task.name, 0) + 1


async def test_while_trio_sleeps_ioreqs_are_served_without_a_task_switch(served):
    """When trio has nothing to run it would sleep in its epoll; the event
    channel is then served from the run loop itself (the instrument of
    xen.ioreq_server), so an access wakes no task at all. With the trio this
    project installs, that path must be the one taken."""
    xen, _regs, _server = served
    steps = TaskSteps()
    trio.lowlevel.add_instrument(steps)
    try:
        done = trio.Event()

        def guest() -> None:  # another thread: trio is asleep meanwhile
            for vcpu in range(4):
                xen.post(vcpu, addr=BASE + 4 * vcpu, size=4, is_read=True)
                while xen.slot(vcpu).state != abi.IoreqState.IORESP_READY:
                    pass
            trio.from_thread.run_sync(done.set)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, guest)
            with trio.fail_after(5):
                await done.wait()
    finally:
        trio.lowlevel.remove_instrument(steps)
    assert [xen.slot(v).data for v in range(4)] == [0x1000, 0x1004, 0x1008, 0x100C]
    assert not [name for name in steps.steps if "IoreqServer" in name]


async def test_a_deferred_completion_wakes_trio_at_once(served):
    """An access answered by an awaitable becomes a task; trio, about to
    sleep until its next deadline, must run it now rather than then."""
    xen, regs, _server = served
    regs.gate = trio.Event()
    regs.gate.set()  # the slow read finishes as soon as its task runs
    notified = trio.Event()
    notify = xen.evtchn.notify

    def notify_and_tell(port: int) -> None:
        notify(port)
        notified.set()

    xen.evtchn.notify = notify_and_tell
    with trio.fail_after(5):  # the only deadline: trio would sleep 5 s
        xen.post(2, addr=BASE + 0x20, size=4, is_read=True)
        await notified.wait()
    assert xen.slot(2).data == 0xABCD and xen.evtchn.notified == [LOCAL_PORT_BASE + 2]


async def test_watched_fds_are_served_with_the_ioreqs_without_a_task_switch(served):
    """A device's call eventfd handed to IoreqServer.watch: each signal runs
    the callback from the run loop that serves the ioreqs, with no task
    step; after unwatch, signals go unseen."""
    _xen, _regs, server = served
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    seen = []
    steps = TaskSteps()
    try:
        server.watch(fd, lambda: seen.append(os.eventfd_read(fd)))
        with pytest.raises(ValueError, match="watched already"):
            server.watch(fd, lambda: None)
        trio.lowlevel.add_instrument(steps)
        try:
            for n in (1, 2, 3):
                await trio.to_thread.run_sync(os.eventfd_write, fd, n)
                with trio.fail_after(5):
                    while len(seen) < n:
                        await trio.sleep(0.001)
        finally:
            trio.lowlevel.remove_instrument(steps)
        assert seen == [1, 2, 3]
        assert not [name for name in steps.steps if "IoreqServer" in name], steps.steps
        server.unwatch(fd)
        os.eventfd_write(fd, 5)
        await trio.sleep(0.05)
        assert seen == [1, 2, 3]
        assert os.eventfd_read(fd) == 5  # still there: nobody read it
    finally:
        os.close(fd)


async def test_a_watcher_that_raises_is_dropped_and_the_ioreqs_go_on(served, caplog):
    xen, _regs, server = served
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    calls = []

    def broken() -> None:
        calls.append(os.eventfd_read(fd))
        raise RuntimeError("a bug in a device")

    try:
        server.watch(fd, broken)
        os.eventfd_write(fd, 1)
        with trio.fail_after(5):
            while not calls:
                await trio.sleep(0.001)
        os.eventfd_write(fd, 1)
        xen.post(1, addr=BASE + 4, size=4, is_read=True)
        assert (await until_completed(xen, 1)).data == 0x1004
        assert calls == [1]
        assert "a bug in a device" in caplog.text and f"handling fd {fd}; no longer watching it" in caplog.text
        server.watch(fd, lambda: calls.append(os.eventfd_read(fd)))  # it may be watched again
        with trio.fail_after(5):
            while len(calls) < 2:
                await trio.sleep(0.001)
    finally:
        server.unwatch(fd)
        os.close(fd)
