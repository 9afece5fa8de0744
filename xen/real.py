"""Real Xen, seen from dom0 or a driver domain.

How this talks to Xen, and why
------------------------------

Every call goes through Xen's own stable user-space libraries, the ones
Debian ships as separate packages:

- libxendevicemodel (libxendevicemodel1): every dm_op: nr_vcpus,
  create / set state of / destroy an ioreq server, map and unmap MMIO
  ranges, set_irq_level;
- libxenforeignmemory (libxenforeignmemory1): map_resource of the ioreq
  server's pages, and foreign mappings of guest RAM;
- libxenevtchn (libxenevtchn1): the event channels of the vCPUs;
- libxengnttab (libxengnttab1): pages the guest granted us;
- libxenstore (libxenstore4): xenstore (:mod:`xen.real_xenstore`).

These are the interfaces Xen promises to keep: their sonames and ABIs stay
the same from one Xen release to the next, unlike libxenctrl and the
domctl/sysctl hypercalls behind it, which are tied to the exact hypervisor
build. They also know the device details we would otherwise duplicate: the
privcmd DM_OP and MMAP_RESOURCE ioctls, the evtchn and gntdev drivers, the
xenbus / xenstored transports, and the restrictions a driver domain has.

We reach them with cffi in ABI mode (:mod:`xen.xen_libs`): ``ffi.dlopen``
of the installed .so files and declarations written out in Python, so
nothing is compiled when the bridge is installed and no headers are needed
where it runs. The tests compile those declarations against Debian's
headers, so they cannot drift from the real prototypes unnoticed.

The only calls no library offers are the kernel fast path of Linux 6.7
(IOCTL_PRIVCMD_IOEVENTFD and IOCTL_PRIVCMD_IRQFD): :mod:`xen.privcmd` packs
those itself and issues them on a /dev/xen/privcmd fd of our own.

Nothing is loaded until :meth:`RealXen.open`, and not even then when the
machine has no Xen: :func:`xen_absent_reason` answers first, in one line.

Notes
-----

- The libraries get NULL loggers, so each makes its own logger on stderr;
  a failing open on a Xen host may print the library's own line before ours.
- Guest RAM is not a file on Xen (:meth:`RealXen.guest_ram` is None); the
  bridge maps what it needs with :meth:`RealXen.map_guest_pages` or
  :meth:`RealXen.map_grant_refs`.
- The ioreq page is a ctypes byte array over the libxenforeignmemory
  mapping: a writable buffer that indexes to ints and slices to bytes like
  the simulator's mmap, with a ``close()`` that unmaps it.
"""

from __future__ import annotations

import ctypes
import errno as errno_module
import fcntl
import logging
import mmap
import os
import struct
from collections.abc import Iterable, Sequence

from xen import abi, xen_libs
from xen.hypervisor import (
    XEN_PAGE_SHIFT,
    XEN_PAGE_SIZE,
    EventChannel,
    GuestMapping,
    GuestMemoryFault,
    Hypervisor,
    HypervisorError,
    HypervisorUnavailable,
    IoreqPages,
)
from xen.privcmd import Privcmd
from xen.xenstore import XenStore, XenStoreError

log = logging.getLogger(__name__)

XEN_DEV_DIR = "/dev/xen"
PRIVCMD = "/dev/xen/privcmd"
EVTCHN = "/dev/xen/evtchn"

PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE

# xen/include/public/arch-arm.h: where a guest's RAM banks live.
GUEST_RAM0_BASE = 0x40000000  # 3 GiB of low RAM at 1 GiB
GUEST_RAM0_SIZE = 0xC0000000
GUEST_RAM1_BASE = 0x0200000000  # 1016 GiB at 8 GiB
GUEST_RAM1_SIZE = 0xFE00000000

DOMID_FIRST_RESERVED = 0x7FF0


def xen_absent_reason(dev_dir: str = XEN_DEV_DIR) -> str | None:
    """Why this machine cannot talk to Xen, or None if it looks like it can."""
    privcmd = os.path.join(dev_dir, "privcmd")
    evtchn = os.path.join(dev_dir, "evtchn")
    missing = [p for p in (privcmd, evtchn) if not os.path.exists(p)]
    if missing:
        return (
            f"no Xen hypervisor here ({' and '.join(missing)} missing): run in a Xen dom0 or driver "
            "domain with the xen-privcmd and xen-evtchn drivers loaded, or use --xen-sim PATH"
        )
    return None


