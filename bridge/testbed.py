"""A whole path on one machine: a real vhost-user daemon (qemu-storage-daemon
on an image file, or virtiofsd on a shared directory), the Xen simulator,
and the bridge between them, each its own process.

The demo, the end-to-end tests and harnesses use it; the simulated guest
(xen.sim.guest) then connects to the simulator like a domU would. Everything
is started in path order and stopped in reverse, by PID, and the image and
sockets are removed unless the caller owns them.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from collections.abc import Sequence

from bridge.daemons import start_qemu_storage_daemon, start_testpmd, start_vhost_user_gpu, start_virtiofsd
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


class _Testbed:
    """What every testbed shares: the simulator with the device as libxl
    lays it out, the bridge started on the daemon's socket, stopping in
    reverse path order by PID, and removing what it made. A subclass
    starts its daemon (:meth:`_start_daemon`) and says which bridge flags
    and paths are its own."""

    device = "blk"
    """The bridge's --device."""
    socket_name = "vhost.sock"

    def __init__(
        self,
        workdir: str,
        *,
        domid: int = 1,
        vcpus: int = 1,
        ram_mib: int = 256,
        placement: str = "xenstore",
        virtio: str | None = None,
        bridge_extra: Sequence[str] = (),
        sim_extra: Sequence[str] = (),
    ) -> None:
        self.workdir = workdir
        self.daemon_socket = os.path.join(workdir, self.socket_name)
        self.control = os.path.join(workdir, "xen-sim.sock")
        self.domid = domid
        self.vcpus = vcpus
        self.ram_mib = ram_mib
        if placement not in ("xenstore", "flags"):
            raise ValueError(f"placement {placement!r} is neither 'xenstore' nor 'flags'")
        self.placement = placement
        self.virtio = virtio or self.device
        """The device as xl.cfg's virtio= entry gives it (xen-sim --virtio)."""
        self.mmio_base = LIBXL_FIRST_MMIO_BASE
        self.irq = LIBXL_FIRST_SPI
        self.bridge_extra = tuple(bridge_extra)
        self.sim_extra = tuple(sim_extra)
        self.daemon: Child | None = None
        self.sim = None
        self.bridge: Child | None = None

    # -- what a subclass provides ------------------------------------------

    def _prepare(self) -> None:
        """Make what the daemon needs (an image, a shared directory)."""

    def _start_daemon(self) -> Child:
        raise NotImplementedError

    def _device_flags(self) -> list[str]:
        """Bridge flags of the device type (e.g. --fs-tag)."""
        return []

    def _stop_daemon(self, daemon: Child, bridge_was_running: bool) -> None:
        daemon.stop()

    def _own_paths(self) -> list[str]:
        """Files to remove at stop besides the sockets."""
        return []

    # -- the common path ---------------------------------------------------

    def start(self):
        try:
            self._prepare()
            self.daemon = self._start_daemon()
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
                device=self.device,
                mmio_base=self.mmio_base if self.placement == "flags" else None,
                irq=self.irq if self.placement == "flags" else None,
                extra=[*self._device_flags(), *self.bridge_extra],
            )
        )
        return self.bridge

    def stop(self) -> None:
        """Stop what was started, in reverse path order; remove what we made."""
        bridge_was_running = self.bridge is not None
        for name in ("bridge", "sim"):
            child = getattr(self, name)
            if child is not None:
                child.stop()
                setattr(self, name, None)
        if self.daemon is not None:
            self._stop_daemon(self.daemon, bridge_was_running)
            self.daemon = None
        for path in [self.daemon_socket, self.control, *self._own_paths()]:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class BlkTestbed(_Testbed):
    """qemu-storage-daemon + simulator + bridge for one virtio-blk device.

    By default the simulator describes the device in xenstore the way libxl
    does (``xen-sim --virtio blk``; ``virtio="blk,grant_usage=1"`` for a
    guest that gives grant references) and the bridge finds it there;
    ``placement="flags"`` gives the bridge --mmio-base and --irq instead and
    leaves xenstore empty."""

    device = "blk"
    socket_name = "vhost-blk.sock"

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
        super().__init__(workdir, domid=domid, vcpus=vcpus, ram_mib=ram_mib, placement=placement, virtio=virtio,
                         bridge_extra=bridge_extra, sim_extra=sim_extra)
        self.image = image or os.path.join(workdir, "disk.img")
        self._own_image = image is None
        self.image_size = image_size

    def _prepare(self) -> None:
        if self._own_image:
            with open(self.image, "wb") as f:
                f.truncate(self.image_size)

    def _start_daemon(self) -> Child:
        return start_qemu_storage_daemon(self.image, self.daemon_socket)

    def _own_paths(self) -> list[str]:
        return [self.image] if self._own_image else []

    def start(self) -> "BlkTestbed":
        return super().start()

    def restart_daemon(self) -> Child:
        """Kill the daemon with SIGKILL (a crash) and start a new one on the
        same image and socket."""
        if self.daemon is not None:
            self.daemon.kill()
        self.daemon = None
        self.daemon = start_qemu_storage_daemon(self.image, self.daemon_socket)
        return self.daemon

    def __enter__(self) -> "BlkTestbed":
        return self.start()


