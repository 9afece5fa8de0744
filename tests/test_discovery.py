"""Finding the device in xenstore, on trees recorded the way xl/libxl (Arm)
write them: the generic virtio line (Xen 4.18+, backend/virtio) and Xen
4.17's virtio disk line (backend/virtio_disk, keys from libxl_disk.c). The
simulator's xenstore and the bridge's use of discovery end to end are
covered in test_e2e_blk.py; real Xen 4.17 in test_xen_e2e.py."""

from __future__ import annotations

import os

import pytest
import trio

from bridge.app import BridgeConfig, DeviceConfig, place_devices
from bridge.device_types import DEVICE_TYPES
from bridge.discovery import (
    DiscoveryError,
    close_backend,
    discover,
    find_devices,
    gone_reason,
    mark_claimed,
    mark_served,
    parse_virtio_type,
    set_state,
    watch_until_gone,
)
from xen.xenstore import XenbusState, XenStore

BLK = DEVICE_TYPES["blk"]


class RecordedStore(XenStore):
    """A flat {path: value} tree as `xenstore-ls -f` prints it, with the
    watch fd a real connection has (a pipe written on every change)."""

    def __init__(self, tree: dict[str, str], home: str = "/local/domain/0") -> None:
        self.tree = dict(tree)
        self.home = home
        self.writes: list[tuple[str, str]] = []
        self.watches: list[tuple[str, str]] = []
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._events: list[tuple[str, str]] = []

    def _abs(self, path: str) -> str:
        return path if path.startswith("/") else f"{self.home}/{path}"

    def _changed(self, path: str) -> None:
        for wpath, token in self.watches:
            if path == wpath or path.startswith(wpath + "/") or wpath.startswith(path + "/"):
                self._events.append((path, token))
                os.write(self._w, b"!")

    def read(self, path):
        return self.tree.get(self._abs(path))

    def write(self, path, value):
        path = self._abs(path)
        self.tree[path] = value
        self.writes.append((path, value))
        self._changed(path)

    def directory(self, path):
        path = self._abs(path).rstrip("/")
        if path not in self.tree and not any(p.startswith(path + "/") for p in self.tree):
            return None
        names = {p[len(path) + 1 :].split("/")[0] for p in self.tree if p.startswith(path + "/")}
        return sorted(names)

    def remove(self, path):
        path = self._abs(path)
        for p in [p for p in self.tree if p == path or p.startswith(path + "/")]:
            del self.tree[p]
        self._changed(path)

    def watch(self, path, token):
        self.watches.append((self._abs(path), token))
        self._events.append((self._abs(path), token))
        os.write(self._w, b"!")

    def unwatch(self, path, token):
        self.watches.remove((self._abs(path), token))

    def fileno(self):
        return self._r

    def read_watches(self):
        try:
            os.read(self._r, 4096)
        except BlockingIOError:
            pass
        events, self._events = self._events, []
        return events

    def close(self):
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass


def libxl_device(domid: int, devid: int, type_: str, *, backend: int = 0, grant: str = "0") -> dict[str, str]:
    """What libxl (4.18+) writes for `virtio = ["type=...,transport=mmio"]`."""
    bpath = f"/local/domain/{backend}/backend/virtio/{domid}/{devid}"
    fpath = f"/local/domain/{domid}/device/virtio/{devid}"
    return {
        f"{bpath}/frontend": fpath,
        f"{bpath}/frontend-id": str(domid),
        f"{bpath}/online": "1",
        f"{bpath}/state": "1",
        f"{bpath}/type": type_,
        f"{bpath}/transport": "mmio",
        f"{bpath}/base": hex(0x02000000 + 0x200 * devid),
        f"{bpath}/irq": str(33 + devid),
        f"{bpath}/grant_usage": grant,
        f"{fpath}/backend": bpath,
        f"{fpath}/backend-id": str(backend),
        f"{fpath}/state": "1",
    }


