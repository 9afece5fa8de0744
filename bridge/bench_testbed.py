"""The set-up the benchmark measures: N qemu-storage-daemons on small
images, the Xen simulator with V vCPUs and N virtio-blk devices laid out as
libxl does, and (unless ``bridge=False``) one bridge process serving them
all. With ``bridge=False`` the daemons wait for a front-end of their own:
the simulated guest itself (bridge.bench_direct).

Everything is started in path order and stopped in reverse, by PID; the
images and sockets are removed. The bridge's start-to-ready time and its
memory (VmRSS, VmHWM) are kept for the scale measurement.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Sequence

from bridge.daemons import start_qemu_storage_daemon
from bridge.processes import Child, child_env
from bridge.testbed import LIBXL_FIRST_MMIO_BASE, LIBXL_FIRST_SPI, start_bridge
from xen.sim.launch import start_simulator
from xen.sim.xenstore import MAX_VIRTIO_MMIO_DEVICES

MiB = 1 << 20
WINDOW_STRIDE = 0x200  # libxl's spacing of virtio-mmio windows


class BlkBenchBed:
    """Daemons, simulator and bridge for ``devices`` virtio-blk disks."""

    def __init__(
        self,
        workdir: str,
        *,
        devices: int = 1,
        vcpus: int = 1,
        image_mib: int = 64,
        ram_mib: int = 256,
        bridge: bool = True,
        bridge_extra: Sequence[str] = (),
        sim_extra: Sequence[str] = (),
        domid: int = 1,
        bridge_tree: str | None = None,
    ) -> None:
        if devices < 1 or vcpus < 1:
            raise ValueError("need at least one device and one vCPU")
        self.workdir = workdir
        self.devices = devices
        self.vcpus = vcpus
        self.image_mib = image_mib
        self.ram_mib = ram_mib
        self.with_bridge = bridge
        self.bridge_extra = tuple(bridge_extra)
        self.sim_extra = tuple(sim_extra)
        self.domid = domid
        self.bridge_tree = bridge_tree
        """Run the bridge from this source tree (its bridge/, xen/ and
        vhost_user/ packages) instead of this checkout: a before/after
        comparison in one run."""
        self.control = os.path.join(workdir, "sim.sock")
        self.images = [os.path.join(workdir, f"disk{i}.img") for i in range(devices)]
        self.sockets = [os.path.join(workdir, f"blk{i}.sock") for i in range(devices)]
        self.placement = "xenstore" if devices <= MAX_VIRTIO_MMIO_DEVICES else "flags"
        """libxl (and the simulator) give at most 11 virtio-mmio devices SPIs:
        beyond that every device is placed by the bridge's flags instead of
        found in xenstore."""
        self.daemons: list[Child] = []
        self.sim = None
        self.bridge: Child | None = None
        self.ready_seconds: float | None = None
        """Seconds from starting the bridge process to its ready line."""

    def mmio_base(self, index: int) -> int:
        return LIBXL_FIRST_MMIO_BASE + WINDOW_STRIDE * index

    def irq(self, index: int) -> int:
        return LIBXL_FIRST_SPI + index

    def bridge_argv(self) -> list[str]:
        argv = [sys.executable, "-m", "bridge.cli", "--domid", str(self.domid), "--xen-sim", self.control]
        for i, sock in enumerate(self.sockets):
            place = f",mmio-base={self.mmio_base(i):#x},irq={self.irq(i)}" if self.placement == "flags" else ""
            argv += ["--device", f"blk:{sock}{place}"]
        return argv + list(self.bridge_extra)

    def start(self) -> "BlkBenchBed":
        try:
            for image, sock in zip(self.images, self.sockets):
                with open(image, "wb") as f:
                    f.truncate(self.image_mib * MiB)
                self.daemons.append(start_qemu_storage_daemon(image, sock))
            virtio = [arg for _ in range(self.devices) for arg in ("--virtio", "blk")]
            if self.placement == "flags":
                virtio = []
            self.sim = start_simulator(self.control, domid=self.domid, vcpus=self.vcpus, ram_mib=self.ram_mib,
                                       extra_args=[*virtio, *self.sim_extra])
            if self.with_bridge:
                started = time.perf_counter()
                self.bridge = self._start_bridge()
                self.ready_seconds = time.perf_counter() - started
        except BaseException:
            self.stop()
            raise
        return self

    def _start_bridge(self) -> Child:
        if self.bridge_tree is None:
            return start_bridge(self.bridge_argv(), timeout=60.0)
        env = child_env()
        env["PYTHONPATH"] = os.pathsep.join([self.bridge_tree, env["PYTHONPATH"]])
        # -P: not the working directory first on sys.path, the tree.
        argv = self.bridge_argv()
        argv.insert(1, "-P")
        child = Child("xen-vhost-bridge", argv, env=env)
        try:
            child.wait_for_output("ready:", 60.0)
        except BaseException:
            child.stop()
            raise
        return child

    def bridge_memory_kib(self) -> dict[str, int]:
        """The bridge's VmRSS and VmHWM in KiB (from /proc/PID/status)."""
        if self.bridge is None:
            raise RuntimeError("no bridge in this set-up")
        found = {}
        with open(f"/proc/{self.bridge.pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    found[key] = int(value.split()[0])
        return found

    def stop(self) -> None:
        """Stop what was started, in reverse path order; remove what we made."""
        if self.bridge is not None:
            self.bridge.stop()
            self.bridge = None
        if self.sim is not None:
            self.sim.stop()
            self.sim = None
        for daemon in reversed(self.daemons):
            daemon.stop()
        self.daemons.clear()
        for path in [*self.images, *self.sockets, self.control]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def __enter__(self) -> "BlkBenchBed":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
