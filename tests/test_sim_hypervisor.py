"""The Xen simulator, driven from both sides: a device model written out by
hand against SimHypervisor/SimEventChannel (the consume/complete order of
docs/xen-ioreq.md, step by step), and the guest through SimGuest. Every
simulator is a real child process, stopped by PID at the end of its test."""

from __future__ import annotations

import errno
import inspect
import mmap
import struct

import pytest
import trio

from xen import abi
from xen.hypervisor import HypervisorError, HypervisorUnavailable
from xen.sim.client import SimHypervisor, SimHypervisorError
from xen.sim.guest import DeviceModelGone, DomainCrashed, GuestAccessFault, SimGuest, VcpuHung

BASE = 0x02000000  # libxl's first virtio-mmio window
WINDOW = (BASE, BASE + 0x1FF)
READY = abi.IoreqState.IOREQ_READY
INPROCESS = abi.IoreqState.INPROCESS
IORESP_READY = abi.IoreqState.IORESP_READY



def slot_state(page, vcpu: int) -> int:
    return page[vcpu * abi.IOREQ_SIZE + abi.OFF_FLAGS] & abi.STATE_MASK


def vp_eport(page, vcpu: int) -> int:
    return struct.unpack_from("<I", page, vcpu * abi.IOREQ_SIZE + abi.OFF_VP_EPORT)[0]


class HandDM:
    """A device model spelled out: set-up in the documented order, and a loop
    that reads pending ports, unmasks them, takes READY slots (INPROCESS),
    answers, sets IORESP_READY and notifies."""

    def __init__(self, hv: SimHypervisor, *, ranges=(WINDOW,), enable=True, bind=True) -> None:
        self.hv = hv
        self.nr_vcpus = hv.nr_vcpus()
        self.server = hv.create_ioreq_server()
        self.pages = hv.map_ioreq_pages(self.server)
        self.page = self.pages.ioreq
        if enable:
            hv.set_ioreq_server_state(self.server, True)
        self.evtchn = hv.open_event_channel()
        self.port_vcpu: dict[int, int] = {}
        self.vcpu_port: dict[int, int] = {}
        if bind:
            self.bind_all()
        for start, end in ranges:
            hv.map_mmio_range(self.server, start, end)
        self.seen: list[tuple[int, abi.Ioreq]] = []
        self.spurious = 0
        self.answer = lambda vcpu, req: 0
        self._took = trio.Event()

    def bind_all(self) -> None:
        for vcpu in range(self.nr_vcpus):
            local = self.evtchn.bind_interdomain(self.hv.domid, vp_eport(self.page, vcpu))
            self.port_vcpu[local] = vcpu
            self.vcpu_port[vcpu] = local

    async def wait_seen(self, count: int = 1) -> None:
        """Wait until the device model has taken ``count`` ioreqs in all."""
        while len(self.seen) < count:
            await self._took.wait()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                await trio.lowlevel.wait_readable(self.evtchn.fileno())
                ports = self.evtchn.read_pending()  # 1. pending local ports
                if not ports:
                    continue
                self.evtchn.unmask(ports)  # 2. unmask them
                for port in ports:
                    self.take(port, nursery)

    def take(self, port: int, nursery) -> None:
        vcpu = self.port_vcpu.get(port)  # 3. which vCPU
        if vcpu is None:
            return
        off = vcpu * abi.IOREQ_SIZE
        flags = self.page[off + abi.OFF_FLAGS]
        if flags & abi.STATE_MASK != READY:
            self.spurious += 1  # e.g. the notification bind_interdomain sets
            return
        self.page[off + abi.OFF_FLAGS] = (flags & ~abi.STATE_MASK) | INPROCESS  # 4.
        req = abi.Ioreq.unpack(self.page, off)
        self.seen.append((vcpu, req))
        took, self._took = self._took, trio.Event()
        took.set()
        result = self.answer(vcpu, req)  # 5.
        if inspect.isawaitable(result):
            nursery.start_soon(self._complete_later, vcpu, port, req, result)
        else:
            self.complete(vcpu, port, req, result)

    async def _complete_later(self, vcpu, port, req, awaitable) -> None:
        self.complete(vcpu, port, req, await awaitable)

    def complete(self, vcpu: int, port: int, req: abi.Ioreq, value) -> None:
        off = vcpu * abi.IOREQ_SIZE
        if req.is_read:
            struct.pack_into("<Q", self.page, off + abi.OFF_DATA, (value or 0) & 0xFFFFFFFFFFFFFFFF)
        flags = self.page[off + abi.OFF_FLAGS]
        self.page[off + abi.OFF_FLAGS] = (flags & ~abi.STATE_MASK) | IORESP_READY  # 6.
        self.evtchn.notify(port)  # 7.


