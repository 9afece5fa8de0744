"""The hypervisor interface the IOREQ server runs against.

Two implementations: real Xen (``xen.real``, cffi over privcmd and evtchn,
loaded only when used) and the simulator client (``xen.sim.client``). The
calls mirror the dm_op / privcmd / evtchn operations one to one, in the
vocabulary of xen/include/public/hvm/dm_op.h, so the IOREQ loop is the same
code against both. They are synchronous: on real Xen each is one ioctl.
"""

from __future__ import annotations

import abc
import mmap
from collections.abc import Iterable, Sequence

import attrs

from xen.xenstore import XenStore


class HypervisorError(Exception):
    """A hypervisor call failed (the message says which and why)."""


class HypervisorUnavailable(HypervisorError):
    """There is no hypervisor to talk to (no Xen, no simulator socket)."""


class FastPathUnsupported(HypervisorError):
    """The kernel does not offer IOCTL_PRIVCMD_IOEVENTFD / IOCTL_PRIVCMD_IRQFD
    (Linux before 6.7, or built without CONFIG_XEN_PRIVCMD_EVENTFD). Kicks
    and interrupts are then relayed in userspace."""


class GuestMemoryFault(HypervisorError):
    """A guest page (or grant reference) that cannot be mapped: not RAM of
    the guest, ballooned out, or a grant the guest did not give."""


XEN_PAGE_SHIFT = 12
XEN_PAGE_SIZE = 1 << XEN_PAGE_SHIFT
"""Xen's page: the unit of foreign mappings and grants, whatever the dom0
kernel's own page size."""


@attrs.frozen(slots=True)
class GuestRamRegion:
    """A bank of guest RAM that the hypervisor exposes as a file.

    ``fd`` holds the bytes of guest-physical [gpa, gpa + size) starting at
    ``fd_offset``. The fd stays owned by the Hypervisor object."""

    gpa: int
    size: int
    fd: int
    fd_offset: int = 0

    def contains(self, gpa: int, length: int = 1) -> bool:
        return self.gpa <= gpa and gpa + length <= self.gpa + self.size


@attrs.frozen(slots=True)
class IoreqPages:
    """The shared pages of one ioreq server, mapped into this process."""

    ioreq: mmap.mmap
    """``struct ioreq vcpu_ioreq[]``: one 32-byte slot per vCPU."""
    buffered: mmap.mmap | None = None
    """The buffered-ioreq ring page, when the server was created with one."""


class GuestMapping(abc.ABC):
    """Some pages of the guest mapped into this process, read-write."""

    view: memoryview
    """The mapped bytes: ``count * XEN_PAGE_SIZE`` of them."""

    @abc.abstractmethod
    def close(self) -> None:
        """Unmap. Idempotent; ``view`` must not be used afterwards."""


class EventChannel(abc.ABC):
    """The /dev/xen/evtchn model: one fd that becomes readable when bound
    local ports are pending; read them, unmask them, notify ports."""

    @abc.abstractmethod
    def fileno(self) -> int:
        """The fd to wait on for readability."""

    @abc.abstractmethod
    def bind_interdomain(self, remote_domid: int, remote_port: int) -> int:
        """Bind to a remote domain's port; returns the local port."""

    @abc.abstractmethod
    def unbind(self, local_port: int) -> None: ...

    @abc.abstractmethod
    def read_pending(self) -> list[int]:
        """Every local port pending now (never blocks; [] if none).

        A delivered port stays masked until :meth:`unmask`."""

    def read_some(self) -> list[int]:
        """Local ports from one read of the device (never blocks; [] if
        none), for a caller that waits for readability itself: the fd stays
        readable while more are pending, so this skips the read that
        :meth:`read_pending` makes to find there is nothing left."""
        return self.read_pending()

    @abc.abstractmethod
    def unmask(self, local_ports: Iterable[int]) -> None: ...

    @abc.abstractmethod
    def notify(self, local_port: int) -> None: ...

    @abc.abstractmethod
    def close(self) -> None: ...


