"""End to end: the simulated guest's virtio-fs driver (a FUSE client) ->
xen-sim -> the bridge (its own process, the real CLI, --device fs) -> a
real virtiofsd -> a shared directory on the host, and back as guest
interrupts. Every claim is checked against the host's files or what the
guest reads."""

from __future__ import annotations

import contextlib
import errno
import os
import random

import pytest
import trio

from bridge.testbed import FsTestbed
from xen.sim.guest import SimGuest
from xen.sim.guest_memory import GuestAllocator
from xen.sim.virtio_fs import VIRTIO_ID_FS, FuseError, VirtioFsDriver
from xen.sim.virtio_mmio_driver import VirtioMmioDriver

pytestmark = pytest.mark.e2e

MiB = 1 << 20
TAG = "xvb-share-0"
GUEST_TIMEOUT = 60
"""Seconds a test's guest session may take: a request the device never
completes (e.g. virtiofsd died) fails the test instead of hanging it."""


@pytest.fixture(params=["passthrough", "shadow"])
def memory(request):
    """Every test runs in both memory models."""
    return request.param


@pytest.fixture
def bed(workdir, memory):
    testbed = FsTestbed(workdir, tag=TAG, vcpus=2, bridge_extra=["--memory", memory]).start()
    daemon_pid, pidfile = testbed.daemon.pid, testbed.daemon.pidfile
    yield testbed
    bridge = testbed.bridge
    testbed.stop()
    # SIGTERM is a clean shutdown: the bridge tears down and exits 0, and
    # virtiofsd, whose connection that closes, goes by itself.
    assert bridge is None or bridge.proc.returncode == 0, bridge.output()
    assert testbed.daemon_exited_by_itself, (testbed.daemon_status, testbed.daemon_output)
    # Nothing left behind: processes, sockets, virtiofsd's pid file, the share.
    for pid in (daemon_pid, bridge.pid if bridge else None):
        if pid is not None:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    leftovers = [p for p in (testbed.daemon_socket, testbed.control, pidfile, testbed.shared_dir) if os.path.exists(p)]
    assert leftovers == []


async def open_fs(guest: SimGuest, bed: FsTestbed, **kwargs) -> tuple[VirtioMmioDriver, VirtioFsDriver]:
    """Probe the testbed's device as Linux would (grants if the device tree
    says grant_usage), set up its queues and start the FUSE session."""
    allocator = GuestAllocator(guest.ram.base, guest.ram.size)
    transport = await VirtioMmioDriver.for_device(guest, allocator, bed.mmio_base, bed.irq)
    return transport, await VirtioFsDriver.open(transport, **kwargs)


@contextlib.asynccontextmanager
async def guest_fs(bed: FsTestbed, **kwargs):
    """A guest session with the file system open, bounded in time."""
    with trio.fail_after(GUEST_TIMEOUT):
        async with SimGuest.open(bed.control) as guest:
            yield await open_fs(guest, bed, **kwargs)


def host_write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def host_read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


async def test_the_guest_sees_the_tag_given_with_fs_tag(bed):
    async with guest_fs(bed) as (transport, fs):
        assert (transport.version, transport.device_id) == (2, VIRTIO_ID_FS)
        assert fs.tag == TAG
        assert fs.num_request_queues == 1  # virtiofsd: hiprio and one request queue
        info = fs.init_info
        assert (info.major, info.minor) == (7, 36)  # QEMU 7.2's virtiofsd
        assert fs.max_write >= 128 * 1024
        await fs.close()
        assert await transport.status() == 0


