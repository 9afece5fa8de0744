"""The simulated guest's virtio-net driver (virtio 1.2 section 5.1),
modelled on Linux's drivers/net/virtio_net.c: queue pairs, the control
queue, mergeable receive buffers.

Queues: receiveq N is queue 2N, transmitq N is 2N+1, the control queue is
2 x max_virtqueue_pairs (with VIRTIO_NET_F_CTRL_VQ). Config space::

    struct virtio_net_config {
        u8 mac[6];                    with VIRTIO_NET_F_MAC
        le16 status;                  with VIRTIO_NET_F_STATUS (bit 0 LINK_UP)
        le16 max_virtqueue_pairs;     with VIRTIO_NET_F_MQ
        ...
    };

Every frame on a ring is preceded by struct virtio_net_hdr, 12 bytes for a
VERSION_1 device (flags, gso_type, hdr_len, gso_size, csum_start,
csum_offset, num_buffers). This driver negotiates no offload, so it sends
headers of zeros and expects nothing in them on receive but num_buffers.

Receive: without VIRTIO_NET_F_MRG_RXBUF each buffer holds one whole frame
(the header and at least 1518 bytes, as Linux's "small" buffers: 5.1.6.3.1);
with it, buffers may be small and one frame spans ``num_buffers``
consecutive used buffers, the count in the first one's header (5.1.6.4).
Buffers are posted at open and refilled as frames are taken; completions
are read in used-ring order (the interrupt path's callbacks), so frames
come out in the order the device delivered them.

Like Linux, the driver sets up the pairs it uses, then the control queue,
sets DRIVER_OK, fills the receive rings and, with MQ and more than one
pair, tells the device with VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET (the device
starts with one active pair).

Use::

    transport = VirtioMmioDriver(None, guest.ram, allocator, base, irq, guest)
    net = await VirtioNetDriver.open(transport, pairs=4)
    net.mac, net.link_up, net.max_pairs, net.active_pairs
    await (await net.send(pair, frame))   # the device took the frame
    frame = await net.receive(pair)
    await net.control(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, b"\\x01")
    await net.close()                      # device reset
"""

from __future__ import annotations

import logging
import struct
from collections import deque
from typing import Any

import trio

from xen.sim.guest_virtqueue import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    Completion,
    DeviceMisbehaved,
    GuestVirtqueue,
    VirtioDriverError,
)
from xen.sim.virtio_mmio_driver import VIRTIO_F_VERSION_1, VirtioMmioDriver

logger = logging.getLogger(__name__)

VIRTIO_ID_NET = 1

VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_F_CTRL_VQ = 17
VIRTIO_NET_F_CTRL_RX = 18
VIRTIO_NET_F_MQ = 22

VIRTIO_NET_S_LINK_UP = 1

CFG_MAC = 0
CFG_STATUS = 6
CFG_MAX_VIRTQUEUE_PAIRS = 8

VIRTIO_NET_CTRL_RX = 0
VIRTIO_NET_CTRL_RX_PROMISC = 0
VIRTIO_NET_CTRL_RX_ALLMULTI = 1
VIRTIO_NET_CTRL_MAC = 1
VIRTIO_NET_CTRL_MAC_TABLE_SET = 0
VIRTIO_NET_CTRL_MAC_ADDR_SET = 1
VIRTIO_NET_CTRL_VLAN = 2
VIRTIO_NET_CTRL_VLAN_ADD = 0
VIRTIO_NET_CTRL_ANNOUNCE = 3
VIRTIO_NET_CTRL_ANNOUNCE_ACK = 0
VIRTIO_NET_CTRL_MQ = 4
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET = 0
VIRTIO_NET_OK = 0
VIRTIO_NET_ERR = 1

HDR = struct.Struct("<BBHHHHH")
"""struct virtio_net_hdr with num_buffers (12 bytes, VERSION_1)."""
HDR_SIZE = HDR.size

ETH_FRAME_MAX = 1518
"""ETH_HLEN + VLAN_HLEN + ETH_DATA_LEN: Linux's GOOD_PACKET_LEN."""
SMALL_BUFFER = HDR_SIZE + ETH_FRAME_MAX

