"""The xenstore interface the bridge uses, and the xenbus state values.

Xenstore is a tree of small string values with watches. Two implementations:
libxenstore through cffi on real Xen (``xen.real``) and the simulator's own
tree over its control socket (``xen.sim``). Paths are absolute
(``/local/domain/0/backend/...``) or relative to the connecting domain's
home, ``/local/domain/<own domid>``, as in xenstored.

Watches follow xenstored: a watch on a path fires for a write or removal of
that path or of anything below it (and of an ancestor removed with it), and
fires once as soon as it is registered. Each event is (path that changed,
token given at registration).
"""

from __future__ import annotations

import abc
import enum


class XenStoreError(Exception):
    """A xenstore operation failed (the message says which path and why)."""


class XenbusState(enum.IntEnum):
    """xen/include/public/io/xenbus.h"""

    UNKNOWN = 0
    INITIALISING = 1
    INIT_WAIT = 2
    INITIALISED = 3
    CONNECTED = 4
    CLOSING = 5
    CLOSED = 6
    RECONFIGURING = 7
    RECONFIGURED = 8


class XenStore(abc.ABC):
    """One xenstore connection (no transactions: every call stands alone)."""

    @abc.abstractmethod
    def read(self, path: str) -> str | None:
        """The value at ``path``, or None when there is no such node."""

    @abc.abstractmethod
    def write(self, path: str, value: str) -> None:
        """Create or overwrite ``path`` (and missing parents)."""

    @abc.abstractmethod
    def directory(self, path: str) -> list[str] | None:
        """The names of ``path``'s children, or None when there is no such
        node."""

    @abc.abstractmethod
    def remove(self, path: str) -> None:
        """Remove ``path`` and everything below it (no error if absent)."""

    @abc.abstractmethod
    def watch(self, path: str, token: str) -> None: ...

    @abc.abstractmethod
    def unwatch(self, path: str, token: str) -> None: ...

    @abc.abstractmethod
    def fileno(self) -> int:
        """An fd that is readable while watch events are waiting."""

    @abc.abstractmethod
    def read_watches(self) -> list[tuple[str, str]]:
        """Every waiting watch event, as (path, token); [] if none. Never
        blocks."""

    @abc.abstractmethod
    def close(self) -> None:
        """Idempotent."""

    def __enter__(self) -> "XenStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
