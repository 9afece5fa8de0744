"""xen/real.py and xen/real_xenstore.py without a Xen hypervisor.

This machine has no /dev/xen, so nothing here calls Xen. What can be tested:
the front door (one clear line when Xen is absent, nothing loaded, also
through the command line), the opening sequence up to the libraries' own
failure, the Arm RAM-bank arithmetic (against arch-arm.h), and every method's
own logic against stand-in library objects that behave like the Xen
libraries (cdata in, cdata out, errno), with the real cffi FFI.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import shutil
import struct
import subprocess
import sys

import pytest

from xen import abi, real, xen_libs
from xen.hypervisor import GuestMemoryFault, HypervisorError, HypervisorUnavailable, IoreqPages
from xen.real import RealXen
from xen.xenstore import XenStoreError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 1 << 30
MiB = 1 << 20

xen_here = real.xen_absent_reason() is None
needs_no_xen = pytest.mark.skipif(xen_here, reason="this machine has /dev/xen: the no-Xen behaviour cannot be seen")


# --- the front door ----------------------------------------------------------


@needs_no_xen
def test_open_without_xen_is_one_line_naming_privcmd():
    with pytest.raises(HypervisorUnavailable) as info:
        RealXen.open(1)
    message = str(info.value)
    assert "/dev/xen/privcmd" in message
    assert "\n" not in message


def test_absent_reason_names_what_is_missing(tmp_path):
    reason = real.xen_absent_reason(str(tmp_path))
    assert f"{tmp_path}/privcmd" in reason and f"{tmp_path}/evtchn" in reason
    assert "--xen-sim" in reason
    (tmp_path / "privcmd").touch()
    reason = real.xen_absent_reason(str(tmp_path))
    assert f"{tmp_path}/evtchn" in reason and f"{tmp_path}/privcmd" not in reason
    (tmp_path / "evtchn").touch()
    assert real.xen_absent_reason(str(tmp_path)) is None
    assert "missing" in real.xen_absent_reason(str(tmp_path / "nowhere"))


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30)


def test_importing_xen_real_does_not_import_cffi():
    code = (
        "import sys, xen.real, xen.privcmd, xen.real_xenstore\n"
        "bad = [m for m in ('cffi', '_cffi_backend') if m in sys.modules]\n"
        "sys.exit(repr(bad) if bad else 0)\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr


@needs_no_xen
def test_open_without_xen_loads_nothing():
    code = (
        "import sys\n"
        "from xen.real import RealXen\n"
        "from xen.hypervisor import HypervisorUnavailable\n"
        "try:\n    RealXen.open(1)\nexcept HypervisorUnavailable:\n    pass\n"
        "sys.exit('cffi loaded' if '_cffi_backend' in sys.modules else 0)\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr


@needs_no_xen
def test_cli_without_xen_exits_at_once_with_one_line(tmp_path):
    # No wall-clock assertion (this machine is noisy): the path has no wait,
    # retry or daemon dial before the check, and a hang would hit the timeout.
    # The socket path does not exist (a fixed one like /tmp/x may, as anything).
    result = subprocess.run(
        [sys.executable, "-m", "bridge.cli", "--domid", "1", "--socket", str(tmp_path / "absent.sock")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "/dev/xen/privcmd" in lines[0]
    assert "Traceback" not in result.stderr


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@needs_no_xen
def test_open_with_device_nodes_but_no_hypervisor_reaches_the_libraries(tmp_path):
    """Past the presence check (a fake /dev/xen), the libraries load and
    their open fails with errno text and a hint; nothing stays open."""
    (tmp_path / "privcmd").touch()
    (tmp_path / "evtchn").touch()
    before = _fd_count()
    with pytest.raises(HypervisorUnavailable) as info:
        RealXen.open(1, dev_dir=str(tmp_path))
    message = str(info.value)
    assert "xendevicemodel_open" in message and "ENOENT" in message
    assert "dom0 or a driver domain" in message
    assert "\n" not in message
    assert _fd_count() == before


def test_open_with_a_missing_library_names_it_and_its_package(tmp_path, monkeypatch):
    (tmp_path / "privcmd").touch()
    (tmp_path / "evtchn").touch()
    spec = xen_libs.LIBRARIES["xenforeignmemory"]
    monkeypatch.setitem(
        xen_libs.LIBRARIES,
        "xenforeignmemory",
        xen_libs.XenLibrary(spec.name, "libxenforeignmemory-gone.so.1", spec.package, spec.header, spec.cdef),
    )
    monkeypatch.setattr(xen_libs, "_loaded", {})
    with pytest.raises(HypervisorUnavailable) as info:
        RealXen.open(1, dev_dir=str(tmp_path))
    assert "libxenforeignmemory-gone.so.1" in str(info.value)
    assert "libxenforeignmemory1" in str(info.value)


def test_open_refuses_a_reserved_domid(tmp_path):
    (tmp_path / "privcmd").touch()
    (tmp_path / "evtchn").touch()
    with pytest.raises(HypervisorError, match="domid"):
        RealXen.open(0x7FF0, dev_dir=str(tmp_path))


# --- guest RAM on Arm ------------------------------------------------------------


def test_arm_banks_small_guest_fits_bank_0():
    assert real.arm_guest_ram_banks(512 * MiB) == [(0x40000000, 512 * MiB)]


def test_arm_banks_exactly_3_gib_is_one_bank():
    assert real.arm_guest_ram_banks(3 * GiB) == [(0x40000000, 3 * GiB)]


def test_arm_banks_4_gib_spills_into_bank_1():
    assert real.arm_guest_ram_banks(4 * GiB) == [(0x40000000, 3 * GiB), (0x200000000, 1 * GiB)]


def test_arm_banks_refuse_impossible_sizes():
    for bad in (0, -4096, (3 + 1016) * GiB + 4096):
        with pytest.raises(ValueError):
            real.arm_guest_ram_banks(bad)
    assert real.arm_guest_ram_banks((3 + 1016) * GiB)[-1] == (0x200000000, 1016 * GiB)


def test_static_max_is_kib():
    assert real.parse_static_max("524288") == 512 * MiB
    assert real.parse_static_max(" 4194304\n") == 4 * GiB
    for bad in (None, "", "0", "-5", "12k", "0x100", "lots"):
        with pytest.raises(ValueError):
            real.parse_static_max(bad)


def test_bank_constants_match_arch_arm_h(tmp_path):
    cc = shutil.which("gcc") or shutil.which("cc")
    header = "/usr/include/xen/arch-arm.h"
    if cc is None or not os.path.exists(header):
        pytest.skip("needs gcc and xen/arch-arm.h (scripts/setup installs gcc and libxen-dev)")
    checks = {
        "GUEST_RAM0_BASE": real.GUEST_RAM0_BASE,
        "GUEST_RAM0_SIZE": real.GUEST_RAM0_SIZE,
        "GUEST_RAM1_BASE": real.GUEST_RAM1_BASE,
        "GUEST_RAM1_SIZE": real.GUEST_RAM1_SIZE,
    }
    src = tmp_path / "banks.c"
    src.write_text(
        "#define __XEN_TOOLS__ 1\n#define xen_mk_ullong(x) x##ULL\n#include <stdint.h>\n#include <xen/arch-arm.h>\n"
        + "".join(f'_Static_assert({k} == {v:#x}ULL, "{k}");\n' for k, v in checks.items())
    )
    result = subprocess.run([cc, "-fsyntax-only", str(src)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_host_arch():
    assert real.host_arch("aarch64") == "arm"
    assert real.host_arch("armv7l") == "arm"
    assert real.host_arch("x86_64") == "x86"


# --- the methods, against stand-ins for the libraries --------------------------


def _addr(buf) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


class FakeLibs:
    """Behaves like libxendevicemodel, libxenforeignmemory, libxenevtchn
    and libxengnttab for one domain: cdata arguments, -1/NULL and errno on
    failure. Records the calls."""

    def __init__(self, ffi, *, vcpus=2, bad_gfns=(), evtchn_fd=-1):
        self.ffi = ffi
        self.calls: list[tuple] = []
        self.vcpus = vcpus
        self.bad_gfns = set(bad_gfns)
        self.evtchn_fd = evtchn_fd
        self.memory: list[mmap.mmap] = []
        self.resources: dict[int, tuple[int, int]] = {}
        self.fail: dict[str, int] = {}  # function name -> errno to fail with
        self.next_server = 0

    def _failing(self, name):
        err = self.fail.get(name)
        if err is not None:
            self.ffi.errno = err
        return err is not None

    def _handle(self, kind, value):
        return self.ffi.cast(f"{kind} *", value)

    # libxendevicemodel
    def xendevicemodel_nr_vcpus(self, dmod, domid, vcpus):
        self.calls.append(("nr_vcpus", domid))
        if self._failing("nr_vcpus"):
            return -1
        vcpus[0] = self.vcpus
        return 0

    def xendevicemodel_create_ioreq_server(self, dmod, domid, handle_bufioreq, id):
        self.calls.append(("create", domid, handle_bufioreq))
        if self._failing("create"):
            return -1
        id[0] = self.next_server
        self.next_server += 1
        return 0

    def xendevicemodel_get_ioreq_server_info(self, dmod, domid, id, ioreq_gfn, bufioreq_gfn, port):
        assert ioreq_gfn == self.ffi.NULL and bufioreq_gfn == self.ffi.NULL
        port[0] = 7
        return 0

    def xendevicemodel_set_ioreq_server_state(self, dmod, domid, id, enabled):
        self.calls.append(("state", domid, id, enabled))
        return 0

    def xendevicemodel_map_io_range_to_ioreq_server(self, dmod, domid, id, is_mmio, start, end):
        self.calls.append(("map_range", domid, id, is_mmio, start, end))
        return 0

    def xendevicemodel_unmap_io_range_from_ioreq_server(self, dmod, domid, id, is_mmio, start, end):
        self.calls.append(("unmap_range", domid, id, is_mmio, start, end))
        return 0

    def xendevicemodel_destroy_ioreq_server(self, dmod, domid, id):
        self.calls.append(("destroy", domid, id))
        return 0

    def xendevicemodel_set_irq_level(self, dmod, domid, irq, level):
        self.calls.append(("irq", domid, irq, level))
        if self._failing("irq"):
            return -1
        return 0

    def xendevicemodel_close(self, dmod):
        self.calls.append(("dm_close",))
        return 0

    # libxenforeignmemory
    def _memory(self, size):
        m = mmap.mmap(-1, size)
        self.memory.append(m)
        return m

    def xenforeignmemory_map_resource(self, fmem, domid, type, id, frame, nr_frames, paddr, prot, flags):
        self.calls.append(("map_resource", domid, type, id, frame, nr_frames, prot))
        if self._failing("map_resource"):
            return self.ffi.NULL
        m = self._memory(nr_frames * 4096)
        m[0:4] = struct.pack("<I", 0xF00D0000 + frame)
        paddr[0] = self.ffi.cast("void *", _addr(m))
        handle = len(self.resources) + 1
        self.resources[handle] = (id, frame)
        return self._handle("xenforeignmemory_resource_handle", handle)

    def xenforeignmemory_unmap_resource(self, fmem, fres):
        self.calls.append(("unmap_resource", self.resources[int(self.ffi.cast("uintptr_t", fres))]))
        return 0

    def xenforeignmemory_map(self, fmem, dom, prot, pages, arr, err):
        gfns = [arr[i] for i in range(pages)]
        self.calls.append(("map", dom, gfns, prot))
        if self._failing("map"):
            return self.ffi.NULL
        for i, gfn in enumerate(gfns):
            err[i] = errno.EFAULT if gfn in self.bad_gfns else 0
        m = self._memory(pages * 4096)
        for i, gfn in enumerate(gfns):
            m[i * 4096 : i * 4096 + 8] = struct.pack("<Q", gfn)
        return self.ffi.cast("void *", _addr(m))

    def xenforeignmemory_unmap(self, fmem, addr, pages):
        self.calls.append(("unmap", pages))
        return 0

    def xenforeignmemory_close(self, fmem):
        self.calls.append(("fmem_close",))
        return 0

    # libxenevtchn
    def xenevtchn_open(self, logger, flags):
        self.calls.append(("evtchn_open",))
        if self._failing("evtchn_open"):
            return self.ffi.NULL
        return self._handle("xenevtchn_handle", 0x100)

    def xenevtchn_fd(self, xce):
        return self.evtchn_fd

    def xenevtchn_bind_interdomain(self, xce, domid, remote_port):
        self.calls.append(("bind", domid, remote_port))
        if self._failing("bind"):
            return -1
        return 64 + remote_port

    def xenevtchn_unbind(self, xce, port):
        self.calls.append(("unbind", port))
        return 0

    def xenevtchn_unmask(self, xce, port):
        self.calls.append(("unmask", port))
        return 0

    def xenevtchn_notify(self, xce, port):
        self.calls.append(("notify", port))
        return 0

    def xenevtchn_close(self, xce):
        self.calls.append(("evtchn_close",))
        return 0

    # libxengnttab
    def xengnttab_open(self, logger, flags):
        self.calls.append(("gnttab_open",))
        return self._handle("xengnttab_handle", 0x200)

    def xengnttab_map_domain_grant_refs(self, xgt, count, domid, refs, prot):
        got = [refs[i] for i in range(count)]
        self.calls.append(("map_grants", domid, got, prot))
        if any(r >= 1000 for r in got):
            self.ffi.errno = errno.EINVAL
            return self.ffi.NULL
        return self.ffi.cast("void *", _addr(self._memory(count * 4096)))

    def xengnttab_unmap(self, xgt, addr, count):
        self.calls.append(("unmap_grants", count))
        return 0

    def xengnttab_close(self, xgt):
        self.calls.append(("gnttab_close",))
        return 0


class FakeStore:
    def __init__(self, values):
        self.values = values
        self.closed = False

    def read(self, path):
        value = self.values.get(path)
        if isinstance(value, Exception):
            raise value
        return value

    def close(self):
        self.closed = True


@pytest.fixture
def fake(tmp_path, monkeypatch):
    ffi = xen_libs.ffi()
    r, w = os.pipe()
    libs = FakeLibs(ffi, evtchn_fd=r)
    monkeypatch.setattr(xen_libs, "load", lambda name: libs)
    privcmd_path = tmp_path / "privcmd"
    privcmd_path.touch()
    from xen.privcmd import Privcmd

    hv = RealXen(
        5,
        ffi=ffi,
        libs={"xendevicemodel": libs, "xenforeignmemory": libs, "xenevtchn": libs},
        dmod=ffi.cast("xendevicemodel_handle *", 1),
        fmem=ffi.cast("xenforeignmemory_handle *", 2),
        privcmd=Privcmd.open(str(privcmd_path)),
        arch="arm",
    )
    yield hv, libs, w
    hv.close()
    os.close(w)
    os.close(r)


def test_dm_ops_go_to_the_library(fake):
    hv, libs, _ = fake
    assert hv.nr_vcpus() == 2
    sid = hv.create_ioreq_server()
    hv.set_ioreq_server_state(sid, True)
    hv.map_mmio_range(sid, 0x02000000, 0x020001FF)
    hv.set_irq_level(33, 1)
    hv.unmap_mmio_range(sid, 0x02000000, 0x020001FF)
    hv.set_ioreq_server_state(sid, False)
    hv.destroy_ioreq_server(sid)
    assert libs.calls == [
        ("nr_vcpus", 5),
        ("create", 5, abi.HVM_IOREQSRV_BUFIOREQ_OFF),
        ("state", 5, 0, 1),
        ("map_range", 5, 0, 1, 0x02000000, 0x020001FF),
        ("irq", 5, 33, 1),
        ("unmap_range", 5, 0, 1, 0x02000000, 0x020001FF),
        ("state", 5, 0, 0),
        ("destroy", 5, 0),
    ]


def test_a_failing_dm_op_names_the_op_and_errno(fake):
    hv, libs, _ = fake
    libs.fail["irq"] = errno.EOPNOTSUPP
    with pytest.raises(HypervisorError, match=r"set_irq_level\(40, 1\).*EOPNOTSUPP") as info:
        hv.set_irq_level(40, 1)
    assert info.value.errno == errno.EOPNOTSUPP
    libs.fail["nr_vcpus"] = errno.ESRCH
    with pytest.raises(HypervisorError, match="domain 5.*ESRCH"):
        hv.nr_vcpus()


def test_buffered_servers_are_refused_on_arm_and_map_two_pages_on_x86(fake):
    hv, libs, _ = fake
    with pytest.raises(HypervisorError, match="Arm"):
        hv.create_ioreq_server(buffered=True)
    assert libs.calls == []
    hv.arch = "x86"
    sid = hv.create_ioreq_server(buffered=True)
    assert libs.calls[-1] == ("create", 5, abi.HVM_IOREQSRV_BUFIOREQ_ATOMIC)
    pages = hv.map_ioreq_pages(sid)
    assert pages.buffered is not None
    assert struct.unpack_from("<I", pages.buffered, 0)[0] == 0xF00D0000 + abi.XENMEM_RESOURCE_IOREQ_SERVER_FRAME_BUFIOREQ
    assert hv.get_ioreq_server_info(sid) == 7


def test_the_ioreq_page_behaves_like_the_simulators_mmap(fake):
    hv, libs, _ = fake
    sid = hv.create_ioreq_server()
    pages = hv.map_ioreq_pages(sid)
    assert pages.buffered is None
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    assert ("map_resource", 5, 0, sid, 1, 1, prot) in libs.calls
    page = pages.ioreq
    assert len(page) == 4096
    assert struct.unpack_from("<I", page, 0)[0] == 0xF00D0001  # frame 1: the ioreq page
    slot = abi.Ioreq(
        addr=0x02000050, data=1, count=1, size=4, vp_eport=9, state=abi.IoreqState.IOREQ_READY,
        data_is_ptr=False, is_read=False, df=False, type=abi.IoreqType.COPY,
    )
    slot.pack_into(page, 32)
    assert abi.Ioreq.unpack(page, 32) == slot
    assert page[32 + abi.OFF_FLAGS] == abi.IoreqState.IOREQ_READY
    page[32 + abi.OFF_FLAGS] = abi.IoreqState.INPROCESS
    assert isinstance(page[32 + abi.OFF_FLAGS], int)
    assert page[32:40] == struct.pack("<Q", 0x02000050)
    assert libs.memory[-1][32 + abi.OFF_FLAGS] == abi.IoreqState.INPROCESS  # it is the mapped memory
    page.close()
    assert ("unmap_resource", (sid, 1)) in libs.calls
    with pytest.raises(ValueError):
        page[0]
    n = len(libs.calls)
    page.close()
    assert len(libs.calls) == n


def test_map_resource_failure(fake):
    hv, libs, _ = fake
    libs.fail["map_resource"] = errno.EOPNOTSUPP
    with pytest.raises(HypervisorError, match="map_resource.*EOPNOTSUPP"):
        hv.map_ioreq_pages(0)


def test_guest_pages_map_and_unmap(fake):
    hv, libs, _ = fake
    mapping = hv.map_guest_pages(0x40010, 3)
    assert libs.calls[-1] == ("map", 5, [0x40010, 0x40011, 0x40012], mmap.PROT_READ | mmap.PROT_WRITE)
    assert len(mapping.view) == 3 * 4096
    assert struct.unpack_from("<Q", mapping.view, 4096)[0] == 0x40011
    mapping.view[8] = 0xAA
    assert libs.memory[-1][8] == 0xAA
    mapping.close()
    mapping.close()
    assert libs.calls.count(("unmap", 3)) == 1


def test_a_bad_guest_page_is_a_fault_naming_it(fake):
    hv, libs, _ = fake
    libs.bad_gfns = {0x40011}
    with pytest.raises(GuestMemoryFault, match=r"0x40011.*EFAULT"):
        hv.map_guest_pages(0x40010, 3)
    assert libs.calls[-1] == ("unmap", 3)  # the partial mapping is undone
    libs.fail["map"] = errno.ENOMEM
    with pytest.raises(GuestMemoryFault, match="ENOMEM"):
        hv.map_guest_pages(0x40010, 1)


def test_grants_map_lazily_and_unmap(fake):
    hv, libs, _ = fake
    assert ("gnttab_open",) not in libs.calls
    mapping = hv.map_grant_refs([8, 9])
    assert libs.calls[-2:] == [("gnttab_open",), ("map_grants", 5, [8, 9], mmap.PROT_READ | mmap.PROT_WRITE)]
    assert len(mapping.view) == 2 * 4096
    mapping.close()
    assert libs.calls[-1] == ("unmap_grants", 2)
    with pytest.raises(GuestMemoryFault, match="1000.*EINVAL"):
        hv.map_grant_refs([1000])
    assert libs.calls.count(("gnttab_open",)) == 1


def test_event_channel(fake):
    hv, libs, w = fake
    channel = hv.open_event_channel()
    fd = channel.fileno()
    import fcntl

    assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK
    assert channel.bind_interdomain(5, 3) == 67
    assert channel.read_pending() == []
    os.write(w, struct.pack("=3I", 67, 68, 67))
    assert channel.read_pending() == [67, 68, 67]
    channel.unmask([67, 68])
    channel.notify(67)
    channel.unbind(67)
    assert libs.calls[-4:] == [("unmask", 67), ("unmask", 68), ("notify", 67), ("unbind", 67)]
    libs.fail["bind"] = errno.EINVAL
    with pytest.raises(HypervisorError, match="bind_interdomain.*EINVAL"):
        channel.bind_interdomain(5, 99)
    channel.close()
    channel.close()
    assert libs.calls.count(("evtchn_close",)) == 1
    with pytest.raises(HypervisorError, match="closed"):
        channel.notify(67)


def test_evtchn_open_failure_hints_at_root(fake):
    hv, libs, _ = fake
    libs.fail["evtchn_open"] = errno.EACCES
    with pytest.raises(HypervisorError, match="/dev/xen/evtchn.*EACCES.*root"):
        hv.open_event_channel()


def test_guest_ram_layout_from_xenstore(fake):
    hv, libs, _ = fake
    path = "/local/domain/5/memory/static-max"
    hv._xenstore = FakeStore({path: "4194304"})
    assert hv.guest_ram_layout() == [(0x40000000, 3 * GiB), (0x200000000, GiB)]
    assert hv.guest_ram() is None
    for value in (None, "garbage", "0", XenStoreError("xenstore read: EACCES")):
        hv._xenstore = FakeStore({path: value})
        with pytest.raises(HypervisorError, match=path):
            hv.guest_ram_layout()
    hv.arch = "x86"
    with pytest.raises(HypervisorError, match="only known for Arm"):
        hv.guest_ram_layout()


def test_fast_path_needs_our_page_and_reports_unsupported(fake):
    from xen.hypervisor import FastPathUnsupported

    hv, libs, _ = fake
    with pytest.raises(HypervisorError, match="not a live mapping"):
        hv.ioeventfd(IoreqPages(ioreq=mmap.mmap(-1, 4096)), [64], base=0x02000000, vq=0, fd=3)
    pages = hv.map_ioreq_pages(hv.create_ioreq_server())
    # our privcmd fd is a regular file here: the kernel says ENOTTY
    with pytest.raises(FastPathUnsupported):
        hv.ioeventfd(pages, [64, 65], base=0x02000000, vq=0, fd=3)
    with pytest.raises(FastPathUnsupported):
        hv.irqfd(irq=33, fd=3)


def test_ioeventfd_passes_the_page_address(fake, monkeypatch):
    from xen import privcmd

    hv, libs, _ = fake
    pages = hv.map_ioreq_pages(hv.create_ioreq_server())
    seen = []
    monkeypatch.setattr(privcmd.fcntl, "ioctl", lambda fd, req, payload: seen.append((req, payload)))
    hv.ioeventfd(pages, [64, 65], base=0x02000000, vq=1, fd=30)
    req, payload = seen[-1]
    ioreq, _ports, addr, addr_len, event_fd, vcpus, vq, flags, dom = struct.unpack("<QQQIIIIIH2x", payload)
    assert req == privcmd.IOCTL_PRIVCMD_IOEVENTFD
    assert ioreq == pages.ioreq.address == _addr(libs.memory[-1])
    assert (addr, addr_len, event_fd, vcpus, vq, flags, dom) == (0x02000000, 4, 30, 2, 1, 0, 5)
    hv.irqfd(irq=33, fd=31)
    assert hv._privcmd.irqfd_buffer(31) is not None
    hv.irqfd(irq=33, fd=31, assign=False)
    assert hv._privcmd.irqfd_buffer(31) is None


def test_close_releases_everything_in_reverse_once(fake):
    hv, libs, _ = fake
    pages = hv.map_ioreq_pages(hv.create_ioreq_server())
    mapping = hv.map_guest_pages(0x40000, 1)
    channel = hv.open_event_channel()
    hv.map_grant_refs([1])
    store = hv._xenstore = FakeStore({})
    hv.close()
    tail = [c[0] for c in libs.calls[-7:]]
    assert tail == ["unmap_resource", "unmap", "unmap_grants", "evtchn_close", "gnttab_close", "fmem_close", "dm_close"]
    assert store.closed and hv._privcmd.closed
    assert pages.ioreq.closed
    n = len(libs.calls)
    mapping.close()
    channel.close()
    pages.ioreq.close()
    hv.close()
    assert len(libs.calls) == n
    with pytest.raises(HypervisorError, match="closed"):
        hv.nr_vcpus()


def test_a_failed_open_closes_what_it_opened(tmp_path, monkeypatch):
    (tmp_path / "privcmd").touch()
    (tmp_path / "evtchn").touch()
    ffi = xen_libs.ffi()
    calls = []

    class Libs:
        def xendevicemodel_open(self, logger, flags):
            assert logger == ffi.NULL
            calls.append("dm_open")
            return ffi.cast("xendevicemodel_handle *", 1)

        def xendevicemodel_close(self, dmod):
            calls.append("dm_close")
            return 0

        def xenforeignmemory_open(self, logger, flags):
            calls.append("fmem_open")
            ffi.errno = errno.EPERM
            return ffi.NULL

    monkeypatch.setattr(xen_libs, "load", lambda name: Libs())
    with pytest.raises(HypervisorUnavailable, match="xenforeignmemory_open.*EPERM.*permission denied.*root"):
        RealXen.open(1, dev_dir=str(tmp_path))
    assert calls == ["dm_open", "fmem_open", "dm_close"]


# --- xenstore, against a stand-in libxenstore ------------------------------------


def _text(ffi, value) -> str:
    """A char * argument as the library would see it (cffi passes bytes
    through as char * to C; a stand-in gets the bytes themselves)."""
    return (value if isinstance(value, bytes) else ffi.string(value)).decode()


class FakeXs:
    def __init__(self, ffi):
        self.ffi = ffi
        self.tree = {"/a": b"1", "/a/b": b"two", "/a/c": b""}
        self.freed = []
        self.keep = []
        self.watches = []
        self.closed = 0

    def _alloc(self, data: bytes):
        buf = self.ffi.new("char[]", data + b"\0")
        self.keep.append(buf)
        return buf

    def xs_read(self, h, t, path, length):
        path = _text(self.ffi, path)
        if path == "/denied":
            self.ffi.errno = errno.EACCES
            return self.ffi.NULL
        if path not in self.tree:
            self.ffi.errno = errno.ENOENT
            return self.ffi.NULL
        length[0] = len(self.tree[path])
        return self.ffi.cast("void *", self._alloc(self.tree[path]))

    def xs_write(self, h, t, path, data, length):
        self.tree[_text(self.ffi, path)] = bytes(data[:length])
        return True

    def xs_directory(self, h, t, path, num):
        path = _text(self.ffi, path)
        if path not in self.tree:
            self.ffi.errno = errno.ENOENT
            return self.ffi.NULL
        names = sorted(p[len(path) + 1 :] for p in self.tree if p.startswith(path + "/"))
        strings = [self._alloc(n.encode()) for n in names]
        vec = self.ffi.new("char *[]", strings or 1)
        self.keep.append(vec)
        num[0] = len(names)
        return vec

    def xs_rm(self, h, t, path):
        path = _text(self.ffi, path)
        if path not in self.tree:
            self.ffi.errno = errno.ENOENT
            return False
        del self.tree[path]
        return True

    def xs_watch(self, h, path, token):
        self.watches.append((_text(self.ffi, path), _text(self.ffi, token)))
        return True

    def xs_unwatch(self, h, path, token):
        self.watches.remove((_text(self.ffi, path), _text(self.ffi, token)))
        return True

    def xs_fileno(self, h):
        return 42

    def xs_check_watch(self, h):
        if not self.watches:
            self.ffi.errno = errno.EAGAIN
            return self.ffi.NULL
        path, token = self.watches.pop(0)
        vec = self.ffi.new("char *[]", [self._alloc(path.encode()), self._alloc(token.encode())])
        self.keep.append(vec)
        return vec

    def xs_close(self, h):
        self.closed += 1

    def free(self, ptr):
        self.freed.append(int(self.ffi.cast("uintptr_t", ptr)))


@pytest.fixture
def store():
    from xen.real_xenstore import RealXenStore

    ffi = xen_libs.ffi()
    xs = FakeXs(ffi)
    s = RealXenStore(ffi, xs, xs, ffi.cast("struct xs_handle *", 1))
    yield s, xs
    s.close()


def test_xenstore_read_write_directory_remove(store):
    s, xs = store
    assert s.read("/a/b") == "two"
    assert s.read("/a/c") == ""
    assert s.read("/nothing") is None
    assert len(xs.freed) == 2
    with pytest.raises(XenStoreError, match="/denied.*EACCES"):
        s.read("/denied")
    s.write("/a/d", "vier")
    assert xs.tree["/a/d"] == b"vier"
    assert s.directory("/a") == ["b", "c", "d"]
    assert len(xs.freed) == 3  # one free for the whole vector
    assert s.directory("/none") is None
    s.remove("/a/d")
    s.remove("/a/d")  # absent: fine
    assert "/a/d" not in xs.tree


def test_xenstore_watches(store):
    s, xs = store
    assert s.fileno() == 42
    assert s.read_watches() == []
    s.watch("/a", "tok")
    xs.watches.append(("/a/b", "tok"))
    before = len(xs.freed)
    assert s.read_watches() == [("/a", "tok"), ("/a/b", "tok")]
    assert len(xs.freed) == before + 2
    s.watch("/x", "t2")
    s.unwatch("/x", "t2")
    assert s.read_watches() == []


def test_xenstore_close_is_idempotent(store):
    s, xs = store
    s.close()
    s.close()
    assert xs.closed == 1
    with pytest.raises(XenStoreError, match="closed"):
        s.read("/a")


@needs_no_xen
def test_xenstore_open_without_xen_is_an_error_not_a_crash():
    from xen.real_xenstore import RealXenStore

    with pytest.raises(XenStoreError, match="xs_open"):
        RealXenStore.open()