DEFAULT_FEATURES = (
    1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS | 1 << VIRTIO_NET_F_CTRL_VQ
    | 1 << VIRTIO_NET_F_CTRL_RX | 1 << VIRTIO_NET_F_MQ | 1 << VIRTIO_NET_F_MRG_RXBUF
    | 1 << VIRTIO_F_EVENT_IDX | 1 << VIRTIO_F_INDIRECT_DESC
)
"""No offloads (CSUM, TSO...): the driver's headers are all zeros."""

DEFAULT_QUEUE_SIZE = 64
"""Small rings: dpdk-testpmd runs in 256 MiB without hugepages."""
DEFAULT_MAX_PAIRS_USED = 8


class VirtioNetError(VirtioDriverError):
    """A virtio-net device cannot be used, or broke the protocol."""


class _RxQueue:
    """One receive queue: posted buffers, completed data in used order,
    frames put together from them."""

    def __init__(self, vq: GuestVirtqueue) -> None:
        self.vq = vq
        self.posted = 0
        self.frames: deque[tuple[bytes, int]] = deque()
        """(frame, buffers it used), in arrival order."""
        self.partial: list[bytes] = []
        self.remaining = 0
        self.event = trio.Event()
        self.error: VirtioNetError | None = None
        self.buffers_used = 0


