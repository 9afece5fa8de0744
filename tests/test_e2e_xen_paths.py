"""End to end, the parts that face Xen: the device found in xenstore, its
backend state, its removal; the kernel fast path used, refused and turned
off; guest RAM mapped on demand within a bound. Real qemu-storage-daemon,
real simulator and bridge processes; data checked on the image file."""

from __future__ import annotations

import random

import pytest

from bridge.blk_workload import compare_image, run_blk_workload
from bridge.testbed import BlkTestbed
from tests.e2e_helpers import assert_on_image, open_blk, write_all
from xen.sim.client import SimHypervisor
from xen.sim.guest import SimGuest

pytestmark = pytest.mark.e2e

MiB = 1 << 20
BACKEND = "/local/domain/0/backend/virtio/1/0"


def sim_stats(bed: BlkTestbed) -> dict[str, int]:
    with SimHypervisor.connect(bed.control, bed.domid) as hv:
        return hv.stats()


def backend_state(bed: BlkTestbed) -> str | None:
    with SimHypervisor.connect(bed.control, bed.domid) as hv, hv.xenstore() as xs:
        return xs.read(f"{BACKEND}/state")


async def random_io(bed: BlkTestbed, *, requests: int = 120, seed: int = 7, guest: SimGuest | None = None) -> None:
    """Writes and reads at random offsets, many in flight on every vCPU,
    checked in the guest and on the image file."""
    if guest is None:
        async with SimGuest.open(bed.control) as guest:
            return await random_io(bed, requests=requests, seed=seed, guest=guest)
    _transport, blk = await open_blk(guest, bed)
    result, mirror = await run_blk_workload(
        blk, requests=requests, min_size=512, max_size=128 * 1024, depth=16, seed=seed, vcpus=guest.vcpus
    )
    await blk.flush()
    assert result.mismatch_count == 0, result.mismatches
    compare_image(bed.image, mirror, result)
    assert result.mismatch_count == 0, result.mismatches


# --- the device in xenstore ------------------------------------------------


async def test_the_bridge_serves_what_libxl_wrote_and_keeps_the_backend_state(workdir):
    with BlkTestbed(workdir, vcpus=2) as bed:
        assert f"(xenstore {BACKEND})" in bed.bridge.output()
        assert backend_state(bed) == "4"  # Connected while it serves
        async with SimGuest.open(bed.control) as guest:
            [device] = await guest.devices()  # the guest's device tree says the same
            assert (device.base, device.irq) == (bed.mmio_base, bed.irq)
            await random_io(bed, requests=40, guest=guest)
        bridge = bed.bridge
        bridge.stop()  # SIGTERM
        bed.bridge = None
        assert bridge.proc.returncode == 0, bridge.output()
        assert backend_state(bed) == "6"  # Closed once it stopped


async def test_flags_place_the_device_without_xenstore(workdir):
    with BlkTestbed(workdir, placement="flags") as bed:
        assert "xenstore" not in bed.bridge.output()
        await random_io(bed, requests=40)


async def test_removing_the_device_from_xenstore_stops_the_bridge_cleanly(workdir):
    with BlkTestbed(workdir) as bed:
        await random_io(bed, requests=20)
        with SimHypervisor.connect(bed.control, bed.domid) as hv, hv.xenstore() as xs:
            xs.remove(BACKEND)  # what the toolstack does when the device goes
        bed.bridge.proc.wait(10)
        bridge, bed.bridge = bed.bridge, None
        assert bridge.proc.returncode == 0, bridge.output()
        assert f"{BACKEND} was removed from xenstore: stopping" in bridge.output()
        assert "Traceback" not in bridge.output()


# --- the kernel fast path ----------------------------------------------------


@pytest.mark.parametrize(
    "memory, kernel_irqs",
    [("passthrough", True), ("shadow", False)],  # shadow copies completions back: the bridge raises them
)
async def test_the_kernel_takes_kicks_and_interrupts_where_it_can(workdir, memory, kernel_irqs):
    with BlkTestbed(workdir, vcpus=2, bridge_extra=["--memory", memory, "--kernel-kicks"]) as bed:
        await random_io(bed)
        stats = sim_stats(bed)
        assert stats["kernel_kicks"] > 0
        assert (stats["kernel_irqs"] > 0) == kernel_irqs
        assert "kicks taken by the kernel (ioeventfd)" in bed.bridge.output()


@pytest.mark.parametrize("memory", ["passthrough", "shadow"])
async def test_slots_the_kernel_holds_then_hands_back_are_not_lost(workdir, memory):
    """The simulated kernel holds every guest write INPROCESS for 200 us
    before it takes a kick or hands the slot back: the bridge sees held
    slots on every access and must serve those handed back (or the vCPU
    would hang, which the simulator reports)."""
    with BlkTestbed(workdir, vcpus=2, bridge_extra=["--memory", memory, "--kernel-kicks"],
                    sim_extra=["--fast-path-hold-us", "200"]) as bed:
        await random_io(bed)
        assert sim_stats(bed)["kernel_kicks"] > 0


@pytest.mark.parametrize("memory", ["passthrough", "shadow"])
async def test_by_default_only_interrupts_take_the_fast_path(workdir, memory):
    with BlkTestbed(workdir, vcpus=2, bridge_extra=["--memory", memory]) as bed:
        await random_io(bed)
        stats = sim_stats(bed)
        assert stats["kernel_kicks"] == 0
        assert (stats["kernel_irqs"] > 0) == (memory == "passthrough")
        assert "kicks relayed by the bridge" in bed.bridge.output()


