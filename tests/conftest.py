"""Fixtures shared by the test modules."""

from __future__ import annotations

import os

import pytest

from xen.sim.launch import start_simulator


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