# --- ioreqs -------------------------------------------------------------------


async def test_read_returns_what_the_device_model_answered(start_sim, connect):
    sim = start_sim()
    dm = HandDM(connect(sim))
    dm.answer = lambda vcpu, req: 0x74726976
    async with trio.open_nursery() as nursery, SimGuest.open(sim.control_path) as guest:
        await nursery.start(dm.run)
        with trio.fail_after(5):
            assert await guest.vcpus[0].read(BASE, 4) == 0x74726976
        nursery.cancel_scope.cancel()
    [(vcpu, req)] = dm.seen
    assert vcpu == 0
    assert (req.addr, req.size, req.count, req.type, req.is_read) == (BASE, 4, 1, abi.IoreqType.COPY, True)
    assert (req.df, req.data_is_ptr, req.data, req.state) == (False, False, 0, INPROCESS)
    assert req.vp_eport == vp_eport(dm.page, 0)
    assert dm.spurious >= 1  # bind_interdomain's conservative notification
    assert slot_state(dm.page, 0) == abi.IoreqState.NONE  # Xen consumed the response


async def test_writes_arrive_masked_to_their_size(start_sim, connect):
    sim = start_sim()
    dm = HandDM(connect(sim))
    async with trio.open_nursery() as nursery, SimGuest.open(sim.control_path) as guest:
        await nursery.start(dm.run)
        vcpu = guest.vcpus[0]
        with trio.fail_after(5):
            await vcpu.write(BASE + 0x70, 1, 0x1234)
            await vcpu.write(BASE + 0x72, 2, 0xDEADBEEF)
            await vcpu.write(BASE + 0x74, 4, 0x1122334455667788)
            await vcpu.write(BASE + 0x78, 8, 0xFEDCBA9876543210)
        nursery.cancel_scope.cancel()
    got = [(r.addr, r.size, r.data, r.is_read, r.type, r.count) for _, r in dm.seen]
    assert got == [
        (BASE + 0x70, 1, 0x34, False, abi.IoreqType.COPY, 1),
        (BASE + 0x72, 2, 0xBEEF, False, abi.IoreqType.COPY, 1),
        (BASE + 0x74, 4, 0x55667788, False, abi.IoreqType.COPY, 1),
        (BASE + 0x78, 8, 0xFEDCBA9876543210, False, abi.IoreqType.COPY, 1),
    ]


async def test_read_results_are_masked_to_the_access_size(start_sim, connect):
    sim = start_sim()
    dm = HandDM(connect(sim))
    dm.answer = lambda vcpu, req: 0xFFFFFFFFFFFFFFFF
    async with trio.open_nursery() as nursery, SimGuest.open(sim.control_path) as guest:
        await nursery.start(dm.run)
        with trio.fail_after(5):
            assert await guest.vcpus[0].read(BASE, 1) == 0xFF
            assert await guest.vcpus[0].read(BASE, 2) == 0xFFFF
            assert await guest.vcpus[0].read(BASE, 8) == 0xFFFFFFFFFFFFFFFF
        nursery.cancel_scope.cancel()


async def test_vp_eport_is_valid_only_after_enable(start_sim, connect):
    sim = start_sim(vcpus=3)
    hv = connect(sim)
    server = hv.create_ioreq_server()
    page = hv.map_ioreq_pages(server).ioreq
    assert [vp_eport(page, i) for i in range(3)] == [0, 0, 0]
    with hv.open_event_channel() as evtchn:
        with pytest.raises(SimHypervisorError) as info:
            evtchn.bind_interdomain(hv.domid, 0)
        assert info.value.errno == errno.EINVAL
        hv.set_ioreq_server_state(server, True)
        remote = [vp_eport(page, i) for i in range(3)]
        assert len(set(remote)) == 3 and all(p > 0 for p in remote)
        local = [evtchn.bind_interdomain(hv.domid, p) for p in remote]
        assert len(set(local)) == 3 and not set(local) & set(remote)
        with pytest.raises(SimHypervisorError, match="already bound"):
            evtchn.bind_interdomain(hv.domid, remote[0])
        with pytest.raises(SimHypervisorError, match="no domain with domid 9"):
            evtchn.bind_interdomain(9, remote[0])
        # set_ioreq_server_state(0) leaves the ports written, as Xen does.
        hv.set_ioreq_server_state(server, False)
        assert [vp_eport(page, i) for i in range(3)] == remote
        for port in local:
            evtchn.unbind(port)
        with pytest.raises(SimHypervisorError) as info:
            evtchn.unbind(local[0])
        assert info.value.errno == errno.ENOTCONN
    page.close()


