"""The real vhost-user daemons, started the way ../shared/docs/daemons.md
says (Debian 12 packages), for the demo, the tests and harnesses."""

from __future__ import annotations

import os
import shutil
import socket

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
    child = Child("qemu-storage-daemon", argv)
    try:
        # The socket file appears at bind(), before listen(): wait until it
        # accepts. The probe is harmless; the daemon serves the next
        # front-end once a client hangs up.
        child.wait_for(lambda: _accepts(socket_path), f"listening on {socket_path}", timeout)
    except BaseException:
        child.stop()
        raise
    return child


def _accepts(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()
