"""The simulator's xenstore, and the toolstack that fills it at start-up.

:class:`XenStoreTree` is a pure in-memory model of xenstored: a tree of
nodes, each with a string value and ordered children, and watches. It does
no I/O; the simulator (``xen.sim.hypervisor``) puts it behind the ``xs_*``
control ops and delivers watch events on a socketpair per xenstore handle.

Semantics, after xenstored (tools/xenstored):

- paths are absolute (``/local/domain/1/name``) or relative to the caller's
  home, ``/local/domain/<caller domid>`` (the simulator's device models are
  all dom0). A valid path has only the characters ``A-Za-z0-9-/_@``, no
  empty component, no trailing slash (except ``/`` itself), and at most
  :data:`XENSTORE_ABS_PATH_MAX` bytes once made absolute; anything else is
  EINVAL;
- read and directory of a missing node are ENOENT; write creates missing
  parents with an empty value; rm removes a node and everything below it
  (ENOENT when not even the parent exists, as xenstored; the root cannot be
  removed: EINVAL); a request bigger than :data:`XENSTORE_PAYLOAD_MAX` is
  E2BIG;
- a watch on P fires for a write of P or of anything below it, for the
  removal of P, of anything below it, or of an ancestor that takes P with it
  (then the event names P itself), and once as soon as it is registered;
  each event is (path, token), the path relative when the watch was
  registered with a relative path. The special watches ``@introduceDomain``
  and ``@releaseDomain`` are accepted and fire only at registration (the
  simulator never introduces or releases a domain). A second watch with the
  same path and token on one connection is EEXIST, removing one that is not
  there ENOENT. Watches belong to a connection and die with it.

No transactions, permissions or quotas: every simulated client is dom0, and
dom0 may read and write anything.

The toolstack part (:func:`populate`) writes what xen-init-dom0 and libxl
write when they build the domain, including one libxl-shaped virtio-mmio
device per ``--virtio`` spec (:func:`parse_virtio_spec`,
:func:`plan_virtio_devices`).
"""

from __future__ import annotations

import errno
import re
from collections.abc import Callable, Iterable

import attrs

XENSTORE_ABS_PATH_MAX = 3072
"""xs_wire.h: longest absolute path."""

XENSTORE_PAYLOAD_MAX = 4096
"""xs_wire.h: largest request payload (a write carries path, NUL, value)."""

SPECIAL_WATCHES = ("@introduceDomain", "@releaseDomain")

_VALID_PATH = re.compile(r"[A-Za-z0-9\-/_@]*\Z")