DOM0 = {"/local/domain/0/domid": "0", "/local/domain/0/name": "Domain-0"}


@pytest.fixture
def store():
    stores = []

    def make(*devices: dict[str, str], **kwargs) -> RecordedStore:
        tree = dict(DOM0)
        for d in devices:
            tree.update(d)
        s = RecordedStore(tree, **kwargs)
        stores.append(s)
        return s

    yield make
    for s in stores:
        s.close()


def test_the_virtio_compatible_names_the_device_id_in_hex():
    assert parse_virtio_type("virtio,device2") == 2
    assert parse_virtio_type("virtio,device1a") == 0x1A
    assert parse_virtio_type("virtio,device10") == 0x10
    assert parse_virtio_type("virtio,device") is None
    for bad in ("virtio,mmio", "device2", "virtio,device2x", ""):
        with pytest.raises(ValueError):
            parse_virtio_type(bad)


def test_one_blk_device_is_found_with_hex_base_and_decimal_irq(store):
    xs = store(libxl_device(3, 0, "virtio,device2"))
    dev = discover(xs, 3, BLK)
    assert (dev.devid, dev.base, dev.irq, dev.virtio_id) == (0, 0x02000000, 33, 2)
    assert dev.path == "/local/domain/0/backend/virtio/3/0"
    assert not dev.grant_usage


def test_the_device_of_the_daemons_type_is_picked_among_several(store):
    xs = store(
        libxl_device(3, 0, "virtio,device1a"),
        libxl_device(3, 1, "virtio,device2"),
        libxl_device(3, 2, "virtio,device10"),
    )
    dev = discover(xs, 3, BLK)
    assert (dev.devid, dev.base, dev.irq) == (1, 0x02000200, 34)


def test_two_blk_devices_need_devid(store):
    xs = store(libxl_device(3, 0, "virtio,device2"), libxl_device(3, 1, "virtio,device2"))
    with pytest.raises(DiscoveryError, match="--devid"):
        discover(xs, 3, BLK)
    assert discover(xs, 3, BLK, devid=1).base == 0x02000200


def test_devid_of_another_device_type_is_refused(store):
    xs = store(libxl_device(3, 0, "virtio,device1a"))
    with pytest.raises(DiscoveryError, match="virtio-blk"):
        discover(xs, 3, BLK, devid=0)
    with pytest.raises(DiscoveryError, match="no virtio-blk device"):
        discover(xs, 3, BLK)


def test_no_device_says_what_to_put_in_the_xl_config(store):
    xs = store()
    with pytest.raises(DiscoveryError, match=r'virtio = \["type=virtio,device2,transport=mmio"\].*--mmio-base'):
        discover(xs, 3, BLK)


def test_only_devices_of_this_backend_domain_are_seen(store):
    xs = store(libxl_device(3, 0, "virtio,device2", backend=2))
    with pytest.raises(DiscoveryError, match="/local/domain/0/backend/virtio/3"):
        discover(xs, 3, BLK)
    # Run in the driver domain 2, the bridge finds it.
    xs2 = store(libxl_device(3, 0, "virtio,device2", backend=2), {"/local/domain/2/domid": "2"},
                home="/local/domain/2")
    assert discover(xs2, 3, BLK).path == "/local/domain/2/backend/virtio/3/0"


@pytest.mark.parametrize(
    "key, value, complaint",
    [
        ("base", None, "base is missing"),
        ("irq", None, "irq is missing"),
        ("type", None, "type is missing"),
        ("transport", None, "transport is missing"),
        ("base", "33554432", "not a hex address"),
        ("base", "0xzz", "not a hex address"),
        ("irq", "0x21", "not a decimal SPI"),
        ("type", "virtio,mmio", "not a virtio compatible"),
        ("grant_usage", "yes", "not 0 or 1"),
        ("transport", "pci", "transport 'pci'"),
    ],
)
def test_a_missing_or_malformed_key_is_a_clear_error_naming_it(store, key, value, complaint):
    tree = libxl_device(3, 0, "virtio,device2")
    path = f"/local/domain/0/backend/virtio/3/0/{key}"
    if value is None:
        del tree[path]
    else:
        tree[path] = value
    with pytest.raises(DiscoveryError, match=complaint):
        discover(store(tree), 3, BLK)