class FsTestbed(_Testbed):
    """virtiofsd + simulator + bridge for one virtio-fs device.

    virtiofsd shares ``shared_dir`` (by default a new directory "share" in
    the work directory, removed at stop); the simulator gives the guest the
    device as ``xen-sim --virtio fs`` and the bridge serves it with
    ``--device fs --fs-tag TAG``.

    virtiofsd serves one connection and exits when it closes, so
    :meth:`stop` stops the bridge first and then gives the daemon
    ``daemon_exit_grace`` seconds to go by itself before stopping it;
    ``daemon_status`` is its exit status and ``daemon_exited_by_itself``
    whether it went when the bridge hung up (not an error)."""

    device = "fs"
    socket_name = "vhost-fs.sock"

    def __init__(
        self,
        workdir: str,
        *,
        tag: str = "xvbfs",
        shared_dir: str | None = None,
        domid: int = 1,
        vcpus: int = 1,
        ram_mib: int = 256,
        placement: str = "xenstore",
        virtio: str = "fs",
        bridge_extra: Sequence[str] = (),
        sim_extra: Sequence[str] = (),
        daemon_extra: Sequence[str] = (),
        daemon_exit_grace: float = 5.0,
    ) -> None:
        super().__init__(workdir, domid=domid, vcpus=vcpus, ram_mib=ram_mib, placement=placement, virtio=virtio,
                         bridge_extra=bridge_extra, sim_extra=sim_extra)
        self.tag = tag
        self.shared_dir = shared_dir or os.path.join(workdir, "share")
        self._own_shared_dir = shared_dir is None
        self.daemon_extra = tuple(daemon_extra)
        self.daemon_exit_grace = daemon_exit_grace
        self.daemon_status: int | None = None
        self.daemon_exited_by_itself: bool | None = None
        self.daemon_output = ""
        """What virtiofsd printed, kept after it was stopped."""

    def _prepare(self) -> None:
        if self._own_shared_dir:
            os.makedirs(self.shared_dir, exist_ok=True)

    def _start_daemon(self) -> Child:
        return start_virtiofsd(self.shared_dir, self.daemon_socket, extra=self.daemon_extra)

    def _device_flags(self) -> list[str]:
        return ["--fs-tag", self.tag]

    def _stop_daemon(self, daemon: Child, bridge_was_running: bool) -> None:
        exited = bridge_was_running and daemon.wait_exit(self.daemon_exit_grace)
        self.daemon_exited_by_itself = exited
        self.daemon_status = daemon.stop()
        self.daemon_output = daemon.output()

    def stop(self) -> None:
        super().stop()
        if self._own_shared_dir:
            shutil.rmtree(self.shared_dir, ignore_errors=True)

    def start(self) -> "FsTestbed":
        return super().start()

    def __enter__(self) -> "FsTestbed":
        return self.start()


