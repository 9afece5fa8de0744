"""End to end: the simulated guest's virtio-blk driver -> xen-sim -> the
bridge (its own process, the real CLI) -> a real qemu-storage-daemon -> an
image file, and back as guest interrupts. Every claim is checked on the
image file or in what the guest reads."""

from __future__ import annotations

import os
import random
import socket
import struct
import subprocess
import sys

import pytest
import trio

from bridge.arena import ARENA_NAME
from bridge.blk_workload import SECTOR, WorkloadResult, compare_image, run_blk_workload
from bridge.daemons import start_qemu_storage_daemon
from bridge.device import VENDOR_ID
from bridge.processes import child_env
from bridge.testbed import BlkTestbed, bridge_argv
from tests.e2e_helpers import assert_on_image, open_blk, write_all
from xen.sim.guest import SimGuest
from xen.sim.launch import start_simulator

pytestmark = pytest.mark.e2e

MiB = 1 << 20
# Not a round number, so a capacity computed from anything else shows.
IMAGE_SIZE = 40 * MiB + 7 * SECTOR

VIRTIO_F_VERSION_1 = 1 << 32
VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30
VHOST_F_LOG_ALL = 1 << 26
VIRTIO_BLK_F_FLUSH = 1 << 9


@pytest.fixture(params=["passthrough", "shadow"])
def memory(request):
    """Every test with a testbed runs in both memory models."""
    return request.param


@pytest.fixture
def bed(workdir, memory, request):
    marker = request.node.get_closest_marker("bridge_flags")
    flags = ["--memory", memory, *(marker.args if marker else ())]
    testbed = BlkTestbed(workdir, image_size=IMAGE_SIZE, vcpus=2, bridge_extra=flags).start()
    yield testbed
    bridge = testbed.bridge
    testbed.stop()
    # SIGTERM is a clean shutdown: the bridge tears down and exits 0.
    assert bridge is None or bridge.proc.returncode == 0, bridge.output()


async def test_negotiation_and_identity(bed):
    async with SimGuest.open(bed.control) as guest:
        transport, blk = await open_blk(guest, bed)
        assert (transport.version, transport.device_id, transport.vendor_id) == (2, 2, VENDOR_ID)
        offered = transport.device_features
        assert offered & VIRTIO_F_VERSION_1
        assert offered & VIRTIO_BLK_F_FLUSH  # qemu-storage-daemon has a volatile cache
        # vhost-user's own bits never reach a virtio driver
        assert not offered & (VHOST_USER_F_PROTOCOL_FEATURES | VHOST_F_LOG_ALL)
        assert transport.features & VIRTIO_F_VERSION_1
        assert await blk.get_id() == b"vhost_user_blk"  # qemu-storage-daemon's serial for its exports
        await transport.reset()
        assert await transport.status() == 0


async def test_capacity_in_config_space_is_the_image_size(bed):
    async with SimGuest.open(bed.control) as guest:
        _transport, blk = await open_blk(guest, bed)
        assert blk.capacity * SECTOR == os.path.getsize(bed.image) == IMAGE_SIZE


async def test_random_writes_and_reads_match_the_image_file(bed):
    async with SimGuest.open(bed.control) as guest:
        _transport, blk = await open_blk(guest, bed)
        result, mirror = await run_blk_workload(
            blk, requests=96, min_size=4096, max_size=MiB, depth=16, seed=20261127, vcpus=guest.vcpus
        )
    assert result.mismatch_count == 0, result.mismatches
    assert result.bytes_written > 96 * 4096
    compare_image(bed.image, mirror, result)
    assert result.mismatch_count == 0, result.mismatches


