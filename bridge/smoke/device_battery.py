"""What one device type's battery module provides to the harness.

A device module (checks_blk.py, checks_fs.py, ...) builds one
:class:`DeviceBattery` and bridge/smoke/registry.py lists it; the common
protocol, lifecycle and robustness checks drive the device only through
these hooks, so a new device type is one module and one line.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import attrs

from bridge.smoke.battery import Check


@attrs.define
class Opened:
    """A device as the guest's driver has it open."""

    guest: Any
    transport: Any
    """The VirtioMmioDriver."""
    driver: Any
    """The device driver (VirtioBlkDriver, VirtioFsDriver, ...), or None."""


@attrs.frozen
class SmokeOptions:
    """What the user asked for (the smoke command line)."""

    device: str
    daemon_cmd: str | None = None
    socket: str | None = None
    memory: tuple[str, ...] = ("passthrough",)
    timeout: float = 30.0
    device_id: int | None = None
    queues: int | None = None
    fs_tag: str = "smoke"
    image_mib: int = 64
    artifacts: str | None = None
    """Where to keep what a check produced for people to look at (the gpu frame)."""


@attrs.frozen
class DeviceBattery:
    name: str
    """The smoke --device value."""
    bridge_device: str
    """The bridge's --device value."""
    summary: str
    """One line for --help: which daemon, what the I/O checks do."""
    open: Callable[[Any, Any], Awaitable[Opened]]
    """``await open(rig, guest)``: probe the device and start it (DRIVER_OK)."""
    feature_names: dict[int, str] = attrs.field(factory=dict)
    """Names of the device-specific feature bits, for the decoded features."""
    placeholders: tuple[str, ...] = ()
    """Placeholders of --daemon-cmd besides {socket} (e.g. "image")."""
    prepare: Callable[[str, SmokeOptions], dict[str, str]] = lambda workdir, options: {}
    """Make what the daemon (or the bridge) needs in ``workdir``; returns the
    placeholder values. Called also when the user runs the daemon."""
    after_daemon: Callable[[dict[str, str]], None] = lambda values: None
    """Called each time a daemon the harness ran has stopped, with the
    placeholder values: remove what such daemons leave behind outside the
    work directory (DPDK's runtime files)."""
    bridge_flags: Callable[[Any], list[str]] = lambda rig: []
    """The bridge's flags for the device, given the rig (its options, its
    work directory and the placeholder values)."""
    memory_models: tuple[str, ...] = ("passthrough", "shadow")
    """The memory models the bridge serves the device in; the battery of
    another is reported as not applicable, with ``memory_note``."""
    memory_note: str = ""
    xenstore_virtio: Callable[[SmokeOptions], str | None] = lambda options: None
    """xen-sim --virtio for the device, None to give the bridge --mmio-base/--irq instead."""
    io_checks: tuple[Check, ...] = ()
    io_round: Callable[[Any, Opened, int], Awaitable[None]] | None = None
    """``await io_round(rig, opened, n)``: a little verified I/O (round ``n``),
    for the lifecycle and robustness checks; None: the harness knows no I/O."""
    start_in_flight: Callable[[Any, Opened, Any, int], None] | None = None
    """``start_in_flight(rig, opened, nursery, count)``: start ``count``
    requests that tolerate being cut short by a reset."""
    check_config: Callable[[Any, Opened, bytes | None], Awaitable[list[str]]] | None = None
    """``await check_config(rig, opened, daemon_config)``: what the guest
    reads in config space against the daemon's GET_CONFIG reply (None if it
    sent none); returns detail lines."""
    daemon_rings: Callable[[Opened], list[int]] = lambda opened: sorted(opened.transport.queues)
    """The rings the daemon serves (not those the bridge serves itself,
    like virtio-net's control queue)."""
    config_write: Callable[[Any, Any], Awaitable[tuple[Opened, list[str]]]] | None = None
    """``await config_write(rig, guest)``: open the device, write config
    fields a driver may (and may not) write; returns the open device and
    what happened. None: the common check writes config byte 0 back."""
