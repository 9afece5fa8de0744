"""The real vhost-user daemons, started the way ../shared/docs/daemons.md
says (Debian 12 packages), for the demo, the tests and harnesses."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence

from bridge.processes import Child

QEMU_STORAGE_DAEMON = "/usr/bin/qemu-storage-daemon"


class DaemonMissing(RuntimeError):
    """The daemon's binary is not installed."""


def _require(binary: str, package: str) -> str:
    path = binary if os.path.isabs(binary) else shutil.which(binary)
    if not path or not os.access(path, os.X_OK):
        raise DaemonMissing(f"{binary} is not installed (apt-get install {package})")
    return path


def qemu_storage_daemon_argv(image: str, socket_path: str, *, writable: bool = True, num_queues: int = 1) -> list[str]:
    """The command line of daemons.md."""
    binary = _require(QEMU_STORAGE_DAEMON, "qemu-system-common")
    export = (
        f"type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={socket_path},"
        f"writable={'on' if writable else 'off'},num-queues={num_queues}"
    )
    return [binary, "--blockdev", f"driver=file,node-name=f,filename={image}", "--export", export]


def start_qemu_storage_daemon(
    image: str,
    socket_path: str,
    *,
    writable: bool = True,
    num_queues: int = 1,
    timeout: float = 10.0,
) -> Child:
    """Start qemu-storage-daemon exporting ``image`` as vhost-user-blk on
    ``socket_path`` and wait until it listens. The caller stops it."""
    argv = qemu_storage_daemon_argv(image, socket_path, writable=writable, num_queues=num_queues)
    return _listening_or_stopped(Child("qemu-storage-daemon", argv), socket_path, timeout)


VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
VIRTIOFSD_PIDFILE_DIR = "/var/run/virtiofsd"
"""Where QEMU's C virtiofsd writes (and never removes) a pid file per socket."""


def virtiofsd_argv(shared_dir: str, socket_path: str, *, extra: Sequence[str] = ()) -> list[str]:
    """The command line of daemons.md (``extra``: more options, e.g.
    ``["-o", "log_level=debug"]``)."""
    binary = _require(VIRTIOFSD, "qemu-system-common")
    return [binary, f"--socket-path={socket_path}", "-o", f"source={shared_dir}", "-o", "sandbox=chroot", *extra]


def virtiofsd_pidfile(socket_path: str) -> str:
    """The pid file virtiofsd writes for ``socket_path``: the path with
    every "/" made a ".", under /var/run/virtiofsd."""
    return os.path.join(VIRTIOFSD_PIDFILE_DIR, socket_path.replace("/", ".") + ".pid")


