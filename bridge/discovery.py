"""Find the guest's virtio device where xl/libxl describe it: in xenstore.

libxl (Arm) picks each virtio-mmio device's window and SPI, writes them
into the guest's device tree, and records the device for its backend in one
of two places, depending on the Xen release and the xl config line.

Xen 4.18 and later, ``virtio = ["type=virtio,device2,transport=mmio"]``::

    /local/domain/<backend domid>/backend/virtio/<domid>/<devid>/
        type         "virtio,device<virtio id in hex>"
        transport    "mmio"
        base         the window's guest-physical address, in hex ("0x2000000")
        irq          the SPI, in decimal ("33")
        grant_usage  "1" when the guest puts grant references in its buffers
        frontend, frontend-id, online, state

Xen 4.17, where only a disk can be virtio, through its disk line
(``disk = ["format=raw,vdev=xvda,backendtype=standalone,specification=virtio,target=/path"]``;
libxl_disk.c)::

    /local/domain/<backend domid>/backend/virtio_disk/<domid>/<devid>/
        type           "standalone" (the backend type, not a virtio id: always virtio-blk)
        specification  "virtio"
        transport      "mmio"
        base           the window's guest-physical address, in decimal ("33554432")
        irq            the SPI, in decimal ("33")
        params         the target, dev (xvda), mode, frontend, frontend-id, online, state ...

4.17 has no grant_usage key: libxl gives the guest's virtio node an
``iommus`` link to a "xen,grant-dma" node (so grant references in its
buffers) exactly when the backend is not dom0, so that is what the bridge
assumes there.

For the generic virtio line libxl does not wait for the backend, so its
``state`` is ours to keep; for the 4.17 disk line ``xl create`` waits (10 s)
for the backend to reach InitWait and fails the domain otherwise: start the
bridge while ``xl create -p`` runs. Either way the bridge moves the state to
InitWait when it claims the device, to Connected when it serves the window,
and to Closed when it stops. Removing the backend directory (the device or
the domain going away), ``online`` set to 0, or ``state`` set to Closing by
the toolstack tells the bridge to stop.

Start the bridge before the guest runs (``xl create -p``, start the bridge,
``xl unpause``): otherwise the guest may probe a window nobody serves yet.
"""

from __future__ import annotations

import logging
import re

import attrs
import trio

from bridge.device_types import DEVICE_TYPES, DeviceType
from xen.xenstore import XenbusState, XenStore, XenStoreError

log = logging.getLogger(__name__)

_TYPE = re.compile(r"virtio,device([0-9a-fA-F]{1,8})?")
_HEX = re.compile(r"0[xX][0-9a-fA-F]{1,16}")
_DEC = re.compile(r"[0-9]{1,10}")


class DiscoveryError(Exception):
    """Xenstore does not describe a device the bridge can serve (the text
    says which key, and what to do)."""


@attrs.frozen
class XenstoreDevice:
    """One virtio device of the guest, as libxl recorded it."""

    domid: int
    devid: int
    path: str
    """The backend directory: /local/domain/<backend>/backend/<kind>/<domid>/<devid>."""
    type: str
    virtio_id: int | None
    """None for the generic "virtio,device" compatible, which names no device."""
    transport: str
    base: int
    irq: int
    grant_usage: bool
    kind: str = "virtio"
    """Which backend directory holds it: "virtio" (the generic virtio line)
    or "virtio_disk" (Xen 4.17's virtio disk line)."""

    def describe(self) -> str:
        return f"virtio device {self.devid} of domain {self.domid} ({self.type} at {self.base:#x}, irq {self.irq})"


def own_domid(xs: XenStore) -> int:
    """The domain the bridge runs in (xen-init-dom0 and libxl write "domid"
    in every domain's home)."""
    text = xs.read("domid")
    if text is None or not _DEC.fullmatch(text.strip()):
        raise DiscoveryError(f"xenstore has no readable 'domid' for this domain ({text!r}): is xenstored running?")
    return int(text.strip())


VIRTIO_KINDS = ("virtio", "virtio_disk")
"""The backend directories libxl records virtio devices in: the generic
virtio line's (Xen 4.18+) and 4.17's virtio disk line's."""

VIRTIO_BLK_ID = 2


def backend_root(backend_domid: int, domid: int, kind: str = "virtio") -> str:
    return f"/local/domain/{backend_domid}/backend/{kind}/{domid}"


def describe_roots(backend_domid: int, domid: int) -> str:
    """Where find_devices looks, for messages."""
    return " and ".join(backend_root(backend_domid, domid, kind) for kind in VIRTIO_KINDS)