async def test_enabling_before_acquiring_the_page_leaves_vp_eport_unset(start_sim, connect):
    """Xen writes vp_eport at enable only if the page exists; afterwards the
    slot's port is wrong and Xen refuses to forward (a data abort)."""
    sim = start_sim()
    hv = connect(sim)
    server = hv.create_ioreq_server()
    hv.set_ioreq_server_state(server, True)
    page = hv.map_ioreq_pages(server).ioreq
    assert vp_eport(page, 0) == 0
    hv.map_mmio_range(server, *WINDOW)
    async with SimGuest.open(sim.control_path) as guest:
        with trio.fail_after(5), pytest.raises(GuestAccessFault, match="bad event channel 0"):
            await guest.vcpus[0].read(BASE, 4)
    page.close()


async def test_two_vcpus_wait_concurrently(start_sim, connect):
    sim = start_sim(vcpus=2)
    dm = HandDM(connect(sim))
    both_in = trio.Event()

    async def hold_until_both_in(value):
        await both_in.wait()
        return value

    def answer(vcpu, req):
        if len(dm.seen) == 2:
            both_in.set()
        return hold_until_both_in(0x100 + vcpu)

    dm.answer = answer
    results = {}
    async with trio.open_nursery() as nursery, SimGuest.open(sim.control_path) as guest:
        await nursery.start(dm.run)

        async def access(i):
            results[i] = await guest.vcpus[i].read(BASE + 4 * i, 4)

        with trio.fail_after(5):
            async with trio.open_nursery() as vcpus:
                vcpus.start_soon(access, 0)
                vcpus.start_soon(access, 1)
        nursery.cancel_scope.cancel()
    assert results == {0: 0x100, 1: 0x101}
    assert sorted((v, r.addr) for v, r in dm.seen) == [(0, BASE), (1, BASE + 4)]


async def test_an_address_nobody_serves_is_a_data_abort(start_sim, connect):
    sim = start_sim()
    dm = HandDM(connect(sim))
    async with trio.open_nursery() as nursery, SimGuest.open(sim.control_path) as guest:
        await nursery.start(dm.run)
        vcpu = guest.vcpus[0]
        with trio.fail_after(5):
            with pytest.raises(GuestAccessFault, match="0x2000200"):
                await vcpu.read(BASE + 0x200, 4)
            with pytest.raises(GuestAccessFault):
                await vcpu.write(BASE + 0x1FE, 4, 0)  # straddles the end of the range
            assert await vcpu.read(BASE + 0x1FC, 4) == 0
            dm.hv.set_ioreq_server_state(dm.server, False)  # a disabled server serves nothing
            with pytest.raises(GuestAccessFault):
                await vcpu.read(BASE, 4)
            dm.hv.set_ioreq_server_state(dm.server, True)
            dm.hv.unmap_mmio_range(dm.server, BASE + 0x100, BASE + 0x1FF)
            with pytest.raises(GuestAccessFault):
                await vcpu.read(BASE + 0x100, 4)
            assert await vcpu.read(BASE + 0xFC, 4) == 0
        nursery.cancel_scope.cancel()
    with pytest.raises(SimHypervisorError) as info:
        dm.hv.unmap_mmio_range(dm.server, BASE + 0x100, BASE + 0x1FF)
    assert info.value.errno == errno.ENOENT


