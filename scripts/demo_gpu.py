"""The gpu demo: a simulated Xen guest draws a picture on a virtio-gpu
through the bridge to a real, unmodified vhost-user-gpu (QEMU's, 2D), and
the bridge saves what the daemon shows as a PNG. Run it with
``scripts/demo gpu``.

    guest draws into its framebuffer (guest RAM) -> TRANSFER_TO_HOST_2D,
      RESOURCE_FLUSH on the control queue -> xen-sim -> xen-vhost-bridge
      -> vhost-user-gpu -> UPDATE on the display channel -> the bridge's
      frame sink -> PNG

The picture is a test card (a gradient, a checkerboard, a disc, a frame,
a bar); then the guest moves a square across it with partial flushes. The
demo reads every PNG the bridge wrote back and compares it pixel for pixel
with what the guest drew; exit status 0 only if all match. The last frame
is kept at ``--png`` (default xen-vhost-bridge-gpu.png in the temporary
directory, replaced by each run) and its path printed. ``--memory
shadow`` runs it as on Xen: the daemon sees only the bridge's arena, and
the bridge copies the framebuffer's backing into it at ATTACH_BACKING and
every TRANSFER_TO_HOST_2D (bridge/gpu_shadow.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import sys
import tempfile
import time

import attrs
import trio

from bridge import png
from bridge.processes import ChildFailed, exit_cleanly_on_sigterm, run_trio
from bridge.testbed import GpuTestbed
from xen.sim.gpu_pictures import picture, solid, to_rgb
from xen.sim.guest import SimGuest
from xen.sim.guest_memory import GuestAllocator
from xen.sim.virtio_gpu import VirtioGpuDriver
from xen.sim.virtio_mmio_driver import VirtioMmioDriver

FRAME_TIMEOUT = 30.0
"""Seconds to wait for the bridge's PNG of a flushed frame."""
SQUARE = 48
STEPS = 4


@attrs.frozen
class GpuOutcome:
    ok: bool
    line: str
    png: str | None
    """The last PNG the bridge wrote (None if none came)."""


def _pngs(frames_dir: str) -> list[str]:
    return sorted(os.path.join(frames_dir, n) for n in os.listdir(frames_dir) if n.endswith(".png"))


async def _next_png(frames_dir: str, seen: int) -> str:
    with trio.fail_after(FRAME_TIMEOUT):
        while True:
            pngs = _pngs(frames_dir)
            if len(pngs) > seen:
                return pngs[seen]
            await trio.sleep(0.02)