class MultiTestbed:
    """Several devices of one guest through one bridge process: each
    testbed given (not started) brings its daemon and device flags; the
    simulator lays the devices out as libxl does (one ``--virtio`` each, in
    order, so device i is at LIBXL_FIRST_MMIO_BASE + 0x200 * i with SPI
    LIBXL_FIRST_SPI + i, written back into each testbed's ``mmio_base`` and
    ``irq``), and one bridge serves them all with ``--device TYPE:SOCKET``.
    Stopped in reverse path order: the bridge, the simulator, then each
    testbed's daemon and files."""

    def __init__(
        self,
        workdir: str,
        beds: Sequence[_Testbed],
        *,
        domid: int = 1,
        vcpus: int = 2,
        ram_mib: int = 512,
        bridge_extra: Sequence[str] = (),
    ) -> None:
        if len({bed.daemon_socket for bed in beds}) != len(beds):
            raise ValueError("every device needs a daemon socket of its own (one testbed per device type)")
        self.workdir = workdir
        self.beds = list(beds)
        self.control = os.path.join(workdir, "xen-sim.sock")
        self.domid = domid
        self.vcpus = vcpus
        self.ram_mib = ram_mib
        self.bridge_extra = tuple(bridge_extra)
        self.sim = None
        self.bridge: Child | None = None
        for i, bed in enumerate(self.beds):
            bed.domid = domid
            bed.control = self.control
            bed.mmio_base = LIBXL_FIRST_MMIO_BASE + 0x200 * i
            bed.irq = LIBXL_FIRST_SPI + i

    def start(self) -> "MultiTestbed":
        try:
            for bed in self.beds:
                bed._prepare()
                bed.daemon = bed._start_daemon()
            virtio = [arg for bed in self.beds for arg in ("--virtio", bed.virtio)]
            self.sim = start_simulator(self.control, domid=self.domid, vcpus=self.vcpus, ram_mib=self.ram_mib,
                                       extra_args=virtio)
            devices = [arg for bed in self.beds for arg in ("--device", f"{bed.device}:{bed.daemon_socket}")]
            flags = [flag for bed in self.beds for flag in (*bed._device_flags(), *bed.bridge_extra)]
            self.bridge = start_bridge([sys.executable, "-m", "bridge.cli", "--domid", str(self.domid),
                                        "--xen-sim", self.control, *devices, "-v", *flags, *self.bridge_extra])
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for name in ("bridge", "sim"):
            child = getattr(self, name)
            if child is not None:
                child.stop()
                setattr(self, name, None)
        for bed in reversed(self.beds):
            bed.stop()

    def __enter__(self) -> "MultiTestbed":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class GpuTestbed(_Testbed):
    """vhost-user-gpu (2D) + simulator + bridge for one virtio-gpu device.

    The bridge writes PNGs to ``output_dir`` (by default a new directory
    "frames" in the work directory, removed at stop): one per presented
    frame with ``every_flush``, and on :meth:`request_snapshot` (SIGUSR1).
    Like virtiofsd, vhost-user-gpu serves one connection and exits when it
    closes: :meth:`stop` gives it ``daemon_exit_grace`` seconds to go by
    itself after the bridge, and records whether it did."""

    device = "gpu"
    socket_name = "vhost-gpu.sock"

    def __init__(
        self,
        workdir: str,
        *,
        resolution: tuple[int, int] = (1024, 768),
        every_flush: bool = True,
        cursor: bool = False,
        output_dir: str | None = None,
        domid: int = 1,
        vcpus: int = 1,
        ram_mib: int = 256,
        placement: str = "xenstore",
        virtio: str = "gpu",
        bridge_extra: Sequence[str] = (),
        sim_extra: Sequence[str] = (),
        daemon_exit_grace: float = 5.0,
    ) -> None:
        super().__init__(workdir, domid=domid, vcpus=vcpus, ram_mib=ram_mib, placement=placement, virtio=virtio,
                         bridge_extra=bridge_extra, sim_extra=sim_extra)
        self.resolution = resolution
        self.every_flush = every_flush
        self.cursor = cursor
        self.output_dir = output_dir or os.path.join(workdir, "frames")
        self._own_output_dir = output_dir is None
        self.daemon_exit_grace = daemon_exit_grace
        self.daemon_status: int | None = None
        self.daemon_exited_by_itself: bool | None = None
        self.daemon_output = ""

    def _prepare(self) -> None:
        os.makedirs(self.output_dir, exist_ok=True)

    def _start_daemon(self) -> Child:
        return start_vhost_user_gpu(self.daemon_socket)

    def _device_flags(self) -> list[str]:
        flags = ["--gpu-output", self.output_dir, "--gpu-resolution", "%dx%d" % self.resolution]
        if self.every_flush:
            flags.append("--gpu-png-every-flush")
        if self.cursor:
            flags.append("--gpu-cursor")
        return flags

    def _stop_daemon(self, daemon: Child, bridge_was_running: bool) -> None:
        exited = bridge_was_running and daemon.wait_exit(self.daemon_exit_grace)
        self.daemon_exited_by_itself = exited
        self.daemon_status = daemon.stop()
        self.daemon_output = daemon.output()

    def pngs(self) -> list[str]:
        """The PNGs written so far, oldest first."""
        names = sorted(n for n in os.listdir(self.output_dir) if n.endswith(".png"))
        return [os.path.join(self.output_dir, n) for n in names]

    def restart_daemon(self) -> Child:
        """Kill vhost-user-gpu with SIGKILL (a crash) and start a new one
        on the same socket."""
        if self.daemon is not None:
            self.daemon.kill()
        self.daemon = None
        self.daemon = start_vhost_user_gpu(self.daemon_socket)
        return self.daemon

    def request_snapshot(self) -> None:
        """Ask the bridge for a PNG of every scanout now (SIGUSR1)."""
        os.kill(self.bridge.pid, signal.SIGUSR1)

    def stop(self) -> None:
        super().stop()
        if self._own_output_dir:
            shutil.rmtree(self.output_dir, ignore_errors=True)

    def start(self) -> "GpuTestbed":
        return super().start()

    def __enter__(self) -> "GpuTestbed":
        return self.start()


