"""Real Xen, seen from dom0 or a driver domain.

What exists today is the front door: it decides, with one clear message,
whether this machine can reach a Xen hypervisor at all. The privcmd / evtchn
implementation of :class:`xen.hypervisor.Hypervisor` is not written yet, and
the door says so rather than pretending.
"""

from __future__ import annotations

import os

from xen.hypervisor import HypervisorUnavailable

PRIVCMD = "/dev/xen/privcmd"
EVTCHN = "/dev/xen/evtchn"


def xen_absent_reason(dev_dir: str = "/dev/xen") -> str | None:
    """Why this machine cannot talk to Xen, or None if it looks like it can."""
    privcmd = os.path.join(dev_dir, "privcmd")
    evtchn = os.path.join(dev_dir, "evtchn")
    missing = [p for p in (privcmd, evtchn) if not os.path.exists(p)]
    if missing:
        return (
            f"no Xen hypervisor here ({' and '.join(missing)} missing): run in a Xen dom0 or driver "
            "domain with the xen-privcmd and xen-evtchn drivers loaded, or use --xen-sim PATH"
        )
    return None


class RealXen:
    @classmethod
    def open(cls, domid: int):
        reason = xen_absent_reason()
        if reason is not None:
            raise HypervisorUnavailable(reason)
        raise HypervisorUnavailable(
            "this version of xen-vhost-bridge cannot drive real Xen yet (only the simulator, --xen-sim PATH)"
        )
