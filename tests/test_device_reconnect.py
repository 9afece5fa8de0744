"""The device's side of a daemon restart, against the scripted daemon (no
Debian daemon offers INFLIGHT_SHMFD, so this is where that path runs): the
inflight memfd goes from the dead connection to the new one, and the ring
resumes at the guest's used index even after out-of-order completions.
The end-to-end restarts with qemu-storage-daemon are in
test_e2e_daemon_restart.py."""

from __future__ import annotations

import os

import trio

from bridge.device import VhostUserDevice
from bridge.device_types import DEVICE_TYPES
from lying_daemon import QSD_INFLIGHT, open_lying_daemon
from tests.test_device import IRQ, RecordingXen, drive_to_driver_ok, fill_rings, ram  # noqa: F401 (fixture)
from vhost_user.protocol import VringState


async def start_device(path: str, memory, nursery) -> VhostUserDevice:
    dev = VhostUserDevice(hypervisor=RecordingXen(), device_type=DEVICE_TYPES["blk"], socket_path=path, irq=IRQ,
                          memory=memory, queue_size=8, reconnect=5)
    await nursery.start(dev.run)
    return dev


async def test_the_inflight_region_goes_to_the_restarted_daemon(ram, nursery):
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"xvb-infl-{os.getpid()}.sock")
    async with open_lying_daemon(path, profile=QSD_INFLIGHT) as daemon:
        dev = await start_device(path, ram, nursery)
        first = await daemon.wait_session()
        await drive_to_driver_ok(dev)
        assert len(first.inflight_given) == 1
        # The guest had heads 0..4 in flight; the old daemon finished 1 and
        # 3 (out of order) before it died: without its inflight record the
        # bridge would refuse to resume.
        fill_rings(ram, [0, 1, 2, 3, 4], [1, 3])
        first.sock.close()  # the daemon dies
        with trio.fail_after(5):
            while len(daemon.sessions) < 2 or not daemon.session.inflight_set:
                await trio.sleep(0.01)
            second = daemon.session
            while "SET_VRING_ENABLE" not in second.names():
                await trio.sleep(0.01)
        assert [s.fd_identity for s in second.inflight_set] == first.inflight_given  # the same memfd
        assert "GET_INFLIGHT_FD" not in second.names()
        assert second.payloads("SET_VRING_BASE") == [VringState(0, 2).pack()]  # the guest's used index
        assert dev.failed is None and dev.reconnects == 1
        assert not second.violations
        # A guest reset drops the record: the next start asks for a new one.
        fill_rings(ram, [0, 1, 2, 3, 4], [1, 3, 0, 2, 4])  # the new daemon finished them
        await dev.mmio_write(0x70, 4, 0)
        await drive_to_driver_ok(dev)
        assert len(second.inflight_given) == 1 and second.inflight_given != first.inflight_given
