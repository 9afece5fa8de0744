"""Real Xen, end to end: scripts/xen-e2e boots Xen 4.17 for arm64 under
qemu-system-aarch64 (emulation, no KVM), with this bridge and Debian's
qemu-storage-daemon in dom0 and a Linux guest whose own virtio-blk driver
does the I/O (see scripts/xen_e2e/run.py for every check).

It takes a minute or two with a warm cache (.cache/xen-e2e, or
$XEN_E2E_CACHE), a few more the first time (downloads, the hypervisor
build). XEN_E2E=0 turns it off; a set-up failure (a download, the build,
a missing host package) is a failure, not a skip.

The checksum helpers the guest and dom0 share are tested here directly, so
that a check which could never fail cannot pass unnoticed.
"""

from __future__ import annotations

import importlib.util
import json
import lzma
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "xen-e2e"
HELPERS = REPO / "scripts" / "xen_e2e"
TIMEOUT = 1800  # cold cache on a loaded machine; a warm run takes 1-2 minutes


@pytest.fixture
def scratch():
    path = Path(tempfile.mkdtemp(prefix="xvb-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def sh(script: str, scratch: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["sh", "-c", f'. "{HELPERS}/patterns.sh"; {script}'],
        env={**os.environ, "XVB_TMP": str(scratch)}, capture_output=True, text=True, timeout=60,
    )


def test_dom0s_image_check_finds_what_the_guest_writes_and_nothing_else(scratch):
    image = scratch / "disk.img"
    subprocess.run(["truncate", "-s", "64M", str(image)], check=True)
    assert sh(f'write_phase 1 "{image}" && write_phase 2 "{image}" && write_marker 2 "{image}"', scratch).returncode == 0

    def check() -> subprocess.CompletedProcess:
        return subprocess.run(["sh", str(HELPERS / "check_image.sh"), str(image)], env={**os.environ, "XVB_TMP": str(scratch)},
                              capture_output=True, text=True, timeout=60)

    good = check()
    assert good.returncode == 0, good.stdout + good.stderr
    assert "XVB-DOM0-IMAGE ok=1 phase1=[mismatches=0 bytes=524288] phase2=[mismatches=0 bytes=524288]" in good.stdout

    # One byte changed inside phase 2's region 5: that region, and only it, mismatches.
    offset = int(sh("region_block 2 5", scratch).stdout) * 4096 + 1234
    with open(image, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))
    bad = check()
    assert bad.returncode == 1
    assert "ok=0 phase1=[mismatches=0 " in bad.stdout and "phase2=[mismatches=1 " in bad.stdout

    # The guest's phase 2 reads the marker of phase 1 to know it rebooted.
    assert sh(f'write_marker 1 "{image}"; read_marker "{image}"', scratch).stdout == "XVB-PHASE1-DONE"


def test_the_phases_regions_do_not_overlap_and_fit_the_disk(scratch):
    out = sh('for p in 1 2; do i=0; while [ $i -lt $XVB_REGIONS ]; do echo "$(region_block $p $i) $XVB_REGION_KIB"; '
             'i=$((i + 1)); done; done', scratch).stdout.split("\n")
    spans = sorted((int(b) * 4096, int(b) * 4096 + int(k) * 1024) for b, k in (line.split() for line in out if line))
    assert len(spans) == 16
    assert spans[0][0] >= 4096  # block 0 is the marker's
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:]))
    assert spans[-1][1] <= 64 << 20


