"""Child processes that harnesses start and must stop: daemons, the
simulator, the bridge itself.

Every child is stopped by its own PID (SIGTERM, then SIGKILL after a grace
period), never by name, and its output is kept in a file so that a failure
can say what the child printed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence

# The checkout this code runs from: children (the simulator, the bridge)
# import its packages whether or not it was pip-installed.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def exit_cleanly_on_sigterm() -> None:
    """Make SIGTERM unwind a harness the way Ctrl-C does, so the children it
    started are stopped on the way out: they run in sessions of their own
    and would outlive a harness that SIGTERM simply ended."""
    signal.signal(signal.SIGTERM, _exit_for_signal)


def _exit_for_signal(signum, _frame) -> None:
    raise SystemExit(128 + signum)


def run_trio(fn, *args):
    """trio.run for a harness, stopped cleanly by SIGTERM: inside trio the
    signal cancels ``fn`` (trio's own signal receiver; raising from a
    handler in the middle of trio's machinery corrupts it), then SystemExit
    unwinds the harness's with blocks, which stop its children. Ctrl-C
    stays trio's KeyboardInterrupt; neither comes out as a group printed as
    a traceback."""
    import trio

    stopped: list[int] = []

    async def until_signalled():
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    async for signum in signals:
                        stopped.append(signum)
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(watch)
                result = await fn(*args)
                nursery.cancel_scope.cancel()
                return result

    try:
        result = trio.run(until_signalled)
    except BaseExceptionGroup as group:
        for exc in _leaves(group):
            if isinstance(exc, (SystemExit, KeyboardInterrupt)):
                raise exc from None
        raise
    if stopped:
        raise SystemExit(128 + stopped[0])
    return result


def _leaves(group: BaseExceptionGroup):
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


def child_env() -> dict[str, str]:
    """The environment for children running this checkout's modules."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    return env


class ChildFailed(RuntimeError):
    """A child died, or did not become ready in time."""


class Child:
    def __init__(self, name: str, argv: Sequence[str], *, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self._log = tempfile.TemporaryFile(prefix=f"{name}-")
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # a Ctrl-C at the terminal reaches the harness, not every child
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def _fail(self, what: str) -> ChildFailed:
        tail = "\n".join(self.output().strip().splitlines()[-15:])
        status = "still running" if self.alive() else f"exit status {self.proc.returncode}"
        return ChildFailed(f"{self.name} (pid {self.pid}) {what} ({status}); its output:\n{tail}")

    def wait_for(self, ready, what: str, timeout: float = 10.0) -> None:
        """Poll ``ready()`` until it is true; fail if the child dies first."""
        deadline = time.monotonic() + timeout
        while not ready():
            if not self.alive():
                raise self._fail(f"exited before {what}")
            if time.monotonic() > deadline:
                raise self._fail(f"did not get to {what} within {timeout:g} s")
            time.sleep(0.02)

    def wait_for_output(self, text: str, timeout: float = 10.0) -> None:
        self.wait_for(lambda: text in self.output(), f"printing {text!r}", timeout)

    def stop(self, grace: float = 5.0) -> int | None:
        """Stop the child by PID and reap it; returns its exit status."""
        if self.alive():
            try:
                os.kill(self.pid, signal.SIGTERM)
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL by PID (a crash, for tests of what survives one)."""
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
        self.proc.wait()

    def __enter__(self) -> "Child":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
