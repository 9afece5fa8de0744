"""The benchmark's baseline: the simulated guest drives the vhost-user
daemon itself, with no bridge in the data path.

:class:`DirectTransport` takes the place of the guest's virtio-mmio
transport driver under the unchanged virtio-blk driver. Its control plane
is the vhost-user protocol instead of MMIO registers: the guest process is
the front-end (features from GET_FEATURES, config from GET_CONFIG, the
simulator's guest RAM memfd in SET_MEM_TABLE, the rings in guest RAM). Its
data plane is two eventfds per queue: a notification writes the daemon's
kick eventfd, and a task waiting on the call eventfd collects the used ring
in place of the interrupt handler. That is the least any front-end can do,
so "through the bridge / direct" is the bridge's cost.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

import trio

from bridge import split_ring as sr
from bridge.device_types import DEVICE_TYPES, guest_features
from bridge.memory import GuestRamMap, PassthroughMemory
from vhost_user.frontend import RingSetup, VhostUserFrontend
from xen.sim.client import SimHypervisor
from xen.sim.guest_memory import GuestAllocator
from xen.sim.guest_virtqueue import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, GuestVirtqueue
from xen.sim.virtio_blk import VirtioBlkDriver
from xen.sim.virtio_mmio_driver import VIRTIO_F_VERSION_1, VirtioMmioDriver

_EFD_FLAGS = os.EFD_NONBLOCK | os.EFD_CLOEXEC
MAX_QUEUE_SIZE = 256


class DirectTransport(VirtioMmioDriver):
    """The guest's own vhost-user front-end, shaped like the virtio-mmio
    transport driver so the virtio-blk driver runs on it unchanged. Build it
    with :func:`open_direct_blk`."""

    def __init__(self, guest: Any, allocator: GuestAllocator, memory: PassthroughMemory,
                 nursery: trio.Nursery) -> None:
        super().__init__(None, guest.ram, allocator, 0, None, guest)
        self.memory = memory
        self.frontend: VhostUserFrontend | None = None
        self._nursery = nursery
        self._fds: dict[int, tuple[int, int]] = {}  # queue -> (kick, call)

    # -- the vhost-user control plane in place of the registers

    async def probe(self, wanted_features: int, *, device_id: int | None = None, vcpu: Any = None) -> None:
        self.device_features = guest_features(self.frontend.device_features)
        self.features = self.device_features & (wanted_features | 1 << VIRTIO_F_VERSION_1)

    async def config_generation(self, *, vcpu: Any = None) -> int:
        return 0  # GET_CONFIG reads the whole config at once

    async def _config_get(self, offset: int, size: int, v: Any) -> int:
        return int.from_bytes(self.frontend.config[offset:offset + size], "little")

    async def fail(self, *, vcpu: Any = None) -> None:
        pass

    async def setup_queue(self, index: int, size: int | None = None, *, vcpu: Any = None,
                          separate_rings: bool = False) -> GuestVirtqueue:
        num = 1 << (min(size or MAX_QUEUE_SIZE, MAX_QUEUE_SIZE).bit_length() - 1)
        kick = os.eventfd(0, _EFD_FLAGS)
        call = os.eventfd(0, _EFD_FLAGS)
        self._fds[index] = (kick, call)

        async def notify(_vcpu: Any) -> None:
            os.eventfd_write(kick, 1)

        vq = GuestVirtqueue.create(self.ram, self.allocator, index, num, notify,
                                   event_idx=self.has_feature(VIRTIO_F_EVENT_IDX),
                                   indirect=self.has_feature(VIRTIO_F_INDIRECT_DESC),
                                   separate_rings=separate_rings)
        self.queues[index] = vq
        return vq

    async def driver_ok(self, *, vcpu: Any = None) -> None:
        ram = self.memory.ram
        rings = []
        for index, vq in self.queues.items():
            kick, call = self._fds[index]
            rings.append(RingSetup(
                index=index, num=vq.size, base=0,
                desc_addr=ram.gpa_to_user(vq.desc_gpa, sr.desc_table_size(vq.size)),
                avail_addr=ram.gpa_to_user(vq.avail_gpa, sr.avail_ring_size(vq.size)),
                used_addr=ram.gpa_to_user(vq.used_gpa, sr.used_ring_size(vq.size)),
                kick_fd=kick, call_fd=call))
        await self.frontend.start(self.features, self.memory.regions, rings)
        for index, vq in self.queues.items():
            self._nursery.start_soon(self._collect_on_call, vq, self._fds[index][1])

    async def _collect_on_call(self, vq: GuestVirtqueue, call: int) -> None:
        """The interrupt handler's part: used buffers on every call."""
        while True:
            await trio.lowlevel.wait_readable(call)
            try:
                os.eventfd_read(call)
            except BlockingIOError:
                continue
            vq.collect_used()

    async def reset(self, *, vcpu: Any = None) -> None:
        if self.queues and self.frontend is not None:
            await self.frontend.stop(sorted(self.queues))
        queues, self.queues = self.queues, {}
        for vq in queues.values():
            await vq.delete("device reset")
        self.features = 0

    def close_fds(self) -> None:
        for kick, call in self._fds.values():
            for fd in (kick, call):
                trio.lowlevel.notify_closing(fd)
                os.close(fd)
        self._fds.clear()

    # -- BackendHandler: the daemon's in-band requests

    async def config_changed(self) -> None:
        pass

    def vring_call(self, index: int) -> None:
        vq = self.queues.get(index)
        if vq is not None:
            vq.collect_used()

    def vring_err(self, index: int) -> None:
        pass


@contextlib.asynccontextmanager
async def open_direct_blk(guest: Any, control: str, socket_path: str, allocator: GuestAllocator, *,
                          domid: int = 1, queue_size: int = 128) -> AsyncIterator[VirtioBlkDriver]:
    """The guest's virtio-blk driver on the daemon at ``socket_path``, with
    the guest process as the front-end; the simulator at ``control`` gives
    it the guest RAM fd."""
    blk_type = DEVICE_TYPES["blk"]
    hv = SimHypervisor.connect(control, domid)
    ram = None
    try:
        ram = GuestRamMap(hv.guest_ram())
        memory = PassthroughMemory(ram)
        async with trio.open_nursery() as nursery:
            transport = DirectTransport(guest, allocator, memory, nursery)
            try:
                transport.frontend = await VhostUserFrontend.connect(
                    socket_path, nursery=nursery, handler=transport,
                    default_num_queues=blk_type.default_num_queues, config_size=blk_type.config_size)
                blk = await VirtioBlkDriver.open(transport, queue_size=queue_size)
                yield blk
                with trio.CancelScope(shield=True):
                    await transport.reset()
            finally:
                nursery.cancel_scope.cancel()
                with trio.CancelScope(shield=True):
                    if transport.frontend is not None:
                        await transport.frontend.aclose()
                transport.close_fds()
    finally:
        if ram is not None:
            ram.close()
        hv.close()
