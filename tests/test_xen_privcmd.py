"""xen/privcmd.py: the fast-path ioctl payloads, byte for byte.

Expected bytes are built here field by field at the offsets listed in
../shared/docs/xen-ioreq.md (from Linux's include/uapi/xen/privcmd.h); the
ioctl numbers come from a compiled _IOW of <linux/ioctl.h>; the dm_op buffer
is compared with a struct xen_dm_op that gcc fills from Xen's dm_op.h. The
errno mapping goes through a real ioctl on fds that are not privcmd.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import struct
import subprocess

import pytest

from xen import privcmd
from xen.hypervisor import FastPathUnsupported, HypervisorError


def _le(fmt: str) -> str:
    return "<" + fmt


def expected_ioeventfd(ioreq, ports, addr, addr_len, event_fd, vcpus, vq, flags, dom) -> bytes:
    buf = bytearray(48)
    struct.pack_into(_le("Q"), buf, 0, ioreq)
    struct.pack_into(_le("Q"), buf, 8, ports)
    struct.pack_into(_le("Q"), buf, 16, addr)
    struct.pack_into(_le("I"), buf, 24, addr_len)
    struct.pack_into(_le("I"), buf, 28, event_fd)
    struct.pack_into(_le("I"), buf, 32, vcpus)
    struct.pack_into(_le("I"), buf, 36, vq)
    struct.pack_into(_le("I"), buf, 40, flags)
    struct.pack_into(_le("H"), buf, 44, dom)
    return bytes(buf)


def expected_irqfd(dm_op, size, fd, flags, dom) -> bytes:
    buf = bytearray(24)
    struct.pack_into(_le("Q"), buf, 0, dm_op)
    struct.pack_into(_le("I"), buf, 8, size)
    struct.pack_into(_le("I"), buf, 12, fd)
    struct.pack_into(_le("I"), buf, 16, flags)
    struct.pack_into(_le("H"), buf, 20, dom)
    return bytes(buf)


def test_ioeventfd_payload_is_byte_exact():
    fields = dict(
        ioreq=0x00007F1234567000,
        ports=0x00005555DEADBEE8,
        addr=0x02000200,
        addr_len=4,
        event_fd=17,
        vcpus=4,
        vq=1,
        flags=1,
        dom=0x7FEF,
    )
    packed = privcmd.pack_ioeventfd(**fields)
    assert len(packed) == 48
    assert packed == expected_ioeventfd(**fields)


def test_irqfd_payload_is_byte_exact():
    fields = dict(dm_op=0x00007FFFF0001230, size=32, fd=9, flags=1, dom=3)
    packed = privcmd.pack_irqfd(**fields)
    assert len(packed) == 24
    assert packed == expected_irqfd(**fields)


def test_ioctl_numbers_match_the_documented_values():
    assert privcmd.IOCTL_PRIVCMD_IRQFD == 0x40185008
    assert privcmd.IOCTL_PRIVCMD_IOEVENTFD == 0x40305009


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """_IOW numbers and a struct xen_dm_op for set_irq_level, from C."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("needs gcc (scripts/setup installs it)")
    if not os.path.exists("/usr/include/xen/hvm/dm_op.h") or not os.path.exists("/usr/include/linux/ioctl.h"):
        pytest.skip("needs /usr/include/xen/hvm/dm_op.h (libxen-dev) and <linux/ioctl.h> (linux-libc-dev)")
    program = r"""
#include <stdio.h>
#include <stddef.h>
#include <string.h>
#include <stdint.h>
#include <linux/ioctl.h>
#include <xen/xen.h>
#include <xen/hvm/dm_op.h>
struct irqfd_sized { unsigned char b[24]; };
struct ioeventfd_sized { unsigned char b[48]; };
int main(void) {
    printf("%lu %lu\n", (unsigned long)_IOW('P', 8, struct irqfd_sized), (unsigned long)_IOW('P', 9, struct ioeventfd_sized));
    struct xen_dm_op op;
    memset(&op, 0, sizeof op);
    op.op = XEN_DMOP_set_irq_level;
    op.u.set_irq_level.irq = 0x1234567;
    op.u.set_irq_level.level = 1;
    const unsigned char *p = (const unsigned char *)&op;
    for (size_t i = 0; i < sizeof op; i++) printf("%02x", p[i]);
    printf("\n%zu %zu %zu\n", sizeof op, offsetof(struct xen_dm_op, u),
           offsetof(struct xen_dm_op, u.set_irq_level.level));
    return 0;
}
"""
    d = tmp_path_factory.mktemp("privcmd")
    src, exe = d / "privcmd.c", d / "privcmd"
    src.write_text(program)
    subprocess.run([cc, "-D__XEN_TOOLS__", "-o", str(exe), str(src)], check=True, timeout=60)
    return subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split("\n")


def test_ioctl_numbers_match_the_compiled_iow(compiled):
    irqfd, ioeventfd = map(int, compiled[0].split())
    assert privcmd.IOCTL_PRIVCMD_IRQFD == irqfd
    assert privcmd.IOCTL_PRIVCMD_IOEVENTFD == ioeventfd