def parse_virtio_type(text: str) -> int | None:
    """"virtio,device1a" -> 0x1a; "virtio,device" -> None."""
    m = _TYPE.fullmatch(text)
    if m is None:
        raise ValueError(f"{text!r} is not a virtio compatible string (virtio,device<hex id>)")
    return int(m.group(1), 16) if m.group(1) else None


def _key(xs: XenStore, path: str, name: str) -> str:
    value = xs.read(f"{path}/{name}")
    if value is None:
        raise DiscoveryError(f"{path}/{name} is missing: libxl writes it for every virtio device")
    return value.strip()


def read_device(xs: XenStore, domid: int, path: str, devid: int) -> XenstoreDevice:
    """Parse one backend/virtio directory; a missing or malformed key is a
    DiscoveryError that names it."""

    def key(name: str) -> str:
        return _key(xs, path, name)

    type_ = key("type")
    try:
        virtio_id = parse_virtio_type(type_)
    except ValueError as exc:
        raise DiscoveryError(f"{path}/type: {exc}") from None
    base_text = key("base")
    if not _HEX.fullmatch(base_text):
        raise DiscoveryError(f"{path}/base is {base_text!r}, not a hex address like 0x2000000")
    irq_text = key("irq")
    if not _DEC.fullmatch(irq_text):
        raise DiscoveryError(f"{path}/irq is {irq_text!r}, not a decimal SPI number")
    grant_text = xs.read(f"{path}/grant_usage")
    grant = (grant_text or "0").strip()
    if grant not in ("0", "1"):
        raise DiscoveryError(f"{path}/grant_usage is {grant_text!r}, not 0 or 1")
    return XenstoreDevice(
        domid=domid,
        devid=devid,
        path=path,
        type=type_,
        virtio_id=virtio_id,
        transport=key("transport"),
        base=int(base_text, 16),
        irq=int(irq_text),
        grant_usage=grant == "1",
    )


def read_disk_device(xs: XenStore, domid: int, path: str, devid: int, backend_domid: int) -> XenstoreDevice:
    """Parse one backend/virtio_disk directory (Xen 4.17's virtio disk
    line): always virtio-blk, base in decimal, grants when the backend is
    not dom0."""

    def key(name: str) -> str:
        return _key(xs, path, name)

    spec = key("specification")
    if spec != "virtio":
        raise DiscoveryError(f"{path}/specification is {spec!r}: only specification=virtio disks are virtio devices")
    base_text = key("base")
    if _DEC.fullmatch(base_text):
        base = int(base_text)
    elif _HEX.fullmatch(base_text):
        base = int(base_text, 16)
    else:
        raise DiscoveryError(f"{path}/base is {base_text!r}, not an address (libxl 4.17 writes it in decimal)")
    irq_text = key("irq")
    if not _DEC.fullmatch(irq_text):
        raise DiscoveryError(f"{path}/irq is {irq_text!r}, not a decimal SPI number")
    return XenstoreDevice(
        domid=domid,
        devid=devid,
        path=path,
        type=f"virtio_disk {key('type')}",
        virtio_id=VIRTIO_BLK_ID,
        transport=key("transport"),
        base=base,
        irq=int(irq_text),
        grant_usage=backend_domid != 0,
        kind="virtio_disk",
    )


def find_devices(xs: XenStore, domid: int, backend_domid: int | None = None) -> list[XenstoreDevice]:
    """Every virtio device of ``domid`` whose backend is this domain (or
    ``backend_domid``): those of the generic virtio line, then those of the
    4.17 virtio disk line, each by devid."""
    if backend_domid is None:
        backend_domid = own_domid(xs)
    devices = []
    for kind in VIRTIO_KINDS:
        root = backend_root(backend_domid, domid, kind)
        found = []
        for name in xs.directory(root) or []:
            if not _DEC.fullmatch(name):
                log.warning("ignoring %s/%s: not a device number", root, name)
                continue
            path = f"{root}/{name}"
            if kind == "virtio":
                found.append(read_device(xs, domid, path, int(name)))
            else:
                found.append(read_disk_device(xs, domid, path, int(name), backend_domid))
        devices += sorted(found, key=lambda d: d.devid)
    return devices