class XsError(Exception):
    """A xenstore request failed: an errno and a message naming the path."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


def home_of(domid: int) -> str:
    return f"/local/domain/{domid}"


def _is_below(path: str, ancestor: str) -> bool:
    """True when ``path`` is ``ancestor`` or lies under it."""
    if ancestor == "/":
        return True
    return path == ancestor or path.startswith(ancestor + "/")


class _Node:
    __slots__ = ("value", "children")

    def __init__(self, value: str = "") -> None:
        self.value = value
        self.children: dict[str, _Node] = {}


@attrs.define(slots=True, eq=False)
class Watch:
    connection: "XsConnection"
    path: str
    """Absolute, or a special watch name."""
    token: str
    given: str
    """The path as the client gave it (what events are reported against)."""
    relative_prefix: str | None
    """``/local/domain/<domid>/`` for a relative watch: stripped from events."""

    def fire(self, path: str) -> None:
        prefix = self.relative_prefix
        if prefix is not None and path.startswith(prefix):
            path = path[len(prefix) :]
        self.connection.deliver(path, self.token)


class XenStoreTree:
    """xenstored's tree and watch list, without I/O."""

    def __init__(self) -> None:
        self._root = _Node()
        self._watches: list[Watch] = []

    # --- paths

    def resolve(self, path: str, domid: int = 0, *, special: bool = False) -> tuple[str, bool]:
        """(absolute path, whether ``path`` was relative). EINVAL for a path
        xenstored would refuse; ``special`` admits the special watch names."""
        if type(path) is not str:
            raise XsError(errno.EINVAL, f"path {path!r} is not a string")
        if special and path.startswith("@"):
            if path not in SPECIAL_WATCHES:
                raise XsError(errno.EINVAL, f"{path!r} is not a special watch ({' or '.join(SPECIAL_WATCHES)})")
            return path, False
        if not path:
            raise XsError(errno.EINVAL, "empty path")
        relative = not path.startswith("/")
        absolute = f"{home_of(domid)}/{path}" if relative else path
        shown = path if len(path) <= 80 else path[:77] + "..."
        if not _VALID_PATH.match(path):
            raise XsError(errno.EINVAL, f"path {shown!r} has characters outside A-Za-z0-9-/_@")
        if absolute != "/" and (absolute.endswith("/") or "//" in absolute):
            raise XsError(errno.EINVAL, f"path {shown!r} has an empty component or a trailing slash")
        if relative and path.startswith("@"):
            raise XsError(errno.EINVAL, f"path {shown!r}: names starting with @ are special watches only")
        if len(absolute.encode()) > XENSTORE_ABS_PATH_MAX:
            raise XsError(
                errno.EINVAL, f"path of {len(absolute.encode())} bytes exceeds XENSTORE_ABS_PATH_MAX ({XENSTORE_ABS_PATH_MAX})"
            )
        return absolute, relative

    def _lookup(self, path: str) -> _Node | None:
        node = self._root
        if path == "/":
            return node
        for name in path[1:].split("/"):
            node = node.children.get(name)
            if node is None:
                return None
        return node

    # --- requests (absolute or relative to ``domid``'s home)

    def exists(self, path: str, domid: int = 0) -> bool:
        return self._lookup(self.resolve(path, domid)[0]) is not None

    def read(self, path: str, domid: int = 0) -> str:
        absolute, _ = self.resolve(path, domid)
        node = self._lookup(absolute)
        if node is None:
            raise XsError(errno.ENOENT, f"{absolute}: no such node")
        return node.value

    def directory(self, path: str, domid: int = 0) -> list[str]:
        absolute, _ = self.resolve(path, domid)
        node = self._lookup(absolute)
        if node is None:
            raise XsError(errno.ENOENT, f"{absolute}: no such node")
        return list(node.children)

    def write(self, path: str, value: str, domid: int = 0) -> None:
        if type(value) is not str:
            raise XsError(errno.EINVAL, f"value {value!r} is not a string")
        absolute, _ = self.resolve(path, domid)
        size = len(path.encode()) + 1 + len(value.encode())
        if size > XENSTORE_PAYLOAD_MAX:
            raise XsError(
                errno.E2BIG, f"{absolute}: a write of {size} bytes (path, NUL, value) exceeds XENSTORE_PAYLOAD_MAX ({XENSTORE_PAYLOAD_MAX})"
            )
        node = self._root
        if absolute != "/":
            for name in absolute[1:].split("/"):
                child = node.children.get(name)
                if child is None:
                    child = node.children[name] = _Node()
                node = child
        node.value = value
        self._fire_changed(absolute)

    def rm(self, path: str, domid: int = 0) -> None:
        absolute, _ = self.resolve(path, domid)
        if absolute == "/":
            raise XsError(errno.EINVAL, "the root node cannot be removed")
        parent_path, _, name = absolute.rpartition("/")
        parent = self._lookup(parent_path or "/")
        if parent is None:
            raise XsError(errno.ENOENT, f"{absolute}: no such node (nor its parent {parent_path or '/'})")
        node = parent.children.get(name)
        if node is None:
            return  # xenstored: removing a missing child of an existing node succeeds
        removed = set(_descendants(absolute, node))
        del parent.children[name]
        for watch in list(self._watches):
            if _is_below(absolute, watch.path):
                watch.fire(absolute)
            elif watch.path in removed:
                watch.fire(watch.path)

    def _fire_changed(self, absolute: str) -> None:
        for watch in list(self._watches):
            if _is_below(absolute, watch.path):
                watch.fire(absolute)

    # --- connections and watches

    def connect(self, domid: int, deliver: Callable[[str, str], None]) -> "XsConnection":
        """A client connection of domain ``domid``; its watch events go to
        ``deliver(path, token)``."""
        return XsConnection(self, domid, deliver)

    def watches(self) -> list[tuple[str, str]]:
        """Every registered watch as (absolute path, token), for tests."""
        return [(w.path, w.token) for w in self._watches]

    def _watch(self, connection: "XsConnection", path: str, token: str) -> None:
        if type(token) is not str or "\0" in token:
            raise XsError(errno.EINVAL, f"watch token {token!r} must be a string without NUL")
        absolute, relative = self.resolve(path, connection.domid, special=True)
        for watch in self._watches:
            if watch.connection is connection and watch.path == absolute and watch.token == token:
                raise XsError(errno.EEXIST, f"{absolute} is already watched with token {token!r} on this connection")
        prefix = home_of(connection.domid) + "/" if relative else None
        watch = Watch(connection, absolute, token, path, prefix)
        self._watches.append(watch)
        watch.fire(absolute)  # xenstored fires every new watch once

    def _unwatch(self, connection: "XsConnection", path: str, token: str) -> None:
        absolute, _ = self.resolve(path, connection.domid, special=True)
        for i, watch in enumerate(self._watches):
            if watch.connection is connection and watch.path == absolute and watch.token == token:
                del self._watches[i]
                return
        raise XsError(errno.ENOENT, f"no watch on {absolute} with token {token!r} on this connection")

    def _drop_watches(self, connection: "XsConnection") -> None:
        self._watches = [w for w in self._watches if w.connection is not connection]


