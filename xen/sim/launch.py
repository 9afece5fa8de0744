"""Start and stop the Xen simulator as a child process.

``start_simulator`` runs ``python -m xen.sim.hypervisor`` and returns once
the simulator prints its ready line; :meth:`SimProcess.stop` ends it by PID
(SIGTERM, then SIGKILL if it does not go) and removes its socket. What the
simulator logs is kept, readable through :meth:`SimProcess.log_text` and
quoted when it fails to start.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from bridge.processes import Child, ChildFailed, child_env

READY_PREFIX = "xen-sim: ready "


class SimulatorError(RuntimeError):
    """The simulator could not be started (the message quotes its log)."""


class SimProcess:
    """A running simulator child. Use as a context manager or call stop()."""

    def __init__(self, child: Child, control_path: str) -> None:
        self._child = child
        self.pid = child.pid
        self.control_path = control_path
        self._socket_ino: int | None = None

    @property
    def returncode(self) -> int | None:
        return self._child.proc.poll()

    def running(self) -> bool:
        return self._child.alive()

    def log_text(self) -> str:
        """Everything the simulator has printed so far (also after stop())."""
        return self._child.output()

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM by PID, wait; SIGKILL if it is still there after ``timeout``.
        Removes the control socket. Idempotent; returns the exit status."""
        status = self._child.stop(grace=timeout)
        if self._socket_ino is not None:
            # Remove the socket only if it is still the one this simulator made
            # (it removes it itself on a clean exit; not after SIGKILL).
            try:
                if os.stat(self.control_path).st_ino == self._socket_ino:
                    os.unlink(self.control_path)
            except OSError:
                pass
            self._socket_ino = None
        return status

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
    argv = simulator_argv(control_path, domid=domid, vcpus=vcpus, ram_mib=ram_mib, extra_args=extra_args)
    sim = SimProcess(Child("xen-sim", argv, env=child_env()), control_path)
    try:
        sim._child.wait_for_output(READY_PREFIX, timeout)
        sim._socket_ino = os.stat(control_path).st_ino
    except ChildFailed as exc:
        sim.stop()
        raise SimulatorError(str(exc)) from None
    except BaseException:
        sim.stop()
        raise
    return sim