def choose_device(
    devices: list[XenstoreDevice], device_type: DeviceType, devid: int | None, *, where: str, first: bool = False
) -> XenstoreDevice:
    """The device a daemon serves: ``devid`` if given, else the only one of
    the daemon's type (with ``first``, the first one: several daemons of one
    type take the entries in devid order)."""
    if not devices:
        raise DiscoveryError(
            f"xenstore lists no virtio device under {where}: give the guest one (virtio = "
            f'["type=virtio,device{device_type.virtio_id:x},transport=mmio"] in its xl config; on Xen 4.17 a '
            'disk line with "backendtype=standalone,specification=virtio"), or pass --mmio-base and --irq'
            "; with the 4.17 disk line start the bridge while `xl create -p` runs, once libxl has written "
            "the device"
        )
    if devid is not None:
        chosen = [d for d in devices if d.devid == devid]
        if not chosen:
            raise DiscoveryError(f"no virtio device {devid} under {where} (there are {[d.devid for d in devices]})")
    else:
        chosen = [d for d in devices if d.virtio_id in (device_type.virtio_id, None)]
        if not chosen:
            kinds = ", ".join(f"{d.devid}: {d.type}" for d in devices)
            raise DiscoveryError(
                f"no virtio-{device_type.name} device (virtio,device{device_type.virtio_id:x}) under {where}; "
                f"there are {kinds}"
            )
        if len(chosen) > 1 and not first:
            raise DiscoveryError(
                f"{len(chosen)} virtio devices under {where} could be virtio-{device_type.name} "
                f"({[d.devid for d in chosen]}): pick one with --devid"
            )
    device = chosen[0]
    if device.virtio_id is not None and device.virtio_id != device_type.virtio_id:
        names = {t.virtio_id: t.name for t in DEVICE_TYPES.values()}
        known = names.get(device.virtio_id, f"virtio id {device.virtio_id:#x}")
        raise DiscoveryError(
            f"{device.describe()} is a {known} device, but the daemon serves virtio-{device_type.name} (--device)"
        )
    if device.transport != "mmio":
        raise DiscoveryError(f"{device.describe()} uses transport {device.transport!r}; the bridge serves mmio only")
    return device


def discover(xs: XenStore, domid: int, device_type: DeviceType, devid: int | None = None) -> XenstoreDevice:
    backend = own_domid(xs)
    return choose_device(
        find_devices(xs, domid, backend), device_type, devid, where=describe_roots(backend, domid)
    )


def set_state(xs: XenStore, device: XenstoreDevice, state: XenbusState) -> None:
    xs.write(f"{device.path}/state", str(int(state)))


def mark_claimed(xs: XenStore, device: XenstoreDevice) -> None:
    """The bridge has taken the device and is setting it up: InitWait for a
    generic virtio device. A 4.17 virtio disk stays Initialising: xl takes
    InitWait as "ready", and unpauses a rebooted guest on it."""
    if device.kind == "virtio":
        set_state(xs, device, XenbusState.INIT_WAIT)


def mark_served(xs: XenStore, device: XenstoreDevice) -> None:
    """The window is served: Connected for a generic virtio device. For a
    4.17 virtio disk InitWait, and it stays there: libxl waits for exactly
    state 2 (InitWait), and would miss it if it read Connected instead."""
    set_state(xs, device, XenbusState.CONNECTED if device.kind == "virtio" else XenbusState.INIT_WAIT)


def close_backend(xs: XenStore, device: XenstoreDevice) -> None:
    """Say Closed, if the toolstack has not removed the device already."""
    try:
        if xs.read(f"{device.path}/state") is not None:
            set_state(xs, device, XenbusState.CLOSED)
    except XenStoreError as exc:
        log.debug("could not mark %s closed: %s", device.path, exc)


def gone_reason(xs: XenStore, device: XenstoreDevice) -> str | None:
    """Why the toolstack no longer wants this device served, or None."""
    if xs.directory(device.path) is None:
        return f"{device.path} was removed from xenstore"
    if (xs.read(f"{device.path}/online") or "1").strip() == "0":
        return f"{device.path}/online was set to 0"
    state = (xs.read(f"{device.path}/state") or "").strip()
    if state in (str(int(XenbusState.CLOSING)), str(int(XenbusState.CLOSED))):
        return f"the toolstack set {device.path}/state to {XenbusState(int(state)).name.title()}"
    return None


async def watch_until_gone(xs: XenStore, devices: XenstoreDevice | list[XenstoreDevice]) -> str:
    """Return (with the reason) once the toolstack removes one of the
    devices. One xenstore connection has one watch fd, so one task watches
    them all."""
    if isinstance(devices, XenstoreDevice):
        devices = [devices]
    tokens = [(d.path, f"xen-vhost-bridge/{d.domid}/{d.devid}") for d in devices]
    for path, token in tokens:
        xs.watch(path, token)
    try:
        while True:
            for device in devices:
                reason = gone_reason(xs, device)
                if reason is not None:
                    return reason
            await trio.lowlevel.wait_readable(xs.fileno())
            xs.read_watches()
    finally:
        for path, token in tokens:
            try:
                xs.unwatch(path, token)
            except XenStoreError:
                pass