class NetTestbed(_Testbed):
    """dpdk-testpmd (vhost PMD, io forwarding) + simulator + bridge for one
    virtio-net device: every frame the guest transmits on pair N comes back
    on pair N's receive queue.

    testpmd forwards ``daemon_pairs`` pairs (its queues=, --rxq, --txq);
    the bridge offers the guest ``queue_pairs`` (None: what GET_QUEUE_NUM
    says, 128 for DPDK 22.11). testpmd keeps listening after a front-end
    goes; :meth:`stop` stops it by PID and removes its runtime directory
    under /var/run/dpdk (``daemon.runtime_dir``), and only that."""

    device = "net"
    socket_name = "vhost-net.sock"

    def __init__(
        self,
        workdir: str,
        *,
        mac: str = "52:54:00:12:34:56",
        daemon_pairs: int = 1,
        queue_pairs: int | None = None,
        domid: int = 1,
        vcpus: int = 1,
        ram_mib: int = 256,
        placement: str = "xenstore",
        virtio: str = "net",
        bridge_extra: Sequence[str] = (),
        sim_extra: Sequence[str] = (),
    ) -> None:
        super().__init__(workdir, domid=domid, vcpus=vcpus, ram_mib=ram_mib, placement=placement, virtio=virtio,
                         bridge_extra=bridge_extra, sim_extra=sim_extra)
        self.mac = mac
        self.daemon_pairs = daemon_pairs
        self.queue_pairs = queue_pairs
        self.daemon_output = ""
        """What testpmd printed, kept after it was stopped."""

    def _start_daemon(self) -> Child:
        return start_testpmd(self.daemon_socket, queue_pairs=self.daemon_pairs)

    def _device_flags(self) -> list[str]:
        flags = ["--mac", self.mac]
        if self.queue_pairs is not None:
            flags += ["--queue-pairs", str(self.queue_pairs)]
        return flags

    def _stop_daemon(self, daemon: Child, bridge_was_running: bool) -> None:
        daemon.stop()
        self.daemon_output = daemon.output()

    def restart_daemon(self) -> Child:
        """Kill testpmd with SIGKILL (a crash; its runtime directory is
        removed) and start a new one on the same socket."""
        if self.daemon is not None:
            self.daemon.kill()
            self.daemon_output = self.daemon.output()
        self.daemon = None
        self.daemon = self._start_daemon()
        return self.daemon

    def start(self) -> "NetTestbed":
        return super().start()

    def __enter__(self) -> "NetTestbed":
        return self.start()