class VirtiofsdChild(Child):
    """virtiofsd as a child: stopping it also removes the pid file it
    leaves behind (only while the file still names this process)."""

    def __init__(self, argv: Sequence[str], socket_path: str) -> None:
        super().__init__("virtiofsd", argv)
        self.pidfile = virtiofsd_pidfile(socket_path)

    def stop(self, grace: float = 5.0) -> int | None:
        status = super().stop(grace)
        self._remove_pidfile()
        return status

    def kill(self) -> None:
        super().kill()
        self._remove_pidfile()

    def wait_exit(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the daemon to exit by itself
        (it does when its front-end's connection closes); True if it did."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def _remove_pidfile(self) -> None:
        try:
            with open(self.pidfile) as f:
                owner = f.read().strip()
            if owner == str(self.pid):
                os.unlink(self.pidfile)
        except OSError:
            pass


def start_virtiofsd(
    shared_dir: str,
    socket_path: str,
    *,
    extra: Sequence[str] = (),
    timeout: float = 10.0,
) -> VirtiofsdChild:
    """Start virtiofsd sharing ``shared_dir`` on ``socket_path`` and wait
    until it listens. virtiofsd serves one front-end connection and exits
    when it closes, so readiness is read from /proc/net/unix instead of
    probing the socket with a connection. The caller stops it."""
    if not os.path.isdir(shared_dir):
        raise FileNotFoundError(f"virtiofsd: shared directory {shared_dir} does not exist")
    child = VirtiofsdChild(virtiofsd_argv(shared_dir, socket_path, extra=extra), socket_path)
    return _listening_or_stopped(child, socket_path, timeout)


VHOST_USER_GPU = "/usr/lib/qemu/vhost-user-gpu"


def vhost_user_gpu_argv(socket_path: str, *, extra: Sequence[str] = ()) -> list[str]:
    """The command line of daemons.md (2D: no --virgl, no render node)."""
    binary = _require(VHOST_USER_GPU, "qemu-system-gui")
    return [binary, f"--socket-path={socket_path}", *extra]


class VhostUserGpuChild(Child):
    """vhost-user-gpu as a child. It accepts one connection and exits when
    that closes, like virtiofsd."""

    def __init__(self, argv: Sequence[str]) -> None:
        super().__init__("vhost-user-gpu", argv)

    def wait_exit(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for it to exit by itself; True if it did."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True


def start_vhost_user_gpu(socket_path: str, *, extra: Sequence[str] = (), timeout: float = 10.0) -> VhostUserGpuChild:
    """Start vhost-user-gpu listening on ``socket_path`` and wait until it
    listens (read from /proc/net/unix: it serves one connection, so a probe
    would use it up). The caller stops it."""
    child = VhostUserGpuChild(vhost_user_gpu_argv(socket_path, extra=extra))
    return _listening_or_stopped(child, socket_path, timeout)


DPDK_TESTPMD = "/usr/bin/dpdk-testpmd"


def dpdk_runtime_dir(file_prefix: str) -> str:
    """Where DPDK's EAL keeps a process's runtime files (and leaves them):
    /var/run/dpdk/PREFIX for root, else under $XDG_RUNTIME_DIR or /tmp."""
    if os.geteuid() == 0:
        base = "/var/run"
    else:
        base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    return os.path.join(base, "dpdk", file_prefix)


def testpmd_argv(socket_path: str, file_prefix: str, *, queue_pairs: int = 1, mbufs: int = 2048,
                 extra: Sequence[str] = ()) -> list[str]:
    """daemons.md's command line, with ``queue_pairs`` forwarding streams:
    the vhost PMD's queues= and testpmd's --rxq/--txq (io forwarding sends
    what comes in on receive queue N out on transmit queue N of the same
    port, so a frame the guest transmits on pair N comes back on pair N).
    Without --total-num-mbufs it runs out of memory in 256 MiB; without
    --stats-period it exits at EOF on stdin."""
    binary = _require(DPDK_TESTPMD, "dpdk-dev")
    return [
        binary, "--no-huge", "-m", "256", "--no-pci", "--no-shconf", "--no-telemetry", f"--file-prefix={file_prefix}",
        "--vdev", f"net_vhost0,iface={socket_path},client=0,queues={queue_pairs}",
        "--", f"--total-num-mbufs={mbufs}", "--stats-period", "60", f"--rxq={queue_pairs}", f"--txq={queue_pairs}",
        *extra,
    ]


class TestpmdChild(Child):
    """dpdk-testpmd as a child: stopping it also removes the runtime
    directory DPDK leaves behind for its --file-prefix (which this process
    made unique and checked was absent before the start), and after a
    SIGKILL the socket file it leaves too (a new testpmd cannot bind over
    it), and nothing else."""

    def __init__(self, argv: Sequence[str], runtime_dir: str, socket_path: str) -> None:
        super().__init__("dpdk-testpmd", argv)
        self.runtime_dir = runtime_dir
        self.socket_path = socket_path

    def stop(self, grace: float = 5.0) -> int | None:
        status = super().stop(grace)
        self._remove_leftovers()
        return status

    def kill(self) -> None:
        super().kill()
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
        if os.path.exists(self.socket_path) and not is_listening(self.socket_path):
            try:
                os.unlink(self.socket_path)
            except OSError:
                pass


def start_testpmd(socket_path: str, *, queue_pairs: int = 1, extra: Sequence[str] = (),
                  timeout: float = 30.0) -> TestpmdChild:
    """Start dpdk-testpmd with a vhost-user server on ``socket_path`` in io
    forwarding and wait until it listens (it takes seconds: EAL sets up
    256 MiB of memory first). The caller stops it."""
    file_prefix = f"xvb-{os.getpid()}-{os.urandom(4).hex()}"
    runtime_dir = dpdk_runtime_dir(file_prefix)
    if os.path.exists(runtime_dir):
        raise FileExistsError(f"DPDK runtime directory {runtime_dir} exists already")
    argv = testpmd_argv(socket_path, file_prefix, queue_pairs=queue_pairs, extra=extra)
    return _listening_or_stopped(TestpmdChild(argv, runtime_dir, socket_path), socket_path, timeout)


def _listening_or_stopped(child: Child, socket_path: str, timeout: float) -> Child:
    """Wait until the daemon listens on ``socket_path``; stop it if it does
    not. The socket file appears at bind(), before listen(), so the file is
    no sign; and a probe connection is no good either: virtiofsd serves one
    connection and exits when it closes, and qemu-storage-daemon would
    serve the probe instead of a bridge that is redialling it. So the
    listening state is read from /proc/net/unix."""
    try:
        child.wait_for(lambda: is_listening(socket_path), f"listening on {socket_path}", timeout)
    except BaseException:
        child.stop()
        raise
    return child


_SO_ACCEPTCON = 0x10000
"""The Flags bit of a listening socket in /proc/net/unix."""


def is_listening(path: str) -> bool:
    """Whether a UNIX socket bound to ``path`` is listening (from
    /proc/net/unix: Num RefCount Protocol Flags Type St Inode Path)."""
    try:
        with open("/proc/net/unix") as f:
            next(f, None)
            for line in f:
                fields = line.split(None, 7)
                if len(fields) == 8 and fields[7].rstrip("\n") == path and int(fields[3], 16) & _SO_ACCEPTCON:
                    return True
    except OSError:
        return False
    return False