def load_helper(name: str):
    """scripts/xen_e2e/<name>.py as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(f"xen_e2e_{name}", HELPERS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(HELPERS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(HELPERS))
    return module


PASSING_CONSOLE = """\
(XEN) Xen version 4.17.5
XVB-DOM0 booted: 6.1.0-50-arm64
XVB-DOM0 xen services up
XVB-BRIDGE domid=1 rc=0
XVB-BRIDGE domid=2 rc=0
XVB-DOM0-IMAGE ok=1 phase1=[mismatches=0 bytes=524288] phase2=[mismatches=0 bytes=524288] marker=XVB-PHASE2-DONE
XVB-BRIDGE domid=3 rc=0
XVB-TEARDOWN domid=3 ok=1
XVB-LOG-BEGIN guest-xvb-guest
XVB-RESULT phase=1 ok=1 mismatches=0 bytes=524288
XVB-RESULT phase=2 ok=1 mismatches=0 bytes=524288 persisted=1 reset=1
XVB-LOG-END guest-xvb-guest
XVB-LOG-BEGIN bridge-1
xen-vhost-bridge: ready: serving virtio-blk for domain 1
XVB-LOG-END bridge-1
XVB-DOM0-RESULT failures=0
XVB-DOM0-EXIT 0
"""


@pytest.mark.parametrize(
    "change, failing",
    [
        (None, []),
        (("persisted=1", "persisted=0"), ["guest phase 2 after its reboot: phase 1 data persisted, new data matches"]),
        (("reset=1", "reset=0"), ["guest device reset (driver unbound, bound): data read back"]),
        (("phase=1 ok=1 mismatches=0", "phase=1 ok=0 mismatches=3"), ["guest phase 1: wrote, read back, checksums match"]),
        (("XVB-DOM0-IMAGE ok=1", "XVB-DOM0-IMAGE ok=0"), ["dom0 found both phases in the image file"]),
        (("XVB-BRIDGE domid=2 rc=0\n", ""), ["three bridges (boot, reboot, xl destroy) exited 0"]),
        (("domid=3 rc=0", "domid=3 rc=1"), ["three bridges (boot, reboot, xl destroy) exited 0"]),
        (("XVB-TEARDOWN domid=3 ok=1", "XVB-TEARDOWN domid=3 ok=0"), ["xl destroy: ioreq server torn down, backend removed"]),
        (("XVB-DOM0-RESULT failures=0", "XVB-FAIL timed out\nXVB-DOM0-RESULT failures=1"), ["no step failed in dom0"]),
        (("XVB-DOM0-EXIT 0", "XVB-DOM0-EXIT 1"), ["dom0 test exited 0"]),
    ],
)
def test_the_run_is_judged_by_every_machine_readable_line(change, failing):
    run = load_helper("run")
    text = PASSING_CONSOLE if change is None else PASSING_CONSOLE.replace(*change)
    result = run.verdict(text.splitlines())
    assert [what for what, ok in result["checks"].items() if not ok] == failing
    assert run.verdict([])["checks"] and not any(run.verdict([])["checks"].values())


def test_the_logs_dom0_prints_are_saved_one_file_each(scratch):
    run = load_helper("run")
    names = run.save_logs(PASSING_CONSOLE.splitlines(), scratch)
    assert names == ["dom0-console", "guest-xvb-guest", "bridge-1"]
    assert (scratch / "guest-xvb-guest.log").read_text().splitlines()[0].startswith("XVB-RESULT phase=1")
    assert (scratch / "bridge-1.log").read_text() == "xen-vhost-bridge: ready: serving virtio-blk for domain 1\n"
    dom0 = (scratch / "dom0-console.log").read_text()
    assert "XVB-DOM0-EXIT 0" in dom0 and "(XEN)" not in dom0 and "XVB-RESULT" not in dom0


def test_kernel_modules_come_with_their_dependencies_first(scratch):
    build = load_helper("build")
    mods = scratch / "lib" / "modules" / "6.1.0-9-arm64" / "kernel"
    mods.mkdir(parents=True)
    for name, deps in {"virtio_blk": "virtio_ring,virtio", "virtio_ring": "virtio", "virtio": "",
                       "xen-evtchn": ""}.items():
        (mods / f"{name}.ko").write_bytes(b"\x7fELF....\0license=GPL\0depends=" + deps.encode() + b"\0name=x\0")
    order = build.module_files(scratch, "6.1.0-9-arm64", ["virtio_blk", "xen_evtchn"])
    assert [p.name for p in order] == ["virtio.ko", "virtio_ring.ko", "virtio_blk.ko", "xen-evtchn.ko"]
    with pytest.raises(build.BuildError, match="virtio_mmio"):
        build.module_files(scratch, "6.1.0-9-arm64", ["virtio_mmio"])


def test_the_xen_source_is_found_in_the_archives_index(scratch):
    build = load_helper("build")
    index = scratch / "Sources.xz"
    index.write_bytes(lzma.compress(b"""Package: xe
Version: 1

Package: xen
Version: 4.17.5+72-g01140da4e8-1
Directory: pool/main/x/xen
Checksums-Sha256:
 f139 4357 xen_4.17.5+72-g01140da4e8-1.dsc
 5392 4735560 xen_4.17.5+72-g01140da4e8.orig.tar.xz

Package: xenium
Version: 2
"""))
    entry = build.source_entry(index, "xen")
    assert entry["Version"] == "4.17.5+72-g01140da4e8-1" and entry["Directory"] == "pool/main/x/xen"
    assert entry["Checksums-Sha256"].splitlines()[2].split() == ["5392", "4735560", "xen_4.17.5+72-g01140da4e8.orig.tar.xz"]
    with pytest.raises(build.BuildError, match="xen-utils"):
        build.source_entry(index, "xen-utils")


@pytest.mark.e2e
@pytest.mark.skipif(os.environ.get("XEN_E2E") == "0", reason="XEN_E2E=0: the real-Xen run is turned off")
def test_real_xen_guest_io_reboot_and_destroy_through_the_bridge(scratch):
    result_path = scratch / "result.json"
    proc = subprocess.Popen([str(SCRIPT), "--json", str(result_path)], cwd=REPO, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # run.py stops its QEMU (by its PID) on the way out
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        pytest.fail(f"scripts/xen-e2e did not finish in {TIMEOUT} s:\n{output[-4000:]}")
    assert result_path.exists(), f"scripts/xen-e2e failed before judging the run (exit {proc.returncode}):\n{output[-4000:]}"
    result = json.loads(result_path.read_text())
    failed = [what for what, ok in result.get("checks", {}).items() if not ok]
    assert proc.returncode == 0 and result["passed"] and not failed, (
        f"failed: {failed or result.get('error')}; logs in {result['logs']}\n{output[-4000:]}"
    )
    # What the run promises, from its machine-readable lines.
    assert len(result["checks"]) == 9
    assert [r.split()[1] for r in result["guest_results"]] == ["phase=1", "phase=2"]
    assert result["guest_results"][1].endswith(" persisted=1 reset=1")
    assert [b["rc"] for b in result["bridges"]] == ["0", "0", "0"]
    assert len({b["domid"] for b in result["bridges"]}) == 3  # reboot and re-create give new domains
    logs = Path(result["logs"])
    for name in ("serial", "guest-xvb-guest", "guest-xvb-idle", "bridge-1", "bridge-2", "bridge-3"):
        assert (logs / f"{name}.log").stat().st_size > 0, name
