"""The guest op vcpu_loop: vCPUs loading in a loop inside the simulator,
each access over the whole trap path to a device model (HandDM, written
out by hand) and back. Every simulator is a real child process."""

from __future__ import annotations

from collections import Counter

import pytest
import trio

from xen.sim.guest import GuestError, GuestRequestError, SimGuest
from tests.test_sim_hypervisor import BASE, HandDM


async def test_every_access_of_the_loop_is_a_real_ioreq(start_sim, connect):
    sim = start_sim(vcpus=2)
    dm = HandDM(connect(sim))
    values = {0: 0x11, 1: 0x22}
    dm.answer = lambda vcpu, req: values[vcpu]
    async with trio.open_nursery() as nursery, SimGuest.open(sim.control_path) as guest:
        await nursery.start(dm.run)
        with trio.fail_after(10):
            samples, took = await guest.vcpu_loop([(0, BASE + 0x10), (1, BASE + 0x20)], 0.2, size=2)
        nursery.cancel_scope.cancel()
    # One latency per completed access, and the device model saw exactly
    # those accesses: 2-byte reads, each vCPU at its own address.
    assert len(samples) == len(dm.seen) > 10
    assert all(0 < ns < took * 1e9 for ns in samples)
    assert 0.2 <= took < 5
    per_vcpu = Counter((vcpu, req.addr, req.size, req.is_read) for vcpu, req in dm.seen)
    assert set(per_vcpu) == {(0, BASE + 0x10, 2, True), (1, BASE + 0x20, 2, True)}
    assert min(per_vcpu.values()) > 3  # both ran, concurrently


async def test_one_at_a_time_walks_the_plan_in_order(start_sim, connect):
    sim = start_sim(vcpus=3)
    dm = HandDM(connect(sim))
    in_flight = []

    async def answer_later(vcpu):
        in_flight.append(vcpu)
        assert len(in_flight) == 1, "two accesses in flight"
        await trio.sleep(0)
        in_flight.remove(vcpu)
        return 0

    dm.answer = lambda vcpu, req: answer_later(vcpu)
    plan = [(2, BASE), (0, BASE + 4), (1, BASE + 8)]
    async with trio.open_nursery() as nursery, SimGuest.open(sim.control_path) as guest:
        await nursery.start(dm.run)
        with trio.fail_after(10):
            samples, _ = await guest.vcpu_loop(plan, 0.2, one_at_a_time=True)
        nursery.cancel_scope.cancel()
    seen = [(vcpu, req.addr) for vcpu, req in dm.seen]
    assert len(samples) == len(seen) > 6
    assert seen == [plan[i % 3] for i in range(len(seen))]


async def test_a_failed_access_ends_the_loop_with_its_explanation(start_sim, connect):
    sim = start_sim()
    dm = HandDM(connect(sim))
    async with trio.open_nursery() as nursery, SimGuest.open(sim.control_path) as guest:
        await nursery.start(dm.run)
        with trio.fail_after(10):
            with pytest.raises(GuestRequestError, match=r"data abort.*0x2000400.*\(EIO\)$"):
                await guest.vcpu_loop([(0, BASE + 0x400)], 0.2)
            assert not dm.seen
            # The vCPU is the guest's again.
            assert await guest.vcpus[0].read(BASE, 4) == 0
        nursery.cancel_scope.cancel()


async def test_a_device_model_that_never_answers_ends_the_loop(start_sim, connect):
    sim = start_sim(extra_args=("--vcpu-timeout", "0.3"))
    HandDM(connect(sim))  # bound, but nobody serves its event channel
    async with SimGuest.open(sim.control_path) as guest:
        with trio.fail_after(10), pytest.raises(GuestRequestError, match="vcpu hung: vCPU 0 waited 0.3 s"):
            await guest.vcpu_loop([(0, BASE)], 2)


async def test_the_guest_cannot_use_a_vcpu_while_it_loops(start_sim, connect):
    sim = start_sim(vcpus=2)
    dm = HandDM(connect(sim))
    refused = []

    async def access_during_the_loop():
        await dm.wait_seen(3)
        with pytest.raises(GuestError, match="running a vcpu_loop"):
            await guest.vcpus[0].read(BASE, 4)
        refused.append(True)
        assert await guest.vcpus[1].read(BASE + 4, 4) == 0  # the other vCPU is the guest's

    async with trio.open_nursery() as nursery, SimGuest.open(sim.control_path) as guest:
        await nursery.start(dm.run)
        with trio.fail_after(10):
            async with trio.open_nursery() as inner:
                inner.start_soon(access_during_the_loop)
                await guest.vcpu_loop([(0, BASE)], 0.3)
            assert refused
            assert await guest.vcpus[0].read(BASE, 4) == 0
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"vcpus": [0], "addrs": [BASE, BASE], "size": 4, "ms": 10}, "1 vCPUs but 2 addresses"),
        ({"vcpus": [0], "addrs": [BASE], "size": 3, "ms": 10}, "size 3"),
        ({"vcpus": [0], "addrs": [BASE], "size": 4, "ms": 0}, "ms 0"),
        ({"vcpus": [0], "addrs": [BASE], "size": 4, "ms": 60_001}, "ms 60001"),
        ({"vcpus": [0, 0], "addrs": [BASE, BASE], "size": 4, "ms": 10}, "listed twice"),
        ({"vcpus": [2], "addrs": [BASE], "size": 4, "ms": 10}, "no vCPU 2"),
        ({"vcpus": [], "addrs": [], "size": 4, "ms": 10}, "1 to"),
        ({"vcpus": [0], "addrs": [BASE], "size": 4, "ms": 1.5}, "must be an integer"),
    ],
)
async def test_malformed_loops_are_refused_clearly(start_sim, connect, fields, message):
    sim = start_sim(vcpus=2)
    async with SimGuest.open(sim.control_path) as guest:
        # (The errno is in the message: keeping the exception would keep this
        # frame, and the guest's RAM mapping, alive until a GC.)
        with trio.fail_after(10), pytest.raises(GuestRequestError, match=message + r".*\((EINVAL|EBADMSG)\)$"):
            await guest._request("vcpu_loop", **fields)
        assert await guest.devices() == []  # the connection still serves
