"""The soak: mixed virtio-blk traffic through the bridge for a fixed time,
while qemu-storage-daemon is killed with SIGKILL and restarted and the guest
resets the device, at random moments. Run it with ``scripts/soak``.

At the end every block the guest wrote is read back, through the guest and
from the image file, and must hold the last data written to it; a write cut
short by a guest reset (the guest's own doing) may have landed or not, so
either its new or its previous data counts as right. Exit status 0 only if
no block was lost or corrupted and the bridge kept its fds and memory.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

import trio

from bridge.processes import exit_cleanly_on_sigterm, run_trio
from bridge.testbed import BlkTestbed
from xen.sim.guest import SimGuest
from xen.sim.guest_memory import GuestAllocator
from xen.sim.guest_virtqueue import VirtioDriverError
from xen.sim.virtio_blk import VirtioBlkDriver
from xen.sim.virtio_mmio_driver import VirtioMmioDriver

BLOCK = 4096
SECTORS = BLOCK // 512
STALL_LIMIT = 60.0
"""Seconds a write may take, faults included, before the soak calls it a hang."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="how long to run (default: 10)")
    p.add_argument("--memory", choices=("passthrough", "shadow"), default="shadow",
                   help="the bridge's memory model (default: shadow, which survives any crash; passthrough "
                   "resumes only after in-order completions, so it runs one request at a time)")
    p.add_argument("--depth", type=int, default=8, help="writes in flight (shadow; default: 8)")
    p.add_argument("--blocks", type=int, default=512, help="4 KiB blocks the writers spread over (default: 512)")
    p.add_argument("--mean-gap", type=float, default=2.0, help="mean seconds between two faults (default: 2)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: a new one, printed)")
    args = p.parse_args(argv)
    if args.seed is None:
        args.seed = random.randrange(1 << 32)
    if args.memory == "passthrough":
        args.depth = 1
    return args


def proc_numbers(pid: int) -> tuple[int, int]:
    """(open fds, RSS in KiB) of a process."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return fds, rss


class Ledger:
    """What each block may hold: the data of its last completed write, or,
    after a write the guest's reset cut short, that or the older data."""

    def __init__(self) -> None:
        self.allowed: dict[int, list[bytes]] = {}
        self.busy: set[int] = set()
        self.requests = 0

    def completed(self, block: int, data: bytes) -> None:
        self.allowed[block] = [data]
        self.requests += 1

    def cut_short(self, block: int, data: bytes) -> None:
        self.allowed[block] = self.allowed.get(block, [bytes(BLOCK)]) + [data]


async def soak(bed: BlkTestbed, args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    ledger = Ledger()
    counts = {"kills": 0, "resets": 0}
    deadline = trio.current_time() + args.minutes * 60
    async with SimGuest.open(bed.control) as guest:
        allocator = GuestAllocator(guest.ram.base, guest.ram.size)
        state = {}

        async def open_device() -> None:
            transport = VirtioMmioDriver(None, guest.ram, allocator, bed.mmio_base, bed.irq, guest)
            state["transport"] = transport
            state["blk"] = await VirtioBlkDriver.open(transport)

        await open_device()
        # Warm up (first mappings, caches), reset, then count the bridge's
        # fds and memory: the end, after a final reset, must match.
        for block in range(8):
            await state["blk"].write(block * SECTORS, bytes(BLOCK))
        await state["transport"].reset()
        baseline = proc_numbers(bed.bridge.pid)
        await open_device()
        ready = trio.Event()
        ready.set()

        async def writer() -> None:
            while trio.current_time() < deadline:
                await ready.wait()
                block = rng.choice([b for b in range(args.blocks) if b not in ledger.busy])
                ledger.busy.add(block)
                data = rng.randbytes(BLOCK)
                try:
                    with trio.fail_after(STALL_LIMIT):
                        await state["blk"].write(block * SECTORS, data)
                    ledger.completed(block, data)
                except VirtioDriverError:
                    ledger.cut_short(block, data)  # the reset took it
                finally:
                    ledger.busy.discard(block)

        async def chaos() -> None:
            nonlocal ready
            while True:
                await trio.sleep(rng.expovariate(1 / args.mean_gap))
                if trio.current_time() >= deadline:
                    return
                if rng.random() < 0.5:
                    await trio.to_thread.run_sync(bed.restart_daemon)
                    counts["kills"] += 1
                else:
                    ready = trio.Event()
                    await state["transport"].reset()  # requests in flight are cut short
                    await open_device()
                    ready.set()
                    counts["resets"] += 1

        async with trio.open_nursery() as nursery:
            for _ in range(args.depth):
                nursery.start_soon(writer)
            nursery.start_soon(chaos)
        blk = state["blk"]
        await blk.flush()
        bad_in_guest = 0
        for block, allowed in sorted(ledger.allowed.items()):
            if await blk.read(block * SECTORS, BLOCK) not in allowed:
                bad_in_guest += 1
        await state["transport"].reset()  # back to the state the fds were first counted in
        final = proc_numbers(bed.bridge.pid)
    bad_on_image = 0
    with open(bed.image, "rb") as f:
        for block, allowed in sorted(ledger.allowed.items()):
            f.seek(block * BLOCK)
            if f.read(BLOCK) not in allowed:
                bad_on_image += 1
    return {"requests": ledger.requests, **counts, "bad_in_guest": bad_in_guest, "bad_on_image": bad_on_image,
            "blocks": len(ledger.allowed), "fds": (baseline[0], final[0]), "rss": (baseline[1], final[1])}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_cleanly_on_sigterm()
    print(f"soak: {args.minutes:g} min, {args.memory} memory, {args.depth} in flight, seed {args.seed}", flush=True)
    with tempfile.TemporaryDirectory(prefix="xvb-soak-") as work:
        with BlkTestbed(work, image_size=args.blocks * BLOCK, vcpus=2,
                        bridge_extra=["--memory", args.memory]) as bed:
            started = time.monotonic()
            result = None
            try:
                result = run_trio(soak, bed, args)
            except* trio.TooSlowError:
                print(f"soak: a write did not complete within {STALL_LIMIT:g} s: something hung; the bridge's log "
                      f"ends:\n{bed.bridge.output()[-3000:]}")
            alive = bed.bridge.alive()
    if result is None:
        print("soak: FAIL")
        return 1
    (fds0, fds1), (rss0, rss1) = result["fds"], result["rss"]
    lost = result["bad_in_guest"] + result["bad_on_image"]
    print(f"soak: {result['requests']} writes completed over {time.monotonic() - started:.0f} s on "
          f"{result['blocks']} blocks; {result['kills']} daemon kills and {result['resets']} guest resets survived")
    print(f"soak: lost or corrupted blocks: {result['bad_in_guest']} read back by the guest, "
          f"{result['bad_on_image']} on the image file")
    print(f"soak: bridge fds {fds0} -> {fds1}, RSS {rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MiB")
    ok = lost == 0 and alive and fds1 == fds0
    print("soak: PASS" if ok else "soak: FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
