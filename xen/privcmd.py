"""The two privcmd ioctls that no Xen library wraps: the kernel fast path.

Linux 6.7 added IOCTL_PRIVCMD_IOEVENTFD and IOCTL_PRIVCMD_IRQFD to
/dev/xen/privcmd (include/uapi/xen/privcmd.h, CONFIG_XEN_PRIVCMD_EVENTFD).
libxendevicemodel and libxenforeignmemory predate them, so this module packs
their payloads itself and issues them with :func:`fcntl.ioctl` on a privcmd
fd of its own. Layouts (LP64, see ../shared/docs/xen-ioreq.md)::

    struct privcmd_ioeventfd {      offset      struct privcmd_irqfd {  offset
        __u64 ioreq;                0               __u64 dm_op;        0
        __u64 ports;                8               __u32 size;         8
        __u64 addr;                 16              __u32 fd;           12
        __u32 addr_len;             24              __u32 flags;        16
        __u32 event_fd;             28              domid_t dom;        20
        __u32 vcpus;                32              __u8 pad[2];        22
        __u32 vq;                   36          };                      (24)
        __u32 flags;                40
        domid_t dom;                44
        __u8 pad[2];                46
    };                              (48)

``ioreq`` is the address, in this process, of the mapped ioreq page and
``ports`` the address of a u32 array of local event-channel ports, one per
vCPU; the kernel copies the ports and looks the page up at assign time.
``dm_op`` points at a complete ``struct xen_dm_op`` for
XEN_DMOP_set_irq_level(irq, 1) that the kernel copies at assign time and
issues on every signal of the eventfd.

The pointed-to buffers are ctypes objects: the standard library's way to own
memory at a fixed address, without loading any library.

Kernels without the fast path answer ENOTTY (before 6.7: privcmd does not
know the command) or EOPNOTSUPP (built without CONFIG_XEN_PRIVCMD_EVENTFD);
both, and ENOSYS, become :class:`~xen.hypervisor.FastPathUnsupported`. Any
other failure is a :class:`~xen.hypervisor.HypervisorError` naming the errno.
"""

from __future__ import annotations

import ctypes
import errno as errno_module
import fcntl
import os
import struct
from collections.abc import Sequence

from xen.hypervisor import FastPathUnsupported, HypervisorError
from xen.xen_libs import errno_name

PRIVCMD_PATH = "/dev/xen/privcmd"

# asm-generic/ioctl.h, the encoding of x86 and Arm: nr in bits 0-7, type in
# bits 8-15, size in bits 16-29, direction in bits 30-31.
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = 8
_IOC_SIZESHIFT = 16
_IOC_DIRSHIFT = 30
_IOC_WRITE = 1
_IOC_SIZEMASK = (1 << 14) - 1


def ioc_write(kind: str, nr: int, size: int) -> int:
    """``_IOW(kind, nr, size)`` for a payload of ``size`` bytes."""
    if not 0 <= size <= _IOC_SIZEMASK:
        raise ValueError(f"ioctl payload of {size} bytes does not fit the size field")
    return (_IOC_WRITE << _IOC_DIRSHIFT) | (size << _IOC_SIZESHIFT) | (ord(kind) << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT)


# Native byte order, standard sizes, explicit tail padding.
PRIVCMD_IRQFD = struct.Struct("=QIIIH2x")
PRIVCMD_IOEVENTFD = struct.Struct("=QQQIIIIIH2x")
assert PRIVCMD_IRQFD.size == 24 and PRIVCMD_IOEVENTFD.size == 48

IOCTL_PRIVCMD_IRQFD = ioc_write("P", 8, PRIVCMD_IRQFD.size)
IOCTL_PRIVCMD_IOEVENTFD = ioc_write("P", 9, PRIVCMD_IOEVENTFD.size)

PRIVCMD_IRQFD_FLAG_DEASSIGN = 1
PRIVCMD_IOEVENTFD_FLAG_DEASSIGN = 1

IOEVENTFD_ADDR_LEN = 4
"""QueueNotify is a 32-bit register: the kernel matches 4-byte writes."""

# xen/include/public/hvm/dm_op.h: struct xen_dm_op is {u32 op; u32 pad;
# union u}, and its size is fixed by the largest member of the union.
XEN_DMOP_SET_IRQ_LEVEL = 19
XEN_DM_OP_SIZE = 32
"""sizeof(struct xen_dm_op) on LP64 (tests compile dm_op.h to confirm)."""
_DM_OP_HEADER = struct.Struct("=II")
_DM_OP_SET_IRQ_LEVEL = struct.Struct("=IB3x")

# What "this kernel has no fast path" looks like.
UNSUPPORTED_ERRNOS = frozenset({errno_module.ENOTTY, errno_module.EOPNOTSUPP, errno_module.ENOSYS})


def pack_ioeventfd(
    *, ioreq: int, ports: int, addr: int, addr_len: int, event_fd: int, vcpus: int, vq: int, flags: int, dom: int
) -> bytes:
    """struct privcmd_ioeventfd; ``ioreq`` and ``ports`` are addresses."""
    return PRIVCMD_IOEVENTFD.pack(ioreq, ports, addr, addr_len, event_fd, vcpus, vq, flags, dom)