def test_no_domid_key_means_no_working_xenstore(store):
    xs = store()
    del xs.tree["/local/domain/0/domid"]
    with pytest.raises(DiscoveryError, match="domid"):
        find_devices(xs, 3)


def test_grant_usage_is_read(store):
    xs = store(libxl_device(3, 0, "virtio,device2", grant="1"))
    assert discover(xs, 3, BLK).grant_usage


def test_backend_state_moves_through_initwait_connected_closed(store):
    xs = store(libxl_device(3, 0, "virtio,device2"))
    dev = discover(xs, 3, BLK)
    set_state(xs, dev, XenbusState.INIT_WAIT)
    set_state(xs, dev, XenbusState.CONNECTED)
    close_backend(xs, dev)
    assert [v for p, v in xs.writes if p == dev.path + "/state"] == ["2", "4", "6"]
    # A device the toolstack already removed is left removed.
    xs.remove(dev.path)
    close_backend(xs, dev)
    assert xs.read(dev.path + "/state") is None


@pytest.mark.parametrize(
    "change, reason",
    [
        (lambda xs, p: xs.remove(p), "removed"),
        (lambda xs, p: xs.remove("/local/domain/0/backend/virtio/3"), "removed"),
        (lambda xs, p: xs.write(p + "/online", "0"), "online"),
        (lambda xs, p: xs.write(p + "/state", "5"), "Closing"),
    ],
)
async def test_watch_returns_when_the_toolstack_takes_the_device_away(store, change, reason):
    xs = store(libxl_device(3, 0, "virtio,device2"))
    dev = discover(xs, 3, BLK)
    set_state(xs, dev, XenbusState.CONNECTED)
    result = []

    async def watcher():
        result.append(await watch_until_gone(xs, dev))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watcher)
        await trio.sleep(0.05)
        xs.write(dev.path + "/state", "4")  # our own writes do not stop it
        await trio.sleep(0.05)
        assert result == []
        change(xs, dev.path)
        with trio.fail_after(2):
            while not result:
                await trio.sleep(0.01)
    assert reason in result[0]
    assert xs.watches == []  # unwatched on the way out
    assert gone_reason(xs, dev) is not None


# --- several devices in one bridge -------------------------------------------

FS = DEVICE_TYPES["fs"]


def config(*devices: DeviceConfig) -> BridgeConfig:
    return BridgeConfig(domid=3, devices=devices)


def test_devices_of_one_type_claim_the_entries_in_devid_order(store):
    xs = store(libxl_device(3, 0, "virtio,device2"), libxl_device(3, 1, "virtio,device1a"),
               libxl_device(3, 2, "virtio,device2"))
    places = place_devices(config(DeviceConfig(BLK, "/a"), DeviceConfig(FS, "/b"), DeviceConfig(BLK, "/c")), xs)
    assert [(p.xenstore.devid, p.base, p.irq) for p in places] == [
        (0, 0x02000000, 33), (1, 0x02000200, 34), (2, 0x02000400, 35)]
    with pytest.raises(DiscoveryError, match="no virtio-blk device|no virtio device"):
        place_devices(config(DeviceConfig(BLK, "/a"), DeviceConfig(BLK, "/b"), DeviceConfig(BLK, "/c")), xs)


def test_a_devid_and_flags_mix_with_discovery(store):
    xs = store(libxl_device(3, 0, "virtio,device2"), libxl_device(3, 1, "virtio,device2"))
    places = place_devices(config(DeviceConfig(BLK, "/a", devid=1), DeviceConfig(BLK, "/b"),
                                  DeviceConfig(BLK, "/c", mmio_base=0x3000000, irq=50)), xs)
    assert [(p.base, p.irq) for p in places] == [(0x02000200, 34), (0x02000000, 33), (0x3000000, 50)]
    assert places[2].xenstore is None