@pytest.mark.parametrize("memory", ["passthrough", "shadow"])
async def test_no_fast_path_relays_everything_through_the_bridge(workdir, memory):
    with BlkTestbed(workdir, vcpus=2, bridge_extra=["--memory", memory, "--no-fast-path"]) as bed:
        await random_io(bed)
        stats = sim_stats(bed)
        assert stats["kernel_kicks"] == stats["kernel_irqs"] == 0
        assert "kicks relayed by the bridge, interrupts raised by the bridge" in bed.bridge.output()


async def test_a_kernel_without_the_fast_path_falls_back_to_the_relay(workdir):
    with BlkTestbed(workdir, vcpus=2, sim_extra=["--no-kernel-fast-path"]) as bed:
        await random_io(bed)
        assert sim_stats(bed)["kernel_kicks"] == 0
        output = bed.bridge.output()
        assert output.count("kernel fast path unavailable") == 1
        assert "kicks relayed by the bridge" in output


async def test_resets_register_and_remove_the_fast_path_each_time(workdir):
    """Every start registers the ring's eventfds, every reset removes them
    (the simulator refuses a second registration of the same queue, and a
    removed one no longer takes kicks)."""
    with BlkTestbed(workdir, bridge_extra=["--memory", "passthrough", "--kernel-kicks"]) as bed:
        async with SimGuest.open(bed.control) as guest:
            for round_ in range(3):
                transport, blk = await open_blk(guest, bed)
                await blk.write(round_ * 8, bytes([round_ + 1]) * 4096)
                await transport.reset()
        assert bed.bridge.output().count("interrupts raised by the kernel (irqfd)") == 3
        assert "refused" not in bed.bridge.output()
        assert_on_image(bed.image, {r * 8: bytes([r + 1]) * 4096 for r in range(3)})


# --- guest RAM mapped on demand ------------------------------------------------


def guest_ram_mapped_by(pid: int, domid: int) -> int:
    """Bytes of the simulator's guest-RAM memfd mapped into a process."""
    total = 0
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            if f"xen-sim domain {domid} RAM" in line:
                start, end = (int(x, 16) for x in line.split()[0].split("-"))
                total += end - start
    return total


async def test_shadow_maps_only_the_guest_pages_it_touches_within_the_cache_bound(workdir):
    rng = random.Random(5)
    blocks = {i * 512: rng.randbytes(64 * 1024) for i in range(48)}
    flags = ["--memory", "shadow", "--map-cache-mib", "1"]
    with BlkTestbed(workdir, ram_mib=256, bridge_extra=flags) as bed:
        async with SimGuest.open(bed.control) as guest:
            transport, blk = await open_blk(guest, bed)
            items = list(blocks.items())
            for start in range(0, 48, 8):
                await write_all(blk, dict(items[start : start + 8]))
                # Keep what those buffers used, so the next batch's buffers
                # are fresh guest pages: 3 MiB of buffers through a 1 MiB cache.
                transport.allocator.allocate(8 * 64 * 1024)
                assert guest_ram_mapped_by(bed.bridge.pid, bed.domid) <= 1 * MiB
            await blk.flush()
            assert await blk.read(0, 64 * 1024) == blocks[0]
        stats = sim_stats(bed)
        assert stats["map_foreign_pages"] * 4096 >= 3 * MiB  # every buffer was mapped...
        assert guest_ram_mapped_by(bed.bridge.pid, bed.domid) <= 1 * MiB  # ...and the bound held
        assert_on_image(bed.image, blocks)


# --- a guest that gives grant references ---------------------------------------


def pattern(tag: int, length: int) -> bytes:
    return bytes((tag * 131 + i * 7) & 0xFF for i in range(length))


async def test_a_guest_using_grants_is_served_through_shadow_memory(workdir):
    """xl's grant_usage=1: the guest's driver gives the device grant
    addresses only (xen-grant-dma); the bridge finds that in xenstore,
    picks shadow memory, maps each buffer's grants for the copy and the
    rings' for the queue's life; the data lands on the image; after the
    requests only the rings stay granted, after the reset nothing does."""
    with BlkTestbed(workdir, vcpus=2, virtio="blk,grant_usage=1") as bed:
        assert "shadow memory" in bed.bridge.output()  # auto chose it
        with SimHypervisor.connect(bed.control, bed.domid) as hv:
            async with SimGuest.open(bed.control) as guest:
                transport, blk = await open_blk(guest, bed)
                dma = transport.dma
                assert all(a >> 63 for vq in blk.queues for a in (vq.desc_dma, vq.avail_dma, vq.used_dma))
                ring_refs = dma.live_refs(coherent=True)
                assert hv.stats()["grants_active"] == ring_refs > 0

                blocks = {32 * i: pattern(i, 4096 + 512 * i) for i in range(1, 9)}
                await write_all(blk, blocks)
                await blk.flush()
                for sector, data in blocks.items():
                    assert await blk.read(sector, len(data)) == data
                big = pattern(99, 300 * 1024)  # several requests of many pages each
                await blk.write(2048, big)
                assert await blk.read(2048, len(big)) == big
                stats = hv.stats()
                assert stats["grants_active"] == ring_refs  # every buffer's grants were ended
                assert stats["map_grant_calls"] > 0 and stats["map_foreign_calls"] == 0  # grants only
                await transport.reset()
                assert hv.stats()["grants_active"] == 0
        assert_on_image(bed.image, {**blocks, 2048: big})
