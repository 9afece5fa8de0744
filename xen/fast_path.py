"""The kernel fast path: kicks and interrupts that never reach the bridge.

Linux 6.7 and later (CONFIG_XEN_PRIVCMD_EVENTFD) can complete a guest's
QueueNotify write in the kernel by signalling an eventfd
(IOCTL_PRIVCMD_IOEVENTFD), and turn an eventfd signal into
XEN_DMOP_set_irq_level(irq, 1) (IOCTL_PRIVCMD_IRQFD). The guest's vCPU then
does not wait for a round trip through this process for every kick, and the
daemon's completion raises the guest interrupt directly.

:class:`KernelFastPath` registers what the devices ask for, remembers it,
and removes all of it before the ioreq server goes away. The first
"not supported" answer (an older kernel, or a simulator run with
``--no-kernel-fast-path``) turns it off for the rest of the run with one log
line; the devices then relay kicks and interrupts in userspace, as they do
with ``--no-fast-path``.

Interrupts go to the kernel by default; kicks only when asked
(``--kernel-kicks``), because of a race in how Linux shares the vCPU's
event channel between its ioeventfd handler and userspace. Both take an
ioreq slot with a plain check-then-store of its state (no compare-and-
swap), and the kick the kernel completes still wakes userspace (the
handlers share the interrupt). Woken by that kick, the device model can
find the vCPU's *next* access already posted and take it at the moment the
kernel's handler, run for that access's own event, takes it too and then
hands it back as IOREQ_READY: the access is emulated twice, or its
completion overwritten. The simulator, which models the handler, shows it
as lost or repeated register writes when a guest resets the device with
writes in flight (about once in a few hundred resets). Irqfd has no such
race: it never touches an ioreq slot.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from xen.hypervisor import FastPathUnsupported, Hypervisor, HypervisorError, IoreqPages

log = logging.getLogger(__name__)


class KernelFastPath:
    def __init__(
        self, hypervisor: Hypervisor, pages: IoreqPages, ports: Sequence[int], *, enabled: bool = True,
        kicks: bool = False,
    ) -> None:
        self.hv = hypervisor
        self._pages = pages
        self._ports = list(ports)
        self.enabled = enabled
        self.kicks = kicks
        """Whether QueueNotify writes go to the kernel too (see KERNEL_KICKS_HAZARD)."""
        self._kicks: dict[int, tuple[int, int]] = {}  # fd -> (base, vq)
        self._irqs: dict[int, int] = {}  # fd -> irq

    def _unsupported(self, exc: FastPathUnsupported) -> None:
        if self.enabled:
            log.info("kernel fast path unavailable (%s): relaying kicks and interrupts in userspace", exc)
        self.enabled = False

    def assign_kick(self, base: int, vq: int, fd: int) -> bool:
        """Let the kernel signal ``fd`` for QueueNotify = ``vq`` at the window
        at ``base``. True when it took it; False when kicks must keep coming
        through the ioreq loop."""
        if not self.enabled or not self.kicks:
            return False
        try:
            self.hv.ioeventfd(self._pages, self._ports, base=base, vq=vq, fd=fd)
        except FastPathUnsupported as exc:
            self._unsupported(exc)
            return False
        except HypervisorError as exc:
            log.warning("ioeventfd for queue %d at %#x refused (%s): relaying its kicks in userspace", vq, base, exc)
            return False
        self._kicks[fd] = (base, vq)
        return True

    def assign_irq(self, irq: int, fd: int) -> bool:
        """Let the kernel raise ``irq`` whenever ``fd`` is signalled."""
        if not self.enabled:
            return False
        try:
            self.hv.irqfd(irq=irq, fd=fd)
        except FastPathUnsupported as exc:
            self._unsupported(exc)
            return False
        except HypervisorError as exc:
            log.warning("irqfd for irq %d refused (%s): relaying its interrupts in userspace", irq, exc)
            return False
        self._irqs[fd] = irq
        return True

    def release(self, fd: int) -> None:
        """Remove whatever was registered for ``fd``; call it before the fd
        is closed (the kernel finds registrations by their eventfd)."""
        kick = self._kicks.pop(fd, None)
        irq = self._irqs.pop(fd, None)
        try:
            if kick is not None:
                self.hv.ioeventfd(self._pages, self._ports, base=kick[0], vq=kick[1], fd=fd, assign=False)
            if irq is not None:
                self.hv.irqfd(irq=irq, fd=fd, assign=False)
        except HypervisorError as exc:
            log.debug("fast path: releasing fd %d failed: %s", fd, exc)

    def close(self) -> None:
        """Remove every registration (before the ioreq page and ports go)."""
        for fd in list(self._kicks) + list(self._irqs):
            self.release(fd)
        self.enabled = False