async def test_a_device_model_that_never_answers_hangs_the_vcpu(start_sim, connect):
    sim = start_sim(extra_args=("--vcpu-timeout", "0.3"))
    dm = HandDM(connect(sim))
    async with SimGuest.open(sim.control_path) as guest:
        with trio.fail_after(5):
            with pytest.raises(VcpuHung, match="vCPU 0 waited 0.3 s") as info:
                await guest.vcpus[0].read(BASE + 8, 4)
        assert "masked" in str(info.value)  # the port was delivered and never unmasked/taken
        # The slot is left as Xen left it: still the device model's to finish.
        assert slot_state(dm.page, 0) == READY
        with trio.fail_after(5), pytest.raises(VcpuHung, match="still blocked"):
            await guest.vcpus[0].read(BASE, 4)
        # A late completion clears it, and the vCPU runs again.
        async with trio.open_nursery() as nursery:
            await nursery.start(dm.run)
            dm.evtchn.unmask(list(dm.port_vcpu))
            with trio.fail_after(5):
                while slot_state(dm.page, 0) != abi.IoreqState.NONE:
                    await trio.sleep(0.01)
                assert await guest.vcpus[0].read(BASE, 4) == 0
            nursery.cancel_scope.cancel()
    assert "vcpu hung" in sim.log_text()


async def test_delivered_ports_stay_masked_until_unmasked(start_sim, connect):
    sim = start_sim()
    dm = HandDM(connect(sim))
    evtchn = dm.evtchn
    [local] = dm.port_vcpu
    with trio.fail_after(5):
        await trio.lowlevel.wait_readable(evtchn.fileno())
    assert evtchn.read_pending() == [local]  # bind_interdomain's notification; now masked
    assert evtchn.read_pending() == []

    async def complete_by_hand(value):
        """Serve the slot without reading the event channel (it stays masked)."""
        while slot_state(dm.page, 0) != READY:
            await trio.sleep(0.002)
        req = abi.Ioreq.unpack(dm.page, 0)
        dm.page[abi.OFF_FLAGS] = (dm.page[abi.OFF_FLAGS] & ~abi.STATE_MASK) | INPROCESS
        dm.complete(0, local, req, value)

    async with trio.open_nursery() as nursery, SimGuest.open(sim.control_path) as guest:
        for value in (0x11, 0x22, 0x33):  # three accesses: three events on the masked port
            nursery.start_soon(complete_by_hand, value)
            with trio.fail_after(5):
                assert await guest.vcpus[0].read(BASE, 2) == value
        assert evtchn.read_pending() == []  # fired while masked: remembered, not delivered
        evtchn.unmask([local])
        with trio.fail_after(5):
            await trio.lowlevel.wait_readable(evtchn.fileno())
        await trio.sleep(0.02)
        assert evtchn.read_pending() == [local]  # delivered once at unmask, the three merged
        assert evtchn.read_pending() == []
        # Masked again until unmasked: an access now is remembered, not delivered ...
        result = []

        async def access():
            result.append(await guest.vcpus[0].read(BASE, 2))

        nursery.start_soon(access)
        with trio.fail_after(5):
            while slot_state(dm.page, 0) != READY:
                await trio.sleep(0.002)
        assert evtchn.read_pending() == []
        # ... and unmasking delivers it, for the consume/complete loop to serve.
        evtchn.unmask([local])
        dm.answer = lambda vcpu, req: 0xBEEF
        await nursery.start(dm.run)
        with trio.fail_after(5):
            while not result:
                await trio.sleep(0.002)
        assert result == [0xBEEF]
        nursery.cancel_scope.cancel()


async def test_a_slot_left_inprocess_is_not_lost(start_sim, connect):
    """Notifying with the slot still INPROCESS keeps the vCPU waiting (as
    the kernel's ioeventfd path may do); IORESP_READY later completes it."""
    sim = start_sim()
    dm = HandDM(connect(sim))
    release = trio.Event()

    async def slow(value):
        await release.wait()
        return value

    dm.answer = lambda vcpu, req: slow(0x55)
    async with trio.open_nursery() as nursery, SimGuest.open(sim.control_path) as guest:
        await nursery.start(dm.run)
        result = []

        async def access():
            result.append(await guest.vcpus[0].read(BASE, 1))

        nursery.start_soon(access)
        with trio.fail_after(5):
            await dm.wait_seen(1)
        dm.evtchn.notify(dm.vcpu_port[0])  # state INPROCESS: nothing to complete
        await trio.sleep(0.05)
        assert result == []
        release.set()
        with trio.fail_after(5):
            while not result:
                await trio.sleep(0.005)
        assert result == [0x55]
        nursery.cancel_scope.cancel()