class Hypervisor(abc.ABC):
    """One target domain, seen from its device model."""

    domid: int

    @abc.abstractmethod
    def nr_vcpus(self) -> int:
        """XEN_DMOP_nr_vcpus."""

    @abc.abstractmethod
    def create_ioreq_server(self, *, buffered: bool = False) -> int:
        """XEN_DMOP_create_ioreq_server; returns the server id."""

    @abc.abstractmethod
    def map_ioreq_pages(self, server_id: int) -> IoreqPages:
        """XENMEM_acquire_resource of the server's pages (frame 1 = the ioreq
        page; frame 0 = the buffered page when it has one)."""

    @abc.abstractmethod
    def set_ioreq_server_state(self, server_id: int, enabled: bool) -> None:
        """XEN_DMOP_set_ioreq_server_state. vp_eport in the slots is valid
        only once the server is enabled."""

    @abc.abstractmethod
    def map_mmio_range(self, server_id: int, start: int, end: int) -> None:
        """XEN_DMOP_map_io_range_to_ioreq_server, type MEMORY; ``end`` is
        inclusive."""

    @abc.abstractmethod
    def unmap_mmio_range(self, server_id: int, start: int, end: int) -> None: ...

    @abc.abstractmethod
    def destroy_ioreq_server(self, server_id: int) -> None: ...

    @abc.abstractmethod
    def set_irq_level(self, irq: int, level: int) -> None:
        """XEN_DMOP_set_irq_level (an SPI on Arm)."""

    @abc.abstractmethod
    def open_event_channel(self) -> EventChannel: ...

    # --- guest memory

    @abc.abstractmethod
    def guest_ram_layout(self) -> Sequence[tuple[int, int]]:
        """(gpa, size) of each guest RAM bank, in address order: what may be
        mapped. Known without mapping anything."""

    @abc.abstractmethod
    def map_guest_pages(self, gfn: int, count: int) -> GuestMapping:
        """Map ``count`` guest frames from ``gfn`` (foreign mapping on real
        Xen). Raises :class:`GuestMemoryFault` when any of them is not the
        guest's RAM."""

    def map_grant_refs(self, refs: Sequence[int]) -> GuestMapping:
        """Map pages the guest granted us, one per reference, read-write
        (gntdev on real Xen). Raises :class:`GuestMemoryFault` for a
        reference the guest did not grant."""
        raise GuestMemoryFault(f"{type(self).__name__} cannot map grant references")

    @abc.abstractmethod
    def guest_ram(self) -> Sequence[GuestRamRegion] | None:
        """The guest's RAM banks as files, or None where guest RAM is not a
        file (real Xen: only foreign mappings reach it)."""

    # --- the kernel fast path (xen-ioreq.md); FastPathUnsupported when absent

    @abc.abstractmethod
    def ioeventfd(
        self, pages: IoreqPages, ports: Sequence[int], *, base: int, vq: int, fd: int, assign: bool = True
    ) -> None:
        """IOCTL_PRIVCMD_IOEVENTFD: a 4-byte write of ``vq`` to
        ``base + 0x50`` (QueueNotify) signals eventfd ``fd`` and completes
        without reaching the ioreq loop. ``pages`` is this server's mapped
        ioreq page and ``ports`` the local port of each vCPU, in vCPU order.
        ``assign=False`` removes the registration of that ``fd``."""

    @abc.abstractmethod
    def irqfd(self, *, irq: int, fd: int, assign: bool = True) -> None:
        """IOCTL_PRIVCMD_IRQFD: every signal of eventfd ``fd`` becomes
        XEN_DMOP_set_irq_level(irq, 1), issued by the kernel.
        ``assign=False`` removes the registration of that ``fd``."""

    # --- xenstore

    @abc.abstractmethod
    def xenstore(self) -> "XenStore":
        """A connection to xenstore, seen from the domain the bridge runs in
        (relative paths resolve under /local/domain/<own domid>). The
        caller closes it."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release every handle. Idempotent."""


def open_hypervisor(domid: int, xen_sim: str | None = None) -> Hypervisor:
    """The simulator when ``xen_sim`` names its control socket, else real Xen."""
    if xen_sim is not None:
        from xen.sim.client import SimHypervisor

        return SimHypervisor.connect(xen_sim, domid)
    from xen.real import RealXen

    return RealXen.open(domid)
