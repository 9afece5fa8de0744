"""Start and stop the Xen simulator as a child process.

``start_simulator`` runs ``python -m xen.sim.hypervisor`` and returns once
the simulator prints its ready line; :meth:`SimProcess.stop` ends it by PID
(SIGTERM, then SIGKILL if it does not go) and removes its socket. The
simulator's log (stderr) goes to an anonymous file, readable through
:meth:`SimProcess.log_text` and quoted when it fails to start.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

import xen

READY_PREFIX = "xen-sim: ready "
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(xen.__file__)))


class SimulatorError(RuntimeError):
    """The simulator could not be started (the message quotes its log)."""


class SimProcess:
    """A running simulator child. Use as a context manager or call stop()."""

    def __init__(self, popen: subprocess.Popen, control_path: str, log_file) -> None:
        self._popen = popen
        self.pid = popen.pid
        self.control_path = control_path
        self._log = log_file
        self._final_log = ""
        self._socket_ino: int | None = None

    @property
    def returncode(self) -> int | None:
        return self._popen.poll()

    def running(self) -> bool:
        return self._popen.poll() is None

    def log_text(self) -> str:
        """Everything the simulator has logged so far (also after stop())."""
        if self._log.closed:
            return self._final_log
        return os.pread(self._log.fileno(), 1 << 24, 0).decode("utf-8", "replace")

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM by PID, wait; SIGKILL if it is still there after ``timeout``.
        Removes the control socket. Idempotent; returns the exit status."""
        popen = self._popen
        if popen.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                popen.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                popen.wait()
        if popen.stdout is not None and not popen.stdout.closed:
            popen.stdout.close()
        if self._socket_ino is not None:
            # Remove the socket only if it is still the one this simulator made
            # (it removes it itself on a clean exit; not after SIGKILL).
            try:
                if os.stat(self.control_path).st_ino == self._socket_ino:
                    os.unlink(self.control_path)
            except OSError:
                pass
            self._socket_ino = None
        if not self._log.closed:
            self._final_log = self.log_text()
            self._log.close()
        return popen.returncode

    def close(self) -> None:
        self.stop()

    def __enter__(self) -> "SimProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def simulator_argv(
    control_path: str, *, domid: int = 1, vcpus: int = 1, ram_mib: int = 256, extra_args: Sequence[str] = ()
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "xen.sim.hypervisor",
        "--control",
        control_path,
        "--domid",
        str(domid),
        "--vcpus",
        str(vcpus),
        "--ram-mib",
        str(ram_mib),
        *extra_args,
    ]


def start_simulator(
    control_path: str,
    *,
    domid: int = 1,
    vcpus: int = 1,
    ram_mib: int = 256,
    extra_args: Sequence[str] = (),
    timeout: float = 15.0,
) -> SimProcess:
    """Start the simulator and wait for its ready line."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    log_file = tempfile.TemporaryFile(prefix="xen-sim-log-")
    argv = simulator_argv(control_path, domid=domid, vcpus=vcpus, ram_mib=ram_mib, extra_args=extra_args)
    popen = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log_file, env=env, close_fds=True
    )
    sim = SimProcess(popen, control_path, log_file)
    try:
        _wait_ready(sim, popen, timeout)
    except BaseException:
        sim.stop()
        raise
    return sim


def _wait_ready(sim: SimProcess, popen: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    fd = popen.stdout.fileno()
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            raise SimulatorError(f"xen-sim did not get ready within {timeout:g} s{_quote(sim.log_text())}")
        readable = select.select([fd], [], [], left)[0]
        if not readable:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            status = popen.wait(5)
            raise SimulatorError(f"xen-sim exited with status {status} before it was ready{_quote(sim.log_text())}")
        data += chunk
    line = data.split(b"\n", 1)[0].decode("utf-8", "replace")
    if not line.startswith(READY_PREFIX):
        raise SimulatorError(f"xen-sim said {line!r} instead of its ready line{_quote(sim.log_text())}")
    sim._socket_ino = os.stat(sim.control_path).st_ino


def _quote(text: str) -> str:
    text = text.strip()
    return f":\n{text}" if text else ""