async def test_the_guest_reads_files_the_host_created(bed):
    rng = random.Random(1)
    files = {
        "small.txt": b"written on the host\n",
        "empty": b"",
        "sub/dir/big.bin": rng.randbytes(3 * MiB + 123),  # several READs, the last one short
    }
    for name, data in files.items():
        host_write(os.path.join(bed.shared_dir, name), data)
    async with guest_fs(bed) as (_transport, fs):
        for name, data in files.items():
            got = await fs.read_file(name)
            assert len(got) == len(data) and got == data, name
        st = await fs.stat("sub/dir/big.bin")
        assert st.size == len(files["sub/dir/big.bin"]) and st.is_reg
        assert st.ino == os.stat(os.path.join(bed.shared_dir, "sub/dir/big.bin")).st_ino
        with pytest.raises(FuseError, match="ENOENT") as missing:
            await fs.read_file("sub/nothing-here")
        assert missing.value.errno == errno.ENOENT


async def test_the_host_reads_files_the_guest_wrote(bed):
    rng = random.Random(2)
    os.mkdir(os.path.join(bed.shared_dir, "out"))
    files = {
        "guest.txt": b"written by the guest\n",
        "out/guest.bin": rng.randbytes(2 * MiB + 4096 + 7),  # several WRITEs
    }
    async with guest_fs(bed) as (_transport, fs):
        for name, data in files.items():
            await fs.write_file(name, data)
        # Writing a file that exists replaces its content (LOOKUP, then
        # OPEN with O_TRUNC), whether the guest or the host made it.
        await fs.write_file("guest.txt", b"shorter")
        files["guest.txt"] = b"shorter"
        host_write(os.path.join(bed.shared_dir, "out/host-made.txt"), b"the host's longer content\n")
        await fs.write_file("out/host-made.txt", b"the guest's\n")
        files["out/host-made.txt"] = b"the guest's\n"
        for name, data in files.items():
            assert host_read(os.path.join(bed.shared_dir, name)) == data, name
        # and the guest reads back what it wrote
        assert await fs.read_file("out/guest.bin") == files["out/guest.bin"]


async def test_the_guest_lists_directories_like_os_listdir(bed):
    names = [f"file-{i:02d}-{'x' * (i % 7)}" for i in range(60)]  # more than one READDIRPLUS reply
    for name in names:
        host_write(os.path.join(bed.shared_dir, "many", name), name.encode())
    host_write(os.path.join(bed.shared_dir, "top.txt"), b"top")
    os.mkdir(os.path.join(bed.shared_dir, "emptydir"))
    async with guest_fs(bed) as (_transport, fs):
        for path in ("/", "many", "emptydir"):
            listed = await fs.listdir(path)
            assert sorted(listed) == sorted(os.listdir(os.path.join(bed.shared_dir, path.strip("/")))), path
            assert len(set(listed)) == len(listed)
        assert sorted(await fs.listdir("/")) == ["emptydir", "many", "top.txt"]
        # READDIRPLUS carries each entry's attributes, as the host sees them.
        entries = {e.fsname: e for e in await fs.scandir("many")}
        for name in names[:5]:
            host = os.stat(os.path.join(bed.shared_dir, "many", name))
            assert entries[name].entry.attr.ino == host.st_ino
            assert entries[name].entry.attr.size == host.st_size


@pytest.mark.parametrize("memory", ["shadow"])
async def test_a_guest_that_gives_grant_references(workdir, memory):
    """virtio = ["fs,grant_usage=1"]: the guest's driver hands out grant
    addresses (xen-grant-dma), which only shadow memory can serve."""
    data = random.Random(4).randbytes(MiB + 17)
    with FsTestbed(workdir, tag=TAG, virtio="fs,grant_usage=1", bridge_extra=["--memory", memory]) as bed:
        async with guest_fs(bed) as (transport, fs):
            assert type(transport.dma).__name__ == "GrantDma"
            await fs.write_file("granted.bin", data)
            assert host_read(os.path.join(bed.shared_dir, "granted.bin")) == data
            assert await fs.read_file("granted.bin") == data
            assert await fs.listdir("/") == ["granted.bin"]
    assert bed.daemon_exited_by_itself, bed.daemon_output
    assert not os.path.exists(bed.shared_dir)