def _descendants(path: str, node: _Node) -> Iterable[str]:
    """Every path strictly below ``path``."""
    for name, child in node.children.items():
        child_path = f"{path}/{name}" if path != "/" else f"/{name}"
        yield child_path
        yield from _descendants(child_path, child)


class XsConnection:
    """One client connection to the tree: the caller's domid resolves
    relative paths, and the connection owns its watches."""

    def __init__(self, tree: XenStoreTree, domid: int, deliver: Callable[[str, str], None]) -> None:
        self.tree = tree
        self.domid = domid
        self.deliver = deliver
        self.closed = False

    def _check(self) -> None:
        if self.closed:
            raise XsError(errno.EBADF, "the xenstore connection is closed")

    def read(self, path: str) -> str:
        self._check()
        return self.tree.read(path, self.domid)

    def write(self, path: str, value: str) -> None:
        self._check()
        self.tree.write(path, value, self.domid)

    def directory(self, path: str) -> list[str]:
        self._check()
        return self.tree.directory(path, self.domid)

    def rm(self, path: str) -> None:
        self._check()
        self.tree.rm(path, self.domid)

    def watch(self, path: str, token: str) -> None:
        self._check()
        self.tree._watch(self, path, token)

    def unwatch(self, path: str, token: str) -> None:
        self._check()
        self.tree._unwatch(self, path, token)

    def close(self) -> None:
        """Drop the connection's watches. Idempotent."""
        if not self.closed:
            self.closed = True
            self.tree._drop_watches(self)


# --- the toolstack: what xen-init-dom0 and libxl write ------------------------