def test_overlapping_windows_and_shared_irqs_are_refused(store):
    xs = store(libxl_device(3, 0, "virtio,device2"))
    with pytest.raises(DiscoveryError, match="overlaps"):
        place_devices(config(DeviceConfig(BLK, "/a"), DeviceConfig(BLK, "/b", mmio_base=0x02000100, irq=40)), xs)
    with pytest.raises(DiscoveryError, match="share irq 33"):
        place_devices(config(DeviceConfig(BLK, "/a"), DeviceConfig(BLK, "/b", mmio_base=0x3000000, irq=33)), xs)


# --- Xen 4.17's virtio disk line ----------------------------------------------

XVDA = 51712  # the devid of vdev=xvda


def libxl_disk(domid: int, devid: int = XVDA, *, backend: int = 0, index: int = 0,
               spec: str = "virtio") -> dict[str, str]:
    """What libxl 4.17 (libxl_disk.c) writes for
    `disk = ["format=raw,vdev=xvda,backendtype=standalone,specification=virtio,target=/x.img"]`:
    base in decimal, no grant_usage."""
    bpath = f"/local/domain/{backend}/backend/virtio_disk/{domid}/{devid}"
    fpath = f"/local/domain/{domid}/device/virtio_disk/{devid}"
    return {
        f"{bpath}/frontend": fpath,
        f"{bpath}/params": "/x.img",
        f"{bpath}/frontend-id": str(domid),
        f"{bpath}/online": "1",
        f"{bpath}/removable": "0",
        f"{bpath}/bootable": "1",
        f"{bpath}/state": "1",
        f"{bpath}/dev": "xvda",
        f"{bpath}/type": "standalone",
        f"{bpath}/mode": "w",
        f"{bpath}/device-type": "disk",
        f"{bpath}/discard-enable": "1",
        f"{bpath}/specification": spec,
        f"{bpath}/transport": "mmio",
        f"{bpath}/base": str(0x02000000 + 0x200 * index),
        f"{bpath}/irq": str(33 + index),
        f"{fpath}/backend": bpath,
        f"{fpath}/backend-id": str(backend),
        f"{fpath}/state": "1",
        f"{fpath}/virtual-device": str(devid),
        f"{fpath}/device-type": "disk",
        f"{fpath}/trusted": "1",
    }


def test_a_4_17_virtio_disk_is_found_as_virtio_blk_with_its_decimal_base(store):
    xs = store(libxl_disk(3))
    dev = discover(xs, 3, BLK)
    assert (dev.devid, dev.base, dev.irq, dev.virtio_id, dev.kind) == (XVDA, 0x02000000, 33, 2, "virtio_disk")
    assert dev.path == f"/local/domain/0/backend/virtio_disk/3/{XVDA}"
    assert not dev.grant_usage  # backend in dom0: libxl gives the guest no xen,grant-dma node


def test_a_4_17_virtio_disk_served_from_a_driver_domain_uses_grants(store):
    # libxl links the guest's virtio node to "xen,grant-dma" when the backend is not dom0.
    xs = store(libxl_disk(3, backend=2), {"/local/domain/2/domid": "2"}, home="/local/domain/2")
    assert discover(xs, 3, BLK).grant_usage


def test_a_4_17_virtio_disk_is_no_device_of_another_type(store):
    xs = store(libxl_disk(3))
    with pytest.raises(DiscoveryError, match="no virtio-fs device"):
        discover(xs, 3, FS)