def pack_irqfd(*, dm_op: int, size: int, fd: int, flags: int, dom: int) -> bytes:
    """struct privcmd_irqfd; ``dm_op`` is the address of the dm_op buffer."""
    return PRIVCMD_IRQFD.pack(dm_op, size, fd, flags, dom)


def set_irq_level_dm_op(irq: int, level: int = 1) -> bytes:
    """A whole ``struct xen_dm_op`` for XEN_DMOP_set_irq_level(irq, level)."""
    buf = bytearray(XEN_DM_OP_SIZE)
    _DM_OP_HEADER.pack_into(buf, 0, XEN_DMOP_SET_IRQ_LEVEL, 0)
    _DM_OP_SET_IRQ_LEVEL.pack_into(buf, _DM_OP_HEADER.size, irq, level)
    return bytes(buf)


class Privcmd:
    """An fd of /dev/xen/privcmd used only for the fast-path ioctls.

    Keeps the dm_op buffer of each IRQFD registration, keyed by eventfd,
    until that registration is removed or this object is closed."""

    def __init__(self, fd: int, *, owned: bool = True) -> None:
        self._fd = fd
        self._owned = owned
        self._irq_dm_ops: dict[int, ctypes.Array] = {}

    @classmethod
    def open(cls, path: str = PRIVCMD_PATH) -> "Privcmd":
        """Open ``path`` read-write, close-on-exec. Raises OSError."""
        return cls(os.open(path, os.O_RDWR | os.O_CLOEXEC))

    def fileno(self) -> int:
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def ioeventfd(
        self, *, dom: int, ioreq_addr: int, ports: Sequence[int], base: int, vq: int, event_fd: int, assign: bool = True
    ) -> None:
        """Register (or with ``assign=False`` remove) eventfd ``event_fd``
        for 4-byte writes of ``vq`` to ``base`` + QueueNotify."""
        if not ports:
            raise HypervisorError("IOCTL_PRIVCMD_IOEVENTFD: no event-channel ports (one per vCPU is needed)")
        port_array = (ctypes.c_uint32 * len(ports))(*ports)
        payload = pack_ioeventfd(
            ioreq=ioreq_addr,
            ports=ctypes.addressof(port_array),
            addr=base,
            addr_len=IOEVENTFD_ADDR_LEN,
            event_fd=event_fd,
            vcpus=len(ports),
            vq=vq,
            flags=0 if assign else PRIVCMD_IOEVENTFD_FLAG_DEASSIGN,
            dom=dom,
        )
        what = "assign" if assign else "deassign"
        self._ioctl(
            IOCTL_PRIVCMD_IOEVENTFD, payload, f"IOCTL_PRIVCMD_IOEVENTFD ({what} fd {event_fd}, queue {vq} at {base:#x})"
        )
        del port_array  # the kernel copied the ports during the call

    def irqfd(self, *, dom: int, irq: int, event_fd: int, assign: bool = True) -> None:
        """Register (or remove) eventfd ``event_fd`` as a trigger of
        XEN_DMOP_set_irq_level(``irq``, 1) for domain ``dom``."""
        dm_op = None if assign else self._irq_dm_ops.get(event_fd)
        if dm_op is None:
            dm_op = ctypes.create_string_buffer(set_irq_level_dm_op(irq, 1), XEN_DM_OP_SIZE)
        payload = pack_irqfd(
            dm_op=ctypes.addressof(dm_op),
            size=XEN_DM_OP_SIZE,
            fd=event_fd,
            flags=0 if assign else PRIVCMD_IRQFD_FLAG_DEASSIGN,
            dom=dom,
        )
        what = "assign" if assign else "deassign"
        self._ioctl(IOCTL_PRIVCMD_IRQFD, payload, f"IOCTL_PRIVCMD_IRQFD ({what} fd {event_fd}, irq {irq})")
        if assign:
            self._irq_dm_ops[event_fd] = dm_op
        else:
            self._irq_dm_ops.pop(event_fd, None)

    def irqfd_buffer(self, event_fd: int) -> bytes | None:
        """The dm_op kept for the IRQFD registration of ``event_fd``."""
        dm_op = self._irq_dm_ops.get(event_fd)
        return None if dm_op is None else dm_op.raw

    def _ioctl(self, request: int, payload: bytes, what: str) -> None:
        if self._fd < 0:
            raise HypervisorError(f"{what}: the privcmd fd is closed")
        try:
            fcntl.ioctl(self._fd, request, payload)
        except OSError as exc:
            err = exc.errno
            name = errno_name(err)
            if err in UNSUPPORTED_ERRNOS:
                raise FastPathUnsupported(
                    f"{what}: not offered by this kernel ({name}; it needs Linux 6.7 or later "
                    "with CONFIG_XEN_PRIVCMD_EVENTFD)"
                ) from None
            raise HypervisorError(f"{what}: {os.strerror(err)} ({name})") from None

    def close(self) -> None:
        """Close the fd (if owned) and drop the kept dm_op buffers. Idempotent."""
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        self._irq_dm_ops.clear()
        if self._owned:
            os.close(fd)


__all__ = [
    "IOCTL_PRIVCMD_IOEVENTFD",
    "IOCTL_PRIVCMD_IRQFD",
    "PRIVCMD_IOEVENTFD",
    "PRIVCMD_IRQFD",
    "Privcmd",
    "XEN_DM_OP_SIZE",
    "ioc_write",
    "pack_ioeventfd",
    "pack_irqfd",
    "set_irq_level_dm_op",
]
