"""Xen's stable libraries, through cffi in ABI mode: declarations and loading.

The declarations below are the subset of Debian's headers (libxen-dev:
xendevicemodel.h, xenforeignmemory.h, xenevtchn.h, xengnttab.h, xenstore.h)
that ``xen.real`` calls, written out for cffi's ``ffi.cdef``. ABI mode needs
no compiler and no headers at run time: ``ffi.dlopen`` opens the shared
library and every function is looked up on first use. The tests compile
these declarations against the real headers, so a mismatch cannot go
unnoticed.

Nothing here happens at import: cffi itself is imported, the declarations
parsed and each library opened only when :func:`load` is first asked for it,
once per process.
"""

from __future__ import annotations

import errno as errno_module
import os
import re
import threading
from dataclasses import dataclass

from xen.hypervisor import HypervisorUnavailable

TYPES_CDEF = """
typedef uint16_t domid_t;
typedef uint16_t ioservid_t;
typedef uint64_t xen_pfn_t;
typedef uint32_t evtchn_port_t;
typedef int xenevtchn_port_or_error_t;
typedef uint32_t xs_transaction_t;

struct xentoollog_logger;
typedef struct xendevicemodel_handle xendevicemodel_handle;
typedef struct xenforeignmemory_handle xenforeignmemory_handle;
typedef struct xenforeignmemory_resource_handle xenforeignmemory_resource_handle;
typedef struct xenevtchn_handle xenevtchn_handle;
typedef struct xengntdev_handle xengnttab_handle;
struct xs_handle;
"""
"""Types shared by the libraries' declarations. ``xen_pfn_t`` is
``unsigned long`` in arch-x86/xen.h and ``uint64_t`` in arch-arm.h: the same
64-bit type on x86-64 and aarch64 (LP64)."""

XENDEVICEMODEL_CDEF = """
xendevicemodel_handle *xendevicemodel_open(struct xentoollog_logger *logger, unsigned int open_flags);
int xendevicemodel_close(xendevicemodel_handle *dmod);
int xendevicemodel_nr_vcpus(xendevicemodel_handle *dmod, domid_t domid, unsigned int *vcpus);
int xendevicemodel_create_ioreq_server(xendevicemodel_handle *dmod, domid_t domid, int handle_bufioreq,
                                       ioservid_t *id);
int xendevicemodel_get_ioreq_server_info(xendevicemodel_handle *dmod, domid_t domid, ioservid_t id,
                                         xen_pfn_t *ioreq_gfn, xen_pfn_t *bufioreq_gfn,
                                         evtchn_port_t *bufioreq_port);
int xendevicemodel_map_io_range_to_ioreq_server(xendevicemodel_handle *dmod, domid_t domid, ioservid_t id,
                                                int is_mmio, uint64_t start, uint64_t end);
int xendevicemodel_unmap_io_range_from_ioreq_server(xendevicemodel_handle *dmod, domid_t domid, ioservid_t id,
                                                    int is_mmio, uint64_t start, uint64_t end);
int xendevicemodel_set_ioreq_server_state(xendevicemodel_handle *dmod, domid_t domid, ioservid_t id, int enabled);
int xendevicemodel_destroy_ioreq_server(xendevicemodel_handle *dmod, domid_t domid, ioservid_t id);
int xendevicemodel_set_irq_level(xendevicemodel_handle *dmod, domid_t domid, unsigned int irq, unsigned int level);
"""

XENFOREIGNMEMORY_CDEF = """
xenforeignmemory_handle *xenforeignmemory_open(struct xentoollog_logger *logger, unsigned int open_flags);
int xenforeignmemory_close(xenforeignmemory_handle *fmem);
void *xenforeignmemory_map(xenforeignmemory_handle *fmem, uint32_t dom, int prot, size_t pages,
                           const xen_pfn_t arr[], int err[]);
int xenforeignmemory_unmap(xenforeignmemory_handle *fmem, void *addr, size_t pages);
xenforeignmemory_resource_handle *xenforeignmemory_map_resource(xenforeignmemory_handle *fmem, domid_t domid,
                                                                unsigned int type, unsigned int id,
                                                                unsigned long frame, unsigned long nr_frames,
                                                                void **paddr, int prot, int flags);
int xenforeignmemory_unmap_resource(xenforeignmemory_handle *fmem, xenforeignmemory_resource_handle *fres);
"""

XENEVTCHN_CDEF = """
xenevtchn_handle *xenevtchn_open(struct xentoollog_logger *logger, unsigned int flags);
int xenevtchn_close(xenevtchn_handle *xce);
int xenevtchn_fd(xenevtchn_handle *xce);
int xenevtchn_notify(xenevtchn_handle *xce, evtchn_port_t port);
xenevtchn_port_or_error_t xenevtchn_bind_interdomain(xenevtchn_handle *xce, uint32_t domid,
                                                     evtchn_port_t remote_port);
int xenevtchn_unbind(xenevtchn_handle *xce, evtchn_port_t port);
int xenevtchn_unmask(xenevtchn_handle *xce, evtchn_port_t port);
"""

XENGNTTAB_CDEF = """
xengnttab_handle *xengnttab_open(struct xentoollog_logger *logger, unsigned int open_flags);
int xengnttab_close(xengnttab_handle *xgt);
void *xengnttab_map_domain_grant_refs(xengnttab_handle *xgt, uint32_t count, uint32_t domid, uint32_t *refs,
                                      int prot);
int xengnttab_unmap(xengnttab_handle *xgt, void *start_address, uint32_t count);
"""