async def exercise_gpu(transport: VirtioMmioDriver, frames_dir: str, *, seed: int = 0) -> GpuOutcome:
    """The guest's side on a virtio-gpu window whose bridge writes a PNG
    per flush into ``frames_dir`` (``--gpu-output DIR --gpu-png-every-flush``,
    as GpuTestbed sets): open the device, draw the test card at the mode
    the display offers, flush, then move a square with partial flushes;
    each PNG is compared with what the guest drew. Resets the device at
    the end."""
    started = time.monotonic()
    gpu = await VirtioGpuDriver.open(transport)
    (mode,) = [m for m in await gpu.get_display_info() if m.enabled][:1] or [None]
    if mode is None:
        return GpuOutcome(False, "the display offers no enabled scanout", None)
    w, h = mode.width, mode.height
    fb = await gpu.create_framebuffer(w, h)
    drawn = bytearray(picture(w, h))
    fb.fill(0, 0, w, h, bytes(drawn))
    seen = len(_pngs(frames_dir))
    await gpu.flush(fb)
    checked, mismatched, last = 0, 0, None

    async def check() -> None:
        nonlocal seen, checked, mismatched, last
        last = await _next_png(frames_dir, seen)
        seen += 1
        checked += 1
        got = await trio.to_thread.run_sync(png.read_rgb, last)
        if got != (w, h, to_rgb(bytes(drawn))):
            mismatched += 1

    await check()
    rng = random.Random(seed)
    size = min(SQUARE, w // 4, h // 4)
    for step in range(STEPS):
        x = (w - size) * (step + 1) // (STEPS + 1)
        y = rng.randrange(0, h - size + 1)
        square = solid(size, size, (255, rng.randrange(256), 255 - 48 * step))
        fb.fill(x, y, size, size, square)
        for r in range(size):
            start = ((y + r) * w + x) * 4
            drawn[start:start + size * 4] = square[r * size * 4:(r + 1) * size * 4]
        await gpu.flush(fb, x, y, size, size)
        await check()
    await gpu.close()
    ok = mismatched == 0 and checked == STEPS + 1
    line = (f"{w}x{h} test card and {STEPS} partial updates: {checked} PNGs, {mismatched} differing from the "
            f"guest's pixels, in {time.monotonic() - started:.1f} s; last frame {last}")
    return GpuOutcome(ok, line, last)


async def run_guest_side(guest: SimGuest, base: int, irq: int, frames_dir: str,
                         allocator: GuestAllocator | None = None, *, seed: int = 0) -> GpuOutcome:
    """``exercise_gpu`` on the device at ``base``/``irq`` of an already
    connected guest (e.g. the gpu of a multi-device bridge)."""
    allocator = allocator or GuestAllocator(guest.ram.base, guest.ram.size)
    transport = await VirtioMmioDriver.for_device(guest, allocator, base, irq)
    return await exercise_gpu(transport, frames_dir, seed=seed)


async def exercise_part(transport: VirtioMmioDriver, bed: GpuTestbed, guest: SimGuest, args) -> tuple[bool, str]:
    """For ``scripts/demo all`` (its Part.exercise): (passed, one line)."""
    outcome = await exercise_gpu(transport, bed.output_dir, seed=getattr(args, "seed", 0) or 0)
    return outcome.ok, outcome.line


def parse_resolution(text: str) -> tuple[int, int]:
    w, x, h = text.lower().partition("x")
    try:
        size = (int(w), int(h))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not WIDTHxHEIGHT: {text!r}") from None
    if not x or not all(64 <= v <= 4095 for v in size):
        raise argparse.ArgumentTypeError(f"a resolution of 64 to 4095 a side, not {text!r}")
    return size


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/demo gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--resolution", type=parse_resolution, default=(1024, 768),
                   help="the display mode the bridge offers (default: 1024x768)")
    p.add_argument("--png", default=os.path.join(tempfile.gettempdir(), "xen-vhost-bridge-gpu.png"),
                   help="where to keep the last frame (default: %(default)s)")
    p.add_argument("--memory", choices=("passthrough", "shadow"), default="passthrough",
                   help="the bridge's memory model: the daemon maps guest RAM (passthrough), or sees only an "
                        "arena the bridge copies the framebuffer into (shadow, as on Xen) (default: passthrough)")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed for where the square goes (default: a new one, printed)")
    p.add_argument("-v", "--verbose", action="store_true", help="log what the guest's drivers do")
    args = p.parse_args(argv)
    if args.seed is None:
        args.seed = random.randrange(1 << 32)
    return args


async def guest_program(bed: GpuTestbed, seed: int) -> GpuOutcome:
    async with SimGuest.open(bed.control) as guest:
        return await run_guest_side(guest, bed.mmio_base, bed.irq, bed.output_dir, seed=seed)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_cleanly_on_sigterm()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="demo: %(name)s: %(message)s")
    target = os.path.abspath(args.png)
    if not os.path.isdir(os.path.dirname(target)):
        print(f"demo: FAILED: the directory of --png {args.png} does not exist", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="xvb-demo-gpu-") as work:
        print(f"demo: seed {args.seed}; starting vhost-user-gpu, xen-sim, xen-vhost-bridge ({args.resolution[0]}x"
              f"{args.resolution[1]}, {args.memory} memory, a PNG per frame)")
        try:
            with GpuTestbed(work, resolution=args.resolution, bridge_extra=["--memory", args.memory]) as bed:
                print(f"demo: domU {bed.domid} -> virtio-mmio {bed.mmio_base:#x} irq {bed.irq} -> bridge "
                      f"(pid {bed.bridge.pid}) -> vhost-user-gpu (pid {bed.daemon.pid}) -> display channel -> PNG")
                outcome = run_trio(guest_program, bed, args.seed)
                if outcome.png is not None:
                    shutil.copyfile(outcome.png, target)
        except ChildFailed as exc:
            print(f"demo: FAILED: {exc}", file=sys.stderr)
            return 1
    print(f"demo: {outcome.line.rsplit('; last frame', 1)[0]}")
    if outcome.png is not None:
        print(f"demo: the last frame, as the bridge saved it: {target}")
    print("demo: PASS" if outcome.ok else "demo: FAIL")
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main())
