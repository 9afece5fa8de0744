"""The demos (``scripts/demo DEVICE``) run the real daemons end to end,
pass, and leave nothing behind: each is run small here, as a user would."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

from bridge.processes import REPO_ROOT, child_env

pytestmark = pytest.mark.e2e

DEMO = os.path.join(REPO_ROOT, "scripts", "demo.py")

SMALL = {
    "blk": ["--requests", "40", "--max-size", "65536", "--image-mib", "16"],
    "fs": ["--file-mib", "1"],
    "gpu": ["--resolution", "320x200"],
    "net": ["--frames", "40"],
    "all": ["--requests", "30", "--max-size", "65536", "--image-mib", "16", "--frames", "40",
            "--resolution", "320x200"],
}


def run_demo(*argv: str, tmpdir: str | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run a demo (with its temporary files under ``tmpdir``); one that
    overruns gets SIGTERM, which it handles by stopping everything it
    started (SIGKILL would orphan its daemons)."""
    env = child_env()
    if tmpdir is not None:
        env["TMPDIR"] = tmpdir
    proc = subprocess.Popen([sys.executable, DEMO, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"the demo ran past {timeout} s and was stopped:\n{out}{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("device", sorted(SMALL))
@pytest.mark.parametrize("memory", ["passthrough", "shadow"])
def test_the_demo_passes_and_cleans_up(device, memory):
    tmpdir = tempfile.mkdtemp(prefix="xvb-demo-test-")  # the demo's TMPDIR: whatever it leaves shows here
    extra = []
    if device in ("gpu", "all"):  # the last frame goes where the test says
        png = os.path.join(tmpdir, "frame.png")
        extra = ["--png", png]
    try:
        done = run_demo(device, *SMALL[device], *extra, "--memory", memory, "--seed", "7", tmpdir=tmpdir)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.rstrip().endswith("demo: PASS")
        assert "Traceback" not in done.stderr
        if extra:
            assert os.path.getsize(png) > 0, "the demo names a PNG it did not leave"
            os.unlink(png)
        assert os.listdir(tmpdir) == []
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def test_the_demo_names_its_devices_and_refuses_others():
    listing = run_demo("--help")
    assert listing.returncode == 0
    for device in ("blk", "fs", "gpu", "net", "all"):
        assert f"\n  {device} " in listing.stdout
    wrong = run_demo("floppy")
    assert wrong.returncode == 2 and "no demo 'floppy'" in wrong.stderr
