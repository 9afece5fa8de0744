"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from xen.sim.client import SimHypervisor
from xen.sim.launch import start_simulator


@pytest.fixture
def workdir():
    """A short scratch directory: UNIX socket paths must stay under 108 bytes."""
    path = tempfile.mkdtemp(prefix="xvb-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def start_sim(tmp_path):
    """Start simulators in tmp_path; all of them are stopped by PID after the
    test, and none may leave its process or socket behind."""
    started = []

    def start(**kwargs):
        sim = start_simulator(str(tmp_path / f"xen-sim{len(started)}.sock"), **kwargs)
        started.append(sim)
        return sim

    yield start
    for sim in started:
        sim.stop()
    for sim in started:
        assert not sim.running()
        assert not os.path.exists(sim.control_path)
        with pytest.raises(ProcessLookupError):
            os.kill(sim.pid, 0)


@pytest.fixture
def connect():
    """Device-model connections to simulators, closed after the test."""
    opened = []

    def open_(sim, domid=1):
        hv = SimHypervisor.connect(sim.control_path, domid)
        opened.append(hv)
        return hv

    yield open_
    for hv in opened:
        hv.close()


@pytest.fixture
def memfds():
    """make(size) gives a memfd of that size (guest RAM for a daemon), closed afterwards."""
    fds = []

    def make(size=4 << 20):
        fd = os.memfd_create("guest-ram")
        os.ftruncate(fd, size)
        fds.append(fd)
        return fd

    yield make
    for fd in fds:
        os.close(fd)


@pytest.fixture
def eventfds():
    """Eight eventfds (kick and call of four rings), closed afterwards."""
    fds = [os.eventfd(0) for _ in range(8)]
    yield fds
    for fd in fds:
        os.close(fd)
