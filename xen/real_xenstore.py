"""Xenstore on real Xen: :class:`xen.xenstore.XenStore` over libxenstore.

One ``xs_open(0)`` connection (xenstored's socket in dom0, /dev/xen/xenbus
in a driver domain: the library picks), used without transactions. What
libxenstore allocates (xs_read's value, xs_directory's and xs_check_watch's
vectors, each one malloc'd block) goes back to the C library's free().
"""

from __future__ import annotations

import errno as errno_module

from xen import xen_libs
from xen.xenstore import XenStore, XenStoreError


class RealXenStore(XenStore):
    def __init__(self, ffi, lib, libc, handle) -> None:
        self._ffi = ffi
        self._lib = lib
        self._libc = libc
        self._h = handle
        self._fileno: int | None = None

    @classmethod
    def open(cls) -> "RealXenStore":
        """Connect to xenstore. A missing libxenstore raises
        :class:`~xen.hypervisor.HypervisorUnavailable`; a refused connection
        :class:`XenStoreError`."""
        lib = xen_libs.load("xenstore")
        libc = xen_libs.load("c")
        ffi = xen_libs.ffi()
        handle = lib.xs_open(0)
        if handle == ffi.NULL:
            err = ffi.errno
            hint = " (run as root)" if err in (errno_module.EACCES, errno_module.EPERM) else ""
            raise XenStoreError(
                f"cannot connect to xenstore (xs_open: {xen_libs.errno_text(err)}){hint}: is xenstored running, "
                "or /dev/xen/xenbus there?"
            )
        return cls(ffi, lib, libc, handle)

    # --- plumbing

    def _handle(self, what: str):
        if self._h is None:
            raise XenStoreError(f"{what}: the xenstore connection is closed")
        return self._h

    def _fail(self, what: str, path: str, err: int) -> XenStoreError:
        return XenStoreError(f"xenstore {what} {path}: {xen_libs.errno_text(err)}")

    @staticmethod
    def _encode(what: str, text: str) -> bytes:
        if "\0" in text:
            raise XenStoreError(f"xenstore {what}: {text!r} contains a NUL byte")
        return text.encode("utf-8")

    # --- XenStore

    def read(self, path: str) -> str | None:
        h = self._handle("read")
        ffi = self._ffi
        length = ffi.new("unsigned int *")
        value = self._lib.xs_read(h, xen_libs.XBT_NULL, self._encode("read", path), length)
        if value == ffi.NULL:
            err = ffi.errno
            if err == errno_module.ENOENT:
                return None
            raise self._fail("read", path, err)
        try:
            data = ffi.buffer(value, length[0])[:]
        finally:
            self._libc.free(value)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise XenStoreError(f"xenstore read {path}: the value is not UTF-8 text: {data!r}") from None

    def write(self, path: str, value: str) -> None:
        h = self._handle("write")
        data = value.encode("utf-8")
        if not self._lib.xs_write(h, xen_libs.XBT_NULL, self._encode("write", path), data, len(data)):
            raise self._fail("write", path, self._ffi.errno)

    def directory(self, path: str) -> list[str] | None:
        h = self._handle("directory")
        ffi = self._ffi
        num = ffi.new("unsigned int *")
        names = self._lib.xs_directory(h, xen_libs.XBT_NULL, self._encode("directory", path), num)
        if names == ffi.NULL:
            err = ffi.errno
            if err == errno_module.ENOENT:
                return None
            raise self._fail("directory", path, err)
        try:
            raw = [ffi.string(names[i]) for i in range(num[0])]
        finally:
            self._libc.free(names)  # the vector and its strings are one block
        return [name.decode("utf-8", "replace") for name in raw]

    def remove(self, path: str) -> None:
        h = self._handle("remove")
        if not self._lib.xs_rm(h, xen_libs.XBT_NULL, self._encode("remove", path)):
            err = self._ffi.errno
            if err != errno_module.ENOENT:
                raise self._fail("remove", path, err)

    def watch(self, path: str, token: str) -> None:
        h = self._handle("watch")
        if not self._lib.xs_watch(h, self._encode("watch", path), self._encode("watch", token)):
            raise self._fail("watch", path, self._ffi.errno)

    def unwatch(self, path: str, token: str) -> None:
        h = self._handle("unwatch")
        if not self._lib.xs_unwatch(h, self._encode("unwatch", path), self._encode("unwatch", token)):
            raise self._fail("unwatch", path, self._ffi.errno)

    def fileno(self) -> int:
        if self._fileno is None:
            fd = self._lib.xs_fileno(self._handle("fileno"))
            if fd < 0:
                err = self._ffi.errno
                raise XenStoreError(f"xenstore: no fd to wait on for watches (xs_fileno: {xen_libs.errno_text(err)})")
            self._fileno = fd
        return self._fileno

    def read_watches(self) -> list[tuple[str, str]]:
        h = self._handle("read_watches")
        ffi = self._ffi
        events: list[tuple[str, str]] = []
        while True:
            vec = self._lib.xs_check_watch(h)
            if vec == ffi.NULL:
                err = ffi.errno
                if err in (errno_module.EAGAIN, errno_module.EWOULDBLOCK) or events:
                    # None left; an error after some events shows up on the next call.
                    return events
                raise XenStoreError(f"xenstore: reading watch events failed ({xen_libs.errno_text(err)})")
            try:
                path = ffi.string(vec[xen_libs.XS_WATCH_PATH])
                token = ffi.string(vec[xen_libs.XS_WATCH_TOKEN])
            finally:
                self._libc.free(vec)
            events.append((path.decode("utf-8", "replace"), token.decode("utf-8", "replace")))

    def close(self) -> None:
        if self._h is None:
            return
        h, self._h = self._h, None
        self._fileno = None
        self._lib.xs_close(h)


__all__ = ["RealXenStore"]
