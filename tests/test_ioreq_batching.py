"""The IOREQ loop with an event channel that unmasks and notifies in one
call (the simulator's): every port of a batch unmasked before any notify,
every access completed in the batch notified once in that call, and an
access completed later notified on its own."""

from __future__ import annotations

import trio

from tests.test_ioreq_server import BASE, LOCAL_PORT_BASE, FakeEventChannel, FakeXen, Registers, until_completed
from xen.ioreq_server import IoreqServer, MmioRouter


class BatchingEventChannel(FakeEventChannel):
    def __init__(self) -> None:
        super().__init__()
        self.batches: list[tuple[list[int], list[int]]] = []

    def unmask_and_notify(self, unmask_ports, notify_ports) -> None:
        self.batches.append((list(unmask_ports), list(notify_ports)))


async def serve(nursery) -> tuple[FakeXen, Registers, BatchingEventChannel]:
    xen = FakeXen(vcpus=4)
    xen.evtchn = evtchn = BatchingEventChannel()
    regs = Registers()
    router = MmioRouter()
    router.add(BASE, 0x200, regs)
    await nursery.start(IoreqServer(xen, router).serve)
    return xen, regs, evtchn


def post_quietly(xen: FakeXen, vcpu: int, **kwargs) -> int:
    """Fill a slot as post() does, but fire its port later (with others)."""
    fire, xen.evtchn.fire = xen.evtchn.fire, lambda *ports: None
    try:
        xen.post(vcpu, **kwargs)
    finally:
        xen.evtchn.fire = fire
    return LOCAL_PORT_BASE + vcpu


async def test_a_batch_is_unmasked_and_notified_in_one_call(nursery):
    xen, regs, evtchn = await serve(nursery)
    ports = [
        post_quietly(xen, 0, addr=BASE + 0x8, size=4, is_read=True),
        post_quietly(xen, 1, addr=BASE + 0x70, size=4, is_read=False, data=7),
        post_quietly(xen, 2, addr=BASE + 0x10, size=4, is_read=True),  # rejected: still completed
    ]
    evtchn.fire(*ports)
    for vcpu in range(3):
        await until_completed(xen, vcpu)
    assert evtchn.batches == [(ports, ports)]
    assert evtchn.unmasked == [] and evtchn.notified == []  # nothing on the side
    assert xen.slot(0).data == 0x1008 and regs.writes == [(0x70, 4, 7)]


async def test_an_access_completed_later_is_notified_on_its_own(nursery):
    xen, regs, evtchn = await serve(nursery)
    regs.gate = trio.Event()
    slow = post_quietly(xen, 3, addr=BASE + 0x20, size=4, is_read=True)
    fast = post_quietly(xen, 0, addr=BASE + 0x8, size=4, is_read=True)
    evtchn.fire(slow, fast)
    await until_completed(xen, 0)
    assert evtchn.batches == [([slow, fast], [fast])]  # unmasked with the batch, not yet done
    regs.gate.set()
    assert (await until_completed(xen, 3)).data == 0xABCD
    assert evtchn.notified == [slow] and len(evtchn.batches) == 1