def host_arch(machine: str | None = None) -> str:
    """The architecture Xen runs on here, and so its guests': "arm" or "x86"."""
    machine = (machine or os.uname().machine).lower()
    return "arm" if machine.startswith(("arm", "aarch64")) else "x86"


def arm_guest_ram_banks(ram_bytes: int) -> list[tuple[int, int]]:
    """(gpa, size) of an Arm guest's RAM banks for ``ram_bytes`` of RAM:
    libxl fills bank 0 (3 GiB at 1 GiB) first, bank 1 (at 8 GiB) with the
    rest. Raises ValueError for a size no Arm guest can have."""
    if ram_bytes <= 0:
        raise ValueError(f"a guest with {ram_bytes} bytes of RAM")
    if ram_bytes > GUEST_RAM0_SIZE + GUEST_RAM1_SIZE:
        raise ValueError(f"{ram_bytes:#x} bytes of RAM is more than an Arm guest's banks hold")
    low = min(ram_bytes, GUEST_RAM0_SIZE)
    banks = [(GUEST_RAM0_BASE, low)]
    if ram_bytes > low:
        banks.append((GUEST_RAM1_BASE, ram_bytes - low))
    return banks


def parse_static_max(text: str | None) -> int:
    """Bytes of RAM from xenstore's memory/static-max (decimal KiB).
    Raises ValueError when it is not a positive number."""
    if text is None:
        raise ValueError("missing")
    value = text.strip()
    if not value.isdigit():
        raise ValueError(f"{text!r} is not a number of KiB")
    kib = int(value)
    if kib <= 0:
        raise ValueError(f"{text!r} KiB")
    return kib << 10


def _errname(err: int) -> str:
    return xen_libs.errno_name(err)


class RealXenError(HypervisorError):
    """A Xen library call failed; ``errno`` is what it reported."""

    def __init__(self, message: str, errno: int | None = None, op: str | None = None) -> None:
        super().__init__(message)
        self.errno = errno
        self.op = op


def _open_hint(err: int) -> str:
    if err in (errno_module.EACCES, errno_module.EPERM):
        return "permission denied: run as root in dom0 or a driver domain"
    return "run as root in dom0 or a driver domain with the Xen drivers loaded"


# --- mappings ------------------------------------------------------------------


def _untrack(mapping) -> None:
    """Drop a closed mapping from its RealXen's list of live ones."""
    owner, mapping._owner = mapping._owner, None
    if owner is not None:
        owner._live.pop(id(mapping), None)


_PageBytes = ctypes.c_ubyte * XEN_PAGE_SIZE


class ResourcePage(_PageBytes):
    """One page of an ioreq server (ioreq or buffered page), mapped with
    xenforeignmemory_map_resource: a writable buffer like the simulator's
    mmap (``page[i]`` is an int, ``page[a:b]`` bytes, struct.pack_into and
    unpack_from work on it) whose ``close()`` unmaps it.

    ``address`` is where it is mapped in this process (what
    IOCTL_PRIVCMD_IOEVENTFD wants). Like any unmapped memory, it must not
    be used after ``close()``: indexing then raises ValueError, but a buffer
    taken from it earlier would point at nothing."""

    @classmethod
    def _wrap(cls, address: int, unmap, owner: "RealXen") -> "ResourcePage":
        page = cls.from_address(address)
        page.address = address
        page._unmap = unmap
        page._owner = owner
        return page

    @property
    def closed(self) -> bool:
        return self._unmap is None

    def __getitem__(self, index):
        if self._unmap is None:
            raise ValueError("the ioreq page is unmapped")
        if isinstance(index, slice):
            return bytes(memoryview(self).cast("B")[index])
        return _PageBytes.__getitem__(self, index)

    def __setitem__(self, index, value) -> None:
        if self._unmap is None:
            raise ValueError("the ioreq page is unmapped")
        _PageBytes.__setitem__(self, index, value)

    def close(self) -> None:
        unmap, self._unmap = self._unmap, None
        if unmap is None:
            return
        _untrack(self)
        unmap()