GUEST_VIRTIO_MMIO_BASE = 0x02000000  # arch-arm.h
GUEST_VIRTIO_MMIO_SIZE = 0x00100000
VIRTIO_MMIO_DEV_SIZE = 0x200  # libxl_arm.c: one window per device
GUEST_VIRTIO_MMIO_SPI_FIRST = 33  # arch-arm.h
GUEST_VIRTIO_MMIO_SPI_LAST = 43
MAX_VIRTIO_MMIO_DEVICES = GUEST_VIRTIO_MMIO_SPI_LAST - GUEST_VIRTIO_MMIO_SPI_FIRST + 1
DOMID_FIRST_RESERVED = 0x7FF0

VIRTIO_SHORT_FORMS = {
    "net": "virtio,device1",
    "blk": "virtio,device2",
    "gpu": "virtio,device10",
    "fs": "virtio,device1a",
}
"""``--virtio`` shorthands: the compatible string of each device type."""

_VIRTIO_TYPE = re.compile(r"virtio,device([0-9a-fA-F]+)\Z")


class VirtioSpecError(ValueError):
    """A ``--virtio`` spec xl would refuse (the message says why)."""


@attrs.frozen(slots=True)
class VirtioSpec:
    """One entry of xl.cfg's ``virtio = [...]``, parsed."""

    type: str
    """The device-tree compatible string, ``virtio,device<hex id>``."""
    virtio_id: int
    backend_domid: int = 0
    grant_usage: bool | None = None
    """None: libxl's default (on unless the backend is dom0)."""


@attrs.frozen(slots=True)
class VirtioMmioDevice:
    """A virtio-mmio device as libxl lays it out for the guest."""

    devid: int
    type: str
    virtio_id: int
    base: int
    irq: int
    grant_usage: bool
    backend_domid: int

    def as_dict(self) -> dict:
        return {
            "devid": self.devid,
            "type": self.type,
            "virtio_id": self.virtio_id,
            "base": self.base,
            "irq": self.irq,
            "grant_usage": self.grant_usage,
            "backend_domid": self.backend_domid,
        }


def parse_virtio_spec(spec: str) -> VirtioSpec:
    """Parse xl.cfg syntax, ``type=virtio,device<hex>[,transport=mmio]
    [,grant_usage=0|1][,backend=<domid>]``, or a short form (``blk``,
    ``gpu``, ``fs``, ``net``) optionally followed by the same options.
    As in xl, the comma inside ``virtio,device<N>`` belongs to the type
    and a later option overrides an earlier one."""
    tokens = [t.strip() for t in spec.split(",")]
    if tokens and tokens[0] in VIRTIO_SHORT_FORMS:
        tokens[0:1] = ["type=" + VIRTIO_SHORT_FORMS[tokens[0]]]
    type_: str | None = None
    backend = 0
    grant_usage: bool | None = None
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        key, eq, value = token.partition("=")
        if not eq:
            raise VirtioSpecError(f"{spec!r}: unknown string {token!r} in virtio spec")
        if key == "type":
            if value == "virtio" and i < len(tokens):  # "type=virtio,deviceN": the comma is part of it
                value = f"{value},{tokens[i]}"
                i += 1
            type_ = value
        elif key == "transport":
            if value != "mmio":
                raise VirtioSpecError(f"{spec!r}: transport {value!r} is not simulated (only mmio)")
        elif key == "grant_usage":
            try:
                grant_usage = int(value, 0) != 0  # xl: strtoul(oparg, NULL, 0)
            except ValueError:
                raise VirtioSpecError(f"{spec!r}: grant_usage={value!r} is not a number") from None
        elif key == "backend":
            if value in ("Domain-0", "dom0"):
                backend = 0
            else:
                try:
                    backend = int(value, 10)
                except ValueError:
                    raise VirtioSpecError(f"{spec!r}: backend={value!r} is not a domid (only dom0 has a name here)") from None
                if not 0 <= backend < DOMID_FIRST_RESERVED:
                    raise VirtioSpecError(f"{spec!r}: backend={backend} is not a domid")
        else:
            raise VirtioSpecError(f"{spec!r}: unknown string {token!r} in virtio spec")
    if type_ is None:
        raise VirtioSpecError(f"{spec!r}: no type= (e.g. type=virtio,device2, or the short forms {', '.join(VIRTIO_SHORT_FORMS)})")
    m = _VIRTIO_TYPE.match(type_)
    if m is None:
        raise VirtioSpecError(f"{spec!r}: type {type_!r} is not virtio,device<hex id>")
    return VirtioSpec(type=type_, virtio_id=int(m.group(1), 16), backend_domid=backend, grant_usage=grant_usage)


