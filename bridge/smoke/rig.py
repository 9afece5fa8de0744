"""The path the checks run on: the daemon (started from --daemon-cmd, or
the user's on --socket), the recording proxy, the Xen simulator and the
bridge, each its own process but the proxy, for one memory model.

Everything the rig starts it stops by PID, and it removes its work
directory (the sockets, the image or shared directory it made) at
:meth:`Rig.stop`. The daemon's command line gets ``{socket}`` (and the
device's own placeholders, e.g. ``{image}``) substituted and is split like
a shell would, without a shell.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import stat
import tempfile

import trio

from bridge.daemons import is_listening, virtiofsd_pidfile
from bridge.processes import Child, ChildFailed
from bridge.smoke.battery import CheckFailed
from bridge.smoke.conversation import expects_reply
from bridge.smoke.device_battery import DeviceBattery, Opened, SmokeOptions
from bridge.smoke.recorder import REPLY, Recorder
from bridge.testbed import LIBXL_FIRST_MMIO_BASE, LIBXL_FIRST_SPI, bridge_argv, start_bridge
from xen.sim.guest import SimGuest
from xen.sim.launch import SimulatorError, start_simulator

DOMID = 1
VCPUS = 2
RAM_MIB = 256
PLACEHOLDER = re.compile(r"\{(\w+)\}")


class RigError(Exception):
    """Part of the path could not be started (the message says which and why)."""


def placeholders_in(command: str) -> set[str]:
    return set(PLACEHOLDER.findall(command))


def substitute(command: str, values: dict[str, str]) -> list[str]:
    """The daemon's argv: ``{name}`` replaced by ``values[name]`` (shell-quoted
    first, so a path with spaces stays one argument), then split."""
    quoted = PLACEHOLDER.sub(lambda m: shlex.quote(values[m.group(1)]) if m.group(1) in values else m.group(0),
                             command)
    return shlex.split(quoted)


def _status_text(code: int | None) -> str:
    if code is None:
        return "is still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with status {code}"


class Rig:
    def __init__(self, battery: DeviceBattery, options: SmokeOptions, memory: str) -> None:
        self.battery = battery
        self.options = options
        self.memory = memory
        self.workdir = ""
        self.daemon_socket = ""
        self.recorder_socket = ""
        self.control = ""
        self.values: dict[str, str] = {}
        """Placeholder values (the image, the shared directory, the socket)."""
        self.daemon: Child | None = None
        self.sim = None
        self.bridge: Child | None = None
        self.bridge_output = ""
        self.recorder: Recorder | None = None
        self._recorder_scope: trio.CancelScope | None = None
        self.start_error: str | None = None
        self.broken: str | None = None
        """Why no further check can run (the daemon could not be started again)."""
        self.step = ""
        """What the running check is doing, for a timeout's message."""
        self._complaints_mark = 0
        self._events_mark = 0
        self.last_opened: Opened | None = None
        """The device as the guest last opened it (its queues tell what is in flight)."""

    # -- facts ---------------------------------------------------------------

    @property
    def owns_daemon(self) -> bool:
        return self.options.daemon_cmd is not None

    @property
    def reconnect(self) -> float:
        """The bridge's --reconnect: long enough for a daemon to be started
        again, short enough to leave the check time after it."""
        return max(1.0, min(10.0, self.options.timeout / 3))

    @property
    def reply_timeout(self) -> float:
        return max(1.0, min(5.0, self.options.timeout / 4))

    @property
    def mmio_base(self) -> int:
        return LIBXL_FIRST_MMIO_BASE

    @property
    def irq(self) -> int:
        return LIBXL_FIRST_SPI

    def not_ready_reason(self) -> str | None:
        """Why checks that need the bridge cannot run, or None."""
        if self.start_error is not None:
            return "the path did not start (see protocol.connect)"
        if self.broken is not None:
            return self.broken
        if self.bridge is None or not self.bridge.alive():
            status = self.bridge.proc.returncode if self.bridge is not None else None
            return f"the bridge is not running ({_status_text(status)})"
        return None

    def daemon_status(self) -> str:
        if self.daemon is None:
            return "not started by the harness"
        return _status_text(self.daemon.proc.poll())

    def daemon_output_tail(self, lines: int = 5) -> str:
        if self.daemon is None:
            return ""
        return "\n".join(self.daemon.output().strip().splitlines()[-lines:])

    def bridge_complaints(self) -> list[str]:
        """The bridge's warnings and errors about the device, as it logged them."""
        out = self.bridge.output() if self.bridge is not None else self.bridge_output
        found = []
        for line in out.splitlines():
            if "WARNING" in line or "ERROR" in line or "error:" in line:
                found.append(line.split(": ", 3)[-1] if "ERROR" in line or "WARNING" in line else line)
        return found

    def begin_check(self) -> None:
        """A check starts: what the daemon and the bridge did before it is
        not news in its failure message."""
        self.step = ""
        self.last_opened = None
        self._complaints_mark = len(self.bridge_complaints())
        self._events_mark = len(self.recorder.events) if self.recorder is not None else 0

    def diagnosis(self) -> str:
        """What the daemon and the bridge were doing, for a failure message."""
        parts = []
        if self.last_opened is not None:
            waiting = [f"queue {i}: {vq.in_flight} request(s) made available, none of them completed"
                       if vq.used_collected == 0 else
                       f"queue {i}: {vq.in_flight} request(s) not completed ({vq.used_collected} were)"
                       for i, vq in sorted(self.last_opened.transport.queues.items()) if vq.in_flight]
            if waiting:
                parts.append(f"The guest's {'; '.join(waiting)}.")
        if self.owns_daemon and self.daemon is not None:
            parts.append(f"The daemon (pid {self.daemon.pid}) {self.daemon_status()}.")
        rec = self.recorder
        if rec is not None:
            last = rec.last_request()
            if last is not None:
                index = rec.messages.index(last)
                answered = not expects_reply(last) or any(
                    m.direction == REPLY and m.session == last.session for m in rec.messages[index + 1:])
                parts.append(f"The last message the bridge sent was {last.name} (connection {last.session})"
                             f"{'' if answered else ', not answered'}.")
            closed = [e for e in rec.events[self._events_mark:] if "daemon closed" in e.what]
            if closed:
                parts.append(f"The daemon closed connection {closed[-1].session}.")
        complaints = self.bridge_complaints()[self._complaints_mark:]
        resets = [c for c in complaints if "needs a reset" in c]
        if resets or complaints:
            parts.append(f"The bridge: {(resets or complaints)[-1]}")
        return " ".join(parts)

    # -- starting and stopping ----------------------------------------------

    async def start(self, nursery: trio.Nursery) -> None:
        """Start the whole path; on failure ``start_error`` says why (the
        connect check reports it) and what did start is left for stop()."""
        self.workdir = tempfile.mkdtemp(prefix="xvb-smoke-")
        self.recorder_socket = os.path.join(self.workdir, "bridge.sock")
        self.control = os.path.join(self.workdir, "xen-sim.sock")
        try:
            self.values = dict(self.battery.prepare(self.workdir, self.options))
            if self.owns_daemon:
                self.daemon_socket = os.path.join(self.workdir, "daemon.sock")
                self.values["socket"] = self.daemon_socket
                await self._start_daemon()
            else:
                self.daemon_socket = os.path.abspath(self.options.socket)
                _check_socket(self.daemon_socket)
            self.recorder = Recorder(self.recorder_socket, self.daemon_socket)
            self._recorder_scope = await nursery.start(self._run_recorder)
            await trio.to_thread.run_sync(self._start_sim)
            await trio.to_thread.run_sync(self._start_bridge)
        except RigError as exc:
            self.start_error = str(exc)

    async def _run_recorder(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            await self.recorder.run(task_status=_Started(task_status, scope))

    def _dialled_since(self, events: int) -> bool:
        return self.recorder is not None and any(e.what == "connected" for e in self.recorder.events[events:])

    async def _start_daemon(self) -> None:
        argv = substitute(self.options.daemon_cmd, self.values)
        events = len(self.recorder.events) if self.recorder is not None else 0

        def start() -> None:
            # Kept in self.daemon here, in the thread: a cancellation (SIGTERM)
            # while it starts discards the thread's return value, and
            # stop() must still find the child.
            try:
                self.daemon = Child("daemon", argv)
            except OSError as exc:
                raise RigError(f"cannot start the daemon ({argv[0]}): {exc.strerror or exc}") from None
            try:
                # Listening, or already serving: a daemon of one connection
                # (virtiofsd) closes its listening socket once the bridge,
                # redialling, got through.
                self.daemon.wait_for(lambda: is_listening(self.daemon_socket) or self._dialled_since(events),
                                     f"listening on {self.daemon_socket}", min(15.0, self.options.timeout))
            except ChildFailed as exc:
                child, self.daemon = self.daemon, None
                self._forget_daemon(child)
                raise RigError(f"the daemon did not listen on {self.daemon_socket}: {exc}") from None

        await trio.to_thread.run_sync(start)

    def _forget_daemon(self, child: Child) -> None:
        child.stop()
        _remove_pidfile(self.daemon_socket, child.pid)
        self.battery.after_daemon(self.values)

    async def restart_daemon(self, *, kill: bool) -> None:
        """SIGKILL (``kill``) or stop the daemon, then start it again on
        the same socket (and image or directory)."""
        if self.daemon is not None:
            old = self.daemon
            self.daemon = None
            if kill:
                await trio.to_thread.run_sync(old.kill)
            await trio.to_thread.run_sync(self._forget_daemon, old)
        try:
            os.unlink(self.daemon_socket)  # a killed daemon leaves it; the new one binds it
        except FileNotFoundError:
            pass
        try:
            await self._start_daemon()
        except RigError as exc:
            raise CheckFailed(str(exc)) from None

    async def revive_daemon(self) -> str | None:
        """Start the daemon again if the harness runs it and it died;
        returns how it ended (None: nothing to do)."""
        if not self.owns_daemon or self.daemon is not None and self.daemon.alive():
            return None
        if self.daemon is None:
            await self.restart_daemon(kill=False)
            return "was not running (it did not start again)"
        status = self.daemon_status()
        tail = self.daemon_output_tail(2).replace("\n", " | ")
        await self.restart_daemon(kill=False)
        return status + (f" ({tail})" if tail else "")

    def _start_sim(self) -> None:
        virtio = self.battery.xenstore_virtio(self.options)
        try:
            self.sim = start_simulator(self.control, domid=DOMID, vcpus=VCPUS, ram_mib=RAM_MIB,
                                       extra_args=["--virtio", virtio] if virtio else [])
        except SimulatorError as exc:
            raise RigError(f"the Xen simulator did not start: {exc}") from None

    def _start_bridge(self) -> None:
        virtio = self.battery.xenstore_virtio(self.options)
        argv = bridge_argv(
            domid=DOMID,
            socket_path=self.recorder_socket,
            xen_sim=self.control,
            device=self.battery.bridge_device,
            mmio_base=None if virtio else self.mmio_base,
            irq=None if virtio else self.irq,
            extra=["--memory", self.memory, "--timeout", f"{self.reply_timeout:g}",
                   "--reconnect", f"{self.reconnect:g}", *self.battery.bridge_flags(self)],
        )
        try:
            self.bridge = start_bridge(argv, timeout=min(30.0, max(10.0, self.options.timeout)))
        except ChildFailed as exc:
            text = str(exc)
            errors = [line.strip() for line in text.splitlines() if "error" in line.lower()]
            raise RigError(f"the bridge did not start: {errors[-1] if errors else text}") from None

    async def stop(self) -> None:
        """Stop the bridge, the simulator, the proxy and the daemon, in that
        order, and remove the work directory."""
        with trio.CancelScope(shield=True):
            if self.bridge is not None:
                bridge, self.bridge = self.bridge, None
                await trio.to_thread.run_sync(bridge.stop)
                self.bridge_output = bridge.output()
            if self.sim is not None:
                sim, self.sim = self.sim, None
                await trio.to_thread.run_sync(sim.stop)
            if self._recorder_scope is not None:
                self._recorder_scope.cancel()
                self._recorder_scope = None
                await trio.sleep(0)
            if self.daemon is not None:
                daemon, self.daemon = self.daemon, None
                await trio.to_thread.run_sync(self._stop_daemon_after_bridge, daemon)
            if self.workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def _stop_daemon_after_bridge(self, daemon: Child) -> None:
        # Daemons that serve one connection (virtiofsd) go by themselves
        # once the bridge hung up; give them a moment before SIGTERM.
        try:
            daemon.proc.wait(2.0)
        except Exception:  # noqa: BLE001 - TimeoutExpired: still serving, stop it
            pass
        self._forget_daemon(daemon)

    # -- the guest -------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def guest(self):
        self.step = "connecting the simulated guest"
        async with SimGuest.open(self.control) as guest:
            yield guest

    async def open(self, guest, **kwargs) -> Opened:
        """Probe and start the device as the guest's driver would; a device
        that needs a reset right after is a failure that names why."""
        self.step = f"probing the virtio-{self.battery.name} device and setting DRIVER_OK"
        if self.owns_daemon and self.daemon is None:
            raise CheckFailed("no daemon is running: the harness could not start it again")
        daemon = self.daemon if self.daemon is not None and self.daemon.alive() else None
        opened = None
        async with trio.open_nursery() as nursery:

            async def open_it() -> None:
                nonlocal opened
                opened = await self.battery.open(self, guest, **kwargs)
                nursery.cancel_scope.cancel()

            async def watch_daemon() -> None:
                # A daemon that dies while the guest starts the device leaves
                # the driver waiting for ever (e.g. FUSE_INIT): say so now.
                while daemon is not None and daemon.alive():
                    await trio.sleep(0.05)
                if daemon is not None:
                    await trio.sleep(0.5)  # let the bridge's view of it settle for the diagnosis
                    raise CheckFailed(f"the daemon {self.daemon_status()} while the guest was starting the device. "
                                      f"{self.diagnosis()}")
                await trio.sleep_forever()

            nursery.start_soon(open_it)
            nursery.start_soon(watch_daemon)
        self.last_opened = opened
        if await opened.transport.needs_reset():
            raise CheckFailed(f"the device set DEVICE_NEEDS_RESET as the guest started it. {self.diagnosis()}")
        self.step = f"using the virtio-{self.battery.name} device"
        return opened


class _Started:
    """Hands the nursery the recorder's cancel scope once it listens."""

    def __init__(self, task_status, scope: trio.CancelScope) -> None:
        self._task_status = task_status
        self._scope = scope

    def started(self, value=None) -> None:
        self._task_status.started(self._scope)


def _check_socket(path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise RigError(f"--socket {path}: no such file (is the daemon listening?)") from None
    if not stat.S_ISSOCK(mode):
        raise RigError(f"--socket {path}: not a UNIX socket")


def _remove_pidfile(socket_path: str, pid: int) -> None:
    """QEMU's virtiofsd leaves a pid file per socket; remove it if it names
    the daemon the rig started (nobody else's)."""
    path = virtiofsd_pidfile(socket_path)
    try:
        with open(path) as f:
            if f.read().strip() == str(pid):
                os.unlink(path)
    except OSError:
        pass