async def test_a_state_going_backwards_crashes_the_domain(start_sim, connect):
    sim = start_sim()
    dm = HandDM(connect(sim))
    async with trio.open_nursery() as nursery, SimGuest.open(sim.control_path) as guest:
        dm.answer = lambda vcpu, req: trio.sleep_forever()
        await nursery.start(dm.run)

        async def access():
            with pytest.raises(DomainCrashed, match="INPROCESS -> IOREQ_READY"):
                await guest.vcpus[0].read(BASE, 4)

        async with trio.open_nursery() as inner:
            inner.start_soon(access)
            with trio.fail_after(5):
                await dm.wait_seen(1)
            dm.evtchn.notify(dm.vcpu_port[0])  # Xen sees INPROCESS
            await trio.sleep(0.05)
            off = abi.OFF_FLAGS
            dm.page[off] = (dm.page[off] & ~abi.STATE_MASK) | READY  # backwards
            dm.evtchn.notify(dm.vcpu_port[0])
        with trio.fail_after(5), pytest.raises(DomainCrashed):
            await guest.vcpus[0].read(BASE, 4)
        nursery.cancel_scope.cancel()
    assert "crashed" in sim.log_text()


async def test_a_disconnecting_device_model_takes_its_servers_along(start_sim, connect):
    sim = start_sim()
    dm = HandDM(connect(sim))
    dm.answer = lambda vcpu, req: trio.sleep_forever()
    async with SimGuest.open(sim.control_path) as guest:

        async def access():
            with pytest.raises(DeviceModelGone, match="device model gone"):
                await guest.vcpus[0].read(BASE, 4)

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(access)
                async with trio.open_nursery() as dm_nursery:
                    await dm_nursery.start(dm.run)
                    await dm.wait_seen(1)  # the slot is INPROCESS ...
                    dm_nursery.cancel_scope.cancel()
                dm.hv.close()  # ... and the device model goes away
            with pytest.raises(GuestAccessFault):
                await guest.vcpus[0].read(BASE, 4)
    # The server id is free again for the next device model.
    assert connect(sim).create_ioreq_server() == 0


# --- ioreq servers and ranges ---------------------------------------------------


async def test_server_ids_and_limits(start_sim, connect):
    sim = start_sim()
    hv = connect(sim)
    ids = [hv.create_ioreq_server() for _ in range(8)]
    assert ids == list(range(8))
    with pytest.raises(SimHypervisorError) as info:
        hv.create_ioreq_server()
    assert info.value.errno == errno.ENOSPC
    hv.destroy_ioreq_server(3)
    assert hv.create_ioreq_server() == 3
    with pytest.raises(SimHypervisorError) as info:
        hv.destroy_ioreq_server(3) or hv.destroy_ioreq_server(3)
    assert info.value.errno == errno.ENOENT
    other = connect(sim)
    with pytest.raises(SimHypervisorError) as info:
        other.set_ioreq_server_state(0, True)
    assert info.value.errno == errno.EPERM


async def test_buffered_servers_are_refused_on_arm(start_sim, connect):
    hv = connect(start_sim())
    with pytest.raises(HypervisorError, match="only on x86") as info:
        hv.create_ioreq_server(buffered=True)
    assert info.value.errno == errno.EINVAL
    x86 = connect(start_sim(extra_args=("--arch", "x86")))
    server = x86.create_ioreq_server(buffered=True)
    pages = x86.map_ioreq_pages(server)
    assert pages.buffered is not None and len(pages.buffered) == abi.PAGE_SIZE
    assert x86.get_ioreq_server_info(server) > 0
    pages.ioreq.close()
    pages.buffered.close()


async def test_overlapping_ranges(start_sim, connect):
    sim = start_sim()
    hv = connect(sim)
    a = hv.create_ioreq_server()
    hv.map_mmio_range(a, *WINDOW)
    with pytest.raises(SimHypervisorError, match="overlaps") as info:
        hv.map_mmio_range(a, BASE + 0x100, BASE + 0x2FF)
    assert info.value.errno == errno.EEXIST
    with pytest.raises(SimHypervisorError) as info:
        hv.map_mmio_range(a, BASE + 0x10, BASE)  # start above end
    assert info.value.errno == errno.EINVAL
    hv.map_mmio_range(a, BASE + 0x200, BASE + 0x3FF)  # adjacent is fine
    # Across servers Xen accepts the overlap (the newest enabled server wins) ...
    b = hv.create_ioreq_server()
    hv.map_mmio_range(b, BASE, BASE + 0xFF)
    assert "overlaps" in sim.log_text()
    # ... and --strict-ranges refuses it.
    strict = connect(start_sim(extra_args=("--strict-ranges",)))
    s1, s2 = strict.create_ioreq_server(), strict.create_ioreq_server()
    strict.map_mmio_range(s1, *WINDOW)
    with pytest.raises(SimHypervisorError, match="overlaps") as info:
        strict.map_mmio_range(s2, BASE + 0x1F0, BASE + 0x20F)
    assert info.value.errno == errno.EEXIST