def test_both_backend_directories_are_read(store):
    xs = store(libxl_device(3, 0, "virtio,device1a"), libxl_disk(3, index=1))
    assert [(d.kind, d.devid, d.base) for d in find_devices(xs, 3)] == [
        ("virtio", 0, 0x02000000), ("virtio_disk", XVDA, 0x02000200)]
    assert discover(xs, 3, BLK).kind == "virtio_disk"
    assert discover(xs, 3, FS).kind == "virtio"


@pytest.mark.parametrize(
    "key, value, complaint",
    [
        ("base", None, "base is missing"),
        ("irq", None, "irq is missing"),
        ("transport", None, "transport is missing"),
        ("specification", None, "specification is missing"),
        ("specification", "xen", "only specification=virtio"),
        ("base", "0x2000zz", "not an address"),
        ("base", "-1", "not an address"),
        ("irq", "0x21", "not a decimal SPI"),
        ("transport", "pci", "transport 'pci'"),
    ],
)
def test_a_malformed_4_17_virtio_disk_is_a_clear_error_naming_the_key(store, key, value, complaint):
    tree = libxl_disk(3)
    path = f"/local/domain/0/backend/virtio_disk/3/{XVDA}/{key}"
    if value is None:
        del tree[path]
    else:
        tree[path] = value
    with pytest.raises(DiscoveryError, match=complaint):
        discover(store(tree), 3, BLK)


def test_a_hex_base_is_read_too(store):
    tree = libxl_disk(3)
    tree[f"/local/domain/0/backend/virtio_disk/3/{XVDA}/base"] = "0x2000400"
    assert discover(store(tree), 3, BLK).base == 0x2000400


def test_no_device_names_both_directories_and_the_4_17_disk_line(store):
    with pytest.raises(DiscoveryError) as info:
        discover(store(), 3, BLK)
    text = str(info.value)
    assert "/local/domain/0/backend/virtio/3" in text and "/local/domain/0/backend/virtio_disk/3" in text
    assert "backendtype=standalone,specification=virtio" in text


def test_a_generic_device_goes_initwait_when_claimed_and_connected_when_served(store):
    xs = store(libxl_device(3, 0, "virtio,device2"))
    dev = discover(xs, 3, BLK)
    mark_claimed(xs, dev)
    assert xs.read(dev.path + "/state") == "2"
    mark_served(xs, dev)
    assert [v for p, v in xs.writes if p == dev.path + "/state"] == ["2", "4"]


def test_a_4_17_virtio_disk_says_initwait_only_once_served_and_stays_there(store):
    # xl create waits for exactly state 2 and unpauses a rebooted guest on it.
    xs = store(libxl_disk(3))
    dev = discover(xs, 3, BLK)
    mark_claimed(xs, dev)
    assert xs.read(dev.path + "/state") == "1"
    mark_served(xs, dev)
    assert [v for p, v in xs.writes if p == dev.path + "/state"] == ["2"]
    close_backend(xs, dev)
    assert xs.read(dev.path + "/state") == "6"


@pytest.mark.parametrize(
    "change, reason",
    [
        (lambda xs, p: xs.write(p + "/online", "0"), "online"),  # what xl destroy and a reboot do first
        (lambda xs, p: xs.remove(p), "removed"),
    ],
)
async def test_watch_stops_for_a_4_17_virtio_disk_taken_away(store, change, reason):
    xs = store(libxl_disk(3))
    dev = discover(xs, 3, BLK)
    mark_served(xs, dev)
    result = []

    async def watcher():
        result.append(await watch_until_gone(xs, dev))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watcher)
        await trio.sleep(0.05)
        assert result == []
        change(xs, dev.path)
        with trio.fail_after(2):
            while not result:
                await trio.sleep(0.01)
    assert reason in result[0]


def test_the_bridge_places_a_4_17_virtio_disk_from_xenstore(store):
    xs = store(libxl_disk(3))
    [place] = place_devices(config(DeviceConfig(BLK, "/a")), xs)
    assert (place.base, place.irq, place.xenstore.kind) == (0x02000000, 33, "virtio_disk")
