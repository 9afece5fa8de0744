"""The simulator's xenstore: the pure tree (paths, watches, xenstored's
rules), the toolstack's start-up contents, and the same through a real
simulator process with SimXenStore, including a second device model playing
``xl`` and the guest reading its device tree."""

from __future__ import annotations

import errno
import select
import time

import pytest
import trio

from xen.sim.client import SimHypervisor, SimXenStore, SimXenStoreError
from xen.sim.guest import SimGuest
from xen.sim.xenstore import (
    XENSTORE_ABS_PATH_MAX,
    VirtioSpecError,
    XenStoreTree,
    XsError,
    parse_virtio_spec,
    plan_virtio_devices,
    populate,
)
from xen.xenstore import XenStore


class Recorder:
    """A connection's watch events, as a list."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def __call__(self, path: str, token: str) -> None:
        self.events.append((path, token))

    def take(self) -> list[tuple[str, str]]:
        events, self.events = self.events, []
        return events


def connect(tree: XenStoreTree, domid: int = 0):
    rec = Recorder()
    return tree.connect(domid, rec), rec


def errno_of(excinfo) -> int:
    return excinfo.value.errno


# --- the tree ------------------------------------------------------------------


def test_write_creates_parents_with_empty_values():
    tree = XenStoreTree()
    tree.write("/a/b/c", "v")
    assert tree.read("/a/b/c") == "v"
    assert tree.read("/a/b") == "" and tree.read("/a") == ""
    assert tree.directory("/a") == ["b"]
    assert "a" in tree.directory("/")
    tree.write("/a/b", "mid")  # overwriting keeps the children
    assert tree.read("/a/b") == "mid" and tree.directory("/a/b") == ["c"]


def test_directory_lists_children_in_creation_order():
    tree = XenStoreTree()
    for name in ("zeta", "alpha", "mid"):
        tree.write(f"/d/{name}", "")
    assert tree.directory("/d") == ["zeta", "alpha", "mid"]
    assert tree.directory("/d/zeta") == []


def test_missing_nodes_are_enoent():
    tree = XenStoreTree()
    with pytest.raises(XsError) as exc:
        tree.read("/missing")
    assert errno_of(exc) == errno.ENOENT
    with pytest.raises(XsError) as exc:
        tree.directory("/missing/child")
    assert errno_of(exc) == errno.ENOENT


def test_rm_is_recursive_and_follows_xenstored_for_missing_nodes():
    tree = XenStoreTree()
    tree.write("/a/b/c", "1")
    tree.write("/a/b/d/e", "2")
    tree.write("/a/x", "3")
    tree.rm("/a/b")
    assert not tree.exists("/a/b") and not tree.exists("/a/b/d/e")
    assert tree.directory("/a") == ["x"]
    tree.rm("/a/b")  # a missing child of an existing node: fine
    with pytest.raises(XsError) as exc:
        tree.rm("/a/b/c")  # not even the parent exists
    assert errno_of(exc) == errno.ENOENT
    with pytest.raises(XsError) as exc:
        tree.rm("/")
    assert errno_of(exc) == errno.EINVAL


def test_relative_paths_resolve_under_the_callers_home():
    tree = XenStoreTree()
    tree.write("device/vbd/0/state", "1", domid=3)
    assert tree.read("/local/domain/3/device/vbd/0/state") == "1"
    assert tree.read("device/vbd/0/state", domid=3) == "1"
    conn, _ = connect(tree, domid=0)
    conn.write("name", "Domain-0")
    assert tree.read("/local/domain/0/name") == "Domain-0"
    assert conn.directory("/local/domain") == ["3", "0"]


@pytest.mark.parametrize(
    "path",
    [
        "",
        "/a/",
        "a/",
        "/a//b",
        "//",
        "/a b",
        "/a.b",
        "/ä",
        "@introduceDomain",  # special names are watch-only
        "dir/@x/../y",
        "/" + "x" * XENSTORE_ABS_PATH_MAX,
        "x" * (XENSTORE_ABS_PATH_MAX - len("/local/domain/0/") + 1),
    ],
)
def test_bad_paths_are_einval(path):
    tree = XenStoreTree()
    with pytest.raises(XsError) as exc:
        tree.write(path, "v")
    assert errno_of(exc) == errno.EINVAL
    with pytest.raises(XsError) as exc:
        tree.read(path)
    assert errno_of(exc) == errno.EINVAL


def test_path_length_limit_is_on_the_absolute_path():
    tree = XenStoreTree()
    longest = "/" + "x" * (XENSTORE_ABS_PATH_MAX - 1)
    tree.write(longest, "")
    assert tree.read(longest) == ""
    relative = "y" * (XENSTORE_ABS_PATH_MAX - len("/local/domain/0/"))
    tree.write(relative, "")
    assert tree.exists("/local/domain/0/" + relative)
    assert tree.read("/") == ""  # the root is a valid path


def test_oversized_writes_are_e2big():
    tree = XenStoreTree()
    tree.write("/v", "x" * (4096 - len("/v") - 1))
    with pytest.raises(XsError) as exc:
        tree.write("/v", "x" * (4096 - len("/v")))
    assert errno_of(exc) == errno.E2BIG


def test_a_watch_fires_once_at_registration():
    tree = XenStoreTree()
    conn, rec = connect(tree)
    conn.watch("/not/there/yet", "t1")
    assert rec.take() == [("/not/there/yet", "t1")]
    with pytest.raises(XsError) as exc:
        conn.watch("/not/there/yet", "t1")
    assert errno_of(exc) == errno.EEXIST
    conn.watch("/not/there/yet", "t2")  # another token is another watch
    assert rec.take() == [("/not/there/yet", "t2")]


def test_a_watch_fires_for_writes_at_and_below_its_path_only():
    tree = XenStoreTree()
    conn, rec = connect(tree)
    conn.watch("/backend/virtio", "be")
    rec.take()
    tree.write("/backend/virtio/1/0/state", "4")
    tree.write("/backend/virtio", "")
    tree.write("/backend/virtio2", "")  # a sibling whose name shares the prefix
    tree.write("/backend", "")  # an ancestor
    tree.write("/elsewhere", "")
    assert rec.take() == [("/backend/virtio/1/0/state", "be"), ("/backend/virtio", "be")]


def test_removals_fire_watches_at_above_and_below():
    tree = XenStoreTree()
    tree.write("/be/1/0/state", "4")
    tree.write("/be/1/0/type", "virtio,device2")
    conn, rec = connect(tree)
    conn.watch("/be", "above")
    conn.watch("/be/1/0", "at")
    conn.watch("/be/1/0/state", "below")
    conn.watch("/be/1/0/never-written", "absent")
    conn.watch("/other", "other")
    rec.take()
    tree.rm("/be/1")
    assert sorted(rec.take()) == sorted(
        [
            ("/be/1", "above"),  # the removal happened below this watch
            ("/be/1/0", "at"),  # an ancestor took the watched node with it
            ("/be/1/0/state", "below"),
        ]
    )
    tree.rm("/be/1")  # nothing left to remove: nothing fires
    assert rec.take() == []


def test_watches_belong_to_their_connection():
    tree = XenStoreTree()
    a, rec_a = connect(tree)
    b, rec_b = connect(tree)
    a.watch("/x", "tok")
    b.watch("/x", "tok")  # same path and token, other connection: allowed
    rec_a.take(), rec_b.take()
    with pytest.raises(XsError) as exc:
        b.unwatch("/y", "tok")
    assert errno_of(exc) == errno.ENOENT
    b.unwatch("/x", "tok")
    tree.write("/x", "1")
    assert rec_a.take() == [("/x", "tok")] and rec_b.take() == []
    a.close()
    a.close()
    tree.write("/x", "2")
    assert rec_a.take() == [] and tree.watches() == []
    with pytest.raises(XsError) as exc:
        a.read("/x")
    assert errno_of(exc) == errno.EBADF


def test_relative_watches_report_relative_paths():
    tree = XenStoreTree()
    conn, rec = connect(tree, domid=0)
    conn.watch("backend/virtio", "be")
    assert rec.take() == [("backend/virtio", "be")]
    tree.write("/local/domain/0/backend/virtio/1/0/state", "2")
    assert rec.take() == [("backend/virtio/1/0/state", "be")]
    conn.unwatch("/local/domain/0/backend/virtio", "be")  # the same watch, named absolutely
    assert tree.watches() == []


def test_special_watches_fire_only_at_registration():
    tree = XenStoreTree()
    conn, rec = connect(tree)
    conn.watch("@releaseDomain", "rel")
    assert rec.take() == [("@releaseDomain", "rel")]
    tree.write("/local/domain/1/name", "x")
    tree.rm("/local/domain/1")
    assert rec.take() == []
    with pytest.raises(XsError) as exc:
        conn.watch("@nonsense", "t")
    assert errno_of(exc) == errno.EINVAL


def test_a_watch_on_the_root_sees_everything():
    tree = XenStoreTree()
    conn, rec = connect(tree)
    conn.watch("/", "all")
    assert rec.take() == [("/", "all")]
    tree.write("/a/b", "")
    tree.rm("/a")
    assert rec.take() == [("/a/b", "all"), ("/a", "all")]


# --- the toolstack -----------------------------------------------------------------


def test_virtio_specs_in_xl_syntax_and_short_forms():
    spec = parse_virtio_spec("type=virtio,device2")
    assert (spec.type, spec.virtio_id, spec.backend_domid, spec.grant_usage) == ("virtio,device2", 2, 0, None)
    spec = parse_virtio_spec("type=virtio,device1a,transport=mmio,grant_usage=1,backend=0")
    assert (spec.type, spec.virtio_id, spec.grant_usage) == ("virtio,device1a", 0x1A, True)
    assert parse_virtio_spec("backend=2, type=virtio,device10").backend_domid == 2
    assert [parse_virtio_spec(s).type for s in ("blk", "gpu", "fs", "net")] == [
        "virtio,device2",
        "virtio,device10",
        "virtio,device1a",
        "virtio,device1",
    ]
    assert parse_virtio_spec("fs,backend=3").backend_domid == 3
    for bad in ("", "blk,bogus=1", "type=virtio,deviceXY", "type=vhost", "transport=mmio", "blk,transport=pci", "blk,backend=me"):
        with pytest.raises(VirtioSpecError):
            parse_virtio_spec(bad)


def test_libxl_places_devices_and_defaults_grant_usage():
    devices = plan_virtio_devices(parse_virtio_spec(s) for s in ("blk", "fs,backend=2", "net,backend=2,grant_usage=0"))
    assert [(d.devid, d.base, d.irq) for d in devices] == [(0, 0x2000000, 33), (1, 0x2000200, 34), (2, 0x2000400, 35)]
    assert [d.grant_usage for d in devices] == [False, True, False]
    assert len(plan_virtio_devices([parse_virtio_spec("blk")] * 11)) == 11
    with pytest.raises(VirtioSpecError):
        plan_virtio_devices([parse_virtio_spec("blk")] * 12)  # SPIs 33..43 only


def test_populate_writes_the_libxl_keys():
    tree = XenStoreTree()
    populate(tree, 5, 256, plan_virtio_devices([parse_virtio_spec("fs,backend=2")]))
    assert tree.read("/local/domain/5/memory/target") == str(256 * 1024)
    be = "/local/domain/2/backend/virtio/5/0"
    assert tree.read(f"{be}/frontend") == "/local/domain/5/device/virtio/0"
    assert tree.read(f"{be}/grant_usage") == "1"
    assert tree.read("/local/domain/5/device/virtio/0/backend") == be
    assert tree.read("/local/domain/5/device/virtio/0/backend-id") == "2"


# --- through the simulator ---------------------------------------------------------



def dump(xs: XenStore, path: str) -> dict[str, str]:
    """Every node below ``path`` (relative names) with its value."""
    out = {}

    def walk(rel: str) -> None:
        for name in xs.directory(f"{path}/{rel}" if rel else path) or []:
            child = f"{rel}/{name}" if rel else name
            out[child] = xs.read(f"{path}/{child}")
            walk(child)

    walk("")
    return out


def readable(fd_owner, timeout: float = 0.0) -> bool:
    return bool(select.select([fd_owner], [], [], timeout)[0])


def backend_keys(devid: int, base: str, irq: str, type_: str) -> dict[str, str]:
    be = f"backend/virtio/1/{devid}"
    return {
        be: "",
        f"{be}/frontend": f"/local/domain/1/device/virtio/{devid}",
        f"{be}/frontend-id": "1",
        f"{be}/online": "1",
        f"{be}/state": "1",
        f"{be}/irq": irq,
        f"{be}/base": base,
        f"{be}/type": type_,
        f"{be}/transport": "mmio",
        f"{be}/grant_usage": "0",
    }


def test_the_start_up_tree_is_what_libxl_writes(start_sim, connect):
    sim = start_sim(ram_mib=128, extra_args=["--virtio", "type=virtio,device2", "--virtio", "fs"])
    with connect(sim).xenstore() as xs:
        assert isinstance(xs, SimXenStore)
        assert dump(xs, "/local/domain/0") == {
            "domid": "0",
            "name": "Domain-0",
            "backend": "",
            "backend/virtio": "",
            "backend/virtio/1": "",
            **backend_keys(0, "0x2000000", "33", "virtio,device2"),
            **backend_keys(1, "0x2000200", "34", "virtio,device1a"),
        }
        assert dump(xs, "/local/domain/1") == {
            "domid": "1",
            "name": "guest1",
            "memory": "",
            "memory/static-max": "131072",
            "memory/target": "131072",
            "device": "",
            "device/virtio": "",
            "device/virtio/0": "",
            "device/virtio/0/backend": "/local/domain/0/backend/virtio/1/0",
            "device/virtio/0/backend-id": "0",
            "device/virtio/0/state": "1",
            "device/virtio/1": "",
            "device/virtio/1/backend": "/local/domain/0/backend/virtio/1/1",
            "device/virtio/1/backend-id": "0",
            "device/virtio/1/state": "1",
        }
        assert sorted(xs.directory("/local/domain")) == ["0", "1"]
        assert xs.read("backend/virtio/1/1/type") == "virtio,device1a"  # relative to dom0's home


def test_read_write_directory_remove(start_sim, connect):
    sim = start_sim()
    hv = connect(sim)
    with hv.xenstore() as xs:
        assert xs.read("/local/domain/1/nothing") is None
        assert xs.directory("/local/domain/1/nothing") is None
        xs.write("/local/domain/0/backend/virtio/1/0/state", "2")
        assert xs.read("backend/virtio/1/0/state") == "2"
        assert xs.directory("/local/domain/0/backend/virtio/1") == ["0"]
        xs.remove("/local/domain/0/backend")
        assert xs.read("/local/domain/0/backend/virtio/1/0/state") is None
        xs.remove("/local/domain/0/backend/virtio")  # already gone: no error
        for bad in ("", "/trailing/", "/a//b", "/sp ace"):
            with pytest.raises(SimXenStoreError) as exc:
                xs.write(bad, "v")
            assert exc.value.errno == errno.EINVAL
        with pytest.raises(SimXenStoreError) as exc:
            xs.read("/" + "x" * XENSTORE_ABS_PATH_MAX)
        assert exc.value.errno == errno.EINVAL
    with pytest.raises(SimXenStoreError):
        xs.read("/local/domain/1/name")  # closed


def test_watch_events_arrive_on_the_fd(start_sim, connect):
    sim = start_sim(extra_args=["--virtio", "blk"])
    bridge = connect(sim).xenstore()
    toolstack = connect(sim).xenstore()  # a second device model plays xl
    assert not readable(bridge) and bridge.read_watches() == []
    bridge.watch("backend/virtio", "be")
    assert readable(bridge)  # fired at registration, before the reply
    assert bridge.read_watches() == [("backend/virtio", "be")]
    assert bridge.read_watches() == []
    toolstack.write("/local/domain/0/backend/virtio/1/0/state", "4")
    assert readable(bridge, 5.0)
    assert bridge.read_watches() == [("backend/virtio/1/0/state", "be")]
    toolstack.remove("/local/domain/0/backend/virtio/1/0")  # xl device removal
    assert readable(bridge, 5.0)
    assert bridge.read_watches() == [("backend/virtio/1/0", "be")]
    bridge.watch("/local/domain/1/device/virtio/0/state", "fe")
    bridge.unwatch("backend/virtio", "be")
    with pytest.raises(SimXenStoreError) as exc:
        bridge.unwatch("backend/virtio", "be")
    assert exc.value.errno == errno.ENOENT
    toolstack.write("/local/domain/0/backend/virtio/1/0/state", "1")
    toolstack.write("/local/domain/1/device/virtio/0/state", "4")
    assert bridge.read_watches() == [
        ("/local/domain/1/device/virtio/0/state", "fe"),
        ("/local/domain/1/device/virtio/0/state", "fe"),
    ]


def wait_for_watches(hv: SimHypervisor, count: int) -> None:
    """The simulator notices a closed handle when it polls its fd next."""
    deadline = time.monotonic() + 5
    while hv.stats()["xs_watches"] != count:
        assert time.monotonic() < deadline, hv.stats()
        time.sleep(0.01)


def test_watches_die_with_the_handle(start_sim, connect):
    sim = start_sim()
    observer = connect(sim)
    writer = observer.xenstore()
    hv = connect(sim)
    first = hv.xenstore()
    first.watch("/local/domain/1", "w")
    first.watch("/local/domain/0", "w")
    assert observer.stats()["xs_watches"] == 2
    first.close()
    first.close()
    wait_for_watches(observer, 0)
    second = hv.xenstore()
    second.watch("/local/domain/1", "w")
    assert second.read_watches() == [("/local/domain/1", "w")]
    writer.write("/local/domain/1/name", "renamed")
    assert readable(second, 5.0)
    assert second.read_watches() == [("/local/domain/1/name", "w")]
    hv.close()  # closes the connection: its handles and their watches go
    wait_for_watches(observer, 0)
    writer.write("/local/domain/1/name", "again")
    assert writer.read("/local/domain/1/name") == "again"


def test_bad_virtio_specs_stop_the_simulator(tmp_path):
    from xen.sim.launch import SimulatorError, start_simulator

    for spec in ("type=virtio,deviceZZ", "blk,backend=1"):
        with pytest.raises(SimulatorError, match="--virtio"):
            start_simulator(str(tmp_path / "sim.sock"), extra_args=["--virtio", spec])


async def test_the_guest_reads_its_device_tree(start_sim):
    sim = start_sim(extra_args=["--virtio", "type=virtio,device2", "--virtio", "fs,backend=2"])
    async with SimGuest.open(sim.control_path) as guest:
        with trio.fail_after(5):
            devices = await guest.devices()
    assert [d.as_dict() for d in devices] == [
        {"devid": 0, "type": "virtio,device2", "virtio_id": 2, "base": 0x2000000, "irq": 33, "grant_usage": False, "backend_domid": 0},
        {"devid": 1, "type": "virtio,device1a", "virtio_id": 0x1A, "base": 0x2000200, "irq": 34, "grant_usage": True, "backend_domid": 2},
    ]
    sim2 = start_sim()
    async with SimGuest.open(sim2.control_path) as guest:
        assert await guest.devices() == []
