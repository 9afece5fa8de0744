"""vCPUs running a load loop where Xen runs a vCPU: in the hypervisor.

On Xen a guest's MMIO load traps into the hypervisor on the vCPU's own
physical CPU; Xen writes the ioreq, notifies the device model and blocks
the vCPU, and the device model's notify makes it runnable again. Two
parties take turns: the vCPU (with Xen under it) and the device model.

The simulated guest is a process of its own, reaching the simulator over
a trap socket, so each of its accesses adds a round trip between two
processes that Xen does not have. That is the right price for a guest
that runs drivers, but it drowns what the benchmark measures, the ioreq
round trip. The guest-role op ``vcpu_loop`` therefore has vCPUs run a
loop of loads themselves, in the simulator: every access takes the same
trap path as one from the trap socket (:meth:`Domain.access`, the
watchdog, the device model's completion), and the next one is issued the
moment the previous completes, as a guest's ``ldr`` loop would.

Two shapes:

- concurrent: each listed vCPU (all different) loads from its own
  address, one access in flight per vCPU, all at once (a busy guest);
- one at a time: a single access in flight, walking the list of
  (vCPU, address) pairs cyclically (what one access costs when the device
  model serves that many vCPUs and devices).

Each access's latency (from the trap to its completion, in ns) is kept.
An access answered with anything but success ends the loop with that
answer's explanation.
"""

from __future__ import annotations

import array
import time
from collections.abc import Callable, Sequence

import trio

from xen.sim.control import TRAP_OK, TRAP_READ

MAX_MS = 60_000
"""Longest loop, in milliseconds (the guest's connection waits for it)."""


class VcpuLoop:
    """One ``vcpu_loop`` request: start it, then await :attr:`done`.

    ``access(vcpu, kind, size, addr, data)`` is the domain's trap path; a
    vCPU in the loop has ``program`` set to this loop, and the trap path's
    answer comes to :meth:`answered` instead of the guest's socket."""

    def __init__(
        self,
        access: Callable,
        plan: Sequence[tuple[object, int]],
        size: int,
        ms: int,
        *,
        one_at_a_time: bool,
    ) -> None:
        self._access = access
        self._plan = list(plan)
        self._size = size
        self._ns = ms * 1_000_000
        self._one_at_a_time = one_at_a_time
        self.samples = array.array("Q")
        self.error: str | None = None
        self.elapsed_ns = 0
        self.done = trio.Event()
        self._vcpus = list(dict.fromkeys(vcpu for vcpu, _ in self._plan))
        self._addr = {vcpu: addr for vcpu, addr in self._plan}  # concurrent: one address per vCPU
        self._started: dict[object, int] = {}
        self._running = 0
        self._issuing = None  # the vCPU whose access is being issued now
        self._next_step = 0  # one at a time: the next pair of the plan
        self._t0 = 0
        self._end = 0

    def start(self) -> None:
        """Claim the vCPUs and issue the first access(es)."""
        for vcpu in self._vcpus:
            vcpu.program = self
        self._t0 = time.perf_counter_ns()
        self._end = self._t0 + self._ns
        if self._one_at_a_time:
            self._running = 1
            self._issue(None)
        else:
            self._running = len(self._vcpus)
            for vcpu in self._vcpus:
                self._issue(vcpu)

    def stop(self) -> None:
        """Give the vCPUs back (the guest went away, or the simulator is
        stopping): an access still in flight completes unseen."""
        for vcpu in self._vcpus:
            if vcpu.program is self:
                vcpu.program = None
                vcpu.answer_due = False
        self._finish()

    def _issue(self, vcpu) -> None:
        """Issue accesses on ``vcpu`` (one at a time: on the plan's next
        vCPU) until one has to wait for the device model. An answer that
        comes at once (an abort) reaches :meth:`answered` during the access,
        which then leaves the next step to this loop rather than recursing."""
        clock, access = time.perf_counter_ns, self._access
        size = self._size
        while True:
            now = clock()
            if now >= self._end or self.error is not None:
                self._retire()
                return
            if self._one_at_a_time:
                vcpu, addr = self._plan[self._next_step]
                self._next_step = (self._next_step + 1) % len(self._plan)
            else:
                addr = self._addr[vcpu]
            self._started[vcpu] = now
            vcpu.answer_due = True
            vcpu.seq = 0
            self._issuing = vcpu
            try:
                access(vcpu, TRAP_READ, size, addr, 0)
            finally:
                self._issuing = None
            if vcpu.answer_due:
                return  # the device model has it: answered() goes on

    def answered(self, vcpu, status: int, message: str) -> None:
        """The trap path's answer to ``vcpu``'s access."""
        if status == TRAP_OK:
            self.samples.append(time.perf_counter_ns() - self._started[vcpu])
        elif self.error is None:
            self.error = f"vCPU {vcpu.index}: {message}"
        if self._issuing is not vcpu:
            self._issue(vcpu)

    def _retire(self) -> None:
        self._running -= 1
        if self._running == 0:
            for vcpu in self._vcpus:
                if vcpu.program is self:
                    vcpu.program = None
            self._finish()

    def _finish(self) -> None:
        if not self.done.is_set():
            self.elapsed_ns = time.perf_counter_ns() - self._t0
            self.done.set()
