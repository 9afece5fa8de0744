"""``scripts/demo [DEVICE] [OPTIONS]``: a simulated Xen guest drives a real,
unmodified vhost-user daemon through xen-vhost-bridge, and the demo checks
the result on the host side.

DEVICE is one of:

  blk   qemu-storage-daemon: block I/O, every byte checked on the image (the default)
  fs    virtiofsd: the guest reads, writes and lists files of a host directory
  gpu   vhost-user-gpu: the guest draws a picture; the bridge saves it as a PNG
  net   dpdk-testpmd: the guest's frames come back, intact and in order
  all   all four side by side through one bridge process, one line each

``scripts/demo DEVICE --help`` lists that demo's options.
"""

from __future__ import annotations

import importlib
import sys

DEMOS = {"blk": "demo_blk", "fs": "demo_fs", "gpu": "demo_gpu", "net": "demo_net", "all": "demo_all"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.replace("``", "").strip())
        return 0
    name = "blk"
    if argv and not argv[0].startswith("-"):
        name = argv.pop(0)
        if name not in DEMOS:
            print(f"scripts/demo: no demo {name!r}; choose one of {', '.join(DEMOS)}", file=sys.stderr)
            return 2
    return importlib.import_module(DEMOS[name]).main(argv)


if __name__ == "__main__":
    sys.exit(main())