def test_set_irq_level_dm_op_is_a_whole_struct_xen_dm_op(compiled):
    size, u_offset, level_offset = map(int, compiled[2].split())
    assert privcmd.XEN_DM_OP_SIZE == size
    assert (u_offset, level_offset) == (8, 12)
    ours = privcmd.set_irq_level_dm_op(0x1234567, 1)
    assert ours.hex() == compiled[1]


def test_ioeventfd_on_a_fd_that_is_not_privcmd_is_fast_path_unsupported():
    with open("/dev/null", "rb") as f:
        pc = privcmd.Privcmd(f.fileno(), owned=False)
        with pytest.raises(FastPathUnsupported, match="ENOTTY"):
            pc.ioeventfd(dom=1, ioreq_addr=0x1000, ports=[5, 6], base=0x02000000, vq=0, event_fd=3)


def test_irqfd_on_a_pipe_is_fast_path_unsupported_and_keeps_nothing():
    r, w = os.pipe()
    try:
        pc = privcmd.Privcmd(w, owned=False)
        with pytest.raises(FastPathUnsupported, match="ENOTTY"):
            pc.irqfd(dom=1, irq=33, event_fd=r)
        assert pc.irqfd_buffer(r) is None
        with pytest.raises(FastPathUnsupported):
            pc.irqfd(dom=1, irq=33, event_fd=r, assign=False)
    finally:
        os.close(r)
        os.close(w)


def test_other_errors_are_hypervisor_errors_naming_the_errno():
    r, w = os.pipe()
    os.close(r)
    os.close(w)  # a closed fd: EBADF
    pc = privcmd.Privcmd(w, owned=False)
    with pytest.raises(HypervisorError, match="EBADF") as info:
        pc.irqfd(dom=1, irq=33, event_fd=4)
    assert not isinstance(info.value, FastPathUnsupported)


def test_unsupported_errnos():
    assert privcmd.UNSUPPORTED_ERRNOS == {errno.ENOTTY, errno.EOPNOTSUPP, errno.ENOSYS}


def test_irqfd_keeps_its_dm_op_until_deassigned(monkeypatch):
    """What the kernel receives: the payload points at a live buffer holding
    the set_irq_level dm_op, kept while the registration stands."""
    seen = []

    def fake_ioctl(fd, request, payload):
        assert request == privcmd.IOCTL_PRIVCMD_IRQFD
        dm_op, size, event_fd, flags, dom = struct.unpack("<QIIIH2x", payload)
        seen.append((ctypes.string_at(dm_op, size), size, event_fd, flags, dom))
        return 0

    monkeypatch.setattr(privcmd.fcntl, "ioctl", fake_ioctl)
    pc = privcmd.Privcmd(99, owned=False)
    pc.irqfd(dom=7, irq=40, event_fd=12)
    assert seen[-1] == (privcmd.set_irq_level_dm_op(40, 1), 32, 12, 0, 7)
    assert pc.irqfd_buffer(12) == privcmd.set_irq_level_dm_op(40, 1)
    pc.irqfd(dom=7, irq=40, event_fd=12, assign=False)
    assert seen[-1][2:] == (12, 1, 7)
    assert pc.irqfd_buffer(12) is None
    pc.irqfd(dom=7, irq=41, event_fd=13)
    pc.close()
    assert pc.irqfd_buffer(13) is None
    pc.close()  # idempotent


def test_ioeventfd_passes_the_ports_array(monkeypatch):
    seen = []

    def fake_ioctl(fd, request, payload):
        assert request == privcmd.IOCTL_PRIVCMD_IOEVENTFD
        ioreq, ports, addr, addr_len, event_fd, vcpus, vq, flags, dom = struct.unpack("<QQQIIIIIH2x", payload)
        port_list = list(struct.unpack(f"<{vcpus}I", ctypes.string_at(ports, 4 * vcpus)))
        seen.append((ioreq, port_list, addr, addr_len, event_fd, vq, flags, dom))
        return 0

    monkeypatch.setattr(privcmd.fcntl, "ioctl", fake_ioctl)
    pc = privcmd.Privcmd(99, owned=False)
    pc.ioeventfd(dom=2, ioreq_addr=0x7F0000001000, ports=[64, 65, 66], base=0x02000200, vq=2, event_fd=20)
    assert seen[-1] == (0x7F0000001000, [64, 65, 66], 0x02000200, 4, 20, 2, 0, 2)
    pc.ioeventfd(dom=2, ioreq_addr=0x7F0000001000, ports=[64, 65, 66], base=0x02000200, vq=2, event_fd=20, assign=False)
    assert seen[-1][6] == 1
    with pytest.raises(HypervisorError, match="no event-channel ports"):
        pc.ioeventfd(dom=2, ioreq_addr=0x1000, ports=[], base=0, vq=0, event_fd=20)


def test_open_is_read_write_and_close_on_exec(tmp_path):
    path = tmp_path / "privcmd"
    path.write_bytes(b"")
    pc = privcmd.Privcmd.open(str(path))
    try:
        import fcntl

        assert fcntl.fcntl(pc.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert fcntl.fcntl(pc.fileno(), fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
    finally:
        pc.close()
    assert pc.closed
    with pytest.raises(HypervisorError, match="closed"):
        pc.irqfd(dom=1, irq=33, event_fd=3)
