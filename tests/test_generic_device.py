"""A device the bridge has no name for (``--device-id N``): features,
queue count and config space all come from the daemon.

The real daemons stand in for daemons we have never seen: the config size
is found by asking qemu-storage-daemon and vhost-user-gpu, and a guest's
own virtio-blk driver does I/O through qemu-storage-daemon served as a
generic device, checked on the image."""

from __future__ import annotations

import contextlib
import os
import random
import struct

import pytest
import trio

from bridge.cli import build_parser, device_configs
from bridge.daemons import start_qemu_storage_daemon
from bridge.device_types import DEVICE_TYPES, generic_device_type
from bridge.processes import Child
from bridge.testbed import BlkTestbed
from tests.e2e_helpers import NoBackendRequests, assert_on_image, open_blk, write_all
from vhost_user import VhostUserFrontend
from xen.sim.guest import SimGuest

MiB = 1 << 20
VHOST_USER_GPU = "/usr/lib/qemu/vhost-user-gpu"


# -- the command line


def configs(*argv: str):
    parser = build_parser()
    return device_configs(parser.parse_args(["--domid", "1", *argv]), parser)


def test_device_id_alone_makes_a_generic_device_with_everything_from_the_daemon():
    [dev] = configs("--socket", "/s", "--device-id", "41")
    t = dev.device_type
    assert (t.virtio_id, t.config_size, t.max_queues, t.default_num_queues) == (41, None, None, 1)
    assert not t.config_write_allowed(0, 1)  # nobody knows which fields a driver may write
    [dev] = configs("--socket", "/s", "--device", "generic", "--device-id", "2", "--queues", "3",
                    "--config-size", "16")
    t = dev.device_type
    assert (t.virtio_id, t.config_size, t.max_queues, t.default_num_queues) == (2, 16, 3, 3)
    assert "blk" in t.name  # a known id is named in the logs


def test_generic_devices_among_several():
    a, b = configs("--device", "blk:/a", "--device", "generic:/b,device-id=34,queues=1,config-size=0")
    assert a.device_type is DEVICE_TYPES["blk"]
    assert (b.device_type.virtio_id, b.device_type.max_queues, b.device_type.config_size) == (34, 1, 0)
    assert b.socket_path == "/b"


@pytest.mark.parametrize("argv, message", [
    (["--socket", "/s", "--device", "generic"], "needs --device-id"),
    (["--socket", "/s", "--device", "blk", "--device-id", "2"], "only for a generic device"),
    (["--socket", "/s", "--queues", "2"], "only for a generic device"),
    (["--socket", "/s", "--device-id", "0"], "not in 1..65535"),
    (["--socket", "/s", "--device-id", "4", "--config-size", "257"], "not in 0..256"),
    (["--device", "generic:/b"], "needs device-id=N"),
    (["--device", "fs:/b,queues=2"], "queues=: only for --device generic"),
    (["--device", "generic:/a,device-id=4", "--device", "blk:/b", "--device-id", "3"], "set one device"),
])
def test_a_generic_device_misdescribed_is_one_clear_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        configs(*argv)
    assert exit.value.code == 2
    assert message in capsys.readouterr().err


def test_generic_device_type_checks_its_arguments():
    with pytest.raises(ValueError, match="virtio device id"):
        generic_device_type(0)
    with pytest.raises(ValueError, match="queues"):
        generic_device_type(4, queues=0)
    assert generic_device_type(4).name == "generic-4"


# -- the config size, asked of real daemons


async def probe(path: str, nursery) -> bytes:
    with trio.fail_after(20):
        fe = await VhostUserFrontend.connect(path, nursery=nursery, handler=NoBackendRequests(),
                                             default_num_queues=1, config_size=0, timeout=5.0)
        try:
            config = await fe.probe_config()
            assert fe.failure is None
            return config
        finally:
            await fe.aclose()


@pytest.mark.e2e
async def test_the_config_size_of_qemu_storage_daemon_is_found_by_asking(workdir, nursery):
    image, sock = os.path.join(workdir, "disk.img"), os.path.join(workdir, "blk.sock")
    with open(image, "wb") as f:
        f.truncate(8 * MiB)
    daemon = start_qemu_storage_daemon(image, sock)
    try:
        config = await probe(sock, nursery)
    finally:
        daemon.stop()
        os.unlink(image)
    # struct virtio_blk_config as QEMU 7.2 knows it, capacity first
    assert len(config) == 60
    assert struct.unpack_from("<Q", config)[0] == 8 * MiB // 512


@pytest.mark.e2e
async def test_the_config_size_of_vhost_user_gpu_is_found_by_asking(workdir, nursery):
    if not os.path.exists(VHOST_USER_GPU):
        pytest.fail(f"{VHOST_USER_GPU} is missing: scripts/setup installs qemu-system-gui")
    sock = os.path.join(workdir, "gpu.sock")
    daemon = Child("vhost-user-gpu", [VHOST_USER_GPU, f"--socket-path={sock}"])
    try:
        daemon.wait_for(lambda: os.path.exists(sock), f"listening on {sock}", 10)
        await trio.sleep(0.2)  # bound before it listens; it serves one connection, so no probe
        config = await probe(sock, nursery)
    finally:
        daemon.stop()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)
    # struct virtio_gpu_config: events_read, events_clear, num_scanouts,
    # num_capsets. The daemon leaves num_scanouts and the events to the
    # front-end (QEMU's vhost-user-gpu overwrites them): 0 here.
    assert len(config) == 16
    assert struct.unpack("<4I", config)[:3] == (0, 0, 0)


# -- a guest's virtio-blk driver through the generic path


class GenericBlkTestbed(BlkTestbed):
    """qemu-storage-daemon served as a device the bridge knows only by id."""

    device = "generic"

    def _device_flags(self) -> list[str]:
        return ["--device-id", "2"]


@pytest.mark.e2e
@pytest.mark.parametrize("memory", ["passthrough", "shadow"])
async def test_a_guest_does_block_io_through_the_generic_path(workdir, memory):
    bed = GenericBlkTestbed(workdir, virtio="blk", image_size=16 * MiB, bridge_extra=["--memory", memory])
    with bed:
        rng = random.Random(2)
        slots = rng.sample(range(16 * MiB // (64 * 512)), 24)  # 32 KiB apart: no overlaps
        blocks = {slot * 64: rng.randbytes(4096 * rng.randint(1, 8)) for slot in slots}
        async with SimGuest.open(bed.control) as guest:
            with trio.fail_after(60):
                transport, blk = await open_blk(guest, bed)
                assert transport.device_id == 2
                assert blk.capacity == 16 * MiB // 512  # from the probed config space
                await write_all(blk, blocks)
                await blk.flush()
                for sector, data in blocks.items():
                    assert await blk.read(sector, len(data)) == data
                await transport.reset()
        assert_on_image(bed.image, blocks)
        assert "config space is 60 bytes" in bed.bridge.output()
        assert "virtio-generic-2 (blk)" in bed.bridge.output()