class VirtioNetDriver:
    def __init__(self, transport: VirtioMmioDriver) -> None:
        self.transport = transport
        self.mac = b""
        self.link_up = True
        self.max_pairs = 1
        self.pairs = 0
        """Pairs set up."""
        self.active_pairs = 1
        self.rx: list[_RxQueue] = []
        self.tx: list[GuestVirtqueue] = []
        self.ctrl: GuestVirtqueue | None = None
        self.rx_buffer_size = SMALL_BUFFER
        self.rx_split = False
        self.rx_buffers = 0
        self.frames_sent = 0
        self.frames_received = 0

    @property
    def mergeable(self) -> bool:
        return self.transport.has_feature(VIRTIO_NET_F_MRG_RXBUF)

    # -- setup ---------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        transport: VirtioMmioDriver,
        *,
        pairs: int | None = None,
        features: int = DEFAULT_FEATURES,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        rx_buffer_size: int | None = None,
        rx_buffers: int | None = None,
        rx_split: bool = False,
        set_pairs: bool = True,
        vcpu: Any = None,
    ) -> VirtioNetDriver:
        """Probe (DeviceID 1), negotiate ``features``, read the config, set
        up ``pairs`` queue pairs (default: max_virtqueue_pairs, at most 8)
        and the control queue, DRIVER_OK, post ``rx_buffers`` receive
        buffers per queue (default: the queue size) of ``rx_buffer_size``
        bytes (default 1530; with MRG_RXBUF any size from 13 up), as two
        descriptors (header, frame) with ``rx_split``; then with MQ and
        ``set_pairs`` activate all the pairs set up."""
        self = cls(transport)
        t = transport
        v = t.pick_vcpu(vcpu)
        await t.probe(features, device_id=VIRTIO_ID_NET, vcpu=v)
        try:
            await self._configure(pairs, queue_size, rx_buffer_size, rx_buffers, rx_split, v)
        except VirtioDriverError:
            await t.fail(vcpu=v)
            raise
        await t.driver_ok(vcpu=v)
        for index in range(self.pairs):
            await self._refill(index, v)
        if set_pairs and self.pairs > 1 and t.has_feature(VIRTIO_NET_F_MQ):
            await self.set_queue_pairs(self.pairs, vcpu=v)
        logger.debug("virtio-net at %#x: mac %s, %d of %d pairs, features %#x", t.base, self.mac_text,
                     self.pairs, self.max_pairs, t.features)
        return self

    async def _configure(self, pairs, queue_size, rx_buffer_size, rx_buffers, rx_split, v) -> None:
        t = self.transport
        if not t.has_feature(VIRTIO_F_VERSION_1):
            raise VirtioNetError("virtio-net without VERSION_1 is not supported")
        if t.has_feature(VIRTIO_NET_F_MAC):
            self.mac = await t.read_config_bytes(CFG_MAC, 6, vcpu=v)
        if t.has_feature(VIRTIO_NET_F_STATUS):
            self.link_up = bool(await t.read_config(CFG_STATUS, 2, vcpu=v) & VIRTIO_NET_S_LINK_UP)
        if t.has_feature(VIRTIO_NET_F_MQ):
            self.max_pairs = await t.read_config(CFG_MAX_VIRTQUEUE_PAIRS, 2, vcpu=v)
            if not 1 <= self.max_pairs <= 0x8000:
                raise VirtioNetError(f"virtio-net at {t.base:#x}: max_virtqueue_pairs {self.max_pairs}")
        self.pairs = pairs if pairs is not None else min(self.max_pairs, DEFAULT_MAX_PAIRS_USED)
        if not 1 <= self.pairs <= self.max_pairs:
            raise VirtioNetError(f"virtio-net at {t.base:#x}: {self.pairs} pairs asked, the device has "
                                 f"{self.max_pairs}")
        if rx_buffer_size is None:
            rx_buffer_size = SMALL_BUFFER
        minimum = HDR_SIZE + 1 if self.mergeable else SMALL_BUFFER
        if rx_buffer_size < minimum:
            raise ValueError(f"receive buffers of {rx_buffer_size} bytes: at least {minimum} "
                             f"{'with' if self.mergeable else 'without'} MRG_RXBUF")
        self.rx_buffer_size = rx_buffer_size
        self.rx_split = rx_split
        for index in range(self.pairs):
            rx = await t.setup_queue(2 * index, queue_size, vcpu=v)
            self.rx.append(_RxQueue(rx))
            self.tx.append(await t.setup_queue(2 * index + 1, queue_size, vcpu=v))
        self.rx_buffers = rx_buffers if rx_buffers is not None else self.rx[0].vq.size
        if t.has_feature(VIRTIO_NET_F_CTRL_VQ):
            self.ctrl = await t.setup_queue(2 * self.max_pairs, queue_size, vcpu=v)

    @property
    def mac_text(self) -> str:
        return ":".join(f"{b:02x}" for b in self.mac)

    async def close(self, *, vcpu: Any = None) -> None:
        """Reset the device; buffers still posted are freed as their
        requests fail."""
        await self.transport.reset(vcpu=vcpu)
        self.rx, self.tx, self.ctrl = [], [], None

    # -- receive -------------------------------------------------------------

    async def _refill(self, index: int, vcpu: Any = None) -> None:
        rx = self.rx[index]
        t = self.transport
        added = False
        while rx.posted < self.rx_buffers:
            gpa = t.allocator.allocate(self.rx_buffer_size, 64)
            if self.rx_split:
                writable = [(gpa, HDR_SIZE), (gpa + HDR_SIZE, self.rx_buffer_size - HDR_SIZE)]
            else:
                writable = [(gpa, self.rx_buffer_size)]
            try:
                completion = await rx.vq.add([], writable, token=gpa)
            except BaseException:
                t.allocator.free(gpa)
                raise
            rx.posted += 1
            added = True
            completion.add_done_callback(lambda done, rx=rx, gpa=gpa: self._received(rx, gpa, done))
            t.free_when_returned(completion, [gpa], "virtio-net rx")
        if added:
            await rx.vq.kick(vcpu)

    def _received(self, rx: _RxQueue, gpa: int, done: Completion) -> None:
        """A used receive buffer (in used-ring order): read it now, before
        its memory goes back to the allocator."""
        rx.posted -= 1
        if done.used_len is None:
            return  # the queue was torn down
        rx.buffers_used += 1
        data = self.transport.ram.read(gpa, done.used_len)
        if not rx.partial and rx.remaining == 0:
            if len(data) < HDR_SIZE:
                self._rx_error(rx, f"a used receive buffer of {len(data)} bytes, shorter than the header")
                return
            num_buffers = HDR.unpack_from(data)[6] if self.mergeable else 1
            if num_buffers < 1:
                self._rx_error(rx, "num_buffers 0 in a received frame's header")
                return
            rx.partial = [data[HDR_SIZE:]]
            rx.remaining = num_buffers - 1
        else:
            rx.partial.append(data)
            rx.remaining -= 1
        if rx.remaining == 0:
            rx.frames.append((b"".join(rx.partial), len(rx.partial)))
            rx.partial = []
            rx.event.set()

    def _rx_error(self, rx: _RxQueue, what: str) -> None:
        rx.error = VirtioNetError(f"virtio-net at {self.transport.base:#x}: {what}")
        rx.event.set()

    async def receive_with_count(self, pair: int, *, vcpu: Any = None) -> tuple[bytes, int]:
        """The next frame on pair ``pair``'s receive queue and how many
        buffers it took; refills the queue first."""
        rx = self.rx[pair]
        while True:
            await self._refill(pair, vcpu)
            if rx.error is not None:
                raise rx.error
            if rx.vq.broken:
                raise DeviceMisbehaved(f"virtio-net receive queue {2 * pair} is broken")
            if rx.frames:
                frame = rx.frames.popleft()
                self.frames_received += 1
                return frame
            rx.event = trio.Event()
            await rx.event.wait()

    async def receive(self, pair: int = 0, *, vcpu: Any = None) -> bytes:
        return (await self.receive_with_count(pair, vcpu=vcpu))[0]

    # -- transmit ------------------------------------------------------------

    async def send(self, pair: int, frame: bytes, *, split: bool = False, vcpu: Any = None) -> Completion:
        """Queue ``frame`` (with a header of zeros) on pair ``pair``'s
        transmit queue and notify the device; the returned completion
        finishes when the device has taken it. ``split``: header and frame
        as two descriptors, else one buffer (Linux with headroom)."""
        if not frame:
            raise ValueError("an empty frame")
        t = self.transport
        vq = self.tx[pair]
        gpa = t.allocator.allocate(HDR_SIZE + len(frame), 64)
        completion = None
        try:
            t.ram.write(gpa, HDR.pack(0, 0, 0, 0, 0, 0, 0) + bytes(frame))
            if split:
                readable = [(gpa, HDR_SIZE), (gpa + HDR_SIZE, len(frame))]
            else:
                readable = [(gpa, HDR_SIZE + len(frame))]
            completion = await vq.add(readable, [])
            self.frames_sent += 1
            await vq.kick(t.pick_vcpu(vcpu))
        finally:
            t.free_when_returned(completion, [gpa], "virtio-net tx")
        return completion

    # -- the control queue ---------------------------------------------------

    async def control(self, cls: int, cmd: int, data: bytes = b"", *, vcpu: Any = None) -> int:
        """One control command (virtnet_send_command): header, data, and an
        ack byte the device writes; returns VIRTIO_NET_OK or VIRTIO_NET_ERR."""
        if self.ctrl is None:
            raise VirtioNetError("the device has no control queue (VIRTIO_NET_F_CTRL_VQ not negotiated)")
        t = self.transport
        size = 2 + len(data) + 1
        gpa = t.allocator.allocate(size, 8)
        completion = None
        try:
            t.ram.write(gpa, bytes([cls, cmd]) + bytes(data) + b"\xff")
            readable = [(gpa, 2)] + ([(gpa + 2, len(data))] if data else [])
            status_gpa = gpa + 2 + len(data)
            completion = await self.ctrl.add(readable, [(status_gpa, 1)])
            await self.ctrl.kick(t.pick_vcpu(vcpu))
            used = await completion
            ack = t.ram.read(status_gpa, 1)[0]
        finally:
            t.free_when_returned(completion, [gpa], "virtio-net ctrl")
        if used != 1:
            raise VirtioNetError(f"control command {cls}/{cmd}: the device wrote {used} bytes, not the ack byte")
        if ack not in (VIRTIO_NET_OK, VIRTIO_NET_ERR):
            raise VirtioNetError(f"control command {cls}/{cmd}: ack {ack} is neither OK nor ERR")
        return ack

    async def set_queue_pairs(self, pairs: int, *, vcpu: Any = None) -> None:
        """VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET (virtnet_set_queues)."""
        ack = await self.control(VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", pairs),
                                 vcpu=vcpu)
        if ack != VIRTIO_NET_OK:
            raise VirtioNetError(f"the device refused {pairs} queue pairs")
        self.active_pairs = pairs
