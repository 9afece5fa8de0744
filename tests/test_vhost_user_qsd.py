"""The front-end against the real qemu-storage-daemon (Debian 12, QEMU 7.2).

Starts the daemon on a 16 MiB raw image, negotiates, reads the config, and
pushes one virtio-blk read through a split ring in memfd guest RAM."""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import struct

import pytest
import trio

from bridge.daemons import start_qemu_storage_daemon
from tests.e2e_helpers import NoBackendRequests
from vhost_user import (
    MemoryRegionFd,
    ProtocolFeature,
    RingSetup,
    VhostUserFrontend,
)

pytestmark = pytest.mark.e2e

IMAGE_SIZE = 16 << 20
SECTOR = 512
VIRTIO_F_VERSION_1 = 1 << 32


@pytest.fixture
def qsd(tmp_path):
    """A running qemu-storage-daemon: yields (socket path, image path)."""
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(IMAGE_SIZE)
        f.write(bytes(range(256)) * 2)  # sector 0 gets a pattern
    sock = tmp_path / "blk.sock"
    daemon = start_qemu_storage_daemon(str(image), str(sock))
    try:
        yield str(sock), image
    finally:
        daemon.stop()
        for path in (sock, image):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


async def test_negotiation_with_qemu_storage_daemon(qsd, nursery):
    path, _ = qsd
    with trio.fail_after(20):
        fe = await VhostUserFrontend.connect(path, nursery=nursery, handler=NoBackendRequests(),
                                             default_num_queues=1, config_size=60)
        try:
            # daemons.md: 0x175007e46 / 0x8f2b, 1 queue, 32 slots, 60-byte config
            assert fe.has_protocol_features
            assert fe.device_features == 0x175007E46 & ~(1 << 30 | 1 << 26)
            assert fe.protocol_features == (
                ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK | ProtocolFeature.BACKEND_REQ
                | ProtocolFeature.CONFIG | ProtocolFeature.CONFIGURE_MEM_SLOTS)
            assert fe.num_queues == 1
            assert fe.max_mem_slots == 32
            assert len(fe.config) == 60
            (capacity,) = struct.unpack_from("<Q", fe.config, 0)
            assert capacity == IMAGE_SIZE // SECTOR
            assert await fe.get_config(8) == fe.config[:8]
        finally:
            await fe.aclose()


# Guest RAM layout (offsets in the memfd; guest-physical = GPA + offset).
GPA = 0x4000_0000
RAM = 1 << 20
DESC, AVAIL, USED, REQ_HDR, DATA, STATUS = 0x0, 0x1000, 0x2000, 0x3000, 0x4000, 0x5000
VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE = 1, 2
VIRTIO_BLK_T_IN = 0
QUEUE_SIZE = 8


async def test_block_read_through_a_ring(qsd, nursery):
    path, _ = qsd
    fd = os.memfd_create("guest-ram")
    kick, call = os.eventfd(0), os.eventfd(0)
    ram = None
    try:
        os.ftruncate(fd, RAM)
        ram = mmap.mmap(fd, RAM)
        user = ctypes.addressof(ctypes.c_char.from_buffer(ram))
        # one read of sector 0: header, 512-byte buffer, status byte
        struct.pack_into("<IIQ", ram, REQ_HDR, VIRTIO_BLK_T_IN, 0, 0)
        struct.pack_into("<QIHH", ram, DESC + 0, GPA + REQ_HDR, 16, VIRTQ_DESC_F_NEXT, 1)
        struct.pack_into("<QIHH", ram, DESC + 16, GPA + DATA, SECTOR,
                         VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2)
        struct.pack_into("<QIHH", ram, DESC + 32, GPA + STATUS, 1, VIRTQ_DESC_F_WRITE, 0)
        ram[STATUS] = 0xFF
        struct.pack_into("<HHH", ram, AVAIL, 0, 1, 0)  # flags, idx = 1, ring[0] = head 0

        with trio.fail_after(20):
            fe = await VhostUserFrontend.connect(path, nursery=nursery, handler=NoBackendRequests(),
                                                 default_num_queues=1, config_size=60)
            try:
                region = MemoryRegionFd(gpa=GPA, size=RAM, user_addr=user, fd=fd, fd_offset=0)
                ring = RingSetup(index=0, num=QUEUE_SIZE, base=0, desc_addr=user + DESC,
                                 avail_addr=user + AVAIL, used_addr=user + USED,
                                 kick_fd=kick, call_fd=call)
                await fe.start(VIRTIO_F_VERSION_1, [region], [ring])
                os.eventfd_write(kick, 1)
                while struct.unpack_from("<H", ram, USED + 2)[0] != 1:
                    await trio.sleep(0.01)
                used_id, used_len = struct.unpack_from("<II", ram, USED + 4)
                assert used_id == 0
                assert used_len == SECTOR + 1
                assert ram[STATUS] == 0  # VIRTIO_BLK_S_OK
                assert ram[DATA:DATA + SECTOR] == bytes(range(256)) * 2
                # the daemon signalled completion on our call eventfd
                assert os.eventfd_read(call) >= 1
                assert await fe.stop([0]) == {0: 1}
            finally:
                await fe.aclose()

            # qemu-storage-daemon keeps listening: a second front-end connects
            again = await VhostUserFrontend.connect(path, nursery=nursery,
                                                    handler=NoBackendRequests(),
                                                    default_num_queues=1, config_size=8)
            assert again.num_queues == 1
            await again.aclose()
    finally:
        if ram is not None:
            ram.close()
        for f in (fd, kick, call):
            os.close(f)
