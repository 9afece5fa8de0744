"""A whole path on one machine: a real qemu-storage-daemon on an image file,
the Xen simulator, and the bridge between them, each its own process.

The demo, the end-to-end tests and harnesses use it; the simulated guest
(xen.sim.guest) then connects to the simulator like a domU would. Everything
is started in path order and stopped in reverse, by PID, and the image and
sockets are removed unless the caller owns them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from bridge.daemons import start_qemu_storage_daemon
from bridge.processes import Child, child_env
from xen.sim.launch import start_simulator

# Where libxl puts a guest's first virtio-mmio device on Arm, and so where
# the simulator started with one --virtio device puts it too.
LIBXL_FIRST_MMIO_BASE = 0x02000000
LIBXL_FIRST_SPI = 33


def bridge_argv(
    *,
    domid: int,
    socket_path: str,
    xen_sim: str,
    device: str = "blk",
    mmio_base: int | None = None,
    irq: int | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The bridge's command line; without ``mmio_base`` and ``irq`` it finds
    the device in the simulator's xenstore, as on Xen."""
    placement = []
    if mmio_base is not None:
        placement += ["--mmio-base", hex(mmio_base)]
    if irq is not None:
        placement += ["--irq", str(irq)]
    return [
        sys.executable,
        "-m",
        "bridge.cli",
        "--domid",
        str(domid),
        "--socket",
        socket_path,
        "--xen-sim",
        xen_sim,
        "--device",
        device,
        *placement,
        "-v",
        *extra,
    ]


def start_bridge(argv: Sequence[str], timeout: float = 15.0) -> Child:
    child = Child("xen-vhost-bridge", argv, env=child_env())
    try:
        child.wait_for_output("ready:", timeout)
    except BaseException:
        child.stop()
        raise
    return child


class BlkTestbed:
    """qemu-storage-daemon + simulator + bridge for one virtio-blk device.

    By default the simulator describes the device in xenstore the way libxl
    does (``xen-sim --virtio blk``; ``virtio="blk,grant_usage=1"`` for a
    guest that gives grant references) and the bridge finds it there;
    ``placement="flags"`` gives the bridge --mmio-base and --irq instead and
    leaves xenstore empty."""

    def __init__(
        self,
        workdir: str,
        *,
        image_size: int = 64 << 20,
        image: str | None = None,
        domid: int = 1,
        vcpus: int = 1,
        ram_mib: int = 256,
        placement: str = "xenstore",
        virtio: str = "blk",
        bridge_extra: Sequence[str] = (),
        sim_extra: Sequence[str] = (),
    ) -> None:
        self.workdir = workdir
        self.image = image or os.path.join(workdir, "disk.img")
        self._own_image = image is None
        self.image_size = image_size
        self.daemon_socket = os.path.join(workdir, "vhost-blk.sock")
        self.control = os.path.join(workdir, "xen-sim.sock")
        self.domid = domid
        self.vcpus = vcpus
        self.ram_mib = ram_mib
        if placement not in ("xenstore", "flags"):
            raise ValueError(f"placement {placement!r} is neither 'xenstore' nor 'flags'")
        self.placement = placement
        self.virtio = virtio
        """The device as xl.cfg's virtio= entry gives it (xen-sim --virtio)."""
        self.mmio_base = LIBXL_FIRST_MMIO_BASE
        self.irq = LIBXL_FIRST_SPI
        self.bridge_extra = tuple(bridge_extra)
        self.sim_extra = tuple(sim_extra)
        self.daemon: Child | None = None
        self.sim = None
        self.bridge: Child | None = None

    def start(self) -> "BlkTestbed":
        try:
            if self._own_image:
                with open(self.image, "wb") as f:
                    f.truncate(self.image_size)
            self.daemon = start_qemu_storage_daemon(self.image, self.daemon_socket)
            sim_args = ["--virtio", self.virtio] if self.placement == "xenstore" else []
            self.sim = start_simulator(
                self.control,
                domid=self.domid,
                vcpus=self.vcpus,
                ram_mib=self.ram_mib,
                extra_args=[*sim_args, *self.sim_extra],
            )
            self.start_bridge()
        except BaseException:
            self.stop()
            raise
        return self

    def start_bridge(self) -> Child:
        self.bridge = start_bridge(
            bridge_argv(
                domid=self.domid,
                socket_path=self.daemon_socket,
                xen_sim=self.control,
                mmio_base=self.mmio_base if self.placement == "flags" else None,
                irq=self.irq if self.placement == "flags" else None,
                extra=self.bridge_extra,
            )
        )
        return self.bridge

    def restart_daemon(self) -> Child:
        """Kill the daemon with SIGKILL (a crash) and start a new one on the
        same image and socket."""
        if self.daemon is not None:
            self.daemon.kill()
        self.daemon = None
        self.daemon = start_qemu_storage_daemon(self.image, self.daemon_socket)
        return self.daemon

    def stop(self) -> None:
        """Stop what was started, in reverse path order; remove what we made."""
        for name in ("bridge", "sim", "daemon"):
            child = getattr(self, name)
            if child is not None:
                child.stop()
                setattr(self, name, None)
        paths = [self.daemon_socket, self.control]
        if self._own_image:
            paths.append(self.image)
        for path in paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "BlkTestbed":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