async def test_accesses_go_to_the_highest_numbered_server_that_holds_them(start_sim, connect):
    sim = start_sim()
    low = HandDM(connect(sim), ranges=[(BASE, BASE + 0xFFF)])
    high = HandDM(connect(sim), ranges=[(BASE, BASE + 0xFF)])
    low.answer = lambda vcpu, req: 1
    high.answer = lambda vcpu, req: 2
    async with trio.open_nursery() as nursery, SimGuest.open(sim.control_path) as guest:
        await nursery.start(low.run)
        await nursery.start(high.run)
        vcpu = guest.vcpus[0]
        with trio.fail_after(5):
            assert await vcpu.read(BASE, 4) == 2
            assert await vcpu.read(BASE + 0xFE, 4) == 1  # straddles high's range: only low holds it all
            assert await vcpu.read(BASE + 0x800, 4) == 1
        nursery.cancel_scope.cancel()


# --- interrupts ---------------------------------------------------------------------


async def test_edges_reach_the_guest_handler(start_sim, connect):
    sim = start_sim()
    hv = connect(sim)
    async with SimGuest.open(sim.control_path) as guest:
        entered = trio.Event()
        go_on = trio.Event()
        runs = []

        async def handler():
            runs.append(guest.irq_level(33))
            entered.set()
            if len(runs) == 1:
                await go_on.wait()

        guest.on_irq(33, handler)
        with trio.fail_after(5):
            hv.set_irq_level(33, 1)
            await entered.wait()  # the handler is running
            hv.set_irq_level(33, 0)
            hv.set_irq_level(33, 1)  # a second edge while it runs: latched
            await guest.wait_irq_edges(33, 2)
            go_on.set()
            while guest.handler_runs(33) < 2:
                await trio.sleep(0.005)
        assert guest.edge_count(33) == 2
        assert len(runs) == 2
        assert guest.irq_level(33) == 1


async def test_every_assert_is_an_edge_in_xens_vgic(start_sim, connect):
    """vgic_inject_irq() ignores level 0 and latches every level 1."""
    sim = start_sim()
    hv = connect(sim)
    async with SimGuest.open(sim.control_path) as guest:
        hv.set_irq_level(40, 1)
        hv.set_irq_level(40, 1)
        hv.set_irq_level(40, 0)
        hv.set_irq_level(40, 0)
        with trio.fail_after(5):
            await guest.wait_irq_edges(40, 2)
            while guest.irq_level(40) != 0:
                await trio.sleep(0.005)
        assert guest.edge_count(40) == 2


async def test_a_line_that_stays_high_is_not_redelivered_in_the_line_model(start_sim, connect):
    sim = start_sim(extra_args=("--irq-model", "line"))
    hv = connect(sim)
    async with SimGuest.open(sim.control_path) as guest:
        handled = []

        async def handler():
            handled.append(1)

        guest.on_irq(34, handler)
        hv.set_irq_level(34, 1)
        hv.set_irq_level(34, 1)  # stays high: nothing new
        with trio.fail_after(5):
            await guest.wait_irq_edges(34, 1)
            await trio.sleep(0.05)
        assert guest.edge_count(34) == 1
        hv.set_irq_level(34, 0)
        hv.set_irq_level(34, 1)
        with trio.fail_after(5):
            await guest.wait_irq_edges(34, 2)
            while guest.handler_runs(34) < 2:
                await trio.sleep(0.005)
        assert handled == [1, 1]


async def test_edges_before_the_guest_attaches_stay_latched(start_sim, connect):
    sim = start_sim()
    hv = connect(sim)
    hv.set_irq_level(35, 1)
    async with SimGuest.open(sim.control_path) as guest:
        ran = trio.Event()

        async def handler():
            ran.set()

        guest.on_irq(35, handler)
        with trio.fail_after(5):
            await ran.wait()
        assert guest.irq_level(35) == 1


