"""End to end: qemu-storage-daemon killed with SIGKILL in the middle of a
stream of writes and started again; the bridge redials, resumes the rings,
and every block on the image holds the last data the guest wrote."""

from __future__ import annotations

import random

import pytest
import trio

from bridge.testbed import BlkTestbed
from tests.e2e_helpers import assert_on_image, open_blk
from xen.sim.guest import SimGuest

pytestmark = pytest.mark.e2e

BLOCK = 4096
SECTORS = 8  # per block
BLOCKS = 256


async def write_through_crashes(bed: BlkTestbed, *, crashes: int, depth: int, seed: int) -> dict[int, bytes]:
    """Writers keep ``depth`` writes in flight, never two to one block; a
    crasher kills and restarts the daemon ``crashes`` times meanwhile.
    Returns the last data written to each block (by sector)."""
    rng = random.Random(seed)
    last: dict[int, bytes] = {}
    busy: set[int] = set()
    crashed = trio.Event()
    async with SimGuest.open(bed.control) as guest:
        _transport, blk = await open_blk(guest, bed)

        async def writer(wid: int) -> None:
            version = 0
            while not crashed.is_set() or version < 4:
                block = rng.choice([b for b in range(BLOCKS) if b not in busy])
                busy.add(block)
                version += 1
                data = rng.randbytes(BLOCK)
                await blk.write(block * SECTORS, data)
                last[block * SECTORS] = data
                busy.discard(block)

        async def crasher() -> None:
            for _ in range(crashes):
                await trio.sleep(rng.uniform(0.05, 0.2))
                await trio.to_thread.run_sync(bed.restart_daemon)
            crashed.set()

        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for wid in range(depth):
                    nursery.start_soon(writer, wid)
                nursery.start_soon(crasher)
            await blk.flush()
            for sector, data in list(last.items())[:16]:  # the guest reads back what it wrote
                assert await blk.read(sector, BLOCK) == data
    return last


@pytest.mark.parametrize("virtio", ["blk", "blk,grant_usage=1"])
async def test_shadow_survives_20_daemon_crashes_without_losing_a_write(workdir, virtio):
    with BlkTestbed(workdir, vcpus=2, virtio=virtio, bridge_extra=["--memory", "shadow"]) as bed:
        last = await write_through_crashes(bed, crashes=20, depth=8, seed=1)
        assert_on_image(bed.image, last)
        output = bed.bridge.output()
        # A daemon killed again before the bridge reached it is not seen:
        # fewer comebacks than kills is fine, a reset or a lost write is not.
        assert "the daemon is back" in output, output[-2000:]
        assert "needs a reset" not in output


async def test_passthrough_resumes_from_the_guests_used_index(workdir):
    """One request at a time: the old daemon completed in order, so the
    new one starts at the guest's used index and redoes the one in flight."""
    with BlkTestbed(workdir, bridge_extra=["--memory", "passthrough"]) as bed:
        last = await write_through_crashes(bed, crashes=5, depth=1, seed=2)
        assert_on_image(bed.image, last)
        assert "the daemon is back" in bed.bridge.output()
        assert "needs a reset" not in bed.bridge.output()


async def test_a_daemon_that_stays_away_ends_in_needs_reset_and_a_reset_brings_it_back(workdir):
    with BlkTestbed(workdir, bridge_extra=["--reconnect", "0.5"]) as bed:
        async with SimGuest.open(bed.control) as guest:
            transport, blk = await open_blk(guest, bed)
            await blk.write(0, b"\x01" * BLOCK)
            seen = transport.config_changes
            bed.daemon.kill()
            with trio.fail_after(10):
                await transport.wait_config_change(seen)
            assert await transport.needs_reset()
            await trio.to_thread.run_sync(bed.restart_daemon)
            with trio.fail_after(20):
                await transport.reset()
                _transport, blk = await open_blk(guest, bed)
                await blk.write(8, b"\x02" * BLOCK)
                assert await blk.read(0, 2 * BLOCK) == b"\x01" * BLOCK + b"\x02" * BLOCK
        assert "did not come back within 0.5 s" in bed.bridge.output()