XENSTORE_CDEF = """
struct xs_handle *xs_open(unsigned long flags);
void xs_close(struct xs_handle *xsh);
void *xs_read(struct xs_handle *h, xs_transaction_t t, const char *path, unsigned int *len);
bool xs_write(struct xs_handle *h, xs_transaction_t t, const char *path, const void *data, unsigned int len);
char **xs_directory(struct xs_handle *h, xs_transaction_t t, const char *path, unsigned int *num);
bool xs_rm(struct xs_handle *h, xs_transaction_t t, const char *path);
bool xs_watch(struct xs_handle *h, const char *path, const char *token);
bool xs_unwatch(struct xs_handle *h, const char *path, const char *token);
int xs_fileno(struct xs_handle *h);
char **xs_check_watch(struct xs_handle *h);
"""

LIBC_CDEF = """
void free(void *ptr);
"""

# Values from the same headers (the tests check them against the headers too).
XBT_NULL = 0  # xenstore.h: no transaction
XS_WATCH_PATH = 0  # xen/io/xs_wire.h: the indices of a watch event's vector
XS_WATCH_TOKEN = 1


@dataclass(frozen=True)
class XenLibrary:
    """One shared library: where it comes from and what we declare of it."""

    name: str
    soname: str | None
    """What ``ffi.dlopen`` opens; None for the C library itself."""
    package: str
    """The Debian package that ships it."""
    header: str
    """The header that declares it (in libxen-dev, or libc6-dev)."""
    cdef: str

    def functions(self) -> list[str]:
        """The names of the functions this library's cdef declares."""
        return declared_functions(self.cdef)


LIBRARIES: dict[str, XenLibrary] = {
    lib.name: lib
    for lib in (
        XenLibrary("xendevicemodel", "libxendevicemodel.so.1", "libxendevicemodel1", "xendevicemodel.h", XENDEVICEMODEL_CDEF),
        XenLibrary(
            "xenforeignmemory", "libxenforeignmemory.so.1", "libxenforeignmemory1", "xenforeignmemory.h", XENFOREIGNMEMORY_CDEF
        ),
        XenLibrary("xenevtchn", "libxenevtchn.so.1", "libxenevtchn1", "xenevtchn.h", XENEVTCHN_CDEF),
        XenLibrary("xengnttab", "libxengnttab.so.1", "libxengnttab1", "xengnttab.h", XENGNTTAB_CDEF),
        XenLibrary("xenstore", "libxenstore.so.4", "libxenstore4", "xenstore.h", XENSTORE_CDEF),
        XenLibrary("c", None, "libc6", "stdlib.h", LIBC_CDEF),
    )
}


_FUNCTION_NAME = re.compile(r"(\w+)\s*\(")


def declared_functions(cdef: str) -> list[str]:
    """The function names in a cdef made of one declaration per ``;``."""
    names = []
    for decl in cdef.split(";"):
        if "(" not in decl:
            continue  # a type, not a function
        match = _FUNCTION_NAME.search(decl)
        if match is not None:
            names.append(match.group(1))
    return names


def full_cdef() -> str:
    """Everything handed to ``ffi.cdef``: the types, then each library."""
    return TYPES_CDEF + "".join(lib.cdef for lib in LIBRARIES.values())


class XenLibraryMissing(HypervisorUnavailable):
    """A Xen library is not installed (or cannot be loaded)."""


_lock = threading.Lock()
_ffi = None
_loaded: dict[str, object] = {}


def ffi():
    """The process's one cffi ``FFI`` with every declaration (built once)."""
    global _ffi
    with _lock:
        if _ffi is None:
            try:
                import cffi
            except ImportError as exc:  # pragma: no cover - cffi is a dependency
                raise HypervisorUnavailable(f"real Xen needs the Python package cffi ({exc})") from None
            built = cffi.FFI()
            built.cdef(full_cdef())
            _ffi = built
        return _ffi


def load(name: str):
    """The library ``name`` (a key of :data:`LIBRARIES`), opened once.

    Raises :class:`XenLibraryMissing` naming the .so and its Debian package
    when it cannot be opened."""
    lib = _loaded.get(name)
    if lib is not None:
        return lib
    spec = LIBRARIES[name]
    the_ffi = ffi()
    with _lock:
        lib = _loaded.get(name)
        if lib is None:
            try:
                lib = the_ffi.dlopen(spec.soname)
            except OSError as exc:
                what = spec.soname or "the C library"
                raise XenLibraryMissing(
                    f"cannot load {what} ({_dlerror(exc)}): install the Debian package {spec.package}"
                ) from None
            _loaded[name] = lib
    return lib


def _dlerror(exc: OSError) -> str:
    text = str(exc).strip()
    # cffi says "cannot load library 'x': x: cannot open shared object file: ..."
    tail = text.rsplit(": ", 1)[-1] if ": " in text else text
    return tail or text


def errno_name(err: int) -> str:
    """``"EACCES"``; EOPNOTSUPP rather than its Linux alias ENOTSUP, as Xen
    and the kernel spell it."""
    if err == errno_module.EOPNOTSUPP:
        return "EOPNOTSUPP"
    return errno_module.errorcode.get(err, str(err))


def errno_text(err: int) -> str:
    """``"Permission denied (EACCES)"``."""
    return f"{os.strerror(err)} ({errno_name(err)})"


__all__ = [
    "LIBRARIES",
    "XBT_NULL",
    "XS_WATCH_PATH",
    "XS_WATCH_TOKEN",
    "XenLibrary",
    "XenLibraryMissing",
    "declared_functions",
    "errno_name",
    "errno_text",
    "ffi",
    "full_cdef",
    "load",
]
