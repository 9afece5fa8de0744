"""The device types the smoke harness has a battery for: one module each,
one line here. A new type (gpu, net) is a checks_<type>.py that builds a
DeviceBattery, and its line below."""

from __future__ import annotations

from bridge.smoke import checks_blk, checks_fs, checks_generic, checks_gpu, checks_net
from bridge.smoke.device_battery import DeviceBattery

BATTERIES: dict[str, DeviceBattery] = {
    "blk": checks_blk.BATTERY,
    "fs": checks_fs.BATTERY,
    "generic": checks_generic.BATTERY,
    "gpu": checks_gpu.BATTERY,
    "net": checks_net.BATTERY,
}
