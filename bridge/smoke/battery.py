"""The check runner: named, timed checks, one progress line each.

A check is an async function of a :class:`~bridge.smoke.rig.Rig`. It
passes by returning (optionally a list of detail lines, e.g. the decoded
features), fails by raising :class:`CheckFailed` with what was expected and
what the daemon did, and is not applicable when it raises
:class:`NotApplicable`. Every check runs under the --timeout; one that
runs out says what it was waiting for (the rig's current step) and what
the daemon last did.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence

import attrs
import trio

PASSED = "passed"
FAILED = "failed"
SKIPPED = "skipped"


class CheckFailed(Exception):
    """The daemon (or the path through it) did not do what the check expects."""


class NotApplicable(Exception):
    """The check does not apply to this daemon or this run (the reason)."""


@attrs.frozen
class Check:
    name: str
    """``group.what``, e.g. ``protocol.features`` or ``io.blk.write-read``."""
    run: Callable[..., Awaitable[Sequence[str] | None]]
    needs_bridge: bool = True
    """False for checks that only read the recorded conversation."""

    @property
    def group(self) -> str:
        return self.name.split(".", 1)[0]


@attrs.define
class CheckResult:
    name: str
    memory: str
    status: str
    seconds: float
    message: str = ""
    details: list[str] = attrs.field(factory=list)

    @property
    def group(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def full_name(self) -> str:
        return f"{self.memory}/{self.name}"


class Progress:
    """Prints ``[ n/N] memory/name ... passed (0.41 s)`` as checks run."""

    def __init__(self, total: int, out) -> None:
        self.total = total
        self.done = 0
        self.out = out

    def start(self, full_name: str) -> None:
        if self.out is None:
            return
        self.out.write(f"[{self.done + 1:>2}/{self.total}] {full_name} ... ")
        self.out.flush()

    def finish(self, result: CheckResult) -> None:
        self.done += 1
        if self.out is None:
            return
        self.out.write(f"{result.status} ({result.seconds:.2f} s)\n")
        for line in result.details:
            self.out.write(f"        {line}\n")
        if result.message:
            for line in result.message.splitlines():
                self.out.write(f"        {line}\n")
        self.out.flush()


def _leaves(group: BaseExceptionGroup):
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


def _verdict_of(group: BaseExceptionGroup) -> BaseException:
    """A check's own verdict raised inside a nursery (the guest's session
    is one) comes out grouped: take it back out; a cancellation stays a
    cancellation."""
    leaves = list(_leaves(group))
    for kind in (trio.Cancelled, CheckFailed, NotApplicable):
        for exc in leaves:
            if isinstance(exc, kind):
                return exc
    return group


def describe_error(exc: BaseException) -> str:
    """One line for an error the guest or the harness met (the leaves of a group)."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe_error(inner) for inner in exc.exceptions)
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"


async def run_check(check: Check, rig, timeout: float, progress: Progress | None) -> CheckResult:
    full = f"{rig.memory}/{check.name}"
    if progress is not None:
        progress.start(full)
    started = time.monotonic()
    status, message, details = PASSED, "", []
    blocker = rig.not_ready_reason() if check.needs_bridge else None
    if blocker is not None:
        status, message = SKIPPED, f"not run: {blocker}"
    else:
        rig.begin_check()
        try:
            with trio.fail_after(timeout):
                try:
                    details = list(await check.run(rig) or [])
                except BaseExceptionGroup as group:
                    raise _verdict_of(group) from None
        except NotApplicable as exc:
            status, message = SKIPPED, f"not applicable: {exc}"
        except CheckFailed as exc:
            status, message = FAILED, str(exc)
        except trio.TooSlowError:
            waiting = f" while {rig.step}" if rig.step else ""
            status = FAILED
            message = f"did not finish within {timeout:g} s{waiting}. {rig.diagnosis()}".rstrip()
        except Exception as exc:  # noqa: BLE001 - what the guest saw the device do is the finding
            status = FAILED
            during = f" while {rig.step}" if rig.step else ""
            message = f"{describe_error(exc)}{during}. {rig.diagnosis()}".rstrip()
    result = CheckResult(check.name, rig.memory, status, time.monotonic() - started, message, details)
    if progress is not None:
        progress.finish(result)
    return result
