"""End to end: what must hold however the guest and the user treat the
bridge. A thousand resets with traffic in between leak nothing; SIGINT and
SIGTERM tear down in order; a --socket that is not a socket is refused;
in shadow mode the daemon's arena never receives a guest byte that was not
in a submitted buffer."""

from __future__ import annotations

import os
import signal

import pytest
import trio

from bridge.arena import ARENA_NAME
from bridge.testbed import BlkTestbed
from tests.e2e_helpers import assert_on_image, open_blk
from tests.test_e2e_blk import assert_one_line_error, run_bridge_cli
from xen.sim.client import SimHypervisor
from xen.sim.guest import SimGuest
from xen.sim.guest_virtqueue import VirtioDriverError

pytestmark = pytest.mark.e2e


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def sim_stats(bed: BlkTestbed) -> dict[str, int]:
    with SimHypervisor.connect(bed.control, bed.domid) as hv:
        return hv.stats()


@pytest.mark.parametrize("memory", ["passthrough", "shadow"])
async def test_a_thousand_resets_in_the_middle_of_io_leak_nothing(workdir, memory):
    """Each round starts writes and resets the device while they are in
    flight (the bridge must stop the daemon's rings with requests still in
    them); every hundredth round checks data end to end first."""
    with BlkTestbed(workdir, bridge_extra=["--memory", memory]) as bed:
        pid = bed.bridge.pid
        async with SimGuest.open(bed.control) as guest:
            transport, blk = await open_blk(guest, bed, queue_size=16)
            await blk.write(0, b"\x00" * 4096)
            await transport.reset()
            fds, rss = fd_count(pid), rss_kib(pid)
            cut_short = 0
            for round_ in range(1000):
                transport, blk = await open_blk(guest, bed, queue_size=16)
                if round_ % 100 == 0:
                    data = round_.to_bytes(4, "little") * 1024
                    await blk.write(4096 + round_, data)
                    assert await blk.read(4096 + round_, 4096) == data

                async def write(i: int) -> None:
                    nonlocal cut_short
                    try:
                        await blk.write(i * 8, bytes([round_ & 0xFF]) * 4096)
                    except VirtioDriverError:
                        cut_short += 1  # the reset took it: the guest's own doing

                async with trio.open_nursery() as nursery:
                    for i in range(4):
                        nursery.start_soon(write, i)
                    await trio.sleep(0)  # submitted, not completed
                    await transport.reset()
            assert cut_short > 0  # resets really came with requests in flight
            assert fd_count(pid) == fds
            grown = rss_kib(pid) - rss
            assert grown < 8 * 1024, f"RSS grew by {grown} KiB over 1000 resets"
            transport, blk = await open_blk(guest, bed, queue_size=16)  # still usable
            await blk.write(8000, b"\xee" * 512)
            await blk.flush()
        assert_on_image(bed.image, {4096 + r: r.to_bytes(4, "little") * 1024 for r in range(0, 1000, 100)}
                        | {8000: b"\xee" * 512})
        assert bed.bridge.alive()
        assert "needs a reset" not in bed.bridge.output()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
async def test_a_signal_tears_down_in_order_and_exits_0(workdir, signum):
    with BlkTestbed(workdir) as bed:
        async with SimGuest.open(bed.control) as guest:
            _transport, blk = await open_blk(guest, bed)
            await blk.write(0, b"\x5a" * 4096)
            assert sim_stats(bed)["ioreq_servers"] == 1
            bed.bridge.proc.send_signal(signum)
            bed.bridge.proc.wait(10)
        bridge, bed.bridge = bed.bridge, None
        assert bridge.proc.returncode == 0, bridge.output()
        assert "shutting down" in bridge.output() and "Traceback" not in bridge.output()
        assert sim_stats(bed)["ioreq_servers"] == 0  # destroyed, not left to the simulator
        # qemu-storage-daemon serves one front-end at a time: a new bridge
        # gets it only if the old one really closed its connection.
        bed.start_bridge()
        async with SimGuest.open(bed.control) as guest:
            _transport, blk = await open_blk(guest, bed)
            assert await blk.read(0, 4096) == b"\x5a" * 4096


def test_a_socket_path_that_is_not_a_socket_is_refused(workdir):
    regular = os.path.join(workdir, "not-a-socket")
    with open(regular, "w") as f:
        f.write("x")
    proc = run_bridge_cli(["--domid", "1", "--socket", regular, "--xen-sim", os.path.join(workdir, "none.sock"),
                           "--mmio-base", "0x2000000", "--irq", "33"])
    assert_one_line_error(proc, regular, "not a UNIX socket")


def arena_bytes(bridge_pid: int) -> bytes:
    """The whole shadow arena, read through the bridge's own fd of it."""
    for fd in os.listdir(f"/proc/{bridge_pid}/fd"):
        try:
            target = os.readlink(f"/proc/{bridge_pid}/fd/{fd}")
        except OSError:
            continue
        if ARENA_NAME in target:
            with open(f"/proc/{bridge_pid}/fd/{fd}", "rb") as f:
                return f.read()
    raise AssertionError("the bridge has no arena fd")


async def test_no_guest_byte_outside_the_submitted_buffers_reaches_the_arena(workdir):
    canary = b"GUEST-SECRET-7f3a"
    with BlkTestbed(workdir, ram_mib=64, bridge_extra=["--memory", "shadow", "--arena-mib", "4"]) as bed:
        async with SimGuest.open(bed.control) as guest:
            # Every byte of guest RAM is the canary, before the driver
            # allocates its rings and buffers out of it.
            ram = guest.ram
            pattern = canary * (1 << 20 // len(canary) + 1)
            for off in range(0, ram.size, 1 << 20):
                ram.write(ram.base + off, pattern[: min(1 << 20, ram.size - off)])
            _transport, blk = await open_blk(guest, bed)
            for i in range(64):
                await blk.write(i * 16, bytes([i]) * 4096)
            for i in range(64):
                assert await blk.read(i * 16, 4096) == bytes([i]) * 4096
            await blk.flush()
            arena = arena_bytes(bed.bridge.pid)
        # The driver's buffers were written before they were submitted, and
        # read buffers are filled by the daemon: no canary byte is needed.
        assert bytes([63]) * 512 in arena  # the last read passed through this memory
        assert canary[:8] not in arena