async def test_only_spis_and_levels_0_1_are_accepted(start_sim, connect):
    hv = connect(start_sim())
    for irq in (0, 31, 1020, 5000):
        with pytest.raises(SimHypervisorError, match="not an SPI") as info:
            hv.set_irq_level(irq, 1)
        assert info.value.errno == errno.EINVAL
    with pytest.raises(SimHypervisorError, match="neither 0 nor 1"):
        hv.set_irq_level(33, 2)
    hv.set_irq_level(32, 1)
    hv.set_irq_level(1019, 1)
    few = connect(start_sim(extra_args=("--nr-spis", "12")))
    few.set_irq_level(43, 1)
    with pytest.raises(SimHypervisorError, match="32 to 43"):
        few.set_irq_level(44, 1)


# --- guest RAM ---------------------------------------------------------------------


async def test_guest_ram_is_shared_with_the_device_model(start_sim, connect):
    sim = start_sim(ram_mib=64)
    hv = connect(sim)
    [region] = hv.guest_ram()
    assert (region.gpa, region.size, region.fd_offset) == (0x40000000, 64 << 20, 0)
    assert hv.guest_ram() == [region]  # cached: the fd stays owned by hv
    ram = mmap.mmap(region.fd, region.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=region.fd_offset)
    async with SimGuest.open(sim.control_path) as guest:
        assert (guest.ram.base, guest.ram.size) == (0x40000000, 64 << 20)
        guest.ram.write(0x40001000, b"written by the guest")
        assert ram[0x1000 : 0x1000 + 20] == b"written by the guest"
        ram[0x2000:0x2005] = b"by dm"
        assert guest.ram.read(0x40002000, 5) == b"by dm"
        view = guest.ram.view(0x40003000, 4)
        view[:] = b"view"
        view.release()
        assert ram[0x3000:0x3004] == b"view"
        for gpa, length in ((0x3FFFFFFF, 1), (0x40000000 + (64 << 20) - 1, 2), (0x80000000, 1)):
            with pytest.raises(ValueError, match=hex(gpa)):
                guest.ram.read(gpa, length)
    ram.close()


async def test_big_guests_get_the_second_arm_ram_bank(start_sim, connect):
    sim = start_sim(ram_mib=3072 + 16)
    banks = [(r.gpa, r.size, r.fd_offset) for r in connect(sim).guest_ram()]
    assert banks == [(0x40000000, 0xC0000000, 0), (0x200000000, 16 << 20, 0xC0000000)]
    async with SimGuest.open(sim.control_path) as guest:
        guest.ram.write(0x200000000, b"bank 1")
        assert guest.ram.read(0x200000000, 6) == b"bank 1"
        with pytest.raises(ValueError):
            guest.ram.read(0xFFFFFFFF, 2)  # across the end of bank 0


# --- errors a user can cause ------------------------------------------------------------


async def test_wrong_domid_and_missing_simulator(start_sim, tmp_path):
    sim = start_sim(domid=3)
    with pytest.raises(HypervisorError) as info:
        SimHypervisor.connect(sim.control_path, 7)
    assert str(info.value) == "no domain with domid 7 (the simulator runs domid 3)"
    assert not isinstance(info.value, HypervisorUnavailable)
    missing = str(tmp_path / "nobody.sock")
    with pytest.raises(HypervisorUnavailable, match=f"^no Xen simulator at {missing} \\("):
        SimHypervisor.connect(missing, 3)
    with SimHypervisor.connect(sim.control_path, 3) as hv:
        assert hv.domid == 3 and hv.nr_vcpus() == 1
    sim.stop()
    with pytest.raises(HypervisorUnavailable, match="no Xen simulator at"):
        SimHypervisor.connect(sim.control_path, 3)


async def test_calls_fail_clearly_once_the_simulator_is_gone(start_sim, connect):
    sim = start_sim()
    hv = connect(sim)
    evtchn = hv.open_event_channel()
    sim.stop()
    with pytest.raises(HypervisorError, match="closed the control connection|lost the Xen simulator"):
        hv.nr_vcpus()
    with pytest.raises(HypervisorError, match="closed it"):
        evtchn.read_pending()


async def test_a_guest_can_attach_again_right_after_the_last_one_left(start_sim):
    """A guest that closes its connection and a new one that attaches at
    once: the new one waits for the old detach instead of EBUSY."""
    sim = start_sim()
    for _ in range(10):
        async with SimGuest.open(sim.control_path) as guest:
            assert len(guest.vcpus) >= 1