class ForeignMapping(GuestMapping):
    """Guest pages (foreign mapping or grant mapping) in this process."""

    def __init__(self, view: memoryview, unmap, owner: "RealXen", what: str) -> None:
        self.view = view
        self._unmap = unmap
        self._owner = owner
        self.what = what

    def close(self) -> None:
        unmap, self._unmap = self._unmap, None
        if unmap is None:
            return
        _untrack(self)
        try:
            self.view.release()
        except BufferError:
            pass  # still exported somewhere: unmapping anyway, as documented
        unmap()

    def __enter__(self) -> "ForeignMapping":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._unmap is None else f"{len(self.view)} bytes"
        return f"<ForeignMapping {self.what}, {state}>"


# --- event channels ----------------------------------------------------------


class RealEventChannel(EventChannel):
    """/dev/xen/evtchn through libxenevtchn. Pending ports are read from the
    device fd directly, a batch at a time (its read() returns u32 ports: the
    same thing xenevtchn_pending does one port at a time)."""

    READ_SIZE = 4096

    def __init__(self, ffi, lib, handle, owner: "RealXen") -> None:
        self._ffi = ffi
        self._lib = lib
        self._h = handle
        self._owner = owner
        self._fd = lib.xenevtchn_fd(handle)
        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        fcntl.fcntl(self._fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        self._unpack: dict[int, struct.Struct] = {}

    def _handle(self, what: str):
        if self._h is None:
            raise HypervisorError(f"event channel {what}: the channel is closed")
        return self._h

    def _fail(self, what: str) -> RealXenError:
        err = self._ffi.errno
        return RealXenError(f"event channel {what}: {os.strerror(err)} ({_errname(err)})", err, what)

    def fileno(self) -> int:
        return self._fd

    def bind_interdomain(self, remote_domid: int, remote_port: int) -> int:
        port = self._lib.xenevtchn_bind_interdomain(self._handle("bind"), remote_domid, remote_port)
        if port < 0:
            raise self._fail(f"bind_interdomain(domain {remote_domid}, port {remote_port})")
        return port

    def unbind(self, local_port: int) -> None:
        if self._lib.xenevtchn_unbind(self._handle("unbind"), local_port) < 0:
            raise self._fail(f"unbind(port {local_port})")

    def read_pending(self) -> list[int]:
        self._handle("read")
        ports: list[int] = []
        while True:
            try:
                data = os.read(self._fd, self.READ_SIZE)
            except BlockingIOError:
                return ports
            except OSError as exc:
                hint = " (its ring of pending ports overflowed)" if exc.errno == errno_module.EFBIG else ""
                raise RealXenError(
                    f"event channel read: {exc.strerror} ({_errname(exc.errno)}){hint}", exc.errno, "read"
                ) from None
            count = len(data) >> 2
            if count == 0:
                return ports
            unpack = self._unpack.get(count)
            if unpack is None:
                unpack = self._unpack[count] = struct.Struct(f"={count}I")
            ports.extend(unpack.unpack_from(data))
            if len(data) < self.READ_SIZE:
                return ports

    def unmask(self, local_ports: Iterable[int]) -> None:
        h = self._handle("unmask")
        unmask = self._lib.xenevtchn_unmask
        for port in local_ports:
            if unmask(h, port) < 0:
                raise self._fail(f"unmask(port {port})")

    def notify(self, local_port: int) -> None:
        if self._lib.xenevtchn_notify(self._handle("notify"), local_port) < 0:
            raise self._fail(f"notify(port {local_port})")

    def close(self) -> None:
        h, self._h = self._h, None
        if h is None:
            return
        owner, self._owner = self._owner, None
        if owner is not None:
            owner._channels.discard(self)
        self._lib.xenevtchn_close(h)  # unbinds whatever is still bound

    def __enter__(self) -> "RealEventChannel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- the hypervisor ----------------------------------------------------------


class RealXen(Hypervisor):
    """One guest domain, served from dom0 or a driver domain."""

    def __init__(self, domid: int, *, ffi, libs: dict, dmod, fmem, privcmd, arch: str) -> None:
        self.domid = domid
        self.arch = arch
        self._ffi = ffi
        self._libs = libs
        self._dm_lib = libs["xendevicemodel"]
        self._fm_lib = libs["xenforeignmemory"]
        self._dmod = dmod
        self._fmem = fmem
        self._privcmd = privcmd
        self._gnttab = None
        self._xenstore: XenStore | None = None
        self._buffered: set[int] = set()
        self._live: dict[int, ResourcePage | ForeignMapping] = {}  # id -> mapped, not yet closed
        self._channels: set[RealEventChannel] = set()
        self._closed = False

    @classmethod
    def open(cls, domid: int, *, dev_dir: str = XEN_DEV_DIR, arch: str | None = None) -> "RealXen":
        """Open everything needed to serve ``domid``.

        ``dev_dir`` is where to look for privcmd and evtchn before loading
        anything (and where our own privcmd fd comes from); the libraries
        always open the standard /dev/xen nodes themselves."""
        reason = xen_absent_reason(dev_dir)
        if reason is not None:
            raise HypervisorUnavailable(reason)
        if not 0 <= domid < DOMID_FIRST_RESERVED:
            raise HypervisorError(f"domid {domid} is not a domain's id (0 to {DOMID_FIRST_RESERVED - 1})")

        libs = {name: xen_libs.load(name) for name in ("xendevicemodel", "xenforeignmemory", "xenevtchn")}
        ffi = xen_libs.ffi()
        undo: list = []
        try:
            dmod = libs["xendevicemodel"].xendevicemodel_open(ffi.NULL, 0)
            if dmod == ffi.NULL:
                err = ffi.errno
                raise HypervisorUnavailable(
                    f"cannot open the Xen device-model interface on {PRIVCMD} (xendevicemodel_open: "
                    f"{os.strerror(err)} ({_errname(err)})): {_open_hint(err)}"
                )
            undo.append(lambda: libs["xendevicemodel"].xendevicemodel_close(dmod))
            fmem = libs["xenforeignmemory"].xenforeignmemory_open(ffi.NULL, 0)
            if fmem == ffi.NULL:
                err = ffi.errno
                raise HypervisorUnavailable(
                    f"cannot open Xen foreign memory on {PRIVCMD} (xenforeignmemory_open: "
                    f"{os.strerror(err)} ({_errname(err)})): {_open_hint(err)}"
                )
            undo.append(lambda: libs["xenforeignmemory"].xenforeignmemory_close(fmem))
            path = os.path.join(dev_dir, "privcmd")
            try:
                privcmd = Privcmd.open(path)
            except OSError as exc:
                raise HypervisorUnavailable(
                    f"cannot open {path} ({exc.strerror} ({_errname(exc.errno)})): {_open_hint(exc.errno)}"
                ) from None
        except BaseException:
            for step in reversed(undo):
                step()
            raise
        return cls(domid, ffi=ffi, libs=libs, dmod=dmod, fmem=fmem, privcmd=privcmd, arch=arch or host_arch())

    # --- plumbing

    def _check_open(self, op: str) -> None:
        if self._closed:
            raise HypervisorError(f"{op}: the Xen handles are closed")

    def _fail(self, op: str, err: int | None = None) -> RealXenError:
        if err is None:
            err = self._ffi.errno
        return RealXenError(f"{op}: {os.strerror(err)} ({_errname(err)})", err, op)

    def _dm_call(self, op: str, rc: int) -> None:
        if rc != 0:
            raise self._fail(f"{op} (domain {self.domid})")

    # --- dm_ops

    def nr_vcpus(self) -> int:
        self._check_open("nr_vcpus")
        vcpus = self._ffi.new("unsigned int *")
        self._dm_call("nr_vcpus", self._dm_lib.xendevicemodel_nr_vcpus(self._dmod, self.domid, vcpus))
        return vcpus[0]

    def create_ioreq_server(self, *, buffered: bool = False) -> int:
        self._check_open("create_ioreq_server")
        if buffered and self.arch == "arm":
            raise HypervisorError(
                "create_ioreq_server: Xen on Arm has no buffered ioreqs; create the server without them"
            )
        handle = abi.HVM_IOREQSRV_BUFIOREQ_ATOMIC if buffered else abi.HVM_IOREQSRV_BUFIOREQ_OFF
        server = self._ffi.new("ioservid_t *")
        self._dm_call(
            "create_ioreq_server",
            self._dm_lib.xendevicemodel_create_ioreq_server(self._dmod, self.domid, handle, server),
        )
        if buffered:
            self._buffered.add(server[0])
        return server[0]

    def get_ioreq_server_info(self, server_id: int) -> int | None:
        """XEN_DMOP_get_ioreq_server_info without gfns: the buffered-ioreq
        event channel port (guest side), or None without a buffered page."""
        self._check_open("get_ioreq_server_info")
        port = self._ffi.new("evtchn_port_t *")
        self._dm_call(
            f"get_ioreq_server_info({server_id})",
            self._dm_lib.xendevicemodel_get_ioreq_server_info(
                self._dmod, self.domid, server_id, self._ffi.NULL, self._ffi.NULL, port
            ),
        )
        return port[0] if server_id in self._buffered else None

    def _map_frame(self, server_id: int, frame: int, what: str) -> ResourcePage:
        ffi = self._ffi
        lib = self._fm_lib
        addr = ffi.new("void **")
        fres = lib.xenforeignmemory_map_resource(
            self._fmem, self.domid, abi.XENMEM_RESOURCE_IOREQ_SERVER, server_id, frame, 1, addr, PROT_RW, 0
        )
        if fres == ffi.NULL:
            err = ffi.errno
            hint = ""
            if err in (errno_module.EOPNOTSUPP, errno_module.ENOTTY, errno_module.ENOSYS):
                hint = " (needs Xen 4.12+ and a kernel with IOCTL_PRIVCMD_MMAP_RESOURCE)"
            raise RealXenError(
                f"map_resource of ioreq server {server_id}'s {what} (domain {self.domid}, frame {frame}): "
                f"{os.strerror(err)} ({_errname(err)}){hint}",
                err,
                "map_resource",
            )
        fmem = self._fmem

        def unmap() -> None:
            if lib.xenforeignmemory_unmap_resource(fmem, fres) != 0:
                log.debug("unmapping ioreq server %d frame %d: errno %d", server_id, frame, ffi.errno)

        page = ResourcePage._wrap(int(ffi.cast("uintptr_t", addr[0])), unmap, self)
        self._live[id(page)] = page
        return page

    def map_ioreq_pages(self, server_id: int) -> IoreqPages:
        self._check_open("map_ioreq_pages")
        ioreq = self._map_frame(server_id, abi.XENMEM_RESOURCE_IOREQ_SERVER_FRAME_IOREQ, "ioreq page")
        buffered = None
        if server_id in self._buffered:
            try:
                buffered = self._map_frame(server_id, abi.XENMEM_RESOURCE_IOREQ_SERVER_FRAME_BUFIOREQ, "buffered page")
            except BaseException:
                ioreq.close()
                raise
        return IoreqPages(ioreq=ioreq, buffered=buffered)

    def set_ioreq_server_state(self, server_id: int, enabled: bool) -> None:
        self._check_open("set_ioreq_server_state")
        self._dm_call(
            f"set_ioreq_server_state({server_id}, {int(bool(enabled))})",
            self._dm_lib.xendevicemodel_set_ioreq_server_state(self._dmod, self.domid, server_id, int(bool(enabled))),
        )

    def map_mmio_range(self, server_id: int, start: int, end: int) -> None:
        self._check_open("map_io_range_to_ioreq_server")
        self._dm_call(
            f"map_io_range_to_ioreq_server({server_id}, {start:#x}-{end:#x})",
            self._dm_lib.xendevicemodel_map_io_range_to_ioreq_server(self._dmod, self.domid, server_id, 1, start, end),
        )

    def unmap_mmio_range(self, server_id: int, start: int, end: int) -> None:
        self._check_open("unmap_io_range_from_ioreq_server")
        self._dm_call(
            f"unmap_io_range_from_ioreq_server({server_id}, {start:#x}-{end:#x})",
            self._dm_lib.xendevicemodel_unmap_io_range_from_ioreq_server(
                self._dmod, self.domid, server_id, 1, start, end
            ),
        )

    def destroy_ioreq_server(self, server_id: int) -> None:
        self._check_open("destroy_ioreq_server")
        self._dm_call(
            f"destroy_ioreq_server({server_id})",
            self._dm_lib.xendevicemodel_destroy_ioreq_server(self._dmod, self.domid, server_id),
        )
        self._buffered.discard(server_id)

    def set_irq_level(self, irq: int, level: int) -> None:
        self._check_open("set_irq_level")
        self._dm_call(
            f"set_irq_level({irq}, {level})",
            self._dm_lib.xendevicemodel_set_irq_level(self._dmod, self.domid, irq, level),
        )

    # --- event channels

    def open_event_channel(self) -> RealEventChannel:
        self._check_open("open_event_channel")
        lib = self._libs["xenevtchn"]
        handle = lib.xenevtchn_open(self._ffi.NULL, 0)
        if handle == self._ffi.NULL:
            err = self._ffi.errno
            raise RealXenError(
                f"cannot open {EVTCHN} (xenevtchn_open: {os.strerror(err)} ({_errname(err)})): {_open_hint(err)}",
                err,
                "xenevtchn_open",
            )
        try:
            channel = RealEventChannel(self._ffi, lib, handle, self)
        except BaseException:
            lib.xenevtchn_close(handle)
            raise
        self._channels.add(channel)
        return channel

    # --- guest memory

    def guest_ram(self) -> None:
        return None  # guest RAM is no file on Xen: map_guest_pages reaches it

    def guest_ram_layout(self) -> list[tuple[int, int]]:
        self._check_open("guest_ram_layout")
        if self.arch != "arm":
            raise HypervisorError(
                f"the RAM layout of domain {self.domid} is only known for Arm guests (this is {self.arch})"
            )
        path = f"/local/domain/{self.domid}/memory/static-max"
        try:
            if self._xenstore is None:
                from xen.real_xenstore import RealXenStore

                self._xenstore = RealXenStore.open()
            text = self._xenstore.read(path)
        except XenStoreError as exc:
            raise HypervisorError(f"cannot read {path}: {exc}") from None
        try:
            return arm_guest_ram_banks(parse_static_max(text))
        except ValueError as exc:
            raise HypervisorError(f"{path}: cannot tell domain {self.domid}'s RAM size ({exc})") from None

    def map_guest_pages(self, gfn: int, count: int) -> ForeignMapping:
        self._check_open("map_guest_pages")
        if count <= 0:
            raise ValueError(f"map_guest_pages: {count} pages")
        ffi = self._ffi
        lib = self._fm_lib
        frames = ffi.new("xen_pfn_t[]", list(range(gfn, gfn + count)))
        errs = ffi.new("int[]", count)
        addr = lib.xenforeignmemory_map(self._fmem, self.domid, PROT_RW, count, frames, errs)
        if addr == ffi.NULL:
            err = ffi.errno
            raise GuestMemoryFault(
                f"cannot map guest frames {gfn:#x}-{gfn + count - 1:#x} of domain {self.domid}: "
                f"{os.strerror(err)} ({_errname(err)})"
            )
        fmem = self._fmem

        def unmap() -> None:
            if lib.xenforeignmemory_unmap(fmem, addr, count) != 0:
                log.debug("unmapping guest frames %#x+%d: errno %d", gfn, count, ffi.errno)

        for i in range(count):
            if errs[i]:
                unmap()
                err = abs(errs[i])
                raise GuestMemoryFault(
                    f"guest frame {gfn + i:#x} of domain {self.domid} cannot be mapped: "
                    f"{os.strerror(err)} ({_errname(err)})"
                )
        view = memoryview(ffi.buffer(addr, count << XEN_PAGE_SHIFT))
        mapping = ForeignMapping(view, unmap, self, f"gfn {gfn:#x}+{count}")
        self._live[id(mapping)] = mapping
        return mapping

    def _gnttab_handle(self):
        if self._gnttab is None:
            lib = xen_libs.load("xengnttab")
            handle = lib.xengnttab_open(self._ffi.NULL, 0)
            if handle == self._ffi.NULL:
                err = self._ffi.errno
                raise RealXenError(
                    f"cannot open /dev/xen/gntdev (xengnttab_open: {os.strerror(err)} ({_errname(err)})): "
                    "grant mappings need the xen-gntdev driver and root",
                    err,
                    "xengnttab_open",
                )
            self._gnttab = (lib, handle)
        return self._gnttab

    def map_grant_refs(self, refs: Sequence[int]) -> ForeignMapping:
        self._check_open("map_grant_refs")
        refs = list(refs)
        if not refs:
            raise ValueError("map_grant_refs: no grant references")
        lib, xgt = self._gnttab_handle()
        ffi = self._ffi
        count = len(refs)
        array = ffi.new("uint32_t[]", refs)
        addr = lib.xengnttab_map_domain_grant_refs(xgt, count, self.domid, array, PROT_RW)
        if addr == ffi.NULL:
            err = ffi.errno
            shown = ", ".join(str(r) for r in refs[:8]) + (", ..." if count > 8 else "")
            raise GuestMemoryFault(
                f"cannot map grant reference{'s' if count > 1 else ''} {shown} of domain {self.domid}: "
                f"{os.strerror(err)} ({_errname(err)})"
            )

        def unmap() -> None:
            if lib.xengnttab_unmap(xgt, addr, count) != 0:
                log.debug("unmapping %d grants: errno %d", count, ffi.errno)

        view = memoryview(ffi.buffer(addr, count * XEN_PAGE_SIZE))
        mapping = ForeignMapping(view, unmap, self, f"{count} grants from ref {refs[0]}")
        self._live[id(mapping)] = mapping
        return mapping

    # --- the kernel fast path

    def ioeventfd(
        self, pages: IoreqPages, ports: Sequence[int], *, base: int, vq: int, fd: int, assign: bool = True
    ) -> None:
        self._check_open("ioeventfd")
        page = pages.ioreq
        address = getattr(page, "address", None)
        if not isinstance(page, ResourcePage) or page.closed or address is None:
            raise HypervisorError("ioeventfd: the ioreq page is not a live mapping made by this RealXen")
        self._privcmd.ioeventfd(
            dom=self.domid, ioreq_addr=address, ports=list(ports), base=base, vq=vq, event_fd=fd, assign=assign
        )

    def irqfd(self, *, irq: int, fd: int, assign: bool = True) -> None:
        self._check_open("irqfd")
        self._privcmd.irqfd(dom=self.domid, irq=irq, event_fd=fd, assign=assign)

    # --- xenstore

    def xenstore(self) -> XenStore:
        self._check_open("xenstore")
        from xen.real_xenstore import RealXenStore

        return RealXenStore.open()

    # --- the end

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        steps = [(f"unmap {m!r}", m.close) for m in list(self._live.values())]
        steps += [("close event channel", ch.close) for ch in list(self._channels)]
        if self._gnttab is not None:
            lib, xgt = self._gnttab
            steps.append(("close gnttab", lambda: lib.xengnttab_close(xgt)))
        if self._xenstore is not None:
            steps.append(("close xenstore", self._xenstore.close))
        steps.append(("close privcmd", self._privcmd.close))
        steps.append(("close foreign memory", lambda: self._fm_lib.xenforeignmemory_close(self._fmem)))
        steps.append(("close device model", lambda: self._dm_lib.xendevicemodel_close(self._dmod)))
        for what, step in steps:
            try:
                step()
            except Exception as exc:  # keep closing whatever fails
                log.debug("close: %s failed: %s", what, exc)
        self._gnttab = None
        self._xenstore = None
        self._live.clear()
        self._channels.clear()

    def __enter__(self) -> "RealXen":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = [
    "ForeignMapping",
    "RealEventChannel",
    "RealXen",
    "RealXenError",
    "ResourcePage",
    "arm_guest_ram_banks",
    "host_arch",
    "parse_static_max",
    "xen_absent_reason",
]