async def test_32_requests_in_flight_complete_and_land(bed):
    rng = random.Random(32)
    sectors = rng.sample(range(IMAGE_SIZE // 4096), 32)
    blocks = {s * 8: rng.randbytes(4096) for s in sectors}
    async with SimGuest.open(bed.control) as guest:
        transport, blk = await open_blk(guest, bed, queue_size=256)
        await write_all(blk, blocks)
        assert blk.queues[0].peak_in_flight == 32
        await blk.flush()
        assert transport.interrupts_handled >= 1
        async with trio.open_nursery() as nursery:
            got = {}

            async def read(sector: int) -> None:
                got[sector] = await blk.read(sector, 4096)

            for sector in blocks:
                nursery.start_soon(read, sector)
    assert got == blocks
    assert_on_image(bed.image, blocks)


async def test_flush_reaches_the_daemon(bed):
    async with SimGuest.open(bed.control) as guest:
        _transport, blk = await open_blk(guest, bed)
        assert blk.has_flush
        await blk.write(8, b"\xa5" * 4096)
        await blk.flush()  # raises BlkIoError unless the daemon answers VIRTIO_BLK_S_OK
    assert_on_image(bed.image, {8: b"\xa5" * 4096})


async def test_guest_reset_and_reinitialisation(bed):
    """Status = 0 stops the daemon's rings (GET_VRING_BASE); a new probe
    starts them again from index 0. Were the daemon's ring state stale, the
    I/O after the reset would hang or be lost."""
    result = WorkloadResult()
    mirror = None
    async with SimGuest.open(bed.control) as guest:
        for round_ in range(3):
            transport, blk = await open_blk(guest, bed)
            result, mirror = await run_blk_workload(
                blk, requests=24, min_size=4096, max_size=256 * 1024, depth=8, seed=round_, vcpus=guest.vcpus,
                mirror=mirror,
            )
            assert result.mismatch_count == 0, (round_, result.mismatches)
            await transport.reset()
            assert await transport.status() == 0
    compare_image(bed.image, mirror, result)  # every round's writes
    assert result.mismatch_count == 0, result.mismatches
    assert bed.bridge.output().count("stopped; ring bases") == 3


def run_bridge_cli(args: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bridge.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(),
        stdin=subprocess.DEVNULL,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("xen-vhost-bridge: error: "), lines[0]
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_socket_nobody_listens_on(workdir):
    control = os.path.join(workdir, "sim.sock")
    dead = os.path.join(workdir, "dead.sock")
    # A socket file whose owner went away: connecting is refused.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(dead)
    s.close()
    with start_simulator(control, extra_args=["--virtio", "blk"]):
        refused = run_bridge_cli(["--domid", "1", "--socket", dead, "--xen-sim", control])
        missing = run_bridge_cli(["--domid", "1", "--socket", os.path.join(workdir, "none.sock"), "--xen-sim", control])
    assert_one_line_error(refused, dead)
    assert_one_line_error(missing, "none.sock")


def test_wrong_domid_is_one_clear_line(workdir):
    control = os.path.join(workdir, "sim.sock")
    image = os.path.join(workdir, "disk.img")
    sock = os.path.join(workdir, "blk.sock")
    with open(image, "wb") as f:
        f.truncate(MiB)
    with start_simulator(control, domid=1), start_qemu_storage_daemon(image, sock):
        proc = run_bridge_cli(
            bridge_argv(domid=5, socket_path=sock, xen_sim=control, mmio_base=0x2000000, irq=33)[3:]
        )
    assert_one_line_error(proc, "5")


def test_without_xen_or_simulator_is_one_clear_line(workdir):
    proc = run_bridge_cli(["--domid", "1", "--socket", os.path.join(workdir, "x.sock")])
    assert_one_line_error(proc, "Xen")


@pytest.mark.parametrize(
    "args, complaint",
    [
        (["--socket", "/x"], "--domid"),
        (["--domid", "1"], "--socket"),
        (["--domid", "1", "--socket", "/x", "--irq", "12"], "SPI"),
        (["--domid", "1", "--socket", "/x", "--mmio-base", "0x2000100"], "0x200"),
        (["--domid", "1", "--socket", "/x", "--queue-size", "100"], "power of two"),
        (["--domid", "1", "--socket", "/x", "--device", "tape"], "'tape' is not one of blk, fs"),
        (["--domid", "1", "--device", "blk:/a", "--device", "fs"], "its socket"),
        (["--domid", "1", "--device", "blk:/a", "--socket", "/b"], "not both"),
        (["--domid", "1", "--device", "blk:/a", "--device", "fs:/b", "--irq", "40"], "--irq set one device"),
        (["--domid", "1", "--device", "blk:/a,colour=red"], "'colour=red' is not one of"),
        (["--domid", "1", "--device", "blk:/a,irq=12"], "SPI"),
        (["--domid", "1", "--device", "blk", "--device", "fs"], "a socket each"),
    ],
)
def test_bad_flags_are_refused(args, complaint):
    proc = run_bridge_cli(args)
    assert proc.returncode == 2
    assert complaint in proc.stderr and "Traceback" not in proc.stderr


def test_help_documents_every_flag():
    proc = run_bridge_cli(["--help"])
    assert proc.returncode == 0
    for flag in ("--domid", "--socket", "--xen-sim", "--device", "--mmio-base", "--irq", "--queue-size",
                 "--timeout", "--verbose"):
        assert flag in proc.stdout


@pytest.mark.bridge_flags("--reconnect", "0")
async def test_daemon_death_sets_device_needs_reset_and_the_bridge_survives(bed):
    async with SimGuest.open(bed.control) as guest:
        transport, blk = await open_blk(guest, bed)
        await blk.write(0, b"\x11" * 4096)
        seen = transport.config_changes
        bed.daemon.kill()  # SIGKILL: no goodbye on the socket
        with trio.fail_after(10):
            await transport.wait_config_change(seen)  # the config interrupt
        assert await transport.needs_reset()
        assert bed.bridge.alive()
        # the guest recovers the virtio way: a reset, and Status reads 0
        await transport.reset()
        assert await transport.status() == 0
    assert "closed its vhost-user connection" in bed.bridge.output()



def test_the_hypervisor_going_away_ends_the_bridge_with_a_clear_error(bed):
    bridge = bed.bridge
    bed.sim.stop()  # the event channel and control socket close under the bridge
    bridge.proc.wait(10)
    bed.bridge = None  # already gone; the fixture must not expect exit 0
    assert bridge.proc.returncode == 1
    last = bridge.output().strip().splitlines()[-1]
    assert last.startswith("xen-vhost-bridge: error: ") and "simulator" in last, last
    assert "Traceback" not in bridge.output()


def daemon_mappings(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as f:
        return f.read()


async def test_the_daemon_maps_only_what_the_memory_model_gives_it(bed, memory):
    """Passthrough hands the daemon guest RAM; shadow hands it the arena
    and nothing of the guest, which the daemon's own mappings show."""
    async with SimGuest.open(bed.control) as guest:
        _transport, blk = await open_blk(guest, bed)
        await blk.write(0, b"\x42" * 4096)  # the rings are started and in use
        maps = daemon_mappings(bed.daemon.pid)
    guest_ram = f"xen-sim domain {bed.domid} RAM"
    if memory == "shadow":
        assert guest_ram not in maps
        assert ARENA_NAME in maps
    else:
        assert guest_ram in maps
        assert ARENA_NAME not in maps


@pytest.mark.parametrize("memory", ["shadow"])
async def test_100_requests_in_flight_through_an_arena_smaller_than_their_sum(workdir, memory):
    """1 MiB of arena for 100 writes of 64 KiB: requests wait in the guest's
    ring until completions free arena space, and all of them land."""
    rng = random.Random(100)
    blocks = {i * 256: rng.randbytes(64 * 1024) for i in range(100)}  # 128 KiB apart
    with BlkTestbed(workdir, image_size=IMAGE_SIZE, bridge_extra=["--memory", "shadow", "--arena-mib", "1"]) as bed:
        async with SimGuest.open(bed.control) as guest:
            _transport, blk = await open_blk(guest, bed, queue_size=256)
            await write_all(blk, blocks)
            assert blk.queues[0].peak_in_flight == 100
            await blk.flush()
        assert_on_image(bed.image, blocks)


@pytest.mark.parametrize("memory", ["shadow"])
async def test_a_chain_outside_guest_ram_sets_needs_reset_and_touches_nothing(bed, memory):
    """A hostile guest puts a descriptor outside its RAM on the ring: the
    bridge refuses the chain (it never reaches the daemon), reports
    DEVICE_NEEDS_RESET with a config interrupt, keeps running, and the
    device works again after a reset."""
    async with SimGuest.open(bed.control) as guest:
        transport, blk = await open_blk(guest, bed)
        await blk.write(0, b"\x01" * 4096)
        seen = transport.config_changes
        vq = blk.queues[0]
        buffer = guest.ram.base + guest.ram.size - 4096
        chain = await vq.add([(buffer, 512)], [])  # one direct descriptor...
        bad = 0x1000  # ...which the guest then points below its RAM
        guest.ram.write(vq.desc_gpa + 16 * chain.head, struct.pack("<Q", bad))
        await vq.kick()
        with trio.fail_after(10):
            await transport.wait_config_change(seen)
        assert await transport.needs_reset()
        assert bed.bridge.alive()
        # the daemon's ring was still running (only the guest misbehaved):
        # the reset must stop it, or the next start is refused and I/O hangs
        with trio.fail_after(20):
            await transport.reset()
            _transport, blk = await open_blk(guest, bed)
            await blk.write(8, b"\x02" * 4096)
            assert await blk.read(0, 8192) == b"\x01" * 4096 + b"\x02" * 4096
    assert "outside guest RAM" in bed.bridge.output()