def plan_virtio_devices(specs: Iterable[VirtioSpec]) -> list[VirtioMmioDevice]:
    """libxl's placement: device i (devid i) gets the MMIO window
    GUEST_VIRTIO_MMIO_BASE + 0x200 * i and SPI 33 + i; grant_usage defaults
    to on when the backend is not dom0."""
    devices = []
    for devid, spec in enumerate(specs):
        if devid >= MAX_VIRTIO_MMIO_DEVICES:
            raise VirtioSpecError(
                f"more than {MAX_VIRTIO_MMIO_DEVICES} virtio-mmio devices: libxl has SPIs "
                f"{GUEST_VIRTIO_MMIO_SPI_FIRST} to {GUEST_VIRTIO_MMIO_SPI_LAST} for them"
            )
        grant_usage = spec.grant_usage if spec.grant_usage is not None else spec.backend_domid != 0
        devices.append(
            VirtioMmioDevice(
                devid=devid,
                type=spec.type,
                virtio_id=spec.virtio_id,
                base=GUEST_VIRTIO_MMIO_BASE + VIRTIO_MMIO_DEV_SIZE * devid,
                irq=GUEST_VIRTIO_MMIO_SPI_FIRST + devid,
                grant_usage=grant_usage,
                backend_domid=spec.backend_domid,
            )
        )
    return devices


def backend_path(domid: int, device: VirtioMmioDevice) -> str:
    return f"{home_of(device.backend_domid)}/backend/virtio/{domid}/{device.devid}"


def frontend_path(domid: int, device: VirtioMmioDevice) -> str:
    return f"{home_of(domid)}/device/virtio/{device.devid}"


def populate(tree: XenStoreTree, domid: int, ram_mib: int, devices: Iterable[VirtioMmioDevice]) -> None:
    """Write what xen-init-dom0 and then libxl's domain build write: dom0's
    domid and name, the guest's domid, name and memory (KiB), and each
    virtio device's backend and frontend directories."""
    tree.write("/local/domain/0/domid", "0")
    tree.write("/local/domain/0/name", "Domain-0")
    home = home_of(domid)
    tree.write(f"{home}/domid", str(domid))
    tree.write(f"{home}/name", f"guest{domid}")
    tree.write(f"{home}/memory/static-max", str(ram_mib * 1024))
    tree.write(f"{home}/memory/target", str(ram_mib * 1024))
    for device in devices:
        back = backend_path(domid, device)
        front = frontend_path(domid, device)
        # libxl__device_add_async + libxl__device_generic_add ...
        tree.write(f"{back}/frontend", front)
        tree.write(f"{back}/frontend-id", str(domid))
        tree.write(f"{back}/online", "1")
        tree.write(f"{back}/state", "1")  # XenbusStateInitialising
        # ... + libxl__set_xenstore_virtio (base: "%#"PRIx64, irq: "%u")
        tree.write(f"{back}/irq", str(device.irq))
        tree.write(f"{back}/base", f"{device.base:#x}")
        tree.write(f"{back}/type", device.type)
        tree.write(f"{back}/transport", "mmio")
        tree.write(f"{back}/grant_usage", "1" if device.grant_usage else "0")
        tree.write(f"{front}/backend", back)
        tree.write(f"{front}/backend-id", str(device.backend_domid))
        tree.write(f"{front}/state", "1")
