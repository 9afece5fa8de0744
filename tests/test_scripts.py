"""The harness scripts stop what they started even when they are stopped:
SIGTERM (what CI and `timeout` send) unwinds them like Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from bridge.processes import REPO_ROOT, child_env

pytestmark = pytest.mark.e2e


def children_of(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return {int(p) for p in f.read().split()}
    except FileNotFoundError:
        return set()


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_sigterm_stops_the_soak_and_everything_it_started():
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO_ROOT, "scripts", "soak.py"), "--minutes", "5", "--mean-gap", "100"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env(), start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        started: set[int] = set()
        while len(started) < 3 and time.monotonic() < deadline:  # daemon, simulator, bridge
            started |= children_of(proc.pid)
            time.sleep(0.1)
        assert len(started) >= 3, started
        time.sleep(1)  # traffic flowing
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "Traceback" not in out
    time.sleep(0.2)
    assert not [pid for pid in started if alive(pid)], "children outlived the soak"
    workdir = [line for line in out.splitlines() if "xvb-soak-" in line]
    assert not workdir or not any(os.path.exists(w.split()[-1]) for w in workdir)
